"""What a sweep shows in MLflow's UI, in a real browser: the printed link opens the report, the parent's Overview
answers first, the printed chart view shows this sweep's trials alone, grouped by normalization and charted
against batch size first, and a trial's charts read test scores, then learning curves.

Against a real `mlflow server` (MLflow 3.17's UI, served), with Debian's headless Chromium on a fresh
profile (flows.browser); without it, the tests skip saying how to install it (.ci/run does).
"""

from __future__ import annotations

import re
import subprocess

import pytest
from mlflow import MlflowClient

from flows.browser import Chromium, chromium_binary

from .conftest import CNNFLOW

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(chromium_binary() is None,
                                 reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)")]

TINY_TRAIN = ["--num-train", "120", "--num-val", "40", "--num-test", "40", "--num-epochs", "1",
              "--num-filters", "4", "--hidden-dim", "16", "--num-groups", "2"]
SECTION_HEADERS = "[...document.querySelectorAll('[data-testid=experiment-view-compare-runs-section-header]')]" \
                  ".map(e => e.textContent.replace(/Add chart$/, '').trim())"


def shows(text: str) -> str:
    """A JavaScript test: the page's text includes text."""
    return f"document.body.innerText.includes({text!r})"


@pytest.fixture(scope="module")
def printed(mlflow_server, prefect_server, ops_env, tmp_path_factory) -> dict[str, str]:
    """Two sweeps against the server in one experiment, as a user runs them; the links the second printed."""
    env = {**ops_env, "COLUMNS": "250", "PREFECT_API_URL": prefect_server, "MLFLOW_TRACKING_URI": mlflow_server}
    cwd = tmp_path_factory.mktemp("ui")
    for name, space in (("ui-other", ["--space", "normalization=batchnorm,groupnorm"]),
                        ("ui-check", ["--space", "normalization=batchnorm,groupnorm", "--space", "batch_size=20,10",
                                      "--space", "train_seed=0,1"])):
        done = subprocess.run([str(CNNFLOW), "run", "sweep", "--name", name, *TINY_TRAIN, *space, "--experiment",
                               "ui-check", "--trials-in", "threads"], capture_output=True, text=True, env=env,
                              cwd=cwd, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    return {"report": re.search(r"^MLflow parent run: (\S+)$", done.stdout, re.M).group(1),
            "charts": re.search(r"^its trials by normalization and batch size, in MLflow's charts: (\S+)$",
                                done.stdout, re.M).group(1),
            "answer": re.search(r"^(BN against GN: .*)$", done.stdout, re.M).group(1)}


def test_the_printed_link_opens_the_report_and_the_overview_answers_first(printed):
    with Chromium(1600, 1000) as browser:
        browser.load(printed["report"], shows("comparison/report.html") + " && document.querySelector('iframe')")
        browser.click("[...document.querySelectorAll('[role=tab], a, button')]"
                      ".find(e => e.textContent.trim() === 'Overview')")
        browser.wait_for(shows("Description"), what="the Overview")
        description = browser.evaluate("document.querySelector('[data-testid=\"entity-overview-container\"]')"
                                       "?.innerText ?? document.body.innerText")
        assert description.index("Description") < description.index("BN against GN: ") < description.index("Metrics")
        assert "answer/bn_minus_gn_batch_20" in browser.text()
        link = browser.evaluate("[...document.querySelectorAll('a')].find(a => a.textContent.startsWith("
                                "\"ui-check's trials by normalization and batch size\"))?.getAttribute('href')")
        assert link == "#" + printed["charts"].partition("#")[2]  # the view, wherever the UI is served
    assert browser.clicks == 1


def test_the_chart_view_shows_this_sweeps_trials_alone_grouped_by_normalization_and_charted_first(
        printed, mlflow_server):
    with Chromium(1600, 1000) as browser:
        browser.load(printed["charts"], shows("Group: batchnorm") + " && " + shows("Group: groupnorm")
                     + " && document.querySelectorAll('.js-plotly-plot').length >= 1", timeout_s=120)
        sections = browser.evaluate(SECTION_HEADERS)
        text = browser.text()
    assert sections[0] == "ui-check: the comparison(1)"  # the test accuracy against batch size, before the rest
    assert "ui-check: its trials by normalization" in text  # the view, by name
    # 2 batch sizes x 2 seeds per group; the other sweep's trials are not there.
    assert re.search(r"Group: batchnorm\s*4\b", text) and re.search(r"Group: groupnorm\s*4\b", text)
    assert "ui-other/" not in text
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("ui-check").experiment_id
    other = [r for r in client.search_runs([experiment]) if r.data.tags.get("sweep_name") == "ui-other"]
    assert other and not any(r.info.run_name in text for r in other)


def test_a_trials_charts_read_test_scores_then_learning_curves_then_the_rest(printed, mlflow_server):
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("ui-check").experiment_id
    trial = next(r for r in client.search_runs([experiment]) if r.data.tags.get("sweep_name") == "ui-check"
                 and r.data.tags.get("sweep_role") == "trial")
    page = f"{mlflow_server}/#/experiments/{experiment}/runs/{trial.info.run_id}/model-metrics" \
           "?workflowType=machine_learning"
    with Chromium(1600, 1000) as browser:
        browser.load(page, "document.querySelectorAll('.js-plotly-plot').length >= 3", timeout_s=120)
        sections = browser.evaluate(SECTION_HEADERS)
    assert [re.sub(r"\(\d+\)$", "", s) for s in sections] == ["accuracy", "curves", "Model metrics"]
