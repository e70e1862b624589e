"""The lease that keeps one live process per sweep name: its tags as lease_tags writes them, read back."""

import os
import socket
import subprocess
import sys
import time

from flows.sweep import lease
from flows.tracking import RunRecord


def record(status="RUNNING", owner=None, expires_in=60.0) -> RunRecord:
    """A parent run's record holding owner's lease as lease_tags writes it (expiring in expires_in s)."""
    tags = {} if owner is None else lease.lease_tags(owner, ttl_s=expires_in)
    return RunRecord(id="r", name="s", experiment_id="1", status=status, start_time_ms=0, parent_id=None,
                     params={}, metrics={}, tags=tags)


def test_a_live_lease_of_another_process_is_held():
    other = f"elsewhere.example:{os.getpid()}:abcd1234"
    assert lease.live_holder(record(owner=other)).startswith(other)


def test_no_lease_an_expired_one_a_finished_sweep_or_our_own_is_free():
    mine = lease.new_owner()
    assert lease.live_holder(record()) is None
    assert lease.live_holder(record(owner="h:1:x", expires_in=-1)) is None
    assert lease.live_holder(record(status="FINISHED", owner="h:1:x")) is None
    assert lease.live_holder(record(owner=mine), owner=mine) is None


def test_a_lease_lapses_when_its_time_to_live_has_passed():
    other = f"elsewhere.example:{os.getpid()}:abcd1234"
    short = record(owner=other, expires_in=0.5)
    assert lease.live_holder(short) is not None
    time.sleep(0.6)
    assert lease.live_holder(short) is None


def test_the_lease_says_until_when_it_was_renewed_in_local_time():
    other = f"elsewhere.example:{os.getpid()}:abcd1234"
    expires = float(lease.lease_tags(other, ttl_s=120)[lease.TAG_EXPIRES])
    assert time.time() + 119 < expires < time.time() + 121  # seconds since the epoch, as time.time()
    held = lease.live_holder(RunRecord(id="r", name="s", experiment_id="1", status="RUNNING", start_time_ms=0,
                                       parent_id=None, params={}, metrics={},
                                       tags={lease.TAG_OWNER: other, lease.TAG_EXPIRES: f"{expires:.3f}"}))
    assert held == f"{other} (renewed until {time.strftime('%H:%M:%S', time.localtime(expires))})"


def test_held_renews_the_lease_while_the_sweep_runs_and_releases_it_at_the_end(store, monkeypatch):
    """Through a real store: the lease held past its time to live stays live (renewed), then is free."""
    from flows import tracking

    monkeypatch.setattr(lease, "RENEW_S", 0.2)
    run = tracking.connect(store.uri).start_run("lease", "renewed")
    owner = lease.new_owner()
    run.set_tags(lease.lease_tags(owner, ttl_s=0.5))
    with lease.held(run, owner):
        time.sleep(1.2)  # more than twice the time to live: only renewals keep it
        holder = lease.live_holder(run.record(), owner=lease.new_owner())  # as another process sees it
        assert holder is not None and holder.startswith(f"{owner} (renewed until ")
    assert lease.live_holder(run.record(), owner=lease.new_owner()) is None
    assert run.record().tags[lease.TAG_EXPIRES] == "0"


def test_a_lease_of_a_dead_process_on_this_host_is_free_before_it_lapses():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = f"{socket.gethostname()}:{gone.pid}:abcd1234"
    alive = f"{socket.gethostname()}:{os.getpid()}:abcd1234"
    assert lease.live_holder(record(owner=dead)) is None
    assert lease.live_holder(record(owner=alive)) is not None


def test_a_lease_of_a_dead_process_not_yet_reaped_is_free():
    """A process that died but whose parent has not reaped it (a zombie) still answers kill(pid, 0)."""
    import psutil

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 60
        while psutil.Process(gone.pid).status() != psutil.STATUS_ZOMBIE:  # dead, and not reaped: no wait()
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.05)
        assert lease.live_holder(record(owner=f"{socket.gethostname()}:{gone.pid}:abcd1234")) is None
    finally:
        gone.wait()


def test_the_busy_error_names_the_host_and_the_process():
    message = str(lease.busy_error("bn", "node7:4242:abcd1234 (renewed until 12:00:00)"))
    assert "sweep 'bn' is being run by another process right now (host node7, pid 4242" in message
    assert "another --name" in message
