"""A Prefect server that goes away mid-run: noticed within a stated wait, said in one line naming it, and not
waited for after that.

`cnnflow run` reports each flow run to a Prefect server (cnnflow's local server, PREFECT_API_URL's, or the
temporary one). The training does not need it: MLflow holds the results. But when the server stops
answering (`cnnflow server stop`, a crash, kill -9), Prefect's client retries every call for about a
minute, its log and event workers print an error every few seconds, and the flow ends with a bare
`ConnectError`. So, while a flow runs:

- ``watching(api_url)`` asks the server's /health every POLL_S seconds in a thread; after
  ``$CNNCORE_PREFECT_WAIT_S`` seconds (WAIT_S) without an answer the server is *lost*: the callbacks
  registered with ``on_lost`` are told (a sweep then stops as for a signal: no new trial, the ones
  training marked KILLED, a rerun resumes it), Prefect's client stops retrying, its workers stop
  printing their errors;
- ``optional(call, ...)``: a Prefect call a flow can do without (an artifact) is skipped, at once,
  once the server is lost or when it does not answer right now, instead of failing the flow after a
  minute of retries;
- the command then fails with ``PrefectServerLostError``: which server, since when, and what MLflow kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

from .progress import say

WAIT_ENV = "CNNCORE_PREFECT_WAIT_S"
WAIT_S = 30.0
POLL_S = 2.0
# Prefect's loggers that report, every few seconds, what a lost server can no longer take.
_NOISY = ("prefect.events", "prefect._internal.concurrency")


class PrefectServerLostError(RuntimeError):
    """The Prefect server a flow reports to stopped answering (since: a time.time())."""

    exit_code = 1
    stops_work = True  # the runs it ends are KILLED (stopped, to resume), not FAILED

    def __init__(self, server: str, api_url: str, since: float, waited_s: float, flow_finished: bool = False):
        self.server, self.api_url, self.since, self.waited_s = server, api_url, since, waited_s
        self.flow_finished = flow_finished
        what = ("the flow finished, and MLflow holds all it logged, but Prefect does not have its end"
                if flow_finished else
                "the flow stopped there; what it logged to MLflow is kept (rerunning the same command resumes a "
                "sweep from its finished trials), and Prefect does not have its state and logs after that time")
        again = "; `cnnflow server start` starts it again" if server == "the local Prefect server" else ""
        super().__init__(f"{server} at {api_url} stopped answering at "
                         f"{time.strftime('%H:%M:%S', time.localtime(since))} (no answer for {waited_s:g} s, "
                         f"${WAIT_ENV}): {what}{again}")

    def __reduce__(self):
        return type(self), (self.server, self.api_url, self.since, self.waited_s, self.flow_finished)

    def after_the_flow_finished(self) -> PrefectServerLostError:
        return type(self)(self.server, self.api_url, self.since, self.waited_s, flow_finished=True)


_callbacks: list[Callable[[BaseException], None]] = []
_lost: PrefectServerLostError | None = None
_undo: list[Callable[[], None]] = []  # what reset() takes back of a loss's changes to the process, last first
_lock = threading.Lock()


def wait_s() -> float:
    text = os.environ.get(WAIT_ENV)
    try:
        value = WAIT_S if text is None else float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"{WAIT_ENV} must be a number of seconds >= 0, got {text!r}")
    return value


def lost() -> PrefectServerLostError | None:
    """The loss, once the watched server was declared lost, else None."""
    return _lost


@contextlib.contextmanager
def on_lost(callback: Callable[[BaseException], None]) -> Iterator[None]:
    """Within the block, callback(error) is called (at once, if it already happened) when the server is lost."""
    with _lock:
        _callbacks.append(callback)
        already = _lost
    if already is not None:
        callback(already)
    try:
        yield
    finally:
        with _lock:
            _callbacks.remove(callback)


def answers(api_url: str | None, timeout_s: float = 2.0) -> bool:
    """Whether the Prefect API at api_url answers its health check (True when there is no URL to ask)."""
    if not api_url:
        return True
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """exc and the exceptions it was raised from or while handling, each once."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def unreachable(exc: BaseException) -> bool:
    """Whether exc (or an exception it was raised from) says the Prefect API could not be reached."""
    import httpx

    return any(isinstance(e, (httpx.TransportError, ConnectionError)) or (
        isinstance(e, httpx.HTTPStatusError) and e.response.status_code in (502, 503, 504)) or (
        # Prefect's client, its retries set to 0 after the loss, ends a retryable failure this way.
        isinstance(e, AssertionError) and str(e).startswith("Retry handling ended")) for e in _chain(exc))


def stopped_by_loss(exc: BaseException) -> bool:
    """Whether exc is (or was raised while handling) a PrefectServerLostError: the flow was stopped by it."""
    return any(isinstance(e, PrefectServerLostError) for e in _chain(exc))


def optional(call: Callable[..., Any], *args, **kwargs) -> Any:
    """call(*args, **kwargs), a Prefect call the flow can do without; skipped (None) when the server is lost or
    does not answer now, with one warning the first time."""
    from prefect.settings import PREFECT_API_URL

    if _lost is None and answers(PREFECT_API_URL.value()):
        try:
            return call(*args, **kwargs)
        except Exception as exc:  # the server went between the check and the call: the flow goes on
            if not unreachable(exc):
                raise
    logging.getLogger("cnncore.progress").warning(
        f"the Prefect server does not answer: {getattr(call, '__name__', 'a Prefect call')} skipped "
        "(MLflow has everything)")
    return None


@contextlib.contextmanager
def watching(api_url: str | None, server: str = "the Prefect server") -> Iterator[None]:
    """Watch the Prefect API at api_url while the block runs (nothing to watch when None); see the module.

    server: how messages name it ("the local Prefect server", ...).
    """
    if not api_url:
        yield
        return
    from prefect.settings import get_current_settings

    settings = get_current_settings()  # this context's: the flow's engine and workers read these
    patience, done = wait_s(), threading.Event()

    quiet = _Unsendable()

    def watch() -> None:
        global _lost
        since = None
        while not done.wait(POLL_S):
            if answers(api_url):
                if since is not None:
                    say(f"{server} answers again")
                    _quiet(quiet, on=False)
                since = None
                continue
            if since is None:  # one line instead of Prefect's workers' error every few seconds
                since = time.time()
                say(f"{server} at {api_url} does not answer; waiting up to {patience:g} s for it (${WAIT_ENV})")
                _quiet(quiet, on=True)
            if time.time() - since >= patience:
                error = PrefectServerLostError(server, api_url, since, patience)
                with _lock:
                    _lost = error
                    callbacks = list(_callbacks)
                _stop_talking_to(settings)  # the quiet filter stays on
                _undo.append(lambda: _quiet(quiet, on=False))
                for callback in callbacks:
                    callback(error)
                return

    thread = threading.Thread(target=watch, name="prefect-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


class _Unsendable(logging.Filter):
    """Drops the records of Prefect's workers that say, every few seconds, what they can no longer send."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith(_NOISY) or "EventsWorker" in record.name)


def _quiet(quiet: logging.Filter, on: bool) -> None:
    """Add (or remove) quiet on every logging handler there is."""
    for logger in (logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))):
        for handler in getattr(logger, "handlers", []):
            (handler.addFilter if on else handler.removeFilter)(quiet)


def _stop_talking_to(settings) -> None:
    """After the loss: Prefect's client tries each call once (no minute of retries per call), and its log
    worker no longer sends (nor prints its failure to). Best effort: Prefect's settings are its own."""
    for section, name, value in ((settings.client, "max_retries", 0), (settings.logging.to_api, "enabled", False),
                                 (logging, "raiseExceptions", False)):  # Prefect's log worker prints otherwise
        with contextlib.suppress(Exception):
            before = getattr(section, name)
            setattr(section, name, value)
            _undo.append(lambda section=section, name=name, before=before: setattr(section, name, before))


def reset() -> None:
    """Forget a loss, and take back what it changed (Prefect's retries and logs to the API, the quiet filter):
    for a process that runs flows again afterwards, as tests do."""
    global _lost
    with _lock:
        _lost = None
        while _undo:
            _undo.pop()()
