"""Stopping a sweep's trial worker processes: busy ones are interrupted, idle ones and stragglers leave no
trace on stderr (no traceback, no resource tracker warning after the sweep's last line)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Run as a script: spawned workers import it as __mp_main__, so its functions reach them.
SCRIPT = textwrap.dedent("""
    import signal, sys, time
    from tqdm import tqdm
    from flows.sweep import executors
    from flows.sweep.executors import interruptible, stop_workers, training_processes

    def with_a_bar(seconds):
        for _ in tqdm(range(2), disable=True):  # tqdm's lock is what leaked a semaphore
            time.sleep(seconds)
        return "done"

    def deaf(seconds):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        time.sleep(seconds)

    if __name__ == "__main__":
        executors.WORKER_STOP_GRACE_S = float(sys.argv[2])
        pool = training_processes("processes", 2, 1, None)
        warm = [pool.submit(interruptible, with_a_bar, 0.3) for _ in range(2)]
        assert [f.result() for f in warm] == ["done", "done"]
        busy = pool.submit(interruptible, deaf if sys.argv[1] == "straggler" else with_a_bar, 30)
        time.sleep(1)
        started = time.monotonic()
        stop_workers(pool)
        print(type(busy.exception()).__name__, f"{time.monotonic() - started:.1f}")
        sys.exit(1)
""")


# The grace stop_workers gives a busy worker before terminating it. An interruptible worker must stop
# well within its grace (so it was interrupted, not terminated), however loaded the machine: it takes
# 0.1-1.1 s here; a straggler, which ignores the SIGINT, is terminated once its grace is over.
GRACE_S = {"interruptible": 20.0, "straggler": 1.0}


@pytest.mark.parametrize("busy", ["interruptible", "straggler"])
def test_stopping_workers_interrupts_the_busy_one_and_prints_nothing(tmp_path, busy):
    script = tmp_path / "stop_workers.py"
    script.write_text(SCRIPT)
    grace = GRACE_S[busy]
    done = subprocess.run([sys.executable, str(script), busy, str(grace)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1, done.stderr
    assert done.stderr == ""
    what, seconds = done.stdout.split()
    if busy == "interruptible":
        # Interrupted: its training raised KeyboardInterrupt, long before the grace and the 30 s it had left.
        assert what == "KeyboardInterrupt" and float(seconds) < grace / 2
    else:  # ignored the SIGINT, so terminated after the grace: the pool is broken
        assert what == "BrokenProcessPool" and grace <= float(seconds) < grace + 15


# A trial worker's interrupt that lands in a finalizer: here a weakref callback raises it, as a SIGINT arriving
# while the garbage collector runs one would.
FINALIZER_SCRIPT = textwrap.dedent("""
    import gc, time, weakref
    from flows.sweep.worker import interrupt_after_finalizers, interruptible

    class Node:
        pass

    def work():
        node = Node()
        weakref.finalize(node, lambda: None)
        watched = weakref.ref(node, lambda _: (_ for _ in ()).throw(KeyboardInterrupt))
        del node
        gc.collect()
        for _ in range(100):  # the training going on
            time.sleep(0.002)
        return "went on after the interrupt"

    interrupt_after_finalizers()
    try:
        print(interruptible(work))
    except KeyboardInterrupt:
        print("interrupted")
""")


def test_an_interrupt_inside_a_finalizer_stops_the_work_after_it_without_a_traceback():
    done = subprocess.run([sys.executable, "-c", FINALIZER_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "interrupted"
    assert done.stderr == ""  # Python's "Exception ignored in ..." and its traceback, without the hook
