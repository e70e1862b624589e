"""prefect.yaml's deployments, served from one process by `cnnflow serve`.

The deployments (entrypoints, schedules, parameters) are declared once, in
prefect.yaml at the repository root, and run two ways:
- a stack: `prefect deploy --all` registers them for the `cnncore` work pool,
  whose worker (docker-compose.yml) runs them;
- one machine: `cnnflow serve` reads the same file and serves them with
  `prefect.serve`, running scheduled and ad hoc runs in subprocesses.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

PREFECT_YAML = Path(__file__).resolve().parent.parent / "prefect.yaml"


class PrefectUnavailableError(RuntimeError):
    """No Prefect API to serve deployments to."""


@dataclasses.dataclass(frozen=True)
class DeploymentSpec:
    """One entry of prefect.yaml's `deployments:`."""

    name: str
    entrypoint: str
    description: str | None = None
    tags: tuple[str, ...] = ()
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    schedules: tuple[dict[str, Any], ...] = ()

    @property
    def flow_name(self) -> str:
        """The flow's Prefect name, as `prefect deployment run 'FLOW/DEPLOYMENT'` wants it."""
        return self.load_flow().name

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{self.name}"

    def load_flow(self):
        """The flow at `path/to/module.py:function`, imported as a module of the installed package."""
        try:
            return load_entrypoint(self.entrypoint)
        except ValueError as exc:
            raise ValueError(f"deployment {self.name!r}: {exc}") from exc


def entrypoint_module(entrypoint: str) -> tuple[str, str]:
    """(module, attribute) of `path/to/module.py:function` (prefect.yaml's form) or `package.module:function`."""
    path, _, attr = entrypoint.partition(":")
    return path.removesuffix(".py").replace("/", "."), attr


def load_entrypoint(entrypoint: str):
    """The object an entrypoint names, imported as a module of the installed package."""
    module, attr = entrypoint_module(entrypoint)
    found = getattr(importlib.import_module(module), attr, None)
    if found is None:
        raise ValueError(f"{module} has no {attr!r} (entrypoint {entrypoint})")
    return found


def read_deployments(path: str | Path = PREFECT_YAML, only: list[str] | None = None) -> list[DeploymentSpec]:
    """The deployments declared in path, or only those named (by `NAME` or `FLOW/NAME`)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    entries = (yaml.safe_load(text) or {}).get("deployments") or []
    specs = []
    for entry in entries:
        missing = [key for key in ("name", "entrypoint") if not entry.get(key)]
        if missing:
            raise ValueError(f"{path}: a deployment lacks {missing}: {entry}")
        specs.append(DeploymentSpec(
            name=entry["name"], entrypoint=entry["entrypoint"], description=entry.get("description"),
            tags=tuple(entry.get("tags") or ()), parameters=dict(entry.get("parameters") or {}),
            schedules=tuple(entry.get("schedules") or ()),
        ))
    if only:
        chosen = [s for s in specs if s.name in only or s.full_name in only]
        unknown = sorted(set(only) - {s.name for s in chosen} - {s.full_name for s in chosen})
        if unknown:
            raise ValueError(f"no deployment {unknown} in {path}; it declares {[s.full_name for s in specs]}")
        specs = chosen
    return specs


def to_schedule(entry: dict[str, Any]):
    """One prefect.yaml schedule entry (cron, interval or rrule, with its options) as a Prefect Schedule."""
    from prefect.schedules import Cron, Interval, RRule

    options = {key: entry[key] for key in ("timezone", "active", "parameters", "slug") if key in entry}
    if "cron" in entry:
        return Cron(entry["cron"], day_or=entry.get("day_or", True), **options)
    if "interval" in entry:
        anchor = entry.get("anchor_date")
        anchor = datetime.datetime.fromisoformat(anchor) if isinstance(anchor, str) else anchor
        return Interval(entry["interval"], anchor_date=anchor, **options)
    if "rrule" in entry:
        return RRule(entry["rrule"], **options)
    raise ValueError(f"a schedule needs cron, interval or rrule, got {entry}")


def to_runner_deployment(spec: DeploymentSpec):
    """The deployment as `prefect.serve` takes it: same name, schedules, parameters, tags."""
    from prefect.types.entrypoint import EntrypointType

    return spec.load_flow().to_deployment(
        name=spec.name,
        schedules=[to_schedule(entry) for entry in spec.schedules],
        parameters=spec.parameters,
        description=spec.description,
        tags=list(spec.tags),
        # By module (flows.sweep.sweep), so served runs find the code wherever `cnnflow serve` started.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def require_prefect_api(timeout_s: float = 5.0) -> str:
    """PREFECT_API_URL, once its server answers /health."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise PrefectUnavailableError(
            "cnnflow serve needs a Prefect server: start one (`prefect server start`, or the docker-compose "
            "stack) and set PREFECT_API_URL, e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api")
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout_s):
            return url
    except (OSError, urllib.error.URLError) as exc:
        raise PrefectUnavailableError(f"the Prefect server at PREFECT_API_URL={url} does not answer: {exc}") from exc
