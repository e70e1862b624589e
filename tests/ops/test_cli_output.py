"""What `cnnflow run` prints when a flow returns (flows.answers), and the exit status and line of an
error (flows.cli.errors): the text a user reads, from results built here (no flow runs, no server)."""

from __future__ import annotations

import json
import math
import time

import pytest
import typer
import yaml
from typer.testing import CliRunner

from flows import tracking
from flows.cli import app
from flows.cli.errors import CliError, one_line_errors
from flows.answers import render
from flows.config import TrainConfig
from flows.pipeline import PipelineReport
from flows.config import SweepSpec
from flows.sweep import SweepReport, TrialResult
from flows.sweep.comparison import choose, compare
from flows.sweep.lease import SweepBusyError
from flows.sweep.resume import SweepChangedError
from flows.train import TrainResult

from .conftest import strict_json

URL = "http://127.0.0.1:5000/#/experiments/1/runs/abc"


def trial(index: int, normalization: str, seed: int, best_val: float | None, test: float | None,
          final: float | None, status: str = "FINISHED", reason: str | None = None,
          final_val: float | None = None) -> TrialResult:
    config = TrainConfig(normalization=normalization, train_seed=seed, num_groups=2)
    return TrialResult(index=index, key=config.key(), run_id=f"run{index}", status=status,
                       run_name=f"grid/{index:02d} {normalization} train_seed={seed}", best_val_acc=best_val,
                       test_acc=test, final_test_acc=final, final_val_acc=final_val, failure_reason=reason,
                       config=config)


def train_result(test_acc: float = 0.9712, final: float | None = 0.9655, seconds: float = 3.21) -> TrainResult:
    return TrainResult(run_id="abc", url=URL, model_uri="models:/m-1", test_acc=test_acc, final_test_acc=final,
                       best_val_acc=0.98, wall_time_s=seconds, images_per_s=1234.5, config=TrainConfig())


GRID = SweepSpec(name="grid", base=TrainConfig(num_groups=2),
                 space={"normalization": ["batchnorm", "groupnorm"], "train_seed": [0, 1]})


def grid_report() -> SweepReport:
    """BN finished at both seeds (final nets 6% and 7% test error, 5% and 4% validation error); GN failed at both."""
    trials = [trial(0, "batchnorm", 0, 0.96, 0.95, 0.94, final_val=0.95),
              trial(1, "batchnorm", 1, 0.99, 0.97, 0.93, final_val=0.96),
              trial(2, "groupnorm", 0, None, None, None, "FAILED", "NonFiniteLossError: loss became nan"),
              trial(3, "groupnorm", 1, None, None, None, "FAILED", "NonFiniteLossError: loss became inf")]
    found = compare(GRID, trials)
    return SweepReport(name="grid", parent_run_id="parent", url=URL, trials=trials, best=trials[1], wall_time_s=12.4,
                       comparison_title=found.title, answer=found.answer, comparison=found.cells.to_dict("records"),
                       differences=found.differences.to_dict("records"), choice=choose(GRID, trials).as_record())


# ---------------------------------------------------------------- the answer as a table (the default)


def test_a_training_ends_with_its_errors_in_one_line_and_its_link():
    lines = render(train_result()).splitlines()
    assert lines == ["test error 2.88% (best-validation net; final net 3.45%); best val acc 0.980; 3.2 s of "
                     "training, 1,234 images/s", f"MLflow run: {URL}"]


def test_the_ui_hint_follows_an_answer_with_a_link():
    assert render(train_result(), ui_hint="start it with `cnnflow ui`").splitlines()[-1] == \
        "(the MLflow UI: start it with `cnnflow ui`)"


def test_a_sweep_ends_with_its_comparison_failures_the_rules_choice_and_link():
    lines = render(grid_report(), width=120).splitlines()
    assert lines[0] == "sweep grid: 4 trials, 2 failed, 0 finished earlier; 12 s"
    header = lines.index("Test error (%) of the final nets: mean and 95% CI over 2 seeds (train_seed 0, 1)")
    assert lines[header + 1].split() == ["normalization", "batch", "32"]
    # The final nets' errors, 6 and 7: mean 6.5, t-interval 6.5 ± 12.706 x 0.5.
    assert lines[header + 2].split() == ["batchnorm", "6.50", "[0.15,", "12.85]"]
    assert lines[header + 3].split() == ["groupnorm", "—"]
    assert "Nothing to compare: no column has two normalizations finished." in lines
    assert "FAILED grid/02 groupnorm train_seed=0: NonFiniteLossError: loss became nan" in lines
    assert "FAILED grid/03 groupnorm train_seed=1: NonFiniteLossError: loss became inf" in lines
    # What the rule picks, on which numbers: the validation errors of the final nets, 5% and 4%, never a best trial.
    choice = lines.index(next(line for line in lines if line.startswith("lowest validation error")))
    assert " ".join(" ".join(lines[choice:-1]).split()) == (
        "lowest validation error: batchnorm: validation error 4.50% (mean of 2 final nets); the rule: the lowest "
        "validation error among all trials (final nets, mean over seeds; the test split is never used to choose)")
    assert not [line for line in lines if "best trial" in line]
    assert lines[-1] == f"MLflow parent run: {URL}"
    # The trials charted in MLflow, when the sweep saved that view, come after the parent's link.
    charted = render(grid_report().model_copy(update={"charts_url": f"{URL}?k"}), width=120).splitlines()
    assert charted[-2:] == [f"MLflow parent run: {URL}",
                            f"its trials by normalization and batch size, in MLflow's charts: {URL}?k"]


def test_a_study_sweep_shows_its_cells_as_the_paper_prints_them_and_its_answer():
    report = grid_report().model_copy(update={
        "comparison_title": "the study's table", "answer": "Does BN lose more than GN? In short: cannot tell.",
        "comparison": [{"normalization": n, "batch_size": b, "n": 2, "mean": m, "low": m - 1, "high": m + 1}
                       for n, b, m in (("batchnorm", 32, 2.5), ("batchnorm", 4, 7.25), ("groupnorm", 32, 3.0))]})
    lines = render(report, width=120).splitlines()
    table = lines[lines.index("the study's table") + 1:]
    assert table[0].split() == ["normalization", "batch", "32", "batch", "4"]
    assert table[1].split() == ["batchnorm", "2.50", "[1.50,", "3.50]", "7.25", "[6.25,", "8.25]"]
    assert table[2].split() == ["groupnorm", "3.00", "[2.00,", "4.00]"]
    assert "Does BN lose more than GN? In short: cannot tell." in lines


def test_a_pipeline_ends_with_the_sweep_the_final_training_its_rule_and_the_registered_model():
    sweep = grid_report().model_copy(update={"charts_url": f"{URL}?viewStateShareKey=k"})
    final = train_result().model_copy(update={"served_net": "final", "url": "http://127.0.0.1:5000/#/f"})
    report = PipelineReport(run_id="p", url="http://127.0.0.1:5000/#/p", run_name="pipeline-x",
                            gradient_check_run_id="g", sweep=sweep, choice=sweep.choice, final=final,
                            registered_model="cnncore-digits@champion", registered_version=3, wall_time_s=30.0)
    lines = render(report, width=120).splitlines()
    assert lines[0] == "sweep grid: 4 trials, 2 failed, 0 finished earlier; 12 s"
    text = " ".join(" ".join(lines).split())
    assert (f"final training: batchnorm at batch 32, {TrainConfig().num_epochs} epochs, chosen by the rule: the lowest "
            "validation error among all trials (final nets, mean over seeds; the test split is never used to "
            "choose): batchnorm 4.50%.") in text
    # The registered net's error first, the one left out beside it, and why.
    assert ("test error 3.45%: the final net, registered as cnncore-digits@champion (version 3; the rule: the final "
            "training's final net (after its last epoch), the net the comparison measures). Its best-validation "
            "checkpoint: 2.88%, not registered.") in text
    assert lines[-4:] == [f"the comparison, in MLflow: {URL}",
                          f"its trials by normalization and batch size, in MLflow's charts: {URL}?viewStateShareKey=k",
                          "the final training: http://127.0.0.1:5000/#/f",
                          "the pipeline's run: http://127.0.0.1:5000/#/p"]


# ---------------------------------------------------------------- for scripts: yaml and json


def test_json_output_is_strict_json_with_null_for_numbers_that_are_not_finite():
    text = render(grid_report(), "json")
    result = strict_json(text)
    assert result["comparison"][1]["mean"] is None and result["comparison"][1]["low"] is None
    assert result["comparison"][0]["mean"] == pytest.approx(6.5)
    assert result["choice"]["label"] == "batchnorm" and result["choice"]["val_error"] == pytest.approx(4.5)
    assert [t["status"] for t in result["trials"]] == ["FINISHED", "FINISHED", "FAILED", "FAILED"]
    assert result["best"]["run_id"] == "run1"


def test_json_output_writes_null_for_a_float_field_that_is_nan():
    """A diagnostic of a constant channel is NaN, and a train result's final_test_acc may be: still JSON."""
    report = grid_report()
    report.trials[0].diagnostics = {"norm1/n_eff": math.nan, "norm1/nominal": 8.0}
    report.trials[0].wall_time_s = math.inf
    result = strict_json(render(report, "json"))
    assert result["trials"][0]["diagnostics"] == {"norm1/n_eff": None, "norm1/nominal": 8.0}
    assert result["trials"][0]["wall_time_s"] is None
    assert strict_json(render(train_result(final=math.nan), "json"))["final_test_acc"] is None


def test_yaml_output_holds_the_same_data_as_json():
    assert yaml.safe_load(render(grid_report(), "yaml")) == strict_json(render(grid_report(), "json"))


def test_json_output_of_a_training_has_its_scores_and_its_configuration():
    result = strict_json(render(train_result(final=None), "json"))
    assert result["test_acc"] == 0.9712 and result["final_test_acc"] is None
    assert result["config"] == json.loads(TrainConfig().model_dump_json())


# ---------------------------------------------------------------- errors: one line and an exit status


def exit_of(error: Exception, capsys) -> tuple[int, str]:
    with pytest.raises(typer.Exit) as stopped, one_line_errors():
        raise error
    return stopped.value.exit_code, capsys.readouterr().err


@pytest.mark.parametrize("error, code", [
    (SweepChangedError("sweep 'x' already exists with another base configuration"), 2),
    (SweepBusyError("sweep 'x' is being run by another process right now"), 1),
    (CliError("port 5000 on 127.0.0.1 is taken", exit_code=2), 2),
    (ValueError("batch_size must be a positive integer, got 0"), 1),
], ids=["changed-base", "busy", "cli-error", "value-error"])
def test_a_project_error_keeps_its_exit_status_and_is_one_line(error, code, capsys):
    status, err = exit_of(error, capsys)
    assert status == code
    assert err == f"error: {error}\n"


def test_any_other_error_names_its_type_keeps_its_own_lines_and_exits_1(capsys):
    """One message: the error's own lines (a list of URLs tried, say) each with its indentation, the runs of
    spaces within a line collapsed, no blank lines."""
    status, err = exit_of(RuntimeError("the dataset   went away:\n\n  tried   one\n  tried two  "), capsys)
    assert (status, err) == (1, "error: RuntimeError: the dataset went away:\n  tried one\n  tried two\n")


# ---------------------------------------------------------------- commands that read the store


@pytest.fixture
def store_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_report_prints_the_latest_study_of_that_name(store_uri):
    store = tracking.connect(store_uri)
    for text in ("# the first study", "# the second study"):
        run = store.start_run("studies", "digits", tags={"sweep_name": "digits", "sweep_role": "parent"})
        run.log_text(text + "\n", "study/report.md")
        run.finish()
        time.sleep(0.05)  # start times a few milliseconds apart: which is later is not a tie
    done = invoke("report", "digits", "--tracking-uri", store_uri)
    assert done.exit_code == 0, done.output
    assert "# the second study" in done.stdout and "# the first study" not in done.stdout
    missing = invoke("report", "nonexistent", "--tracking-uri", store_uri)
    assert missing.exit_code == 1 and "no sweep named 'nonexistent'" in missing.output


def test_runs_shows_a_runs_best_validation_accuracy_not_its_last(store_uri):
    run = tracking.connect(store_uri).start_run("listed", "trained", params={"normalization": "groupnorm"})
    run.log_metrics({"val_acc": 0.70, "best_val_acc": 0.90, "test_acc": 0.85})
    run.finish()
    done = invoke("runs", "--tracking-uri", store_uri, "--output", "json")
    assert done.exit_code == 0, done.output
    (row,) = strict_json(done.stdout)
    assert (row["run"], row["status"], row["val_acc"], row["test_acc"]) == ("trained", "FINISHED", 0.90, 0.85)
    assert row["params"] == {"normalization": "groupnorm"}
