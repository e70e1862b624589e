"""The lease that keeps one live process per sweep name (no Prefect needed)."""

import os
import socket
import subprocess
import sys
import time

from flows.sweep import lease
from flows.tracking import RunRecord


def record(status="RUNNING", owner=None, expires_in=60.0) -> RunRecord:
    tags = {} if owner is None else {lease.TAG_OWNER: owner, lease.TAG_EXPIRES: f"{time.time() + expires_in:.3f}"}
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


def test_a_lease_of_a_dead_process_on_this_host_is_free_before_it_lapses():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = f"{socket.gethostname()}:{gone.pid}:abcd1234"
    alive = f"{socket.gethostname()}:{os.getpid()}:abcd1234"
    assert lease.live_holder(record(owner=dead)) is None
    assert lease.live_holder(record(owner=alive)) is not None


def test_the_busy_error_names_the_host_and_the_process():
    message = str(lease.busy_error("bn", "node7:4242:abcd1234 (renewed until 12:00:00)"))
    assert "sweep 'bn' is being run by another process right now (host node7, pid 4242" in message
    assert "another --name" in message
