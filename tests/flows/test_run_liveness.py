"""Runs a dead process left RUNNING are repaired by the next run in their experiment (flows.tracking.liveness):
marked KILLED with the reason, their RUNNING children with them; a run whose process lives, a run of another
host still renewed, and a run without a claim are left alone."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from flows.sweep import lease
from flows.tracking import RunRecord, connect, liveness
from flows.train import train


def dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def record(tags: dict[str, str], status: str = "RUNNING") -> RunRecord:
    return RunRecord(id="r", name="r", experiment_id="1", status=status, start_time_ms=0, parent_id=None, params={},
                     metrics={}, tags=tags)


HOST = socket.gethostname()


def test_a_run_whose_process_is_gone_is_abandoned_at_once_and_one_whose_claim_lapsed_too():
    gone = f"{HOST}:{dead_pid()}:abcd1234"
    reason = liveness.abandoned(record(liveness.claim_tags(gone)))
    assert reason.startswith(f"the process that ran it (pid {gone.split(':')[1]} on {HOST}) ended without closing "
                             "it, which no longer exists")
    lapsed = liveness.abandoned(record(liveness.claim_tags("elsewhere:42:abcd1234", ttl_s=-1)))
    assert lapsed.startswith("the process that ran it (pid 42 on elsewhere)") and "lease lapsed" in lapsed


def test_a_live_claim_a_finished_run_and_a_run_without_a_claim_are_not_abandoned():
    assert liveness.abandoned(record(liveness.claim_tags(liveness.new_owner()))) is None  # this very process
    assert liveness.abandoned(record(liveness.claim_tags("elsewhere:42:abcd1234"))) is None  # renewed, elsewhere
    assert liveness.abandoned(record(liveness.claim_tags(f"{HOST}:{dead_pid()}:x"), status="FINISHED")) is None
    assert liveness.abandoned(record({})) is None  # another tool's run: never touched


def test_a_sweeps_lease_is_a_claim_too():
    gone = f"{HOST}:{dead_pid()}:abcd1234"
    assert liveness.abandoned(record(lease.lease_tags(gone))) is not None
    assert liveness.abandoned(record(lease.lease_tags(lease.new_owner()))) is None


def test_the_next_run_in_the_experiment_marks_abandoned_runs_and_their_children_killed(store, tiny):
    made = connect(store.uri)
    experiment = made.experiment_id("cnncore-train")
    gone = f"{HOST}:{dead_pid()}:abcd1234"
    killed = made.create_run_in(experiment, "killed", parent_id=None, params=None, tags=liveness.claim_tags(gone))
    child = made.create_run_in(experiment, "its child", parent_id=killed.id, params=None, tags=None)
    alive = made.create_run_in(experiment, "alive", parent_id=None, params=None,
                               tags=liveness.claim_tags(f"{HOST}:{os.getpid()}:abcd1234"))
    foreign = made.create_run_in(experiment, "foreign", parent_id=None, params=None, tags=None)

    train(config=tiny, tracking_uri=store.uri)

    assert killed.record().status == "KILLED" and child.record().status == "KILLED"
    assert killed.record().tags["failure_reason"].startswith(f"the process that ran it (pid {gone.split(':')[1]} on "
                                                             f"{HOST}) ended without closing it")
    assert child.record().tags["failure_reason"].startswith(f"its parent run {killed.id} was abandoned: ")
    assert alive.record().status == "RUNNING" and foreign.record().status == "RUNNING"
    (trained,) = [r for r in store.runs("cnncore-train")
                  if r.info.run_id not in {killed.id, child.id, alive.id, foreign.id}]
    assert trained.data.tags[liveness.TAG_OWNER].startswith(f"{HOST}:{os.getpid()}:")  # the new run claims its own
    assert trained.info.status == "FINISHED"
