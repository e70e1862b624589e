"""The Prefect UI that cnnflow points at, in a real browser: the local server's UI on a port of its own
(not Prefect's 4200) reaches its own API and shows a sweep's flow run by name, the links cnnflow prints
open on it, and a study's report artifact shows its figures.

Debian's headless Chromium on a fresh profile (flows.browser); without it, the test skips saying how to
install it (.ci/run does).
"""

from __future__ import annotations

import re
import subprocess

import pytest

from flows.browser import Chromium, chromium_binary
from flows.servers import free_port
from flows.study import preset_spec

from .conftest import CNNFLOW, rest
from .test_local_server import kill_servers_in

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(chromium_binary() is None,
                                 reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)")]

PRESET = "bn-vs-gn-small"  # 20 small trials: a study, so its report artifact has figures
NO_API = ("Can't connect", "Unable to connect")  # what the UI shows when it looks for its API elsewhere


def cnnflow(env: dict, cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CNNFLOW), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def shows(text: str) -> str:
    """A JavaScript test: the page's text includes text."""
    return f"document.body.innerText.includes({text!r})"


def test_the_local_servers_ui_shows_a_studys_flow_run_and_its_report_with_its_figures(tmp_path, ops_env):
    """The small study on the local server, on a port of its own: its flow run found by name on the runs page
    that `cnnflow server status` prints, the printed flow run link opening on it, and the study's report
    artifact drawn with every figure loaded (embedded, not links to files the UI cannot reach)."""
    home = tmp_path / "server"
    port = free_port()
    env = {**ops_env, "CNNCORE_SERVER_HOME": str(home), "CNNCORE_SERVER_PORT": str(port), "COLUMNS": "200",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    name = "sweep-" + preset_spec(PRESET).name
    try:
        done = cnnflow(env, tmp_path, "run", "sweep", "--preset", PRESET)
        assert done.returncode == 0, done.stderr[-3000:]
        flow_run_link = re.search(r"^Prefect flow run: (\S+)$", done.stdout, re.M).group(1)
        assert flow_run_link.startswith(f"http://127.0.0.1:{port}/runs/flow-run/")
        status = cnnflow(env, tmp_path, "server", "status")
        runs_page = re.search(r"its flow runs: (\S+) ", status.stdout).group(1)
        assert runs_page == f"http://127.0.0.1:{port}/runs"
        assert rest(f"http://127.0.0.1:{port}", "/ui-settings")["api_url"] == f"http://127.0.0.1:{port}/api"

        flow_run_id = flow_run_link.rsplit("/", 1)[1]
        [report] = [a for a in rest(f"http://127.0.0.1:{port}/api", "/artifacts/filter",
                                    {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "type": {"any_": ["markdown"]}}})
                    if a["key"].startswith("study-")]

        with Chromium(1400, 1000) as browser:
            browser.load(runs_page, shows(name), timeout_s=120)
            assert not any(words in browser.text() for words in NO_API)
            browser.load(flow_run_link, shows(name) + " && " + shows("Completed"), timeout_s=120)
            assert not any(words in browser.text() for words in NO_API)
            browser.load(f"http://127.0.0.1:{port}/artifacts/artifact/{report['id']}",
                         "document.querySelectorAll('img').length >= 2 && "
                         "[...document.images].every(i => i.complete)", timeout_s=120)
            sizes = browser.evaluate("[...document.images].map(i => [i.alt, i.naturalWidth])")
            figures = [(alt, width) for alt, width in sizes if alt]
            assert len(figures) >= 2 and all(width > 200 for _, width in figures), sizes
    finally:
        cnnflow(env, tmp_path, "server", "stop")
        kill_servers_in(home)
