"""The names the tracking package shares: run statuses, MLflow's own tags, and the plain record a read returns."""

from __future__ import annotations

from dataclasses import dataclass

from ..credentials import mask

TAG_FLOW_RUN_ID = "prefect.flow_run_id"
TAG_FLOW_RUN_NAME = "prefect.flow_run_name"
TAG_FLOW_NAME = "prefect.flow_name"

FINISHED, FAILED, KILLED, RUNNING = "FINISHED", "FAILED", "KILLED", "RUNNING"
# MLflow's own tags (mlflow.utils.mlflow_tags), spelled out so that reading them needs no mlflow import.
MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"
MLFLOW_RUN_NAME = "mlflow.runName"
MLFLOW_DATASET_CONTEXT = "mlflow.data.context"
MLFLOW_NOTE = "mlflow.note.content"  # a run's description, the first thing its Overview shows

# MLflow 3's UI opens an experiment in the view its kind names: this one is the runs table and
# charts ("Model training"); an experiment without the tag may open in the GenAI view.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# MLflow's limit: a tag holds at most 8000 characters.
MAX_TAG_CHARS = 8000


def failure_reason(exc: BaseException) -> str:
    """One line saying what went wrong: the exception's type and message (any URI's password masked)."""
    return mask(f"{type(exc).__name__}: {exc}")[:MAX_TAG_CHARS]


def prefect_tags() -> dict[str, str]:
    """The current Prefect flow run's id, name and flow name (none outside a flow run)."""
    from prefect.runtime import flow_run

    tags = {TAG_FLOW_RUN_ID: flow_run.id, TAG_FLOW_RUN_NAME: flow_run.name, TAG_FLOW_NAME: flow_run.flow_name}
    return {k: str(v) for k, v in tags.items() if v}


@dataclass(frozen=True)
class RunRecord:
    """One run as read from the store: plain values, nothing to call back into MLflow."""

    id: str
    name: str
    experiment_id: str
    status: str
    start_time_ms: int
    parent_id: str | None
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]

    @classmethod
    def of(cls, run) -> RunRecord:
        tags = dict(run.data.tags)
        return cls(id=run.info.run_id, name=run.info.run_name or tags.get(MLFLOW_RUN_NAME, ""),
                   experiment_id=run.info.experiment_id, status=run.info.status,
                   start_time_ms=run.info.start_time or 0, parent_id=tags.get(MLFLOW_PARENT_RUN_ID),
                   params=dict(run.data.params), metrics=dict(run.data.metrics), tags=tags)
