"""A store's password never leaves the environment: not in an error, a log line, a tag, an artifact, a Prefect
flow-run parameter or event, the printed `cnnflow ui --backend-store-uri` hint, nor the command line (`ps`) of a
process cnnflow starts. Each path is read back where a user (or another user of the machine) would read it:
the terminal, the Prefect API, the MLflow REST API, /proc."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import time

import pytest

from flows import credentials
from flows.credentials import PASSWORD_ENV, PASSWORD_FILE_ENV
from flows.servers import stop_process_group
from flows.tracking import Store

from .conftest import CNNFLOW, MLFLOW_API, rest, tags, wait_for

SECRET = "s3cret"
DEAD_DATABASE = f"postgresql+psycopg2://user:{SECRET}@127.0.0.1:1/db"
MASKED_DATABASE = "postgresql+psycopg2://user:***@127.0.0.1:1/db"
TINY_TRAIN = ["--num-train", "120", "--num-val", "40", "--num-test", "40", "--num-epochs", "1", "--num-filters", "4",
              "--hidden-dim", "16", "--batch-size", "20"]


# ------------------------------------------------------------------ the helper itself


@pytest.mark.parametrize("text, shown", [
    (DEAD_DATABASE, MASKED_DATABASE),
    (f"error: the store {DEAD_DATABASE} and http://u:p%40ss@host:5000/x failed",
     f"error: the store {MASKED_DATABASE} and http://u:***@host:5000/x failed"),
    ("sqlite:////tmp/mlruns/mlflow.db", "sqlite:////tmp/mlruns/mlflow.db"),
    ("postgresql://user@db/mlflow", "postgresql://user@db/mlflow"),
    ("mysql+pymysql://root:p@ss:w0rd@db:3306/x", "mysql+pymysql://root:***@db:3306/x"),
    ("cnnflow run train --tracking-uri 'postgresql://a:b@c/d'", "cnnflow run train --tracking-uri 'postgresql://a:***@c/d'"),
])
def test_mask_hides_every_password_in_a_text_and_nothing_else(text, shown):
    assert credentials.mask(text) == shown


def test_a_flow_gets_the_masked_uri_and_reveal_puts_the_password_back(monkeypatch):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    monkeypatch.setattr(credentials, "_known", {})
    masked = credentials.masked_for_flow("postgresql+psycopg2://user:p%2Fw@db:5432/mlflow")
    assert masked == "postgresql+psycopg2://user:***@db:5432/mlflow"
    assert os.environ[PASSWORD_ENV] == "p/w"  # for the processes this one starts
    monkeypatch.setattr(credentials, "_known", {})  # another process: only the environment knows it
    assert credentials.reveal(masked) == "postgresql+psycopg2://user:p%2Fw@db:5432/mlflow"


def test_reveal_reads_an_owner_only_password_file_and_refuses_one_others_can_read(monkeypatch, tmp_path):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(credentials, "_known", {})
    file = tmp_path / "password"
    file.write_text("from-file\n")
    file.chmod(0o600)
    monkeypatch.setenv(PASSWORD_FILE_ENV, str(file))
    assert credentials.reveal(MASKED_DATABASE) == "postgresql+psycopg2://user:from-file@127.0.0.1:1/db"
    file.chmod(0o644)
    with pytest.raises(ValueError, match=rf"names {file}, which others can read \(mode 644\); make it yours alone "
                                         rf"with `chmod 600 {file}`"):
        credentials.reveal(MASKED_DATABASE)


def test_reveal_without_a_password_anywhere_says_where_to_put_it(monkeypatch):
    for name in (PASSWORD_ENV, PASSWORD_FILE_ENV, "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(credentials, "_known", {})
    with pytest.raises(ValueError, match=rf"has its password masked, and none was found to put back: set "
                                         rf"\${PASSWORD_ENV}, or \${PASSWORD_FILE_ENV}"):
        credentials.reveal(MASKED_DATABASE)


def test_reveal_takes_the_password_of_the_same_store_in_mlflow_tracking_uri(monkeypatch):
    for name in (PASSWORD_ENV, PASSWORD_FILE_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(credentials, "_known", {})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD_DATABASE)
    assert credentials.reveal(MASKED_DATABASE) == DEAD_DATABASE


def test_the_ui_hint_masks_the_password_quotes_the_uri_and_says_where_the_password_goes(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    hint = Store(DEAD_DATABASE).ui_command()
    assert SECRET not in hint and repr(Store(DEAD_DATABASE)) == f"Store('{MASKED_DATABASE}')"
    assert hint.startswith(f"{PASSWORD_ENV}=<password> ") and hint.endswith(
        f"ui --backend-store-uri '{MASKED_DATABASE}'")


# ------------------------------------------------------------------ real processes


def cnnflow(env: dict, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(CNNFLOW), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def env(ops_env, tmp_path) -> dict:
    return {**ops_env, "CNNCORE_SERVER_HOME": str(tmp_path / "server"), "COLUMNS": "200"}


@pytest.mark.parametrize("flow", ["train", "sweep"])
def test_an_unreachable_database_with_a_password_fails_in_one_masked_line_before_any_server(env, tmp_path, flow):
    started = time.monotonic()
    done = cnnflow(env, "run", flow, "--tracking-uri", DEAD_DATABASE)
    assert done.returncode == 1
    assert SECRET not in done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: the MLflow store {MASKED_DATABASE} cannot be reached (connection to server at \"127.0.0.1\", port 1 "
        "failed: Connection refused Is the server running on that host and accepting TCP/IP connections?). Nothing "
        "was logged. Start the database, or unset MLFLOW_TRACKING_URI to log to the local store "
        + done.stderr.split("to the local store ", 1)[1].strip()]
    assert time.monotonic() - started < 60  # not MLflow's 10 retries over about 100 s
    assert not (tmp_path / "server").exists()  # refused before a Prefect server was started


def test_a_database_uri_without_a_driver_suggests_the_installed_one(env):
    done = cnnflow(env, "run", "train", "--tracking-uri", f"postgresql://user:{SECRET}@127.0.0.1:1/db")
    assert done.returncode == 1 and SECRET not in done.stderr
    assert ("SQLAlchemy's default driver for postgresql:// is not installed (ModuleNotFoundError: No module named "
            "'psycopg'); name an installed one: postgresql+psycopg2://") in done.stderr


def command_lines(pid: int) -> dict[int, str]:
    """{pid: command line} of a process and all its descendants (what `ps` shows anyone)."""
    import psutil

    found = {}
    try:
        root = psutil.Process(pid)
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                found[process.pid] = " ".join(process.cmdline())
    except psutil.Error:
        pass
    return found


def stop_ui(ui: subprocess.Popen) -> str:
    """SIGTERM to a `cnnflow ui`; its stderr once it has ended (its process group killed if it does not)."""
    ui.send_signal(signal.SIGTERM)
    try:
        return ui.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        stop_process_group(ui, 5)
        raise


def test_cnnflow_ui_on_a_password_store_shows_the_password_on_no_command_line_and_no_line(env):
    ui = subprocess.Popen([str(CNNFLOW), "ui", "--port", "0", "--timeout", "60", "--backend-store-uri",
                           MASKED_DATABASE], env={**env, PASSWORD_ENV: SECRET}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # The MLflow server retries the dead database for about 100 s: its processes are there to look at.
        seen = wait_for(lambda: (found := command_lines(ui.pid)) and any("mlflow" in c for c in found.values())
                        and found, 120, "the MLflow server started by cnnflow ui")
        assert not [c for c in seen.values() if SECRET in c], seen
    finally:
        stderr = stop_ui(ui)
    assert SECRET not in stderr and f"starting the MLflow UI on {MASKED_DATABASE}" in stderr


def test_a_run_on_a_password_store_keeps_the_password_out_of_prefect_mlflow_and_the_terminal(env, mlflow_server,
                                                                                             prefect_server):
    """A real flow run on a store URI with a password (a tracking server behind basic auth, as a proxy would put
    it): the run succeeds, and the password is nowhere a person or the Prefect UI can read it."""
    uri = mlflow_server.replace("http://", f"http://user:{SECRET}@")
    masked = mlflow_server.replace("http://", "http://user:***@")
    name = f"secret-{time.time_ns()}"
    done = cnnflow({**env, "PREFECT_API_URL": prefect_server}, "run", "train", *TINY_TRAIN, "--experiment", "secrets",
                   "--run-name", name, "--tracking-uri", uri, "--output", "json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert SECRET not in done.stdout + done.stderr

    flow_runs = [r for r in rest(prefect_server, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 50})
                 if r["parameters"].get("run_name") == name]
    assert len(flow_runs) == 1
    (flow_run,) = flow_runs
    assert flow_run["parameters"]["tracking_uri"] == masked  # what the Prefect UI shows as the parameter
    logs = rest(prefect_server, "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run["id"]]}}})
    artifacts = rest(prefect_server, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}})
    # The server stores events in batches, after the flow run has ended: a clean-clone CI run once asked too early.
    events = wait_for(lambda: (found := rest(prefect_server, "/events/filter", {"filter": {"any_resource": {"id": [
        f"prefect.flow-run.{flow_run['id']}"]}}, "limit": 50})).get("events") and found, 30,
                      "the flow run's events in the Prefect API")
    assert logs and artifacts and events.get("events")
    for what, found in (("flow run", flow_run), ("logs", logs), ("artifacts", artifacts), ("events", events)):
        assert SECRET not in json.dumps(found), what
    assert any(masked in (a.get("description") or "") for a in artifacts)

    experiment = rest(mlflow_server, f"{MLFLOW_API}/experiments/get-by-name", experiment_name="secrets")
    (run,) = [r for r in rest(mlflow_server, f"{MLFLOW_API}/runs/search", {
        "experiment_ids": [experiment["experiment"]["experiment_id"]], "max_results": 100})["runs"]
        if tags(r).get("mlflow.runName") == name]
    assert SECRET not in json.dumps(run)
    assert f"--tracking-uri {masked}" in tags(run)["mlflow.source.name"]


def test_a_failure_reason_quoting_a_store_masks_its_password():
    from flows.tracking import failure_reason

    assert failure_reason(RuntimeError(f"could not reach {DEAD_DATABASE}")) == \
        f"RuntimeError: could not reach {MASKED_DATABASE}"


def test_the_local_prefect_servers_home_and_state_are_readable_by_their_owner_only(tmp_path):
    from flows import local_server

    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    local_server._private_folder(home)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    local_server._write_state(home, local_server.ServerState(pid=1, port=4242, created=0.0))
    assert stat.S_IMODE((home / local_server.STATE_FILE).stat().st_mode) == 0o600
