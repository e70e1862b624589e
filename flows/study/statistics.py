"""The study's statistics: means over seeds with 95% t-intervals, paired contrasts, Holm's correction, verdicts.

Every number the study reports is a mean over seeds. The unit is a trial's arm
(a normalization, or batch norm read with precise statistics: see trials.py), at a
normalization batch g (the images each batch-norm statistic is computed over; in the
single-device design the SGD batch itself), and a seed. An arm whose trials do not
depend on g (group norm in the normalization-batch design) has g missing (NaN):
one cell, which pairs with every g.

A cell (arm x g) gets its mean and 95% t-interval. An arm's change from the
reference g to g is the per-seed difference error(g) - error(ref), paired by seed:
a seed fixes the weight initialisation, which every trial of that seed shares, so
pairing removes what the two trials have in common (the minibatch order is shared
too when the trials draw the same number of random values, as the SGD batch of the
normalization-batch design does; the single-device design's batches of other sizes
draw other minibatches). The interaction at g is, per seed, (A_g - A_ref) -
(B_g - B_ref) over the seeds present in all four cells: how much more A loses than
B when g shrinks from ref. A difference at g is, per seed, A_g - B_g (B's one cell
when B does not depend on g).

Verdicts are read from intervals, never from a point estimate: an interval wholly
above 0 is a detected rise, wholly below 0 a detected fall; an interval containing
0 but lying within +-delta rules out any change larger than delta; anything else
cannot tell. A detected rise or fall takes precedence over "within +-delta": an
interval such as [0.1, 0.3] with delta 0.5 excludes 0, so the change is reported
as detected (though smaller than delta), not as flat.

Each estimate also carries its two-sided p-value (paired t-test against 0), for
Holm's step-down correction over a family of contrasts (the g values of the
primary contrast), and its one-sided 95% upper bound: the largest true mean the
data leave plausible, the bound a null reports ("BN's extra error at g = 2 is at
most 0.3 points"), not to be confused with the MDE.

The smallest detectable effect (MDE) of each paired comparison is the true mean
difference that a two-sided paired t-test at alpha 0.05 detects with 80% power,
given n and the observed sd of the paired differences (noncentral t).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import pandas as pd
from scipy import optimize, stats

from cnncore.checks import require_int, require_real

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE  # the paired t-test that matches the 95% interval
POWER = 0.80
DELTA = 0.5  # points of error: a change smaller than this is of no practical interest on these nets
MEASURES = ("test_error", "final_test_error", "best_val_test_error")
KEYS = ["normalization", "norm_batch", "seed"]

# What an interval says, before it is put into a comparison's words.
ABOVE, BELOW, WITHIN, UNCLEAR, ONE_SEED, NO_SEED = "above", "below", "within", "unclear", "one seed", "no seed"


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds: n values, their mean, sample sd (ddof=1), 95% t-interval [low, high], MDE, the
    two-sided p-value of a t-test of the mean against 0, and the one-sided 95% upper bound of the mean.

    n = 0: every field but n is NaN. n = 1: mean is the value; the rest are NaN (one
    value says nothing about its spread). sd = 0 gives the interval [mean, mean], mde 0,
    upper = mean and p 0 (or 1 when the mean is 0).
    """

    n: int
    mean: float
    sd: float
    low: float
    high: float
    mde: float
    p: float = math.nan
    upper: float = math.nan


@dataclass(frozen=True)
class Cell:
    """One arm x g: the measure's estimate over the seeds that finished. norm_batch None: the arm does not
    depend on g."""

    normalization: str
    norm_batch: int | None
    measure: str
    seeds: tuple[int, ...]
    estimate: Estimate


@dataclass(frozen=True)
class Change:
    """An arm's paired change error(norm_batch) - error(reference), over the seeds run at both.

    p_holm: the Holm-adjusted p-value over the arm's g values (filled by holm_changes; NaN until then).
    """

    normalization: str
    norm_batch: int
    reference: int
    seeds: tuple[int, ...]
    estimate: Estimate
    verdict: str  # degrades, improves, flat, cannot tell (with the reason when there is no interval)
    p_holm: float = math.nan


@dataclass(frozen=True)
class Interaction:
    """(a_g - a_ref) - (b_g - b_ref) per seed, over the seeds present in all four cells.

    Positive: a loses more than b when g shrinks from reference to norm_batch.
    dropped: seeds that finished in some of the four cells but not all.
    """

    a: str
    b: str
    norm_batch: int
    reference: int
    seeds: tuple[int, ...]
    dropped: tuple[int, ...]
    estimate: Estimate
    verdict: str
    p_holm: float = math.nan  # Holm-adjusted over the g values of the pair (see with_holm)


@dataclass(frozen=True)
class Difference:
    """a_g - b_g per seed (b's only cell when b does not depend on g): positive means a errs more, so b beats a.

    dropped: seeds that finished in one of the two cells but not both.
    """

    a: str
    b: str
    norm_batch: int
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


def seeds_for_mde(sd: float, target: float, alpha: float = ALPHA, power: float = POWER, most: int = 200) -> int:
    """The fewest seeds whose paired t-test has MDE <= target at this sd (a pilot's sd of the paired
    differences); most + 1 when even `most` seeds do not reach it."""
    sd = require_real("sd", sd, low=0)
    target = require_real("target", target, low=0, low_open=True)
    return next((n for n in range(2, most + 1) if minimum_detectable_effect(n, sd, alpha, power) <= target),
                most + 1)


def estimate(values) -> Estimate:
    """Mean, sd, 95% t-interval, MDE, p-value and one-sided upper bound of values (one per seed; no NaNs)."""
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
    se = sd / math.sqrt(n)
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * se
    if se == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    upper = mean + stats.t.ppf(CONFIDENCE, n - 1) * se
    return Estimate(n, mean, sd, float(mean - half), float(mean + half), minimum_detectable_effect(n, sd), p,
                    float(upper))


def holm(p_values) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control), in the order given; NaN stays NaN
    and does not count in the family.

    Sorted ascending, the i-th smallest of m p-values becomes max over j <= i of
    min(1, (m - j + 1) * p_(j)); a contrast is detected at family-wise level alpha when
    its adjusted p-value is below alpha.
    """
    p = np.asarray(p_values, dtype=float)
    finite = np.flatnonzero(~np.isnan(p))
    adjusted = np.full(p.shape, math.nan)
    order = finite[np.argsort(p[finite], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def with_holm(records: list) -> list:
    """The records (Changes or Interactions of one family, e.g. one arm's g values) with p_holm filled in."""
    return [replace(r, p_holm=p) for r, p in zip(records, holm([r.estimate.p for r in records]))]


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
    """Who loses more at the smaller g: '<a> loses more than <b>', the reverse, no difference, or cannot tell."""
    reading = read_interval(est, delta)
    words = {ABOVE: f"{a_label} loses more than {b_label}", BELOW: f"{b_label} loses more than {a_label}",
             WITHIN: f"no difference beyond ±{delta:g}"}
    return words.get(reading) or _cannot_tell(reading)


def difference_verdict(est: Estimate, a_label: str, b_label: str, delta: float = DELTA) -> str:
    """Which errs less: '<b> beats <a>' (a - b above 0), '<a> beats <b>', no difference, or cannot tell."""
    reading = read_interval(est, delta)
    words = {ABOVE: f"{b_label} beats {a_label}", BELOW: f"{a_label} beats {b_label}",
             WITHIN: f"no difference beyond ±{delta:g}"}
    return words.get(reading) or _cannot_tell(reading)


def require_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """trials with every measure (NaN where absent), one row per normalization x norm_batch x seed.

    norm_batch NaN: the arm does not depend on g (one cell for every g).
    """
    if not isinstance(trials, pd.DataFrame):
        raise ValueError(f"trials must be a pandas DataFrame, got {type(trials).__name__}")
    missing = [c for c in [*KEYS, "test_error"] if c not in trials.columns]
    if missing:
        raise ValueError(f"trials lacks columns {missing}; expected {[*KEYS, *MEASURES]}, got {list(trials.columns)}")
    repeated = trials[trials.duplicated(KEYS, keep=False)]
    if not repeated.empty:
        raise ValueError(f"trials must have one row per normalization x norm_batch x seed, got repeats: "
                         f"{sorted(set(map(tuple, repeated[KEYS].values.tolist())))}")
    frame = trials.copy()
    for measure in MEASURES:
        if measure not in frame.columns:
            frame[measure] = math.nan
    return frame.astype({"norm_batch": float, "seed": int, **dict.fromkeys(MEASURES, float)})


def reference_batch(trials: pd.DataFrame, preferred: int = 32) -> int:
    """The g the changes are measured from: preferred (the paper's 32) when run, else the largest run."""
    sizes = {int(b) for b in trials["norm_batch"].dropna()}
    if not sizes:
        raise ValueError("trials has no norm_batch to measure changes from (every arm is independent of g)")
    return preferred if preferred in sizes else max(sizes)


def _g(value: float) -> int | None:
    return None if math.isnan(value) else int(value)


def _per_seed(trials: pd.DataFrame, measure: str) -> dict[tuple[str, int | None], pd.Series]:
    """{(arm, g or None): the measure indexed by seed}, NaNs (unrecorded values) dropped."""
    frame = require_trials(trials).dropna(subset=[measure])
    return {(norm, _g(g)): rows.set_index("seed")[measure].sort_index()
            for (norm, g), rows in frame.groupby(["normalization", "norm_batch"], dropna=False, sort=False)}


def _levels_below(cells: dict, norm: str, reference: int) -> list[int]:
    """The g values run for arm norm other than the reference, largest first."""
    return sorted((g for n, g in cells if n == norm and g is not None and g != reference), reverse=True)


def _at(cells: dict, norm: str, g: int) -> pd.Series | None:
    """The arm's values at g, or its only cell when it does not depend on g."""
    return cells.get((norm, g), cells.get((norm, None)))


def cell_estimates(trials: pd.DataFrame, measure: str = "test_error") -> list[Cell]:
    """Every arm x g that has a value: its estimate over seeds."""
    return [Cell(norm, g, measure, tuple(map(int, values.index)), estimate(values.values))
            for (norm, g), values in _per_seed(trials, measure).items()]


def changes(trials: pd.DataFrame, reference: int | None = None, delta: float = DELTA,
            measure: str = "test_error") -> list[Change]:
    """Each g-dependent arm's paired change from the reference g (default: reference_batch) to every other,
    with Holm's correction over each arm's g values."""
    cells = _per_seed(trials, measure)
    reference = reference_batch(trials) if reference is None else reference
    out = []
    for norm in dict.fromkeys(n for n, _ in cells):
        if (norm, reference) not in cells:
            continue
        rows = []
        for g in _levels_below(cells, norm, reference):
            diff = (cells[norm, g] - cells[norm, reference]).dropna()  # aligned on seed: pairs only
            est = estimate(diff.values)
            rows.append(Change(norm, g, reference, tuple(map(int, diff.index)), est, change_verdict(est, delta)))
        out += with_holm(rows)
    return out


def interactions(trials: pd.DataFrame, a: str = "batchnorm", b: str = "groupnorm", reference: int | None = None,
                 delta: float = DELTA, labels: tuple[str, str] | None = None,
                 measure: str = "test_error") -> list[Interaction]:
    """The a-vs-b interaction at every g both ran (besides the reference), paired by seed.

    b may be independent of g (its one cell stands at every g): the interaction is then a's change.
    labels: the names the verdicts use for a and b (default: a and b themselves).
    """
    if a == b:
        raise ValueError(f"a and b must be two different normalizations, got {a!r} twice")
    cells = _per_seed(trials, measure)
    reference = reference_batch(trials) if reference is None else reference
    a_label, b_label = labels or (a, b)
    out = []
    if (a, reference) not in cells or _at(cells, b, reference) is None:
        return out
    for g in _levels_below(cells, a, reference):
        if _at(cells, b, g) is None:
            continue
        four = [cells[a, g], cells[a, reference], _at(cells, b, g), _at(cells, b, reference)]
        seen = set().union(*(set(c.index) for c in four))
        diff = ((four[0] - four[1]) - (four[2] - four[3])).dropna()  # NaN wherever a seed misses any cell
        est = estimate(diff.values)
        out.append(Interaction(a, b, g, reference, tuple(map(int, diff.index)),
                               tuple(sorted(int(s) for s in seen - set(diff.index))), est,
                               interaction_verdict(est, a_label, b_label, delta)))
    return with_holm(out)


def differences(trials: pd.DataFrame, a: str = "batchnorm", b: str = "groupnorm", delta: float = DELTA,
                labels: tuple[str, str] | None = None, measure: str = "test_error") -> list[Difference]:
    """a - b at every g a ran (largest first), paired by seed; b's one cell when b does not depend on g."""
    if a == b:
        raise ValueError(f"a and b must be two different normalizations, got {a!r} twice")
    cells = _per_seed(trials, measure)
    a_label, b_label = labels or (a, b)
    out = []
    for g in sorted((g for n, g in cells if n == a and g is not None), reverse=True):
        other = _at(cells, b, g)
        if other is None:
            continue
        diff = (cells[a, g] - other).dropna()
        seen = set(cells[a, g].index) | set(other.index)
        est = estimate(diff.values)
        out.append(Difference(a, b, g, tuple(map(int, diff.index)), tuple(sorted(int(s) for s in seen - set(diff.index))),
                              est, difference_verdict(est, a_label, b_label, delta)))
    return out


def as_table(records: list, kind: type) -> pd.DataFrame:
    """Records of kind (Cell, Change, Interaction or Difference) as a flat DataFrame, with kind's columns even
    when empty.

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
    return pd.DataFrame(rows, columns=names).astype({"norm_batch": "Int64"} if "norm_batch" in names else {})
