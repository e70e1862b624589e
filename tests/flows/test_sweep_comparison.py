"""A grid's comparison: cells over seeds, paired differences, the answer in words, the rule that picks, the figure.

Built from TrialResults made here, so every number can be checked by hand.
"""

import math

import numpy as np
import pytest
from scipy import stats

from flows.config import SweepSpec, TrainConfig
from flows.figures import sweep_comparison_figure
from flows.sweep.comparison import choose, compare, wide_rows
from flows.sweep.results import TrialResult

BASE = TrainConfig(num_filters=4, num_groups=2)
SPACE = {"normalization": ["batchnorm", "groupnorm"], "batch_size": [32, 2], "train_seed": [0, 1, 2]}
# Test errors (%) by (normalization, batch size): one per seed. GN beats BN at batch 2 by 3, 4 and 5 points.
ERRORS = {("batchnorm", 32): [3.0, 4.0, 3.5], ("groupnorm", 32): [3.5, 3.0, 4.5],
          ("batchnorm", 2): [9.0, 10.0, 12.0], ("groupnorm", 2): [6.0, 6.0, 7.0]}
VAL_ERRORS = {("batchnorm", 32): 2.0, ("groupnorm", 32): 3.0, ("batchnorm", 2): 8.0, ("groupnorm", 2): 5.0}


def trial(index: int, config: TrainConfig, test_error: float | None, val_error: float | None) -> TrialResult:
    status = "FINISHED" if test_error is not None else "FAILED"
    acc = (lambda e: None if e is None else 1 - e / 100)
    # The best-validation net's errors differ from the final net's, so that a mix-up shows.
    return TrialResult(index=index, key=config.key(), run_id=f"run{index}", run_name=f"t/{index:02d}", status=status,
                       best_val_acc=acc(None if val_error is None else val_error - 1),
                       test_acc=acc(None if test_error is None else test_error + 1), final_test_acc=acc(test_error),
                       final_val_acc=acc(val_error), config=config)


def results(spec: SweepSpec, errors=ERRORS, val_errors=VAL_ERRORS, failed=()) -> list[TrialResult]:
    out = []
    for i, c in enumerate(spec.trials()):
        cell = (c.normalization, c.batch_size)
        if (cell, c.train_seed) in failed:
            out.append(trial(i, c, None, None))
        else:
            out.append(trial(i, c, errors[cell][c.train_seed], val_errors[cell] + 0.1 * c.train_seed))
    return out


@pytest.fixture
def spec() -> SweepSpec:
    return SweepSpec(name="grid", base=BASE, space=SPACE, lr_reference_batch=32)


def t_interval(values) -> tuple[float, float]:
    values = np.asarray(values)
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return values.mean() - half, values.mean() + half


def test_cells_are_the_final_nets_error_over_seeds_with_t_intervals(spec):
    found = compare(spec, results(spec))
    assert found.columns == ["batch_size"] and found.seeds == [0, 1, 2]
    cells = found.cells.set_index(["normalization", "batch_size"])
    assert list(found.cells["column"]) == ["batch 32", "batch 2"] * 2  # largest batch first, BN's rows first
    for (norm, batch), errors in ERRORS.items():
        cell = cells.loc[(norm, batch)]
        assert cell["n"] == 3 and cell["trials"] == 3 and cell["mean"] == pytest.approx(np.mean(errors))
        assert (cell["low"], cell["high"]) == pytest.approx(t_interval(errors))


def test_differences_are_bn_minus_gn_paired_by_seed_with_their_verdicts(spec):
    found = compare(spec, results(spec))
    rows = found.differences.set_index("batch_size")
    paired = np.subtract(ERRORS["batchnorm", 2], ERRORS["groupnorm", 2])  # 3, 4, 5
    assert rows.loc[2, "label"] == "BN − GN" and rows.loc[2, "n"] == 3
    assert rows.loc[2, "mean"] == pytest.approx(4.0)
    assert (rows.loc[2, "low"], rows.loc[2, "high"]) == pytest.approx(t_interval(paired))
    assert rows.loc[2, "verdict"] == "GN better" and rows.loc[32, "verdict"] == "cannot tell"
    assert found.title == ("Test error (%) of the final nets: mean and 95% CI over 3 seeds (train_seed 0-2); "
                           "BN − GN: paired by seed (positive: GN better)")
    low, high = t_interval(paired)
    assert found.answer.startswith(f"BN against GN: GN beats BN at batch 2 by 4.00 points (95% CI {low:.2f} to "
                                   f"{high:.2f}, n=3); cannot tell at batch 32 (the intervals contain 0; a "
                                   "difference under ")


def test_a_failed_trial_counts_in_trials_not_in_n_and_drops_its_seed_from_the_pairs(spec):
    found = compare(spec, results(spec, failed={(("batchnorm", 2), 1)}))
    cell = found.cells.set_index(["normalization", "batch_size"]).loc[("batchnorm", 2)]
    assert (cell["trials"], cell["n"]) == (3, 2) and cell["mean"] == pytest.approx(10.5)
    assert found.differences.set_index("batch_size").loc[2, "n"] == 2
    rows = {row[""]: row for row in wide_rows(found.cells.to_dict("records"), found.differences.to_dict("records"))}
    assert rows["batchnorm"]["batch 2"].endswith("(n=2)") and not rows["groupnorm"]["batch 2"].endswith(")")
    assert rows["BN − GN"]["batch 2"].endswith(" n=2")


def test_the_table_as_it_is_read_has_a_row_per_normalization_and_the_difference():
    spec = SweepSpec(name="grid", base=BASE, space=SPACE)
    found = compare(spec, results(spec))
    rows = wide_rows(found.cells.to_dict("records"), found.differences.to_dict("records"))
    assert [row[""] for row in rows] == ["batchnorm", "groupnorm", "BN − GN"]
    assert list(rows[0]) == ["", "batch 32", "batch 2"]
    low, high = t_interval(ERRORS["batchnorm", 2])
    assert rows[0]["batch 2"] == f"10.33 [{low:.2f}, {high:.2f}]"
    low, high = t_interval([3, 4, 5])
    assert rows[2]["batch 2"] == f"+4.00 [{low:.2f}, {high:.2f}] n=3"


def test_one_seed_gives_no_interval_and_says_the_run_is_a_smoke_test():
    spec = SweepSpec(name="quick", base=BASE,
                     space={"normalization": ["batchnorm", "groupnorm"], "batch_size": [32, 2]})
    found = compare(spec, results(spec))
    assert found.title == "Test error (%) of the final nets: one seed per cell, so no interval; BN − GN: paired by " \
                          "seed (positive: GN better)"
    assert "one seed: no interval at batch 32, 2" in found.answer and "beats" not in found.answer
    assert found.answer.endswith("Only 1 seed per cell: a smoke test, whose intervals mean little.")
    assert wide_rows(found.cells.to_dict("records"), [])[0]["batch 2"] == "9.00"


def test_the_rule_picks_the_lowest_mean_validation_error_at_a_batch_size_never_the_test_error(spec):
    # At batch 2 GN has the lower validation error (5.1 against 8.1); over all trials BN at batch 32 does.
    at_2 = choose(spec, results(spec), batch_size=2)
    assert (at_2.config.normalization, at_2.config.batch_size, at_2.label, at_2.n) == ("groupnorm", 2, "groupnorm", 3)
    assert at_2.val_error == pytest.approx(5.1) and at_2.others == [("batchnorm", pytest.approx(8.1), 3)]
    assert at_2.rule.startswith("the lowest validation error at batch 2 (final nets, mean over seeds")
    overall = choose(spec, results(spec))
    assert overall.label == "batchnorm, batch_size=32" and overall.val_error == pytest.approx(2.1)
    # Test errors that say the opposite change nothing.
    flipped = {cell: [100 - e for e in errors] for cell, errors in ERRORS.items()}
    assert choose(spec, results(spec, errors=flipped), batch_size=2).label == "groupnorm"


def test_the_figure_puts_batch_size_on_x_largest_first_with_a_line_and_intervals_per_normalization(spec):
    found = compare(spec, results(spec))
    figure = sweep_comparison_figure(found.cells, found.columns, "grid")
    ax = figure.axes[0]
    assert ax.get_title() == "sweep grid: 12 trials\neach point: mean and 95% CI over seeds (n=3)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32", "2"] and ax.xaxis_inverted()
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["BN", "GN"]
    low, high = ax.get_ylim()
    assert 0 <= low and high <= 100
    bn = ax.containers[0]  # the error bars of the first line, BN: mean at each batch size, then the caps
    assert list(bn.lines[0].get_ydata()) == pytest.approx([np.mean(ERRORS["batchnorm", 32]),
                                                          np.mean(ERRORS["batchnorm", 2])])


def test_a_tie_goes_to_the_configuration_run_first_and_the_rule_says_so(spec):
    tied = {**VAL_ERRORS, ("groupnorm", 32): VAL_ERRORS["batchnorm", 32]}
    choice = choose(spec, results(spec, val_errors=tied), batch_size=32)
    assert choice.label == "batchnorm" and choice.rule.endswith("; a tie goes to the configuration run first")
    assert not choose(spec, results(spec), batch_size=32).rule.endswith("run first")


def test_the_figure_draws_an_arm_that_no_x_applies_to_across_the_axis():
    """A sweep of batch norm's normalization batch: group norm's cell has no g (NaN), and is drawn as a level."""
    import pandas as pd

    cells = pd.DataFrame([
        {"normalization": "batchnorm", "norm_batch": 32, "n": 2, "mean": 40.0, "low": 30.0, "high": 50.0},
        {"normalization": "batchnorm", "norm_batch": 4, "n": 2, "mean": 60.0, "low": 50.0, "high": 70.0},
        {"normalization": "groupnorm", "norm_batch": np.nan, "n": 2, "mean": 45.0, "low": 35.0, "high": 55.0},
    ])
    figure = sweep_comparison_figure(cells, ["norm_batch"], "normbatch")
    ax = figure.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(legend) == ["BN", "GN (same trials at every norm_batch)"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32", "4"]
    assert any(list(line.get_ydata()) == [45.0, 45.0] for line in ax.get_lines())
