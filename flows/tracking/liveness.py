"""Which process a RUNNING run belongs to, and the runs whose process died without ending them.

A run that a flow opens names the process running it in a tag, ``host:pid:token``, beside
the time until which that claim holds, renewed while the run is open: a lease
(``claim_tags``, ``renewed``; a sweep's parent carries its sweep lease, flows.sweep.lease,
in the same way). A run its process left RUNNING (kill -9, a crash, a machine lost) can
then be told apart from one still training: its claim lapsed, or names a process of this
host that no longer exists. Opening a run in an experiment marks such runs there KILLED,
with the reason, and their RUNNING children with them (``Store.repair_abandoned``), so
that no run stays RUNNING for good once any flow runs again in its experiment.

Runs without a claim (made by other tools, or before claims existed) are never touched.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from .names import RUNNING, RunRecord

TAG_OWNER = "cnncore.owner"
TAG_EXPIRES = "cnncore.owner_expires"
# Every (owner, expires) pair of tags a claim can be written in: a run's own, and a sweep's lease.
CLAIMS = ((TAG_OWNER, TAG_EXPIRES), ("sweep_lease_owner", "sweep_lease_expires"))
TTL_S = 60.0
RENEW_S = 5.0


def new_owner() -> str:
    """This process, as a claim names it: host:pid:a random token."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def claim_tags(owner: str, ttl_s: float = TTL_S, tags: tuple[str, str] = CLAIMS[0]) -> dict[str, str]:
    owner_tag, expires_tag = tags
    return {owner_tag: owner, expires_tag: f"{time.time() + ttl_s:.3f}"}


def holder_of(owner: str) -> tuple[str, int | None]:
    """(host, pid) of a claim's owner; pid None when the owner is not host:pid:token."""
    host, pid, _ = (owner.split(":", 2) + ["", ""])[:3]
    return host, int(pid) if pid.isdigit() else None


def process_gone(owner: str) -> bool:
    """Whether owner names a process of this host that no longer exists (one of another host: not known)."""
    host, pid = holder_of(owner)
    return host == socket.gethostname() and pid is not None and not _alive(pid)


def live_claim(record: RunRecord, tags: tuple[str, str], owner: str | None = None) -> str | None:
    """The owner of a live claim on the run in the given tags (other than owner), or None.

    A claim is live while the run is RUNNING, it has not lapsed, and its process is not
    known to be gone (a process of this host killed with -9 frees it at once).
    """
    owner_tag, expires_tag = tags
    holder = record.tags.get(owner_tag)
    try:
        expires = float(record.tags.get(expires_tag, 0) or 0)
    except ValueError:
        expires = 0.0
    if record.status != RUNNING or not holder or holder == owner or expires <= time.time() or process_gone(holder):
        return None
    return holder


def abandoned(record: RunRecord) -> str | None:
    """Why a RUNNING run with a claim has no live one (its process is gone, or its claim lapsed), else None."""
    if record.status != RUNNING:
        return None
    for tags in CLAIMS:
        holder = record.tags.get(tags[0])
        if holder is None:
            continue
        if live_claim(record, tags) is not None:
            return None
        host, pid = holder_of(holder)
        how = ("which no longer exists" if process_gone(holder)
               else "whose lease lapsed without renewal")
        return (f"the process that ran it (pid {pid} on {host}) ended without closing it, {how} (kill -9, a crash "
                f"or a lost machine); marked KILLED by a later run (pid {os.getpid()})")
    return None


@contextlib.contextmanager
def renewed(run, owner: str, tags: tuple[str, str] = CLAIMS[0], every_s: float | None = None,
            on_lost: Callable[[BaseException], None] | None = None) -> Iterator[None]:
    """Renew the run's claim every every_s seconds (RENEW_S) while the block runs.

    on_lost: told, once, when a renewal finds the tracking store gone (TrackingUnavailableError, after its
    wait), and the renewals stop; without it, a store that stops answering only lets the claim lapse (the
    run's own calls report that).
    """
    from .patience import TrackingUnavailableError

    done = threading.Event()

    def renew() -> None:
        while not done.wait(RENEW_S if every_s is None else every_s):
            try:
                run.set_tags(claim_tags(owner, tags=tags))
            except TrackingUnavailableError as exc:
                if on_lost is not None:
                    on_lost(exc)
                    return

    heartbeat = threading.Thread(target=renew, name=f"claim-{run.id[:8]}", daemon=True)
    heartbeat.start()
    try:
        yield
    finally:
        done.set()
        heartbeat.join()


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
