"""What a sweep returns: one result per trial, and the sweep's report."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from ..config import SweepSpec, TrainConfig
from ..tracking import FINISHED


class TrialResult(BaseModel):
    index: int
    key: str
    run_id: str
    run_name: str
    status: Literal["FINISHED", "FAILED"]
    skipped: bool = False  # finished in an earlier run of the sweep
    best_val_acc: float | None = None
    test_acc: float | None = None  # the best-validation net's
    final_test_acc: float | None = None  # the final net's
    final_val_acc: float | None = None  # the final net's (its last validation check): what choices are made by
    # The tail evaluations' means (TrainConfig.tail_evals): the studies' measure, and for batch norm the same
    # with precise statistics (the final net's precise score is a diagnostic: diag/recomputed_error).
    tail_test_acc: float | None = None
    tail_precise_test_acc: float | None = None
    wall_time_s: float | None = None
    diagnostics: dict[str, float] = {}  # cnncore.diagnostics of the final net, when the config asked
    commit: str = ""  # the code that trained it (its run's mlflow.source.git.commit)
    blas: str = ""  # the BLAS that trained it (provenance.blas(): library, kernel, threads)
    failure_reason: str | None = None
    config: TrainConfig


class SweepReport(BaseModel):
    name: str
    parent_run_id: str
    url: str = ""  # the parent run's page in the MLflow UI
    trials: list[TrialResult]
    best: TrialResult | None
    wall_time_s: float
    study_report: str | None = None  # the markdown report of a study preset
    comparison_title: str = ""
    answer: str = ""  # a study's answer in one paragraph
    # What the sweep found, one record per configuration: the study's cell table, or for another grid
    # one row per normalization and combination of the other swept fields but the seed (flows.sweep.comparison).
    comparison: list[dict] = []
    # A grid's paired differences between normalizations, one record per column (flows.sweep.comparison).
    differences: list[dict] = []
    # A grid's configuration with the lowest validation error, and the rule (flows.sweep.comparison.Choice).
    choice: dict | None = None
    # The sweep's trials in MLflow's own charts, grouped by normalization against batch size (a saved view).
    charts_url: str = ""

    @property
    def failed(self) -> list[TrialResult]:
        return [t for t in self.trials if t.status != FINISHED]


def trial_name(spec: SweepSpec, index: int, config: TrainConfig) -> str:
    """e.g. "bn-vs-gn/03 groupnorm batch_size=8": the sweep, the index and the swept values."""
    swept = [f"{k}={getattr(config, k)}" for k in spec.swept() if k != "normalization"]
    return f"{spec.name}/{index:02d} {config.normalization} {' '.join(swept)}".strip()


def best_trial(results: list[TrialResult]) -> TrialResult | None:
    """The finished trial with the best validation accuracy (the first of equals)."""
    return max((r for r in results if r.status == FINISHED), key=lambda r: r.best_val_acc, default=None)
