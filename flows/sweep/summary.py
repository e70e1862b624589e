"""What a sweep leaves behind: on its parent run, in Prefect, and in the terminal.

On the parent run: summary.csv and the MLflow table summary.json (one row per
trial), comparison.png (the final nets' test error per normalization against the
other swept fields, mean and 95% interval over seeds), and the totals as tags. A
study preset adds its tables, figures and report under study/; any other grid its
comparison (flows.sweep.comparison): the cells, the paired differences between
normalizations and their answer, as tables and as the sweep's Prefect markdown
artifact.
"""

from __future__ import annotations

import re

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from ..config import SweepSpec
from ..figures import sweep_comparison_figure
from ..provenance import provenance
from ..study import StudyResult, build_study
from ..study.report import markdown_table
from ..tracking import FINISHED, Run
from .comparison import Choice, Comparison, choice_text, choose, compare, wide_rows
from .results import TrialResult, best_trial


def summary_table(spec: SweepSpec, results: list[TrialResult]) -> pd.DataFrame:
    """One row per trial, in trial order: its swept values, status and results."""
    rows = []
    for r in sorted(results, key=lambda r: r.index):
        swept = {k: getattr(r.config, k) for k in dict.fromkeys(["normalization", *spec.swept()])}
        rows.append({"trial": r.index, "run_name": r.run_name, **swept, "status": r.status, "skipped": r.skipped,
                     "best_val_acc": r.best_val_acc, "test_acc": r.test_acc, "final_val_acc": r.final_val_acc,
                     "final_test_acc": r.final_test_acc, "wall_time_s": r.wall_time_s,
                     "failure_reason": r.failure_reason or "", "run_id": r.run_id, "trial_key": r.key})
    return pd.DataFrame(rows)


def wide_table(comparison: Comparison) -> pd.DataFrame:
    """The comparison as it is read (comparison.wide_rows): a row per normalization and per difference."""
    return pd.DataFrame(wide_rows(comparison.cells.to_dict("records"), comparison.differences.to_dict("records")))


def comparison_markdown(comparison: Comparison, spec: SweepSpec, choice: Choice | None, url: str) -> str:
    """The comparison as the Prefect artifact shows it: the answer first, then the table, the choice, the link."""
    lines = [f"# Sweep {spec.name}: {comparison.answer}", "", comparison.title + ".", "",
             markdown_table(wide_table(comparison)), "", f"Lowest validation error: {choice_text(None if choice is None else choice.as_record())}.", "",
             f"MLflow: {url}"]
    return "\n".join(lines)


@task(name="summarise sweep", cache_policy=NO_CACHE)
def summarise_sweep(parent: Run, spec: SweepSpec, results: list[TrialResult]) -> Comparison:
    """The parent's summary table (CSV and MLflow table), comparison figure and totals; returns the comparison."""
    table = summary_table(spec, results)
    parent.log_table(table, "summary")
    comparison = compare(spec, results)
    finished = [r for r in results if r.status == FINISHED]
    if finished:  # with none, an empty figure would pass for a result
        parent.log_figure(sweep_comparison_figure(comparison.cells, comparison.columns, spec.name,
                                                  failed=len(results) - len(finished)), "comparison.png")
    # Tags, not metrics: in the experiment's charts a parent's metric is one more bar ("Unassigned")
    # beside its trials', under the same names, and each count a chart of its own.
    totals = {"num_trials": len(results), "num_finished": len(finished), "num_failed": len(results) - len(finished),
              "num_skipped": sum(r.skipped for r in results)}
    if (best := best_trial(results)) is not None:
        totals.update(best_run_id=best.run_id, best_trial_key=best.key, best_trial_val_acc=best.best_val_acc)
    parent.set_tags(totals)
    return comparison


@task(name="publish comparison", cache_policy=NO_CACHE)
def publish_comparison(parent: Run, spec: SweepSpec, results: list[TrialResult], comparison: Comparison) -> Choice | None:
    """A grid's comparison (not a study's) on the parent run, comparison/cells and comparison/differences
    (CSV and MLflow tables), and as the sweep's Prefect markdown artifact; returns the configuration with the
    lowest validation error."""
    parent.log_table(comparison.cells, "comparison/cells")
    parent.log_table(comparison.differences, "comparison/differences")
    choice = choose(spec, results)
    create_markdown_artifact(comparison_markdown(comparison, spec, choice, parent.url),
                             key=artifact_key(f"sweep-{spec.name}"), description=f"What sweep {spec.name} found")
    return choice


def artifact_key(text: str) -> str:
    """Prefect artifact keys take lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def study_trials(results: list[TrialResult]) -> pd.DataFrame:
    """The study's trial records, from the results the sweep holds: one row per FINISHED trial.

    Errors in percent: test_error is the final net's (the study's measure, as the
    paper's), best_val_test_error the best-validation net's.
    """
    rows = [{"normalization": r.config.normalization, "batch_size": r.config.batch_size, "seed": r.config.train_seed,
             "test_error": _percent_error(r.final_test_acc), "best_val_test_error": _percent_error(r.test_acc),
             "run_id": r.run_id}
            for r in results if r.status == FINISHED and r.final_test_acc is not None]
    return pd.DataFrame(rows, columns=["normalization", "batch_size", "seed", "test_error", "best_val_test_error",
                                       "run_id"])


def _percent_error(accuracy: float | None) -> float:
    return float("nan") if accuracy is None else 100.0 * (1.0 - accuracy)


# Diagnostics that are fractions of images, reported in percent like the errors.
_ERROR_DIAGNOSTICS = ("train_mode_error", "test_mode_error", "running_error", "recomputed_error")


def study_diagnostics(results: list[TrialResult]) -> pd.DataFrame | None:
    """The diagnostics the trials measured, one row per (trial, metric, layer); None when none did.

    A per-layer metric 'norm{i}/<what>' becomes metric <what> at layer i; whole-net
    metrics have layer NaN; errors are in percent.
    """
    rows = []
    for r in results:
        if r.status != FINISHED:
            continue
        for name, value in r.diagnostics.items():
            layer, _, metric = name.rpartition("/")
            rows.append({"normalization": r.config.normalization, "batch_size": r.config.batch_size,
                         "seed": r.config.train_seed, "metric": metric,
                         "layer": float(layer.removeprefix("norm")) if layer else float("nan"),
                         "value": 100.0 * value if metric in _ERROR_DIAGNOSTICS else value})
    return pd.DataFrame(rows) if rows else None


@task(name="write study report", cache_policy=NO_CACHE)
def write_study_report(parent: Run, spec: SweepSpec, results: list[TrialResult], num_train: int) -> StudyResult:
    """The study's tables, figures and markdown report on the parent run (flows.study.build_study), and the
    report as the sweep's Prefect markdown artifact.

    Artifacts: study/<table> (CSV and MLflow table) and study/<figure>.png for each of
    the study's tables and figures, and study/report.md.
    """
    # A resumed study's report is made now, from trials some of which earlier code may have trained.
    trained_at = ", ".join(sorted({r.commit for r in results if r.commit})) or "unknown"
    study = build_study(study_trials(results), spec, diagnostics=study_diagnostics(results),
                        provenance={**provenance(), "trials trained at commit": trained_at}, num_train=num_train)
    for name, table in study.tables.items():
        parent.log_table(table, f"study/{name}")
    for name, figure in study.figures.items():
        parent.log_figure(figure, f"study/{name}.png")
    parent.log_text(study.markdown, "study/report.md")
    create_markdown_artifact(study.markdown + f"\n\nMLflow: {parent.url}", key=artifact_key(f"study-{spec.name}"),
                             description=f"The study's report: sweep {spec.name}")
    return study
