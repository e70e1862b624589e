"""The bn-vs-gn study preset: its grid, and a report built from the MLflow runs it made."""

import io
import math

import numpy as np
import pandas as pd
import pytest

from flows.study import (BATCH_SIZES, NORMALIZATIONS, PAPER_ERROR, bn_vs_gn_spec, error_table, findings,
                         groups_for, paper_shaped, preset_spec)
from flows.sweep import sweep


def test_preset_grid_is_the_papers_design():
    spec = preset_spec("bn-vs-gn")
    trials = spec.trials()
    cells = {(t.normalization, t.batch_size, t.seed) for t in trials}
    assert cells == {(n, b, s) for n in NORMALIZATIONS for b in (32, 16, 8, 4, 2) for s in (0, 1, 2)}
    assert len(trials) == 75
    assert {"batchnorm", "groupnorm", "layernorm", "instancenorm", "none"} == set(NORMALIZATIONS)
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


def synthetic_trials(bn_slope, gn_level=2.0, seeds=(0, 1, 2)):
    """Trials whose BN error grows by bn_slope points per halving of the batch; GN stays at gn_level."""
    rows = []
    for i, batch in enumerate(BATCH_SIZES):
        for seed in seeds:
            jitter = 0.1 * (seed - 1)
            rows.append(("batchnorm", batch, seed, 1 - (2.0 + bn_slope * i + jitter) / 100))
            rows.append(("groupnorm", batch, seed, 1 - (gn_level + jitter) / 100))
    return pd.DataFrame(rows, columns=["normalization", "batch_size", "seed", "test_acc"])


def test_error_table_gives_mean_and_sample_std_over_seeds():
    table = error_table(synthetic_trials(bn_slope=1.0))
    cell = table[(table.normalization == "batchnorm") & (table.batch_size == 2)].iloc[0]
    assert cell.mean_error == pytest.approx(6.0) and cell.std_error == pytest.approx(0.1)
    assert cell.num_seeds == 3
    assert list(table.normalization.unique()) == ["batchnorm", "groupnorm"]
    assert list(table[table.normalization == "groupnorm"].batch_size) == [32, 16, 8, 4, 2]
    assert paper_shaped(table).loc["batchnorm", 2] == "6.0 ± 0.1"


def test_findings_say_plainly_whether_bn_degrades_and_gn_stays_flat():
    degrading = " ".join(findings(error_table(synthetic_trials(bn_slope=2.0))))
    assert "BN degrades as the batch shrinks here" in degrading and "GN stays flat" in degrading
    assert "GN beats BN by 8.0 points" in degrading
    flat = " ".join(findings(error_table(synthetic_trials(bn_slope=0.0))))
    assert "BN does NOT clearly degrade" in flat


def test_small_preset_run_reports_exactly_what_its_child_runs_logged(store, tmp_path):
    spec = bn_vs_gn_spec(name="study-small", normalizations=("batchnorm", "groupnorm"), batch_sizes=(16, 4),
                         seeds=(0, 1), num_epochs=1, num_train=64, num_val=30, num_test=50, num_filters=8)
    report = sweep(spec=spec, tracking_uri=store.uri)
    assert len(report.trials) == 8 and not report.failed

    parent = store.client.get_run(report.parent_run_id)
    assert {"study/error_table.csv", "study/error_table.json", "study/paper_shaped.csv",
            "study/error_vs_batch_size.png", "study/report.md"} <= store.artifacts(parent.info.run_id)
    csv = store.client.download_artifacts(parent.info.run_id, "study/error_table.csv", str(tmp_path))
    table = pd.read_csv(csv)

    children = [r for r in store.runs("cnncore-sweeps")
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 8
    for _, cell in table.iterrows():
        errors = [100 * (1 - r.data.metrics["test_acc"]) for r in children
                  if r.data.params["normalization"] == cell.normalization
                  and int(r.data.params["batch_size"]) == cell.batch_size]
        assert len(errors) == cell.num_seeds == 2
        assert cell.mean_error == pytest.approx(np.mean(errors))
        assert cell.std_error == pytest.approx(np.std(errors, ddof=1))
    assert len(table) == 4

    markdown = report.study_report
    text = store.client.download_artifacts(parent.info.run_id, "study/report.md", str(tmp_path))
    assert open(text).read() == markdown
    assert "## What held and what did not" in markdown and f"{PAPER_ERROR['batchnorm'][2]}" in markdown
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
