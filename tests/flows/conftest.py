"""Fixtures for the flow tests: one temporary Prefect API per session, one MLflow store per test.

Prefect reads its settings when first imported, so PREFECT_HOME (a temporary
folder, never the user's database) and analytics (off: there is no network) are
set here, before anything imports prefect.
"""

import os
import shutil
import tempfile

_PREFECT_HOME = tempfile.mkdtemp(prefix="cnncore-flows-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Run  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.config import TrainConfig  # noqa: E402
from flows.load_data import clear_data_memo  # noqa: E402

@pytest.fixture(scope="session", autouse=True)
def prefect_api():
    """A temporary Prefect API server for the whole session (about 10 s to start)."""
    with prefect_test_harness(server_startup_timeout=60):
        yield
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
