"""The study's statistics: intervals over seeds, pairing by seed, the MDE and verdicts read from intervals.

Pure functions on DataFrames: no Prefect, no MLflow. Expected values are computed
here from the trials' numbers with scipy, independently of flows.study.statistics.
"""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from flows.study.statistics import (DELTA, Estimate, as_table, Cell, cell_estimates, change_verdict, changes,
                                    difference_verdict, differences, estimate, holm, interaction_verdict,
                                    interactions, minimum_detectable_effect, reference_batch, require_trials,
                                    seeds_for_mde)

TIGHT = 1e-9  # float64 sums of a handful of values: only rounding separates the two computations
SEEDS = (0, 1, 2, 3)


def trials_from(errors: dict[tuple[str, int], np.ndarray], seeds=SEEDS) -> pd.DataFrame:
    """Trials from {(normalization, g): test error per seed} (g None: an arm that does not depend on g)."""
    rows = [(norm, math.nan if g is None else g, seed, float(e)) for (norm, g), values in errors.items()
            for seed, e in zip(seeds, values)]
    return pd.DataFrame(rows, columns=["normalization", "norm_batch", "seed", "test_error"])


def bn_gn_errors(bn_extra: float, rng: np.random.Generator, noise: float = 0.3) -> dict:
    """BN and GN at batch 32 and 4 with seed effects shared by a seed's trials; BN gains bn_extra at batch 4."""
    seed_effect = rng.normal(0, 1.0, len(SEEDS))
    bn32 = 2.0 + seed_effect + rng.normal(0, noise, len(SEEDS))
    gn32 = 2.5 + seed_effect + rng.normal(0, noise, len(SEEDS))
    return {("batchnorm", 32): bn32, ("batchnorm", 4): bn32 + bn_extra + rng.normal(0, noise, len(SEEDS)),
            ("groupnorm", 32): gn32, ("groupnorm", 4): gn32 + rng.normal(0, noise, len(SEEDS))}


def expected(values: np.ndarray) -> tuple[float, float, float, float]:
    """mean, low, high of the 95% t-interval, and sd, straight from scipy."""
    n, mean, sd = len(values), float(np.mean(values)), float(np.std(values, ddof=1))
    low, high = stats.t.interval(0.95, n - 1, loc=mean, scale=sd / math.sqrt(n))
    return mean, low, high, sd


def power_at(effect: float, n: int, sd: float) -> float:
    """Power of the two-sided paired t-test at alpha 0.05 for a true mean difference effect."""
    critical, nc = stats.t.ppf(0.975, n - 1), effect * math.sqrt(n) / sd
    return float(stats.nct.sf(critical, n - 1, nc) + stats.nct.sf(critical, n - 1, -nc))


def assert_estimate_matches(est: Estimate, values: np.ndarray) -> None:
    mean, low, high, sd = expected(values)
    assert est.n == len(values)
    assert est.mean == pytest.approx(mean, abs=TIGHT) and est.sd == pytest.approx(sd, abs=TIGHT)
    assert est.low == pytest.approx(low, abs=TIGHT) and est.high == pytest.approx(high, abs=TIGHT)
    assert power_at(est.mde, est.n, est.sd) == pytest.approx(0.80, abs=TIGHT)


def by_hand(errors: dict, batch: int) -> np.ndarray:
    return ((errors["batchnorm", batch] - errors["batchnorm", 32])
            - (errors["groupnorm", batch] - errors["groupnorm", 32]))


# ---------------------------------------------------------------- the interaction on known answers


def test_interaction_interval_contains_zero_when_bn_and_gn_lose_alike():
    errors = bn_gn_errors(bn_extra=0.0, rng=np.random.default_rng(0))
    (x,) = interactions(trials_from(errors), labels=("BN", "GN"))
    assert (x.norm_batch, x.reference, x.seeds, x.dropped) == (4, 32, SEEDS, ())
    assert_estimate_matches(x.estimate, by_hand(errors, 4))
    assert x.estimate.low < 0 < x.estimate.high


def test_interaction_interval_excludes_zero_when_bn_loses_more():
    errors = bn_gn_errors(bn_extra=5.0, rng=np.random.default_rng(0))
    (x,) = interactions(trials_from(errors), labels=("BN", "GN"))
    assert_estimate_matches(x.estimate, by_hand(errors, 4))
    assert x.estimate.low > 0 and x.verdict == "BN loses more than GN"


def test_interaction_with_one_seed_has_no_interval_and_cannot_tell():
    errors = {k: v[:1] for k, v in bn_gn_errors(bn_extra=5.0, rng=np.random.default_rng(0)).items()}
    (x,) = interactions(trials_from(errors, seeds=(0,)), labels=("BN", "GN"))
    e = x.estimate
    assert e.n == 1 and e.mean == pytest.approx(float(by_hand(errors, 4)[0]), abs=TIGHT)
    assert all(math.isnan(v) for v in (e.sd, e.low, e.high, e.mde))
    assert x.verdict == "cannot tell: one seed"


def test_interaction_compares_any_two_normalizations():
    errors = bn_gn_errors(bn_extra=5.0, rng=np.random.default_rng(0))
    renamed = {("none" if n == "groupnorm" else n, b): v for (n, b), v in errors.items()}
    (x,) = interactions(trials_from(renamed), a="batchnorm", b="none", labels=("BN", "no norm"))
    assert (x.a, x.b) == ("batchnorm", "none") and x.verdict == "BN loses more than no norm"
    assert_estimate_matches(x.estimate, by_hand(errors, 4))


# ---------------------------------------------------------------- pairing by seed


def test_a_seed_missing_in_one_cell_is_dropped_from_that_batch_only():
    rng = np.random.default_rng(0)
    errors = bn_gn_errors(bn_extra=1.0, rng=rng)
    errors["batchnorm", 8], errors["groupnorm", 8] = errors["batchnorm", 4] + 1, errors["groupnorm", 4] - 1
    trials = trials_from(errors)
    trials = trials.drop(trials[(trials.normalization == "groupnorm") & (trials.norm_batch == 4)
                                & (trials.seed == 2)].index)
    at = {x.norm_batch: x for x in interactions(trials)}
    assert at[4].seeds == (0, 1, 3) and at[4].dropped == (2,) and at[4].estimate.n == 3
    assert_estimate_matches(at[4].estimate, by_hand(errors, 4)[[0, 1, 3]])
    assert at[8].seeds == SEEDS and at[8].dropped == ()


@pytest.mark.parametrize("norm, batch", [("batchnorm", 4), ("batchnorm", 32), ("groupnorm", 4), ("groupnorm", 32)])
def test_a_seed_missing_in_any_of_the_four_cells_is_dropped_and_named(norm, batch):
    """The interaction pairs four cells by seed: a seed missing from any one of them is left out and
    listed in dropped (the report names it), whichever cell it is missing from."""
    errors = bn_gn_errors(bn_extra=1.0, rng=np.random.default_rng(0))
    trials = trials_from(errors)
    trials = trials.drop(trials[(trials.normalization == norm) & (trials.norm_batch == batch)
                                & (trials.seed == 1)].index)
    (x,) = interactions(trials)
    assert (x.seeds, x.dropped, x.estimate.n) == ((0, 2, 3), (1,), 3)
    assert_estimate_matches(x.estimate, by_hand(errors, 4)[[0, 2, 3]])


def test_a_seed_missing_at_the_reference_leaves_every_batch():
    errors = bn_gn_errors(bn_extra=1.0, rng=np.random.default_rng(0))
    trials = trials_from(errors)
    trials = trials.drop(trials[(trials.normalization == "batchnorm") & (trials.norm_batch == 32)
                                & (trials.seed == 0)].index)
    (x,) = interactions(trials)
    assert x.seeds == (1, 2, 3) and x.dropped == (0,)
    bn = {c.normalization: c for c in changes(trials)}
    assert bn["batchnorm"].seeds == (1, 2, 3) and bn["groupnorm"].seeds == SEEDS


def test_change_is_the_paired_difference_from_the_reference():
    errors = bn_gn_errors(bn_extra=3.0, rng=np.random.default_rng(1))
    found = {(c.normalization, c.norm_batch): c for c in changes(trials_from(errors))}
    assert set(found) == {("batchnorm", 4), ("groupnorm", 4)}
    assert_estimate_matches(found["batchnorm", 4].estimate, errors["batchnorm", 4] - errors["batchnorm", 32])
    assert found["batchnorm", 4].verdict == "degrades"


def test_cell_estimate_is_the_mean_and_t_interval_over_seeds():
    errors = bn_gn_errors(bn_extra=3.0, rng=np.random.default_rng(2))
    cells = {(c.normalization, c.norm_batch): c for c in cell_estimates(trials_from(errors))}
    assert cells["groupnorm", 4].seeds == SEEDS
    assert_estimate_matches(cells["groupnorm", 4].estimate, errors["groupnorm", 4])


def test_unrecorded_values_are_left_out_of_their_measure_only():
    trials = trials_from(bn_gn_errors(bn_extra=0.0, rng=np.random.default_rng(0)))
    trials["best_val_test_error"] = trials["test_error"] - 0.1
    trials.loc[0, "best_val_test_error"] = np.nan
    first = (trials.loc[0, "normalization"], trials.loc[0, "norm_batch"])
    by_measure = {m: {(c.normalization, c.norm_batch): c.estimate.n for c in cell_estimates(trials, m)}
                  for m in ("test_error", "best_val_test_error")}
    assert by_measure["test_error"][first] == 4 and by_measure["best_val_test_error"][first] == 3


def test_reference_is_32_when_run_else_the_largest_batch():
    frame = pd.DataFrame({"norm_batch": [64, 32, 2, math.nan]})
    assert reference_batch(frame) == 32 and reference_batch(frame[frame.norm_batch != 32]) == 64


def test_as_table_keeps_the_columns_of_an_empty_result():
    assert list(as_table([], Cell).columns) == ["normalization", "norm_batch", "measure", "seeds", "n", "mean", "sd",
                                               "low", "high", "mde", "p", "upper"]


# ---------------------------------------------------------------- bad input


def test_trials_without_a_needed_column_are_named():
    with pytest.raises(ValueError, match=r"trials lacks columns \['test_error'\]"):
        require_trials(pd.DataFrame({"normalization": ["batchnorm"], "norm_batch": [2], "seed": [0]}))


def test_repeated_trials_are_refused_rather_than_paired_wrongly():
    trials = trials_from(bn_gn_errors(bn_extra=0.0, rng=np.random.default_rng(0)))
    with pytest.raises(ValueError, match=r"one row per normalization x norm_batch x seed.*\('batchnorm', 32, 0\)"):
        interactions(pd.concat([trials, trials.iloc[:1]]))


def test_interaction_of_a_normalization_with_itself_is_refused():
    with pytest.raises(ValueError, match="two different normalizations"):
        interactions(trials_from({}), a="groupnorm", b="groupnorm")


# ---------------------------------------------------------------- the MDE


@pytest.mark.parametrize("n", [3, 5, 10])
def test_mde_has_80_percent_power_in_simulated_paired_t_tests(n):
    """20k simulated experiments at the MDE: the binomial sd of the power is 0.003, so 0.02 is about 7 sd."""
    rng = np.random.default_rng(0)
    sd = 1.7
    mde = minimum_detectable_effect(n, sd)
    diffs = rng.normal(mde, sd, size=(20_000, n))
    t = diffs.mean(axis=1) / (diffs.std(axis=1, ddof=1) / math.sqrt(n))
    power = np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1))
    assert power == pytest.approx(0.80, abs=0.02)


def test_mde_matches_the_published_effect_size_for_ten_pairs():
    """Cohen's d detectable with 80% power at alpha 0.05 two-sided for a paired t-test with 10 pairs is
    0.996 (G*Power's sensitivity analysis); 3 decimals as published."""
    assert minimum_detectable_effect(10, 1.0) == pytest.approx(0.996, abs=5e-4)


def test_mde_is_undefined_below_two_seeds_and_zero_without_spread():
    assert math.isnan(minimum_detectable_effect(1, 1.0)) and math.isnan(minimum_detectable_effect(0, 1.0))
    assert minimum_detectable_effect(5, 0.0) == 0.0


def test_mde_scales_with_the_spread():
    assert minimum_detectable_effect(5, 3.0) == pytest.approx(3 * minimum_detectable_effect(5, 1.0), rel=1e-9)


def test_mde_power_outside_alpha_to_one_is_named():
    with pytest.raises(ValueError, match="power must be a finite number > 0.05 and < 1"):
        minimum_detectable_effect(5, 1.0, power=0.01)


# ---------------------------------------------------------------- verdicts at the edges


def interval(low: float, high: float, n: int = 3) -> Estimate:
    return Estimate(n=n, mean=(low + high) / 2, sd=1.0, low=low, high=high, mde=1.0)


@pytest.mark.parametrize("low, high, verdict", [
    (-0.2, 0.5, "flat"),                    # touching +delta exactly: within (bounds included)
    (-0.5, 0.2, "flat"),                    # touching -delta exactly
    (-0.2, 0.5 - 1e-12, "flat"),            # just inside
    (-0.2, 0.5 + 1e-12, "cannot tell"),     # just outside
    (-0.5 - 1e-12, 0.2, "cannot tell"),
    (0.0, 0.4, "flat"),                     # lower bound exactly 0: not above 0, and within delta
    (0.0, 0.8, "cannot tell"),              # lower bound exactly 0, reaching past delta
    (1e-12, 0.8, "degrades"),
    (-0.8, -1e-12, "improves"),
    (-2.0, 2.0, "cannot tell"),
])
def test_change_verdict_at_the_edges(low, high, verdict):
    assert change_verdict(interval(low, high), delta=0.5) == verdict


@pytest.mark.parametrize("low, high, verdict", [(0.1, 0.3, "degrades"), (-0.3, -0.1, "improves")])
def test_a_detected_change_takes_precedence_over_flat(low, high, verdict):
    """Within ±0.5 and excluding 0: both rules hold, and the detected change is what is reported."""
    assert change_verdict(interval(low, high), delta=0.5) == verdict


@pytest.mark.parametrize("low, high, verdict", [
    (0.1, 3.0, "BN loses more than GN"), (-3.0, -0.1, "GN loses more than BN"),
    (-0.5, 0.5, "no difference beyond ±0.5"), (-0.4, 0.9, "cannot tell"), (0.1, 0.3, "BN loses more than GN"),
])
def test_interaction_verdict_says_who_loses_more(low, high, verdict):
    assert interaction_verdict(interval(low, high), "BN", "GN", delta=0.5) == verdict


@pytest.mark.parametrize("low, high, verdict", [
    (-0.45, 0.45, "flat"), (-0.2, 0.5, "flat"), (-0.2, 0.51, "cannot tell"), (-0.6, 0.1, "cannot tell"),
])
def test_the_default_margin_is_half_a_point_of_error(low, high, verdict):
    """DELTA is in points of error (percent), as every error the study reports: 0.5, not 0.005."""
    assert DELTA == 0.5
    assert change_verdict(interval(low, high)) == verdict
    words = {"flat": "no difference beyond ±0.5", "cannot tell": "cannot tell"}[verdict]
    assert interaction_verdict(interval(low, high), "BN", "GN") == words


def test_changes_and_interactions_use_the_default_margin():
    """Flat data (every cell within noise 0.05 of its seed's level) is flat at the default margin."""
    rng = np.random.default_rng(0)
    errors = bn_gn_errors(bn_extra=0.0, rng=rng, noise=0.05)
    trials = trials_from(errors)
    (x,) = interactions(trials, labels=("BN", "GN"))
    assert -0.5 <= x.estimate.low and x.estimate.high <= 0.5 and x.estimate.low < 0 < x.estimate.high
    assert x.verdict == "no difference beyond ±0.5"
    assert {c.verdict for c in changes(trials)} == {"flat"}


def test_a_single_value_gets_no_verdict():
    one = estimate([2.0])
    assert change_verdict(one) == "cannot tell: one seed"
    assert interaction_verdict(estimate([]), "BN", "GN") == "cannot tell: no seed"


def test_estimate_refuses_nan_values():
    with pytest.raises(ValueError, match="values must have no NaN"):
        estimate([1.0, math.nan])


# ---------------------------------------------------------------- p-values, one-sided bounds, Holm


def test_p_value_and_one_sided_bound_match_scipy():
    values = np.array([0.4, 1.1, -0.2, 0.9, 0.5])
    est = estimate(values)
    n, se = len(values), values.std(ddof=1) / math.sqrt(len(values))
    assert est.p == pytest.approx(stats.ttest_1samp(values, 0.0).pvalue, abs=TIGHT)
    assert est.upper == pytest.approx(values.mean() + stats.t.ppf(0.95, n - 1) * se, abs=TIGHT)
    # The one-sided 95% bound is the upper end of the two-sided 90% interval: below the 95% interval's.
    assert est.upper == pytest.approx(stats.t.interval(0.90, n - 1, loc=values.mean(), scale=se)[1], abs=TIGHT)
    assert est.upper < est.high


def test_one_seed_has_no_p_value_and_no_bound():
    one = estimate([1.0])
    assert math.isnan(one.p) and math.isnan(one.upper)


def test_holm_matches_the_step_down_rule_by_hand():
    """p = (0.01, 0.04, 0.03, 0.20) for m = 4: sorted 0.01, 0.03, 0.04, 0.20 get 4x, 3x, 2x, 1x, made monotone:
    0.04, 0.09, 0.09 (0.08 lifted to the running max), 0.20."""
    assert holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    adjusted = holm([0.01, math.nan, 0.02])  # NaN is not counted in the family
    assert math.isnan(adjusted[1]) and adjusted[0] == pytest.approx(0.02) and adjusted[2] == pytest.approx(0.02)
    assert holm([]) == []


def test_changes_carry_holm_adjusted_p_values_over_each_arms_g_values():
    rng = np.random.default_rng(4)
    errors = bn_gn_errors(bn_extra=2.0, rng=rng)
    errors["batchnorm", 8] = errors["batchnorm", 32] + rng.normal(0.1, 0.3, len(SEEDS))
    found = [c for c in changes(trials_from(errors)) if c.normalization == "batchnorm"]
    assert [c.norm_batch for c in found] == [8, 4]
    assert [c.p_holm for c in found] == pytest.approx(holm([c.estimate.p for c in found]))
    assert all(c.p_holm >= c.estimate.p for c in found)


# ---------------------------------------------------------------- an arm that does not depend on g


def norm_batch_errors(rng: np.random.Generator, bn_extra_at_2: float) -> dict:
    """The normalization-batch design: BN at g = 32, 8, 2; GN once per seed (g None)."""
    seed_effect = rng.normal(0, 1.0, len(SEEDS))
    bn32 = 2.0 + seed_effect + rng.normal(0, 0.3, len(SEEDS))
    return {("batchnorm", 32): bn32, ("batchnorm", 8): bn32 + rng.normal(0, 0.3, len(SEEDS)),
            ("batchnorm", 2): bn32 + bn_extra_at_2 + rng.normal(0, 0.3, len(SEEDS)),
            ("groupnorm", None): 2.5 + seed_effect + rng.normal(0, 0.3, len(SEEDS))}


def test_an_arm_independent_of_g_has_one_cell_and_no_change():
    trials = trials_from(norm_batch_errors(np.random.default_rng(0), 3.0))
    cells = {(c.normalization, c.norm_batch) for c in cell_estimates(trials)}
    assert cells == {("batchnorm", 32), ("batchnorm", 8), ("batchnorm", 2), ("groupnorm", None)}
    assert {c.normalization for c in changes(trials)} == {"batchnorm"}
    assert reference_batch(trials) == 32


def test_interaction_with_an_arm_independent_of_g_is_the_arms_own_change():
    errors = norm_batch_errors(np.random.default_rng(1), 3.0)
    trials = trials_from(errors)
    at = {x.norm_batch: x for x in interactions(trials, labels=("BN", "GN"))}
    assert set(at) == {8, 2}
    assert_estimate_matches(at[2].estimate, errors["batchnorm", 2] - errors["batchnorm", 32])
    assert at[2].verdict == "BN loses more than GN"


def test_differences_pair_each_g_with_the_arm_independent_of_g():
    errors = norm_batch_errors(np.random.default_rng(2), 3.0)
    found = {d.norm_batch: d for d in differences(trials_from(errors), labels=("BN", "GN"))}
    assert sorted(found, reverse=True) == [32, 8, 2]
    for g, d in found.items():
        assert_estimate_matches(d.estimate, errors["batchnorm", g] - errors["groupnorm", None])
    assert found[2].verdict == "GN beats BN"


def test_differences_at_the_same_g_in_the_single_device_design():
    errors = bn_gn_errors(bn_extra=0.0, rng=np.random.default_rng(3))
    found = {d.norm_batch: d for d in differences(trials_from(errors))}
    assert_estimate_matches(found[4].estimate, errors["batchnorm", 4] - errors["groupnorm", 4])
    assert found[32].seeds == SEEDS and found[32].dropped == ()


@pytest.mark.parametrize("low, high, verdict", [(0.1, 3.0, "GN beats BN"), (-3.0, -0.1, "BN beats GN"),
                                                (-0.5, 0.5, "no difference beyond ±0.5"), (-0.4, 0.9, "cannot tell")])
def test_difference_verdict_says_who_errs_less(low, high, verdict):
    assert difference_verdict(interval(low, high), "BN", "GN", delta=0.5) == verdict


def test_seeds_for_mde_is_the_fewest_that_reach_the_target():
    n = seeds_for_mde(0.6, 0.5)
    assert minimum_detectable_effect(n, 0.6) <= 0.5 < minimum_detectable_effect(n - 1, 0.6)
    assert seeds_for_mde(100.0, 0.5, most=10) == 11  # out of reach: one more than allowed
