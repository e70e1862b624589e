"""The bn-vs-gn study preset: its grid, and a report built from the MLflow runs it made.

The statistics and the report's text are tested without Prefect in tests/test_study_statistics.py
and tests/test_study_report.py; here a small preset runs end to end.
"""

import base64
import io
import math
import re
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cnncore.cnn import NORMALIZATIONS as NET_NORMALIZATIONS
from cnncore.diagnostics import recomputed_statistics_error
from flows.config import TrainConfig
from flows.provenance import blas
from cnncore.cnn import block_maps
from flows.study import NORMALIZATIONS, PAPER_ERROR, PRESETS, bn_vs_gn_spec, groups_for, preset_spec
from flows.study.presets import DOSE_PRESETS
from flows.study.trials import design_of
from flows.sweep import sweep
from flows.tracking import connect
from flows.training import PRECISE_IMAGES, fit, log_test_scores, score_test_split, tail_iterations


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


@pytest.mark.parametrize("preset", [p for p in PRESETS if not p.endswith("-small")])
def test_every_committed_preset_takes_the_papers_step_decay_and_the_tail_measure(preset):
    """÷10 after 50% and 75% of training; the measure: 3 test-split scorings over the last phase's second half."""
    for t in preset_spec(preset).trials():
        assert (t.lr_steps, t.tail_evals) == ([0.5, 0.75], 3) and t.diagnostics


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


@pytest.mark.parametrize("preset", [p for p in PRESETS if not p.endswith("-small")])
def test_a_small_preset_is_its_full_design_cut_down(preset):
    full, small = preset_spec(preset), preset_spec(f"{preset}-small")
    assert small.name == f"{full.name}-small" and design_of(small) == design_of(full)
    assert {t.normalization for t in small.trials()} == {t.normalization for t in full.trials()}
    level = "norm_batch" if design_of(full).norm_batch else "batch_size"
    assert {getattr(t, level) for t in small.trials() if t.normalization == "batchnorm"} == {32, 4}
    assert {t.train_seed for t in small.trials()} == {0, 1}
    assert (small.base.model, small.base.depth) == (full.base.model, full.base.depth)
    assert (small.base.lr_steps, small.base.tail_evals) == (full.base.lr_steps, full.base.tail_evals)
    assert small.base.num_train == 600 and small.base.num_epochs == 1
    assert small.base.num_test == (None if preset == "bn-vs-gn" else 500)


@pytest.mark.parametrize("preset", DOSE_PRESETS)
def test_a_normalization_batch_preset_fixes_the_sgd_batch_and_varies_only_batch_norms_statistics(preset):
    spec = preset_spec(preset)
    trials = spec.trials()
    assert design_of(spec).norm_batch and spec.lr_reference_batch is None
    assert {(t.batch_size, t.learning_rate) for t in trials} == {(32, spec.base.learning_rate)}
    seeds = {t.train_seed for t in trials}
    bn = [t for t in trials if t.normalization == "batchnorm"]
    assert {(t.norm_batch or t.batch_size, t.train_seed) for t in bn} == {(g, s) for g in (32, 16, 8, 4, 2)
                                                                          for s in seeds}
    others = [t for t in trials if t.normalization != "batchnorm"]
    # Every other normalization runs once per seed: its trials do not depend on g.
    assert others and len(others) == len(seeds) * len({t.normalization for t in others})
    assert {t.norm_batch for t in others} == {None}


def test_the_dose_response_spans_values_pooled_and_norm_layers():
    """The FC net pools g values per feature; the convnets' last norm layers sit on 7x7, 3x3 and 1x1 maps; the
    residual net has 9 norm layers."""
    specs = {name: preset_spec(name).base for name in DOSE_PRESETS}
    assert (specs["normbatch-fc"].model, specs["normbatch-resnet"].model) == ("fc_net", "resnet")
    for depth, last in ((3, 7), (4, 3), (5, 1)):
        base = specs[f"normbatch-convnet{depth}"]
        assert base.depth == depth and block_maps(28, 28, depth)[-1][:2] == (last, last)
    assert {b.num_groups for name, b in specs.items() if name != "normbatch-fc"} == {2}


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
    # Three epochs: validation accuracy peaks before the end in most trials, so the final net and the
    # best-validation net differ, and so do their test errors; the tail evaluations are the primary measure.
    spec = bn_vs_gn_spec(name="study-small", normalizations=("batchnorm", "groupnorm"), batch_sizes=(16, 4),
                         seeds=(0, 1), num_epochs=3, num_train=128, num_val=30, num_test=50, num_filters=8,
                         lr_steps=[0.5], tail_evals=2)
    report = sweep(spec=spec, tracking_uri=store.uri)
    assert len(report.trials) == 8 and not report.failed
    assert report.best is None  # a study answers with its contrasts, not with a best trial

    parent = store.client.get_run(report.parent_run_id)
    tables = ["updates", "cells", "final_cells", "best_val_cells", "changes", "primary", "differences",
              "interactions", "measures", "trials"]
    assert ({f"study/{t}.{ext}" for t in tables for ext in ("csv", "json")}
            | {"study/error_vs_batch_size.png", "study/interaction_vs_batch_size.png", "study/report.md",
               "study/report.html"}) <= store.artifacts(parent.info.run_id)
    assert "artifactPath/study/interaction_vs_batch_size.png" in report.url

    def table(name: str) -> pd.DataFrame:
        return pd.read_csv(store.client.download_artifacts(parent.info.run_id, f"study/{name}.csv", str(tmp_path)))

    children = [r for r in store.runs("cnncore-sweeps")
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 8
    # 128 images at batch 16: 8 iterations per epoch, 24 in all; the rate falls after 12, the tail evaluations
    # are at 18 and 24 (batch 4: 32 per epoch, 96 in all, at 72 and 96).
    for r in children:
        history = store.client.get_metric_history(r.info.run_id, "curves/tail_test_acc")
        batch = int(r.data.params["batch_size"])
        assert sorted(m.step for m in history) == ([18, 24] if batch == 16 else [72, 96])
        assert r.data.metrics["accuracy/tail_test_acc"] == pytest.approx(np.mean([m.value for m in history]))
        precise = store.client.get_metric_history(r.info.run_id, "curves/tail_precise_test_acc")
        assert (len(precise) == 2) == (r.data.params["normalization"] == "batchnorm")
    error = percent_errors(children, "accuracy/tail_test_acc")
    final_error = percent_errors(children, "accuracy/final_test_acc")
    best_val_error = percent_errors(children, "accuracy/test_acc")
    assert sum(final_error[k] != best_val_error[k] for k in error) >= 3  # the measures tell apart here
    for name, measured in (("cells", error), ("final_cells", final_error), ("best_val_cells", best_val_error)):
        cells = table(name).query("normalization != 'batchnorm-precise'")
        assert len(cells) == 4
        for cell in cells.itertuples():
            errors = [measured[cell.normalization, cell.norm_batch, seed] for seed in (0, 1)]
            sd = np.std(errors, ddof=1)  # 0 when both seeds err on the same test images
            low, high = stats.t.interval(0.95, 1, loc=np.mean(errors), scale=sd / math.sqrt(2)) if sd else errors
            assert cell.n == 2 and cell.mean == pytest.approx(np.mean(errors))
            assert (cell.low, cell.high) == (pytest.approx(low), pytest.approx(high))
    precise = percent_errors([r for r in children if "accuracy/tail_precise_test_acc" in r.data.metrics],
                             "accuracy/tail_precise_test_acc")
    for cell in table("cells").query("normalization == 'batchnorm-precise'").itertuples():
        assert cell.mean == pytest.approx(np.mean([precise["batchnorm", cell.norm_batch, s] for s in (0, 1)]))
    # What the terminal shows (the sweep's comparison) is the study's error table: the primary measure's cells.
    shown = {row["arm"]: row for row in report.comparison}
    for norm, arm in (("batchnorm", "BN"), ("groupnorm", "GN")):
        for batch in (16, 4):
            assert shown[arm][f"batch {batch}"].startswith(f"{np.mean([error[norm, batch, s] for s in (0, 1)]):.2f} ")
            assert shown[arm][f"batch {batch}"].endswith(", n=2")
    # No batch 32 here: changes are measured from the largest batch run, 16.
    (interaction,) = table("interactions").itertuples()
    by_seed = [(error["batchnorm", 4, s] - error["batchnorm", 16, s])
               - (error["groupnorm", 4, s] - error["groupnorm", 16, s]) for s in (0, 1)]
    assert (interaction.norm_batch, interaction.reference, interaction.n) == (4, 16, 2)
    assert interaction.mean == pytest.approx(np.mean(by_seed))
    updates = table("updates").set_index("norm_batch")["iterations_per_epoch"].to_dict()
    assert updates == {16: 8, 4: 32}  # 128 training images

    # The printed link opens the parent run on the study's answer, its interaction figure.
    assert report.url.endswith(f"/runs/{report.parent_run_id}/artifactPath/study/interaction_vs_batch_size.png"
                               "?workflowType=machine_learning")
    markdown = report.study_report
    text = store.client.download_artifacts(parent.info.run_id, "study/report.md", str(tmp_path))
    assert open(text).read() == markdown
    assert "All 8 planned trials finished." in markdown and "## The answer" in markdown
    assert markdown.splitlines()[2].startswith("> **A smoke test, not a result: 2 seeds.**")
    assert f"{PAPER_ERROR['batchnorm'][2]}" in markdown
    assert re.search(r"^- blas: `openblas [\d.]+ \(\w+\), kernel \w+, \d+ threads?`$", markdown, re.M)
    assert re.search(r"^- trials trained with BLAS: `openblas [\d.]+ \(\w+\), kernel \w+, \d+ threads?`$", markdown,
                     re.M)
    page = open(store.client.download_artifacts(parent.info.run_id, "study/report.html", str(tmp_path))).read()
    assert page.count('<img src="data:image/png;base64,') == 2
    # Each figure is rendered once: the PNG logged beside the page is the one the page embeds.
    for name in ("error_vs_batch_size", "interaction_vs_batch_size"):
        png = open(store.client.download_artifacts(parent.info.run_id, f"study/{name}.png", str(tmp_path)), "rb").read()
        assert png.startswith(b"\x89PNG") and f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in page
    # The learning rate each child trained with is the scaled one.
    for r in children:
        assert float(r.data.params["learning_rate"]) == pytest.approx(0.02 * int(r.data.params["batch_size"]) / 32)

    # Run again: every trial is read back from MLflow, and the report says what the first run's said.
    again = sweep(spec=spec, tracking_uri=store.uri)
    assert [t.skipped for t in again.trials] == [True] * 8
    measures = ("test_acc", "final_test_acc", "tail_test_acc", "tail_precise_test_acc", "blas")
    assert [[getattr(t, m) for m in measures] for t in again.trials] == [[getattr(t, m) for m in measures]
                                                                         for t in report.trials]
    assert again.comparison == report.comparison
    # Everything but the provenance (its date is the report's own) is what the first run's report said.
    assert again.study_report.split("## Provenance")[0] == markdown.split("## Provenance")[0]


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
    assert io.StringIO(report.study_report).readline().strip() == \
        "# BN vs GN: digits, the three-layer convnet, the single-device design"


# ---------------------------------------------------------------- the measure: tail evaluations


def test_tail_iterations_sit_in_the_second_half_of_the_last_learning_rate_phase():
    """6,000 images at batch 32: 187 iterations per epoch, 935 in 5 epochs; the rate's last step after 75% of
    training, so the points run from 87.5% (818) to the end (935)."""
    config = TrainConfig(batch_size=32, num_epochs=5, lr_steps=[0.5, 0.75], tail_evals=3)
    assert tail_iterations(config, 6000) == [818, 877, 935]
    assert tail_iterations(config.model_copy(update={"tail_evals": 5}), 6000) == [818, 847, 877, 906, 935]
    assert tail_iterations(config.model_copy(update={"tail_evals": 1}), 6000) == [935]
    assert tail_iterations(config.model_copy(update={"tail_evals": 0}), 6000) == []
    # Without steps the last phase is the whole run: its second half; 2 epochs of 187.
    assert tail_iterations(TrainConfig(batch_size=32, num_epochs=2, tail_evals=2), 6000) == [187, 374]
    # More points than iterations: each iteration once.
    assert tail_iterations(TrainConfig(batch_size=32, num_epochs=1, tail_evals=20), 64) == [1, 2]


def test_tail_evaluations_leave_the_training_as_it_was_and_score_the_nets_it_passes(store):
    """The same trial with and without tail evaluations trains the same net, bit for bit; the last evaluation
    is the final net's score, with running statistics and with precise ones (recomputed over the first
    PRECISE_IMAGES training images)."""
    from flows.load_data import load_data_once

    base = TrainConfig(normalization="batchnorm", num_epochs=2, num_train=300, batch_size=25, lr_steps=[0.5],
                       update_rule="sgd_momentum", learning_rate=0.02)
    data = load_data_once(base.data_spec())
    tracking = connect(store.uri)
    plain = fit(tracking.start_run("measure", "plain"), base, data)
    measured_run = tracking.start_run("measure", "measured")
    measured = fit(measured_run, base.model_copy(update={"tail_evals": 3}), data)
    assert measured.loss_history == plain.loss_history
    for name, value in plain.final_net.params.items():
        assert np.array_equal(measured.final_net.params[name], value)
    assert sorted(measured.tail) == [18, 21, 24] == sorted(measured.tail_precise)
    assert measured.tail[24] == pytest.approx(score_test_split(measured.final_net, data)[0], abs=1e-12)
    precise = recomputed_statistics_error(measured.final_net, data["X_train"][:PRECISE_IMAGES], data["X_test"],
                                          data["y_test"])
    assert measured.tail_precise[24] == pytest.approx(1 - precise["recomputed_error"])
    scores, _ = log_test_scores(measured_run, measured, data)
    assert scores["tail_test_acc"] == pytest.approx(np.mean(list(measured.tail.values())))
    assert store.history(measured_run.id, "curves/tail_test_acc") == sorted(measured.tail.items())


def test_tail_evals_enter_a_trials_key_only_when_set():
    config = TrainConfig()
    assert "tail_evals" not in config.effective()
    assert config.key() == TrainConfig(tail_evals=0).key() != TrainConfig(tail_evals=3).key()


def test_provenance_names_the_blas_kernel_which_openblas_coretype_changes():
    """The kernel OpenBLAS picks for the CPU decides a trajectory's last bits: the provenance says which ran."""
    here = blas()
    if not here.startswith("openblas"):
        pytest.skip(f"NumPy's BLAS here is not OpenBLAS: {here}")
    code = "from flows.provenance import blas; print(blas())"
    forced = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OPENBLAS_CORETYPE": "SandyBridge"},
                            capture_output=True, text=True, check=True).stdout.strip()
    assert re.fullmatch(r"openblas [\d.]+ \(\w+\), kernel Sandybridge, \d+ threads?", forced)
