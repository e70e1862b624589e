"""A flow's answer as text: what `cnnflow run` prints when a flow returns, and what a flow run's logs end
with wherever it ran (`log_answer`, its on_completion hook: a served or scheduled deployment, a worker).

The answer (the default, "table") is tables and lines; --output yaml|json prints the whole
result instead, for scripts:
- train: one line with the test errors and the run's link;
- sweep: the comparison (a study's own table of the final model's error, mean and 95%
  interval over seeds, with the study's answer; for another grid one row per
  combination of the swept fields other than the seed), the best trial, the link;
- pipeline: the sweep's comparison, then the final training's line, the registered
  model and the link;
- gradient-check: one line; load-data: the arrays' shapes.

Numbers are rounded here for reading; what the flows log is never rounded.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import json
import math
from typing import Any

class Output(str, enum.Enum):
    """How `cnnflow run` prints a flow's result."""

    table = "table"
    yaml = "yaml"
    json = "json"


def plain(value) -> Any:
    """JSON-able data; arrays shown by shape and dtype, not by value; NaN and infinities as None (null)."""
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        return plain(value.model_dump(mode="json"))  # pydantic keeps a float field's NaN, which JSON has not
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{value.dtype} array of shape {tuple(value.shape)}" if value.shape else value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def render(result, output: Output | str = Output.table, *, width: int = 120, ui_hint: str = "",
           prefect_link: str = "") -> str:
    """The text `cnnflow run` prints for a flow's result. ui_hint: how to open the MLflow UI, when links
    point at a UI that must be started first; prefect_link: the flow run in the Prefect UI, said last."""
    output = Output(output)
    if result is None:
        return ""
    if output == Output.json:
        return json.dumps(plain(result), indent=2)
    if output == Output.yaml:
        import yaml

        return yaml.safe_dump(plain(result), sort_keys=False, width=120).rstrip()
    kind = type(result).__name__
    lines = {"TrainResult": _train, "SweepReport": _sweep, "PipelineReport": _pipeline,
             "GradientCheckReport": lambda r, w: [r.summary()]}.get(kind, _mapping)(result, width)
    if ui_hint and any("://" in line for line in lines):
        lines.append(f"(the MLflow UI: {ui_hint})")
    if prefect_link:
        lines.append(f"Prefect flow run: {prefect_link}")
    return "\n".join(lines)


def _percent(accuracy: float | None) -> str:
    return "—" if accuracy is None else f"{100 * (1 - accuracy):.2f}%"


def _train(result, width: int) -> list[str]:
    return [result.summary(), f"MLflow run: {result.url}"]


def _sweep(report, width: int) -> list[str]:
    lines = [f"sweep {report.name}: {len(report.trials)} trials, {len(report.failed)} failed, "
             f"{sum(t.skipped for t in report.trials)} finished earlier; {report.wall_time_s:.0f} s", ""]
    if report.comparison:
        lines += [report.comparison_title, _table(report.comparison, width), ""]
    if report.answer:
        lines += [report.answer, ""]
    for trial in report.failed:
        lines.append(f"FAILED {trial.run_name}: {trial.failure_reason}")
    if report.best is not None:
        lines.append(f"best trial: {report.best.run_name}, val acc {report.best.best_val_acc:.3f}, "
                     f"test error {_percent(report.best.test_acc)}")
    lines.append(f"MLflow parent run: {report.url}")
    return lines


def _pipeline(report, width: int) -> list[str]:
    sweep = _sweep(report.sweep, width)
    return [*sweep[:-1], "",
            f"final training ({report.final.config.num_epochs} epochs of the best configuration): "
            + _train(report.final, width)[0],
            f"registered model: {report.registered_model}", "",
            f"the comparison, in MLflow: {report.sweep.url}",
            f"the pipeline's run: {report.url}"]


def _mapping(result, width: int) -> list[str]:
    return [f"{key}: {value}" for key, value in plain(result).items()] if isinstance(result, dict) else [str(result)]


def _table(records: list[dict], width: int) -> str:
    """A study's cells as the paper prints them (a row per normalization, a column per batch size), or any
    other records as they come."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    if {"normalization", "batch_size", "mean", "low", "high"} <= set(records[0]):
        sizes = sorted({r["batch_size"] for r in records}, reverse=True)
        table.add_column("normalization")
        for size in sizes:
            table.add_column(f"batch {size}", justify="right")
        for norm in dict.fromkeys(r["normalization"] for r in records):
            cells = {r["batch_size"]: r for r in records if r["normalization"] == norm}
            table.add_row(norm, *(_cell(cells[s]) if s in cells else "" for s in sizes))
    else:
        columns = [c for c in records[0] if c not in ("low", "high")]
        for column in columns:
            table.add_column(column.replace("_", " "), justify="right" if column != "normalization" else "left")
        if "low" in records[0]:
            table.add_column("95% CI", justify="right")
        for r in records:
            row = [f"{r[c]:.2f}" if c == "test_error" and isinstance(r[c], float) and not math.isnan(r[c])
                   else _number(r[c]) for c in columns]
            if "low" in r:
                row.append(_interval(r["low"], r["high"]))
            table.add_row(*row)
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(table)
    return console.file.getvalue().rstrip()


def _cell(record: dict) -> str:
    return f"{record['mean']:.2f} {_interval(record['low'], record['high'])}"


def _interval(low, high) -> str:
    return "—" if low is None or (isinstance(low, float) and math.isnan(low)) else f"[{low:.2f}, {high:.2f}]"


def _number(value) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def log_answer(flow, flow_run, state) -> None:
    """A flow's on_completion hook: its answer, line by line, at the end of its run's logs (in the Prefect UI,
    and on the console of whatever runs a deployment). `cnnflow run` prints the answer itself and keeps
    Prefect's INFO lines off its console, so it is not said twice there."""
    from prefect.logging.loggers import flow_run_logger

    logger = flow_run_logger(flow_run=flow_run, flow=flow)
    for line in render(state.result(), Output.table).splitlines():
        if line.strip():
            logger.info(line)
