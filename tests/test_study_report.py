"""The study's report built from synthetic trials: its sections, sentences, tables and figures (no Prefect).

Expected numbers are computed here from the trials with scipy, independently of
flows.study; each test reads what a user reads (the markdown, a table's cells, a
figure's axes).
"""

import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from flows.study import PAPER_ERROR, bn_vs_gn_spec, build_study, holm, minimum_detectable_effect

SEEDS = (0, 1, 2)
BATCHES = (32, 8, 2)


def spec(**kwargs):
    fields = dict(normalizations=("batchnorm", "groupnorm"), batch_sizes=BATCHES, seeds=SEEDS, num_epochs=2,
                  num_train=100, num_test=300)
    return bn_vs_gn_spec(**{**fields, **kwargs})


def synthetic_trials(bn_extra_at_2: float, rng_seed: int = 0, seeds=SEEDS, precise_gain: float = 0.5) -> pd.DataFrame:
    """BN and GN around 2-3% error with seed noise; BN gains bn_extra_at_2 points at batch 2. Every measure is
    recorded: the final net's and the best-validation net's errors near the primary one, and batch norm's
    precise errors precise_gain below its own."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for norm in ("batchnorm", "groupnorm"):
        for batch in BATCHES:
            for seed in seeds:
                extra = bn_extra_at_2 if (norm, batch) == ("batchnorm", 2) else 0.0
                error = 2.5 + extra + rng.normal(0, 0.4)
                precise = error - precise_gain + rng.normal(0, 0.1) if norm == "batchnorm" else np.nan
                rows.append({"normalization": norm, "batch_size": batch, "seed": seed, "test_error": error,
                             "final_test_error": error + rng.normal(0, 0.1),
                             "best_val_test_error": error + rng.normal(0, 0.2), "precise_test_error": precise,
                             "final_precise_test_error": precise})
    return pd.DataFrame(rows)


def without(trials: pd.DataFrame, norm: str, batch: int, seed: int) -> pd.DataFrame:
    return trials.drop(trials[(trials.normalization == norm) & (trials.batch_size == batch)
                              & (trials.seed == seed)].index)


def section(markdown: str, heading: str) -> str:
    return markdown.split(heading)[1].split("\n## ")[0]


def rows_of(markdown: str, heading: str, first: str) -> list[list[str]]:
    """The cells of every table row under heading whose first cell is first."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in section(markdown, heading).splitlines()
            if line.startswith(f"| {first} |")]


def answer_row(markdown: str, batch: int, arm: str = "BN") -> list[str]:
    """The answer table's row for an arm at batch (the first table under the answer)."""
    (row,) = [r for r in rows_of(markdown, "## The answer", arm) if r[1] == str(batch) and len(r) == 9]
    return row


def by_seed(trials: pd.DataFrame, column: str = "test_error") -> pd.Series:
    return trials.set_index(["normalization", "batch_size", "seed"])[column]


def test_the_answer_comes_first_then_the_evidence_then_design_and_provenance():
    markdown = build_study(synthetic_trials(5.0), spec(), provenance={"commit": "abc1234"}).markdown
    headings = ["# BN vs GN: digits, the three-layer convnet, the single-device design", "## The answer",
                "## Test error (%)", "## Do the measures agree?", "## Each arm's own change",
                "## Why: the normalization statistics", "## Design", "## Provenance", "## How to read the verdicts"]
    positions = [markdown.index(h) for h in headings]
    assert positions == sorted(positions) and positions[0] == 0
    assert "- commit: `abc1234`" in markdown


def test_answer_row_matches_the_interaction_computed_by_hand():
    trials = synthetic_trials(5.0)
    e = by_seed(trials)
    d = np.array([(e["batchnorm", 2, s] - e["batchnorm", 32, s]) - (e["groupnorm", 2, s] - e["groupnorm", 32, s])
                  for s in SEEDS])
    low, high = stats.t.interval(0.95, 2, loc=d.mean(), scale=d.std(ddof=1) / math.sqrt(3))
    upper = d.mean() + stats.t.ppf(0.95, 2) * d.std(ddof=1) / math.sqrt(3)
    d8 = np.array([(e["batchnorm", 8, s] - e["batchnorm", 32, s]) - (e["groupnorm", 8, s] - e["groupnorm", 32, s])
                   for s in SEEDS])
    p_holm = holm([stats.ttest_1samp(d8, 0).pvalue, stats.ttest_1samp(d, 0).pvalue])[1]
    row = answer_row(build_study(trials, spec()).markdown, 2)
    assert row[2:8] == ["3", f"{d.mean():+.2f}", f"[{low:.2f}, {high:.2f}]", f"{upper:+.2f}",
                        f"{minimum_detectable_effect(3, d.std(ddof=1)):.2f}", f"{p_holm:.2g}"]
    assert row[8] == "BN loses more than GN"


def test_in_short_names_the_loss_with_its_interval_n_and_holm_p():
    result = build_study(synthetic_trials(5.0), spec())
    x = result.tables["primary"].query("arm == 'batchnorm' and norm_batch == 2").iloc[0]
    assert (f"BN loses more than GN by {x['mean']:.2f} points at batch 2 (+{x['mean']:.2f} "
            f"[{x['low']:.2f}, {x['high']:.2f}], n=3, Holm-adjusted p = {x['p_holm']:.2g})") in result.answer
    assert result.answer in result.markdown and "best trial" not in result.markdown.lower()


def test_a_detected_interaction_either_way_is_said_with_a_positive_size():
    """Who loses more is in the words; the size is how much more, a positive number of points."""
    for bn_extra, loser, winner in ((5.0, "BN", "GN"), (-5.0, "GN", "BN")):
        result = build_study(synthetic_trials(bn_extra), spec())
        row = result.tables["interactions"].query("b == 'groupnorm' and norm_batch == 2").iloc[0]
        assert (row["mean"] > 0) == (bn_extra > 0) and row.verdict == f"{loser} loses more than {winner}"
        assert (f"{loser} loses more than {winner} by {abs(row['mean']):.2f} points at batch 2 "
                f"({row['mean']:+.2f} [{row.low:.2f}, {row.high:.2f}], n=3,") in result.answer


@pytest.mark.parametrize("num_test, points", [(300, "0.33"), (50, "2.00"), (200, "0.50")])
def test_the_design_says_what_one_test_image_is_worth(num_test, points):
    markdown = build_study(synthetic_trials(5.0), spec(num_test=num_test)).markdown
    assert f"({num_test} test images, one image = {points} points)" in section(markdown, "## Design")


def test_the_full_preset_answers_bn_against_gn_with_the_others_as_baselines():
    """bn-vs-gn runs every normalization: its answer is BN vs GN (the paper's), never BN vs LN, and the
    other normalizations come after it as baselines."""
    full = bn_vs_gn_spec(batch_sizes=BATCHES, seeds=SEEDS, num_epochs=2, num_train=100, num_test=300)
    rng = np.random.default_rng(0)
    trials = pd.DataFrame([(t.normalization, t.batch_size, t.train_seed, 2.5 + rng.normal(0, 0.4))
                           for t in full.trials()], columns=["normalization", "batch_size", "seed", "test_error"])
    assert set(trials.normalization) == {"batchnorm", "groupnorm", "layernorm", "instancenorm", "none"}
    result = build_study(trials, full)
    assert result.markdown.startswith("# BN vs GN: digits")
    answer = section(result.markdown, "## The answer")
    assert answer.startswith(": does BN lose more than GN as the batch shrinks?")
    assert "Per seed, (BN(b) - BN(32)) - (GN(b) - GN(32))" in answer
    assert result.answer.startswith("Does BN lose more than GN as the batch shrinks from 32?")
    baselines = answer.split("**BN against each other normalization run**")[1]
    against = [line.split("|")[2].strip() for line in baselines.splitlines() if line.startswith("| BN |")]
    assert sorted(set(against)) == ["IN", "LN", "no norm"]
    primary = result.tables["interactions"].query("b == 'groupnorm'")
    assert list(primary["norm_batch"]) == [8, 2]
    assert result.figures["interaction_vs_batch_size"].axes[0].get_ylabel() == "extra error of BN over GN (points)"


def test_a_null_is_bounded_one_sided_and_its_mde_kept_apart():
    result = build_study(synthetic_trials(0.0, rng_seed=3), spec())
    rows = result.tables["primary"].query("arm == 'batchnorm'")
    assert (rows["p_holm"] >= 0.05).all()
    bounds = ", ".join(f"{u:+.2f}" for u in rows["upper"])
    mdes = ", ".join(f"{m:.2f}" for m in rows["mde"])
    assert (f"no loss detected at batch 8, 2, where BN's extra error over GN is at most {bounds} points (one-sided "
            f"95% upper bounds, n=3); the run would have detected {mdes} points with 80% power (MDE)") in result.answer
    assert "No loss of BN is detected down to batch 2." in result.answer


def test_gn_beating_bn_is_its_own_paired_difference():
    trials = synthetic_trials(5.0)
    e = by_seed(trials)
    d = np.array([e["batchnorm", 2, s] - e["groupnorm", 2, s] for s in SEEDS])
    markdown = build_study(trials, spec()).markdown
    (row,) = [r for r in rows_of(markdown, "## The answer", "BN") if r[1] == "2" and len(r) == 7
              and r[6] == "GN beats BN"]
    low, high = stats.t.interval(0.95, 2, loc=d.mean(), scale=d.std(ddof=1) / math.sqrt(3))
    assert row[2:5] == ["3", f"{d.mean():+.2f}", f"[{low:.2f}, {high:.2f}]"]
    assert f"GN beats BN at batch 2 by {d.mean():.2f} points" in markdown



def test_no_difference_beyond_its_interval_is_said_in_the_designs_own_unit():
    """The single-device design varies the batch size; "g" is the normalization-batch design's word."""
    markdown = build_study(synthetic_trials(0.0, rng_seed=3), spec(seeds=SEEDS)).markdown
    assert "At no batch size does either of BN and GN beat the other beyond its interval." in markdown
    assert "At no g " not in markdown

def test_precise_bn_is_a_row_of_every_table():
    result = build_study(synthetic_trials(5.0), spec())
    markdown = result.markdown
    assert rows_of(markdown, "## The answer", "precise BN")  # its interaction and its difference with GN
    assert rows_of(markdown, "## Test error (%)", "precise BN")
    assert rows_of(markdown, "## Each arm's own change", "precise BN")
    assert "What precise statistics recover" in markdown
    trials = synthetic_trials(5.0)
    recovered = by_seed(trials)["batchnorm"] - by_seed(trials, "precise_test_error")["batchnorm"]
    row = result.tables["differences"].query("a == 'batchnorm' and b == 'batchnorm-precise' and norm_batch == 2")
    assert row["mean"].iloc[0] == pytest.approx(recovered.xs(2).mean())
    cells = result.tables["cells"].query("normalization == 'batchnorm-precise'")
    assert list(cells["norm_batch"]) == [32, 8, 2]


def test_every_interval_in_the_error_table_shows_its_n():
    markdown = build_study(without(synthetic_trials(5.0), "groupnorm", 2, 1), spec()).markdown
    table = section(markdown, "## Test error (%)")
    intervals = re.findall(r"\d+\.\d\d \[-?\d+\.\d\d, -?\d+\.\d\d\](, n=\d)?", table)
    assert intervals and all(n for n in intervals)
    gn = rows_of(markdown, "## Test error (%)", "GN")[0]  # this run's table, before the paper's
    assert gn[-1].endswith("n=2") and gn[1].endswith("n=3")


def test_failed_trial_is_counted_named_and_shrinks_n_where_it_pairs():
    markdown = build_study(without(synthetic_trials(5.0), "groupnorm", 2, 1), spec()).markdown
    assert "18 trials planned, 17 finished; 1 did not finish and is left out: GN batch 2 seed 1." in markdown
    assert answer_row(markdown, 2)[2] == "2" and answer_row(markdown, 8)[2] == "3"


def test_fewer_than_three_seeds_is_a_smoke_test_that_says_so_first():
    trials = synthetic_trials(5.0, seeds=(0, 1))
    result = build_study(trials, spec(seeds=(0, 1)))
    lines = result.markdown.splitlines()
    assert lines[2].startswith("> **A smoke test, not a result: 2 seeds.**")
    assert result.answer.startswith("Smoke test (2 seeds), not a result:")
    assert "A smoke test" not in build_study(synthetic_trials(5.0), spec()).markdown


def test_one_seed_run_cannot_tell():
    trials = synthetic_trials(5.0, seeds=(0,))
    result = build_study(trials, spec(seeds=(0,)))
    assert answer_row(result.markdown, 2)[4:] == ["—", "—", "—", "—", "cannot tell: one seed"]
    assert "nothing can be said at batch 8, 2: fewer than two seeds finished every trial it pairs" in result.answer


def test_measures_agreement_is_said_and_a_disagreement_says_which_way():
    agree = build_study(synthetic_trials(5.0), spec(num_epochs=2, tail_evals=3))
    assert "The measures agree: the same verdict at every g" in agree.markdown
    trials = synthetic_trials(5.0)
    at_2 = (trials.normalization == "batchnorm") & (trials.batch_size == 2)
    smaller = trials.assign(best_val_test_error=trials["best_val_test_error"].where(~at_2, trials["test_error"] - 3))
    text = section(build_study(smaller, spec(tail_evals=3)).markdown, "## Do the measures agree?")
    assert ("The verdicts agree at every g, but the sizes differ by more than ±0.5 points and more than the primary "
            "measure's own interval: at batch 2") in text
    best = by_seed(trials, "best_val_test_error")
    none_at_2 = {s: best["batchnorm", 32, s] + best["groupnorm", 2, s] - best["groupnorm", 32, s] for s in SEEDS}
    gone = trials.assign(best_val_test_error=trials["best_val_test_error"].where(~at_2, trials["seed"].map(none_at_2)))
    result = build_study(gone, spec(tail_evals=3))  # the best-validation measure's interaction at batch 2: 0
    text = section(result.markdown, "## Do the measures agree?")
    assert "They disagree: at batch 2 the best-validation net's test error reads" in text
    assert "where the primary measure says 'BN loses more than GN'" in text
    assert "Which way: the final net's test error reads the contrast" in text
    assert re.search(r"the best-validation net's test error reads the contrast \d\.\d\d points lower on average", text)
    measures = result.tables["measures"]
    assert set(measures["measure"]) == {"test_error", "final_test_error", "best_val_test_error"}


def test_without_tail_evaluations_the_final_net_is_the_measure_and_not_repeated():
    result = build_study(synthetic_trials(5.0), spec())
    assert "No tail evaluations were configured (tail_evals = 0)" in result.markdown
    assert set(result.tables["measures"]["measure"]) == {"test_error", "best_val_test_error"}
    assert "final_cells" not in result.tables


def test_the_tail_measure_is_stated_with_its_points_and_reason():
    markdown = build_study(synthetic_trials(5.0), spec(tail_evals=5, lr_steps=[0.5, 0.75])).markdown
    assert "Measured (fixed before the runs): the mean test error over the last 5 evaluations" in markdown
    assert "evenly spaced from 87.5% of training to its end" in markdown
    assert "median of its last 5 epochs" in markdown
    assert "divided by 10 after 50%, 75% of training" in markdown


def test_report_lists_the_paper_beside_this_run():
    markdown = build_study(synthetic_trials(5.0), spec()).markdown
    text = section(markdown, "## Test error (%)")
    assert "Wu & He, Group Normalization, ECCV 2018, Table 2" in text
    assert f"| BN | {PAPER_ERROR['batchnorm'][32]} |" in text and f"{PAPER_ERROR['batchnorm'][2]} |" in text


def test_updates_follow_the_solvers_iterations_per_epoch():
    """The Solver runs max(N // b, 1) iterations per epoch; 100 images, 2 epochs."""
    updates = build_study(synthetic_trials(5.0), spec(batch_sizes=(64, 32, 8, 2)),
                          num_train=100).tables["updates"].set_index("norm_batch")
    assert updates["iterations_per_epoch"].to_dict() == {64: 1, 32: 3, 8: 12, 2: 50}
    assert updates.loc[2, "updates"] == 100 and updates.loc[2, "learning_rate"] == pytest.approx(0.02 * 2 / 32)


def test_without_diagnostics_the_report_says_it_cannot_say_why():
    result = build_study(synthetic_trials(5.0), spec())
    assert "No diagnostics were recorded for this run" in result.markdown
    assert "diagnostics_layers" not in result.tables


def diagnostics(noise_at_2: float, train_mode_at_2: float, layers: int = 1, nominal_per_image: int = 64,
                n_eff_later: float = 6.4e10) -> pd.DataFrame:
    """BN diagnostics per seed: noise grows as the batch shrinks; n_eff at layers after the first is absurd
    (as behind another batch norm); seeds 0, 1, 2 give medians that are not their means."""
    rows = []
    offsets = {0: 0.0, 1: 0.01, 2: 0.05}
    for batch in BATCHES:
        for seed in SEEDS:
            for layer in range(1, layers + 1):
                rows += [("batchnorm", batch, seed, "batch_noise", layer, noise_at_2 * 2 / batch + offsets[seed]),
                         ("batchnorm", batch, seed, "nominal", layer, nominal_per_image * batch),
                         ("batchnorm", batch, seed, "n_eff", layer, 50.0 * batch if layer == 1 else n_eff_later)]
            rows += [("batchnorm", batch, seed, "train_mode_error", np.nan,
                      3 + (train_mode_at_2 if batch == 2 else 0) + offsets[seed]),
                     ("batchnorm", batch, seed, "test_mode_error", np.nan, 3.0)]
    return pd.DataFrame(rows, columns=["normalization", "batch_size", "seed", "metric", "layer", "value"])


def test_diagnostics_read_the_batch_noise_with_the_values_pooled():
    result = build_study(synthetic_trials(5.0), spec(), diagnostics=diagnostics(0.12, 0.0))
    assert ("At batch 2, the statistics noise reaching BN's normalised output (batch_noise: RMS of the train-mode "
            "output minus the output under population statistics, relative to the latter; median of 3 seeds) is "
            "13.0% at its only norm layer (pooling 128 values per channel).") in result.markdown
    layers = result.tables["diagnostics_layers"].set_index(["norm_batch", "layer"])
    assert layers.loc[(2, 1), "batch_noise"] == pytest.approx(0.13) and layers.loc[(2, 1), "num_seeds"] == 3


def test_n_eff_is_reported_at_the_first_layer_only_never_as_exactness():
    result = build_study(synthetic_trials(5.0), spec(), diagnostics=diagnostics(0.12, 0.0, layers=3))
    layers = result.tables["diagnostics_layers"].set_index(["norm_batch", "layer"])
    assert layers.loc[(2, 1), "n_eff"] == 100.0 and layers.loc[[(2, 2), (2, 3)], "n_eff"].isna().all()
    assert "64,000,000,000" not in result.markdown and "nearly exact" not in result.markdown
    assert "The largest, 13.0%, is at layer 1." in result.markdown


def recomputed_diagnostics(running: float, recomputed: float) -> pd.DataFrame:
    """BN's test error with its running averages and with statistics recomputed over the training set."""
    rows = [("batchnorm", batch, seed, metric, np.nan, value) for batch in BATCHES for seed in SEEDS
            for metric, value in (("running_error", running), ("recomputed_error", recomputed))]
    return pd.DataFrame(rows, columns=["normalization", "batch_size", "seed", "metric", "layer", "value"])


@pytest.mark.parametrize("recomputed, meaning", [
    (1.0, "-2.00 points against the running averages (median of 3 seeds): precise statistics would help: the "
          "running averages are off."),
    (5.0, "+2.00 points against the running averages (median of 3 seeds): precise statistics would hurt: the "
          "running averages are off."),
    (3.25, "+0.25 points against the running averages (median of 3 seeds): the running averages are as good as "
           "precise statistics (within ±0.5)."),
], ids=["help", "hurt", "as-good"])
def test_recomputed_statistics_are_said_to_help_or_hurt_by_their_sign(recomputed, meaning):
    result = build_study(synthetic_trials(5.0), spec(), diagnostics=recomputed_diagnostics(3.0, recomputed))
    assert ("At batch 2, recomputing BN's statistics over the training set changes the final net's test error by "
            + meaning
            ) in result.markdown


def two_layer_noise(noise: tuple[float, float]) -> pd.DataFrame:
    """BN with two norm layers at every batch, each with its batch noise, every seed alike."""
    rows = [("batchnorm", batch, seed, metric, layer, value)
            for batch in BATCHES for seed in SEEDS
            for layer, level in ((1, noise[0]), (2, noise[1]))
            for metric, value in (("batch_noise", level), ("nominal", 64 * batch))]
    return pd.DataFrame(rows, columns=["normalization", "batch_size", "seed", "metric", "layer", "value"])


@pytest.mark.parametrize("noise, worst", [((0.05, 0.40), 2), ((0.40, 0.05), 1)], ids=["second-noisy", "first-noisy"])
def test_the_statistics_are_judged_by_their_noisiest_layer(noise, worst):
    markdown = build_study(synthetic_trials(5.0), spec(), diagnostics=two_layer_noise(noise)).markdown
    assert (f"is {100 * noise[0]:.1f}% at layer 1 (pooling 128 values per channel), {100 * noise[1]:.1f}% at layer 2 "
            f"(pooling 128 values per channel). The largest, 40.0%, is at layer {worst}.") in markdown


def test_two_values_per_statistic_is_called_degenerate():
    result = build_study(synthetic_trials(5.0), spec(), diagnostics=diagnostics(0.9, 40.0, nominal_per_image=1))
    assert ("At batch 2, BN's statistics at every norm layer pool 2 values per feature: normalised over 2 values, "
            "each feature becomes about ±1") in result.markdown
    assert "At batch 2, BN's train-mode and test-mode errors differ by +40.01 points" in result.markdown


def test_error_figure_keeps_its_axis_within_0_and_100_percent():
    trials = synthetic_trials(5.0, seeds=(0, 1))
    trials.loc[trials.seed == 1, "test_error"] += 60  # a two-seed interval far beyond 100%
    ax = build_study(trials, spec(seeds=(0, 1))).figures["error_vs_batch_size"].axes[0]
    low, high = ax.get_ylim()
    assert 0 <= low < high <= 100
    assert ax.get_xscale() == "log" and ax.xaxis_inverted()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32", "8", "2"]
    assert "n=2 seeds" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["BN", "precise BN", "GN"]


def test_a_lone_interaction_point_shows_its_interval_as_an_error_bar():
    trials = synthetic_trials(5.0).query("batch_size != 8")
    result = build_study(trials, spec(batch_sizes=(32, 2)))
    ax = result.figures[result.answer_figure].axes[0]
    x = result.tables["primary"].query("arm == 'batchnorm'").iloc[0]
    bars = [c for c in ax.collections if c.__class__.__name__ == "LineCollection"]
    segments = [s for c in bars for s in c.get_segments()]
    assert any(seg[0][1] == pytest.approx(x["low"]) and seg[1][1] == pytest.approx(x["high"]) for seg in segments)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "±0.5 points (no practical difference)" and "BN" in labels
    assert any(list(line.get_ydata()) == [0.0, 0.0] for line in ax.get_lines())


def test_tables_hold_each_arm_and_g():
    tables = build_study(synthetic_trials(5.0), spec(tail_evals=2)).tables
    assert {"updates", "cells", "final_cells", "best_val_cells", "changes", "primary", "differences", "interactions",
            "measures", "trials"} == set(tables)
    assert len(tables["trials"]) == len(synthetic_trials(5.0))  # the records the report was built from
    assert list(tables["cells"]["normalization"]) == ["batchnorm"] * 3 + ["batchnorm-precise"] * 3 + ["groupnorm"] * 3
    assert list(tables["cells"]["norm_batch"][:3]) == [32, 8, 2]
    assert len(tables["changes"]) == 6 and len(tables["primary"]) == 4


def test_no_finished_trial_gives_a_report_that_says_so():
    empty = synthetic_trials(0.0).iloc[:0]
    result = build_study(empty, spec())
    assert "No trial finished: there is nothing to compare." in result.markdown and not result.figures
    assert "![" not in result.markdown  # no link to a figure that was not drawn
    assert "18 trials planned, 0 finished; 18 did not finish" in result.markdown


def test_the_report_links_the_figures_it_was_drawn_with():
    result = build_study(synthetic_trials(5.0), spec())
    assert result.answer_figure == "interaction_vs_batch_size"
    for name in ("interaction_vs_batch_size", "error_vs_batch_size"):
        assert name in result.figures and f"]({name}.png)" in result.markdown


def test_embedded_markdown_and_html_carry_their_figures_in_the_page():
    result = build_study(synthetic_trials(5.0), spec())
    embedded = result.markdown_with_figures()
    assert "](interaction_vs_batch_size.png)" not in embedded
    assert len(re.findall(r"!\[[^\]]*\]\(data:image/png;base64,[A-Za-z0-9+/=]+\)", embedded)) == 2
    page = result.html()
    assert page.startswith("<!DOCTYPE html>") and page.count('<img src="data:image/png;base64,') == 2
    assert "<table>" in page and "<h2>The answer" in page
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # nothing outside the page is asked for


# ---------------------------------------------------------------- the sentences and tables, piece by piece


def _loss_row(g: int, mean: float, p_holm: float):
    from types import SimpleNamespace

    return SimpleNamespace(norm_batch=g, p_holm=p_holm, estimate=SimpleNamespace(mean=mean, p=p_holm))


def test_the_onset_is_the_largest_g_at_which_the_loss_survives_holm():
    from types import SimpleNamespace

    from flows.study.sections import onset_sentence

    ctx = SimpleNamespace(pair=("batchnorm", "batchnorm"), design=SimpleNamespace(norm_batch=True),
                          at=lambda g: f"g = {g}")
    rows = [_loss_row(16, 0.1, 0.3), _loss_row(8, 0.9, 0.001), _loss_row(4, 4.6, 0.0001), _loss_row(2, 53, 0.0001)]
    assert onset_sentence(rows, ctx) == "The largest g at which BN's loss is detected: g = 8."
    assert onset_sentence(rows[:1], ctx) == "No loss of BN is detected down to g = 16."


def test_an_arm_independent_of_g_sits_under_the_reference_and_says_same_trials_elsewhere():
    from types import SimpleNamespace

    from flows.study.sections import wide_cells

    cells = pd.DataFrame([
        {"normalization": "batchnorm", "norm_batch": 32, "mean": 1.0, "low": 0.8, "high": 1.2, "n": 5},
        {"normalization": "batchnorm", "norm_batch": 8, "mean": 1.9, "low": 1.5, "high": 2.3, "n": 5},
        {"normalization": "groupnorm", "norm_batch": np.nan, "mean": 1.4, "low": 1.1, "high": 1.7, "n": 5},
    ])
    ctx = SimpleNamespace(reference=32, design=SimpleNamespace(column=lambda g: f"g = {g}"))
    table = wide_cells(cells, ctx).set_index("arm")
    assert table.loc["GN", "g = 32"].startswith("1.40 [1.10, 1.70]") and table.loc["GN", "g = 8"] == "same trials"
    assert table.loc["BN", "g = 8"].startswith("1.90 [1.50, 2.30]")


def test_one_seed_is_said_in_the_singular():
    from flows.study.sections import smoke_prefix

    assert smoke_prefix(1) == "Smoke test (1 seed), not a result: "
    assert smoke_prefix(2) == "Smoke test (2 seeds), not a result: "
