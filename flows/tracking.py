"""Everything the flows say to MLflow, and the Prefect link back to it.

This is the only module that talks to MLflow. It works through an explicit
``MlflowClient`` and run ids, never MLflow's active-run stack, so task threads
log to the runs they are handed (the stack is thread-local).

Where runs go: a ``tracking_uri`` argument, else ``MLFLOW_TRACKING_URI``, else
the repository's own store, ``sqlite:///<repo>/mlruns/mlflow.db`` with artifacts
under ``<repo>/mlruns/artifacts/<experiment>``. ``connect`` checks that the store
answers before anything is written, so an unreachable server fails the flow at
once with a clear message and leaves no half-made experiment or run behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd

import mlflow
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param, Run, RunStatus, RunTag
from mlflow.models import Model, infer_signature
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from prefect.artifacts import create_link_artifact
from prefect.runtime import flow_run

import cnncore
from cnncore.cnn import ThreeLayerConvNet

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORE = REPO_ROOT / "mlruns"
SERVING_CODE = Path(__file__).with_name("serving.py")
# Where `mlflow ui` serves a local sqlite store; links to local runs point here.
DEFAULT_UI_URL = "http://127.0.0.1:5000"

TAG_FLOW_RUN_ID = "prefect.flow_run_id"
TAG_FLOW_RUN_NAME = "prefect.flow_run_name"
TAG_FLOW_NAME = "prefect.flow_name"
TAG_FAILURE_REASON = "failure_reason"
TAG_MODEL_URI = "model_uri"

# MLflow's limits: a param value holds at most 6000 characters, a tag 8000.
_MAX_PARAM_CHARS = 6000
_MAX_TAG_CHARS = 8000

_DATASET_LOCK = threading.Lock()


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store does not answer; nothing was logged."""


def default_tracking_uri() -> str:
    return f"sqlite:///{DEFAULT_STORE / 'mlflow.db'}"


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The argument, else $MLFLOW_TRACKING_URI, else the repository's sqlite store."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a sqlite:/// URI, else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///"))


def connect(tracking_uri: str | None = None, timeout_s: float = 5.0) -> Tracker:
    """A Tracker for the resolved store, after checking that the store answers.

    A sqlite store gets its folder and tables created here (once, before any
    fan-out: parallel first writers would race on the schema migration).
    Raises TrackingUnavailableError within about timeout_s when a tracking
    server does not answer its /health endpoint, or a sqlite file cannot be made.
    """
    uri = resolve_tracking_uri(tracking_uri)
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        _require_healthy_server(uri, timeout_s)
    client = MlflowClient(uri)
    try:
        if (db := sqlite_path(uri)) is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        client.search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingUnavailableError(f"the MLflow store {uri} cannot be used: {exc}. Nothing was logged.") from exc
    # Model.log uploads through MLflow's process-wide URI; every flow in a process
    # connects before logging, so the global agrees with the client.
    mlflow.set_tracking_uri(uri)
    return Tracker(uri, client)


def _require_healthy_server(uri: str, timeout_s: float) -> None:
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"GET {health} answered {response.status}"
    except (OSError, urllib.error.URLError) as exc:
        problem = f"GET {health} failed: {exc}"
    raise TrackingUnavailableError(
        f"the MLflow tracking server at {uri} is unreachable ({problem}). Nothing was logged. "
        f"Start the server, or unset MLFLOW_TRACKING_URI to log to the local store {default_tracking_uri()}."
    )


@contextlib.contextmanager
def tracked_flow_run(experiment: str, run_name: str, *, tracking_uri: str | None = None,
                     parent_run_id: str | None = None, params: dict[str, Any] | None = None,
                     tags: dict[str, Any] | None = None) -> Iterator[tuple[Tracker, str]]:
    """The MLflow run of the current flow run, linked from it; FAILED with the reason if the body raises.

    Connects first, so an unreachable store fails before anything is written.
    Yields (tracker, run_id).
    """
    tracker = connect(tracking_uri)
    experiment_id = tracker.experiment(experiment)
    with tracker.run(experiment_id, run_name, parent_run_id=parent_run_id, params=params, tags=tags) as run_id:
        tracker.link_flow_run(run_id)
        yield tracker, run_id


def prefect_tags() -> dict[str, str]:
    """The current Prefect flow run's id, name and flow name (none outside a flow run)."""
    tags = {TAG_FLOW_RUN_ID: flow_run.id, TAG_FLOW_RUN_NAME: flow_run.name, TAG_FLOW_NAME: flow_run.flow_name}
    return {k: str(v) for k, v in tags.items() if v}


def failure_reason(exc: BaseException) -> str:
    """One line saying what went wrong: the exception's type and message."""
    return f"{type(exc).__name__}: {exc}"[:_MAX_TAG_CHARS]


@dataclass
class Tracker:
    """One MLflow store, addressed by explicit run ids (safe to share between threads)."""

    uri: str
    client: MlflowClient = field(repr=False)

    # ------------------------------------------------------------ experiments and runs

    def experiment(self, name: str) -> str:
        """The id of the experiment called name, created if absent.

        On a sqlite store its artifacts live beside the database, under artifacts/<name>.
        """
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if (db := sqlite_path(self.uri)) is not None:
            location = (db.parent / "artifacts" / name).as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:
            # Created meanwhile by another process: use theirs.
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def start_run(self, experiment_id: str, name: str, *, parent_run_id: str | None = None,
                  params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None) -> str:
        """Create a RUNNING run tagged with the Prefect flow run; returns its id."""
        all_tags = {**prefect_tags(), **(tags or {})}
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = self.client.create_run(experiment_id, run_name=name, tags={k: str(v) for k, v in all_tags.items()})
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    @contextlib.contextmanager
    def run(self, experiment_id: str, name: str, **kwargs) -> Iterator[str]:
        """start_run, then closing(run_id)."""
        with self.closing(self.start_run(experiment_id, name, **kwargs)) as run_id:
            yield run_id

    @contextlib.contextmanager
    def closing(self, run_id: str) -> Iterator[str]:
        """FINISHED when the body succeeds; FAILED with the reason when it raises (KILLED on Ctrl-C)."""
        try:
            yield run_id
        except BaseException as exc:
            self.fail(run_id, exc)
            raise
        self.finish(run_id)

    def finish(self, run_id: str) -> None:
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))

    def fail(self, run_id: str, exc: BaseException) -> None:
        """Mark the run FAILED (KILLED for an interrupt), with a failure_reason tag and the traceback."""
        self.client.set_tag(run_id, TAG_FAILURE_REASON, failure_reason(exc))
        self.client.log_text(run_id, "".join(traceback.format_exception(exc)), "failure/traceback.txt")
        status = RunStatus.KILLED if isinstance(exc, KeyboardInterrupt) else RunStatus.FAILED
        self.client.set_terminated(run_id, RunStatus.to_string(status))

    def find_runs(self, experiment_id: str, tags: dict[str, str]) -> list[Run]:
        """Every active run of the experiment whose tags equal the given ones, oldest first."""
        conditions = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        runs, token = [], None
        while True:
            page = self.client.search_runs([experiment_id], " and ".join(conditions),
                                           order_by=["attributes.start_time ASC"], page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def reopen(self, run_id: str, tags: dict[str, Any] | None = None) -> None:
        """Set a run back to RUNNING (resuming it) and retag it with the current flow run."""
        self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        self.set_tags(run_id, {**prefect_tags(), **(tags or {})})

    def delete_run(self, run_id: str) -> None:
        self.client.delete_run(run_id)

    # ------------------------------------------------------------ values

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        batch = [Param(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(batch), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=batch[i : i + 100])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:_MAX_TAG_CHARS]) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = _now_ms()
        self._log_metric_batch(run_id, [Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_metric_history(self, run_id: str, key: str, values: list[float], first_step: int = 0) -> None:
        """values[i] logged as `key` at step first_step + i."""
        now = _now_ms()
        self._log_metric_batch(run_id, [Metric(key, float(v), now, first_step + i) for i, v in enumerate(values)])

    def _log_metric_batch(self, run_id: str, metrics: list[Metric]) -> None:
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(run_id, metrics=metrics[i : i + 1000])

    # ------------------------------------------------------------ artifacts

    def log_figure(self, run_id: str, figure, artifact_file: str) -> None:
        self.client.log_figure(run_id, figure, artifact_file)

    def log_table(self, run_id: str, table: pd.DataFrame, name: str) -> None:
        """The table as <name>.csv and as an MLflow table <name>.json, both replaced if present."""
        self.client.log_text(run_id, table.to_csv(index=False), f"{name}.csv")
        artifact = f"{name}.json"
        if artifact in {f.path for f in self.client.list_artifacts(run_id)}:
            # MlflowClient.log_table would append the rows to the old table (a resumed
            # sweep's summary): write the file in its format instead; it stays registered.
            self.client.log_text(run_id, table.to_json(orient="split", index=False, date_format="iso"), artifact)
        else:
            self.client.log_table(run_id, table, artifact)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_datasets(self, run_id: str, name: str, data: dict, source: str | None = None) -> None:
        """The train, val and test splits as the run's dataset inputs (name, shape, digest)."""
        inputs = []
        for split, context in (("train", "training"), ("val", "validation"), ("test", "testing")):
            if f"X_{split}" not in data:
                continue
            dataset = mlflow.data.from_numpy(features=data[f"X_{split}"], targets=data[f"y_{split}"],
                                             name=f"{name}-{split}", source=source)
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
        # The store inserts a dataset on first use with check-then-insert: two threads
        # logging the same new dataset race on its unique key, so one at a time.
        with _DATASET_LOCK:
            self.client.log_inputs(run_id, datasets=inputs)

    def log_model(self, run_id: str, net: ThreeLayerConvNet, mean: np.ndarray, images: np.ndarray) -> str:
        """Log the net as an MLflow pyfunc model (and its .npz under checkpoint/); returns the model URI.

        The model is "models from code" (flows/serving.py, nothing pickled): it
        takes raw float images (N, C, H, W), subtracts the training mean and
        returns the predicted labels (N,) as int64. images: a few raw images,
        the input example and the source of the signature.
        """
        experiment_id = self.client.get_run(run_id).info.experiment_id
        example = np.asarray(images, dtype=np.float64)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = net.save(Path(tmp) / "model.npz")
            mean_file = Path(tmp) / "mean.npy"
            np.save(mean_file, np.asarray(mean, dtype=np.float64), allow_pickle=False)
            labels = net.predict(example - mean.reshape(1, -1, 1, 1))
            logged = self.client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
            info = Model.log(
                artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run_id, model_id=logged.model_id,
                python_model=str(SERVING_CODE),
                artifacts={"checkpoint": str(checkpoint), "mean": str(mean_file)},
                code_paths=[str(Path(cnncore.__file__).parent)],
                signature=infer_signature(example, labels),
                input_example=example,
                pip_requirements=[f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}"],
            )
            self.client.log_artifact(run_id, str(checkpoint), "checkpoint")
        self.set_tags(run_id, {TAG_MODEL_URI: info.model_uri})
        return info.model_uri

    # ------------------------------------------------------------ links

    def run_url(self, run_id: str) -> str:
        """The run's page in the MLflow UI (for a local store, where `mlflow ui` serves it)."""
        experiment_id = self.client.get_run(run_id).info.experiment_id
        base = self.uri if urlparse(self.uri).scheme in ("http", "https") else DEFAULT_UI_URL
        return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

    def ui_command(self) -> str:
        """The shell command that opens the MLflow UI on this store."""
        if urlparse(self.uri).scheme in ("http", "https"):
            return f"open {self.uri} (the tracking server serves the UI)"
        db = sqlite_path(self.uri)
        if db is not None:
            return f"mlflow ui --backend-store-uri {self.uri} --default-artifact-root {(db.parent / 'artifacts').as_uri()}"
        return f"mlflow ui --backend-store-uri {self.uri}"

    def link_flow_run(self, run_id: str) -> None:
        """A Prefect link artifact on the current flow run pointing at the MLflow run."""
        run = self.client.get_run(run_id)
        name = run.data.tags.get(MLFLOW_RUN_NAME, run_id)
        create_link_artifact(
            link=self.run_url(run_id),
            link_text=f"MLflow run {name}",
            key=f"mlflow-{flow_run.flow_name or 'run'}".lower().replace("_", "-"),
            description=f"MLflow run `{run_id}` in the store `{self.uri}`; open the UI with `{self.ui_command()}`.",
        )


def _now_ms() -> int:
    return int(time.time() * 1000)
