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
        executors.WORKER_STOP_GRACE_S = 1
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


@pytest.mark.parametrize("busy", ["interruptible", "straggler"])
def test_stopping_workers_interrupts_the_busy_one_and_prints_nothing(tmp_path, busy):
    script = tmp_path / "stop_workers.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), busy], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1, done.stderr
    assert done.stderr == ""
    what, seconds = done.stdout.split()
    if busy == "interruptible":
        assert what == "KeyboardInterrupt" and float(seconds) < 1.0
    else:  # ignored the SIGINT, so terminated after the (shortened) grace: the pool is broken
        assert what == "BrokenProcessPool" and 1.0 <= float(seconds) < 5.0
