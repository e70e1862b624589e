"""The metric names a run logs: their order in MLflow's charts, and the old names still read."""

from flows import metrics


def mlflow_sections(names: list[str]) -> list[str]:
    """The chart sections MLflow 3.17 shows for these metric names, in its order: each prefix a section, sorted by
    name, then every unprefixed metric in a last section "Model metrics" (RunsChartsSectionAccordion)."""
    prefixes = sorted({name.rpartition("/")[0] for name in names if "/" in name}, key=str.lower)
    return prefixes + (["Model metrics"] if any("/" not in name for name in names) else [])


def test_a_trials_charts_read_scores_then_learning_curves_then_diagnostics_then_speed():
    names = [metrics.TEST_ACC, metrics.FINAL_TEST_ACC, metrics.BEST_VAL_ACC, metrics.LOSS, metrics.TRAIN_ACC,
             metrics.VAL_ACC, f"{metrics.DIAGNOSTICS_PREFIX}train_mode_error", metrics.WALL_TIME_S,
             metrics.IMAGES_PER_S, metrics.BATCH_SIZE]
    assert mlflow_sections(names) == ["accuracy", "curves", "diag", "Model metrics"]


def test_a_parents_and_a_pipelines_numbers_share_no_name_with_a_trials():
    trial = {metrics.TEST_ACC, metrics.FINAL_TEST_ACC, metrics.BEST_VAL_ACC, metrics.LOSS, metrics.TRAIN_ACC,
             metrics.VAL_ACC, metrics.WALL_TIME_S, metrics.IMAGES_PER_S, metrics.BATCH_SIZE}
    assert not any(name.startswith((metrics.ANSWER_PREFIX, metrics.PIPELINE_PREFIX)) for name in trial)


def test_runs_logged_under_the_old_names_are_still_read():
    assert metrics.read({"test_acc": 0.9}, metrics.TEST_ACC) == 0.9
    assert metrics.read({"val_acc": 0.8, "best_val_acc": 0.85}, metrics.VAL_ACC) == 0.8
    assert metrics.read({"accuracy/test_acc": 0.95, "test_acc": 0.9}, metrics.TEST_ACC) == 0.95  # the new name wins
    assert metrics.read({}, metrics.TEST_ACC) is None
    assert metrics.read({"wall_time_s": 2.0}, metrics.WALL_TIME_S) == 2.0
