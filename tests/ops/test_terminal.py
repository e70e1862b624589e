"""`cnnflow` at a terminal, as a person runs it: stdout and stderr on a pseudo-terminal, a fresh HOME.

Some of what Prefect does depends on a terminal: its client prints a telemetry banner
and writes a device id under PREFECT_HOME only when stdout or stderr is a TTY, so these
tests run the command on one.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

import flows

from .conftest import CNNFLOW
from .test_faults import processes_in_group

TINY_TRAIN = ["--num-train", "120", "--num-val", "40", "--num-test", "40", "--num-epochs", "1",
              "--num-filters", "4", "--hidden-dim", "16", "--batch-size", "20"]
# Prefect's client treats any of these as CI, where it sends nothing anyway (prefect._internal.analytics).
CI_VARIABLES = ("CI", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL", "TRAVIS", "CIRCLECI", "BUILDKITE", "TF_BUILD",
                "CODEBUILD_BUILD_ID", "BITBUCKET_COMMIT", "TEAMCITY_VERSION", "DRONE", "SEMAPHORE", "APPVEYOR",
                "BUDDY", "CI_NAME")


def in_a_terminal(command: list[str], env: dict, cwd: Path, timeout_s: float) -> tuple[int, str]:
    """command with stdout and stderr on a pseudo-terminal: its exit code and everything it printed."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env,
                               cwd=cwd, start_new_session=True)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if not select.select([leader], [], [], 1.0)[0]:
                if process.poll() is not None:
                    break
                continue
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: every process holding the terminal is gone
                break
            if not data:
                break
            chunks.append(data)
        return process.wait(timeout=max(1.0, deadline - time.monotonic())), b"".join(chunks).decode(errors="replace")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait()
        os.close(leader)


def fresh_home_env(ops_env: dict, home: Path, **extra: str) -> dict:
    """A person's environment on a new account: HOME empty, no Prefect or telemetry settings, not CI."""
    unset = {*flows.TELEMETRY_OFF, *CI_VARIABLES, "PREFECT_HOME"}
    env = {k: v for k, v in ops_env.items() if k not in unset and not k.startswith("PREFECT_")}
    return {**env, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "COLUMNS": "120", **extra}


def test_a_run_at_a_terminal_in_a_fresh_home_prints_no_telemetry_banner_and_writes_no_device_id(
        tmp_path, ops_env, prefect_server):
    home = tmp_path / "home"
    home.mkdir()
    env = fresh_home_env(ops_env, home, PREFECT_API_URL=prefect_server,
                         MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    code, printed = in_a_terminal([str(CNNFLOW), "run", "train", *TINY_TRAIN], env, tmp_path, 240)
    assert code == 0, printed[-3000:]
    assert "test error" in printed  # the run's answer: the terminal was read
    assert "anonymous usage data" not in printed and "DO_NOT_TRACK" not in printed
    assert (home / ".prefect").is_dir()  # Prefect's client used this HOME ...
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*sdk_telemetry*")) == []  # ... and left no id there


# ---------------------------------------------------------------- Ctrl-C while the trial workers start


@pytest.mark.slow
@pytest.mark.parametrize("after", [
    "; opening its MLflow run",  # the first line: the forkserver is importing what the workers need
    " already finished",         # the workers are being forked and warmed up
])
def test_ctrl_c_while_the_workers_start_prints_one_line_and_leaves_no_process(tmp_path, ops_env, prefect_server,
                                                                             after):
    """A Ctrl-C reaches every process of the terminal's foreground group, the workers and the process they
    are forked from included: the sweep says it stopped, in one line, and nothing else prints a word."""
    env = {**ops_env, "PREFECT_API_URL": prefect_server, "COLUMNS": "200",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    sweep = subprocess.Popen([str(CNNFLOW), "run", "sweep", "--name", "ctrl-c", *TINY_TRAIN,
                              "--space", "normalization=batchnorm,groupnorm", "--space", "train_seed=0,1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                             start_new_session=True)  # its own group, as a terminal's foreground job
    try:
        said = []
        for line in sweep.stderr:
            said.append(line)
            if after in line:
                os.killpg(sweep.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
                break
        rest, out = sweep.stderr.read(), sweep.stdout.read()
        assert sweep.wait(timeout=120) == 130, "".join(said) + rest
        assert said[-1].startswith("sweep ctrl-c: ")
        assert len(rest.strip().splitlines()) == 1 and rest.startswith("error: stopped by SIGINT"), rest
        assert not re.search("Traceback|KeyboardInterrupt|leaked|Error", "".join(said) + out), (said, out)
        deadline = time.monotonic() + 20
        while processes_in_group(sweep.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes_in_group(sweep.pid) == []  # the forkserver and the workers ended too
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()
