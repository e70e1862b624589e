"""Where runs go, and the store itself: reads return plain RunRecords.

Where runs go: a ``tracking_uri`` argument, else ``MLFLOW_TRACKING_URI``, else the
repository's own store, ``sqlite:///<repo>/mlruns/mlflow.db``, with artifacts under
``<repo>/mlruns/artifacts/<experiment>``. ``connect`` checks that the store answers
before anything is written, so an unreachable server fails the flow at once with a
clear message and leaves no half-made experiment or run behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from ..provenance import run_tags
from .names import EXPERIMENT_KIND, MAX_TAG_CHARS, MLFLOW_PARENT_RUN_ID, RunRecord, prefect_tags
from .patience import TrackingUnavailableError, hand_retries_to_us, patient
from .run import Run

if TYPE_CHECKING:  # mlflow is imported where used: `cnnflow --help` should not wait for it
    from mlflow import MlflowClient

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STORE = REPO_ROOT / "mlruns"
# Where `mlflow ui` serves a local sqlite store; links to local runs point here.
DEFAULT_UI_URL = "http://127.0.0.1:5000"

_CLIENTS: dict[tuple[int, str], MlflowClient] = {}
_CLIENTS_LOCK = threading.Lock()


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


def artifact_root(tracking_uri: str) -> Path | None:
    """Where a sqlite store keeps its artifacts: artifacts/ beside the database (one folder per
    experiment); None for other stores, which choose their own."""
    db = sqlite_path(tracking_uri)
    return None if db is None else db.parent / "artifacts"


def is_server(tracking_uri: str) -> bool:
    return urlparse(tracking_uri).scheme in ("http", "https")


def import_client() -> None:
    """Import MLflow's client and its stores now (about 2 s on an idle machine), rather than at a store's first
    call: for the process that trial workers are forked from, so that each worker has them already."""
    import mlflow.store.tracking.rest_store  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    from mlflow import MlflowClient  # noqa: F401


def connect(tracking_uri: str | None = None, timeout_s: float = 5.0) -> Store:
    """The resolved store, after checking that it answers.

    A sqlite store gets its folder and tables created here (once, before any
    fan-out: parallel first writers would race on the schema migration).
    Raises TrackingUnavailableError within about timeout_s when a tracking
    server does not answer its /health endpoint, or a sqlite file cannot be made.
    """
    uri = resolve_tracking_uri(tracking_uri)
    if is_server(uri):
        hand_retries_to_us()
        _require_healthy_server(uri, timeout_s)
    store = Store(uri)
    try:
        if (db := sqlite_path(uri)) is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
            with _initialising(db):
                store.client.search_experiments(max_results=1)
        else:
            store.client.search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingUnavailableError(f"the MLflow store {uri} cannot be used: {exc}. Nothing was logged.") from exc
    # Model.log uploads through MLflow's process-wide URI; every flow in a process
    # connects before logging, so the global agrees with the client.
    import mlflow

    mlflow.set_tracking_uri(uri)
    return store


@contextlib.contextmanager
def _initialising(db: Path) -> Iterator[None]:
    """Hold an exclusive lock beside a sqlite store while this process opens it for the first time.

    MLflow creates and migrates the tables of a new store on first use; two processes
    doing that at once fail with errors such as "table span_metrics already exists".
    """
    with open(db.with_name(db.name + ".init.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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

    @patient
    def experiment_id(self, name: str) -> str:
        """The id of the experiment called name, created if absent.

        On a sqlite store its artifacts live beside the database, under artifacts/<name>.
        """
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            for key, value in EXPERIMENT_KIND.items():  # made before the tag, or by another tool
                if found.tags.get(key) != value:
                    self.client.set_experiment_tag(found.experiment_id, key, value)
            return found.experiment_id
        root = artifact_root(self.uri)
        location = None if root is None else (root / name).as_uri()
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except MlflowException:
            # Created meanwhile by another process: use theirs.
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    @patient
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
        return self.create_run_in(self.experiment_id(experiment), name, parent_id=parent_id, params=params, tags=tags)

    @patient
    def create_run_in(self, experiment_id: str, name: str, *, parent_id: str | None, params: dict[str, Any] | None,
                      tags: dict[str, Any] | None) -> Run:
        """A new RUNNING run in the experiment (by id), tagged with the code's provenance and the Prefect
        flow run, nested under parent_id if given."""
        all_tags = {**run_tags(), **prefect_tags(), **(tags or {})}
        if parent_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_id
        created = self.client.create_run(experiment_id, run_name=name,
                                         tags={k: str(v)[:MAX_TAG_CHARS] for k, v in all_tags.items()})
        run = Run(self, created.info.run_id, experiment_id)
        if params:
            run.log_params(params)
        return run

    def run_of(self, record: RunRecord) -> Run:
        """A handle on the run a record was read from (no request: the record knows its experiment)."""
        return Run(self, record.id, record.experiment_id)

    @patient
    def record(self, run_id: str) -> RunRecord:
        return RunRecord.of(self.client.get_run(run_id))

    @patient
    def find_runs(self, experiment_id: str, tags: dict[str, str], parent_id: str | None = None) -> list[RunRecord]:
        """Every active run of the experiment whose tags equal the given ones (and nested under the run
        parent_id, if given), oldest first."""
        if parent_id is not None:
            tags = {**tags, MLFLOW_PARENT_RUN_ID: parent_id}
        conditions = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        return self._search([experiment_id], conditions, ["attributes.start_time ASC"])

    @patient
    def latest_run(self, tags: dict[str, str], experiment_ids: list[str] | None = None) -> RunRecord | None:
        """The most recent active run with these tags, in the given experiments (default: all), or None."""
        ids = experiment_ids or list(self.experiment_names())
        found = self._search(ids, " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items()),
                             ["attributes.start_time DESC"]) if ids else []
        return found[0] if found else None

    @patient
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

    def run_url(self, experiment_id: str, run_id: str, artifact: str | None = None) -> str:
        """The run's page in the MLflow UI (for a local store, where `cnnflow ui` serves it), opened on
        one of its artifacts when given (the Artifacts tab, that file shown)."""
        base = self.uri if is_server(self.uri) else DEFAULT_UI_URL
        page = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        # MLflow 3.17's UI takes its view from this parameter (else from the browser's memory, else
        # GenAI); the experiment's kind tag is not read there.
        return page + (f"/artifactPath/{artifact}" if artifact else "") + "?workflowType=machine_learning"

    def ui_command(self) -> str:
        """The shell command that opens the MLflow UI on this store, from any shell (the venv's cnnflow)."""
        if is_server(self.uri):
            return f"open {self.uri} (the tracking server serves the UI)"
        cnnflow = Path(sys.executable).with_name("cnnflow")
        command = f"{cnnflow if cnnflow.exists() else 'cnnflow'} ui"
        return command + ("" if self.uri == default_tracking_uri() else f" --backend-store-uri {self.uri}")

    @patient
    def register_model(self, name: str, model_uri: str, run_id: str, alias: str) -> int:
        """Register model_uri as a new version of the registered model name and point alias at it;
        returns the version."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException:  # registered before
            pass
        version = self.client.create_model_version(name, model_uri, run_id=run_id)
        self.client.set_registered_model_alias(name, alias, version.version)
        return int(version.version)


@contextlib.contextmanager
def tracked_flow_run(experiment: str, run_name: str, *, tracking_uri: str | None = None,
                     parent_run_id: str | None = None, params: dict[str, Any] | None = None,
                     tags: dict[str, Any] | None = None, system_metrics: bool = False) -> Iterator[Run]:
    """The MLflow run of the current flow run, linked from it; FAILED with the reason if the body raises.

    Connects first, so an unreachable store fails before anything is written.
    system_metrics: sample the machine's CPU, memory and disk into the run meanwhile.
    """
    store = connect(tracking_uri)
    experiment_id = store.experiment_id(experiment)
    with (store.create_run_in(experiment_id, run_name, parent_id=parent_run_id, params=params, tags=tags) as run,
          run.system_metrics(system_metrics)):
        run.link_flow_run(run_name)
        yield run
