"""Where runs go, and failing fast when the store does not answer."""

import re
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import mlflow
from cnncore.cnn import ThreeLayerConvNet
from cnncore.solver import Solver
from flows import provenance, tracking
from flows.load_data import load_data_once
from flows.train import train


def test_tracking_uri_is_argument_then_environment_then_the_repository_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tracking.REPO_ROOT / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking.resolve_tracking_uri() == "http://tracking.example:5000"
    assert tracking.resolve_tracking_uri("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast_with_a_clear_message():
    uri = f"http://127.0.0.1:{_closed_port()}"
    start = time.perf_counter()
    with pytest.raises(tracking.TrackingUnavailableError, match="unreachable.*Nothing was logged"):
        tracking.connect(uri, timeout_s=2)
    assert time.perf_counter() - start < 5


def test_train_flow_against_an_unreachable_server_writes_nothing(store, tiny):
    state = train(config=tiny, tracking_uri=f"http://127.0.0.1:{_closed_port()}", return_state=True)
    assert state.is_failed()
    with pytest.raises(tracking.TrackingUnavailableError, match="unreachable"):
        state.result()
    assert store.experiments() == []


def test_experiment_artifacts_live_beside_a_sqlite_store(store):
    tracked = tracking.connect(store.uri)
    experiment_id = tracked.experiment_id("where")
    assert tracked.experiment_id("where") == experiment_id  # get, not create twice
    location = store.client.get_experiment(experiment_id).artifact_location
    db = tracking.sqlite_path(store.uri)
    assert location == (db.parent / "artifacts" / "where").as_uri()


def test_logged_model_predicts_the_same_classes_as_the_in_memory_net(store, tiny):
    """The pyfunc model takes raw images and subtracts the training mean itself."""
    data = load_data_once(tiny.data_spec())
    net = ThreeLayerConvNet(input_dim=(1, 8, 8), num_filters=4, filter_size=3, hidden_dim=16,
                            normalization="batchnorm", seed=0)
    Solver(net, data, update_rule="adam", optim_config={"learning_rate": 3e-3}, num_epochs=10,
           batch_size=25, verbose=False, seed=0).train()
    run = tracking.connect(store.uri).start_run("serving", "serving")
    run_id = run.id
    raw = data["X_test"] + data["mean"].reshape(1, -1, 1, 1)
    model_uri = run.log_model(net, data["mean"], raw[:3])

    served = mlflow.pyfunc.load_model(model_uri).predict(np.asarray(raw, dtype=np.float64))
    expected = net.predict(data["X_test"])
    np.testing.assert_array_equal(served, expected)
    assert len(set(expected)) > 1  # a net that learned something, not one constant class
    assert store.client.get_run(run_id).data.tags[tracking.TAG_MODEL_URI] == model_uri
    assert "checkpoint/model.npz" in store.artifacts(run_id)


def test_served_model_takes_float32_and_float64_and_refuses_nan(store, tiny):
    data = load_data_once(tiny.data_spec())
    net = ThreeLayerConvNet(input_dim=(1, 8, 8), num_filters=4, filter_size=3, hidden_dim=16, seed=0)
    run = tracking.connect(store.uri).start_run("serving", "dtypes")
    raw = data["X_test"] + data["mean"].reshape(1, -1, 1, 1)
    model = mlflow.pyfunc.load_model(run.log_model(net, data["mean"], raw[:3]))

    expected = net.predict(data["X_test"])
    np.testing.assert_array_equal(model.predict(raw.astype(np.float64)), expected)
    np.testing.assert_array_equal(model.predict(raw.astype(np.float32)), expected)
    poisoned = raw.astype(np.float64)
    poisoned[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="images must be finite"):
        model.predict(poisoned)
    with pytest.raises(ValueError, match="images must be a float32 or float64 array, got dtype float16"):
        model.predict(raw.astype(np.float16))


def test_experiments_are_model_training_experiments_in_the_mlflow_ui(store):
    tracked = tracking.connect(store.uri)
    made = tracked.experiment_id("made-here")
    assert store.client.get_experiment(made).tags["mlflow.experimentKind"] == "custom_model_development"
    older = store.client.create_experiment("made-elsewhere")  # no kind: the UI may open it in GenAI mode
    assert tracked.experiment_id("made-elsewhere") == older
    assert store.client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com",
                           "-c", "commit.gpgsign=false", *args],
                          cwd=cwd, capture_output=True, text=True, check=True, timeout=10).stdout.strip()


def _head_commit() -> str:
    """This checkout's HEAD as git_commit() writes it (12 hex digits); the tests run in the repository."""
    return _git(provenance.REPO_ROOT, "rev-parse", "--short=12", "HEAD")


def test_runs_carry_their_commit_command_and_user(store, tiny):
    run = tracking.connect(store.uri).start_run("provenance", "tagged")
    tags = store.client.get_run(run.id).data.tags
    assert re.fullmatch(r"[0-9a-f]{12}(-dirty)?|unknown", tags["mlflow.source.git.commit"])
    assert re.fullmatch(re.escape(_head_commit()) + r"(-dirty)?", tags["mlflow.source.git.commit"])
    assert tags["mlflow.source.name"] and tags["mlflow.user"]


@pytest.fixture
def fresh_git_commit():
    """provenance.git_commit() asked again (it is cached per process), and forgotten after the test."""
    provenance.git_commit.cache_clear()

    def ask() -> str:
        provenance.git_commit.cache_clear()
        return provenance.git_commit()

    yield ask
    provenance.git_commit.cache_clear()


def test_git_commit_is_heads_short_hash(fresh_git_commit):
    assert re.fullmatch(re.escape(_head_commit()) + r"(-dirty)?", fresh_git_commit())


def test_git_commit_is_dirty_for_tracked_changes_outside_docs_studies(tmp_path, monkeypatch, fresh_git_commit):
    # A throwaway repository stands in for the checkout: the real one's tracked files are left alone.
    repo = tmp_path / "repo"
    (repo / "docs" / "studies").mkdir(parents=True)
    (repo / "code.py").write_text("x = 1\n")
    (repo / "docs" / "studies" / "report.md").write_text("# report\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "first")
    head = _git(repo, "rev-parse", "--short=12", "HEAD")
    monkeypatch.setattr(provenance, "REPO_ROOT", repo)

    assert fresh_git_commit() == head
    (repo / "docs" / "studies" / "report.md").write_text("# report, rewritten by make studies\n")
    (repo / "untracked.py").write_text("y = 2\n")
    assert fresh_git_commit() == head  # exported reports and untracked files do not count
    (repo / "code.py").write_text("x = 2\n")
    assert fresh_git_commit() == head + "-dirty"


def test_git_commit_is_unknown_outside_git(tmp_path, monkeypatch, fresh_git_commit):
    (tmp_path / "plain").mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no looking for a repository above it
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path / "plain")
    assert fresh_git_commit() == "unknown"


def test_system_metrics_are_recorded_only_when_asked(store):
    tracked = tracking.connect(store.uri)
    quiet, sampled = tracked.start_run("system", "off"), tracked.start_run("system", "on")
    with quiet.system_metrics(False):
        time.sleep(0.3)
    with sampled.system_metrics(True, interval_s=0.2):
        time.sleep(1.0)
    assert not [m for m in store.client.get_run(quiet.id).data.metrics if m.startswith("system/")]
    assert "system/cpu_utilization_percentage" in store.client.get_run(sampled.id).data.metrics


@pytest.mark.parametrize("error, status, reason", [
    (RuntimeError("the disk is full"), "FAILED", "RuntimeError: the disk is full"),
    (KeyboardInterrupt(), "KILLED", "Interrupted: stopped by SIGINT"),
], ids=["error", "ctrl-c"])
def test_a_run_ended_by_an_error_is_failed_and_by_a_signal_killed_with_its_reason_and_traceback(
        store, tmp_path, error, status, reason):
    run = tracking.connect(store.uri).start_run("endings", "ended")
    with pytest.raises(type(error)), run:
        raise error
    ended = store.client.get_run(run.id)
    assert ended.info.status == status and ended.data.tags["failure_reason"] == reason
    text = open(store.client.download_artifacts(run.id, "failure/traceback.txt", str(tmp_path))).read()
    assert text.startswith("Traceback (most recent call last):") and type(error).__name__ in text
