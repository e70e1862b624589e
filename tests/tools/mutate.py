"""Fault injection: put small realistic bugs into the code one at a time and see which the tests catch.

    .venv/bin/python tests/tools/mutate.py                          # every mutation, fast tier
    .venv/bin/python tests/tools/mutate.py --only stats diag       # ids starting with these words
    .venv/bin/python tests/tools/mutate.py --file flows/sweep/     # mutations of files under this path
    .venv/bin/python tests/tools/mutate.py --only i19 --tests tests/test_x.py   # other tests than each entry's
    .venv/bin/python tests/tools/mutate.py --rev main --only i19    # the tests of another commit (before/after)
    .venv/bin/python tests/tools/mutate.py --slow                   # the slow tier too (-m '')
    .venv/bin/python tests/tools/mutate.py --list                   # what there is, nothing run

Each mutation (tests/tools/mutations.py) names a file, a piece of its text that must
occur exactly once, the text to put in its place, and the tests a developer would run
for that file. The checkout is never touched: it is cloned once (its uncommitted and
untracked files copied over), each mutation is applied to the clone and taken back
after its run, and pytest runs there with the clone first on PYTHONPATH, so spawned
workers and `cnnflow` subprocesses import the mutated code too.

First every test set runs without a mutation (the baseline): a set that fails there
says nothing, and its mutations are reported as "baseline failed". Then each mutation
runs its tests with -x (the first failure is enough) and a time limit:

    caught     a test failed (the first failing test is named)
    survived   every test passed: no test notices this bug
    timeout    the tests ran past --timeout (counted apart: a hang is a bug noticed, but slowly)
    stale      the text to replace is not in the file (once): the code moved; update the entry

The table at the end gives each mutation's outcome and the catch rate,
caught / (caught + survived + timeout), stale ones left out. Exit status 0 when the
rate reaches --target (default 0.95), 1 otherwise. Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mutations import MUTATIONS, Mutation  # noqa: E402


@dataclass
class Outcome:
    mutation: Mutation
    result: str  # caught, survived, timeout, stale, baseline failed
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Clone:
    """A throwaway copy of the checkout: a git clone at HEAD with the working tree's changes copied over."""

    root: Path
    originals: dict[str, str] = field(default_factory=dict)

    @classmethod
    def make(cls, source: Path, into: Path, rev: str | None = None) -> Clone:
        """The working tree as it is; with rev, that commit as it was committed (the same mutations
        against older or newer tests and code: a before/after comparison)."""
        root = into / "checkout"
        subprocess.run(["git", "clone", "--quiet", "--shared", str(source), str(root)], check=True)
        if rev is not None:
            subprocess.run(["git", "-c", "advice.detachedHead=false", "checkout", "--quiet", rev], cwd=root,
                           check=True)
            return cls(root)
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=source,
                                check=True, capture_output=True).stdout.decode().split("\0")
        for name in filter(None, listed):
            if (source / name).is_file():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / name, root / name)
            elif not (source / name).exists():  # deleted in the working tree: deleted here too
                (root / name).unlink(missing_ok=True)
        return cls(root)

    def apply(self, mutation: Mutation) -> bool:
        path = self.root / mutation.file
        text = path.read_text()
        if text.count(mutation.old) != 1:
            return False
        self.originals[mutation.file] = text
        path.write_text(text.replace(mutation.old, mutation.new))
        return True

    def revert(self) -> None:
        for name, text in self.originals.items():
            (self.root / name).write_text(text)
        self.originals.clear()


def run_tests(clone: Clone, tests: tuple[str, ...], slow: bool, timeout_s: float) -> tuple[str, float, str]:
    """(passed | failed | timeout, seconds, the first failing test or the output's tail)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(clone.root), os.environ.get("PYTHONPATH")])),
           "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", "-rf",
               *(["-m", ""] if slow else []), *tests]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=clone.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return "timeout", time.monotonic() - started, ""
    except BaseException:  # Ctrl-C or SIGTERM: pytest (in a session of its own) goes with this run
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # pytest unwinds: its fixtures stop their servers
        try:
            process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        raise
    seconds = time.monotonic() - started
    if process.returncode == 0:
        return "passed", seconds, ""
    # pytest's summary lines ("FAILED tests/x.py::test - reason"), not captured log lines ("ERROR    prefect...").
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in output.splitlines()
              if re.match(r"(FAILED|ERROR) \S+::", line) or re.match(r"ERROR \S+\.py\b", line)]
    return "failed", seconds, failed[0] if failed else output.strip().splitlines()[-1] if output.strip() else ""


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=[], help="run the mutations whose id starts with one of these")
    parser.add_argument("--file", nargs="*", default=[], help="run the mutations of files under these paths")
    parser.add_argument("--tests", nargs="*", default=[], help="run these tests for every mutation instead of its own")
    parser.add_argument("--slow", action="store_true", help="the slow tier too (pytest -m '')")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per test run (default 600)")
    parser.add_argument("--target", type=float, default=0.95, help="catch rate to reach for exit status 0")
    parser.add_argument("--rev", help="run against this commit instead of the working tree")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests; run nothing")
    args = parser.parse_args(argv)
    # SIGTERM as Ctrl-C: the tests in progress are stopped and the clone removed either way.
    signal.signal(signal.SIGTERM, _interrupt)

    chosen = [m for m in MUTATIONS
              if (not args.only or m.id.startswith(tuple(args.only)))
              and (not args.file or m.file.startswith(tuple(args.file)))]
    if args.list:
        for m in chosen:
            print(f"{m.id:32} {m.file:30} {' '.join(m.tests)}\n{'':32} {m.description}")
        return 0
    if not chosen:
        print("no mutation matches", file=sys.stderr)
        return 2

    if args.tests:
        chosen = [dataclasses.replace(m, own_tests=tuple(args.tests)) for m in chosen]
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="cnncore-mutate-") as tmp:
        clone = Clone.make(ROOT, Path(tmp), args.rev)
        baselines: dict[tuple[str, ...], tuple[str, str]] = {}
        for tests in dict.fromkeys(m.tests for m in chosen):
            status, seconds, detail = run_tests(clone, tests, args.slow, args.timeout)
            baselines[tests] = (status, detail)
            print(f"baseline {' '.join(tests)}: {status} in {seconds:.0f} s {detail}", flush=True)
        for m in chosen:
            if baselines[m.tests][0] != "passed":
                outcomes.append(Outcome(m, "baseline failed", detail=baselines[m.tests][1]))
            elif not clone.apply(m):
                outcomes.append(Outcome(m, "stale", detail=f"the text to replace is not once in {m.file}"))
            else:
                try:
                    status, seconds, detail = run_tests(clone, m.tests, args.slow, args.timeout)
                finally:
                    clone.revert()
                result = {"failed": "caught", "passed": "survived"}.get(status, status)
                outcomes.append(Outcome(m, result, seconds, detail))
            last = outcomes[-1]
            print(f"{last.result:15} {m.id:32} {last.seconds:5.0f} s  {last.detail}", flush=True)

    counted = [o for o in outcomes if o.result in ("caught", "survived", "timeout")]
    caught = sum(o.result == "caught" for o in counted)
    print("\n| mutation | file | bug | outcome | caught by |\n|---|---|---|---|---|")
    for o in outcomes:
        print(f"| {o.mutation.id} | {o.mutation.file} | {o.mutation.description} | {o.result} | "
              f"{o.detail if o.result == 'caught' else ''} |")
    rate = caught / len(counted) if counted else 0.0
    tier = "fast and slow tiers" if args.slow else "fast tier"
    print(f"\n{caught} of {len(counted)} caught by the {tier} ({rate:.0%}); "
          f"{sum(o.result == 'survived' for o in counted)} survived, {sum(o.result == 'timeout' for o in counted)} "
          f"timed out, {sum(o.result == 'stale' for o in outcomes)} stale, "
          f"{sum(o.result == 'baseline failed' for o in outcomes)} not run (baseline failed)")
    return 0 if counted and rate >= args.target else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: no mutation is left in place (they live in a clone, now removed)", file=sys.stderr)
        sys.exit(130)
