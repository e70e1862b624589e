"""Screenshots of the MLflow UI as a newcomer first sees it: a sweep's printed link, then BN against GN.

    .venv/bin/python docs/screenshots.py            # writes docs/img/mlflow-*.png

What it does, end to end, with nothing faked and no UI state written:
1. starts a real `mlflow server` on a free 127.0.0.1 port, on a fresh sqlite store
   with served artifacts in a temporary folder;
2. runs two sweeps against it the way a user would, `cnnflow run sweep` with
   MLFLOW_TRACKING_URI pointing at the server: the small BN-vs-GN study preset
   and a BN/GN x batch-size grid, and reads the link each prints at its end;
3. drives Debian's headless Chromium over its DevTools protocol (flows.browser), each session on
   a fresh profile (nothing in localStorage), with real mouse clicks and typed
   text only: it opens each printed link exactly as printed, then follows the
   path docs/operations.md describes (close the Assistant, Model training or
   Runs, Group by -> normalization, the chart view), saving a screenshot per step;
4. prints, per screenshot, the UI's mode (GenAI or Model training), whether the
   Assistant panel is open and how much of the width it takes, and the clicks the
   comparison took from the runs page;
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
# The study preset's link lands on its interaction figure, the grid's on comparison.png.
STUDY = ["--preset", "bn-vs-gn-small", "--experiment", "bn-vs-gn-study"]
GRID = ["--name", "bn-vs-gn-demo", "--space", "normalization=batchnorm,groupnorm", "--space", "batch_size=4,16,64",
        "--num-epochs", "2", "--experiment", "bn-vs-gn-demo"]
# The runs table, the figure and the first row of charts fill the top of the page: the screenshots stop below.
TABLE_HEIGHT, FIGURE_HEIGHT, CHARTS_HEIGHT = 560, 720, 650

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


def printed_link(output: str) -> str:
    """The parent run's link from `cnnflow run sweep`'s output: its "MLflow parent run:" line, or the
    top-level `url:` of its YAML."""
    found = re.search(r"^MLflow parent run: (\S+)$", output, re.M) or re.search(r"^url: (\S+)$", output, re.M)
    if found is None:
        raise RuntimeError(f"cnnflow run sweep printed no parent run link; its output ended:\n{output[-2000:]}")
    return found.group(1)


def run_sweep(args: list[str], server: str, workdir: Path) -> str:
    """Run `cnnflow run sweep ARGS` against the server; the link it printed."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": server, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_HOME": str(workdir / "prefect-home")}
    env.pop("PREFECT_API_URL", None)  # a temporary Prefect server is enough for one sweep
    print("cnnflow run sweep", *args)
    done = subprocess.run([str(CNNFLOW), "run", "sweep", *args], env=env, cwd=workdir, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"cnnflow run sweep failed ({done.returncode}):\n{done.stderr[-2000:]}")
    link = printed_link(done.stdout)
    print(f"  printed: {link}")
    return link


def open_link(browser: Chromium, link: str, path: Path) -> None:
    """The printed link as it opens: wait for the figure it names, drawn, then screenshot it."""
    artifact = link.split("/artifactPath/", 1)[1].split("?", 1)[0]
    browser.load(link, f"document.body.innerText.includes({json.dumps('/artifacts/' + artifact)}) && "
                       "[...document.images].some(i => i.complete && i.naturalWidth > 300)")
    browser.screenshot(path, height=FIGURE_HEIGHT)


def take_screenshots(links: dict[str, str], out: Path, width: int, height: int) -> None:
    # 1. What the study preset's link opens in a browser new to MLflow.
    with newcomer(width, height) as browser:
        open_link(browser, links["study"], out / "mlflow-link-study.png")

    # 2. The grid's link, then the path docs/operations.md describes, in one newcomer's browser.
    with newcomer(width, height) as browser:
        open_link(browser, links["grid"], out / "mlflow-link.png")
        if browser.evaluate(ASSISTANT_WIDTH):
            browser.click("document.querySelector('[data-assistant-ui] button[aria-label=\"Close\"]')")
        if browser.evaluate(IN_MODEL_TRAINING):  # the link chose the mode: the sidebar leads to the runs
            browser.click(by_text("nav a, a", "Runs"))
        else:  # the switch remembers Model training for this browser and opens the experiment's runs
            browser.click(by_text("[role=button]", "Model training"))
        browser.wait_for("document.body.innerText.includes('matching runs') && "
                         "document.body.innerText.includes('bn-vs-gn')", what="the runs page")
        browser.screenshot(out / "mlflow-runs.png", height=TABLE_HEIGHT)

        browser.clicks = 0
        browser.click(by_text("button", "Group by"))
        browser.type("norm")
        normalization = by_text("[role=menu] [role=menuitemcheckbox]", "normalization")
        browser.wait_for(normalization, what="Group by's normalization")
        browser.screenshot(out / "mlflow-group-by.png", settle_s=0.5, height=TABLE_HEIGHT)
        browser.click(normalization)
        browser.wait_for("document.body.innerText.includes('Group: batchnorm') && "
                         "document.body.innerText.includes('Group: groupnorm')", what="the groups")
        browser.screenshot(out / "mlflow-grouped.png", height=TABLE_HEIGHT)
        browser.click("document.querySelector('input[name=\"runs-view-mode\"][value=\"CHART\"]').closest('label')")
        browser.wait_for("document.querySelectorAll('.js-plotly-plot').length >= 3", what="the charts")
        browser.screenshot(out / "mlflow-compare.png", settle_s=3, height=CHARTS_HEIGHT)
        print(f"BN against GN, grouped and charted: {browser.clicks} clicks from the runs page")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DOCS / "img", help="folder for the PNGs")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--server", help="run the sweeps against this running MLflow server instead of a fresh one")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mlflow-screenshots-") as tmp:
        workdir = Path(tmp)
        with contextlib.ExitStack() as stack:
            server = args.server.rstrip("/") if args.server else None
            if server is None:
                port = free_port()
                server = f"http://127.0.0.1:{port}"
                command, _ = mlflow_server_command(f"sqlite:///{workdir / 'mlflow.db'}", port,
                                                   artifacts_destination=str(workdir / "artifacts"))
                stack.enter_context(background_server(command, f"{server}/health", log=workdir / "server.log"))
                print(f"mlflow server at {server}")
            links = {"study": run_sweep(STUDY, server, workdir), "grid": run_sweep(GRID, server, workdir)}
            take_screenshots(links, args.out, args.width, args.height)


if __name__ == "__main__":
    main()
