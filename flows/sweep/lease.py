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
import time
from collections.abc import Callable, Iterator

from ..tracking import Run, RunRecord, TrackingUnavailableError, liveness

# One of liveness.CLAIMS: a later run in the experiment repairs a sweep whose process died.
TAG_OWNER, TAG_EXPIRES = liveness.CLAIMS[1]
TTL_S = liveness.TTL_S
# Also how soon a sweep whose trials are busy training notices that its tracking store went away.
RENEW_S = 5.0
# How long a claim waits before reading itself back: longer than two racing claims take to write.
SETTLE_S = 1.0


class SweepBusyError(RuntimeError):
    """Another live process is running this sweep name."""

    exit_code = 1


new_owner = liveness.new_owner


def lease_tags(owner: str, ttl_s: float = TTL_S) -> dict[str, str]:
    return liveness.claim_tags(owner, ttl_s, (TAG_OWNER, TAG_EXPIRES))


def live_holder(record: RunRecord, owner: str | None = None) -> str | None:
    """Who holds a live lease on the parent run (other than owner), or None.

    A lease taken on this host by a process that no longer exists (killed with -9)
    is dead at once, without waiting for it to lapse.
    """
    holder = liveness.live_claim(record, (TAG_OWNER, TAG_EXPIRES), owner)
    if holder is None:
        return None
    expires = float(record.tags[TAG_EXPIRES])
    return f"{holder} (renewed until {time.strftime('%H:%M:%S', time.localtime(expires))})"


def busy_error(name: str, holder: str) -> SweepBusyError:
    host, pid = liveness.holder_of(holder.split(" ", 1)[0])
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
    try:
        with liveness.renewed(run, owner, (TAG_OWNER, TAG_EXPIRES), every_s=RENEW_S, on_lost=on_lost):
            yield
    finally:
        with contextlib.suppress(TrackingUnavailableError):
            run.set_tags({TAG_EXPIRES: "0"})
