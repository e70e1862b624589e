"""`cnnflow run sweep` starts the process its trial workers are forked from as soon as the command is known,
so that the workers' imports run beside the sweep's own (flows.forkserver), and only when the trials will
train in those workers."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from flows import forkserver

from .conftest import CNNFLOW
from .test_terminal import TINY_TRAIN

# The least lead the forkserver has over the sweep's first line: started by the flow itself, it had 0.01-0.05 s.
EARLY_S = 0.5


@pytest.mark.parametrize("name, args, starts", [
    ("sweep", [], True),
    ("sweep", ["--space", "train_seed=0,1", "--trials-in", "processes"], True),
    ("sweep", ["--trials-in=processes"], True),
    ("pipeline", [], True),
    ("sweep", ["--trials-in", "threads"], False),
    ("sweep", ["--trials-in=threads"], False),
    ("sweep", ["--trials-in"], False),  # a command that will fail on its arguments
    ("sweep", ["--dask-address", "tcp://127.0.0.1:8786"], False),
    ("sweep", ["--dask-address=tcp://127.0.0.1:8786"], False),
    ("sweep", ["--params", "sweep.yaml"], False),  # the file could say threads or Dask
    ("train", [], False),
    ("gradient-check", [], False),
])
def test_the_forkserver_starts_early_only_for_trials_in_worker_processes(monkeypatch, name, args, starts):
    started = []
    monkeypatch.setattr(forkserver, "start_forkserver", lambda *a, **k: started.append(a))
    assert forkserver.start_for_command(name, args) is starts
    assert len(started) == starts


def children_of(pid: int) -> dict[int, str]:
    """pid's live child processes and their command lines, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                state, parent = stat.rsplit(")", 1)[1].split()[:2]
                if int(parent) == pid and state != "Z":
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError):
                pass
    return found


def test_a_sweep_starts_its_forkserver_before_it_loads_its_flow(tmp_path, ops_env, prefect_server):
    """The forkserver is the sweep's child well before the sweep's first line ("opening its MLflow run"),
    which the flow prints once Prefect, the flow and its run have started (1-3 s on an idle machine; the flow
    itself starts the forkserver just before that line, when the command did not); then the sweep ends with
    its answer."""
    env = {**ops_env, "PREFECT_API_URL": prefect_server, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    sweep = subprocess.Popen([str(CNNFLOW), "run", "sweep", "--name", "early-fork", *TINY_TRAIN,
                              "--space", "train_seed=0,1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env, cwd=tmp_path)
    first_line = threading.Event()
    lines, first_line_at = [], []

    def read():
        for line in sweep.stdout:
            if not lines:
                first_line_at.append(time.monotonic())
            lines.append(line)
            first_line.set()
        first_line.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    forkserver_seen_at = None
    try:
        while not first_line.is_set():
            if forkserver_seen_at is None and any("forkserver" in cmd for cmd in children_of(sweep.pid).values()):
                forkserver_seen_at = time.monotonic()
            time.sleep(0.02)
        assert sweep.wait(timeout=300) == 0, "".join(lines)[-3000:]
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
    reader.join(timeout=10)
    assert "opening its MLflow run" in lines[0], lines[:3]
    assert forkserver_seen_at is not None, f"no forkserver among the sweep's children before {lines[0]!r}"
    assert first_line_at[0] - forkserver_seen_at >= EARLY_S, first_line_at[0] - forkserver_seen_at
    assert any("2 trials, 0 failed" in line for line in lines), "".join(lines)[-3000:]
