"""Bounds before work, as a user meets them: `cnnflow run` refuses a search, a count or a net too big with
exit 2 and one line naming the option, before any Prefect server starts (the local server's home stays
empty) and before any data is loaded."""

from __future__ import annotations

import subprocess

import pytest

from .conftest import CNNFLOW


@pytest.fixture
def env(ops_env, tmp_path) -> dict:
    """No PREFECT_API_URL: a run that got past validation would start the local server in tmp_path/server."""
    return {**ops_env, "CNNCORE_SERVER_HOME": str(tmp_path / "server"), "COLUMNS": "200",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"}


def refused(env: dict, *args: str) -> str:
    """The one line of stderr of a cnnflow run that must exit 2 before starting anything."""
    done = subprocess.run([str(CNNFLOW), "run", *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid parameters: "), done.stderr
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["sweep", "--space", "batch_size=" + ",".join(map(str, range(1, 1001))),
      "--space", "train_seed=" + ",".join(map(str, range(1000)))],
     "the grid search asks for 1,000,000 trials (1000 batch_size x 1000 train_seed), more than max_trials=10,000"),
    (["sweep", "--search", "random", "--num-trials", "1000000", "--space", "batch_size=8,16"],
     "the random search asks for 1,000,000 trials (num_trials), more than max_trials=10,000"),
    (["sweep", "--batch-size", "1000000000"], "batch_size=1,000,000,000 is more than the 1,197 training images"),
    (["train", "--num-train", "1000000000"], "num_train=1,000,000,000 is more than the 1,197 images"),
    (["train", "--hidden-dim", "1000000000"], "hidden_dim=1,000,000,000"),
], ids=["grid", "random", "batch-size", "num-train", "hidden-dim"])
def test_too_big_is_refused_with_exit_2_before_any_server_starts(env, tmp_path, args, expected):
    assert expected in refused(env, *args)
    assert not (tmp_path / "server").exists(), "a Prefect server was started for a run refused at validation"
    assert not (tmp_path / "mlruns").exists()


def test_a_params_file_naming_a_net_too_big_is_refused_the_same_way(env, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("config:\n  num_filters: 100000000\n")
    line = refused(env, "train", "--params", str(params))
    assert "num_filters=100,000,000" in line and "more than the limit of" in line and "CNNCORE_MEMORY_LIMIT_GIB" in line
    assert not (tmp_path / "server").exists()


def test_the_help_states_the_trial_limit_and_how_to_raise_it(env):
    done = subprocess.run([str(CNNFLOW), "run", "sweep", "--help"], env=env, capture_output=True, text=True,
                          timeout=120)
    text = " ".join(done.stdout.split())
    assert "--max-trials" in text and "Refuse a search of more trials than this" in text and "10000" in text
