"""Screenshots of the MLflow UI as a newcomer first sees it: what `make run` prints links to, and BN against GN.

    .venv/bin/python docs/screenshots.py            # writes docs/img/mlflow-*.png

What it does, end to end, with nothing faked and no UI state written by hand:
1. starts a real `mlflow server` on a free 127.0.0.1 port, on a fresh sqlite store
   with served artifacts in a temporary folder;
2. runs, the way a user would and with MLFLOW_TRACKING_URI pointing at the server,
   `cnnflow run pipeline` (what `make run` runs, its defaults: BN against GN at batch
   32, 8 and 2 over 5 seeds) and the small BN-vs-GN study preset, and reads the links
   each prints at its end;
3. drives Debian's headless Chromium over its DevTools protocol (flows.browser), each
   session on a fresh profile (nothing in localStorage), with real mouse clicks only:
   it opens the pipeline's comparison link exactly as printed, then follows the path
   docs/operations.md describes (close the Assistant, Overview, the description's link
   to the trials' chart view, which MLflow opens in a new tab: the screenshot follows
   it there, then a trial's Model metrics), saving a screenshot per step; and the
   study's printed link in a browser of its own;
4. prints, per screenshot, the UI's mode (GenAI or Model training), whether the
   Assistant panel is open and how much of the width it takes, and the clicks from the
   printed link to BN against GN per batch size in MLflow's charts;
5. stops Chromium and the server by their process group ids.

Needs `apt-get install chromium`. Screenshots are palette-quantised to stay small.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from flows import browser as flows_browser
from flows.servers import background_server, free_port, mlflow_server_command

DOCS = Path(__file__).resolve().parent
CNNFLOW = Path(sys.executable).with_name("cnnflow")
# The study preset's link lands on its interaction figure; the pipeline's comparison link on its report.
STUDY = ["sweep", "--preset", "bn-vs-gn-small", "--experiment", "bn-vs-gn-study"]
PIPELINE = ["pipeline"]
# The report, the Overview, the charts and a trial's charts fill the top of the page: the screenshots stop below.
FIGURE_HEIGHT, OVERVIEW_HEIGHT, CHARTS_HEIGHT = 900, 620, 760

# What the page shows, read from the DOM (never written).
IN_MODEL_TRAINING = "!!document.querySelector('a[href=\"#/models\"]')"  # the sidebar's Model registry: that mode only
ASSISTANT_WIDTH = """[...document.querySelectorAll('[data-assistant-ui]')]
    .map(e => e.getBoundingClientRect().width).filter(w => w > 100).concat([0])[0]"""


def by_text(selector: str, text: str) -> str:
    """A JavaScript expression: the first element matching selector whose trimmed text is text."""
    return (f"[...document.querySelectorAll({json.dumps(selector)})]"
            f".find(e => e.textContent.trim() === {json.dumps(text)})")


class Chromium(flows_browser.Chromium):
    """flows.browser's Chromium, whose screenshots are palette-reduced and say what the page shows."""

    def screenshot(self, path: Path, settle_s: float = 1.5, height: int | None = None) -> None:
        """A PNG of the viewport's top `height` pixels (all of it by default), quantised to a palette to
        keep it small; prints what the page shows."""
        # The pointer rests on the page's top margin, so no row or chart shows its hover controls.
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=self.width // 2, y=2)
        time.sleep(settle_s)
        data = self.screenshot_png(height)
        image = Image.open(io.BytesIO(data)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, optimize=True)
        mode = "Model training" if self.evaluate(IN_MODEL_TRAINING) else "GenAI"
        assistant = self.evaluate(ASSISTANT_WIDTH)
        panel = (f"Assistant panel open, {assistant / self.width:.0%} of the width" if assistant
                 else "no Assistant panel")
        print(f"{path}: {path.stat().st_size // 1024} KB; {mode} mode; {panel}")


@contextlib.contextmanager
def newcomer(width: int, height: int) -> Iterator[Chromium]:
    """A browser that has never opened MLflow: a fresh profile, closed afterwards."""
    with Chromium(width, height) as newcomers_browser:
        yield newcomers_browser


def printed_links(output: str) -> dict[str, str]:
    """The MLflow links a `cnnflow run` printed, by what they are: a sweep's "MLflow parent run:", a pipeline's
    "the comparison, in MLflow:", and the trials' chart view."""
    links = {}
    for name, pattern in (("comparison", r"^(?:MLflow parent run|the comparison, in MLflow): (\S+)$"),
                          ("charts", r"^its trials by normalization and batch size, in MLflow's charts: (\S+)$")):
        if found := re.search(pattern, output, re.M):
            links[name] = found.group(1)
    if "comparison" not in links:
        raise RuntimeError(f"cnnflow run printed no MLflow link; its output ended:\n{output[-2000:]}")
    return links


def run_cnnflow(args: list[str], server: str, workdir: Path) -> dict[str, str]:
    """Run `cnnflow run ARGS` against the server; the links it printed."""
    # A temporary Prefect server is enough for one run; on a busy machine it takes more than Prefect's 20 s to start.
    env = {**os.environ, "MLFLOW_TRACKING_URI": server, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_HOME": str(workdir / "prefect-home"), "COLUMNS": "250",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    env.pop("PREFECT_API_URL", None)
    print("cnnflow run", *args)
    done = subprocess.run([str(CNNFLOW), "run", *args, "--no-local-server"], env=env, cwd=workdir,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"cnnflow run failed ({done.returncode}):\n{done.stderr[-2000:]}")
    print(done.stdout)
    return printed_links(done.stdout)


def open_link(browser: Chromium, link: str, path: Path) -> None:
    """The printed link as it opens: wait for the artifact it names, drawn (a figure, or a report's page in its
    frame), then screenshot it."""
    artifact = link.split("/artifactPath/", 1)[1].split("?", 1)[0]
    drawn = ("!!document.querySelector('iframe')" if artifact.endswith(".html")
             else "[...document.images].some(i => i.complete && i.naturalWidth > 300)")
    browser.load(link, f"document.body.innerText.includes({json.dumps('/artifacts/' + artifact)}) && {drawn}")
    browser.screenshot(path, settle_s=3, height=FIGURE_HEIGHT)


def opened_tab(browser: Chromium, contains: str, timeout_s: float = 30) -> str:
    """The address of the tab a click opened (a link with target=_blank), once it has one containing contains."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for target in browser.send("Target.getTargets")["targetInfos"]:
            if target["type"] == "page" and contains in target["url"]:
                return target["url"]
        time.sleep(0.5)
    raise TimeoutError(f"no tab opened on a page containing {contains!r}")


def take_screenshots(links: dict[str, dict[str, str]], out: Path, width: int, height: int) -> None:
    # 1. What the study preset's link opens in a browser new to MLflow.
    with newcomer(width, height) as browser:
        open_link(browser, links["study"]["comparison"], out / "mlflow-link-study.png")

    # 2. The pipeline's comparison link, then the path docs/operations.md describes, in one newcomer's browser.
    with newcomer(width, height) as browser:
        open_link(browser, links["pipeline"]["comparison"], out / "mlflow-link.png")
        if browser.evaluate(ASSISTANT_WIDTH):
            browser.click("document.querySelector('[data-assistant-ui] button[aria-label=\"Close\"]')")
        browser.click(by_text("[role=tab], a, button", "Overview"))
        browser.wait_for("document.body.innerText.includes('Description') && "
                         "document.body.innerText.includes('answer/')", what="the parent run's Overview")
        browser.screenshot(out / "mlflow-overview.png", height=OVERVIEW_HEIGHT)
        link = ("[...document.querySelectorAll('a')].find(a => a.textContent.includes("
                "'trials by normalization and batch size, in MLflow'))")
        href = browser.evaluate(f"{link}?.getAttribute('href')")
        assert href == "#" + links["pipeline"]["charts"].partition("#")[2], href  # the printed view's link
        browser.click(link)
        # MLflow opens a description's links in a new tab: this page goes where that tab went (or where the link
        # points, when a loaded machine has not opened the tab within the wait).
        try:
            charts = opened_tab(browser, "viewStateShareKey=")
        except TimeoutError:
            print("the description's link opened no tab within 30 s: following its address")
            charts = links["pipeline"]["charts"]
        browser.load(charts, "document.body.innerText.includes('Group: batchnorm') && "
                             "document.querySelectorAll('.js-plotly-plot').length >= 1")
        browser.screenshot(out / "mlflow-charts.png", settle_s=4, height=CHARTS_HEIGHT)
        print(f"BN against GN per batch size in MLflow's charts: {browser.clicks} clicks from the printed link")
        browser.click("[...document.querySelectorAll('a')].find(a => /\\/\\d\\d (batchnorm|groupnorm)/.test("
                      "a.textContent))")
        browser.wait_for("document.body.innerText.includes('Model metrics')", what="a trial's run page")
        browser.click(by_text("[role=tab], a, button", "Model metrics"))
        browser.wait_for("document.querySelectorAll('.js-plotly-plot').length >= 3", what="the trial's charts")
        browser.screenshot(out / "mlflow-trial.png", settle_s=3, height=CHARTS_HEIGHT)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DOCS / "img", help="folder for the PNGs")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--server", help="run the flows against this running MLflow server instead of a fresh one")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mlflow-screenshots-") as tmp:
        workdir = Path(tmp)
        with contextlib.ExitStack() as stack:
            server = args.server.rstrip("/") if args.server else None
            if server is None:
                port = free_port()
                server = f"http://127.0.0.1:{port}"
                command, env = mlflow_server_command(f"sqlite:///{workdir / 'mlflow.db'}", port,
                                                     artifacts_destination=str(workdir / "artifacts"))
                stack.enter_context(background_server(command, f"{server}/health", env={**os.environ, **env},
                                                      log=workdir / "server.log"))
                print(f"mlflow server at {server}")
            links = {"pipeline": run_cnnflow(PIPELINE, server, workdir), "study": run_cnnflow(STUDY, server, workdir)}
            take_screenshots(links, args.out, args.width, args.height)


if __name__ == "__main__":
    main()
