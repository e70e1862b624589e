"""`cnnflow runs` at 80 columns keeps what tells the runs apart: the parameters whose values differ."""

from __future__ import annotations

import re

from mlflow import MlflowClient

from flows.cli.runs_table import KEY_PARAMS, differing_params
from flows.tracking import RunRecord

from .conftest import CNNFLOW
from .test_terminal import in_a_terminal


def record(**params) -> RunRecord:
    return RunRecord(id="r", name="r", experiment_id="0", parent_id=None, status="FINISHED", start_time_ms=0,
                     params={k: str(v) for k, v in params.items()}, metrics={}, tags={})


def test_the_parameters_shown_are_those_that_differ_key_ones_first():
    runs = [record(normalization=n, batch_size=b, train_seed=s, reg=0.001, dataset="digits")
            for n in ("batchnorm", "groupnorm") for b in (4, 32) for s in (0, 1)]
    assert differing_params(runs) == ["normalization", "batch_size", "train_seed"]
    parent = record(**{"base.batch_size": 8, "space": "{}", "search": "grid"})
    assert differing_params([*runs, parent]) == ["normalization", "batch_size", "train_seed"]
    assert differing_params([record(normalization="batchnorm")] * 2) == list(KEY_PARAMS)  # nothing differs


def test_at_80_columns_every_row_shows_its_batch_size_and_seed(tmp_path, ops_env):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("runs-table", artifact_location=(tmp_path / "a").as_uri())
    for seed in (0, 1):
        for batch in (4, 32):
            run = client.create_run(experiment, run_name=f"a-rather-long-sweep-name/{seed}{batch} batchnorm "
                                                         f"batch_size={batch} train_seed={seed}")
            for key, value in {"normalization": "batchnorm", "batch_size": batch, "train_seed": seed,
                               "learning_rate": 0.01, "num_epochs": 3}.items():
                client.log_param(run.info.run_id, key, value)
            client.log_metric(run.info.run_id, "test_acc", 0.9)
            client.set_terminated(run.info.run_id)
    code, printed = in_a_terminal([str(CNNFLOW), "runs", "--tracking-uri", uri], {**ops_env, "COLUMNS": "80"},
                                  tmp_path, 120)
    assert code == 0, printed
    printed = re.sub(r"\x1b\[[0-9;]*m", "", printed)  # the header's bold
    rows = [line for line in printed.splitlines() if "FINISHED" in line]
    assert len(rows) == 4 and all(len(line) <= 80 for line in printed.splitlines()), printed
    assert sorted(" ".join(line.split("FINISHED")[1].split()[:2]) for line in rows) == [
        "bs=32 seed=0", "bs=32 seed=1", "bs=4 seed=0", "bs=4 seed=1"]
    assert all("0.900" in line for line in rows)
