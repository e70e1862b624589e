"""Fixtures for the flow tests: one temporary Prefect API per session, one MLflow store per test.

Prefect reads its settings when first imported, so PREFECT_HOME (a temporary
folder, never the user's database) and analytics (off: there is no network) are
set here, before anything imports prefect.
"""

import contextlib
import os
import shutil
import sys
import tempfile

_PREFECT_HOME = tempfile.mkdtemp(prefix="cnncore-flows-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Run  # noqa: E402

import harness  # noqa: E402
from flows.config import TrainConfig  # noqa: E402
from flows.load_data import clear_data_memo  # noqa: E402
from flows.servers import ServerError, background_server, free_port  # noqa: E402

# Seconds Prefect's API takes to start on an idle 2-core machine is about 10; the limit grows with the load.
PREFECT_API_START_S = 60
# Tries with a fresh port when the server exits at once (another process took its port meanwhile).
PORT_TRIES = 3


def prefect_api_command(port: int) -> list[str]:
    """Prefect's own temporary API server (what prefect_test_harness starts): its app under uvicorn, no UI."""
    import prefect

    return [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).resolve().parents[1]),
            "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]


@contextlib.contextmanager
def started_prefect_api(root: Path):
    """The API server in a process group of its own (with a watchdog: a kill -9 of this process takes it
    along), on a free port, answering within harness.startup_limit_s; yields its API URL."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_UI_ENABLED="0", PREFECT__SERVER_EPHEMERAL="1", PREFECT__SERVER_FINAL="1",
               PREFECT_SERVER_LOGGING_LEVEL="WARNING",
               PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{root / 'prefect.db'}")
    started = False
    for attempt in range(1, PORT_TRIES + 1):
        port = free_port()
        try:
            with background_server(prefect_api_command(port), f"http://127.0.0.1:{port}/api/health", env=env,
                                   log=root / "server.log", timeout_s=harness.startup_limit_s(PREFECT_API_START_S),
                                   stop_grace_s=5):
                started = True
                yield f"http://127.0.0.1:{port}/api"
                return
        except ServerError as exc:
            if started or "exited with code" not in str(exc) or attempt == PORT_TRIES:
                raise


@pytest.fixture(scope="session", autouse=True)
def prefect_api(tmp_path_factory):
    """A temporary Prefect API server for the whole session (about 10 s to start; longer under load).

    Prefect's prefect_test_harness runs the same server, but as a plain child of this
    process: a test run stopped by a signal or killed left it running, and its start-up
    limit (60 s counted in its own sleeps) failed every flow test on a loaded machine.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    harness.watch_folder(_PREFECT_HOME)
    with started_prefect_api(harness.seed_prefect_home(tmp_path_factory.mktemp("prefect-api"))) as api, \
            temporary_settings({PREFECT_API_URL: api}):
        # Code in a context copied before this one (a worker thread started earlier) sees it too.
        import prefect.context

        globally = getattr(prefect.context, "_temporary_global_settings_context", None)
        with globally(prefect.context.get_settings_context()) if globally else contextlib.nullcontext():
            yield api
            # The logs and events still queued go to the server before it stops.
            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def empty_store_db(tmp_path_factory) -> Path:
    """An MLflow sqlite database with its tables made: migrating one takes ~5 s, copying it ~1 ms."""
    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@dataclass
class Store:
    """A test's MLflow store and the questions the tests ask it."""

    uri: str
    client: MlflowClient

    def runs(self, experiment: str, deleted: bool = False) -> list[Run]:
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return []
        view = 3 if deleted else 1  # ViewType.ALL, ViewType.ACTIVE_ONLY
        return list(self.client.search_runs([found.experiment_id], run_view_type=view,
                                            order_by=["attributes.start_time ASC"]))

    def experiments(self) -> list[str]:
        return sorted(e.name for e in self.client.search_experiments() if e.name != "Default")

    def artifacts(self, run_id: str, path: str | None = None) -> set[str]:
        """Every artifact file of the run, recursively."""
        files = set()
        for info in self.client.list_artifacts(run_id, path):
            files |= self.artifacts(run_id, info.path) if info.is_dir else {info.path}
        return files

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, key))


def _copy_store(folder: Path, template: Path) -> Store:
    db = folder / "mlruns" / "mlflow.db"
    db.parent.mkdir(parents=True)
    shutil.copy(template, db)
    uri = f"sqlite:///{db}"
    return Store(uri, MlflowClient(uri))


@pytest.fixture
def store(tmp_path, empty_store_db, monkeypatch) -> Store:
    """A fresh sqlite MLflow store for this test; MLFLOW_TRACKING_URI is unset so nothing else is used."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return _copy_store(tmp_path, empty_store_db)


@pytest.fixture(scope="module")
def module_store(tmp_path_factory, empty_store_db) -> Store:
    """A store shared by one module's tests, for a flow run that several tests inspect."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield _copy_store(tmp_path_factory.mktemp("store"), empty_store_db)


TINY = TrainConfig(num_train=100, num_val=50, num_test=50, num_filters=4, hidden_dim=16, num_epochs=1,
                   batch_size=25, update_rule="sgd", learning_rate=1e-2)


@pytest.fixture(scope="session")
def tiny() -> TrainConfig:
    """The smallest configuration that still trains: 100 digits, 1 epoch (4 iterations), a 4-filter net."""
    return TINY


@pytest.fixture
def calls_to(monkeypatch):
    """calls_to(owner, name): a list that records the arguments of every call to owner.name, which still runs."""

    def spy(owner, name: str) -> list[tuple]:
        calls, real = [], getattr(owner, name)

        def recording(*args, **kwargs):
            calls.append(args)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, recording)
        return calls

    return spy


@pytest.fixture(autouse=True)
def fresh_data_memo():
    """Each test loads its own data, so load counts are its own."""
    clear_data_memo()
    yield
    clear_data_memo()
