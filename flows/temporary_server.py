"""Prefect's temporary server, for `cnnflow run --no-local-server`: started with a start-up limit that grows with
the machine's load, said in one line with what to do when it does not start, and killed with the command.

Without PREFECT_API_URL, Prefect starts a temporary API server in a subprocess the first time a flow needs
one (``prefect.server.api.server.SubprocessASGIServer``), waiting for it at most
PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (20 s). On a loaded machine that is too short (the
server's database migrations alone take longer) and ends in a bare "Timed out while attempting to connect
to ephemeral Prefect API server". And the subprocess runs in the command's own process group, with
nothing to stop it when the command is killed with -9: it stayed up for good.

``temporary_server()`` starts that same server before the flow runs (Prefect's clients then find it
running): its limit is ``startup_limit_s()`` unless the setting was given, a failure is a
``TemporaryServerError`` with a hint, and a watchdog process (flows.shutdown) kills it within about a
second of the command's death.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
# The limit on an idle machine, scaled by the load per core above 1, and never above the cap.
BASE_LIMIT_S = 60
MAX_LIMIT_S = 600


class TemporaryServerError(RuntimeError):
    """Prefect's temporary server did not start."""

    exit_code = 1


def load_per_core() -> float:
    """The 1-minute load average per core (0 where it cannot be read)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 0.0


def startup_limit_s() -> int:
    """$PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS when set, else BASE_LIMIT_S times the load per core
    (at least 1), at most MAX_LIMIT_S: a machine 8 times oversubscribed starts the server about 8 times slower."""
    if os.environ.get(TIMEOUT_ENV):
        return int(float(os.environ[TIMEOUT_ENV]))
    return int(min(MAX_LIMIT_S, BASE_LIMIT_S * max(1.0, load_per_core())))


@contextlib.contextmanager
def temporary_server() -> Iterator[str]:
    """Prefect's temporary server, started and watched for the block; yields its API URL."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    from .servers import start_watchdog

    limit = startup_limit_s()
    server = SubprocessASGIServer()  # the instance Prefect's own clients will find, running
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: limit}):
        try:
            server.start(timeout=limit)
        except RuntimeError as exc:
            server.stop()  # a server that did not answer in time may still be starting: it goes too
            # Prefect's message ends with the server's own output, when it exited: keep its first line.
            raise TemporaryServerError(
                f"Prefect's temporary server did not start within {limit} s (load average {load_per_core():.1f} "
                f"per core): {str(exc).splitlines()[0]} Run without --no-local-server to use cnnflow's long-lived "
                f"local server (`cnnflow server start`), or allow it longer with {TIMEOUT_ENV}") from exc
    watchdog = start_watchdog(server.server_process, group=False)
    try:
        yield server.api_url
    finally:
        server.stop()
        watchdog.kill()
        watchdog.wait()
