"""Faults against real processes: signals, kill -9, a tracking server that goes away, two runs at once.

Each fault must end in a clear state: a message, a non-zero exit, no process left
behind, no run left RUNNING that a resume does not repair, no finished run lost.
The sweeps here run as `cnnflow run sweep` subprocesses, each in a session of its
own so that the whole tree of processes it started can be found by its group id.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

import harness

from flows import local_server
from flows.servers import free_port, mlflow_server_command, port_is_taken, stop_process_group, wait_until_healthy

from .conftest import CNNFLOW, wait_for

pytestmark = pytest.mark.slow

NUM_TRIALS = 6
# About 3 s of training per trial: long enough to interrupt a sweep in the middle of a trial.
SWEEP = ["--space", "train_seed=" + ",".join(map(str, range(NUM_TRIALS))), "--num-train", "1000", "--num-epochs", "16",
         "--batch-size", "10", "--num-filters", "8", "--experiment", "faults"]


def processes_in_group(group_id: int) -> list[int]:
    """The live (not zombie) processes whose process group is group_id, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                state, _, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
                if int(group) == group_id and state != "Z":
                    found.append(int(entry.name))
    return found

LONGER_TRIALS = ("--num-epochs", "100")  # about 14 s a trial on this machine kind (the last value given counts)


def start_sweep(env: dict, name: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([str(CNNFLOW), "run", "sweep", "--name", name, *SWEEP, *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout_s: float) -> tuple[int, str]:
    """(exit code, stderr) of a process, which must end within timeout_s."""
    try:
        _, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_process_group(process, 5)
        raise AssertionError(f"still running after {timeout_s:.0f} s")
    return process.returncode, stderr


class Runs:
    """The sweep's runs, read from the store (sqlite file or server) in this process."""

    def __init__(self, uri: str, experiment: str = "faults"):
        self.client, self.experiment = MlflowClient(uri), experiment

    def all(self) -> list:
        found = self.client.get_experiment_by_name(self.experiment)
        return [] if found is None else list(self.client.search_runs([found.experiment_id]))

    def parent(self, name: str):
        return next((r for r in self.all() if r.data.tags.get("sweep_role") == "parent"
                     and r.data.tags.get("sweep_name") == name), None)

    def children(self, name: str) -> list:
        return [r for r in self.all() if r.data.tags.get("sweep_role") == "trial"
                and r.data.tags.get("sweep_name") == name]

    def statuses(self, name: str) -> list[str]:
        return sorted(r.info.status for r in self.children(name))


@pytest.fixture
def sqlite_env(tmp_path, ops_env, prefect_server) -> tuple[dict, str]:
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    return {**ops_env, "PREFECT_API_URL": prefect_server, "MLFLOW_TRACKING_URI": store}, store


def assert_resume_finishes(env: dict, runs: Runs, name: str, kept: dict[str, str], *extra: str) -> None:
    """Rerunning the sweep (extra: start_sweep's) finishes it: every trial FINISHED once, nothing RUNNING, the
    finished kept."""
    code, stderr = finish(start_sweep(env, name, *extra), 240)
    assert code == 0, stderr[-2000:]
    children = runs.children(name)
    assert sorted(r.info.status for r in children) == ["FINISHED"] * NUM_TRIALS
    assert runs.parent(name).info.status == "FINISHED"
    assert not [r for r in runs.all() if r.info.status == "RUNNING"]
    finished_ids = {r.info.run_id for r in children}
    assert set(kept) <= finished_ids, "a run that had finished before the fault was lost or redone"


def test_sigterm_stops_the_sweep_kills_its_runs_and_leaves_no_process(sqlite_env):
    env, store = sqlite_env
    runs = Runs(store)
    sweep = start_sweep(env, "sigterm")
    wait_for(lambda: "FINISHED" in runs.statuses("sigterm"), 180, "a first trial finished")
    finished = {r.info.run_id: r.info.status for r in runs.children("sigterm") if r.info.status == "FINISHED"}
    signalled_ms = time.time() * 1000
    sweep.send_signal(signal.SIGTERM)

    code, stderr = finish(sweep, 60)
    assert code == 128 + signal.SIGTERM
    assert stderr.strip().splitlines()[-1].startswith("error: stopped by SIGTERM")
    wait_for(lambda: not processes_in_group(sweep.pid), 10, "the sweep's worker processes gone")
    parent = runs.parent("sigterm")
    assert parent.info.status == "KILLED" and parent.data.tags["failure_reason"] == "Interrupted: stopped by SIGTERM"
    children = runs.children("sigterm")
    assert {r.info.status for r in children} <= {"FINISHED", "KILLED"}
    for r in children:
        if r.info.status == "KILLED":
            assert r.data.tags["failure_reason"] == "Interrupted: stopped by SIGTERM"
    # No trial was started once the signal had come (allowing for clocks read in two processes).
    assert max(r.info.start_time for r in children) < signalled_ms + 500
    assert_resume_finishes(env, runs, "sigterm", finished)


def test_kill_9_of_the_sweep_takes_its_workers_along_and_a_resume_repairs_it(sqlite_env):
    env, store = sqlite_env
    runs = Runs(store)
    sweep = start_sweep(env, "kill9")
    wait_for(lambda: "FINISHED" in runs.statuses("kill9") and "RUNNING" in runs.statuses("kill9"), 180,
             "a trial finished and another in progress")
    assert len(processes_in_group(sweep.pid)) > 1  # the leader and its trial workers
    finished = {r.info.run_id: r.info.status for r in runs.children("kill9") if r.info.status == "FINISHED"}
    os.kill(sweep.pid, signal.SIGKILL)
    sweep.wait(10)

    wait_for(lambda: not processes_in_group(sweep.pid), 10, "the trial workers ended with their parent")
    assert "RUNNING" in runs.statuses("kill9")  # what kill -9 leaves: only a resume can repair it
    assert_resume_finishes(env, runs, "kill9", finished)


def test_a_train_run_killed_with_9_is_repaired_by_the_next_run_in_its_experiment(sqlite_env):
    env, store = sqlite_env
    runs = Runs(store)
    train = ["--experiment", "faults", "--num-train", "1000", "--batch-size", "10", "--num-filters", "8"]
    killed = subprocess.Popen([str(CNNFLOW), "run", "train", *train, "--num-epochs", "50", "--run-name", "killed"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: [r for r in runs.all()
                      if r.info.run_name == "killed" and r.data.metrics.get("curves/loss") is not None],
             180, "the train run logging its loss")
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(10)
    (left,) = [r for r in runs.all() if r.info.run_name == "killed"]
    assert left.info.status == "RUNNING"  # what kill -9 leaves

    done = subprocess.run([str(CNNFLOW), "run", "train", *train, "--num-epochs", "1", "--run-name", "next"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (repaired,) = [r for r in runs.all() if r.info.run_name == "killed"]
    assert repaired.info.status == "KILLED"
    assert repaired.data.tags["failure_reason"].startswith(f"the process that ran it (pid {killed.pid} on ")
    assert "marked 1 run KILLED that a process which no longer runs had left RUNNING: killed" in done.stderr
    assert not [r for r in runs.all() if r.info.status == "RUNNING"]


def test_the_local_prefect_server_lost_mid_sweep_stops_it_in_one_line_and_a_rerun_finishes_it(tmp_path, ops_env):
    """Prefect's loss, not MLflow's: within CNNCORE_PREFECT_WAIT_S the sweep stops as for a signal (trials in
    progress KILLED, finished ones kept), says which server in one line, and leaves no process; once the server
    is started again, the same command resumes the sweep to FINISHED, without the stale failure reason."""
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    env = {**ops_env, "MLFLOW_TRACKING_URI": store, "CNNCORE_SERVER_HOME": str(tmp_path / "server"),
           "CNNCORE_PREFECT_WAIT_S": "10"}  # no PREFECT_API_URL: cnnflow's local Prefect server
    runs = Runs(store)
    harness.seed_prefect_home(local_server.prefect_home(tmp_path / "server"))
    server = subprocess.run([str(CNNFLOW), "server", "start"], env=env, capture_output=True, text=True, timeout=300)
    assert server.returncode == 0, server.stderr
    try:
        # Trials long enough that the sweep outlasts the wait: with 16 epochs all 6 trained within the 10 s
        # (2.3 s each), and the flow rightly said it had finished.
        sweep = start_sweep(env, "prefect-lost", *LONGER_TRIALS)
        wait_for(lambda: "FINISHED" in runs.statuses("prefect-lost") and "RUNNING" in runs.statuses("prefect-lost"),
                 240, "a trial finished and another in progress")
        state = json.loads((tmp_path / "server" / "server.json").read_text())
        os.killpg(state["pid"], signal.SIGKILL)
        gone = time.monotonic()
        code, stderr = finish(sweep, 180)
        took = time.monotonic() - gone
        print(f"lost local Prefect server: the sweep ended {took:.1f} s after it went (wait 10 s)")
        assert code == 1
        error_lines = [line for line in stderr.splitlines() if line.startswith("error:") or "| ERROR" in line]
        assert len(error_lines) == 1 and error_lines[0].startswith("error: the local Prefect server at http://127.0.0.1:")
        assert "stopped answering at" in error_lines[0] and "$CNNCORE_PREFECT_WAIT_S): the flow stopped there" in \
            error_lines[0]
        assert took < 10 + 45  # the wait, a worker's stop, the exit: not Prefect's minutes of retries
        wait_for(lambda: not processes_in_group(sweep.pid), 10, "the sweep's worker processes gone")
        statuses = runs.statuses("prefect-lost")
        assert "FINISHED" in statuses and set(statuses) <= {"FINISHED", "KILLED"}
        parent = runs.parent("prefect-lost")
        assert parent.info.status == "KILLED"
        assert parent.data.tags["failure_reason"].startswith("PrefectServerLostError: the local Prefect server at")

        finished = {r.info.run_id: r.info.status for r in runs.children("prefect-lost") if r.info.status == "FINISHED"}
        # starts the local server again
        assert_resume_finishes(env, runs, "prefect-lost", finished, *LONGER_TRIALS)
        assert "failure_reason" not in runs.parent("prefect-lost").data.tags
    finally:
        subprocess.run([str(CNNFLOW), "server", "stop"], env=env, capture_output=True, timeout=120)


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """folder as a tmpfs of the given size (root only, where mounts are allowed; else the test skips)."""
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                          text=True) if os.geteuid() == 0 else None
    if done is None or done.returncode != 0:
        pytest.skip(f"a small disk needs a tmpfs mount (as root): {done.stderr.strip() if done else 'not root'}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_full_disk_is_one_line_naming_the_store_with_the_parent_marked_and_a_rerun_resumes(tmp_path, ops_env,
                                                                                           prefect_server):
    disk = tmp_path / "disk"
    store = f"sqlite:///{disk / 'mlruns' / 'mlflow.db'}"
    env = {**ops_env, "PREFECT_API_URL": prefect_server, "MLFLOW_TRACKING_URI": store}
    # The empty store takes about 950 KiB and its reserve 256 KiB: room for a few trials, not for 12.
    with small_disk(disk, "1600k"):
        runs = Runs(store)
        name = "disk-full"
        sweep = subprocess.Popen([str(CNNFLOW), "run", "sweep", "--name", name, "--experiment", "faults", "--space",
                                  "train_seed=" + ",".join(map(str, range(12))), "--num-train", "300",
                                  "--num-epochs", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, start_new_session=True)
        code, stderr = finish(sweep, 600)
        assert code == 1
        last = stderr.strip().splitlines()[-1]
        # SQLite's own words, or the OS's when an artifact's file is what no longer fits.
        assert re.match(rf"error: the MLflow store {re.escape(store)} is full: (database or disk is full|No space "
                        r"left on device)\b.* \(\d+ KiB free of 1\.6 MiB in .*\)\. Free space there and rerun the "
                        "command: a sweep resumes from its finished trials$", last), stderr
        assert "Traceback" not in stderr and len(stderr.splitlines()) < 60, stderr[-3000:]  # was 1,524 lines
        wait_for(lambda: not processes_in_group(sweep.pid), 10, "the sweep's worker processes gone")
        parent = runs.parent(name)
        assert parent.info.status == "FAILED"  # marked, though the disk is full: its reserve was given back
        assert not (disk / "mlruns" / "mlflow.db.reserve").exists()
        finished = {r.info.run_id: r.info.status for r in runs.children(name) if r.info.status == "FINISHED"}
        assert finished

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed
        code, stderr = finish(subprocess.Popen([str(CNNFLOW), "run", "sweep", "--name", name, "--experiment", "faults",
                                                "--space", "train_seed=" + ",".join(map(str, range(12))),
                                                "--num-train", "300", "--num-epochs", "2"], env=env,
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), 900)
        assert code == 0, stderr[-2000:]
        assert runs.statuses(name) == ["FINISHED"] * 12
        assert set(finished) <= {r.info.run_id for r in runs.children(name)}
        assert runs.parent(name).info.status == "FINISHED" and "failure_reason" not in runs.parent(name).data.tags
        assert (disk / "mlruns" / "mlflow.db.reserve").stat().st_size == 256 * 1024  # kept again


def test_kill_9_with_no_local_server_takes_prefects_temporary_server_along(tmp_path, ops_env):
    """Prefect's temporary server runs in the command's own process group; a watchdog kills it with the command."""
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    env = {**ops_env, "MLFLOW_TRACKING_URI": store}  # no PREFECT_API_URL: the temporary server
    runs = Runs(store)
    sweep = start_sweep(env, "kill9-temporary", "--no-local-server")
    wait_for(lambda: "RUNNING" in runs.statuses("kill9-temporary"), 240, "a trial in progress")
    started = processes_in_group(sweep.pid)
    assert len(started) > 2  # the command, Prefect's temporary server and the trial workers
    os.kill(sweep.pid, signal.SIGKILL)
    sweep.wait(10)
    wait_for(lambda: not processes_in_group(sweep.pid), 15, "Prefect's temporary server and the workers gone")


def test_the_same_sweep_name_twice_at_once_the_second_refuses_and_the_first_finishes(sqlite_env):
    env, store = sqlite_env
    runs = Runs(store)
    first = start_sweep(env, "twice")
    wait_for(lambda: runs.parent("twice") is not None, 120, "the first sweep's parent run")
    code, stderr = finish(start_sweep(env, "twice"), 120)
    assert code == 1
    assert "sweep 'twice' is being run by another process right now" in stderr.strip().splitlines()[-1]
    code, stderr = finish(first, 240)
    assert code == 0, stderr[-2000:]
    assert runs.statuses("twice") == ["FINISHED"] * NUM_TRIALS


def test_two_sweeps_on_a_fresh_sqlite_store_both_finish(sqlite_env):
    env, store = sqlite_env
    runs = Runs(store)
    a, b = start_sweep(env, "fresh-a", "--space", "train_seed=0,1"), start_sweep(env, "fresh-b", "--space", "train_seed=0,1")
    for process in (a, b):
        code, stderr = finish(process, 240)
        assert code == 0, stderr[-2000:]
    assert runs.statuses("fresh-a") == runs.statuses("fresh-b") == ["FINISHED"] * 2


# ---------------------------------------------------------------- a tracking server that goes away


class RestartableServer:
    """A real `mlflow server` on one port and one store, that a test can stop and start again."""

    def __init__(self, root: Path, env: dict):
        self.port, self.env, self.root = free_port(), env, root
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command, additions = mlflow_server_command(f"sqlite:///{self.root / 'mlflow.db'}", self.port,
                                                   artifacts_destination=str(self.root / "artifacts"))
        log = open(self.root / "server.log", "ab")
        self.process = subprocess.Popen(command, env={**self.env, **additions}, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        wait_until_healthy(f"{self.url}/health", 90, self.process, self.root / "server.log")

    def stop(self) -> None:
        stop_process_group(self.process, 3)
        wait_for(lambda: not port_is_taken(self.port), 20, "the server's port free")


@pytest.fixture
def server(tmp_path, ops_env):
    restartable = RestartableServer(tmp_path, ops_env)
    restartable.start()
    yield restartable
    if restartable.process is not None:
        stop_process_group(restartable.process, 3)


def test_a_tracking_server_gone_stops_the_sweep_in_bounded_time_and_a_resume_finishes(server, ops_env,
                                                                                       prefect_server):
    env = {**ops_env, "PREFECT_API_URL": prefect_server, "MLFLOW_TRACKING_URI": server.url,
           "CNNCORE_TRACKING_WAIT_S": "8"}
    runs = Runs(server.url)
    sweep = start_sweep(env, "outage")
    wait_for(lambda: runs.statuses("outage").count("FINISHED") >= 2, 180, "two trials finished")
    finished = {r.info.run_id: r.info.status for r in runs.children("outage") if r.info.status == "FINISHED"}
    server.stop()
    stopped = time.monotonic()

    code, stderr = finish(sweep, 120)
    assert code == 1
    assert time.monotonic() - stopped < 60  # the 8 s wait, a trial's training, and the exit
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: the MLflow tracking server at") and "stopped answering" in last
    wait_for(lambda: not processes_in_group(sweep.pid), 10, "the sweep's worker processes gone")

    server.start()
    assert_resume_finishes(env, runs, "outage", finished)


@pytest.mark.parametrize("outage", ["dead", "frozen"])
def test_a_tracking_server_gone_ends_the_sweep_at_about_the_stated_wait(server, ops_env, prefect_server, outage):
    """CNNCORE_TRACKING_WAIT_S is the wait, whether the server refuses connections (dead) or accepts them and
    never answers (frozen: SIGSTOP), and whatever the trials were doing: not one wait per process or per call
    (the sweep's parent, its lease, each trial worker), nor a request timeout per call once it is known down."""
    wait_s = 20
    env = {**ops_env, "PREFECT_API_URL": prefect_server, "MLFLOW_TRACKING_URI": server.url,
           "CNNCORE_TRACKING_WAIT_S": str(wait_s)}
    runs = Runs(server.url)
    name = f"wait-{outage}"
    sweep = start_sweep(env, name)
    wait_for(lambda: "FINISHED" in runs.statuses(name), 180, "a first trial finished")
    if outage == "dead":
        server.stop()
    else:
        os.killpg(server.process.pid, signal.SIGSTOP)
    gone = time.monotonic()
    try:
        code, stderr = finish(sweep, wait_s + 120)
        took = time.monotonic() - gone
    finally:
        if outage == "frozen":
            os.killpg(server.process.pid, signal.SIGCONT)
    assert code == 1
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: the MLflow tracking server at") and "stopped answering" in last, stderr[-2000:]
    # The wait, the lease's renewal interval (5 s) before it is noticed, a trial worker's stop (SIGINT) and the
    # exit; a frozen server adds one request's timeout (15 s) before the first failure is seen.
    print(f"{outage} tracking server: the sweep ended {took:.1f} s after it went (wait {wait_s} s)")
    assert took < wait_s + (25 if outage == "dead" else 40), f"ended {took:.0f} s after the server went"
    wait_for(lambda: not processes_in_group(sweep.pid), 10, "the sweep's worker processes gone")


def test_a_short_tracking_server_blip_is_ridden_out(server, ops_env, prefect_server):
    env = {**ops_env, "PREFECT_API_URL": prefect_server, "MLFLOW_TRACKING_URI": server.url,
           "CNNCORE_TRACKING_WAIT_S": "60"}
    runs = Runs(server.url)
    sweep = start_sweep(env, "blip")
    wait_for(lambda: "FINISHED" in runs.statuses("blip"), 180, "a first trial finished")
    server.stop()
    time.sleep(3)
    server.start()

    code, stderr = finish(sweep, 240)
    assert code == 0, stderr[-2000:]
    assert runs.statuses("blip") == ["FINISHED"] * NUM_TRIALS
    assert runs.parent("blip").info.status == "FINISHED"


# ---------------------------------------------------------------- cnnflow ui


def start_ui(tmp_path, ops_env) -> tuple[subprocess.Popen, int]:
    port = free_port()
    ui = subprocess.Popen([str(CNNFLOW), "ui", "--port", str(port), "--backend-store-uri",
                           f"sqlite:///{tmp_path / 'mlflow.db'}"], env=ops_env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert ui.stdout.readline().startswith("MLflow UI: http://127.0.0.1:")  # bounded by its own --timeout
    return ui, port


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_ui_stops_its_server_on_sigterm_and_sighup(tmp_path, ops_env, sig):
    ui, port = start_ui(tmp_path, ops_env)
    ui.send_signal(sig)
    assert ui.wait(timeout=30) == 128 + sig  # 143 for SIGTERM, 129 for SIGHUP, as every cnnflow command
    assert ui.stderr.read().strip().splitlines()[-1] == f"stopped by {sig.name}: the MLflow UI is stopped"
    assert not port_is_taken(port)
    assert not processes_in_group(ui.pid)


def test_a_killed_ui_takes_its_server_along(tmp_path, ops_env):
    ui, port = start_ui(tmp_path, ops_env)
    os.kill(ui.pid, signal.SIGKILL)
    ui.wait(10)
    wait_for(lambda: not port_is_taken(port), 20, "the MLflow server's port free after its parent died")
