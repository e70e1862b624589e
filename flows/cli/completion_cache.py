"""Fast TAB completion of `cnnflow run FLOW --...`: the flow's options from a cache, not from its import.

A flow's options are generated from its typed parameters (options.py), which takes
importing the flow, Prefect with it: 1.5-3 s on an idle 2-core machine, far more under
load, for every TAB. The shell's completion requests parse the command line with
click's resilient parsing, which is how they are told from a run; for those, the
options come from a small JSON file under the cache folder instead, written the first
time a flow's options are generated and thrown away when any of the package's sources
changes (their sizes and modification times are its key). A run or `--help` always
imports the flow and builds its options anew.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Literal, Optional

import typer

_PACKAGE = Path(__file__).resolve().parents[1]  # flows/


def cache_file() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "cnncore" / "completion.json"


def sources_key() -> str:
    """What the generated options depend on: every source file of the package, by size and mtime."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        stat = path.stat()
        digest.update(f"{path.relative_to(_PACKAGE)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def _describe(command) -> list[dict]:
    """The options of the command typer built, as plain data."""
    return [{"opts": list(param.opts), "secondary_opts": list(param.secondary_opts),
             "is_flag": bool(getattr(param, "is_flag", False)), "multiple": bool(param.multiple),
             "help": param.help or "", "choices": _choices(param)}
            for param in command.params if getattr(param, "param_type_name", "") == "option"]


def _choices(param) -> list[str] | None:
    """The values an option takes, when they are a choice: typer's type descriptor (typer >= 0.20 has its own
    click), else click's Choice type."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:
        found = descriptor.choices if descriptor.is_choice else None
    else:
        found = getattr(getattr(param, "type", None), "choices", None)
    return [getattr(c, "value", c) for c in found] if found else None


def remember(name: str, command) -> None:
    """Keep command's options for completing `cnnflow run NAME` (best effort: a cache that cannot be written
    costs only speed)."""
    path = cache_file()
    try:
        cached = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        cached = {}
    key = sources_key()
    if cached.get("key") != key:
        cached = {"key": key, "flows": {}}
    cached["flows"][name] = _describe(command)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(cached))
        os.replace(partial, path)
    except OSError:
        pass


def cached_command(name: str):
    """A command with the options cached for `cnnflow run NAME`, enough to complete them (values of a choice
    included); None when the cache lacks them or is stale."""
    try:
        cached = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return None
    if cached.get("key") != sources_key() or name not in cached.get("flows", {}):
        return None
    parameters = [inspect.Parameter(f"option_{i}", inspect.Parameter.KEYWORD_ONLY, annotation=_annotation(d),
                                    default=typer.Option(None, *_declarations(d), help=d["help"]))
                  for i, d in enumerate(cached["flows"][name])]

    def command(**given) -> None:  # never run: a completion request only parses
        raise typer.Exit(0)

    command.__signature__ = inspect.Signature(parameters)
    single = typer.Typer(add_completion=False)
    single.command(name=name)(command)
    return typer.main.get_command(single)


def _declarations(described: dict) -> list[str]:
    opts, secondary = described["opts"], described["secondary_opts"]
    return [*opts[:-1], f"{opts[-1]}/{'/'.join(secondary)}"] if secondary else opts


def _annotation(described: dict):
    if described["is_flag"]:
        return Optional[bool]
    value = Literal[tuple(described["choices"])] if described["choices"] else str
    return Optional[list[value]] if described["multiple"] else Optional[value]
