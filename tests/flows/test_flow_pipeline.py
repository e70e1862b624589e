"""The pipeline: every step a child run of one uniquely named pipeline run; the final training and the registered
net follow the stated rules, and the answer says so, numbers included."""

import re

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from flows.answers import render
from flows.load_data import load_data_once
from flows.pipeline import pipeline


def test_pipeline_runs_every_step_under_one_mlflow_run_and_registers_its_champion(store, tiny):
    space = {"normalization": ["batchnorm", "groupnorm"], "batch_size": [25, 10], "train_seed": [0, 1]}
    report = pipeline(base=tiny.model_copy(update={"num_groups": 2}), space=space, lr_reference_batch=25,
                      final_num_epochs=2, sweep_name="pipeline-test", experiment="pipe", tracking_uri=store.uri)

    runs = store.runs("pipe")
    assert all(r.info.status == "FINISHED" for r in runs)
    [root] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert root.info.run_id == report.run_id and re.fullmatch(r"pipeline-\d{8}-\d{6}", root.info.run_name)
    steps = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == report.run_id}
    assert set(steps) == {"load-data-digits", "pipeline-test", f"final-{report.best.normalization}"}
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == report.sweep_run_id]
    assert len(trials) == 8 and steps["pipeline-test"].info.run_id == report.sweep_run_id
    # The learning rate scales with the batch size (the base's is the rate at batch 25).
    rates = {int(r.data.params["batch_size"]): float(r.data.params["learning_rate"]) for r in trials}
    assert rates == {25: pytest.approx(tiny.learning_rate), 10: pytest.approx(tiny.learning_rate * 10 / 25)}
    assert report.url.endswith(f"/runs/{report.run_id}?workflowType=machine_learning")  # the Model training view

    # The gradient checks sit in their own experiment, pointing at the pipeline's run.
    assert not [m for r in runs for m in r.data.metrics if m.startswith("grad_err.")]
    [check] = store.runs("cnncore-gradient-check")
    assert check.info.run_id == report.gradient_check_run_id == root.data.tags["gradient_check_run_id"]
    assert check.data.tags["mlflow.parentRunId"] == report.run_id and check.info.status == "FINISHED"


def test_the_final_training_takes_the_lower_validation_error_at_its_batch_size_and_registers_its_final_net(
        store, tiny, tmp_path):
    space = {"normalization": ["batchnorm", "groupnorm"], "batch_size": [25, 10], "train_seed": [0, 1]}
    report = pipeline(base=tiny.model_copy(update={"num_groups": 2, "train_seed": 7}), space=space,
                      lr_reference_batch=25, final_num_epochs=2, sweep_name="rule-test", experiment="pipe",
                      tracking_uri=store.uri)

    # The rule: the lower mean validation error of the final nets at batch 25, the base's batch size.
    val_error = {norm: np.mean([100 * (1 - t.final_val_acc) for t in report.sweep.trials
                                if t.config.normalization == norm and t.config.batch_size == 25])
                 for norm in ("batchnorm", "groupnorm")}
    chosen = min(val_error, key=val_error.get)
    assert report.choice["label"] == chosen and report.choice["val_error"] == pytest.approx(val_error[chosen])
    final = store.client.get_run(report.final_run_id)
    assert (final.data.params["normalization"], final.data.params["batch_size"], final.data.params["num_epochs"],
            final.data.params["train_seed"]) == (chosen, "25", "2", "7")

    # The registered net is the final training's final net: its test accuracy is the final net's.
    champion = MlflowClient(store.uri).get_model_version_by_alias("cnncore-digits", "champion")
    assert champion.run_id == report.final_run_id and report.registered_model == "cnncore-digits@champion"
    assert report.final.served_net == "final" and report.test_acc == report.final.final_test_acc
    data = load_data_once(report.best.data_spec())
    raw = data["X_test"] + data["mean"].reshape(1, -1, 1, 1)
    served = mlflow.pyfunc.load_model(f"models:/cnncore-digits@champion").predict(raw.astype(np.float64))
    assert np.mean(served == data["y_test"]) == pytest.approx(report.final.final_test_acc)
    root = store.client.get_run(report.run_id)
    assert root.data.metrics["pipeline/registered_test_error"] == pytest.approx(100 * (1 - report.final.final_test_acc))
    assert root.data.metrics["pipeline/best_val_checkpoint_test_error"] == pytest.approx(
        100 * (1 - report.final.test_acc))
    assert not set(root.data.metrics) & set(final.data.metrics)  # never a bar in a trial's or the final's chart
    # The pipeline run's Overview: the answer, the links, the final training and both rules.
    answer, links, took, kept = root.data.tags["mlflow.note.content"].split("\n\n")
    assert answer == f"**{report.sweep.answer}**"
    assert all(f"(#{url.partition('#')[2]})" in links for url in (report.sweep.url, report.sweep.charts_url,
                                                                  report.final.url))
    assert took.startswith(f"Final training: {chosen} at batch 25, 2 epochs, chosen by the rule: ")
    assert kept.startswith(f"Test error {100 * (1 - report.final.final_test_acc):.2f}%: the final net, registered")

    # What the terminal shows: the comparison, then the choice, both test errors and the rule.
    text = render(report, width=200)
    lines = text.splitlines()
    title = lines.index("Test error (%) of the final nets: mean and 95% CI over 2 seeds (train_seed 0, 1); "
                        "BN − GN: paired by seed (positive: GN better)")
    assert lines[title + 1].split() == ["normalization", "batch", "25", "batch", "10"]
    assert [line.split()[0] for line in lines[title + 2:title + 5]] == ["batchnorm", "groupnorm", "BN"]
    cells = {(c["normalization"], c["batch_size"]): c for c in report.sweep.comparison}
    assert f"{cells['batchnorm', 25]['mean']:.2f} [{cells['batchnorm', 25]['low']:.2f}," in lines[title + 2]
    other = next(n for n in ("batchnorm", "groupnorm") if n != chosen)
    flat = " ".join(text.split())  # long sentences wrap to the terminal's width
    assert (f"final training: {chosen} at batch 25, 2 epochs, chosen by the rule: the lowest validation error at "
            f"batch 25 (final nets, mean over seeds; the test split is never used to choose): {chosen} "
            f"{val_error[chosen]:.2f}%, {other} {val_error[other]:.2f}%.") in flat, text
    assert (f"test error {100 * (1 - report.final.final_test_acc):.2f}%: the final net, registered as "
            f"cnncore-digits@champion (version 1; the rule: the final training's final net (after its last epoch), "
            f"the net the comparison measures). Its best-validation checkpoint: "
            f"{100 * (1 - report.final.test_acc):.2f}%, not registered.") in flat, text
    assert lines[-4:] == [f"the comparison, in MLflow: {report.sweep.url}",
                          f"its trials by normalization and batch size, in MLflow's charts: {report.sweep.charts_url}",
                          f"the final training: {report.final.url}", f"the pipeline's run: {report.url}"]


def test_pipeline_runs_get_unique_names(store, tiny):
    first = pipeline(base=tiny, space={"normalization": ["batchnorm"]}, final_num_epochs=1, sweep_name="unique-a",
                     experiment="pipe", tracking_uri=store.uri)
    named = pipeline(base=tiny, space={"normalization": ["batchnorm"]}, final_num_epochs=1, sweep_name="unique-b",
                     experiment="pipe", tracking_uri=store.uri, run_name="nightly-check")
    assert first.run_name != named.run_name == "nightly-check"
    roots = [r.info.run_name for r in store.runs("pipe") if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(roots) == sorted([first.run_name, "nightly-check"])
    assert MlflowClient(store.uri).get_model_version_by_alias("cnncore-digits", "champion").run_id == named.final_run_id
