"""The study's report: tables, figures and a markdown report that answers first, from the trials' records.

build_study(trials, spec) is the one entry point. Its markdown, in order: title;
provenance; the design (what was run, updates per batch size, what error is
measured, what did not finish); the answer (the interaction of BN with GN, or with
LN where no GN was run, at every batch size with its interval, MDE and verdict,
then BN against the other normalizations); each normalization's own change; the error table beside the
paper's Table 2; the best-validation checkpoint's errors; the diagnostics; how to
read the verdicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from matplotlib.figure import Figure

from cnncore.checks import require_real
from cnncore.data import IMAGE_SHAPES

from ..config import SweepSpec
from . import diagnostics as diag
from .figures import error_figure, interaction_figure, stamp
from .presets import BATCH_SIZES, LABELS, NORMALIZATIONS, PAPER_ERROR, short_label
from .statistics import (ABOVE, BELOW, DELTA, KEYS, NO_SEED, ONE_SEED, WITHIN, Cell, Change, Interaction, POWER,
                         as_table, cell_estimates, changes, interactions, read_interval, reference_batch,
                         require_trials)

# BN against the first of these that the study ran: the paper's GN, else the positive control's LN.
COMPARED_WITH = ("groupnorm", "layernorm", "instancenorm", "none")
PAPER_CITATION = "Wu & He, Group Normalization, ECCV 2018, Table 2: ResNet-50, ImageNet val error (%)"


@dataclass
class StudyResult:
    """The report (markdown), its tables (to log as CSV / MLflow tables) and figures, keyed by artifact name."""

    markdown: str
    tables: dict[str, pd.DataFrame]
    figures: dict[str, Figure]
    answer: str = ""  # the report's answer in one paragraph, for a terminal


def build_study(trials: pd.DataFrame, spec: SweepSpec, diagnostics: pd.DataFrame | None = None,
                provenance: dict[str, str] | None = None, delta: float = DELTA,
                num_train: int | None = None) -> StudyResult:
    """The study from its trials: one row per finished trial (normalization, batch_size, seed, test_error,
    best_val_test_error optional), the sweep's spec, and optional diagnostics (see diagnostics.py).

    delta: the practical-equivalence margin in points of error. num_train: training
    images per epoch (default spec.base.num_train), for the updates each batch size gets.
    """
    delta = require_real("delta", delta, low=0)
    finished = require_trials(trials).dropna(subset=["test_error"])
    planned_trials = spec.trials()
    planned = {(t.normalization, t.batch_size, t.train_seed) for t in planned_trials}
    missing = sorted(planned - set(map(tuple, finished[KEYS].values.tolist())))
    num_train = spec.base.num_train if num_train is None else num_train
    tables = {"updates": updates_table(spec, planned_trials, num_train)}
    run_norms = {t.normalization for t in planned_trials}
    primary = ("batchnorm", next((n for n in COMPARED_WITH if n in run_norms), "groupnorm"))
    parts = [f"# {' vs '.join(map(short_label, primary))} across batch sizes: {spec.base.dataset}, "
             f"{net_words(spec, planned_trials)}", provenance_section(provenance),
             design_section(spec, planned_trials, tables["updates"], len(planned), missing, num_train)]
    figures, answer = {}, "No trial finished: there is nothing to compare."
    if finished.empty:
        parts.append(answer)
    else:
        reference = reference_batch(finished)
        present = _ordered_names(finished["normalization"])
        pairs = [("batchnorm", other) for other in present if "batchnorm" in present and other != "batchnorm"]
        pair_rows = {pair: interactions(finished, *pair, reference=reference, delta=delta,
                                        labels=tuple(map(short_label, pair))) for pair in pairs}
        rank = {n: i for i, n in enumerate(present)}
        norm_changes = sorted(changes(finished, reference, delta), key=lambda c: rank[c.normalization])
        tables["cells"] = _cell_table(finished, "test_error")
        tables["best_val_cells"] = _cell_table(finished, "best_val_test_error")
        tables["changes"] = _ordered(as_table(norm_changes, Change))
        tables["interactions"] = as_table([x for rows in pair_rows.values() for x in rows], Interaction)
        figures["error_vs_batch_size"] = error_figure(tables["cells"], spec.name)
        if pair_rows.get(primary):
            figures["interaction_vs_batch_size"] = interaction_figure(
                as_table(pair_rows[primary], Interaction), delta, *map(short_label, primary))
        tables["trials"] = finished.sort_values(KEYS, ignore_index=True)
        answer = short_answer(pair_rows.get(primary, []), primary, reference)
        parts += [answer_section(pair_rows, primary, reference, delta)
                  + _figure_link(figures, "interaction_vs_batch_size", "the interaction against batch size"),
                  changes_section(norm_changes, reference, delta),
                  errors_section(tables["cells"], tables["best_val_cells"])
                  + _figure_link(figures, "error_vs_batch_size", "test error against batch size")]
    if diagnostics is not None:
        tables["diagnostics_layers"] = diag.layer_summary(diagnostics)
        tables["diagnostics_model"] = diag.model_summary(diagnostics)
    parts += [diagnostics_section(tables.get("diagnostics_layers"), tables.get("diagnostics_model"), delta),
              method_section(delta)]
    return StudyResult("\n\n".join(parts) + "\n", tables,
                       {name: stamp(figure, provenance) for name, figure in figures.items()}, answer)


# ---------------------------------------------------------------- formatting


def _figure_link(figures: dict[str, Figure], name: str, text: str) -> str:
    """A markdown image beside the report: report.md and the figures are written to one folder."""
    return f"\n\n![{text}]({name}.png)" if name in figures else ""


def _cell_table(finished: pd.DataFrame, measure: str) -> pd.DataFrame:
    """Cells in display order, without an MDE: a cell's mean is not tested against 0, so it would mislead."""
    return _ordered(as_table(cell_estimates(finished, measure), Cell)).drop(columns="mde")


def _num(x: float, signed: bool = False) -> str:
    return "—" if math.isnan(x) else f"{x:+.2f}" if signed else f"{x:.2f}"


def interval_text(low: float, high: float) -> str:
    """[low, high] to 2 decimals, or "—" where there is no interval (one seed)."""
    return "—" if math.isnan(low) else f"[{low:.2f}, {high:.2f}]"


def _seeds(n: int) -> str:
    return f"{n} seed{'s' * (n != 1)}"


def _ordered_names(names) -> list[str]:
    """The study's display order (NORMALIZATIONS), then any other names alphabetically."""
    names = set(names)
    return [n for n in NORMALIZATIONS if n in names] + sorted(names - set(NORMALIZATIONS))


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    """Rows in display order of normalization, then by descending batch size."""
    rank = {n: i for i, n in enumerate(_ordered_names(table["normalization"]))}
    return table.sort_values(["normalization", "batch_size"], key=lambda c: c.map(rank) if c.name == "normalization"
                             else -c, ignore_index=True)


def markdown_table(frame: pd.DataFrame) -> str:
    """frame as a GitHub markdown table; floats from 100 up as whole numbers, below with 3 significant digits,
    NaN as an em dash."""
    def cell(v) -> str:
        if isinstance(v, float):  # counts such as n_eff in the thousands in full; the rest to 3 digits
            return "—" if math.isnan(v) else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _by_verdict(records: list, what: str) -> str:
    """'degrades at 4, 2; flat at 16' from records in batch order."""
    groups: dict[str, list[str]] = {}
    for r in records:
        groups.setdefault(r.verdict, []).append(str(r.batch_size))
    return "; ".join(f"{verdict} at {what} {', '.join(sizes)}" for verdict, sizes in groups.items())


# ---------------------------------------------------------------- sections


def provenance_section(provenance: dict[str, str] | None) -> str:
    if not provenance:
        return "Provenance: not recorded (no commit, versions, command or date were given to the report)."
    return "\n".join(["Provenance:", "", *(f"- {key}: `{value}`" for key, value in provenance.items())])


def updates_table(spec: SweepSpec, trials: list, num_train: int | None) -> pd.DataFrame:
    """Per batch size: its learning rate, and the Solver's iterations per epoch and updates in all.

    The Solver runs max(num_train // batch_size, 1) iterations per epoch; without
    num_train those columns are NaN.
    """
    rows = []
    for batch in sorted({t.batch_size for t in trials}, reverse=True):
        rate = spec.base.learning_rate * (batch / spec.lr_reference_batch if spec.lr_reference_batch else 1.0)
        per_epoch = math.nan if num_train is None else max(num_train // batch, 1)
        rows.append({"batch_size": batch, "learning_rate": rate, "iterations_per_epoch": per_epoch,
                     "updates": per_epoch * spec.base.num_epochs})
    return pd.DataFrame(rows)


def design_section(spec: SweepSpec, trials: list, updates: pd.DataFrame, num_planned: int, missing: list[tuple],
                   num_train: int | None) -> str:
    base = spec.base
    norms = _ordered_names(t.normalization for t in trials)
    seeds = sorted({t.train_seed for t in trials})
    rule = (f"{base.learning_rate:g} x b/{spec.lr_reference_batch}" if spec.lr_reference_batch
            else f"{base.learning_rate:g} at every batch size")
    test_images = f"{base.num_test} test images, one image = {100 / base.num_test:.2f} points" if base.num_test \
        else "the whole test split"
    lines = [
        "## Design",
        "",
        f"Sweep `{spec.name}` on {base.dataset}: {', '.join(map(short_label, norms))} x batch size "
        f"{', '.join(map(str, updates['batch_size']))} x seeds {', '.join(map(str, seeds))}; "
        f"{base.num_epochs} epoch{'s' * (base.num_epochs != 1)} at every batch size; {base.update_rule} at learning rate {rule}"
        + (f", divided by 10 after {', '.join(f'{f:.0%}' for f in base.lr_steps)} of training" if base.lr_steps
           else "") + f"; {net_words(spec, trials, detailed=True)}; "
        + (f"{num_train} training images." if num_train else "the number of training images was not given."),
        "",
        "Measured: the test error (%) of the final model (after the last epoch) on the test split "
        f"({test_images}), in test mode: batch norm with its running statistics. The best-validation "
        "checkpoint's test error is a secondary table.",
        "",
        markdown_table(updates.rename(columns={"batch_size": "batch", "learning_rate": "learning rate",
                                               "iterations_per_epoch": "iterations per epoch"})),
        "",
    ]
    if missing:
        lines.append(f"{num_planned} trials planned, {num_planned - len(missing)} finished; {len(missing)} did not "
                     f"finish and {'is' if len(missing) == 1 else 'are'} left out: "
                     + ", ".join(f"{short_label(n)} batch {b} seed {s}" for n, b, s in missing) + ".")
    else:
        lines.append(f"All {num_planned} planned trials finished.")
    return "\n".join(lines)


def net_words(spec: SweepSpec, trials: list, detailed: bool = False) -> str:
    """The net in words: "a 3-block convnet" or, detailed, its layers and where its norms sit."""
    base = spec.base
    if base.model == "fc_net":
        short = f"a fully connected net of {base.depth} hidden layer{'s' * (base.depth != 1)}"
        return short + (f" of {base.hidden_dim} units, each affine-norm-relu" if detailed else "")
    short = "the three-layer convnet" if base.depth == 1 else f"a {base.depth}-block convnet"
    if not detailed:
        return short
    _, height, _ = IMAGE_SHAPES[base.dataset]
    maps = " / ".join(f"{height // 2 ** i}x{height // 2 ** i}" for i in range(base.depth))
    groups = (f", group norm with G={base.num_groups} ({base.num_filters // base.num_groups} channels per group)"
              if "groupnorm" in {t.normalization for t in trials} else "")
    return (f"{short}: {base.depth} conv-norm-relu-pool block{'s' * (base.depth != 1)} of {base.num_filters} "
            f"filters {base.filter_size}x{base.filter_size} (norm layers on {maps} maps), then a hidden layer of "
            f"{base.hidden_dim}{groups}")


def _interaction_statement(x: Interaction, delta: float) -> str:
    reading = read_interval(x.estimate, delta)
    e, at = x.estimate, f"At batch {x.batch_size}"
    dropped = (f" Seed{'s' * (len(x.dropped) != 1)} {', '.join(map(str, x.dropped))} left out: not finished in "
               f"all four trials." if x.dropped else "")
    if reading == NO_SEED:
        return f"{at}: cannot tell: no seed finished all four trials.{dropped}"
    if reading == ONE_SEED:
        return f"{at}: cannot tell: one seed (seed {x.seeds[0]}) finished all four trials, so no interval.{dropped}"
    interval = f"{interval_text(e.low, e.high)} ({_seeds(e.n)})"
    if reading in (ABOVE, BELOW):
        return f"{at}: {x.verdict}, by {abs(e.mean):.2f} points (95% CI {interval_text(e.low, e.high)}, {_seeds(e.n)}).{dropped}"
    if reading == WITHIN:
        return (f"{at}: no difference beyond ±{delta:g} points: the interval {interval} lies within "
                f"±{delta:g}.{dropped}")
    return (f"{at}: nothing detected and nothing ruled out: the interval {interval} contains 0 but reaches beyond "
            f"±{delta:g}. With {_seeds(e.n)} and the spread observed (sd {e.sd:.2f}), an interaction of "
            f"{e.mde:.2f} points or more would have been detected with {POWER:.0%} probability; smaller ones could "
            f"have gone unseen.{dropped}")


def _overall_null(rows: list[Interaction]) -> str:
    """When no batch size detected or ruled out anything: the smallest interaction the run could have seen."""
    if any(not x.verdict.startswith("cannot tell") for x in rows):
        return ""
    sized = [x for x in rows if not math.isnan(x.estimate.mde)]
    if not sized:
        return " Nothing can be said: no batch size has two seeds finished in all four trials."
    best = min(sized, key=lambda x: x.estimate.mde)
    return (f" Nothing was detected and nothing ruled out at any batch size: the run could not reliably detect "
            f"an interaction smaller than {best.estimate.mde:.2f} points (its smallest MDE, at batch "
            f"{best.batch_size}).")


def _pair_table(rows: list[Interaction], with_pair: bool) -> str:
    table = pd.DataFrame([{**({"against": short_label(x.b)} if with_pair else {}), "batch": x.batch_size,
                           "n": x.estimate.n, "interaction (points)": _num(x.estimate.mean, signed=True),
                           "95% CI": interval_text(x.estimate.low, x.estimate.high), "MDE": _num(x.estimate.mde),
                           "verdict": x.verdict} for x in rows])
    return markdown_table(table)


def short_answer(rows: list[Interaction], pair: tuple[str, str], reference: int) -> str:
    """The answer section's question and its "in short" line."""
    a, b = map(short_label, pair)
    question = f"Does {a} lose more than {b} as the batch shrinks from {reference}?"
    if not rows:
        return f"{question} Not answerable from this run."
    return f"{question} In short: {_by_verdict(rows, 'batch')}.{_overall_null(rows)}"


def answer_section(pair_rows: dict[tuple[str, str], list[Interaction]], pair: tuple[str, str], reference: int,
                   delta: float) -> str:
    a, b = map(short_label, pair)
    lines = [f"## The answer: does {a} lose more than {b} as the batch shrinks?", ""]
    primary = pair_rows.get(pair, [])
    if not primary:
        lines.append(f"Not answerable from this run: it needs {a} and {b} at batch {reference} and at a smaller "
                     f"batch, each with finished trials.")
    else:
        lines += [
            f"Per seed, ({a}(b) - {a}({reference})) - ({b}(b) - {b}({reference})): how many more points of test error "
            f"{a} gains than {b} when the batch shrinks from {reference} to b; positive means {a} loses more. Mean "
            f"over the seeds that finished all four trials, 95% t-interval, the smallest interaction the run could "
            f"detect (MDE, {POWER:.0%} power), and the verdict read from the interval with ±{delta:g} points as "
            f"no practical difference.",
            "",
            _pair_table(primary, with_pair=False),
            "",
            f"In short: {_by_verdict(primary, 'batch')}.{_overall_null(primary)}",
            "",
            *(f"- {_interaction_statement(x, delta)}" for x in primary),
        ]
    controls = [x for other, rows in pair_rows.items() if other != pair for x in rows]
    if controls:
        lines += ["", f"The same interaction of {a} against each other normalization run (none of them uses "
                      f"batch statistics, so each is a baseline {a}'s loss can be measured against):", "",
                  _pair_table(controls, with_pair=True)]
    return "\n".join(lines)


def changes_section(norm_changes: list[Change], reference: int, delta: float) -> str:
    lines = [f"## Each normalization's own change from batch {reference}", ""]
    if not norm_changes:
        return "\n".join([*lines, f"No normalization ran at batch {reference} and a smaller batch."])
    table = pd.DataFrame([{"normalization": LABELS.get(c.normalization, c.normalization), "batch": c.batch_size,
                           "n": c.estimate.n, "change (points)": _num(c.estimate.mean, signed=True),
                           "95% CI": interval_text(c.estimate.low, c.estimate.high), "MDE": _num(c.estimate.mde),
                           "verdict": c.verdict} for c in norm_changes])
    by_norm: dict[str, list[Change]] = {}
    for c in norm_changes:
        by_norm.setdefault(c.normalization, []).append(c)
    lines += [f"Per seed, error(b) - error({reference}), paired by seed; flat means the interval lies within "
              f"±{delta:g} points.", "", markdown_table(table), ""]
    lines += [f"- {short_label(norm)}: {_by_verdict(rows, 'batch')}." for norm, rows in by_norm.items()]
    return "\n".join(lines)


def _wide(cells: pd.DataFrame) -> pd.DataFrame:
    """A row per normalization, a column per batch size (largest first): 'mean [low, high]', n where short."""
    full = int(cells["n"].max())
    text = [f"{m:.2f} {interval_text(lo, hi)}".replace(" —", "") + ("" if n == full else f" (n={n})")
            for m, lo, hi, n in zip(cells["mean"], cells["low"], cells["high"], cells["n"])]
    wide = cells.assign(text=text).pivot(index="normalization", columns="batch_size", values="text")
    wide = wide[sorted(wide.columns, reverse=True)].reindex(_ordered_names(wide.index)).fillna("")
    wide.columns = [f"batch {b}" for b in wide.columns]
    return wide.rename(index=lambda n: LABELS.get(n, n)).rename_axis("normalization").reset_index()


def errors_section(cells: pd.DataFrame, best: pd.DataFrame) -> str:
    paper = pd.DataFrame(PAPER_ERROR).T.reindex(columns=list(BATCH_SIZES))
    paper = paper.map(lambda v: "" if pd.isna(v) else f"{v:.1f}")
    paper.columns = [f"batch {b}" for b in paper.columns]
    paper = paper.rename(index=LABELS).rename_axis("normalization").reset_index()
    lines = ["## Test error (%) of the final model: mean and 95% CI over seeds", "",
             f"Over {_seeds(int(cells['n'].max()))}; (n=k) marks a cell with fewer finished trials.", "",
             markdown_table(_wide(cells)), "", f"The paper ({PAPER_CITATION}):", "", markdown_table(paper), "",
             "## Secondary: the best-validation checkpoint's test error (%)", ""]
    if best.empty:
        lines.append("Not recorded for these trials.")
    else:
        lines.append(markdown_table(_wide(best)))
    return "\n".join(lines)


def diagnostics_section(layers: pd.DataFrame | None, model: pd.DataFrame | None, delta: float) -> str:
    lines = ["## Why: the normalization statistics", ""]
    if layers is None:
        return "\n".join([*lines, "No diagnostics were recorded for this run: the report cannot say why the "
                                  "normalizations behaved as they did."])
    lines += [f"- {sentence}" for sentence in diag.explanations(layers, model, delta)]
    for title, table in (("Per norm layer, median over seeds", layers), ("Whole model, median over seeds", model)):
        if not table.empty:
            lines += ["", f"{title}:", "", markdown_table(table)]
    return "\n".join(lines)


def method_section(delta: float) -> str:
    return "\n".join([
        "## How to read the verdicts",
        "",
        "- Every interval is a 95% t-interval over seeds (n - 1 degrees of freedom); a comparison is paired by "
        "seed, so only seeds finished in every cell it uses count, and n says how many.",
        f"- Verdicts come from the interval, never the mean alone: wholly above 0 is a detected rise (degrades, "
        f"or the first normalization loses more), wholly below 0 a detected fall; an interval containing 0 and "
        f"lying within ±{delta:g} points (bounds included) rules out a practical difference (flat, or no "
        f"difference); anything else cannot tell. A detected rise or fall takes precedence over 'within "
        f"±{delta:g}': an interval such as [0.10, 0.30] is reported as a change, a small one.",
        f"- MDE: the smallest true effect a two-sided paired t-test at alpha 0.05 detects with {POWER:.0%} power, "
        f"given n and the observed sd of the paired differences (noncentral t). With few seeds the observed sd is "
        f"itself uncertain, so the MDE is a guide, not a guarantee. One seed gives no interval and no MDE.",
        "- Each interval is read on its own, with no correction for the many read here: where nothing is going on, "
        "about 1 in 20 of them still excludes 0 by chance. A lone detection among many null cells is weak evidence.",
    ])
