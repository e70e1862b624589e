"""The study's report built from synthetic trials: its sections, sentences, tables and figures (no Prefect)."""

import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from flows.study import PAPER_ERROR, bn_vs_gn_spec, build_study, minimum_detectable_effect

SEEDS = (0, 1, 2)
BATCHES = (32, 8, 2)


def spec(**kwargs):
    fields = dict(normalizations=("batchnorm", "groupnorm"), batch_sizes=BATCHES, seeds=SEEDS, num_epochs=2,
                  num_train=100, num_test=300)
    return bn_vs_gn_spec(**{**fields, **kwargs})


def synthetic_trials(bn_extra_at_2: float, rng_seed: int = 0) -> pd.DataFrame:
    """BN and GN around 2-3% error with seed noise; BN gains bn_extra_at_2 points at batch 2."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for norm in ("batchnorm", "groupnorm"):
        for batch in BATCHES:
            for seed in SEEDS:
                extra = bn_extra_at_2 if (norm, batch) == ("batchnorm", 2) else 0.0
                rows.append((norm, batch, seed, 2.5 + extra + rng.normal(0, 0.4)))
    return pd.DataFrame(rows, columns=["normalization", "batch_size", "seed", "test_error"])


def without(trials: pd.DataFrame, norm: str, batch: int, seed: int) -> pd.DataFrame:
    return trials.drop(trials[(trials.normalization == norm) & (trials.batch_size == batch)
                              & (trials.seed == seed)].index)


def answer_row(markdown: str, batch: int) -> list[str]:
    """The cells of the answer table's row for batch."""
    section = markdown.split("## The answer")[1].split("\n## ")[0]
    (line,) = [line for line in section.splitlines() if line.startswith(f"| {batch} |")]
    return [c.strip() for c in line.strip("|").split("|")]


def test_sections_come_in_order_with_the_answer_first():
    markdown = build_study(synthetic_trials(5.0), spec(), provenance={"commit": "abc1234"}).markdown
    headings = ["# BN vs GN across batch sizes: digits", "Provenance:", "## Design", "## The answer",
                "## Each normalization's own change", "## Test error (%) of the final model",
                "## Secondary: the best-validation checkpoint", "## Why: the normalization statistics",
                "## How to read the verdicts"]
    positions = [markdown.index(h) for h in headings]
    assert positions == sorted(positions) and positions[0] == 0
    assert "- commit: `abc1234`" in markdown


def test_clean_run_says_every_trial_finished_and_answers_at_every_batch():
    markdown = build_study(synthetic_trials(5.0), spec()).markdown
    assert "All 18 planned trials finished." in markdown and "did not finish" not in markdown
    assert answer_row(markdown, 2)[-1] == "BN loses more than GN" and answer_row(markdown, 2)[1] == "3"
    assert answer_row(markdown, 8)[1] == "3"
    with pytest.raises(ValueError):  # the reference batch has no row: its interaction is 0 by definition
        answer_row(markdown, 32)


def test_failed_trial_is_counted_named_and_shrinks_n_where_it_pairs():
    trials = without(synthetic_trials(5.0), "groupnorm", 2, 1)
    markdown = build_study(trials, spec()).markdown
    assert "18 trials planned, 17 finished; 1 did not finish and is left out: GN batch 2 seed 1." in markdown
    assert answer_row(markdown, 2)[1] == "2" and answer_row(markdown, 8)[1] == "3"
    assert "Seed 1 left out: not finished in all four trials." in markdown
    assert "(n=2)" in markdown.split("## Test error")[1].split("## Secondary")[0]


def test_answer_row_matches_the_interaction_computed_by_hand():
    trials = synthetic_trials(5.0)
    e = trials.set_index(["normalization", "batch_size", "seed"])["test_error"]
    d = np.array([(e["batchnorm", 2, s] - e["batchnorm", 32, s]) - (e["groupnorm", 2, s] - e["groupnorm", 32, s])
                  for s in SEEDS])
    low, high = stats.t.interval(0.95, 2, loc=d.mean(), scale=d.std(ddof=1) / math.sqrt(3))
    row = answer_row(build_study(trials, spec()).markdown, 2)
    assert row[2:5] == [f"{d.mean():+.2f}", f"[{low:.2f}, {high:.2f}]",
                        f"{minimum_detectable_effect(3, d.std(ddof=1)):.2f}"]


def test_a_detected_interaction_either_way_is_said_with_a_positive_size():
    """Who loses more is in the words; the size is how much more, a positive number of points."""
    for bn_extra, loser, winner in ((5.0, "BN", "GN"), (-5.0, "GN", "BN")):
        result = build_study(synthetic_trials(bn_extra), spec())
        row = result.tables["interactions"].query("batch_size == 2").iloc[0]
        assert (row["mean"] > 0) == (bn_extra > 0) and row.verdict == f"{loser} loses more than {winner}"
        assert (f"At batch 2: {loser} loses more than {winner}, by {abs(row['mean']):.2f} points "
                f"(95% CI [{row.low:.2f}, {row.high:.2f}], 3 seeds).") in result.markdown


def test_nothing_detected_is_said_plainly_with_the_mde():
    result = build_study(synthetic_trials(0.0), spec())
    row = result.tables["interactions"].query("batch_size == 2").iloc[0]
    assert row.low < 0 < row.high and row.verdict == "cannot tell"
    assert (f"At batch 2: nothing detected and nothing ruled out: the interval [{row.low:.2f}, {row.high:.2f}] "
            f"(3 seeds) contains 0") in result.markdown
    assert f"an interaction of {row.mde:.2f} points or more would have been detected with 80% probability" \
        in result.markdown


def test_a_run_that_detects_nothing_anywhere_says_the_smallest_effect_it_could_see():
    result = build_study(synthetic_trials(0.0, rng_seed=3), spec())
    rows = result.tables["interactions"]
    assert set(rows["verdict"]) == {"cannot tell"}
    smallest = rows.loc[rows["mde"].idxmin()]
    assert (f"Nothing was detected and nothing ruled out at any batch size: the run could not reliably detect an "
            f"interaction smaller than {smallest.mde:.2f} points (its smallest MDE, at batch {smallest.batch_size})."
            ) in result.markdown


def test_one_seed_run_cannot_tell():
    trials = synthetic_trials(5.0).query("seed == 0")
    markdown = build_study(trials, spec(seeds=(0,))).markdown
    assert answer_row(markdown, 2)[3:] == ["—", "—", "cannot tell: one seed"]
    assert "At batch 2: cannot tell: one seed (seed 0) finished all four trials, so no interval." in markdown
    assert "Nothing can be said: no batch size has two seeds finished in all four trials." in markdown
    assert "Over 1 seed; (n=k) marks a cell with fewer finished trials." in markdown


@pytest.mark.parametrize("num_test, points", [(300, "0.33"), (50, "2.00"), (1000, "0.10")])
def test_the_design_says_what_one_test_image_is_worth(num_test, points):
    markdown = build_study(synthetic_trials(5.0), spec(num_test=num_test)).markdown
    design = markdown.split("## Design")[1].split("\n## ")[0]
    assert f"({num_test} test images, one image = {points} points)" in design


def test_the_full_preset_answers_bn_against_gn_with_the_others_as_baselines():
    """bn-vs-gn runs every normalization: its answer is BN vs GN (the paper's), never BN vs LN, and the
    other normalizations come after it as baselines."""
    full = bn_vs_gn_spec(batch_sizes=BATCHES, seeds=SEEDS, num_epochs=2, num_train=100, num_test=300)
    rng = np.random.default_rng(0)
    trials = pd.DataFrame([(t.normalization, t.batch_size, t.train_seed, 2.5 + rng.normal(0, 0.4))
                           for t in full.trials()], columns=["normalization", "batch_size", "seed", "test_error"])
    assert set(trials.normalization) == {"batchnorm", "groupnorm", "layernorm", "instancenorm", "none"}
    result = build_study(trials, full)
    assert result.markdown.startswith("# BN vs GN across batch sizes: digits")
    answer = result.markdown.split("## The answer")[1].split("\n## ")[0]
    assert answer.startswith(": does BN lose more than GN as the batch shrinks?")
    assert "Per seed, (BN(b) - BN(32)) - (GN(b) - GN(32))" in answer
    assert result.answer.startswith("Does BN lose more than GN as the batch shrinks from 32?")
    against = [line.split("|")[1].strip() for line in answer.splitlines() if line.startswith("| ") and
               line.split("|")[1].strip() not in ("against", "batch")]
    assert against[:2] == ["8", "2"]  # the primary table first: GN's rows, no "against" column
    assert sorted(set(against[2:])) == ["IN", "LN", "no norm"]
    primary = result.tables["interactions"].query("b == 'groupnorm'")
    assert list(primary["batch_size"]) == [8, 2]
    assert result.figures["interaction_vs_batch_size"].axes[0].get_ylabel() == "extra error of BN over GN (points)"


def test_report_lists_the_paper_beside_this_run():
    markdown = build_study(synthetic_trials(5.0), spec()).markdown
    section = markdown.split("## Test error")[1].split("## Secondary")[0]
    assert "Wu & He, Group Normalization, ECCV 2018, Table 2" in section
    assert f"| BN | {PAPER_ERROR['batchnorm'][32]} |" in section and f"{PAPER_ERROR['batchnorm'][2]} |" in section


def test_missing_best_validation_errors_are_said_to_be_missing():
    markdown = build_study(synthetic_trials(5.0).assign(best_val_test_error=np.nan), spec()).markdown
    assert "## Secondary: the best-validation checkpoint's test error (%)\n\nNot recorded for these trials." \
        in markdown


def test_updates_follow_the_solvers_iterations_per_epoch():
    """The Solver runs max(N // b, 1) iterations per epoch; 100 images, 2 epochs."""
    updates = build_study(synthetic_trials(5.0), spec(batch_sizes=(128, 32, 8, 2)),
                          num_train=100).tables["updates"].set_index("batch_size")
    assert updates["iterations_per_epoch"].to_dict() == {128: 1, 32: 3, 8: 12, 2: 50}
    assert updates.loc[2, "updates"] == 100 and updates.loc[2, "learning_rate"] == pytest.approx(0.02 * 2 / 32)


def test_without_diagnostics_the_report_says_it_cannot_say_why():
    result = build_study(synthetic_trials(5.0), spec())
    assert "No diagnostics were recorded for this run" in result.markdown
    assert "diagnostics_layers" not in result.tables


# Per-seed offsets whose median (1) is far from their mean (11): a summary over seeds that took the
# mean would print other numbers than the report's median.
SKEW = (0.0, 1.0, 32.0)


def diagnostics(n_eff_at_2: float, train_mode_at_2: float) -> pd.DataFrame:
    """BN's diagnostics per seed: n_eff at batch 2 is n_eff_at_2 + SKEW[seed] (median n_eff_at_2 + 1), the
    train-mode error 3 + train_mode_at_2 + SKEW[seed] - 1 at batch 2 (median gap train_mode_at_2)."""
    rows = []
    for batch in BATCHES:
        for seed in SEEDS:
            rows += [("batchnorm", batch, seed, "n_eff", 1, n_eff_at_2 * batch / 2 + SKEW[seed]),
                     ("batchnorm", batch, seed, "nominal", 1, 64 * batch),
                     ("batchnorm", batch, seed, "train_mode_error", np.nan,
                      3 + (train_mode_at_2 if batch == 2 else 0) + SKEW[seed] - 1),
                     ("batchnorm", batch, seed, "test_mode_error", np.nan, 3.0)]
    return pd.DataFrame(rows, columns=["normalization", "batch_size", "seed", "metric", "layer", "value"])


def test_diagnostics_explain_a_null_from_the_effective_sample_size():
    result = build_study(synthetic_trials(0.0), spec(), diagnostics=diagnostics(489.0, 0.0))
    assert ("BN's batch statistics at batch 2 have a median effective sample size of 490 at its only norm layer "
            "(pooling 128 values): nearly exact") in result.markdown
    layers = result.tables["diagnostics_layers"].set_index(["batch_size", "layer"])
    assert layers.loc[(2, 1), "n_eff"] == 490 and layers.loc[(2, 1), "num_seeds"] == 3


def test_diagnostics_explain_a_positive_from_the_train_test_mode_gap():
    result = build_study(synthetic_trials(5.0), spec(), diagnostics=diagnostics(3.0, 40.0))
    assert "At batch 2, BN's train-mode and test-mode errors differ by +40.00 points" in result.markdown
    assert re.search(r"effective sample size of [\d.]+ at its only norm layer \(pooling 128 values\): noisy",
                     result.markdown)
    assert result.tables["diagnostics_model"].set_index("batch_size").loc[2, "train_minus_test_mode"] == 40.0


def recomputed_diagnostics(running: float, recomputed: float) -> pd.DataFrame:
    """BN's test error with its running averages and with statistics recomputed over the training set."""
    rows = [("batchnorm", batch, seed, metric, np.nan, value) for batch in BATCHES for seed in SEEDS
            for metric, value in (("running_error", running), ("recomputed_error", recomputed))]
    return pd.DataFrame(rows, columns=["normalization", "batch_size", "seed", "metric", "layer", "value"])


@pytest.mark.parametrize("recomputed, meaning", [
    (1.0, "-2.00 points against the running averages (median of 3 seeds): exact statistics would help: the "
          "running averages are off."),
    (5.0, "+2.00 points against the running averages (median of 3 seeds): exact statistics would hurt: the "
          "running averages are off."),
    (3.25, "+0.25 points against the running averages (median of 3 seeds): the running averages are as good as "
           "exact statistics (within ±0.5)."),
], ids=["help", "hurt", "as-good"])
def test_recomputed_statistics_are_said_to_help_or_hurt_by_their_sign(recomputed, meaning):
    result = build_study(synthetic_trials(5.0), spec(), diagnostics=recomputed_diagnostics(3.0, recomputed))
    assert ("At batch 2, recomputing BN's statistics over the training set changes its test error by " + meaning
            ) in result.markdown


def two_layer_diagnostics(n_eff: tuple[float, float]) -> pd.DataFrame:
    """BN with two norm layers at every batch, layer 1's n_eff n_eff[0] and layer 2's n_eff[1], every seed."""
    rows = [("batchnorm", batch, seed, metric, layer, value)
            for batch in BATCHES for seed in SEEDS
            for layer, n in ((1, n_eff[0]), (2, n_eff[1]))
            for metric, value in (("n_eff", n), ("nominal", 64 * batch))]
    return pd.DataFrame(rows, columns=["normalization", "batch_size", "seed", "metric", "layer", "value"])


@pytest.mark.parametrize("n_eff, said", [((5.0, 500.0), ("5.0", "500")), ((500.0, 5.0), ("500", "5.0"))],
                         ids=["first-noisy", "second-noisy"])
def test_the_statistics_are_judged_by_their_worst_layer(n_eff, said):
    """The batch mean's sd is 100/sqrt(5) = 45% of the feature's at the layer with n_eff 5: noisy, whichever
    layer that is."""
    markdown = build_study(synthetic_trials(5.0), spec(), diagnostics=two_layer_diagnostics(n_eff)).markdown
    assert ("BN's batch statistics at batch 2 have a median effective sample size of "
            f"{said[0]} at layer 1 (pooling 128 values), {said[1]} at layer 2 (pooling 128 values): "
            "noisy (the batch mean's sd is 45% of the feature's at the worst layer)") in markdown


def test_error_figure_shows_real_batch_sizes_largest_on_the_left():
    ax = build_study(synthetic_trials(5.0), spec()).figures["error_vs_batch_size"].axes[0]
    assert ax.get_xscale() == "log" and ax.xaxis_inverted()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32", "8", "2"]
    assert "over 3 seeds" in ax.get_title() and "final model" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["BN", "GN"]


def test_interaction_figure_has_the_zero_line_and_the_delta_band():
    ax = build_study(synthetic_trials(5.0), spec(), delta=0.7).figures["interaction_vs_batch_size"].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "±0.7 points (no practical difference)" and "95% CI" in labels
    assert any(list(line.get_ydata()) == [0.0, 0.0] for line in ax.get_lines())


def test_tables_hold_each_normalization_and_batch():
    tables = build_study(synthetic_trials(5.0), spec()).tables
    assert set(tables) == {"updates", "cells", "best_val_cells", "changes", "interactions", "trials"}
    assert len(tables["trials"]) == len(synthetic_trials(5.0))  # the records the report was built from
    assert len(tables["cells"]) == 6 and list(tables["cells"]["normalization"][:3]) == ["batchnorm"] * 3
    assert list(tables["cells"]["batch_size"][:3]) == [32, 8, 2]
    assert len(tables["changes"]) == 4 and len(tables["interactions"]) == 2


def test_no_finished_trial_gives_a_report_that_says_so():
    empty = synthetic_trials(0.0).iloc[:0]
    result = build_study(empty, spec())
    assert "No trial finished: there is nothing to compare." in result.markdown and not result.figures
    assert "![" not in result.markdown  # no link to a figure that was not drawn
    assert "18 trials planned, 0 finished; 18 did not finish" in result.markdown


def test_the_report_links_the_figures_it_was_drawn_with():
    result = build_study(synthetic_trials(5.0), spec())
    for name in ("interaction_vs_batch_size", "error_vs_batch_size"):
        assert name in result.figures and f"]({name}.png)" in result.markdown
