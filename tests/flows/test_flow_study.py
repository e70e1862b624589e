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
    cells = {(t.normalization, t.batch_size, t.train_seed) for t in trials}
    assert cells == {(n, b, s) for n in ("batchnorm", "groupnorm", "layernorm", "instancenorm", "none")
                     for b in (32, 16, 8, 4, 2) for s in range(10)}
    assert len(trials) == 250
    # The same epochs at every batch size: the preset's 10, and the grid does not vary them.
    assert "num_epochs" not in spec.space and {t.num_epochs for t in trials} == {10}
    # The learning rate scales linearly with the batch size (0.02 x N/32).
    for t in trials:
        assert math.isclose(t.learning_rate, 0.02 * t.batch_size / 32)
    # Group norm: 16 channels per group (the paper's ablation) on the 32 filters.
    assert spec.base.num_filters == 32 and {t.num_groups for t in trials if t.normalization == "groupnorm"} == {2}
    assert spec.base.update_rule == "sgd_momentum" and spec.study == "bn-vs-gn"
    assert all(t.diagnostics for t in trials) and {t.depth for t in trials} == {1}


def test_the_study_orders_the_nets_normalizations_with_no_norm_last():
    assert set(NORMALIZATIONS) == set(NET_NORMALIZATIONS) and NORMALIZATIONS[-1] == "none"
    assert NORMALIZATIONS[:2] == ("batchnorm", "groupnorm")


def test_the_transfer_preset_is_a_three_block_convnet_on_mnist_bn_against_gn():
    spec = preset_spec("mnist-convnet")
    trials = spec.trials()
    assert {(t.model, t.depth, t.dataset, t.filter_size) for t in trials} == {("convnet", 3, "mnist", 3)}
    assert {t.normalization for t in trials} == {"batchnorm", "groupnorm"}
    assert {t.batch_size for t in trials} == {32, 16, 8, 4, 2} and len({t.train_seed for t in trials}) >= 5
    assert {t.num_epochs for t in trials} == {5} and all(t.diagnostics for t in trials)
    assert {t.num_groups for t in trials if t.normalization == "groupnorm"} == {2}


def test_the_positive_control_is_cs231n_fully_connected_net_with_bn_ln_and_none():
    spec = preset_spec("mnist-fc-control")
    trials = spec.trials()
    assert {(t.model, t.depth, t.hidden_dim, t.dataset) for t in trials} == {("fc_net", 4, 100, "mnist")}
    assert {t.normalization for t in trials} == {"batchnorm", "layernorm", "none"}
    assert {t.batch_size for t in trials} == {32, 16, 8, 4, 2} and len({t.train_seed for t in trials}) >= 5
    for t in trials:
        assert math.isclose(t.learning_rate, 0.005 * t.batch_size / 32)


@pytest.mark.parametrize("preset", ["bn-vs-gn", "mnist-convnet", "mnist-fc-control"])
def test_a_small_preset_is_its_full_design_cut_down(preset):
    full, small = preset_spec(preset), preset_spec(f"{preset}-small")
    assert small.name == f"{full.name}-small"
    assert {t.normalization for t in small.trials()} == {t.normalization for t in full.trials()}
    assert {t.batch_size for t in small.trials()} == {32, 4} and {t.train_seed for t in small.trials()} == {0, 1}
    assert (small.base.model, small.base.depth) == (full.base.model, full.base.depth)
    assert small.base.num_train == 600 and small.base.num_epochs == 1
    assert small.base.num_test == (500 if preset.startswith("mnist") else None)


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


def percent_errors(children, metric: str) -> dict[tuple[str, int, int], float]:
    """{(normalization, batch_size, seed): 100 * (1 - metric)} of the sweep's child runs."""
    return {(r.data.params["normalization"], int(r.data.params["batch_size"]), int(r.data.params["train_seed"])):
            100 * (1 - r.data.metrics[metric]) for r in children}


def test_small_preset_run_reports_exactly_what_its_child_runs_logged(store, tmp_path):
    # Three epochs: validation accuracy peaks before the end in most trials (6 of 8 here), so the final
    # net (the study's measure) and the best-validation net differ, and so do their test errors.
    spec = bn_vs_gn_spec(name="study-small", normalizations=("batchnorm", "groupnorm"), batch_sizes=(16, 4),
                         seeds=(0, 1), num_epochs=3, num_train=128, num_val=30, num_test=50, num_filters=8)
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
    error, best_val_error = percent_errors(children, "accuracy/final_test_acc"), percent_errors(children, "accuracy/test_acc")
    assert sum(error[k] != best_val_error[k] for k in error) >= 3  # the two measures tell apart here
    for name, measured in (("cells", error), ("best_val_cells", best_val_error)):
        cells = table(name)
        assert len(cells) == 4
        for cell in cells.itertuples():
            errors = [measured[cell.normalization, cell.batch_size, seed] for seed in (0, 1)]
            low, high = stats.t.interval(0.95, 1, loc=np.mean(errors), scale=np.std(errors, ddof=1) / math.sqrt(2))
            assert cell.n == 2 and cell.mean == pytest.approx(np.mean(errors))
            assert (cell.low, cell.high) == (pytest.approx(low), pytest.approx(high))
    # What the terminal shows (the sweep's comparison) is the study's cell table: the final net's error.
    assert {(r["normalization"], r["batch_size"]): r["mean"] for r in report.comparison} == pytest.approx(
        {(n, b): np.mean([error[n, b, s] for s in (0, 1)]) for n, b, _ in error})
    # No batch 32 here: changes are measured from the largest batch run, 16.
    (interaction,) = table("interactions").itertuples()
    by_seed = [(error["batchnorm", 4, s] - error["batchnorm", 16, s])
               - (error["groupnorm", 4, s] - error["groupnorm", 16, s]) for s in (0, 1)]
    assert (interaction.batch_size, interaction.reference, interaction.n) == (4, 16, 2)
    assert interaction.mean == pytest.approx(np.mean(by_seed))
    updates = table("updates").set_index("batch_size")["iterations_per_epoch"].to_dict()
    assert updates == {16: 8, 4: 32}  # 128 training images

    # The printed link opens the parent run on the study's answer, its interaction figure.
    assert report.url.endswith(f"/runs/{report.parent_run_id}/artifactPath/study/interaction_vs_batch_size.png"
                               "?workflowType=machine_learning")
    markdown = report.study_report
    text = store.client.download_artifacts(parent.info.run_id, "study/report.md", str(tmp_path))
    assert open(text).read() == markdown
    assert "All 8 planned trials finished." in markdown and "## The answer" in markdown
    assert f"{PAPER_ERROR['batchnorm'][2]}" in markdown
    # The learning rate each child trained with is the scaled one.
    for r in children:
        assert float(r.data.params["learning_rate"]) == pytest.approx(0.02 * int(r.data.params["batch_size"]) / 32)

    # Run again: every trial is read back from MLflow, and the report says what the first run's said.
    again = sweep(spec=spec, tracking_uri=store.uri)
    assert [t.skipped for t in again.trials] == [True] * 8
    assert [(t.test_acc, t.final_test_acc) for t in again.trials] == [(t.test_acc, t.final_test_acc)
                                                                       for t in report.trials]
    assert again.comparison == report.comparison
    assert again.study_report.split("## Design")[1] == markdown.split("## Design")[1]


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
    assert io.StringIO(report.study_report).readline().strip() == "# BN vs GN across batch sizes: digits, the three-layer convnet"
