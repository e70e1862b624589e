"""Telemetry off wherever the flows run, Prefect's client-side files included.

``TELEMETRY_OFF`` goes into the environment when ``flows`` is imported (flows/__init__.py),
before any of its modules imports Prefect or MLflow, and every process the flows start
inherits it. A value already set in the environment wins.

With DO_NOT_TRACK set, Prefect 3.9's client sends nothing and prints no banner, but in
a terminal it still records "milestones" (the first flow defined, the first flow run,
the first deployment) by writing a device id and ``milestones.json`` under
``$PREFECT_HOME/.sdk_telemetry``: ``try_mark_milestone`` checks for a terminal, not for
DO_NOT_TRACK. Every caller imports it from ``prefect._internal.analytics`` when it
calls it, so while telemetry is off that name is replaced by a function that records
nothing, as soon as the module is imported (by a one-shot import hook when Prefect is
not imported yet). Nothing here imports Prefect.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

TELEMETRY_OFF = {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
_ANALYTICS = "prefect._internal.analytics"


def telemetry_off() -> bool:
    """DO_NOT_TRACK says so, as Prefect reads it."""
    return os.environ.get("DO_NOT_TRACK", "").lower() in ("1", "true", "yes")


def _record_nothing(milestone: str) -> bool:
    return False


def _guard(module) -> None:
    if telemetry_off():
        module.try_mark_milestone = _record_nothing


class _GuardOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when prefect._internal.analytics is first imported, it has the module's own spec
    load it, then guards it, and leaves sys.meta_path."""

    def find_spec(self, name, path, target=None):
        if name != _ANALYTICS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_guard(module) -> None:
            exec_module(module)
            _guard(module)

        spec.loader.exec_module = exec_and_guard
        return spec


def switch_off() -> None:
    """TELEMETRY_OFF into the environment (where unset), and Prefect's milestone files guarded."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    if _ANALYTICS in sys.modules:
        _guard(sys.modules[_ANALYTICS])
    elif not any(isinstance(finder, _GuardOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _GuardOnImport())
