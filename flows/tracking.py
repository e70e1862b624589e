"""The one door to MLflow: every write and every read of runs goes through this module.

    store = tracking.connect(tracking_uri)             # checks that the store answers first
    with store.start_run("cnncore-sweeps", "bn-vs-gn", params=...) as parent:
        with parent.child("bn-vs-gn/00 batchnorm", params=config.model_dump()) as run:
            run.log_metrics({"test_acc": 0.97})
    records = store.find_runs(parent.experiment_id, {"sweep_role": "trial"})   # list[RunRecord]

- ``Store``: one MLflow store, named by its URI (cheap, picklable: a trial worker
  process rebuilds its own client from the URI).
- ``Run``: a handle bound to one run id; it logs, finishes, fails and opens child
  runs. As a context manager it ends the run FINISHED, or FAILED (KILLED on an
  interrupt) with the reason when the body raises.
- ``RunRecord``: what a read returns, plain data (params as MLflow stores them,
  strings; metrics as floats). Code that holds a value in memory uses that, not a
  record read back.

Everything goes through an explicit ``MlflowClient`` and run ids, never MLflow's
active-run stack, so task threads log to the runs they are handed (the stack is
thread-local).

Where runs go: a ``tracking_uri`` argument, else ``MLFLOW_TRACKING_URI``, else the
repository's own store, ``sqlite:///<repo>/mlruns/mlflow.db``, with artifacts under
``<repo>/mlruns/artifacts/<experiment>``. ``connect`` checks that the store answers
before anything is written, so an unreachable server fails the flow at once with a
clear message and leaves no half-made experiment or run behind.
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

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # mlflow and pandas are imported where used: `cnnflow --help` should not wait for them
    import pandas as pd
    from mlflow import MlflowClient

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

FINISHED, FAILED, KILLED, RUNNING = "FINISHED", "FAILED", "KILLED", "RUNNING"
# MLflow's own tags (mlflow.utils.mlflow_tags), spelled out so that reading them needs no mlflow import.
MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"
MLFLOW_RUN_NAME = "mlflow.runName"
MLFLOW_DATASET_CONTEXT = "mlflow.data.context"

# MLflow's limits: a param value holds at most 6000 characters, a tag 8000.
_MAX_PARAM_CHARS = 6000
_MAX_TAG_CHARS = 8000

_DATASET_LOCK = threading.Lock()
_CLIENTS: dict[tuple[int, str], MlflowClient] = {}
_CLIENTS_LOCK = threading.Lock()


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


def is_server(tracking_uri: str) -> bool:
    return urlparse(tracking_uri).scheme in ("http", "https")


def connect(tracking_uri: str | None = None, timeout_s: float = 5.0) -> Store:
    """The resolved store, after checking that it answers.

    A sqlite store gets its folder and tables created here (once, before any
    fan-out: parallel first writers would race on the schema migration).
    Raises TrackingUnavailableError within about timeout_s when a tracking
    server does not answer its /health endpoint, or a sqlite file cannot be made.
    """
    uri = resolve_tracking_uri(tracking_uri)
    if is_server(uri):
        _require_healthy_server(uri, timeout_s)
    store = Store(uri)
    try:
        if (db := sqlite_path(uri)) is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        store.client.search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingUnavailableError(f"the MLflow store {uri} cannot be used: {exc}. Nothing was logged.") from exc
    # Model.log uploads through MLflow's process-wide URI; every flow in a process
    # connects before logging, so the global agrees with the client.
    import mlflow

    mlflow.set_tracking_uri(uri)
    return store


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


def failure_reason(exc: BaseException) -> str:
    """One line saying what went wrong: the exception's type and message."""
    return f"{type(exc).__name__}: {exc}"[:_MAX_TAG_CHARS]


def prefect_tags() -> dict[str, str]:
    """The current Prefect flow run's id, name and flow name (none outside a flow run)."""
    from prefect.runtime import flow_run

    tags = {TAG_FLOW_RUN_ID: flow_run.id, TAG_FLOW_RUN_NAME: flow_run.name, TAG_FLOW_NAME: flow_run.flow_name}
    return {k: str(v) for k, v in tags.items() if v}


# ---------------------------------------------------------------- records: what reads return


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


# ---------------------------------------------------------------- the store


@dataclass(frozen=True)
class Store:
    """One MLflow store, addressed by its URI. Safe to share between threads and to send to processes."""

    uri: str

    @property
    def client(self) -> MlflowClient:
        """This process's client for the store (made once per process and URI)."""
        key = (os.getpid(), self.uri)
        with _CLIENTS_LOCK:
            if key not in _CLIENTS:
                from mlflow import MlflowClient

                _CLIENTS[key] = MlflowClient(self.uri)
            return _CLIENTS[key]

    # ------------------------------------------------------------ experiments

    def experiment_id(self, name: str) -> str:
        """The id of the experiment called name, created if absent.

        On a sqlite store its artifacts live beside the database, under artifacts/<name>.
        """
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if (db := sqlite_path(self.uri)) is not None:
            location = (db.parent / "artifacts" / name).as_uri()
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:
            # Created meanwhile by another process: use theirs.
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def experiment_names(self, names: list[str] | None = None) -> dict[str, str]:
        """{experiment id: name} of the named experiments (ValueError naming the missing), or of all."""
        if not names:
            return {e.experiment_id: e.name for e in self.client.search_experiments()}
        found = {name: self.client.get_experiment_by_name(name) for name in names}
        missing = [name for name, e in found.items() if e is None]
        if missing:
            known = sorted(e.name for e in self.client.search_experiments())
            raise ValueError(f"no experiment named {missing} in {self.uri}; known: {known}")
        return {e.experiment_id: e.name for e in found.values()}

    # ------------------------------------------------------------ runs

    def start_run(self, experiment: str, name: str, *, parent_id: str | None = None,
                  params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None) -> Run:
        """A new RUNNING run in the experiment (by name), tagged with the Prefect flow run, nested under
        the run parent_id if given."""
        return self._create_run(self.experiment_id(experiment), name, parent_id=parent_id, params=params, tags=tags)

    def _create_run(self, experiment_id: str, name: str, *, parent_id: str | None, params: dict[str, Any] | None,
                    tags: dict[str, Any] | None) -> Run:
        all_tags = {**prefect_tags(), **(tags or {})}
        if parent_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_id
        created = self.client.create_run(experiment_id, run_name=name,
                                         tags={k: str(v)[:_MAX_TAG_CHARS] for k, v in all_tags.items()})
        run = Run(self, created.info.run_id, experiment_id)
        if params:
            run.log_params(params)
        return run

    def run(self, run_id: str) -> Run:
        """A handle on an existing run."""
        return Run(self, run_id, self.client.get_run(run_id).info.experiment_id)

    def record(self, run_id: str) -> RunRecord:
        return RunRecord.of(self.client.get_run(run_id))

    def find_runs(self, experiment_id: str, tags: dict[str, str], parent_id: str | None = None) -> list[RunRecord]:
        """Every active run of the experiment whose tags equal the given ones (and nested under the run
        parent_id, if given), oldest first."""
        if parent_id is not None:
            tags = {**tags, MLFLOW_PARENT_RUN_ID: parent_id}
        conditions = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        return self._search([experiment_id], conditions, ["attributes.start_time ASC"])

    def recent_runs(self, experiment_ids: list[str], limit: int) -> list[RunRecord]:
        """The most recent active runs of the experiments, newest first."""
        if not experiment_ids:
            return []
        found = self.client.search_runs(experiment_ids, max_results=limit, order_by=["attributes.start_time DESC"])
        return [RunRecord.of(r) for r in found]

    def _search(self, experiment_ids: list[str], conditions: str, order_by: list[str]) -> list[RunRecord]:
        from mlflow.entities import ViewType

        runs, token = [], None
        while True:
            page = self.client.search_runs(experiment_ids, conditions, run_view_type=ViewType.ACTIVE_ONLY,
                                           order_by=order_by, page_token=token)
            runs.extend(RunRecord.of(r) for r in page)
            token = page.token
            if not token:
                return runs

    # ------------------------------------------------------------ links

    def run_url(self, experiment_id: str, run_id: str) -> str:
        """The run's page in the MLflow UI (for a local store, where `mlflow ui` serves it)."""
        base = self.uri if is_server(self.uri) else DEFAULT_UI_URL
        return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

    def ui_command(self) -> str:
        """The shell command that opens the MLflow UI on this store."""
        if is_server(self.uri):
            return f"open {self.uri} (the tracking server serves the UI)"
        db = sqlite_path(self.uri)
        if db is not None:
            return f"mlflow ui --backend-store-uri {self.uri} --default-artifact-root {(db.parent / 'artifacts').as_uri()}"
        return f"mlflow ui --backend-store-uri {self.uri}"


# ---------------------------------------------------------------- one run


@dataclass(frozen=True)
class Run:
    """A handle bound to one run of a store: everything a flow logs to that run goes through it."""

    store: Store
    id: str
    experiment_id: str = field(compare=False)

    @property
    def _client(self) -> MlflowClient:
        return self.store.client

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.finish()
        else:
            self.fail(exc)

    def child(self, name: str, *, params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None) -> Run:
        """A new RUNNING run in this run's experiment, nested under it."""
        return self.store._create_run(self.experiment_id, name, parent_id=self.id, params=params, tags=tags)

    def record(self) -> RunRecord:
        return self.store.record(self.id)

    # ------------------------------------------------------------ status

    def finish(self) -> None:
        self._client.set_terminated(self.id, FINISHED)

    def fail(self, exc: BaseException) -> None:
        """FAILED (KILLED for an interrupt), with a failure_reason tag and the traceback as an artifact."""
        self._client.set_tag(self.id, TAG_FAILURE_REASON, failure_reason(exc))
        self._client.log_text(self.id, "".join(traceback.format_exception(exc)), "failure/traceback.txt")
        self._client.set_terminated(self.id, KILLED if isinstance(exc, KeyboardInterrupt) else FAILED)

    def reopen(self) -> None:
        """Set the run back to RUNNING (resuming it) and retag it with the current flow run."""
        self._client.update_run(self.id, status=RUNNING)
        self.set_tags(prefect_tags())

    def delete(self) -> None:
        self._client.delete_run(self.id)

    # ------------------------------------------------------------ values

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # log_batch splits into MLflow's per-request limits itself.
        self._client.log_batch(self.id, params=[Param(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in params.items()])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.id, tags=[RunTag(k, str(v)[:_MAX_TAG_CHARS]) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        self._client.log_batch(self.id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_metric_history(self, key: str, values: list[float], first_step: int = 0) -> None:
        """values[i] logged as `key` at step first_step + i, in one request."""
        from mlflow.entities import Metric

        now = _now_ms()
        self._client.log_batch(self.id, metrics=[Metric(key, float(v), now, first_step + i)
                                                 for i, v in enumerate(values)])

    # ------------------------------------------------------------ artifacts

    def log_figure(self, figure, artifact_file: str) -> None:
        self._client.log_figure(self.id, figure, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.id, text, artifact_file)

    def log_table(self, table: pd.DataFrame, name: str) -> None:
        """The table as <name>.csv and as an MLflow table <name>.json, both replaced if present."""
        self._client.log_text(self.id, table.to_csv(index=False), f"{name}.csv")
        artifact = f"{name}.json"
        folder = str(Path(artifact).parent) if "/" in artifact else None
        if artifact in {f.path for f in self._client.list_artifacts(self.id, folder)}:
            # MlflowClient.log_table would append the rows to the old table (a resumed
            # sweep's summary): write the file in its format instead; it stays registered.
            self._client.log_text(self.id, table.to_json(orient="split", index=False, date_format="iso"), artifact)
        else:
            self._client.log_table(self.id, table, artifact)

    def log_datasets(self, name: str, data: dict, source: str | None = None) -> None:
        """The train, val and test splits as the run's dataset inputs (name, shape, digest)."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

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
            self._client.log_inputs(self.id, datasets=inputs)

    def log_model(self, net, mean: np.ndarray, images: np.ndarray) -> str:
        """Log the net as an MLflow pyfunc model (and its .npz under checkpoint/); returns the model URI.

        The model is "models from code" (flows/serving.py, nothing pickled): it
        takes raw float images (N, C, H, W), subtracts the training mean and
        returns the predicted labels (N,) as int64. images: a few raw images,
        the input example and the source of the signature.
        """
        import mlflow
        from mlflow.models import Model, infer_signature

        import cnncore

        example = np.asarray(images, dtype=np.float64)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = net.save(Path(tmp) / "model.npz")
            mean_file = Path(tmp) / "mean.npy"
            np.save(mean_file, np.asarray(mean, dtype=np.float64), allow_pickle=False)
            labels = net.predict(example - mean.reshape(1, -1, 1, 1))
            logged = self._client.create_logged_model(self.experiment_id, name="model", source_run_id=self.id)
            info = Model.log(
                artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=self.id, model_id=logged.model_id,
                python_model=str(SERVING_CODE),
                artifacts={"checkpoint": str(checkpoint), "mean": str(mean_file)},
                code_paths=[str(Path(cnncore.__file__).parent)],
                signature=infer_signature(example, labels),
                input_example=example,
                pip_requirements=[f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}"],
            )
            self._client.log_artifact(self.id, str(checkpoint), "checkpoint")
        self.set_tags({TAG_MODEL_URI: info.model_uri})
        return info.model_uri

    # ------------------------------------------------------------ links

    @property
    def url(self) -> str:
        return self.store.run_url(self.experiment_id, self.id)

    def link_flow_run(self) -> None:
        """A Prefect link artifact on the current flow run pointing at this MLflow run."""
        from prefect.artifacts import create_link_artifact
        from prefect.runtime import flow_run

        name = self._client.get_run(self.id).data.tags.get(MLFLOW_RUN_NAME, self.id)
        create_link_artifact(
            link=self.url,
            link_text=f"MLflow run {name}",
            key=f"mlflow-{flow_run.flow_name or 'run'}".lower().replace("_", "-"),
            description=f"MLflow run `{self.id}` in the store `{self.store.uri}`; "
                        f"open the UI with `{self.store.ui_command()}`.",
        )


@contextlib.contextmanager
def tracked_flow_run(experiment: str, run_name: str, *, tracking_uri: str | None = None,
                     parent_run_id: str | None = None, params: dict[str, Any] | None = None,
                     tags: dict[str, Any] | None = None) -> Iterator[Run]:
    """The MLflow run of the current flow run, linked from it; FAILED with the reason if the body raises.

    Connects first, so an unreachable store fails before anything is written.
    """
    store = connect(tracking_uri)
    experiment_id = store.experiment_id(experiment)
    with store._create_run(experiment_id, run_name, parent_id=parent_run_id, params=params, tags=tags) as run:
        run.link_flow_run()
        yield run


def _now_ms() -> int:
    return int(time.time() * 1000)
