"""The study report's evidence, each section a markdown string built from the study's records (report.py orders
them): the answer (what the primary contrast says, in words and with its numbers), the errors beside the
paper's, whether the measures agree, each arm's own change, and why (the diagnostics). design.py holds the
sections that close the report: the design, the provenance and how to read the verdicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from ..config import SweepSpec
from .presets import BATCH_SIZES, LABELS, PAPER_ERROR
from .render import estimate_text, interval_text, markdown_table, number, seeds_text
from .statistics import ALPHA, POWER, Change, Difference, Interaction
from .trials import PRECISE, Design

ARM_LABELS = {**LABELS, PRECISE: "precise BN"}
# The arms in the order every table lists them: batch norm, then batch norm read with precise statistics.
ARMS = ("batchnorm", PRECISE, *(n for n in LABELS if n != "batchnorm"))
PAPER_CITATION = "Wu & He, Group Normalization, ECCV 2018, Table 2: ResNet-50, ImageNet val error (%)"
SMOKE_SEEDS = 3  # fewer seeds than this: a smoke test


def label(arm: str) -> str:
    """An arm's name for sentences: "LN (GN, G=1)" -> "LN"; unknown names as they are."""
    return ARM_LABELS.get(arm, arm).split(" (")[0]


def ordered_arms(names) -> list[str]:
    names = set(names)
    return [n for n in ARMS if n in names] + sorted(names - set(ARMS))


@dataclass(frozen=True)
class Context:
    """What every section needs to word its numbers: the sweep, its design, the reference g, the margin of no
    practical difference, the pair the answer compares (batch norm, the norm it is compared with), the most
    seeds any cell has."""

    spec: SweepSpec
    design: Design
    reference: int
    delta: float
    pair: tuple[str, str]
    seeds: int

    @property
    def smoke(self) -> bool:
        return self.seeds < SMOKE_SEEDS

    def at(self, g: int | None) -> str:
        return self.design.at(g)

    def measure(self, name: str = "test_error") -> str:
        """The measure in words."""
        k = self.spec.base.tail_evals
        if name == "test_error" and k:
            return f"mean test error over the last {k} evaluations" if k > 1 else "test error at the last evaluation"
        return {"test_error": "final net's test error", "final_test_error": "final net's test error",
                "best_val_test_error": "best-validation net's test error"}[name]


def smoke_banner(seeds: int, full: str = "the full preset") -> str:
    """The line a report with fewer than SMOKE_SEEDS seeds opens with; full: what to run for an answer."""
    return (f"> **A smoke test, not a result: {seeds_text(seeds)}.** With fewer than {SMOKE_SEEDS} seeds an "
            f"interval rests on {max(seeds - 1, 0)} degree{'s' * (seeds != 2)} of freedom: the intervals "
            f"below are honest, and far too wide to answer the question. Run {full} for an answer.")


def smoke_prefix(seeds: int) -> str:
    """What a smoke test's answer starts with, so that no sentence of it reads as a result."""
    return f"Smoke test ({seeds_text(seeds)}), not a result: "


# ---------------------------------------------------------------- the answer


def _holm_reading(row) -> str:
    """'loses' or 'gains' where Holm's correction over the g values still detects the contrast, else ''."""
    if math.isnan(row.estimate.p) or not row.p_holm < ALPHA:
        return ""
    return "loses" if row.estimate.mean > 0 else "gains"


def primary_reading(rows: list, ctx: Context) -> str:
    """The primary contrast in words: where a loss (or gain) survives Holm's correction, by how much; where none
    does, the most the intervals allow (one-sided bound) and what the run could have detected (MDE)."""
    a, b = map(label, ctx.pair)
    what = "" if ctx.design.norm_batch else f" over {b}"
    # Who loses is in the words, and the size is a positive number of points.
    verbs = ({"loses": f"{a} loses", "gains": f"{a} gains"} if ctx.design.norm_batch
             else {"loses": f"{a} loses more than {b} by", "gains": f"{b} loses more than {a} by"})
    parts = []
    for reading in ("loses", "gains"):
        found = [r for r in rows if _holm_reading(r) == reading]
        if found:
            parts.append(f"{verbs[reading]} " + "; ".join(
                f"{abs(r.estimate.mean):.2f} points at {ctx.at(r.norm_batch)} "
                f"({estimate_text(r.estimate.mean, r.estimate.low, r.estimate.high, r.estimate.n, signed=True)}, "
                f"Holm-adjusted p = {r.p_holm:.2g})" for r in found))
    rest = [r for r in rows if not _holm_reading(r)]
    sized = [r for r in rest if r.estimate.n >= 2]
    if sized:
        onset = [r for r in rows if _holm_reading(r) == "loses"]
        nothing = "no loss detected" if not onset else "none detected"
        parts.append(f"{nothing} at {ctx.design.at_all(r.norm_batch for r in sized)}, where {a}'s extra error"
                     f"{what} is at most " + ", ".join(f"{r.estimate.upper:+.2f}" for r in sized)
                     + f" points (one-sided 95% upper bound{'s' * (len(sized) > 1)}, n={sized[0].estimate.n}); "
                     f"the run would have detected " + ", ".join(f"{r.estimate.mde:.2f}" for r in sized)
                     + f" points with {POWER:.0%} power (MDE)")
    unsized = [r for r in rest if r.estimate.n < 2]
    if unsized:
        parts.append(f"nothing can be said at {ctx.design.at_all(r.norm_batch for r in unsized)}: fewer than two "
                     f"seeds finished every trial it pairs")
    return "; ".join(parts) + "."


def _losers(rows: list) -> list:
    return [r for r in rows if _holm_reading(r) == "loses"]


def onset_sentence(rows: list, ctx: Context) -> str:
    """Where batch norm starts to lose: the largest g with a loss that survives Holm."""
    losers = _losers(rows)
    a = label(ctx.pair[0])
    if not losers:
        smallest = min((r.norm_batch for r in rows), default=None)
        return (f"No loss of {a} is detected down to {ctx.at(smallest)}." if smallest is not None else "")
    onset = max(losers, key=lambda r: r.norm_batch)
    return (f"The largest {'g' if ctx.design.norm_batch else 'batch'} at which {a}'s loss is detected: "
            f"{ctx.at(onset.norm_batch)}.")


def difference_reading(rows: list[Difference], ctx: Context) -> str:
    """BN(g) - B per g in words: where one beats the other (interval excludes 0), by how much."""
    a, b = map(label, ctx.pair)
    beats = [r for r in rows if r.estimate.n >= 2 and (r.estimate.low > 0 or r.estimate.high < 0)]
    if not beats:
        return (f"At no {'g' if ctx.design.norm_batch else 'batch size'} does either of {a} and {b} beat the other "
                f"beyond its interval.")
    return "; ".join(f"{label(r.b) if r.estimate.mean > 0 else label(r.a)} beats "
                     f"{label(r.a) if r.estimate.mean > 0 else label(r.b)} at {ctx.at(r.norm_batch)} by "
                     f"{abs(r.estimate.mean):.2f} points "
                     f"({estimate_text(r.estimate.mean, r.estimate.low, r.estimate.high, r.estimate.n, signed=True)})"
                     for r in beats) + "."


def short_answer(primary: list, differences: list[Difference], ctx: Context) -> str:
    """The answer in one paragraph (the report's "In short", and the terminal's answer)."""
    a, b = map(label, ctx.pair)
    if ctx.design.norm_batch:
        question = (f"Does {a} lose as its statistics batch g shrinks from {ctx.reference}, at a fixed SGD batch "
                    f"of {ctx.spec.base.batch_size}, and does {b} beat it?")
    else:
        question = f"Does {a} lose more than {b} as the batch shrinks from {ctx.reference}?"
    prefix = smoke_prefix(ctx.seeds) if ctx.smoke else ""
    if not primary:
        return f"{prefix}{question} Not answerable from this run."
    text = f"{prefix}{question} In short ({ctx.measure()}): {primary_reading(primary, ctx)}"
    onset = onset_sentence(primary, ctx)
    text += f" {onset}" if onset else ""
    own = [d for d in differences if (d.a, d.b) == ctx.pair]
    if own:
        text += f" {difference_reading(own, ctx)}"
    return text


def _arm_of(record) -> str:
    """The arm a contrast belongs to: a Change's normalization, an Interaction's or a Difference's a."""
    return record.normalization if isinstance(record, Change) else record.a


def _contrast_table(rows: list, ctx: Context, value: str, with_bound: bool, against: bool = False) -> str:
    table = pd.DataFrame([{"arm": label(_arm_of(r)),
                           **({"against": label(r.b)} if against else {}), "g": r.norm_batch,
                           "n": r.estimate.n, value: number(r.estimate.mean, signed=True),
                           "95% CI": interval_text(r.estimate.low, r.estimate.high),
                           **({"at most (one-sided 95%)": number(r.estimate.upper, signed=True)} if with_bound else {}),
                           "MDE": number(r.estimate.mde),
                           **({"Holm p": "—" if math.isnan(r.p_holm) else f"{r.p_holm:.2g}"}
                              if hasattr(r, "p_holm") else {}),
                           "verdict": r.verdict} for r in rows])
    if not ctx.design.norm_batch:
        table = table.rename(columns={"g": "batch"})
    return markdown_table(table)


def answer_section(primary: list, precise_primary: list, differences: list[Difference], recovered: list[Difference],
                   baselines: list, ctx: Context, figure: str) -> str:
    """The answer: the primary contrast (with precise BN's), whether the compared norm beats batch norm, what
    precise statistics recover, and batch norm against the other normalizations run (baselines: their
    interactions in the single-device design, their differences in the normalization-batch design)."""
    a, b = map(label, ctx.pair)
    ref = ctx.at(ctx.reference)
    if ctx.design.norm_batch:
        lines = [f"## The answer: does {a} lose as g shrinks, and does {b} beat it?", ""]
    else:
        lines = [f"## The answer: does {a} lose more than {b} as the batch shrinks?", ""]
    lines += [short_answer(primary, differences, ctx), ""]
    if not primary:
        lines.append(f"It needs {a} at {ref} and at a smaller g, each with finished trials"
                     + ("" if ctx.design.norm_batch else f", and {b} at the same batch sizes") + ".")
        return "\n".join(lines)
    if ctx.design.norm_batch:
        lines += [f"**{a}'s extra error at g against {ref}** ({ctx.design.title}: every trial trains with SGD "
                  f"batches of {ctx.spec.base.batch_size} at one learning rate, and only {a}'s statistics are "
                  f"computed over g images). Per seed, {a}(g) - {a}({ctx.reference}), in points of "
                  f"{ctx.measure()}; {b} does not depend on g, so this is also the interaction of {a} with {b}. "
                  f"Holm's correction runs over the g values of each arm.", ""]
        value = "extra error (points)"
    else:
        lines += [f"**The interaction** ({ctx.design.title}: g is the SGD batch, the learning rate scaled "
                  f"with it). Per seed, ({a}(b) - {a}({ctx.reference})) - ({b}(b) - {b}({ctx.reference})): how "
                  f"many more points of {ctx.measure()} {a} gains than {b} when the batch shrinks from "
                  f"{ctx.reference} to b; positive means {a} loses more. Holm's correction runs over the batch "
                  f"sizes.", ""]
        value = "interaction (points)"
    lines += [_contrast_table(primary + precise_primary, ctx, value, with_bound=True), ""]
    if figure:
        lines += [f"![{value.split(' (')[0]} against g]({figure}.png)", ""]
    if differences:
        lines += [f"**Does {b} beat {a}?** Per seed, {a}(g) - {b}" + ("" if ctx.design.norm_batch else "(g)")
                  + f" at the same g: positive means {b} errs less.", "",
                  _contrast_table(differences, ctx, f"{a} - {b} (points)", with_bound=False), ""]
    if baselines:
        kind = "interaction" if isinstance(baselines[0], Interaction) else "difference"
        lines += [f"**{a} against each other normalization run** (none of them uses batch statistics, so each is a "
                  f"baseline {a}'s loss can be measured against): the same {kind}.", "",
                  _contrast_table(baselines, ctx, f"{kind} (points)", with_bound=False, against=True), ""]
    if recovered:
        lines += [f"**What precise statistics recover.** Per seed, {a}(g) - precise {a}(g): the same trained "
                  f"net scored with its statistics recomputed over training images instead of the running "
                  f"averages; positive means precise statistics err less, so that much of {a}'s error is the "
                  f"mismatch between training's and test's statistics, which recomputing them removes.", "",
                  _contrast_table(recovered, ctx, "recovered (points)", with_bound=False), ""]
    return "\n".join(lines).rstrip()


# ---------------------------------------------------------------- errors and measures


def wide_cells(cells: pd.DataFrame, ctx: Context) -> pd.DataFrame:
    """A row per arm, a column per g (largest first), each 'mean [low, high], n=k'. An arm independent of g
    sits in the reference's column, its other columns saying so."""
    levels = sorted({int(g) for g in cells["norm_batch"].dropna()}, reverse=True)
    rows = []
    for arm in ordered_arms(cells["normalization"]):
        mine = cells[cells["normalization"] == arm]
        row = {"arm": ARM_LABELS.get(arm, arm)}
        if mine["norm_batch"].isna().all():
            c = mine.iloc[0]
            text = estimate_text(c["mean"], c["low"], c["high"], int(c["n"]))
            row.update({ctx.design.column(g): text if g == ctx.reference else "same trials" for g in levels})
        else:
            by_g = {int(c.norm_batch): estimate_text(c.mean, c.low, c.high, int(c.n)) for c in mine.itertuples()}
            row.update({ctx.design.column(g): by_g.get(g, "") for g in levels})
        rows.append(row)
    return pd.DataFrame(rows)


def paper_table(ctx: Context) -> pd.DataFrame:
    paper = pd.DataFrame(PAPER_ERROR).T.reindex(columns=list(BATCH_SIZES))
    paper = paper.map(lambda v: "" if pd.isna(v) else f"{v:.1f}")
    paper.columns = [f"{b} images per GPU" for b in paper.columns]
    return paper.rename(index=LABELS).rename_axis("normalization").reset_index()


def errors_section(cells: pd.DataFrame, ctx: Context, figure: str) -> str:
    lines = [f"## Test error (%): {ctx.measure()}, mean and 95% CI over seeds", "",
             markdown_table(wide_cells(cells, ctx)), ""]
    if figure:
        lines += [f"![test error against g]({figure}.png)", ""]
    lines += [f"The paper ({PAPER_CITATION}; batch norm's statistics over the images on one GPU, the SGD batch "
              f"over 8 GPUs), for scale: its ImageNet errors are not comparable with these.", "",
              markdown_table(paper_table(ctx))]
    return "\n".join(lines)


def _half_width(est) -> float:
    return 0.0 if math.isnan(est.low) else (est.high - est.low) / 2


def _agreement(by_measure: dict[str, list], ctx: Context) -> str:
    """Whether the measures say the same at every g (the same verdict, and means that differ by no more than
    delta or the primary's own half-interval, whichever is larger) and, where not, which way the others lean."""
    primary = {r.norm_batch: r for r in by_measure["test_error"]}
    disagree, sizes, leans = [], [], []
    for name, rows in by_measure.items():
        if name == "test_error" or not rows:
            continue
        paired = [(r, primary[r.norm_batch]) for r in rows if r.norm_batch in primary]
        for r, p in paired:
            reading = (f"at {ctx.at(r.norm_batch)} the {ctx.measure(name)} reads "
                       f"{estimate_text(r.estimate.mean, r.estimate.low, r.estimate.high, r.estimate.n, True)} "
                       f"against {number(p.estimate.mean, signed=True)}")
            if r.verdict != p.verdict:
                disagree.append(f"{reading} ('{r.verdict}' where the primary measure says '{p.verdict}')")
            elif abs(r.estimate.mean - p.estimate.mean) > max(ctx.delta, _half_width(p.estimate)):
                sizes.append(reading)
        shifts = [r.estimate.mean - p.estimate.mean for r, p in paired if not math.isnan(r.estimate.mean)]
        if shifts:
            shift = sum(shifts) / len(shifts)
            leans.append(f"the {ctx.measure(name)} reads the contrast {abs(shift):.2f} points "
                         f"{'higher' if shift > 0 else 'lower'} on average over g")
    if not leans:
        return "Only the primary measure was recorded for these trials."
    which_way = "; ".join(leans) + "."
    if disagree:
        return "They disagree: " + "; ".join(disagree + sizes) + ". Which way: " + which_way
    if sizes:
        return (f"The verdicts agree at every g, but the sizes differ by more than ±{ctx.delta:g} points and more "
                f"than the primary measure's own interval: "
                + "; ".join(sizes) + ". Which way: " + which_way)
    return (f"The measures agree: the same verdict at every g, and means within ±{ctx.delta:g} points (or the "
            f"primary measure's own interval) of the primary measure's; " + which_way)


def measures_section(by_measure: dict[str, list], cells_by_measure: dict[str, pd.DataFrame], ctx: Context) -> str:
    """The primary contrast under each measure, and the other measures' error tables."""
    a = label(ctx.pair[0])
    what = "extra error at g" if ctx.design.norm_batch else f"interaction with {label(ctx.pair[1])}"
    others = " and the ".join(ctx.measure(name) for name in by_measure if name != "test_error")
    lines = ["## Do the measures agree?", "",
             f"The primary measure, fixed before the runs, is the {ctx.measure()}"
             + (f"; the {others} {'is' if len(by_measure) == 2 else 'are'} reported beside it" if others else "")
             + f". {a}'s {what}, in points, under each:", ""]
    levels = [r.norm_batch for r in by_measure["test_error"]]
    table = pd.DataFrame([{"g" if ctx.design.norm_batch else "batch": g, **{
        ctx.measure(name): next((estimate_text(r.estimate.mean, r.estimate.low, r.estimate.high, r.estimate.n, True)
                                 for r in rows if r.norm_batch == g), "—")
        for name, rows in by_measure.items()}} for g in levels])
    lines += [markdown_table(table) if levels else "No contrast to compare.", "", _agreement(by_measure, ctx)]
    for name, cells in cells_by_measure.items():
        if name == "test_error":
            continue
        lines += ["", f"Test error (%), the {ctx.measure(name)}:", ""]
        lines.append(markdown_table(wide_cells(cells, ctx)) if not cells.empty else "Not recorded for these trials.")
    return "\n".join(lines)


def changes_section(norm_changes: list[Change], ctx: Context) -> str:
    lines = [f"## Each arm's own change from {ctx.at(ctx.reference)}", ""]
    if not norm_changes:
        return "\n".join([*lines, f"No arm that depends on g ran at {ctx.at(ctx.reference)} and a smaller g."])
    table = pd.DataFrame([{"arm": ARM_LABELS.get(c.normalization, c.normalization), "g": c.norm_batch,
                           "n": c.estimate.n, "change (points)": number(c.estimate.mean, signed=True),
                           "95% CI": interval_text(c.estimate.low, c.estimate.high), "MDE": number(c.estimate.mde),
                           "Holm p": "—" if math.isnan(c.p_holm) else f"{c.p_holm:.2g}",
                           "verdict": c.verdict} for c in norm_changes])
    if not ctx.design.norm_batch:
        table = table.rename(columns={"g": "batch"})
    lines += [f"Per seed, error(g) - error({ctx.reference}) in points of {ctx.measure()}, paired by seed; flat "
              f"means the interval lies within ±{ctx.delta:g} points.", "", markdown_table(table)]
    return "\n".join(lines)


# ---------------------------------------------------------------- why


def diagnostics_section(layers: pd.DataFrame | None, model: pd.DataFrame | None, sentences: list[str]) -> str:
    lines = ["## Why: the normalization statistics", ""]
    if layers is None:
        return "\n".join([*lines, "No diagnostics were recorded for this run: the report cannot say why the "
                                  "normalizations behaved as they did."])
    lines += [f"- {sentence}" for sentence in sentences]
    for title, table in (("Per norm layer, median over seeds", layers), ("Whole model, median over seeds", model)):
        if table is not None and not table.empty:
            lines += ["", f"{title}:", "", markdown_table(table)]
    return "\n".join(lines)
