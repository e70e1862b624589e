"""A study's trials: the records a sweep hands the study, the design that relates them, the arms they make.

A record is one finished trial: normalization, batch_size (the SGD batch), norm_batch
(the images each batch-norm statistic is computed over: the SGD batch unless the trial
set a smaller one, ghost batch norm), seed, run_id, and its errors in percent:

- test_error: the study's measure, the mean test error over the trial's tail
  evaluations (TrainConfig.tail_evals; the final net's error when it had none);
- final_test_error: the final net's; best_val_test_error: the best-validation net's;
- precise_test_error, final_precise_test_error: batch norm only, the same evaluations
  with its statistics recomputed over training images (precise BN) instead of the
  running averages.

Two designs relate the trials (design_of reads which from the sweep):

- the normalization-batch design: the SGD batch and learning rate fixed, g =
  norm_batch swept: only batch norm's statistics change with g, as the paper's
  images per GPU did, so group norm (and every arm without batch statistics) runs
  once per seed and stands for every g;
- the single-device design: g = the SGD batch, swept with the learning rate scaled
  linearly: what a user on one device lives with, where g also changes the gradient
  noise and the number of updates.

arms() turns records into what the statistics read: one row per arm x g x seed, where
an arm is a normalization or PRECISE (batch norm read with precise statistics), and g
is missing (NaN) for an arm that does not depend on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from ..config import SweepSpec
from .statistics import MEASURES

PRECISE = "batchnorm-precise"
RECORD_COLUMNS = ["normalization", "batch_size", "norm_batch", "seed", "test_error", "final_test_error",
                  "best_val_test_error", "precise_test_error", "final_precise_test_error", "run_id"]
# The measures of the precise arm, read from a batch-norm record's precise columns.
PRECISE_MEASURES = {"test_error": "precise_test_error", "final_test_error": "final_precise_test_error"}


@dataclass(frozen=True)
class Design:
    """How a study's trials vary g: 'norm-batch' or 'single-device' (see the module's docstring)."""

    name: str

    @property
    def norm_batch(self) -> bool:
        return self.name == "norm-batch"

    @property
    def title(self) -> str:
        return "the normalization-batch design" if self.norm_batch else "the single-device design"

    @property
    def axis(self) -> str:
        """The x axis of the study's figures."""
        return ("images per batch-norm statistic, g (SGD batch fixed)" if self.norm_batch
                else "batch size (images per step and per batch-norm statistic)")

    def at(self, g: int | None) -> str:
        """'g = 4' or 'batch 4'; for an arm independent of g, 'any g'."""
        if g is None:
            return "any g"
        return f"g = {g}" if self.norm_batch else f"batch {g}"

    def at_all(self, levels) -> str:
        """'g = 16, 8' or 'batch 16, 8'."""
        return f"{'g =' if self.norm_batch else 'batch'} {', '.join(map(str, levels))}"

    def column(self, g: int) -> str:
        """A table's column heading for g."""
        return f"g = {g}" if self.norm_batch else f"batch {g}"


NORM_BATCH, SINGLE_DEVICE = Design("norm-batch"), Design("single-device")


def design_of(spec: SweepSpec) -> Design:
    """The normalization-batch design when the sweep varies norm_batch, else the single-device design.

    A sweep that varies both would cross SGD batches with normalization batches, which
    neither design's contrasts read: refused.
    """
    swept = set(spec.swept())
    if "norm_batch" in swept and "batch_size" in swept:
        raise ValueError(f"sweep {spec.name!r} varies both batch_size and norm_batch; a study varies one: "
                         f"norm_batch at a fixed SGD batch (the normalization-batch design) or batch_size "
                         f"(the single-device design)")
    return NORM_BATCH if "norm_batch" in swept else SINGLE_DEVICE


def require_records(records: pd.DataFrame) -> pd.DataFrame:
    """records with every record column (NaN where absent; norm_batch = batch_size where unset)."""
    if not isinstance(records, pd.DataFrame):
        raise ValueError(f"trials must be a pandas DataFrame, got {type(records).__name__}")
    missing = [c for c in ("normalization", "batch_size", "seed", "test_error") if c not in records.columns]
    if missing:
        raise ValueError(f"trials lacks columns {missing}; expected {RECORD_COLUMNS}, got {list(records.columns)}")
    frame = records.copy()
    for column in RECORD_COLUMNS:
        if column not in frame.columns:
            frame[column] = "" if column == "run_id" else math.nan
    frame["norm_batch"] = frame["norm_batch"].fillna(frame["batch_size"])
    return frame[[*RECORD_COLUMNS, *(c for c in frame.columns if c not in RECORD_COLUMNS)]].astype(
        {"batch_size": int, "norm_batch": int, "seed": int})


def arms(records: pd.DataFrame, design: Design) -> pd.DataFrame:
    """One row per arm x g x seed (normalization, norm_batch, seed and the statistics' MEASURES).

    In the normalization-batch design every arm but batch norm's has g missing (one
    cell standing for every g). Batch norm records with a precise error add a PRECISE
    row (its best-validation error is not measured: NaN).
    """
    frame = require_records(records)
    long = frame[["normalization", "norm_batch", "seed", *MEASURES]].astype({"norm_batch": float})
    if design.norm_batch:
        long.loc[long["normalization"] != "batchnorm", "norm_batch"] = math.nan
    bn = frame[(frame["normalization"] == "batchnorm") & frame["precise_test_error"].notna()]
    precise = pd.DataFrame({"normalization": PRECISE, "norm_batch": bn["norm_batch"].astype(float),
                            "seed": bn["seed"], **{m: bn[c] for m, c in PRECISE_MEASURES.items()},
                            "best_val_test_error": math.nan})
    return pd.concat([long, precise], ignore_index=True) if not precise.empty else long.reset_index(drop=True)
