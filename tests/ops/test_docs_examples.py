"""The docs' sweep examples, run in the order the docs give them (README, then docs/operations.md), never
meet a changed-base refusal: two examples that share a sweep name (and experiment) share its base
configuration, so the second resumes the first instead of being refused.

Each `cnnflow run sweep ...` command is read from the docs and parsed by the command itself (its click
options, then the flow's parameter validation), so an example that stops parsing fails here too.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from flows.cli import run as cli_run
from flows.cli.options import collect_parameters, validate_parameters
from flows.deployments import load_entrypoint
from flows.sweep.flow import resolved_spec
from flows.sweep.resume import base_params

REPO = Path(__file__).resolve().parents[2]
DOCS_IN_ORDER = ("README.md", "docs/operations.md")


def sweep_examples(text: str) -> list[str]:
    """Every `cnnflow run sweep ...` command in a markdown text, in order: from code blocks (continuation
    lines joined, comments dropped) and from inline code."""
    commands = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip().removeprefix("$ ")
            if re.match(r"(\.venv/bin/)?cnnflow run sweep\b", line):
                commands.append(line)
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    # `cnnflow run sweep` alone, in a sentence, names the command rather than giving an example.
    commands += [" ".join(c.split()) for c in re.findall(r"`((?:\.venv/bin/)?cnnflow run sweep\s[^`]+)`", outside)]
    # In the order they appear: inline and block commands interleaved by their position in the text.
    return sorted(commands, key=lambda c: _position(text, c))


def _position(text: str, command: str) -> int:
    words = command.split()
    found = re.search(r"\s+".join(re.escape(w) for w in words[:6]), text)
    return found.start() if found else len(text)


def what_runs(command: str, sweep_command, options, flow) -> tuple[tuple[str, str], dict] | None:
    """((experiment, sweep name), base parameters) of the sweep a command runs; None for one that needs what
    the docs do not give (a file of their own, a shell substitution)."""
    if "$(" in command or re.search(r"--[a-z-]*file\b", command):
        return None
    args = shlex.split(command)[3:]
    given = sweep_command.make_context("sweep", args).params
    params = validate_parameters(flow, collect_parameters(options, given, given.get("params")), options)
    spec = resolved_spec(params.get("spec") or flow.fn.__defaults__[0], params.get("preset"), True)
    experiment = params.get("experiment", "cnncore-sweeps")
    return (experiment, spec.name), base_params(spec)


def test_the_docs_sweep_examples_in_order_never_change_a_sweeps_base():
    flow = load_entrypoint(cli_run.FLOWS["sweep"])
    sweep_command = cli_run.build_run_command("sweep", flow)
    options = cli_run.flow_options(flow)
    commands = [c for doc in DOCS_IN_ORDER for c in sweep_examples((REPO / doc).read_text())]
    assert len(commands) >= 8, commands  # the examples were found
    first_seen: dict[tuple[str, str], tuple[str, dict]] = {}
    read = 0
    for command in commands:
        found = what_runs(command, sweep_command, options, flow)
        if found is None:
            continue
        read += 1
        key, base = found
        earlier, earlier_base = first_seen.setdefault(key, (command, base))
        changed = {k: (earlier_base[k], v) for k, v in base.items() if earlier_base.get(k) != v}
        assert not changed, f"{command!r} would be refused after {earlier!r}: its base differs in {changed}"
    assert read >= 6
