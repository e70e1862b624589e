"""The study's statistics: means over seeds with 95% t-intervals, paired changes, the interaction, verdicts.

Every number the study reports is a mean over seeds. A cell (normalization x batch
size) gets its mean error and 95% t-interval. A normalization's change from the
reference batch to batch b is the per-seed difference error(b) - error(ref), paired
by seed: a seed's initialisation and minibatch order are shared across batch sizes,
so pairing removes what the two trials have in common. The interaction at batch b
is, per seed, (A_b - A_ref) - (B_b - B_ref), using only seeds present in all four
cells: how much more A loses than B when the batch shrinks from ref to b.

Verdicts are read from intervals, never from a point estimate: an interval wholly
above 0 is a detected rise, wholly below 0 a detected fall; an interval containing
0 but lying within +-delta rules out any change larger than delta; anything else
cannot tell. A detected rise or fall takes precedence over "within +-delta": an
interval such as [0.1, 0.3] with delta 0.5 excludes 0, so the change is reported
as detected (though smaller than delta), not as flat.

The smallest detectable effect (MDE) of each paired comparison is the true mean
difference that a two-sided paired t-test at alpha 0.05 detects with 80% power,
given n and the observed sd of the paired differences (noncentral t).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import pandas as pd
from scipy import optimize, stats

from cnncore.checks import require_int, require_real

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE  # the paired t-test that matches the 95% interval
POWER = 0.80
DELTA = 0.5  # points of error: a change smaller than this is of no practical interest on these nets
MEASURES = ("test_error", "best_val_test_error")
KEYS = ["normalization", "batch_size", "seed"]

# What an interval says, before it is put into a comparison's words.
ABOVE, BELOW, WITHIN, UNCLEAR, ONE_SEED, NO_SEED = "above", "below", "within", "unclear", "one seed", "no seed"


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds: n values, their mean, sample sd (ddof=1), 95% t-interval [low, high] and MDE.

    n = 0: every field but n is NaN. n = 1: mean is the value; sd, low, high and mde
    are NaN (one value says nothing about its spread). sd = 0 gives the interval
    [mean, mean] and mde 0.
    """

    n: int
    mean: float
    sd: float
    low: float
    high: float
    mde: float


@dataclass(frozen=True)
class Cell:
    """One normalization x batch size: the measure's estimate over the seeds that finished."""

    normalization: str
    batch_size: int
    measure: str
    seeds: tuple[int, ...]
    estimate: Estimate


@dataclass(frozen=True)
class Change:
    """A normalization's paired change error(batch_size) - error(reference), over the seeds run at both."""

    normalization: str
    batch_size: int
    reference: int
    seeds: tuple[int, ...]
    estimate: Estimate
    verdict: str  # degrades, improves, flat, cannot tell (with the reason when there is no interval)


@dataclass(frozen=True)
class Interaction:
    """(a_b - a_ref) - (b_b - b_ref) per seed, over the seeds present in all four cells.

    Positive: a loses more than b when the batch shrinks from reference to batch_size.
    dropped: seeds that finished in some of the four cells but not all.
    """

    a: str
    b: str
    batch_size: int
    reference: int
    seeds: tuple[int, ...]
    dropped: tuple[int, ...]
    estimate: Estimate
    verdict: str


def minimum_detectable_effect(n: int, sd: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean difference a two-sided paired t-test detects with the given power.

    n: paired differences (>= 2; fewer gives NaN: a t-test needs an estimate of the
    spread); sd: their standard deviation, taken as the true one. Solves
    P(|T| > t_crit) = power for T ~ noncentral t(n - 1, nc), then MDE = nc * sd / sqrt(n).
    """
    n = require_int("n", n, minimum=0)
    sd = require_real("sd", sd, low=0)
    alpha = require_real("alpha", alpha, low=0, high=1, low_open=True, high_open=True)
    power = require_real("power", power, low=alpha, high=1, low_open=True, high_open=True)
    if n < 2:
        return math.nan
    if sd == 0:
        return 0.0
    df = n - 1
    critical = stats.t.ppf(1 - alpha / 2, df)

    def shortfall(nc: float) -> float:
        # P(T < -c | nc) written as P(T > c | -nc): scipy's nct.cdf far in the lower tail returns NaN
        # (seen at df = 1, nc near 11), while sf stays finite there.
        return stats.nct.sf(critical, df, nc) + stats.nct.sf(critical, df, -nc) - power

    high = critical + 1.0
    while shortfall(high) < 0:  # at nc = 0 the power is alpha < power; widen until it passes power
        high *= 2
    nc = optimize.brentq(shortfall, 0.0, high, xtol=1e-12, rtol=1e-14)
    return nc * sd / math.sqrt(n)


def estimate(values) -> Estimate:
    """Mean, sd, 95% t-interval and MDE of values (one per seed; NaNs are not allowed here)."""
    x = np.asarray(values, dtype=float)
    if np.isnan(x).any():
        raise ValueError(f"values must have no NaN (drop unfinished trials first), got {x.tolist()}")
    n = x.size
    if n == 0:
        return Estimate(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return Estimate(1, mean, math.nan, math.nan, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * sd / math.sqrt(n)
    return Estimate(n, mean, sd, float(mean - half), float(mean + half), minimum_detectable_effect(n, sd))


def read_interval(est: Estimate, delta: float = DELTA) -> str:
    """What the interval says: ABOVE 0, BELOW 0, WITHIN +-delta (containing 0), UNCLEAR, ONE_SEED, NO_SEED.

    Bounds are inclusive for WITHIN (an interval touching +delta is within) and
    exclusive for ABOVE/BELOW (a lower bound of exactly 0 is not above 0). ABOVE and
    BELOW take precedence over WITHIN: a change detected is reported even when small.
    """
    delta = require_real("delta", delta, low=0)
    if est.n == 0:
        return NO_SEED
    if est.n == 1:
        return ONE_SEED
    if est.low > 0:
        return ABOVE
    if est.high < 0:
        return BELOW
    if -delta <= est.low and est.high <= delta:
        return WITHIN
    return UNCLEAR


def _cannot_tell(reading: str) -> str:
    return f"cannot tell: {reading}" if reading in (ONE_SEED, NO_SEED) else "cannot tell"


def change_verdict(est: Estimate, delta: float = DELTA) -> str:
    """degrades (interval above 0), improves (below 0), flat (within +-delta), else cannot tell."""
    reading = read_interval(est, delta)
    return {ABOVE: "degrades", BELOW: "improves", WITHIN: "flat"}.get(reading) or _cannot_tell(reading)


def interaction_verdict(est: Estimate, a_label: str, b_label: str, delta: float = DELTA) -> str:
    """Who loses more at the smaller batch: '<a> loses more than <b>', the reverse, no difference, or cannot tell."""
    reading = read_interval(est, delta)
    words = {ABOVE: f"{a_label} loses more than {b_label}", BELOW: f"{b_label} loses more than {a_label}",
             WITHIN: f"no difference beyond ±{delta:g}"}
    return words.get(reading) or _cannot_tell(reading)


def require_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """trials with both measures (best_val_test_error NaN when absent), one row per normalization x batch x seed."""
    if not isinstance(trials, pd.DataFrame):
        raise ValueError(f"trials must be a pandas DataFrame, got {type(trials).__name__}")
    missing = [c for c in [*KEYS, "test_error"] if c not in trials.columns]
    if missing:
        raise ValueError(f"trials lacks columns {missing}; expected {[*KEYS, *MEASURES]}, got {list(trials.columns)}")
    repeated = trials[trials.duplicated(KEYS, keep=False)]
    if not repeated.empty:
        raise ValueError(f"trials must have one row per normalization x batch_size x seed, got repeats: "
                         f"{sorted(set(map(tuple, repeated[KEYS].values.tolist())))}")
    frame = trials.copy()
    if "best_val_test_error" not in frame.columns:
        frame["best_val_test_error"] = math.nan
    return frame.astype({"batch_size": int, "seed": int, "test_error": float, "best_val_test_error": float})


def reference_batch(trials: pd.DataFrame, preferred: int = 32) -> int:
    """The batch the changes are measured from: preferred (the paper's 32) when run, else the largest run."""
    sizes = set(int(b) for b in trials["batch_size"])
    return preferred if preferred in sizes else max(sizes)


def _per_seed(trials: pd.DataFrame, measure: str) -> dict[tuple[str, int], pd.Series]:
    """{(normalization, batch_size): the measure indexed by seed}, NaNs (unrecorded values) dropped."""
    frame = require_trials(trials).dropna(subset=[measure])
    return {(norm, int(batch)): rows.set_index("seed")[measure].sort_index()
            for (norm, batch), rows in frame.groupby(["normalization", "batch_size"])}


def _batches_below(cells: dict, norm: str, reference: int) -> list[int]:
    """The batch sizes run for norm other than the reference, largest first."""
    return sorted((b for n, b in cells if n == norm and b != reference), reverse=True)


def cell_estimates(trials: pd.DataFrame, measure: str = "test_error") -> list[Cell]:
    """Every normalization x batch size that has a value: its estimate over seeds."""
    return [Cell(norm, batch, measure, tuple(map(int, values.index)), estimate(values.values))
            for (norm, batch), values in _per_seed(trials, measure).items()]


def changes(trials: pd.DataFrame, reference: int | None = None, delta: float = DELTA,
            measure: str = "test_error") -> list[Change]:
    """Each normalization's paired change from the reference batch (default: reference_batch) to every other."""
    cells = _per_seed(trials, measure)
    reference = reference_batch(trials) if reference is None else reference
    out = []
    for norm in dict.fromkeys(n for n, _ in cells):
        if (norm, reference) not in cells:
            continue
        for batch in _batches_below(cells, norm, reference):
            diff = (cells[norm, batch] - cells[norm, reference]).dropna()  # aligned on seed: pairs only
            est = estimate(diff.values)
            out.append(Change(norm, batch, reference, tuple(map(int, diff.index)), est, change_verdict(est, delta)))
    return out


def interactions(trials: pd.DataFrame, a: str = "batchnorm", b: str = "groupnorm", reference: int | None = None,
                 delta: float = DELTA, labels: tuple[str, str] | None = None,
                 measure: str = "test_error") -> list[Interaction]:
    """The a-vs-b interaction at every batch size both ran (besides the reference), paired by seed.

    labels: the names the verdicts use for a and b (default: a and b themselves).
    """
    if a == b:
        raise ValueError(f"a and b must be two different normalizations, got {a!r} twice")
    cells = _per_seed(trials, measure)
    reference = reference_batch(trials) if reference is None else reference
    a_label, b_label = labels or (a, b)
    out = []
    if (a, reference) not in cells or (b, reference) not in cells:
        return out
    for batch in _batches_below(cells, a, reference):
        if (b, batch) not in cells:
            continue
        four = [cells[a, batch], cells[a, reference], cells[b, batch], cells[b, reference]]
        seen = set().union(*(set(c.index) for c in four))
        diff = ((four[0] - four[1]) - (four[2] - four[3])).dropna()  # NaN wherever a seed misses any cell
        est = estimate(diff.values)
        out.append(Interaction(a, b, batch, reference, tuple(map(int, diff.index)),
                               tuple(sorted(int(s) for s in seen - set(diff.index))), est,
                               interaction_verdict(est, a_label, b_label, delta)))
    return out


def as_table(records: list, kind: type) -> pd.DataFrame:
    """Records of kind (Cell, Change or Interaction) as a flat DataFrame, with kind's columns even when empty.

    The estimate's fields become columns; seeds (and dropped) become space-separated strings.
    """
    names = [f.name for f in fields(kind) if f.name != "estimate"] + [f.name for f in fields(Estimate)]
    rows = []
    for record in records:
        row = asdict(record)
        row.update(row.pop("estimate"))
        for key in ("seeds", "dropped"):
            if key in row:
                row[key] = " ".join(map(str, row[key]))
        rows.append(row)
    return pd.DataFrame(rows, columns=names)
