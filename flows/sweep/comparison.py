"""What a grid that is not a study says: BN against GN (or whatever normalizations it ran) at each value of its
other swept fields, over seeds, with intervals.

The measure is the study's and the Group Normalization paper's: the test error (%) of
each trial's final net (after its last epoch, in test mode). A cell is one
normalization at one combination of the other swept fields (a batch size, say): its
mean over the seeds that finished and the 95% t-interval. A difference row puts the
reference normalization (batch norm, when run) against each other one in the same
column, paired by seed: per seed, error(reference) - error(other), so that what the
two trials of a seed share (the minibatch order) cancels. Positive: the reference has
more error, the other normalization beats it by that many points. Verdicts are read
from the interval, as the study's are (flows.study.statistics).

``choose`` is the one rule that picks a configuration from a sweep: the lowest mean
validation error of the final nets over seeds, never the test error (the test split
measures; it does not choose).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from ..config import SweepSpec, TrainConfig
from ..study import NORMALIZATIONS, short_label
from ..study.statistics import ABOVE, BELOW, DELTA, NO_SEED, ONE_SEED, WITHIN, estimate, read_interval
from ..tracking import FINISHED
from .results import TrialResult

SEED = "train_seed"
REFERENCE = "batchnorm"
SMOKE_TEST_SEEDS = 3  # fewer seeds than this per cell: the intervals say little


@dataclass(frozen=True)
class Comparison:
    """A grid's answer: cells and paired differences as tables, their title and the answer in words.

    columns: the swept fields other than normalization and the seed, whose values
    make the table's columns (batch size, for BN against GN); empty when only
    normalization (and seeds) were swept.
    """

    title: str
    columns: list[str]
    cells: pd.DataFrame  # normalization, <columns>, column, trials, n, mean, sd, low, high
    differences: pd.DataFrame  # reference, other, label, <columns>, column, n, mean, sd, low, high, mde, verdict
    answer: str
    seeds: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Choice:
    """The configuration a rule picked, and what it was picked against (labels and mean validation errors)."""

    config: TrainConfig  # the chosen trials' configuration, at the first seed
    label: str  # its swept values in words, e.g. "groupnorm"
    val_error: float  # mean validation error (%) of its final nets
    n: int
    others: list[tuple[str, float, int]]  # (label, mean validation error, n) of each configuration not chosen
    rule: str  # the rule in words

    def as_record(self) -> dict:
        """Plain data, for a report that scripts read (--output json)."""
        return {"label": self.label, "val_error": self.val_error, "n": self.n, "rule": self.rule,
                "others": [{"label": label, "val_error": error, "n": n} for label, error, n in self.others],
                "config": self.config.model_dump()}


def compare(spec: SweepSpec, results: list[TrialResult]) -> Comparison:
    """The comparison of a grid's finished trials (failed ones count in `trials`, not in n)."""
    columns = column_fields(spec)
    finished = [r for r in results if r.status == FINISHED and r.final_test_acc is not None]
    seeds = sorted({r.config.train_seed for r in finished})
    # With only normalization (and seeds) swept, the one column is named for the batch size the trials share.
    batch_sizes = {r.config.batch_size for r in results}
    only = f"batch {batch_sizes.pop()}" if len(batch_sizes) == 1 else "all"
    cells = _cells(results, columns, only)
    differences = _differences(finished, columns, only)
    return Comparison(_title(cells, seeds, differences), columns, cells, differences,
                      _answer(differences, cells), seeds)


def column_fields(spec: SweepSpec) -> list[str]:
    """The swept fields besides normalization and the seed, in the space's order."""
    return [k for k in spec.swept() if k not in ("normalization", SEED)]


def column_label(columns: list[str], values: tuple, only: str = "all") -> str:
    """"batch 32" for one batch size, "learning_rate 0.001" for one other field, "k=v, ..." for several; only
    when no field besides normalization and the seed was swept."""
    if not columns:
        return only
    if len(columns) == 1:
        name = "batch" if columns[0] == "batch_size" else columns[0]
        return f"{name} {_value(values[0])}"
    return ", ".join(f"{k}={_value(v)}" for k, v in zip(columns, values))


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _ordered_columns(columns: list[str], keys) -> list[tuple]:
    """Column values in display order: batch sizes largest first (as the paper's table), others as run."""
    keys = list(dict.fromkeys(keys))
    if columns == ["batch_size"]:
        return sorted(keys, key=lambda k: -k[0])
    return keys


def _norm_rank(norm: str) -> int:
    return NORMALIZATIONS.index(norm) if norm in NORMALIZATIONS else len(NORMALIZATIONS)


def _percent_error(accuracy: float) -> float:
    return 100.0 * (1.0 - accuracy)


def _cells(results: list[TrialResult], columns: list[str], only: str) -> pd.DataFrame:
    groups: dict[tuple, list[TrialResult]] = {}
    for r in sorted(results, key=lambda r: r.index):
        key = (r.config.normalization, *(getattr(r.config, k) for k in columns))
        groups.setdefault(key, []).append(r)
    order = _ordered_columns(columns, [k[1:] for k in groups])
    rows = []
    for key in sorted(groups, key=lambda k: (_norm_rank(k[0]), order.index(k[1:]))):
        trials = groups[key]
        errors = [_percent_error(r.final_test_acc) for r in trials
                  if r.status == FINISHED and r.final_test_acc is not None]
        found = estimate(errors)
        rows.append({"normalization": key[0], **dict(zip(columns, key[1:])),
                     "column": column_label(columns, key[1:], only), "trials": len(trials), "n": found.n,
                     "mean": found.mean, "sd": found.sd, "low": found.low,
                     "high": found.high})
    return pd.DataFrame(rows, columns=["normalization", *columns, "column", "trials", "n", "mean", "sd", "low",
                                       "high"])


def _differences(finished: list[TrialResult], columns: list[str], only: str) -> pd.DataFrame:
    """reference - other per seed, in every column where both ran; reference is batch norm, else the first run."""
    by_cell: dict[tuple, dict[int, float]] = {}
    for r in finished:
        key = (r.config.normalization, *(getattr(r.config, k) for k in columns))
        by_cell.setdefault(key, {})[r.config.train_seed] = _percent_error(r.final_test_acc)
    norms = sorted({k[0] for k in by_cell}, key=_norm_rank)
    names = ["reference", "other", "label", *columns, "column", "n", "mean", "sd", "low", "high", "mde", "verdict"]
    if len(norms) < 2:
        return pd.DataFrame([], columns=names)
    reference = REFERENCE if REFERENCE in norms else norms[0]
    rows = []
    for other in (n for n in norms if n != reference):
        for values in _ordered_columns(columns, [k[1:] for k in by_cell]):
            a, b = by_cell.get((reference, *values)), by_cell.get((other, *values))
            if not a or not b:
                continue
            paired = [a[s] - b[s] for s in sorted(set(a) & set(b))]
            found = estimate(paired)
            rows.append({"reference": reference, "other": other,
                         "label": f"{short_label(reference)} − {short_label(other)}",
                         **dict(zip(columns, values)), "column": column_label(columns, values, only), "n": found.n,
                         "mean": found.mean, "sd": found.sd, "low": found.low, "high": found.high, "mde": found.mde,
                         "verdict": _verdict(found, reference, other)})
    return pd.DataFrame(rows, columns=names)


def _verdict(found, reference: str, other: str) -> str:
    """What a difference's interval says, in a few words."""
    reading = read_interval(found, DELTA)
    a, b = short_label(reference), short_label(other)
    return {ABOVE: f"{b} better", BELOW: f"{a} better", WITHIN: f"no difference beyond ±{DELTA:g}",
            ONE_SEED: "one seed: no interval", NO_SEED: "no seed in both"}.get(reading, "cannot tell")


def _title(cells: pd.DataFrame, seeds: list[int], differences: pd.DataFrame) -> str:
    n = int(cells["n"].max()) if len(cells) else 0
    over = (f"mean and 95% CI over {n} seeds (train_seed {_seed_range(seeds)})" if n > 1
            else "one seed per cell, so no interval")
    title = f"Test error (%) of the final nets: {over}"
    if len(differences):
        first = differences.iloc[0]
        title += f"; {first['label']}: paired by seed (positive: {short_label(first['other'])} better)"
    return title


def _seed_range(seeds: list[int]) -> str:
    if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _answer(differences: pd.DataFrame, cells: pd.DataFrame) -> str:
    """The differences in one paragraph: where one normalization beat the other and by how much, where the
    intervals cannot tell (and how large a difference could have gone unseen there)."""
    if cells.empty or cells["n"].max() == 0:
        return "No trial finished: there is nothing to compare."
    if differences.empty:
        return ("Nothing to compare: the grid ran one normalization." if cells["normalization"].nunique() == 1
                else "Nothing to compare: no column has two normalizations finished.")
    sentences = []
    for (reference, other), rows in differences.groupby(["reference", "other"], sort=False):
        a, b = short_label(reference), short_label(other)
        parts = []
        # What was detected first, then what was ruled out, then what the intervals cannot tell.
        rank = {f"{a} better": 0, f"{b} better": 0, f"no difference beyond ±{DELTA:g}": 1, "cannot tell": 2}
        groups = sorted(rows.groupby("verdict", sort=False), key=lambda g: rank.get(g[0], 3))
        for verdict, group in groups:
            if verdict in (f"{a} better", f"{b} better"):
                winner, loser = (b, a) if verdict == f"{b} better" else (a, b)
                parts.append(f"{winner} beats {loser} " + " and ".join(
                    f"at {r['column']} by {abs(r['mean']):.2f} points (95% CI {_magnitude(r['low'], r['high'])}, "
                    f"n={r['n']})" for _, r in group.iterrows()))
            elif verdict.startswith("no difference"):
                parts.append(f"no difference beyond ±{DELTA:g} points at {_columns_text(group['column'])}")
            elif verdict == "cannot tell":
                low, high = group["mde"].min(), group["mde"].max()
                unseen = f"{low:.1f}" if f"{low:.1f}" == f"{high:.1f}" else f"{low:.1f}-{high:.1f}"
                parts.append(f"cannot tell at {_columns_text(group['column'])} (the intervals contain 0; a "
                             f"difference under {unseen} points could go unseen)")
            else:
                parts.append(f"{verdict} at {_columns_text(group['column'])}")
        sentences.append(f"{a} against {b}: " + "; ".join(parts) + ".")
    n = int(cells["n"].max())
    if n < SMOKE_TEST_SEEDS:
        sentences.append(f"Only {n} seed{'s' * (n != 1)} per cell: a smoke test, whose intervals mean little.")
    return " ".join(sentences)


def _magnitude(low: float, high: float) -> str:
    """A difference's interval as the winner's margin: "0.21 to 1.53" for [-1.53, -0.21] as for [0.21, 1.53]."""
    low, high = sorted((abs(low), abs(high)))
    return f"{low:.2f} to {high:.2f}"


def _columns_text(columns: pd.Series) -> str:
    """"batch 32, 8" from the columns "batch 32" and "batch 8"; other labels joined as they are."""
    labels = list(columns)
    if all(label.startswith("batch ") for label in labels):
        return "batch " + ", ".join(label.removeprefix("batch ") for label in labels)
    return ", ".join(labels)


# ---------------------------------------------------------------- the table as it is read


def wide_rows(cells: list[dict], differences: list[dict]) -> list[dict]:
    """The comparison as it is read: a row per normalization, then a row per difference ("BN − GN"), a column
    per value of the other swept fields ("batch 32", ...). A cell reads "mean [low, high]", with (n=k) where
    fewer seeds finished than elsewhere; a difference "+mean [low, high] n=k". The row name is under key ""."""
    full = max((c["n"] for c in cells), default=0)
    order = list(dict.fromkeys(c["column"] for c in cells))
    rows: dict[str, dict[str, str]] = {}
    for c in cells:
        text = "—" if c["n"] == 0 else f"{c['mean']:.2f}{_interval(c['low'], c['high'])}"
        rows.setdefault(c["normalization"], {})[c["column"]] = text + ("" if c["n"] in (0, full) else f" (n={c['n']})")
    for d in differences:
        rows.setdefault(d["label"], {})[d["column"]] = f"{d['mean']:+.2f}{_interval(d['low'], d['high'])} n={d['n']}"
    return [{"": name, **{column: row.get(column, "") for column in order}} for name, row in rows.items()]


def _interval(low: float, high: float) -> str:
    """" [low, high]" to 2 decimals, or nothing where there is no interval (one seed)."""
    return "" if low is None or low != low else f" [{low:.2f}, {high:.2f}]"  # low != low: NaN


# ---------------------------------------------------------------- the one rule that picks


def choose(spec: SweepSpec, results: list[TrialResult], batch_size: int | None = None) -> Choice | None:
    """The configuration (swept values but the seed) with the lowest mean validation error of its final nets,
    over its finished seeds, among the trials at batch_size (all trials when None); None when none finished.

    Ties go to the configuration run first.
    """
    keys = [k for k in spec.swept() if k != SEED] or ["normalization"]
    groups: dict[tuple, list[TrialResult]] = {}
    for r in sorted(results, key=lambda r: r.index):
        if r.status != FINISHED or r.final_val_acc is None:
            continue
        if batch_size is not None and r.config.batch_size != batch_size:
            continue
        groups.setdefault(tuple(getattr(r.config, k) for k in keys), []).append(r)
    if not groups:
        return None
    scored = [(key, sum(_percent_error(r.final_val_acc) for r in rs) / len(rs), rs) for key, rs in groups.items()]
    best_key, best_error, best_runs = min(scored, key=lambda s: s[1])
    shown = [k for k in keys if batch_size is None or k != "batch_size"] or keys

    def label(key: tuple) -> str:
        values = dict(zip(keys, key))
        return ", ".join(str(values[k]) if k == "normalization" else f"{k}={_value(values[k])}" for k in shown)

    where = f"at batch {batch_size}" if batch_size is not None else "among all trials"
    rule = (f"the lowest validation error {where} (final nets, mean over seeds; the test split is never used "
            f"to choose)")
    if any(abs(error - best_error) < 1e-9 for key, error, _ in scored if key != best_key):
        rule += "; a tie goes to the configuration run first"
    return Choice(config=best_runs[0].config, label=label(best_key), val_error=best_error, n=len(best_runs),
                  others=[(label(k), e, len(rs)) for k, e, rs in scored if k != best_key], rule=rule)


def choice_text(record: dict | None) -> str:
    """A choice (Choice.as_record) in one line: what was picked, on which numbers, by which rule."""
    if record is None:
        return "no trial finished with a validation score: nothing to choose"
    against = "; ".join(f"{o['label']} {o['val_error']:.2f}%" for o in record["others"])
    return (f"{record['label']}: validation error {record['val_error']:.2f}% (mean of {record['n']} final nets)"
            + (f", against {against}" if against else "") + f"; the rule: {record['rule']}")
