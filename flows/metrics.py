"""The names of the MLflow metrics a training run logs, and of those a sweep's and a pipeline's runs log.

MLflow 3's charts (a run's Model metrics tab, an experiment's chart view) put a
metric named "<section>/<name>" in a section of that name, sections sorted
alphabetically, and every metric without a prefix in a last section, "Model
metrics". The prefixes below order a trial's charts as a reader wants them: its
test scores, then its learning curves, then its diagnostics; its speed last.

    accuracy/   test_acc (the best-validation net), final_test_acc (the final net), best_val_acc, and a
                study's final_precise_bn_test_acc (the final net with batch norm's statistics recomputed),
                tail_test_acc and tail_precise_test_acc (the means of the tail evaluations)
    curves/     loss per iteration, train_acc and val_acc per epoch, the tail evaluations by iteration
                (tail_test_acc, tail_precise_test_acc)
    diag/       how noisy the final net's normalization statistics were (flows.training.log_diagnostics)
    (none)      wall_time_s, images_per_s, batch_size (the x axis of the sweep's chart in MLflow)

A sweep's parent run and a pipeline's run log their key numbers under answer/ and
pipeline/, names no trial has, so they never add a bar to a trial's chart.

Runs logged before these names (``test_acc``, ``loss``, ...) are still read:
``read`` falls back to the old name.
"""

from __future__ import annotations

TEST_ACC = "accuracy/test_acc"
FINAL_TEST_ACC = "accuracy/final_test_acc"
BEST_VAL_ACC = "accuracy/best_val_acc"
PRECISE_BN_TEST_ACC = "accuracy/final_precise_bn_test_acc"
TAIL_TEST_ACC = "accuracy/tail_test_acc"
TAIL_PRECISE_TEST_ACC = "accuracy/tail_precise_test_acc"
LOSS = "curves/loss"
TRAIN_ACC = "curves/train_acc"
VAL_ACC = "curves/val_acc"
TAIL_CURVE_PREFIX = "curves/tail_"
DIAGNOSTICS_PREFIX = "diag/"
WALL_TIME_S = "wall_time_s"
IMAGES_PER_S = "images_per_s"
BATCH_SIZE = "batch_size"
ANSWER_PREFIX = "answer/"
PIPELINE_PREFIX = "pipeline/"

# Each name as runs logged it before the prefixes.
_OLD_NAMES = {name: name.rpartition("/")[2] for name in (TEST_ACC, FINAL_TEST_ACC, BEST_VAL_ACC,
                                                         PRECISE_BN_TEST_ACC, TAIL_TEST_ACC, TAIL_PRECISE_TEST_ACC,
                                                         LOSS, TRAIN_ACC, VAL_ACC)}


def read(metrics: dict[str, float], name: str) -> float | None:
    """The run's latest value of the metric name (under its old name for runs logged before), else None."""
    if name in metrics:
        return metrics[name]
    return metrics.get(_OLD_NAMES.get(name, name))
