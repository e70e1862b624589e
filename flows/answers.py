"""A flow's answer as text: what `cnnflow run` prints when a flow returns, and what a flow run's logs end
with wherever it ran (`log_answer`, its on_completion hook: a served or scheduled deployment, a worker).

The answer (the default, "table") is tables and lines; --output yaml|json prints the whole
result instead, for scripts:
- train: one line with the test errors and the run's link;
- sweep: the comparison, a row per normalization and a column per batch size (or other
  swept value): the final nets' test error, mean and 95% interval over seeds; for a grid
  that is not a study a row per paired difference ("BN − GN", with its interval and n),
  the answer in words and the configuration with the lowest validation error, stated as
  such; a study's own answer; the link;
- pipeline: the sweep's comparison and answer, then the final training: what it took
  and by which rule, the registered net's test error and its best-validation
  checkpoint's beside it, the registered model, the links;
- gradient-check: one line; load-data: the arrays' shapes.

Numbers are rounded here for reading; what the flows log is never rounded.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import json
import math
import textwrap
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


def _train(result, width: int) -> list[str]:
    return [result.summary(), f"MLflow run: {result.url}"]


def _sweep(report, width: int) -> list[str]:
    return [*_sweep_answer(report, width), *_lowest_val_error(report, width), f"MLflow parent run: {report.url}",
            *_charts(report)]


def _charts(report) -> list[str]:
    return [f"its trials by normalization and batch size, in MLflow's charts: {report.charts_url}"] \
        if report.charts_url else []


def _sweep_answer(report, width: int) -> list[str]:
    """The header, the table under its title, the answer in words and the failures."""
    lines = [f"sweep {report.name}: {len(report.trials)} trials, {len(report.failed)} failed, "
             f"{sum(t.skipped for t in report.trials)} finished earlier; {report.wall_time_s:.0f} s", ""]
    if report.comparison:
        table = (_grid_table(report.comparison, report.differences, width) if "column" in report.comparison[0]
                 else _table(report.comparison, width))
        lines += [*_wrap(report.comparison_title, width), table, ""]
    if report.answer:
        lines += [*_wrap(report.answer, width), ""]
    for trial in report.failed:
        lines.append(f"FAILED {trial.run_name}: {trial.failure_reason}")
    return lines


def _lowest_val_error(report, width: int) -> list[str]:
    if not report.choice:
        return []
    from .sweep.comparison import choice_text

    return _wrap("lowest validation error: " + choice_text(report.choice), width)


def final_training_text(choice: dict, final, registered: str, version: int, registration_rule: str) -> tuple[str, str]:
    """The final training in two sentences, each with its rule: what it took, and which net it registered
    (both nets' test errors). final: the final training's TrainResult."""
    against = "; ".join(f"{o['label']} {o['val_error']:.2f}%" for o in choice["others"])
    took = (f"final training: {choice['label']} at batch {final.config.batch_size}, {final.config.num_epochs} "
            f"epochs, chosen by the rule: {choice['rule']}: {choice['label']} {choice['val_error']:.2f}%"
            + (f", {against}" if against else "") + ".")
    kept = (f"test error {100 * (1 - final.served_test_acc):.2f}%: the final net, registered as {registered} "
            f"(version {version}; the rule: {registration_rule}). Its best-validation checkpoint: "
            f"{100 * (1 - final.test_acc):.2f}%, not registered.")
    return took, kept


def _pipeline(report, width: int) -> list[str]:
    took, kept = final_training_text(report.choice, report.final, report.registered_model,
                                     report.registered_version, report.registration_rule)
    return [*_sweep_answer(report.sweep, width), *_wrap(took, width), *_wrap(kept, width, indent="  "), "",
            f"the comparison, in MLflow: {report.sweep.url}",
            *_charts(report.sweep),
            f"the final training: {report.final.url}",
            f"the pipeline's run: {report.url}"]


def _wrap(text: str, width: int, indent: str = "") -> list[str]:
    """text folded to the terminal's width (never narrower than 60 columns), continuation lines indented."""
    return textwrap.wrap(text, max(width, 60), initial_indent=indent, subsequent_indent=indent or "  ",
                         break_on_hyphens=False) or [""]


def _mapping(result, width: int) -> list[str]:
    return [f"{key}: {value}" for key, value in plain(result).items()] if isinstance(result, dict) else [str(result)]


def _table(records: list[dict], width: int) -> str:
    """A study's cells as the paper prints them (a row per normalization, a column per batch size), or any
    other records as they come."""
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
            row = [_number(r[c]) for c in columns]
            if "low" in r:
                row.append(_interval(r["low"], r["high"]))
            table.add_row(*row)
    return _printed(table, width)


def _grid_table(cells: list[dict], differences: list[dict], width: int) -> str:
    """A grid's comparison (flows.sweep.comparison.wide_rows): a row per normalization, then per difference."""
    from rich.table import Table

    from .sweep.comparison import wide_rows

    rows = wide_rows(cells, differences)
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("normalization")
    for column in list(rows[0])[1:]:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row.values())
    return _printed(table, width)


def _printed(table, width: int) -> str:
    from rich.console import Console

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
