"""The study's report: tables, figures and a report that answers first, from the trials' records.

build_study(trials, spec) is the one entry point; it reads the design from the spec
(trials.design_of: the normalization-batch design or the single-device design) and
returns a StudyResult. Its markdown, in order: title; the answer (the primary
contrast per g with Holm's correction, its one-sided bound where nothing is
detected, whether the compared norm beats batch norm, what precise statistics
recover); the errors beside the paper's; whether the three measures agree; each
arm's own change; why (the diagnostics); the design; provenance; how to read the
verdicts. The primary contrast is batch norm's extra error at g against the reference
in the normalization-batch design, and its interaction with the compared norm in the
single-device design; precise BN (trials.PRECISE) is a row of every table.

A StudyResult renders itself three ways: ``markdown`` (the figures linked by file
name, as exported beside it), ``markdown_with_figures()`` (the figures embedded as data
URIs: Prefect's markdown artifact) and ``html()`` (one self-contained page: MLflow's
artifact view, a browser).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pandas as pd
from matplotlib.figure import Figure

from cnncore.checks import require_real

from ..config import SweepSpec
from . import design as closing
from . import diagnostics as diag
from . import sections
from .figures import contrast_figure, error_figure, stamp
from .render import embedded_markdown, figure_png, interval_text, markdown_table, report_html
from .sections import ARM_LABELS, Context, label, ordered_arms
from .statistics import (DELTA, MEASURES, Cell, Change, Difference, Interaction, as_table, cell_estimates, changes,
                         differences, interactions, reference_batch)
from .trials import PRECISE, Design, arms, design_of, require_records

__all__ = ["StudyResult", "build_study", "interval_text", "markdown_table"]

# BN against the first of these that the study ran: the paper's GN, else the positive control's LN.
COMPARED_WITH = ("groupnorm", "layernorm", "instancenorm", "none")


@dataclass
class StudyResult:
    """The report (markdown), its tables (to log as CSV / MLflow tables) and figures, keyed by artifact name.

    answer: the report's answer in one paragraph, for a terminal; answer_figure: the
    name of the figure that shows it (the one a link should open on), "" when none;
    summary: the error table as the report prints it (a row per arm, a column per g,
    each cell "mean [low, high], n=k"), with summary_title saying what it holds.
    """

    markdown: str
    tables: dict[str, pd.DataFrame]
    figures: dict[str, Figure]
    answer: str = ""
    answer_figure: str = ""
    summary: pd.DataFrame | None = None
    summary_title: str = ""

    @functools.cached_property
    def pngs(self) -> dict[str, bytes]:
        """The figures as PNG (render.figure_png), rendered once for every place that shows them: the logged
        files, the HTML page and the markdown artifact (a figure's rendering is most of a small study's
        summary time)."""
        return {name: figure_png(figure) for name, figure in self.figures.items()}

    def markdown_with_figures(self) -> str:
        """The report with its figures embedded as PNG data URIs: for Prefect's markdown artifact."""
        return embedded_markdown(self.markdown, self.pngs)

    def html(self) -> str:
        """The report as one self-contained HTML page, figures embedded: for MLflow's artifact view."""
        return report_html(self.markdown, self.pngs)


def build_study(trials: pd.DataFrame, spec: SweepSpec, diagnostics: pd.DataFrame | None = None,
                provenance: dict[str, str] | None = None, delta: float = DELTA,
                num_train: int | None = None) -> StudyResult:
    """The study from its trials: one record per finished trial (see trials.py: normalization, batch_size,
    norm_batch, seed, test_error and the other measures, those absent taken as unrecorded), the sweep's spec,
    and optional diagnostics (see diagnostics.py, keyed by the trials' norm_batch).

    delta: the practical-equivalence margin in points of error. num_train: training
    images per epoch (default spec.base.num_train), for the updates each g gets.
    """
    delta = require_real("delta", delta, low=0)
    design = design_of(spec)
    finished = require_records(trials).dropna(subset=["test_error"])
    planned_trials = spec.trials()
    missing = _missing(planned_trials, finished, design)
    num_train = spec.base.num_train if num_train is None else num_train
    run_norms = {t.normalization for t in planned_trials}
    pair = ("batchnorm", next((n for n in COMPARED_WITH if n in run_norms), "groupnorm"))
    long = arms(finished, design)
    reference = reference_batch(long) if long["norm_batch"].notna().any() else 32
    seeds = int(long.groupby(["normalization", "norm_batch"], dropna=False)["seed"].nunique().max()) \
        if not long.empty else 0
    ctx = Context(spec, design, reference, delta, pair, seeds)
    tables = {"updates": closing.updates_table(spec, planned_trials, num_train, design)}
    title = f"# {' vs '.join(map(label, pair))}: {spec.base.dataset}, {closing.net_words(spec, planned_trials)}, " \
            f"{design.title}"
    parts, figures, answer, answer_figure = [title], {}, "No trial finished: there is nothing to compare.", ""
    if finished.empty:
        parts.append(answer)
    else:
        found = _contrasts(long, ctx)
        tables.update(found.tables)
        answer_figure = "bn_extra_error_vs_g" if design.norm_batch else "interaction_vs_batch_size"
        error_name = "error_vs_g" if design.norm_batch else "error_vs_batch_size"
        figures[error_name] = error_figure(tables["cells"], spec.name, design.axis, ctx.measure(), ARM_LABELS)
        if found.primary:
            figures[answer_figure] = _answer_figure(found, ctx)
        else:
            answer_figure = ""
        tables["trials"] = finished.sort_values(["normalization", "norm_batch", "seed"], ignore_index=True)
        answer = sections.short_answer(found.primary, found.differences, ctx)
        parts += [sections.answer_section(found.primary, found.precise_primary, found.differences, found.recovered,
                                          found.baselines, ctx, answer_figure),
                  sections.errors_section(tables["cells"], ctx, error_name),
                  sections.measures_section(found.by_measure, found.cells_by_measure, ctx),
                  sections.changes_section(found.changes, ctx)]
    sentences: list[str] = []
    if diagnostics is not None:
        shaped = _diagnostics_by_design(diagnostics, design)
        tables["diagnostics_layers"] = diag.layer_summary(shaped)
        tables["diagnostics_model"] = diag.model_summary(shaped)
        sentences = diag.explanations(tables["diagnostics_layers"], tables["diagnostics_model"], delta, at=ctx.at)
    parts += [sections.diagnostics_section(tables.get("diagnostics_layers"), tables.get("diagnostics_model"),
                                           sentences),
              closing.design_section(spec, planned_trials, tables["updates"], len(planned_trials), missing,
                                      num_train, ctx),
              closing.provenance_section(provenance), closing.method_section(delta)]
    if ctx.smoke and not finished.empty:
        parts.insert(1, sections.smoke_banner(ctx.seeds))
    summary = sections.wide_cells(tables["cells"], ctx) if "cells" in tables else None
    summary_title = (f"Test error (%), {ctx.measure()}: mean, 95% CI and n over seeds ({design.title}"
                     + (f", SGD batch {spec.base.batch_size})" if design.norm_batch else ")"))
    return StudyResult("\n\n".join(parts) + "\n", tables,
                       {name: stamp(figure, provenance) for name, figure in figures.items()}, answer, answer_figure,
                       summary, summary_title)


@dataclass
class _Found:
    """Everything the sections read, from one pass over the arms."""

    primary: list
    precise_primary: list
    differences: list[Difference]
    recovered: list[Difference]
    baselines: list
    changes: list[Change]
    by_measure: dict[str, list]
    cells_by_measure: dict[str, pd.DataFrame]
    tables: dict[str, pd.DataFrame]


def _primary(long: pd.DataFrame, ctx: Context, arm: str, measure: str) -> list:
    """The primary contrast of arm: its change from the reference (normalization-batch design), or its
    interaction with the compared norm (single-device design)."""
    if ctx.design.norm_batch:
        return [c for c in changes(long, ctx.reference, ctx.delta, measure) if c.normalization == arm]
    return interactions(long, arm, ctx.pair[1], ctx.reference, ctx.delta, (label(arm), label(ctx.pair[1])), measure)


def _contrasts(long: pd.DataFrame, ctx: Context) -> _Found:
    a, b = ctx.pair
    present = set(long["normalization"])
    # Without tail evaluations the primary measure is the final net's error: no second copy beside it.
    measures = [m for m in MEASURES if long[m].notna().any()
                and not (m == "final_test_error" and not ctx.spec.base.tail_evals)]
    by_measure = {m: _primary(long, ctx, a, m) for m in measures}
    primary = by_measure.get("test_error", [])
    precise_primary = _primary(long, ctx, PRECISE, "test_error") if PRECISE in present else []
    diffs = [d for arm in (a, PRECISE) if arm in present and b in present
             for d in differences(long, arm, b, ctx.delta, (label(arm), label(b)))]
    recovered = differences(long, a, PRECISE, ctx.delta, (label(a), label(PRECISE))) if PRECISE in present else []
    rank = {n: i for i, n in enumerate(ordered_arms(present))}
    norm_changes = sorted(changes(long, ctx.reference, ctx.delta), key=lambda c: (rank[c.normalization],
                                                                                  -c.norm_batch))
    cells_by_measure = {m: _cell_table(long, m) for m in MEASURES if m in measures or m == "test_error"}
    interaction_rows = [x for other in ordered_arms(present) if other not in (a, PRECISE)
                        for x in interactions(long, a, other, ctx.reference, ctx.delta, (label(a), label(other)))]
    others = [n for n in ordered_arms(present) if n not in (a, PRECISE, b)]
    # In the normalization-batch design every baseline's interaction is BN's own change: compare levels instead.
    baselines = ([d for other in others for d in differences(long, a, other, ctx.delta, (label(a), label(other)))]
                 if ctx.design.norm_batch else [x for x in interaction_rows if x.b != b])
    measure_rows = [{"measure": m, **row} for m, rows in by_measure.items()
                    for row in as_table(rows, type(rows[0])).to_dict("records")] if primary else []
    tables = {"cells": cells_by_measure["test_error"],
              **{f"{short}_cells": cells_by_measure[m] for m, short in (("final_test_error", "final"),
                                                                       ("best_val_test_error", "best_val"))
                 if m in cells_by_measure},
              "changes": as_table(norm_changes, Change),
              "primary": _primary_table(primary + precise_primary, ctx),
              "differences": as_table(diffs + recovered + (baselines if ctx.design.norm_batch else []), Difference),
              "interactions": as_table(interaction_rows, Interaction),
              "measures": pd.DataFrame(measure_rows)}
    return _Found(primary, precise_primary, diffs, recovered, baselines, norm_changes, by_measure, cells_by_measure,
                  tables)


def _primary_table(rows: list, ctx: Context) -> pd.DataFrame:
    """The primary contrast's records, whichever the design, with the arm each belongs to first."""
    kind = Change if ctx.design.norm_batch else Interaction
    table = as_table(rows, kind)
    table.insert(0, "arm", table["normalization" if ctx.design.norm_batch else "a"])
    return table


def _answer_figure(found: _Found, ctx: Context) -> Figure:
    a, b = map(label, ctx.pair)
    kind = Change if ctx.design.norm_batch else Interaction
    rows = [as_table(found.primary, kind).assign(arm=a)]
    if found.precise_primary:
        rows.append(as_table(found.precise_primary, kind).assign(arm=label(PRECISE)))
    table = pd.concat(rows, ignore_index=True)
    if ctx.design.norm_batch:
        ylabel = f"{a}'s extra error at g against g = {ctx.reference} (points)"
        title = f"{ctx.spec.name}: {a}(g) - {a}({ctx.reference}), SGD batch {ctx.spec.base.batch_size}, {ctx.measure()}"
    else:
        ylabel = f"extra error of {a} over {b} (points)"
        title = f"{ctx.spec.name}: ({a}(b) - {a}({ctx.reference})) - ({b}(b) - {b}({ctx.reference})), {ctx.measure()}"
    return contrast_figure(table, ctx.delta, ylabel, title, ctx.design.axis)


def _cell_table(long: pd.DataFrame, measure: str) -> pd.DataFrame:
    """Cells in display order (arm, then g descending, an arm independent of g first), without an MDE, p or
    bound: a cell's mean is not tested against 0, so they would mislead."""
    table = as_table(cell_estimates(long, measure), Cell).drop(columns=["mde", "p", "upper"])
    if table.empty:
        return table
    rank = {n: i for i, n in enumerate(ordered_arms(table["normalization"]))}
    order = table.assign(_arm=table["normalization"].map(rank), _g=-table["norm_batch"].astype("Float64").fillna(1e9))
    return order.sort_values(["_arm", "_g"], ignore_index=True).drop(columns=["_arm", "_g"])


def _missing(planned: list, finished: pd.DataFrame, design: Design) -> list[tuple]:
    """The planned trials with no finished record, as (normalization, g or None, seed)."""
    def g_of(normalization: str, batch: int, norm_batch) -> int | None:
        if design.norm_batch and normalization != "batchnorm":
            return None
        return int(norm_batch) if norm_batch is not None and norm_batch == norm_batch else batch

    done = {(n, g_of(n, b, nb), s) for n, b, nb, s in
            finished[["normalization", "batch_size", "norm_batch", "seed"]].itertuples(index=False)}
    wanted = {(t.normalization, g_of(t.normalization, t.batch_size, getattr(t, "norm_batch", None)), t.train_seed)
              for t in planned}
    return sorted(wanted - done, key=lambda m: (m[0], -(m[1] or 0), m[2]))


def _diagnostics_by_design(diagnostics: pd.DataFrame, design: Design) -> pd.DataFrame:
    """The diagnostics keyed as the arms are: in the normalization-batch design, g missing for every
    normalization but batch norm."""
    frame = diagnostics.copy()
    if "norm_batch" not in frame.columns:
        frame["norm_batch"] = frame["batch_size"]
    frame["norm_batch"] = frame["norm_batch"].astype(float)
    if design.norm_batch:
        frame.loc[frame["normalization"] != "batchnorm", "norm_batch"] = float("nan")
    return frame
