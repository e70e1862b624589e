"""The bn-vs-gn study preset: its grid, and a report built from the MLflow runs it made.

The statistics and the report's text are tested without Prefect in tests/test_study_statistics.py
and tests/test_study_report.py; here a small preset runs end to end.
"""

import io
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cnncore.cnn import NORMALIZATIONS as NET_NORMALIZATIONS
from flows.study import NORMALIZATIONS, PAPER_ERROR, bn_vs_gn_spec, groups_for, preset_spec
from flows.sweep import sweep


def test_preset_grid_is_the_papers_design():
    spec = preset_spec("bn-vs-gn")
    trials = spec.trials()
    cells = {(t.normalization, t.batch_size, t.seed) for t in trials}
    assert cells == {(n, b, s) for n in NORMALIZATIONS for b in (32, 16, 8, 4, 2) for s in (0, 1, 2)}
    assert len(trials) == 75
    assert NORMALIZATIONS == ("batchnorm", "groupnorm", "layernorm", "instancenorm", "none")
    assert set(NORMALIZATIONS) == set(NET_NORMALIZATIONS)
    # Same epochs everywhere; the learning rate scales linearly with the batch size (0.02 x N/32).
    assert {t.num_epochs for t in trials} == {spec.base.num_epochs}
    for t in trials:
        assert math.isclose(t.learning_rate, spec.base.learning_rate * t.batch_size / 32)
    # Group norm: 16 channels per group (the paper's ablation) on the 32 filters.
    assert spec.base.num_filters == 32 and {t.num_groups for t in trials if t.normalization == "groupnorm"} == {2}
    assert spec.base.update_rule == "sgd_momentum" and spec.study == "bn-vs-gn"


def test_cifar10_preset_runs_the_same_design_with_the_seeds_net():
    spec = preset_spec("bn-vs-gn", dataset="cifar10")
    digits = preset_spec("bn-vs-gn")
    assert spec.base.dataset == "cifar10" and spec.base.filter_size == 7
    assert spec.space == digits.space and spec.name == "bn-vs-gn-cifar10"


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="preset must be one of"):
        preset_spec("bn-vs-ln")


@pytest.mark.parametrize("filters, groups", [(32, 2), (64, 4), (16, 1), (8, 1), (48, 3)])
def test_groups_keep_about_sixteen_channels_per_group(filters, groups):
    assert groups_for(filters) == groups and filters % groups == 0


def test_small_preset_run_reports_exactly_what_its_child_runs_logged(store, tmp_path):
    spec = bn_vs_gn_spec(name="study-small", normalizations=("batchnorm", "groupnorm"), batch_sizes=(16, 4),
                         seeds=(0, 1), num_epochs=1, num_train=64, num_val=30, num_test=50, num_filters=8)
    report = sweep(spec=spec, tracking_uri=store.uri)
    assert len(report.trials) == 8 and not report.failed

    parent = store.client.get_run(report.parent_run_id)
    tables = ["updates", "cells", "best_val_cells", "changes", "interactions"]
    assert ({f"study/{t}.{ext}" for t in tables for ext in ("csv", "json")}
            | {"study/error_vs_batch_size.png", "study/interaction_vs_batch_size.png", "study/report.md"}
            ) <= store.artifacts(parent.info.run_id)

    def table(name: str) -> pd.DataFrame:
        return pd.read_csv(store.client.download_artifacts(parent.info.run_id, f"study/{name}.csv", str(tmp_path)))

    children = [r for r in store.runs("cnncore-sweeps")
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 8
    error = {(r.data.params["normalization"], int(r.data.params["batch_size"]), int(r.data.params["seed"])):
             100 * (1 - r.data.metrics["test_acc"]) for r in children}
    cells = table("cells")
    assert len(cells) == 4
    for cell in cells.itertuples():
        errors = [error[cell.normalization, cell.batch_size, seed] for seed in (0, 1)]
        low, high = stats.t.interval(0.95, 1, loc=np.mean(errors), scale=np.std(errors, ddof=1) / math.sqrt(2))
        assert cell.n == 2 and cell.mean == pytest.approx(np.mean(errors))
        assert (cell.low, cell.high) == (pytest.approx(low), pytest.approx(high))
    # No batch 32 here: changes are measured from the largest batch run, 16.
    (interaction,) = table("interactions").itertuples()
    by_seed = [(error["batchnorm", 4, s] - error["batchnorm", 16, s])
               - (error["groupnorm", 4, s] - error["groupnorm", 16, s]) for s in (0, 1)]
    assert (interaction.batch_size, interaction.reference, interaction.n) == (4, 16, 2)
    assert interaction.mean == pytest.approx(np.mean(by_seed))
    updates = table("updates").set_index("batch_size")["iterations_per_epoch"].to_dict()
    assert updates == {16: 4, 4: 16}  # 64 training images

    markdown = report.study_report
    text = store.client.download_artifacts(parent.info.run_id, "study/report.md", str(tmp_path))
    assert open(text).read() == markdown
    assert "All 8 planned trials finished." in markdown and "## The answer" in markdown
    assert f"{PAPER_ERROR['batchnorm'][2]}" in markdown
    # The learning rate each child trained with is the scaled one.
    for r in children:
        assert float(r.data.params["learning_rate"]) == pytest.approx(0.02 * int(r.data.params["batch_size"]) / 32)


def test_preset_parameter_replaces_the_spec(store, monkeypatch):
    """sweep(preset=...) builds the preset's spec from spec.base.dataset (the run itself is the test above's)."""
    seen = {}

    def fake_preset_spec(preset, dataset, **kwargs):
        seen.update(preset=preset, dataset=dataset, **kwargs)
        return bn_vs_gn_spec(dataset, name="study-tiny", normalizations=("groupnorm",), batch_sizes=(8,),
                             seeds=(0,), num_epochs=1, num_train=32, num_val=20, num_test=20, num_filters=4)

    import flows.sweep.flow as sweep_flow

    monkeypatch.setattr(sweep_flow, "preset_spec", fake_preset_spec)
    report = sweep(preset="bn-vs-gn", tracking_uri=store.uri, trials_in="threads")
    assert seen == {"preset": "bn-vs-gn", "dataset": "digits"}
    assert report.name == "study-tiny" and report.study_report.startswith("# BN vs GN")
    assert io.StringIO(report.study_report).readline().strip() == "# BN vs GN across batch sizes: digits"
