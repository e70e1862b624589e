"""`cnnflow server` and `cnnflow run` without PREFECT_API_URL: one long-lived local Prefect server, started once.

Real processes throughout: `cnnflow` subprocesses with a temporary $CNNCORE_SERVER_HOME,
real `prefect server start` processes, found and checked by pid and process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import psutil
import pytest

import harness

from flows import local_server
from flows.servers import free_port

from .conftest import CNNFLOW, rest

TINY_TRAIN = ["--num-train", "120", "--num-val", "40", "--num-test", "40", "--num-epochs", "1",
              "--num-filters", "4", "--hidden-dim", "16", "--batch-size", "20"]
# A cold start creates the server's database: about 10 s on 2 cores; a loaded CI machine takes longer.
START_TIMEOUT_S = 180


def cnnflow(env: dict, *args: str, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([str(CNNFLOW), *args], capture_output=True, text=True, env=env, timeout=timeout)


def server_env(ops_env: dict, home: Path, *, cold: bool = False) -> dict:
    """A cnnflow environment with no PREFECT_API_URL and the local server's home in home, its database already
    made (harness.seed_prefect_home) unless cold."""
    if not cold:
        harness.seed_prefect_home(local_server.prefect_home(home))
    return {**ops_env, "CNNCORE_SERVER_HOME": str(home), "COLUMNS": "200"}


def live_group_members(group_id: int) -> list[int]:
    """The pids of the live (not zombie) processes in a process group."""
    found = []
    for process in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if process.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(process.pid) == group_id:
                found.append(process.pid)
    return found


def servers_in(home: Path) -> list[int]:
    """The pids of the `prefect server start` processes whose PREFECT_HOME is the local server's in home."""
    pids = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if "server" in (process.info["cmdline"] or []) and \
                    process.environ().get("PREFECT_HOME") == str(home / "prefect"):
                pids.append(process.pid)
    return pids


def kill_servers_in(home: Path) -> None:
    """Whatever a failed test left running in home, gone."""
    for pid in servers_in(home):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def state_pid(home: Path) -> int:
    return json.loads((home / local_server.STATE_FILE).read_text())["pid"]


@pytest.fixture(scope="module")
def running(tmp_path_factory, ops_env):
    """A local server started by `cnnflow server start` in a temporary home: (env, home, start's result)."""
    home = tmp_path_factory.mktemp("local-server")
    env = server_env(ops_env, home)
    try:
        started = cnnflow(env, "server", "start")
        assert started.returncode == 0, started.stderr
        yield env, home, started
    finally:
        cnnflow(env, "server", "stop", timeout=60)
        kill_servers_in(home)


# ---------------------------------------------------------------- no server


def test_status_without_a_server_says_so_and_exits_1(tmp_path, ops_env):
    done = cnnflow(server_env(ops_env, tmp_path), "server", "status")
    assert done.returncode == 1
    assert done.stdout.strip() == f"the local Prefect server is not running (home {tmp_path})"


def test_stop_without_a_server_does_nothing_and_succeeds(tmp_path, ops_env):
    for _ in range(2):
        done = cnnflow(server_env(ops_env, tmp_path), "server", "stop")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "the local Prefect server was not running"


def test_a_stale_state_is_reported_by_status_and_removed_by_stop(tmp_path, ops_env):
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / local_server.STATE_FILE).write_text(json.dumps({"pid": gone.pid, "port": 1, "created": 0.0}))
    env = server_env(ops_env, tmp_path)

    status = cnnflow(env, "server", "status")
    assert status.returncode == 1
    assert f"names pid {gone.pid}, which is gone (a stale state" in status.stdout

    stopped = cnnflow(env, "server", "stop")
    assert stopped.returncode == 0
    assert f"removed the stale state naming pid {gone.pid}" in stopped.stdout
    assert not (tmp_path / local_server.STATE_FILE).exists()


def test_a_live_server_is_told_from_a_recycled_pid_by_a_start_time_no_clock_adjustment_moves(tmp_path):
    """psutil's create_time adds the kernel's boot time in whole seconds of the wall clock, which moves when the
    clock is adjusted: a slow test run once saw a live server's time a second off, took it for a recycled pid, and
    a second command started a second server beside it. The state's own start time (seconds after boot on Linux)
    does not move; a recycled pid has another; a state written before it was recorded is read as before."""
    process = subprocess.Popen(["sleep", "60"])
    try:
        started, created = local_server._start_since_boot(process.pid), local_server._created(process.pid)
        assert started is not None and created is not None

        def alive(**state) -> bool:
            local_server._write_state(tmp_path, local_server.ServerState(pid=process.pid, port=1, **state))
            return local_server.server_status(tmp_path).running

        assert alive(created=created + 1.0, started=started)  # the wall clock moved a second: the same process
        assert not alive(created=created, started=started - 1.0)  # another process under the same pid
        assert alive(created=created)  # an older state file: created alone, as before
        assert not alive(created=created + 1.0)
    finally:
        process.kill()
        process.wait()
    assert local_server._start_since_boot(process.pid) is None


def test_the_server_environment_holds_none_of_the_users_prefect_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "sqlite+aiosqlite:////home/someone/.prefect/prefect.db")
    monkeypatch.setenv("PREFECT_PROFILE", "work")
    env = local_server.server_environment(tmp_path, 4300)
    assert {k for k in env if k.startswith("PREFECT_")} == {
        "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT",
        "PREFECT_SERVER_LOGGING_LEVEL", "PREFECT_SERVER_UI_API_URL"}
    assert env["PREFECT_SERVER_UI_API_URL"] == "http://127.0.0.1:4300/api" and env["DO_NOT_TRACK"] == "1"
    assert env["PREFECT_HOME"] == str(tmp_path / "prefect") and env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"


def test_the_server_listens_on_loopback_only():
    command = local_server.server_command(4242)
    assert command[command.index("--host") + 1] == "127.0.0.1"


# ---------------------------------------------------------------- one running server


def test_start_says_the_api_url_and_status_finds_the_server_answering(running):
    env, home, started = running
    api_url = started.stdout.strip()
    assert api_url.startswith("http://127.0.0.1:") and api_url.endswith("/api")
    with urllib.request.urlopen(api_url + "/health", timeout=10) as response:
        assert response.status == 200
    status = cnnflow(env, "server", "status", "--output", "json")
    assert status.returncode == 0, status.stdout
    found = json.loads(status.stdout)
    assert found["api_url"] == api_url and found["running"] and found["answering"]
    assert found["pid"] == state_pid(home)


def test_the_servers_ui_is_told_its_own_api_and_the_server_names_its_home(running):
    env, home, started = running
    api_url = started.stdout.strip()
    ui_settings = rest(api_url.removesuffix("/api"), "/ui-settings")
    assert ui_settings["api_url"] == api_url  # not Prefect's default, http://127.0.0.1:4200/api
    assert Path(rest(api_url, "/admin/settings")["home"]) == home / "prefect"


def test_a_second_start_reuses_the_running_server(running):
    env, home, started = running
    again = cnnflow(env, "server", "start")
    assert again.returncode == 0
    assert again.stdout == started.stdout
    assert f"already running: the local Prefect server (pid {state_pid(home)})" in again.stderr
    assert servers_in(home) == [state_pid(home)]


def test_the_server_outlives_the_command_that_started_it_in_a_session_of_its_own(running):
    _, home, _ = running
    pid = state_pid(home)
    server = psutil.Process(pid)
    assert server.is_running() and server.status() != psutil.STATUS_ZOMBIE
    assert os.getsid(pid) == pid and os.getpgid(pid) == pid  # no terminal's Ctrl-C or hang-up reaches it


def test_run_without_prefect_api_url_reports_to_the_running_server(running, tmp_path):
    env, home, started = running
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([str(CNNFLOW), "run", "train", *TINY_TRAIN, "--run-name", "via-local-server"],
                          capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting the local Prefect server" not in done.stderr
    assert servers_in(home) == [state_pid(home)]  # the same server, no second one
    flow_runs = rest(started.stdout.strip(), "/flow_runs/filter", {"limit": 50})
    assert [run["state_type"] for run in flow_runs] == ["COMPLETED"]
    flows = rest(started.stdout.strip(), "/flows/filter", {})
    assert [f["name"] for f in flows] == ["train"]


# ---------------------------------------------------------------- start and stop


def test_stop_ends_the_servers_whole_process_group_and_removes_the_state(tmp_path, ops_env):
    env = server_env(ops_env, tmp_path)
    try:
        assert cnnflow(env, "server", "start").returncode == 0
        pid = state_pid(tmp_path)
        assert live_group_members(pid)

        stopped = cnnflow(env, "server", "stop", timeout=60)
        assert stopped.returncode == 0
        assert stopped.stdout.strip() == f"stopped the local Prefect server (pid {pid})"
        assert live_group_members(pid) == []
        assert not (tmp_path / local_server.STATE_FILE).exists()
        assert cnnflow(env, "server", "status").returncode == 1
    finally:
        kill_servers_in(tmp_path)


@pytest.mark.slow
def test_two_starts_at_once_give_one_server(tmp_path, ops_env):
    env = server_env(ops_env, tmp_path)
    try:
        starts = [subprocess.Popen([str(CNNFLOW), "server", "start"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
        results = [start.communicate(timeout=START_TIMEOUT_S) for start in starts]
        assert [start.returncode for start in starts] == [0, 0], results
        assert results[0][0] == results[1][0]  # one API URL
        assert servers_in(tmp_path) == [state_pid(tmp_path)]
        said = sorted(err.splitlines()[-1].split(" the local")[0] for _, err in results)
        assert said == ["already running:", "started"]
    finally:
        cnnflow(env, "server", "stop", timeout=60)
        kill_servers_in(tmp_path)


def stop_servers_in(homes: list[Path], envs: list[dict]) -> None:
    for home, env in zip(homes, envs):
        cnnflow(env, "server", "stop", timeout=60)
        kill_servers_in(home)


def start_at_once(envs: list[dict], *args: str) -> list[tuple[int, str, str]]:
    """`cnnflow server start ARGS` in each environment, all started together: (exit code, stdout, stderr) each."""
    starts = [subprocess.Popen([str(CNNFLOW), "server", "start", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env) for env in envs]
    outputs = [start.communicate(timeout=START_TIMEOUT_S) for start in starts]
    return [(start.returncode, *output) for start, output in zip(starts, outputs)]


@pytest.mark.slow
def test_two_homes_starting_at_once_on_one_port_each_get_their_own_server(tmp_path, ops_env):
    """Two checkouts' first runs at once both pick the same free port: the one whose server loses the bind
    starts again on a free port, and never adopts the other's server (whose database is the other's)."""
    homes = [tmp_path / "a", tmp_path / "b"]
    port = free_port()
    envs = [{**server_env(ops_env, home), local_server.PORT_ENV: str(port)} for home in homes]
    try:
        results = start_at_once(envs)
        assert [code for code, _, _ in results] == [0, 0], results
        urls = [out.strip() for _, out, _ in results]
        assert len(set(urls)) == 2 and f"http://127.0.0.1:{port}/api" in urls, urls
        for home, url in zip(homes, urls):
            assert Path(rest(url, "/admin/settings")["home"]) == home / "prefect"
            assert servers_in(home) == [state_pid(home)]
        lost = [err for (_, out, err) in results if out.strip() != f"http://127.0.0.1:{port}/api"]
        assert f"port {port} on 127.0.0.1 was taken by another server while the local Prefect server started; " \
               "starting it on a free port instead" in lost[0]
    finally:
        stop_servers_in(homes, envs)


@pytest.mark.slow
def test_two_homes_asking_for_one_port_at_once_give_one_server_and_one_clear_error(tmp_path, ops_env):
    homes = [tmp_path / "a", tmp_path / "b"]
    port = free_port()
    envs = [server_env(ops_env, home) for home in homes]
    try:
        results = sorted(start_at_once(envs, "--port", str(port)))
        assert [code for code, _, _ in results] == [0, 1], results
        assert results[0][1].strip() == f"http://127.0.0.1:{port}/api"
        error = results[1][2].strip().splitlines()[-1]
        assert error.startswith("error: the local Prefect server did not start: port ") and \
            error.endswith("choose another port (0 picks a free one)"), results[1][2]
        assert sorted(len(servers_in(home)) for home in homes) == [0, 1]
    finally:
        stop_servers_in(homes, envs)


@pytest.mark.slow
def test_the_first_run_starts_the_server_and_leaves_it_running(tmp_path, ops_env):
    home = tmp_path / "server"
    # A user's first run: the server's database is made then, the cold start's 18 s on 2 cores.
    env = {**server_env(ops_env, home, cold=True), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    try:
        done = subprocess.run([str(CNNFLOW), "run", "train", *TINY_TRAIN], capture_output=True, text=True,
                              env=env, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "starting the local Prefect server at http://127.0.0.1:" in done.stderr
        status = cnnflow(env, "server", "status")
        assert status.returncode == 0, status.stdout
        assert servers_in(home) == [state_pid(home)]
    finally:
        cnnflow(env, "server", "stop", timeout=60)
        kill_servers_in(home)
