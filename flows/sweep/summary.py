"""What a sweep leaves behind: on its parent run, in Prefect, and in the terminal.

On the parent run: summary.csv and the MLflow table summary.json (one row per
trial), comparison.png (test error per normalization against the first other swept
field, with 95% intervals), and the totals and the best trial as tags. A study
preset adds its tables, figures and report under study/; any other sweep (a grid
or a random search) its comparison table.
"""

from __future__ import annotations

import re

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from .. import prefect_watch
from ..config import SweepSpec
from ..figures import sweep_comparison_figure
from ..provenance import provenance
from ..study import StudyResult, build_study, estimate
from ..study.report import interval_text, markdown_table
from ..study.trials import RECORD_COLUMNS
from ..tracking import FINISHED, Run
from .results import TrialResult, best_trial


def summary_table(spec: SweepSpec, results: list[TrialResult]) -> pd.DataFrame:
    """One row per trial, in trial order: its swept values, status and results."""
    rows = []
    for r in sorted(results, key=lambda r: r.index):
        swept = {k: getattr(r.config, k) for k in dict.fromkeys(["normalization", *spec.swept()])}
        rows.append({"trial": r.index, "run_name": r.run_name, **swept, "status": r.status, "skipped": r.skipped,
                     "best_val_acc": r.best_val_acc, "test_acc": r.test_acc, "wall_time_s": r.wall_time_s,
                     "failure_reason": r.failure_reason or "", "run_id": r.run_id, "trial_key": r.key})
    return pd.DataFrame(rows)


def comparison_table(spec: SweepSpec, results: list[TrialResult]) -> pd.DataFrame:
    """What the sweep says, for a sweep that is not a study: one row per combination of the swept fields
    other than the seed, with the test error (%) of its best-validation nets, mean and 95% t-interval over
    the seeds that finished, and how many finished out of how many ran."""
    fields = [k for k in dict.fromkeys(["normalization", *spec.swept()]) if k != "train_seed"]
    rows = {}
    for r in sorted(results, key=lambda r: r.index):
        key = tuple(getattr(r.config, k) for k in fields)
        rows.setdefault(key, []).append(r)
    table = []
    for key, trials in rows.items():
        errors = [_percent_error(r.test_acc) for r in trials if r.status == FINISHED and r.test_acc is not None]
        found = estimate(errors)  # NaNs when none finished
        table.append({**dict(zip(fields, key)), "trials": len(trials), "finished": len(errors),
                      "test_error": found.mean, "low": found.low, "high": found.high})
    return pd.DataFrame(table)


def comparison_markdown(table: pd.DataFrame, spec: SweepSpec, best: TrialResult | None, url: str) -> str:
    """The comparison as the Prefect artifact shows it: a title, the table, the best trial, the link."""
    lines = [f"# Sweep {spec.name}", "",
             "Test error (%) of each configuration's best-validation nets: mean and 95% CI over its seeds.", "",
             markdown_table(table.assign(**{"95% CI": list(map(interval_text, table["low"], table["high"]))})
                            .drop(columns=["low", "high"]).round({"test_error": 2})), ""]
    if best is not None:
        lines.append(f"Best trial: {best.run_name}, validation accuracy {best.best_val_acc:.3f}.")
    lines += ["", f"MLflow: {url}"]
    return "\n".join(lines)


@task(name="summarise sweep", cache_policy=NO_CACHE)
def summarise_sweep(parent: Run, spec: SweepSpec, results: list[TrialResult]) -> pd.DataFrame:
    """The parent's summary table (CSV and MLflow table), comparison figure and totals."""
    table = summary_table(spec, results)
    parent.log_table(table, "summary")
    finished = [r for r in results if r.status == FINISHED]
    if finished:  # with none, an empty figure would pass for a result
        x_name = next((k for k in spec.swept() if k not in ("normalization", "train_seed")), None)
        averaged = [k for k in spec.swept() if k not in ("normalization", x_name)]
        parent.log_figure(sweep_comparison_figure(table, x_name, averaged, spec.name), "comparison.png")
    # Tags, not metrics: in the experiment's charts a parent's metric is one more bar ("Unassigned")
    # beside its trials', under the same names, and each count a chart of its own.
    totals = {"num_trials": len(results), "num_finished": len(finished), "num_failed": len(results) - len(finished),
              "num_skipped": sum(r.skipped for r in results)}
    if (best := best_trial(results)) is not None:
        totals.update(best_run_id=best.run_id, best_trial_key=best.key, best_trial_val_acc=best.best_val_acc)
    parent.set_tags(totals)
    return table


@task(name="publish comparison", cache_policy=NO_CACHE)
def publish_comparison(parent: Run, spec: SweepSpec, results: list[TrialResult]) -> pd.DataFrame:
    """The comparison table of a grid that is not a study, on the parent run and as the sweep's Prefect
    markdown artifact (a study publishes its report instead)."""
    table = comparison_table(spec, results)
    parent.log_table(table, "comparison")
    prefect_watch.optional(create_markdown_artifact, comparison_markdown(table, spec, best_trial(results), parent.url),
                           key=artifact_key(f"sweep-{spec.name}"), description=f"What sweep {spec.name} found")
    return table


def artifact_key(text: str) -> str:
    """Prefect artifact keys take lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def study_trials(results: list[TrialResult]) -> pd.DataFrame:
    """The study's trial records (flows.study.trials), from the results the sweep holds: one row per FINISHED
    trial.

    Errors in percent: test_error is the study's measure, the mean over the tail
    evaluations (the final net's error for a trial without them); final_test_error the
    final net's, best_val_test_error the best-validation net's; the precise columns batch
    norm's with statistics recomputed over training images (the tail's over the first
    training.PRECISE_IMAGES, the final net's over the whole split, a diagnostic). norm_batch
    is the trial's (its SGD batch when unset).
    """
    rows = [{"normalization": r.config.normalization, "batch_size": r.config.batch_size,
             "norm_batch": getattr(r.config, "norm_batch", None) or r.config.batch_size, "seed": r.config.train_seed,
             "test_error": _percent_error(r.tail_test_acc if r.tail_test_acc is not None else r.final_test_acc),
             "final_test_error": _percent_error(r.final_test_acc), "best_val_test_error": _percent_error(r.test_acc),
             "precise_test_error": _percent_error(r.tail_precise_test_acc),
             "final_precise_test_error": 100.0 * r.diagnostics.get("recomputed_error", float("nan")),
             "run_id": r.run_id}
            for r in results if r.status == FINISHED and r.final_test_acc is not None]
    return pd.DataFrame(rows, columns=RECORD_COLUMNS)


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
                         "norm_batch": getattr(r.config, "norm_batch", None) or r.config.batch_size,
                         "seed": r.config.train_seed, "metric": metric,
                         "layer": float(layer.removeprefix("norm")) if layer else float("nan"),
                         "value": 100.0 * value if metric in _ERROR_DIAGNOSTICS else value})
    return pd.DataFrame(rows) if rows else None


@task(name="write study report", cache_policy=NO_CACHE)
def write_study_report(parent: Run, spec: SweepSpec, results: list[TrialResult], num_train: int) -> StudyResult:
    """The study's tables, figures and report on the parent run (flows.study.build_study), and the report as
    the sweep's Prefect markdown artifact, its figures embedded.

    Artifacts: study/<table> (CSV and MLflow table) and study/<figure>.png for each of
    the study's tables and figures, study/report.md (figures linked beside it, as
    `cnnflow report --to` exports them) and study/report.html (one page, figures
    embedded: what MLflow's artifact view shows).
    """
    # A resumed study's report is made now, from trials some of which earlier code may have trained.
    trained_at = ", ".join(sorted({r.commit for r in results if r.commit})) or "unknown"
    trained_with = "; ".join(sorted({r.blas for r in results if r.blas})) or "unknown"
    study = build_study(study_trials(results), spec, diagnostics=study_diagnostics(results),
                        provenance={**provenance(), "trials trained at commit": trained_at,
                                    "trials trained with BLAS": trained_with}, num_train=num_train)
    for name, table in study.tables.items():
        parent.log_table(table, f"study/{name}")
    for name, figure in study.figures.items():
        parent.log_figure(figure, f"study/{name}.png")
    parent.log_text(study.markdown, "study/report.md")
    parent.log_text(study.html(), "study/report.html")
    prefect_watch.optional(create_markdown_artifact, study.markdown_with_figures() + f"\n\nMLflow: {parent.url}",
                           key=artifact_key(f"study-{spec.name}"), description=f"The study's report: sweep {spec.name}")
    return study
