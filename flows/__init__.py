"""Prefect flows that train, check and compare cnncore networks, tracked in MLflow.

Telemetry is off wherever these flows run (`cnnflow`, `python -m flows.X`, a served
deployment, a trial worker): flows.telemetry sets it up here, before any module of the
package imports Prefect or MLflow.
"""

from .telemetry import TELEMETRY_OFF, switch_off

switch_off()

__all__ = ["TELEMETRY_OFF"]
