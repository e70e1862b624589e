"""`cnnflow run --no-local-server`: Prefect's temporary server gets a start-up limit that grows with the load, a
failed start is one line with what to do (not Prefect's bare "Timed out ..."), and no server is left behind."""

from __future__ import annotations

import subprocess

import pytest

from flows import temporary_server
from flows.temporary_server import BASE_LIMIT_S, MAX_LIMIT_S, TIMEOUT_ENV

from .conftest import CNNFLOW
from .test_faults import processes_in_group


@pytest.mark.parametrize("load, cores, expected", [(0.3, 2, BASE_LIMIT_S), (2.0, 2, BASE_LIMIT_S),
                                                   (16.0, 2, 8 * BASE_LIMIT_S), (400.0, 2, MAX_LIMIT_S)])
def test_the_start_up_limit_grows_with_the_load_per_core(monkeypatch, load, cores, expected):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    monkeypatch.setattr(temporary_server.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(temporary_server.os, "cpu_count", lambda: cores)
    assert temporary_server.startup_limit_s() == expected


def test_prefects_own_setting_wins(monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "7")
    assert temporary_server.startup_limit_s() == 7


def test_a_temporary_server_that_does_not_start_in_time_is_one_line_with_a_hint_and_leaves_nothing(ops_env,
                                                                                                 tmp_path):
    env = {**ops_env, TIMEOUT_ENV: "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    process = subprocess.Popen([str(CNNFLOW), "run", "train", "--no-local-server", "--num-epochs", "1"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 1
    *before, line = stderr.strip().splitlines()
    # Under load the command first says that it is starting; then the error, in one line.
    assert all(b.startswith("cnnflow run train: starting (") for b in before), stderr
    assert line.startswith("error: Prefect's temporary server did not start within 1 s (load average ")
    assert line.endswith("Run without --no-local-server to use cnnflow's long-lived local server (`cnnflow "
                             f"server start`), or allow it longer with {TIMEOUT_ENV}")
    assert not processes_in_group(process.pid)  # the server that was still starting was stopped
