"""One live run per sweep name: a lease on the parent run, renewed while the sweep runs.

Two processes running the same sweep name at once would each resume it, and the
second would delete the first's running trials as "unfinished". So the process that
runs a sweep holds a lease: tags on the parent run naming it (host, pid, a random
token) and when the lease lapses, renewed every ``RENEW_S`` seconds by a heartbeat
thread. A second run that finds a live lease refuses with SweepBusyError; a lease
that lapsed (its process died without releasing it) is taken over. The tags live in
the tracking store itself, so this works across machines sharing a tracking server.

It is a lease, not a lock: two processes that claim the same name within the same
second both write their claim, then read it back, and the one whose claim was
overwritten refuses. A process paused longer than the lease (``TTL_S``) loses it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from ..tracking import RUNNING, Run, RunRecord, TrackingUnavailableError

TAG_OWNER = "sweep_lease_owner"
TAG_EXPIRES = "sweep_lease_expires"
TTL_S = 60.0
# Also how soon a sweep whose trials are busy training notices that its tracking store went away.
RENEW_S = 5.0
# How long a claim waits before reading itself back: longer than two racing claims take to write.
SETTLE_S = 1.0


class SweepBusyError(RuntimeError):
    """Another live process is running this sweep name."""

    exit_code = 1


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def lease_tags(owner: str, ttl_s: float = TTL_S) -> dict[str, str]:
    return {TAG_OWNER: owner, TAG_EXPIRES: f"{time.time() + ttl_s:.3f}"}


def live_holder(record: RunRecord, owner: str | None = None) -> str | None:
    """Who holds a live lease on the parent run (other than owner), or None.

    A lease taken on this host by a process that no longer exists (killed with -9)
    is dead at once, without waiting for it to lapse.
    """
    holder = record.tags.get(TAG_OWNER)
    expires = float(record.tags.get(TAG_EXPIRES, 0) or 0)
    if record.status != RUNNING or not holder or holder == owner or expires <= time.time():
        return None
    host, pid, _ = (holder.split(":", 2) + ["", ""])[:3]
    if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
        return None
    return f"{holder} (renewed until {time.strftime('%H:%M:%S', time.localtime(expires))})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A process that died but was not reaped yet still answers kill(pid, 0)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def busy_error(name: str, holder: str) -> SweepBusyError:
    host, pid, _ = (holder.split(":", 2) + ["", ""])[:3]
    return SweepBusyError(
        f"sweep {name!r} is being run by another process right now (host {host}, pid {pid}: {holder}). "
        f"Wait for it to finish, or give this sweep another --name.")


def confirm(run: Run, name: str, owner: str) -> None:
    """Read the claim back after SETTLE_S; refuse if another process's claim replaced it."""
    time.sleep(SETTLE_S)
    record = run.record()
    if record.tags.get(TAG_OWNER) != owner:
        raise busy_error(name, record.tags.get(TAG_OWNER, "unknown"))


@contextlib.contextmanager
def held(run: Run, owner: str, on_lost: Callable[[BaseException], None] | None = None) -> Iterator[None]:
    """Renew the lease every RENEW_S seconds while the block runs, and release it at the end.

    on_lost: told, once, when a renewal finds the tracking store gone (TrackingUnavailableError, after
    its wait): the sweep stops then, even while no trial is talking to the store.
    """
    done = threading.Event()

    def renew() -> None:
        while not done.wait(RENEW_S):
            try:
                run.set_tags(lease_tags(owner))
            except TrackingUnavailableError as exc:
                if on_lost is not None:
                    on_lost(exc)
                    return

    heartbeat = threading.Thread(target=renew, name=f"lease-{run.id[:8]}", daemon=True)
    heartbeat.start()
    try:
        yield
    finally:
        done.set()
        heartbeat.join()
        with contextlib.suppress(TrackingUnavailableError):
            run.set_tags({TAG_EXPIRES: "0"})
