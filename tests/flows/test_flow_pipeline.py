"""The pipeline: every step a child run of one pipeline run, ending with where the results are."""

import logging

from flows.pipeline import pipeline


def test_pipeline_runs_every_step_under_one_mlflow_run_and_says_where_results_are(store, tiny, caplog):
    caplog.set_level(logging.INFO)
    report = pipeline(base=tiny, space={"normalization": ["batchnorm", "groupnorm"]}, final_num_epochs=2,
                      sweep_name="pipeline-test", experiment="pipe", tracking_uri=store.uri)

    runs = store.runs("pipe")
    assert all(r.info.status == "FINISHED" for r in runs)
    [root] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert root.info.run_id == report.run_id and root.info.run_name == "pipeline"
    steps = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == report.run_id}
    assert set(steps) == {"load-data-digits", "gradient-check", "pipeline-test", f"final-{report.best.normalization}"}
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == report.sweep_run_id]
    assert len(trials) == 2 and steps["pipeline-test"].info.run_id == report.sweep_run_id

    final = steps[f"final-{report.best.normalization}"]
    assert final.info.run_id == report.final_run_id and final.data.params["num_epochs"] == "2"
    assert root.data.metrics["test_acc"] == final.data.metrics["test_acc"] == report.test_acc
    assert root.data.tags["model_uri"] == report.model_uri

    printed = [r.getMessage() for r in caplog.records if r.name == "prefect.flow_runs"][-5:]
    assert any(f"pipeline run {report.run_id}" in line and store.uri in line for line in printed)
    assert any(f"mlflow ui --backend-store-uri {store.uri}" in line for line in printed)
