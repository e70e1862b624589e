"""The dose-response report: across the normalization-batch presets, when does batch norm start to lose?

Each normalization-batch preset (DOSE_PRESETS) measures, per g, batch norm's extra
error against g = 32 (paired by seed, Holm-corrected over its g values) and, per norm
layer, the statistics noise reaching the layer's output (diagnostics.NOISE) and the
values each statistic pools. This report puts every (preset, g) on one figure: the
extra error, with its 95% interval, against the largest noise over the net's norm
layers at that g, and against the fewest values pooled per channel, and reads where
the losses begin: the least noise at which a loss is detected, the most noise at
which none is, and how much BN can lose below that (one-sided bounds).

It is built from the presets' exported folders (trials.csv and
diagnostics_layers.csv, as `cnnflow report NAME --to docs/studies/NAME` writes them):

    python -m flows.study.dose_response --studies docs/studies --to docs/studies/dose-response

`make studies` runs it after the presets.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from .diagnostics import NOISE
from .figures import DIFFERENCE_RANGE, clamp_axis, interval_bars, stamp
from .presets import DOSE_PRESETS, preset_spec
from .render import estimate_text, markdown_table, number, report_html
from .report import StudyResult
from .design import net_words, provenance_section
from .sections import SMOKE_SEEDS, label, smoke_banner, smoke_prefix
from .statistics import ALPHA, DELTA, changes, differences, reference_batch
from .trials import NORM_BATCH, arms, require_records


@dataclass(frozen=True)
class Point:
    """One preset at one g: BN's extra error against the reference, GN (or LN) against BN, and the diagnostics."""

    preset: str
    net: str
    g: int
    reference: int
    n: int
    extra: float
    low: float
    high: float
    upper: float
    mde: float
    p_holm: float
    versus: str  # the norm batch norm is compared with
    gap: float  # BN(g) - versus, and its interval
    gap_low: float
    gap_high: float
    noise: float  # the largest over the norm layers, median over seeds
    noise_layer: int
    pooled: float  # the fewest values a statistic pools per channel, over the norm layers

    @property
    def detected(self) -> bool:
        return not math.isnan(self.p_holm) and self.p_holm < ALPHA and self.extra > 0


def preset_points(name: str, records: pd.DataFrame, layers: pd.DataFrame | None) -> list[Point]:
    """A normalization-batch preset's points: batch norm's change from the reference at every smaller g."""
    spec = preset_spec(name)
    long = arms(require_records(records), NORM_BATCH)
    reference = reference_batch(long)
    versus = next((n for n in ("groupnorm", "layernorm") if n in set(long["normalization"])), None)
    gaps = {d.norm_batch: d for d in differences(long, "batchnorm", versus)} if versus else {}
    points = []
    for change in (c for c in changes(long, reference, DELTA) if c.normalization == "batchnorm"):
        e, gap = change.estimate, gaps.get(change.norm_batch)
        noise, layer, pooled = _diagnostics_at(layers, change.norm_batch)
        points.append(Point(name, net_words(spec, spec.trials()), change.norm_batch, reference, e.n, e.mean, e.low,
                            e.high, e.upper, e.mde, change.p_holm, label(versus) if versus else "",
                            gap.estimate.mean if gap else math.nan, gap.estimate.low if gap else math.nan,
                            gap.estimate.high if gap else math.nan, noise, layer, pooled))
    return points


def _diagnostics_at(layers: pd.DataFrame | None, g: int) -> tuple[float, int, float]:
    """(largest noise over batch norm's layers at g, its layer, fewest values pooled per channel); NaN where
    not measured."""
    if layers is None or layers.empty:
        return math.nan, 0, math.nan
    rows = layers[(layers["normalization"] == "batchnorm") & (layers["norm_batch"] == g)]
    pooled = float(rows["nominal"].min()) if "nominal" in rows.columns and not rows.empty else math.nan
    if NOISE not in rows.columns or rows[NOISE].isna().all():
        return math.nan, 0, pooled
    worst = rows.loc[rows[NOISE].idxmax()]
    return float(worst[NOISE]), int(worst["layer"]), pooled


def points_table(points: list[Point]) -> pd.DataFrame:
    return pd.DataFrame([{**p.__dict__, "detected": p.detected} for p in points])


def reading(points: list[Point]) -> list[str]:
    """The sentences a user needs: where the losses begin in statistics noise, by how much, and what the nets
    that never lose can lose at most."""
    if not points:
        return ["No normalization-batch preset has finished trials: nothing to read."]
    lines = []
    detected = [p for p in points if p.detected]
    quiet = [p for p in points if not p.detected and p.n >= 2]
    measured = [p for p in points if not math.isnan(p.noise)]
    if detected and measured:
        least = min((p for p in detected if not math.isnan(p.noise)), key=lambda p: p.noise, default=None)
        most_quiet = max((p for p in quiet if not math.isnan(p.noise)), key=lambda p: p.noise, default=None)
        if least is not None:
            lines.append(f"The least statistics noise at which batch norm's loss is detected (Holm over each "
                         f"preset's g values): {100 * least.noise:.1f}% ({least.net}, g = {least.g}: "
                         f"{_extra(least)}).")
        if most_quiet is not None:
            lines.append(f"The most statistics noise at which no loss is detected: {100 * most_quiet.noise:.1f}% "
                         f"({most_quiet.net}, g = {most_quiet.g}: at most {most_quiet.upper:+.2f} points, one-sided "
                         f"95%).")
        if least is not None and most_quiet is not None:
            if most_quiet.noise < least.noise:
                lines.append(f"So, on these nets, batch norm starts to lose between {100 * most_quiet.noise:.1f}% "
                             f"and {100 * least.noise:.1f}% statistics noise at its noisiest layer; below "
                             f"{100 * most_quiet.noise:.1f}% no loss is detected, and none larger than "
                             f"{max(p.upper for p in quiet if p.noise <= most_quiet.noise):+.2f} points is left "
                             f"plausible by the intervals.")
            else:
                lines.append(f"The noise does not separate them: a loss is detected at {100 * least.noise:.1f}% "
                             f"while none is at {100 * most_quiet.noise:.1f}%, so the noise at one layer is not "
                             f"the whole story on these nets.")
    elif detected:
        lines.append("Losses are detected, but no output-noise diagnostic was recorded to place them.")
    else:
        lines.append("No preset shows a detected loss at any g.")
    degenerate = [p for p in points if p.pooled == 2]
    for p in degenerate:
        lines.append(f"At g = {p.g} the statistics of {p.net} pool 2 values per channel: normalised over 2 values "
                     f"each feature is about ±1 whatever the values, so its {_extra(p)} measure a degenerate net, not "
                     f"a noisy one.")
    for net in dict.fromkeys(p.net for p in points):
        mine = [p for p in points if p.net == net]
        if mine and not any(p.detected for p in mine):
            smallest = min(mine, key=lambda p: p.g)
            lines.append(f"{net[0].upper()}{net[1:]} shows no loss down to g = {smallest.g}: batch norm's extra "
                         f"error there is at most {smallest.upper:+.2f} points (one-sided 95%, n={smallest.n}); "
                         f"its largest bound over g is {max(p.upper for p in mine):+.2f}.")
        elif mine:
            lost = [p for p in mine if p.detected]
            lines.append(f"{net[0].upper()}{net[1:]} loses at g = {', '.join(str(p.g) for p in lost)}: "
                         + "; ".join(f"{_extra(p)} at g = {p.g}" for p in lost) + ".")
    return lines


def _extra(p: Point) -> str:
    interval = "" if math.isnan(p.low) else f" [{p.low:.2f}, {p.high:.2f}]"
    return f"{p.extra:+.2f} points{interval}, n={p.n}"


def dose_figure(points: list[Point]) -> Figure:
    """BN's extra error against the statistics noise (left) and the values pooled per channel (right), one
    series per preset, each point's 95% interval as an error bar."""
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    table = points_table(points)
    for ax, x, xlabel in ((axes[0], "noise", "statistics noise at the noisiest norm layer (%)"),
                          (axes[1], "pooled", "fewest values a batch-norm statistic pools per channel")):
        ax.axhline(0.0, color="0.3", lw=1)
        ax.axhspan(-DELTA, DELTA, color="0.9")
        for i, (net, rows) in enumerate(table.groupby("net", sort=False)):
            rows = rows.dropna(subset=[x]).sort_values(x)
            if rows.empty:
                continue
            values = rows[x] * (100 if x == "noise" else 1)
            interval_bars(ax, values, rows["extra"], rows["low"], rows["high"], fmt="o-", color=f"C{i}", label=net)
            for v, y, g in zip(values, rows["extra"], rows["g"]):
                ax.annotate(f"g={g}", (v, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        if x == "pooled":
            ax.invert_xaxis()
        ax.set_xlabel(xlabel)
        clamp_axis(ax, table["low"].fillna(table["extra"]), table["high"].fillna(table["extra"]), DIFFERENCE_RANGE)
        if table["high"].fillna(table["extra"]).max() > 10:
            # A degenerate net's tens of points would flatten every other point onto 0: linear within ±1, log beyond.
            ax.set_yscale("symlog", linthresh=1.0)
    axes[0].set_ylabel("BN's extra error at g against g = 32 (points)")
    axes[0].legend(fontsize=7)
    fig.suptitle("When does batch norm lose? Mean and 95% CI over seeds, paired by seed, at each g "
                 "(SGD batch fixed)", fontsize=10)
    return fig


def build_dose_response(studies: dict[str, tuple[pd.DataFrame, pd.DataFrame | None]],
                        provenance: dict[str, str] | None = None) -> StudyResult:
    """The report from {preset: (trial records, per-layer diagnostics summary or None)}."""
    points = [p for name, (records, layers) in studies.items() for p in preset_points(name, records, layers)]
    table = points_table(points)
    figures = {"dose_response": dose_figure(points)} if points else {}
    seeds = max((p.n for p in points), default=0)
    smoke = 0 < seeds < SMOKE_SEEDS
    sentences = reading(points)
    lines = ["# When does batch norm lose? Dose-response across the normalization-batch presets", "",
             *([smoke_banner(seeds, "the full presets"), ""] if smoke else []),
             "## The answer", "", *(f"- {line}" for line in sentences), ""]
    if points:
        lines += ["![BN's extra error against statistics noise and values pooled](dose_response.png)", "",
                  "## Every preset at every g", "",
                  "Per seed, BN(g) - BN(32) in points of each preset's measure (the mean test error over its tail "
                  "evaluations), mean and 95% t-interval, n seeds; Holm's correction over each preset's g values; "
                  "at most: the one-sided 95% upper bound. Noise: the statistics noise reaching the noisiest batch "
                  "norm layer's output (RMS of train-mode output minus output under population statistics, "
                  "relative to the latter, median over seeds). Pooled: the fewest values a statistic pools per "
                  "channel over the net's norm layers (g x H x W).", "",
                  markdown_table(pd.DataFrame([{
                      "net": p.net, "g": p.g, "pooled": f"{p.pooled:,.0f}" if not math.isnan(p.pooled) else "—",
                      "noise": "—" if math.isnan(p.noise) else f"{100 * p.noise:.1f}% (layer {p.noise_layer})",
                      "BN(g) - BN(32)": estimate_text(p.extra, p.low, p.high, p.n, signed=True),
                      "at most": number(p.upper, signed=True), "MDE": number(p.mde),
                      "Holm p": "—" if math.isnan(p.p_holm) else f"{p.p_holm:.2g}",
                      "detected": "loss" if p.detected else "no",
                      f"BN(g) - other": "—" if math.isnan(p.gap) else
                      f"{p.gap:+.2f} [{p.gap_low:.2f}, {p.gap_high:.2f}] vs {p.versus}"} for p in points])), ""]
    lines += [f"Presets read: {', '.join(studies) or 'none'}; missing: "
              f"{', '.join(n for n in DOSE_PRESETS if n not in studies) or 'none'}.", "",
              provenance_section(provenance)]
    markdown = "\n".join(lines) + "\n"
    return StudyResult(markdown, {"points": table}, {k: stamp(f, provenance) for k, f in figures.items()},
                       answer=(smoke_prefix(seeds) if smoke else "") + " ".join(sentences),
                       answer_figure="dose_response" if figures else "")


def read_studies(folder: Path, names=DOSE_PRESETS) -> dict[str, tuple[pd.DataFrame, pd.DataFrame | None]]:
    """The exported presets under folder that have a trials.csv: {name: (records, layers or None)}."""
    found = {}
    for name in names:
        trials = folder / name / "trials.csv"
        if trials.exists():
            layers = folder / name / "diagnostics_layers.csv"
            found[name] = (pd.read_csv(trials), pd.read_csv(layers) if layers.exists() else None)
    return found


def write(result: StudyResult, dest: Path) -> None:
    """report.md (figures beside it), report.html (figures embedded), the figures and the tables into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "report.md").write_text(result.markdown)
    (dest / "report.html").write_text(report_html(result.markdown, result.pngs))
    for name, png in result.pngs.items():
        (dest / f"{name}.png").write_bytes(png)
    for name, table in result.tables.items():
        table.to_csv(dest / f"{name}.csv", index=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.study.dose_response", description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=Path, default=Path("docs/studies"),
                        help="folder holding the presets' exported reports (default docs/studies)")
    parser.add_argument("--to", type=Path, default=Path("docs/studies/dose-response"),
                        help="folder to write the report into (default docs/studies/dose-response)")
    parser.add_argument("--suffix", default="", help="read <preset><suffix> folders, e.g. --suffix=-small")
    args = parser.parse_args(argv)
    from ..provenance import provenance

    studies = read_studies(args.studies, [f"{n}{args.suffix}" for n in DOSE_PRESETS])
    studies = {name.removesuffix(args.suffix) if args.suffix else name: value for name, value in studies.items()}
    if not studies:
        print(f"no normalization-batch preset found under {args.studies} ({', '.join(DOSE_PRESETS)}): run them "
              f"first (make studies)", file=sys.stderr)
        return 1
    suffix = f" --suffix={args.suffix}" if args.suffix else ""  # "=": a value that starts with "-"
    result = build_dose_response(studies, provenance(
        f"python -m flows.study.dose_response --studies {args.studies}{suffix} --to {args.to}"))
    write(result, args.to)
    print(result.answer)
    print(f"written to {args.to}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
