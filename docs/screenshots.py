"""Screenshots of the MLflow UI comparing BN and GN runs of a sweep, for docs/operations.md.

    .venv/bin/python docs/screenshots.py            # writes docs/img/mlflow-*.png

What it does, end to end, with nothing faked:
1. starts a real `mlflow server` on a free 127.0.0.1 port (sqlite store and
   served artifacts in a temporary folder);
2. runs a BN-vs-GN sweep against it the way a user would:
   `cnnflow run sweep ...` with MLFLOW_TRACKING_URI pointing at the server;
3. drives Debian's headless Chromium through its DevTools protocol (the runs
   list needs a click to show the child runs under their parent) and saves
   three screenshots: the runs list, the compare-runs view of the BN and GN
   children, and the parent run's comparison figure;
4. stops Chromium and the server by their process group ids.

Needs `apt-get install chromium`. Screenshots are palette-quantised to stay
well under 500 KB each.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image
from websockets.sync.client import connect

from flows.servers import background_server, free_port, mlflow_server_command, stop_process_group

DOCS = Path(__file__).resolve().parent
CNNFLOW = Path(sys.executable).with_name("cnnflow")
EXPERIMENT = "bn-vs-gn-demo"
SWEEP = ["--name", "bn-vs-gn", "--space", "normalization=batchnorm,groupnorm", "--space", "batch_size=4,16,64",
         "--num-epochs", "2", "--experiment", EXPERIMENT]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]


class Chromium:
    """Headless Chromium on a temporary profile, driven over the DevTools protocol."""

    def __init__(self, width: int, height: int, timeout_s: float = 60):
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-"))
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if binary is None:
            raise SystemExit("chromium is not installed: apt-get install chromium")
        self.process = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout_s)
        self.next_id = 0
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=120))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    def load(self, url: str, ready: str, timeout_s: float = 60) -> None:
        """Load url afresh (the UI reads its saved state at start) and wait until `ready` is truthy."""
        self.send("Page.navigate", url="about:blank")
        self.send("Page.navigate", url=url)
        self.wait_for(ready, timeout_s, url)

    def wait_for(self, expression: str, timeout_s: float = 60, what: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what or expression}: not ready after {timeout_s:.0f} s")
            time.sleep(0.5)

    def click(self, element: str) -> None:
        """A real mouse click at the centre of the element the JavaScript expression finds."""
        point = self.evaluate(f"""(() => {{ const e = {element}; if (!e) return null;
            e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        if point is None:
            raise LookupError(f"nothing to click: {element}")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=point[0], y=point[1], button="left", clickCount=1)
        time.sleep(0.5)

    def screenshot(self, path: Path, settle_s: float = 1.5) -> None:
        """A PNG of the viewport, quantised to a palette to keep it small."""
        time.sleep(settle_s)
        data = base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])
        image = Image.open(io.BytesIO(data)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, optimize=True)
        print(f"{path}: {path.stat().st_size // 1024} KB")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        stop_process_group(self.process, 5)
        shutil.rmtree(self.profile, ignore_errors=True)


def rest(server: str, path: str, body: dict | None = None, **query) -> dict:
    url = f"{server}/api/2.0/mlflow{path}" + ("?" + urllib.parse.urlencode(query) if query else "")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def run_sweep(server: str, workdir: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": server, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_HOME": str(workdir / "prefect-home")}
    env.pop("PREFECT_API_URL", None)  # a temporary Prefect server is enough for one sweep
    print("cnnflow run sweep", *SWEEP)
    subprocess.run([str(CNNFLOW), "run", "sweep", *SWEEP], check=True, env=env, cwd=workdir,
                   stdout=subprocess.DEVNULL)


def sweep_runs(server: str) -> tuple[str, dict, list[dict]]:
    """(experiment id, the parent run, its child runs)."""
    experiment_id = rest(server, "/experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]["experiment_id"]
    runs = rest(server, "/runs/search", {"experiment_ids": [experiment_id], "max_results": 100})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs]
    parent = next(r for r, t in zip(runs, tags) if t.get("sweep_role") == "parent")
    children = [r for r, t in zip(runs, tags) if t.get("mlflow.parentRunId") == parent["info"]["run_id"]]
    return experiment_id, parent, children


def ui_state(parent_id: str) -> dict:
    """The experiment page's saved state: children shown under the parent, BN/GN columns, no auto-refresh."""
    return {
        "searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
        "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        "selectedColumns": ["params.`normalization`", "params.`batch_size`", "metrics.`best_val_acc`",
                            "metrics.`test_acc`"],
        "columnOrder": ["attributes.`Run Name`"], "columnWidths": {"attributes.`Run Name`": 330},
        "runsExpanded": {parent_id: True}, "runsPinned": [], "runsHidden": [], "runsVisibilityMap": {},
        "runsHiddenMode": "FIRST_10_RUNS", "viewMaximized": False, "runListHidden": False,
        "isAccordionReordered": False, "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None,
        "groupsExpanded": {}, "autoRefreshEnabled": False,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }


def take_screenshots(server: str, out: Path, width: int, height: int) -> None:
    experiment_id, parent, children = sweep_runs(server)
    parent_id = parent["info"]["run_id"]
    browser = Chromium(width, height)
    try:
        # MLflow 3's UI opens in GenAI mode with its assistant panel; a user switches to "Model training"
        # and closes the panel once, and the UI remembers. Do the same through its saved state.
        browser.load(f"{server}/#/experiments/{experiment_id}", "document.body.innerText.includes('Model training')")
        saved = {"mlflow.workflowType_v1": json.dumps("machine_learning"), "mlflow.assistant.panelOpen_v1": "false",
                 "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
                 f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState':
                     json.dumps(ui_state(parent_id))}
        browser.evaluate(";".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)})" for k, v in saved.items()))

        # 1. The experiment's runs: the sweep's parent run with its six child runs, BN and GN.
        #    The list is short: a lower window leaves no empty half.
        browser.send("Emulation.setDeviceMetricsOverride", width=width, height=560, deviceScaleFactor=1, mobile=False)
        last_child = max(c["info"]["run_name"] for c in children)
        browser.load(f"{server}/#/experiments/{experiment_id}/runs",
                     f"document.body.innerText.includes({json.dumps(last_child)})")
        browser.screenshot(out / "mlflow-runs.png")
        browser.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                     mobile=False)

        # 2. The compare-runs view of the children: BN and GN against batch size and accuracy.
        ids = json.dumps([c["info"]["run_id"] for c in children])
        query = urllib.parse.urlencode({"runs": ids, "experiments": json.dumps([experiment_id])})
        browser.load(f"{server}/#/compare-runs?{query}", "document.querySelectorAll('.du-bois-light-select').length > 1")
        metrics = "document.querySelectorAll('.du-bois-light-select')[1]"
        browser.click(f"{metrics}.querySelector('.du-bois-light-select-selection-item-remove')")  # the default: loss
        browser.click(f"{metrics}.querySelector('.du-bois-light-select-selector')")
        for name in ("best_val_acc", "test_acc"):
            browser.click(f"[...document.querySelectorAll('.du-bois-light-select-item-option')]"
                          f".find(e => e.textContent.trim() === {json.dumps(name)})")
        browser.click("[...document.querySelectorAll('h1, h2, span')].find(e => e.textContent.startsWith('Comparing'))")
        browser.screenshot(out / "mlflow-compare.png", settle_s=3)

        # 3. The parent run's comparison figure: best validation accuracy per normalization against batch size.
        browser.load(f"{server}/#/experiments/{experiment_id}/runs/{parent_id}/artifacts/comparison.png",
                     "[...document.images].some(i => i.complete && i.naturalWidth > 300)")
        browser.screenshot(out / "mlflow-comparison-figure.png")
    finally:
        browser.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DOCS / "img", help="folder for the PNGs")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--server", help="use this running MLflow server (with the sweep logged) instead")
    args = parser.parse_args(argv)
    if args.server:
        take_screenshots(args.server.rstrip("/"), args.out, args.width, args.height)
        return
    with tempfile.TemporaryDirectory(prefix="mlflow-screenshots-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        server = f"http://127.0.0.1:{port}"
        command, _ = mlflow_server_command(f"sqlite:///{workdir / 'mlflow.db'}", port,
                                           artifacts_destination=str(workdir / "artifacts"))
        with background_server(command, f"{server}/health", log=workdir / "server.log"):
            print(f"mlflow server at {server}")
            run_sweep(server, workdir)
            take_screenshots(server, args.out, args.width, args.height)


if __name__ == "__main__":
    main()
