"""A failure inside a flow is said once: the CLI's error, without the flow and task engines' timestamped
copies (those with --verbose), and a dataset that is not there fails at once, without retries."""

from __future__ import annotations

import re
import subprocess

from .conftest import CNNFLOW, rest

TINY_TRAIN = ["--num-train", "120", "--num-val", "40", "--num-test", "40", "--num-epochs", "1",
              "--num-filters", "4", "--hidden-dim", "16", "--batch-size", "20"]
PREFECT_LINE = re.compile(r"\d\d:\d\d:\d\d\.\d{3} \| (ERROR|WARNING|INFO) ")


def cnnflow(env: dict, cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CNNFLOW), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def error_part(stderr: str) -> str:
    """stderr from its one `error:` line on; what comes before it must be progress lines, no error."""
    lines = stderr.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1, stderr
    assert not any("error" in line.lower() for line in lines[:starts[0]]), stderr
    return "".join(lines[starts[0]:])


def test_a_missing_dataset_is_one_message_at_once_and_verbose_adds_the_engines_copies(tmp_path, ops_env,
                                                                                      prefect_server):
    empty = tmp_path / "data"
    empty.mkdir()
    env = {**ops_env, "PREFECT_API_URL": prefect_server, "CNNCORE_DATA_DIR": str(empty), "COLUMNS": "200",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = cnnflow(env, tmp_path, "run", "train", "--dataset", "mnist", *TINY_TRAIN, "--run-name", "no-mnist")
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.count("MNIST is not available") == 1, done.stderr
    # The progress lines before it ("opening its MLflow run") are the no-silence lines; the error is the rest.
    assert error_part(done.stderr).startswith("error: MNIST is not available") and "\\n" not in done.stderr
    assert PREFECT_LINE.search(done.stderr) is None, done.stderr
    # Its lines as written: the folder looked in and how to place the files, each a line of its own.
    assert re.search(rf"^Looked for the files in {re.escape(str(empty / 'mnist'))}\.$", done.stderr, re.M)
    assert re.search(r"^To place them by hand", done.stderr, re.M)
    # Tried once: every mirror was tried already and a retry 5 s later would fail the same way.
    flow_run = rest(prefect_server, "/flow_runs/filter", {"sort": "EXPECTED_START_TIME_DESC", "limit": 1})[0]
    loads = [t for t in rest(prefect_server, "/task_runs/filter",
                             {"flow_runs": {"id": {"any_": [flow_run["id"]]}}}) if t["name"] == "load mnist"]
    assert [(t["state_type"], t["run_count"]) for t in loads] == [("FAILED", 1)]

    verbose = cnnflow(env, tmp_path, "--verbose", "run", "train", "--dataset", "mnist", *TINY_TRAIN)
    assert verbose.returncode == 1
    assert re.search(r"\| ERROR +\| Task run 'load mnist' - ", verbose.stderr), verbose.stderr[-3000:]
    assert verbose.stderr.count("MNIST is not available") > 1


def test_a_changed_base_under_an_existing_sweep_name_is_one_line_with_what_to_do(tmp_path, ops_env,
                                                                                 prefect_server):
    env = {**ops_env, "PREFECT_API_URL": prefect_server, "COLUMNS": "200",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    sweep = ["run", "sweep", "--name", "changed", *TINY_TRAIN, "--space", "train_seed=0", "--trials-in", "threads"]
    assert cnnflow(env, tmp_path, *sweep).returncode == 0
    again = cnnflow(env, tmp_path, *sweep, "--num-epochs", "2")
    assert again.returncode == 2, again.stderr[-3000:]
    error = error_part(again.stderr)
    assert error.strip().splitlines() == [error.strip()]
    assert error.startswith("error: sweep 'changed' already exists with another base configuration "
                                   "(num_epochs: 1 there, 2 here)")
    assert "--no-resume" in again.stderr and PREFECT_LINE.search(again.stderr) is None
