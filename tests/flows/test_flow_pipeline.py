"""The pipeline: every step a child run of one uniquely named pipeline run, the final net registered."""

import re

from mlflow import MlflowClient

from flows.pipeline import pipeline


def test_pipeline_runs_every_step_under_one_mlflow_run_and_registers_its_champion(store, tiny):
    report = pipeline(base=tiny, space={"normalization": ["batchnorm", "groupnorm"]}, final_num_epochs=2,
                      sweep_name="pipeline-test", experiment="pipe", tracking_uri=store.uri)

    runs = store.runs("pipe")
    assert all(r.info.status == "FINISHED" for r in runs)
    [root] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert root.info.run_id == report.run_id and re.fullmatch(r"pipeline-\d{8}-\d{6}", root.info.run_name)
    steps = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == report.run_id}
    assert set(steps) == {"load-data-digits", "pipeline-test", f"final-{report.best.normalization}"}
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == report.sweep_run_id]
    assert len(trials) == 2 and steps["pipeline-test"].info.run_id == report.sweep_run_id

    final = steps[f"final-{report.best.normalization}"]
    assert final.info.run_id == report.final_run_id and final.data.params["num_epochs"] == "2"
    assert root.data.metrics["test_acc"] == final.data.metrics["accuracy/test_acc"] == report.test_acc
    assert root.data.tags["model_uri"] == report.model_uri
    assert report.url.endswith(f"/runs/{report.run_id}?workflowType=machine_learning")  # the Model training view

    # The gradient checks sit in their own experiment, pointing at the pipeline's run.
    assert not [m for r in runs for m in r.data.metrics if m.startswith("grad_err.")]
    [check] = store.runs("cnncore-gradient-check")
    assert check.info.run_id == report.gradient_check_run_id == root.data.tags["gradient_check_run_id"]
    assert check.data.tags["mlflow.parentRunId"] == report.run_id and check.info.status == "FINISHED"

    # The final net is the registered model's champion.
    client = MlflowClient(store.uri)
    champion = client.get_model_version_by_alias("cnncore-digits", "champion")
    assert champion.run_id == report.final_run_id and report.registered_model == "cnncore-digits@champion"


def test_pipeline_runs_get_unique_names(store, tiny):
    first = pipeline(base=tiny, space={"normalization": ["batchnorm"]}, final_num_epochs=1, sweep_name="unique-a",
                     experiment="pipe", tracking_uri=store.uri)
    named = pipeline(base=tiny, space={"normalization": ["batchnorm"]}, final_num_epochs=1, sweep_name="unique-b",
                     experiment="pipe", tracking_uri=store.uri, run_name="nightly-check")
    assert first.run_name != named.run_name == "nightly-check"
    roots = [r.info.run_name for r in store.runs("pipe") if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(roots) == sorted([first.run_name, "nightly-check"])
    assert MlflowClient(store.uri).get_model_version_by_alias("cnncore-digits", "champion").run_id == named.final_run_id
