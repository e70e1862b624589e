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

from .. import prefect_watch
from ..config import SweepSpec
from ..figures import sweep_comparison_figure
from ..metrics import ANSWER_PREFIX, BATCH_SIZE, FINAL_TEST_ACC
from ..provenance import provenance
from ..study import StudyResult, build_study
from ..study.render import embedded_markdown, figure_png, markdown_table, report_html
from ..study.trials import RECORD_COLUMNS
from ..tracking import FINISHED, BarChart, LineChart, Run, in_page, save_children_view
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


def comparison_markdown(comparison: Comparison, spec: SweepSpec, choice: Choice | None,
                        url: str | None = None) -> str:
    """The comparison in markdown, answer first: the answer, the table under its title, the figure (linked as
    comparison.png, beside it on the parent run), the configuration with the lowest validation error, and the
    link when given."""
    chosen = choice_text(None if choice is None else choice.as_record())
    against = comparison.columns[0] if comparison.columns else "normalization"
    lines = [f"# Sweep {spec.name}", "", f"**{escaped(comparison.answer)}**", "",
             escaped(grid_table_markdown(comparison)), "",
             f"![the comparison: test error against {against}](comparison.png)", "",
             f"Lowest validation error: {chosen}."]
    return "\n".join(lines + (["", f"MLflow: {url}"] if url else []))


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


REPORT = "comparison/report.html"


@task(name="publish comparison", cache_policy=NO_CACHE)
def publish_comparison(parent: Run, spec: SweepSpec, results: list[TrialResult],
                       comparison: Comparison) -> Choice | None:
    """A grid's comparison (not a study's) on the parent run: comparison/cells and comparison/differences (CSV
    and MLflow tables), comparison/report.html (one page, its figure embedded: what the printed link opens),
    and the sweep's Prefect markdown artifact; returns the configuration with the lowest validation error."""
    parent.log_table(comparison.cells, "comparison/cells")
    parent.log_table(comparison.differences, "comparison/differences")
    choice = choose(spec, results)
    figure = sweep_comparison_figure(comparison.cells, comparison.columns, spec.name,
                                     failed=sum(r.status != FINISHED for r in results))
    figures = {"comparison": figure_png(figure)}  # rendered once for the page and the Prefect artifact
    markdown = comparison_markdown(comparison, spec, choice)
    parent.log_text(report_html(markdown, figures, f"Sweep {spec.name}"), REPORT)
    prefect_watch.optional(create_markdown_artifact,
                           embedded_markdown(comparison_markdown(comparison, spec, choice, parent.url), figures),
                           key=artifact_key(f"sweep-{spec.name}"), description=f"What sweep {spec.name} found")
    return choice


def answer_metrics(comparison: Comparison) -> dict[str, float]:
    """The parent's key numbers: each difference ("BN − GN" at batch 2: answer/bn_minus_gn_batch_2) with its
    interval's ends (..._ci_low, ..._ci_high), and the seeds per cell (answer/seeds). Names no trial logs, so
    they never add a bar to a trial's chart; numbers without a value (one seed: no interval) are left out."""
    numbers = {f"{ANSWER_PREFIX}seeds": float(comparison.cells["n"].max())} if len(comparison.cells) else {}
    for row in comparison.differences.itertuples():
        name = f"{ANSWER_PREFIX}{_slug(row.label)}_{_slug(row.column)}"
        numbers.update({name: row.mean, f"{name}_ci_low": row.low, f"{name}_ci_high": row.high})
    # Rounded past float noise only (a mean of 4.67 and 3.67 is 0.9999999999999952, shown as such by MLflow).
    return {k: round(float(v), 10) for k, v in numbers.items() if v == v}  # v != v: NaN


def _slug(text: str) -> str:
    """"BN − GN" -> "bn_minus_gn", "batch 32" -> "batch_32": a metric name's words."""
    return re.sub(r"[^a-z0-9.]+", "_", text.lower().replace("−", "minus")).strip("_")


@task(name="show the answer in MLflow", cache_policy=NO_CACHE)
def show_answer_in_mlflow(parent: Run, spec: SweepSpec, results: list[TrialResult], answer: str,
                          table: str | None = None, report: str | None = None,
                          numbers: dict[str, float] | None = None) -> str:
    """The parent run's Overview answers: its description holds the answer, links to the trials charted in
    MLflow and to the report (an artifact of the parent), then the table; its key numbers are metrics
    (answer/...). The chart view is a saved view of the experiment's runs page (flows.tracking.views): this
    sweep's trials only, grouped by normalization, the final nets' test accuracy against batch size. Returns
    the view's link."""
    view = save_children_view(parent, f"{spec.name}: its trials by normalization", *_view_charts(spec, results),
                              section=f"{spec.name}: the comparison", collapsed=(ANSWER_PREFIX.rstrip("/"),))
    links = [f"[{spec.name}'s trials by normalization and batch size, in MLflow's charts]"
             f"({in_page(parent.store.ui_url(view))})"]
    if report is not None:
        links.append(f"[the report, with its figures]({in_page(parent.url_of(report))})")
    parent.describe("\n\n".join([f"**{escaped(answer)}**", " · ".join(links),
                                   *([escaped(table)] if table else [])]))
    if numbers:
        parent.log_metrics(numbers)
    return parent.store.ui_url(view)


def _view_charts(spec: SweepSpec, results: list[TrialResult]) -> tuple[list[str], list]:
    """(the parameters the trials are grouped by, the charts): the final nets' test accuracy against batch size,
    a line per normalization (and per value of the other swept fields), when batch size was swept; else a bar
    per group."""
    others = [k for k in spec.swept() if k not in ("normalization", "train_seed", "batch_size")]
    if "batch_size" not in spec.swept():
        return ["normalization", *others], [BarChart(FINAL_TEST_ACC, "final net's test accuracy: mean over seeds")]
    accuracies = [r.final_test_acc for r in results if r.status == FINISHED and r.final_test_acc is not None]
    y_range = None
    if accuracies:  # MLflow starts the axis at 0 otherwise, where 0.95 and 0.97 look the same
        pad = max(0.005, 0.1 * (max(accuracies) - min(accuracies)))
        y_range = (max(0.0, min(accuracies) - pad), min(1.0, max(accuracies) + pad))
    return ["normalization", *others], [LineChart(FINAL_TEST_ACC, BATCH_SIZE, "final net's test accuracy against "
                                                  "batch size: mean over seeds, band from the lowest to the highest",
                                                  y_range)]


def escaped(markdown: str) -> str:
    """Square brackets shown as written: MLflow's markdown reads "[a, b] (n=5)" as a link."""
    return markdown.replace("[", "\\[").replace("]", "\\]")


def grid_table_markdown(comparison: Comparison) -> str:
    """The comparison's title and table, as the parent's description and the report show them."""
    return f"{comparison.title}.\n\n{markdown_table(wide_table(comparison))}"


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
    for name, png in study.pngs.items():
        parent.log_png(png, f"study/{name}.png")
    parent.log_text(study.markdown, "study/report.md")
    parent.log_text(study.html(), "study/report.html")
    prefect_watch.optional(create_markdown_artifact, study.markdown_with_figures() + f"\n\nMLflow: {parent.url}",
                           key=artifact_key(f"study-{spec.name}"), description=f"The study's report: sweep {spec.name}")
    return study
