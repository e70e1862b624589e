"""What a person sees in a browser: Debian's headless Chromium, driven over its DevTools protocol.

    with Chromium(1400, 1000) as browser:
        browser.load("http://127.0.0.1:4242/runs", "document.body.innerText.includes('sweep-demo')")
        png = browser.screenshot_png()

Every session starts on a fresh, temporary profile (a newcomer's browser: nothing in
localStorage or cookies), with the flags a machine without network needs, and is
stopped by its process group. Only real input reaches the page: navigation, mouse
clicks at an element's centre and typed text; JavaScript is used to read the page,
never to change it. docs/screenshots.py and the slow tests (tests/ops/test_prefect_ui.py)
use it; it needs `apt-get install chromium`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from .servers import stop_process_group

# No network here: nothing is fetched from outside (updates, sync, QUIC probes), no sandbox as root.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]


class BrowserUnavailableError(RuntimeError):
    """No Chromium to run, or it did not start."""


def chromium_binary() -> str | None:
    """Debian's chromium (or a chromium-browser) on PATH, else None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """Headless Chromium on a fresh temporary profile, one page, driven over the DevTools protocol."""

    def __init__(self, width: int = 1400, height: int = 1000, timeout_s: float = 60):
        from websockets.sync.client import connect  # a dependency of Prefect's

        binary = chromium_binary()
        if binary is None:
            raise BrowserUnavailableError("chromium is not installed: apt-get install chromium")
        self.width, self.height, self.clicks = width, height, 0
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-"))
        self.process = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port_file = self.profile / "DevToolsActivePort"
            deadline = time.monotonic() + timeout_s
            while not (port_file.exists() and port_file.read_text().strip()):
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise BrowserUnavailableError("chromium did not open its DevTools port")
                time.sleep(0.2)
            port = port_file.read_text().split()[0]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
                page = next(t for t in json.load(response) if t["type"] == "page")
            self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout_s)
        except BaseException:
            self.close()
            raise
        self.next_id = 0
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, method: str, session: str | None = None, **params) -> dict:
        """One DevTools command, and its result; session: to a target attached with Target.attachToTarget
        (flatten=True), such as a cross-origin iframe, instead of the page."""
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params,
                                 **({"sessionId": session} if session else {})}))
        while True:
            message = json.loads(self.ws.recv(timeout=120))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    def text(self) -> str:
        """What the page shows as text."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def load(self, url: str, ready: str, timeout_s: float = 60) -> None:
        """Open url as a pasted link would, and wait until the JavaScript expression `ready` is truthy."""
        self.send("Page.navigate", url=url)
        self.wait_for(ready, timeout_s, url)

    def wait_for(self, expression: str, timeout_s: float = 60, what: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        while not self.evaluate(f"!!({expression})"):
            if time.monotonic() > deadline:
                shown = " ".join(self.text().split())[:600]
                raise TimeoutError(f"{what or expression}: not ready after {timeout_s:.0f} s; the page shows: {shown}")
            time.sleep(0.5)

    def click(self, element: str) -> None:
        """A real mouse click at the centre of the element the JavaScript expression finds."""
        point = self.evaluate(f"""(() => {{ const e = {element}; if (!e) return null;
            e.scrollIntoView({{block: 'nearest'}}); const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        if point is None:
            raise LookupError(f"nothing to click: {element}")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=point[0], y=point[1], button="left", clickCount=1)
        self.clicks += 1
        time.sleep(0.5)

    def type(self, text: str) -> None:
        """Text typed into the focused element, as from the keyboard."""
        self.send("Input.insertText", text=text)
        time.sleep(0.5)

    def screenshot_png(self, height: int | None = None) -> bytes:
        """The viewport's top `height` pixels (all of it by default) as PNG bytes."""
        clip = {"x": 0, "y": 0, "width": self.width, "height": min(height or self.height, self.height), "scale": 1}
        return base64.b64decode(self.send("Page.captureScreenshot", format="png", clip=clip)["data"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        stop_process_group(self.process, 5)
        shutil.rmtree(self.profile, ignore_errors=True)
