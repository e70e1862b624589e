"""How long the flows wait for a tracking server that stops answering, and what they do then.

MLflow's own HTTP client retries a failed request 7 times with exponential
backoff (about 4 minutes, more when the server hangs instead of refusing), and a
sweep makes hundreds of requests: a server that went away blocked a sweep for over
10 minutes. Here every call into MLflow (a method of Store or Run) is retried on
connection failures, with backoff, until one deadline: ``CNNCORE_TRACKING_WAIT_S``
seconds (60 by default), which rides out a restart or a short network blip. When it
runs out, the call raises ``TrackingUnavailableError``, and the store is marked down
in this process (``mark_down``; a sweep also marks it when a trial worker reports it):
the calls other threads have in progress stop waiting, and calls in the next
``RECHECK_DOWN_S`` seconds fail at once without a request, so a flow that is already
failing reports it within about the wait, whether the server refuses connections or
hangs. After that a call tries once more; a call that gets through marks the store up.

A full store (a full disk under a sqlite file, a database out of space) is not
waited for: the call raises ``StoreFullError``, one line naming the store, the cause
and the free space, and a sqlite store's reserve (``RESERVE_BYTES`` kept allocated
beside it by ``connect``) is given back so that the runs in progress can still be
marked FAILED.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import threading
import time
from pathlib import Path

from .. import credentials

WAIT_ENV = "CNNCORE_TRACKING_WAIT_S"
DEFAULT_WAIT_S = 60.0
# One attempt's own limit (MLflow's default is 120 s): a server that accepts
# connections but never answers still fails within the wait.
REQUEST_TIMEOUT_S = "15"
_FIRST_DELAY_S, _MAX_DELAY_S = 0.5, 8.0

# A store found down (uri -> (when, the error's message)) is not waited for again: calls in progress
# stop waiting, and calls within RECHECK_DOWN_S fail at once; after that, a call tries once more.
RECHECK_DOWN_S = 30.0
_down: dict[str, tuple[float, str]] = {}
_down_lock = threading.Lock()
_down_changed = threading.Condition(_down_lock)


# Space kept allocated beside a sqlite store (mlflow.db.reserve) and given back when its disk fills: SQLite
# needs room for a journal to change even one row, so without it a full disk would leave the runs in
# progress RUNNING, their FAILED status and reason unwritten.
RESERVE_BYTES = 256 * 1024


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store does not answer."""


class StoreFullError(TrackingUnavailableError):
    """The MLflow store's disk (or database) is full: it answers, but takes no more writes. Not retried: a
    sweep stops on it as when its store stops answering, and a rerun after freeing space resumes it."""


def store_full(exc: BaseException) -> str | None:
    """What says that a store is full in exc or the exceptions it came from (SQLite's "database or disk is
    full", ENOSPC, a quota), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{exc.strerror} ({exc.filename})" if exc.filename else str(exc.strerror)
        text = str(exc)
        for phrase in ("database or disk is full", "No space left on device", "Disk quota exceeded"):
            if phrase in text:
                return phrase
        exc = exc.__cause__ or exc.__context__
    return None


def reserve_path(db: Path) -> Path:
    return db.with_name(db.name + ".reserve")


def keep_reserve(db: Path) -> None:
    """Keep RESERVE_BYTES allocated beside a sqlite store, where the disk has room for them (else nothing)."""
    path = reserve_path(db)
    with contextlib.suppress(OSError):
        if path.stat().st_size >= RESERVE_BYTES:
            return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        finally:
            os.close(fd)
    except OSError:
        with contextlib.suppress(OSError):
            path.unlink()


def _size(nbytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes // 1024} KiB"


def full_store_error(uri: str, cause: str) -> StoreFullError:
    """The one line for a full store: which, why, how much is free where it writes, and what to do. A sqlite
    store's reserve is given back here, so that the runs in progress can still be marked."""
    where = ""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        with contextlib.suppress(OSError):
            usage = shutil.disk_usage(db.parent)
            where = f" ({_size(usage.free)} free of {_size(usage.total)} in {db.parent})"
        with contextlib.suppress(OSError):
            reserve_path(db).unlink()
    return StoreFullError(f"the MLflow store {credentials.mask(uri)} is full: {cause}{where}. Free space there and "
                          "rerun the command: a sweep resumes from its finished trials")


def wait_s() -> float:
    """The configured wait, from $CNNCORE_TRACKING_WAIT_S (seconds, >= 0)."""
    text = os.environ.get(WAIT_ENV)
    if text is None:
        return DEFAULT_WAIT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"{WAIT_ENV} must be a number of seconds >= 0, got {text!r}")
    return value


def hand_retries_to_us() -> None:
    """Turn MLflow's own HTTP retries off (unless the user set them): the deadline here replaces them."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", REQUEST_TIMEOUT_S)


def is_connection_failure(exc: BaseException) -> bool:
    """Whether exc says the server could not be reached (refused, reset, timed out, 502-504), not that
    it refused the request (nor that the store is full: waiting does not free space)."""
    if isinstance(exc, StoreFullError):
        return False
    if isinstance(exc, TrackingUnavailableError):
        return True
    try:
        import requests

        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
    except ImportError:  # pragma: no cover - requests comes with mlflow
        pass
    text = str(exc)
    return ("API request to" in text and ("failed with exception" in text or "failed with timeout exception" in text)
            or "Max retries exceeded" in text)


def mark_down(uri: str, message: str) -> None:
    """Record that the store at uri stopped answering (message says how): calls in progress stop waiting for
    it, and calls in the next RECHECK_DOWN_S seconds fail at once with message."""
    with _down_changed:
        _down[uri] = (time.monotonic(), message)
        _down_changed.notify_all()


def _down_since(uri: str) -> tuple[float, str] | None:
    with _down_lock:
        return _down.get(uri)


def patient(method):
    """Retry the Store/Run method on connection failures until the wait runs out (see the module docstring)."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        uri = self.uri if hasattr(self, "uri") else self.store.uri
        started = time.monotonic()
        down = _down_since(uri)
        if down is not None and started - down[0] < RECHECK_DOWN_S:
            raise TrackingUnavailableError(down[1])  # known down: no second wait, no request to time out
        deadline = started + (0.0 if down is not None else wait_s())
        delay = _FIRST_DELAY_S

        def given_up_elsewhere() -> bool:  # another call (thread) found the store down since this one began
            marked = _down.get(uri)
            return marked is not None and marked[0] >= started

        while True:
            try:
                result = method(self, *args, **kwargs)
            except Exception as exc:
                if not isinstance(exc, StoreFullError) and (full := store_full(exc)) is not None:
                    raise full_store_error(uri, full) from exc
                if not is_connection_failure(exc):
                    raise
                if given_up_elsewhere() or time.monotonic() + delay > deadline:
                    error = exc if isinstance(exc, TrackingUnavailableError) else TrackingUnavailableError(
                        f"the MLflow tracking server at {credentials.mask(uri)} stopped answering (waited "
                        f"{wait_s():g} s, ${WAIT_ENV}): {credentials.mask(str(exc))}")
                    marked = _down_since(uri)
                    if marked is None or marked[0] < started:
                        mark_down(uri, str(error))
                    if error is exc:
                        raise
                    raise error from exc
                with _down_changed:  # a backoff that ends early when another call gives up
                    _down_changed.wait_for(given_up_elsewhere, timeout=delay)
                delay = min(2 * delay, _MAX_DELAY_S)
                continue
            with _down_lock:
                _down.pop(uri, None)
            return result

    return call
