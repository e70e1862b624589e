"""Where runs go, and the store itself: reads return plain RunRecords.

Where runs go: a ``tracking_uri`` argument, else ``MLFLOW_TRACKING_URI``, else the
repository's own store, ``sqlite:///<repo>/mlruns/mlflow.db``, with artifacts under
``<repo>/mlruns/artifacts/<experiment>``. ``connect`` checks that the store answers
before anything is written, so an unreachable server fails the flow at once with a
clear message and leaves no half-made experiment or run behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shlex
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from .. import credentials
from ..progress import say
from ..provenance import run_tags
from . import liveness
from .names import EXPERIMENT_KIND, KILLED, MAX_TAG_CHARS, MLFLOW_PARENT_RUN_ID, RunRecord, prefect_tags
from .patience import TrackingUnavailableError, hand_retries_to_us, keep_reserve, patient
from .run import TAG_FAILURE_REASON, Run

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
    """The argument, else $MLFLOW_TRACKING_URI, else the repository's sqlite store; a masked password
    (***) put back from the environment (flows.credentials.reveal)."""
    return credentials.reveal(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri())


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


def connect(tracking_uri: str | None = None, timeout_s: float = 5.0, *, read_only: bool = False) -> Store:
    """The resolved store, after checking that it answers.

    A sqlite store gets its folder and tables created here (once, before any
    fan-out: parallel first writers would race on the schema migration).
    Raises TrackingUnavailableError within about timeout_s when a tracking
    server does not answer its /health endpoint, or a sqlite file cannot be made,
    or (unless read_only: a command that only reads) written.
    """
    uri = resolve_tracking_uri(tracking_uri)
    credentials.remember(uri)
    if not read_only:
        require_writable(uri)
    if is_server(uri):
        hand_retries_to_us()
        _require_healthy_server(uri, timeout_s)
    elif is_database(uri):
        _require_reachable_database(uri, timeout_s)
    store = Store(uri)
    try:
        if (db := sqlite_path(uri)) is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
            with _initialising(db):
                store.client.search_experiments(max_results=1)
            if not read_only:
                keep_reserve(db)
        else:
            store.client.search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingUnavailableError(f"the MLflow store {store.shown} cannot be used: "
                                       f"{credentials.mask(str(exc))}. Nothing was logged.") from exc
    # Model.log uploads through MLflow's process-wide URI; every flow in a process
    # connects before logging, so the global agrees with the client.
    import mlflow

    mlflow.set_tracking_uri(uri)
    return store


def require_writable(uri: str) -> None:
    """TrackingUnavailableError naming a sqlite store when its database (or, for a new one, the folder that
    would hold it) cannot be written: a read-only mount, another user's files. Other stores: nothing to check."""
    if (db := sqlite_path(uri)) is None:
        return
    target = db if db.exists() else next((p for p in db.parents if p.exists()), None)
    if target is not None and not os.access(target, os.W_OK):
        what = "its database file" if target == db else f"the folder {target}"
        raise TrackingUnavailableError(f"the MLflow store {uri} is read-only here ({what} cannot be written): runs "
                                       "cannot be logged to it; `cnnflow runs` and `cnnflow report` can read it. "
                                       "Nothing was logged.")


@contextlib.contextmanager
def _initialising(db: Path) -> Iterator[None]:
    """Hold an exclusive lock beside a sqlite store while this process opens it for the first time.

    MLflow creates and migrates the tables of a new store on first use; two processes
    doing that at once fail with errors such as "table span_metrics already exists".
    A store that exists but whose folder cannot be written (a read-only mount, another
    user's files) is opened without the lock: nothing will be created there, and the
    commands that only read (`cnnflow runs`, `cnnflow report`) work.
    """
    try:
        lock = open(db.with_name(db.name + ".init.lock"), "a")
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and db.is_file():
            yield
            return
        raise
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def is_database(tracking_uri: str) -> bool:
    """A database store MLflow reaches over the network (postgresql, mysql), not a file or a server."""
    return urlparse(tracking_uri).scheme.split("+")[0] in _DRIVERS


# The SQLAlchemy drivers of each database, in the order suggested when the URI names none.
_DRIVERS = {"postgresql": ("psycopg2", "psycopg", "pg8000"), "mysql": ("pymysql", "MySQLdb", "mysql.connector")}


def _require_reachable_database(uri: str, timeout_s: float) -> None:
    """Connect to a database store once, within timeout_s, before MLflow does: MLflow retries a refused
    connection 10 times over about 100 s, with a warning each time. Says which driver to name when the URI's
    (or SQLAlchemy's default) is not installed."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    shown = credentials.mask(uri)
    scheme = urlparse(uri).scheme
    try:
        engine = sqlalchemy.create_engine(uri, poolclass=NullPool,
                                          connect_args={"connect_timeout": max(1, round(timeout_s))})
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as exc:
        raise TrackingUnavailableError(f"the MLflow store {shown} cannot be used: {_driver_advice(scheme, exc)}. "
                                       "Nothing was logged.") from exc
    try:
        with engine.connect():
            return
    except sqlalchemy.exc.SQLAlchemyError as exc:
        cause = credentials.mask(" ".join(str(getattr(exc, "orig", None) or exc).split()))
        raise TrackingUnavailableError(f"the MLflow store {shown} cannot be reached ({cause}). Nothing was logged. "
                                       f"Start the database, or unset MLFLOW_TRACKING_URI to log to the local "
                                       f"store {default_tracking_uri()}.") from exc
    finally:
        engine.dispose()


def _driver_advice(scheme: str, exc: BaseException) -> str:
    import importlib.util

    database, _, driver = scheme.partition("+")
    installed = [d for d in _DRIVERS.get(database, ()) if importlib.util.find_spec(d.split(".")[0]) is not None]
    named = f"its driver {driver}" if driver else f"SQLAlchemy's default driver for {database}://"
    advice = (f"name an installed one: {', '.join(f'{database}+{d.lower()}://' for d in installed)}" if installed
              else f"install one of {', '.join(_DRIVERS.get(database, ()))}")
    return f"{named} is not installed ({type(exc).__name__}: {exc}); {advice}"


def _require_healthy_server(uri: str, timeout_s: float) -> None:
    # urllib takes no user:password@ in a URL: they go in a basic auth header.
    health = credentials.without_userinfo(uri).rstrip("/") + "/health"
    request = urllib.request.Request(health, headers=_basic_auth(uri))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"GET {health} answered {response.status}"
    except (OSError, urllib.error.URLError) as exc:
        problem = f"GET {health} failed: {exc}"
    raise TrackingUnavailableError(
        f"the MLflow tracking server at {credentials.mask(uri)} is unreachable ({credentials.mask(problem)}). "
        "Nothing was logged. "
        f"Start the server, or unset MLFLOW_TRACKING_URI to log to the local store {default_tracking_uri()}."
    )


def _basic_auth(uri: str) -> dict[str, str]:
    """The Authorization header for a server URI that names a user (and password), else none."""
    parts = urlparse(uri)
    if parts.username is None:
        return {}
    import base64

    token = f"{unquote(parts.username)}:{credentials.password_of(uri) or ''}".encode()
    return {"Authorization": "Basic " + base64.b64encode(token).decode()}


@dataclass(frozen=True)
class Store:
    """One MLflow store, addressed by its URI. Safe to share between threads and to send to processes."""

    uri: str  # with its password, if it has one: never shown (see `shown`)

    @property
    def shown(self) -> str:
        """The URI as messages show it: its password masked."""
        return credentials.mask(self.uri)

    def __repr__(self) -> str:
        return f"Store({self.shown!r})"

    @property
    def client(self) -> MlflowClient:
        """This process's client for the store (made once per process and URI)."""
        key = (os.getpid(), self.uri)
        with _CLIENTS_LOCK:
            if key not in _CLIENTS:
                from mlflow import MlflowClient

                # MLflow logs each failed database write with its traceback, then raises it to us: we say it
                # once, in one line (a full disk made hundreds of traceback lines).
                logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
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
            raise ValueError(f"no experiment named {missing} in {self.shown}; known: {known}")
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
        return self._search([experiment_id], _tag_filter(tags), ["attributes.start_time ASC"])

    @patient
    def latest_run(self, tags: dict[str, str], experiment_ids: list[str] | None = None) -> RunRecord | None:
        """The most recent active run with these tags, in the given experiments (default: all), or None."""
        ids = experiment_ids or list(self.experiment_names())
        found = self._search(ids, _tag_filter(tags), ["attributes.start_time DESC"]) if ids else []
        return found[0] if found else None

    @patient
    def repair_abandoned(self, experiment_id: str) -> list[RunRecord]:
        """Mark KILLED, with the reason, the runs of the experiment that a dead process left RUNNING (see
        liveness), and their RUNNING children; returns the runs marked."""
        running = self._search([experiment_id], "attributes.status = 'RUNNING'", ["attributes.start_time ASC"])
        reasons = {r.id: reason for r in running if (reason := liveness.abandoned(r)) is not None}
        for record in running:
            if record.id not in reasons and record.parent_id in reasons:
                reasons[record.id] = f"its parent run {record.parent_id} was abandoned: {reasons[record.parent_id]}"
        marked = [r for r in running if r.id in reasons]
        for record in marked:
            self.client.set_tag(record.id, TAG_FAILURE_REASON, reasons[record.id][:MAX_TAG_CHARS])
            self.client.set_terminated(record.id, KILLED)
        if marked:
            say(f"marked {len(marked)} run{'s' if len(marked) > 1 else ''} KILLED that a process which no longer "
                f"runs had left RUNNING: {', '.join(r.name or r.id for r in marked)}")
        return marked

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
        return self.ui_url(f"experiments/{experiment_id}/runs/{run_id}"
                           + (f"/artifactPath/{artifact}" if artifact else ""))

    def ui_url(self, page: str) -> str:
        """A page of the MLflow UI (for a local store, where `cnnflow ui` serves it) in the Model training view.

        page: the part after "#/" (e.g. "experiments/1/runs?viewStateShareKey=k"), its query kept.
        """
        base = credentials.without_userinfo(self.uri) if is_server(self.uri) else DEFAULT_UI_URL
        path, _, query = page.partition("?")
        # MLflow 3.17's UI takes its view from this parameter (else from the browser's memory, else
        # GenAI); the experiment's kind tag is not read there.
        return f"{base.rstrip('/')}/#/{path}?" + "&".join(filter(None, [query, "workflowType=machine_learning"]))

    def ui_command(self) -> str:
        """The shell command that opens the MLflow UI on this store, from any shell (the venv's cnnflow).

        Never with the store's password: the URI is masked, and `cnnflow ui` puts the password back
        from $CNNCORE_TRACKING_PASSWORD (the command says so) or $MLFLOW_TRACKING_URI.
        """
        if is_server(self.uri):
            return f"open {credentials.without_userinfo(self.uri)} (the tracking server serves the UI)"
        cnnflow = Path(sys.executable).with_name("cnnflow")
        command = f"{cnnflow if cnnflow.exists() else 'cnnflow'} ui"
        if self.uri == default_tracking_uri():
            return command
        command += f" --backend-store-uri {shlex.quote(self.shown)}"
        if credentials.is_masked(self.shown):
            command = f"{credentials.PASSWORD_ENV}=<password> {command}"
        return command

    @patient
    def register_model(self, name: str, model_uri: str, run_id: str, alias: str) -> int:
        """Register model_uri as a new version of the registered model name and point alias at it;
        returns the version."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException:  # registered before
            pass
        # A model logged in MLflow 3 (models:/m-<id>) is registered with its id: a tracking server refuses that
        # source without it (INVALID_PARAMETER_VALUE), where a local store accepts it.
        prefix, _, rest = model_uri.partition("models:/")
        model_id = rest if not prefix and rest.startswith("m-") and "/" not in rest else None
        version = self.client.create_model_version(name, model_uri, run_id=run_id, model_id=model_id)
        self.client.set_registered_model_alias(name, alias, version.version)
        return int(version.version)


def _tag_filter(tags: dict[str, str]) -> str:
    """An MLflow search filter matching every tag's value exactly, whatever quote the value holds.

    MLflow's filter strings take a value in single or double quotes and no escape, so a value
    holding both cannot be matched: ValueError naming it, rather than a filter that means another thing.
    """
    def literal(value: str) -> str:
        for quote in ("'", '"'):
            if quote not in value:
                return f"{quote}{value}{quote}"
        raise ValueError(f"{value!r} holds both quote characters (' and \"), which MLflow's run search cannot match")

    return " and ".join(f"tags.`{key}` = {literal(str(value))}" for key, value in tags.items())


@contextlib.contextmanager
def tracked_flow_run(experiment: str, run_name: str, *, tracking_uri: str | None = None,
                     parent_run_id: str | None = None, params: dict[str, Any] | None = None,
                     tags: dict[str, Any] | None = None, system_metrics: bool = False) -> Iterator[Run]:
    """The MLflow run of the current flow run, linked from it; FAILED with the reason if the body raises.

    Connects first, so an unreachable store fails before anything is written. The run claims
    its process (liveness) while it is open; runs of the experiment that a dead process left
    RUNNING are marked KILLED first.
    system_metrics: sample the machine's CPU, memory and disk into the run meanwhile.
    """
    store = connect(tracking_uri)
    experiment_id = store.experiment_id(experiment)
    store.repair_abandoned(experiment_id)
    owner = liveness.new_owner()
    tags = {**(tags or {}), **liveness.claim_tags(owner)}
    with (store.create_run_in(experiment_id, run_name, parent_id=parent_run_id, params=params, tags=tags) as run,
          liveness.renewed(run, owner), run.system_metrics(system_metrics)):
        run.link_flow_run(run_name)
        yield run
