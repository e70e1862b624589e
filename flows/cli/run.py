"""`cnnflow run FLOW`: one command per flow, its options generated from the flow's parameters.

A flow module is imported only when its command runs or shows its help; the list
of flows and their one-line summaries come from the modules' source, unimported,
so `cnnflow run --help` answers at once.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import logging
from pathlib import Path
from typing import Any, Optional

import click
import typer
from typer.core import TyperGroup

from ..deployments import entrypoint_module, load_entrypoint
from .errors import Settings, fail, one_line_errors, stopped_by_signals
from .options import FlowOption, collect_parameters, flow_options, validate_parameters

# The flows `cnnflow run` knows: command name -> entrypoint.
FLOWS = {
    "pipeline": "flows.pipeline:pipeline",
    "train": "flows.train:train",
    "sweep": "flows.sweep.flow:sweep",
    "gradient-check": "flows.gradient_check:gradient_check",
    "load-data": "flows.load_data:load_data",
}
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def flow_summary(entrypoint: str) -> str:
    """The first paragraph of the flow function's docstring, read from its source without importing it."""
    module, attr = entrypoint_module(entrypoint)
    base = _PACKAGE_ROOT / module.replace(".", "/")
    source = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == attr:
            return " ".join((ast.get_docstring(node) or "").split("\n\n")[0].split())
    return ""


class _NoTracebackFormatter(logging.Formatter):
    """Wraps a handler's formatter so that log records print without their traceback."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        plain = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None, "stack_info": None})
        return self.inner.format(plain)


def _quiet_prefect_tracebacks() -> None:
    """Prefect logs a failed run's traceback to the console; the CLI says it in one line instead.

    The traceback still reaches the Prefect API (the UI's logs) and MLflow (the
    failure artifact); only the terminal copy goes.
    """
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in (logging.getLogger(), *(logging.getLogger(n) for n in logging.root.manager.loggerDict)):
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _NoTracebackFormatter):
                handler.setFormatter(_NoTracebackFormatter(handler.formatter or logging.Formatter()))


def _plain(value):
    """JSON-able data; arrays shown by shape and dtype, not by value."""
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{value.dtype} array of shape {tuple(value.shape)}" if value.shape else value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def summarize(result) -> str:
    """A flow's return value as YAML for the terminal."""
    import yaml

    if result is None:
        return ""
    return yaml.safe_dump(_plain(result), sort_keys=False, width=120).rstrip()


def run_flow(flow, options: list[FlowOption], given: dict[str, Any]) -> None:
    with one_line_errors(), stopped_by_signals():
        params = collect_parameters(options, given, given.get("params"))
        validated = validate_parameters(flow, params, options)
        _check_tracking_server(flow, validated)
        if not Settings.debug:
            import prefect.logging.configuration  # noqa: F401  (Prefect configures logging on import)

            _quiet_prefect_tracebacks()
        result = flow(**validated)
        text = summarize(result)
        if text:
            typer.echo(text)


def _check_tracking_server(flow, params: dict) -> None:
    """Fail before starting Prefect when the flow would log to a tracking server that does not answer.

    The flow makes the same check itself; doing it here first saves the seconds a
    temporary Prefect server takes to start, only to report the same line.
    """
    if "tracking_uri" not in inspect.signature(getattr(flow, "fn", flow)).parameters:
        return
    from .. import tracking

    uri = tracking.resolve_tracking_uri(params.get("tracking_uri"))
    if tracking.is_server(uri):
        tracking.connect(uri)


def build_run_command(command_name: str, flow) -> click.Command:
    """A click command whose options are flow_options(flow)."""
    options = flow_options(flow)
    parameters = [
        inspect.Parameter(
            "params", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
            default=typer.Option(None, "--params", metavar="FILE", rich_help_panel="Input files",
                                 help="YAML or JSON file of the flow's parameters, shaped as in prefect.yaml's "
                                      "`parameters:`; options given on the command line override it."),
        )
    ]
    for option in options:
        if option.kind == "mapping":
            parameters.append(inspect.Parameter(
                option.ident, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[list[str]],
                default=typer.Option(None, option.flag, metavar="KEY=VALUES", rich_help_panel=option.panel,
                                     help=f"{option.help} Repeat the option, one key each: `KEY=V1,V2` for a list, "
                                          "`KEY={low: 1e-4, high: 1e-2, log: true}` for an interval.")))
            parameters.append(inspect.Parameter(
                option.ident + "_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                default=typer.Option(None, option.flag + "-file", metavar="FILE", rich_help_panel="Input files",
                                     help=f"YAML or JSON mapping for {option.flag}; {option.flag} options "
                                          "given too add to it or override its keys.")))
            continue
        metavar = "JSON" if option.kind == "json" else None
        # A boolean is a pair of flags, --x/--no-x, never a value to type.
        flag = f"{option.flag}/--no-{option.flag[2:]}" if option.annotation is bool else option.flag
        parameters.append(inspect.Parameter(
            option.ident, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[option.annotation],
            default=typer.Option(None, flag, help=option.help, metavar=metavar, show_default=False,
                                 rich_help_panel=option.panel)))

    def command(**given):
        run_flow(flow, options, given)

    command.__signature__ = inspect.Signature(parameters)
    fn = getattr(flow, "fn", flow)
    summary = " ".join((inspect.getdoc(fn) or "").split("\n\n")[0].split())
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command(name=command_name, help=f"{summary}\n\nRuns the Prefect flow `{getattr(flow, 'name', fn.__name__)}` "
                                           "in this process and prints its result.")(command)
    return typer.main.get_command(single)


class _LazyFlowGroup(TyperGroup):
    """`cnnflow run`: a flow is imported only when its command is resolved; listing needs no import."""

    _resolving = False

    def list_commands(self, ctx) -> list[str]:
        return list(FLOWS)

    def resolve_command(self, ctx, args):
        self._resolving = True
        try:
            return super().resolve_command(ctx, args)
        finally:
            self._resolving = False

    def get_command(self, ctx, name: str):
        if name not in FLOWS:
            return None
        if not self._resolving:  # listed in `cnnflow run --help`: the summary is enough
            summary = flow_summary(FLOWS[name])
            return click.Command(name, help=summary, short_help=summary)
        try:
            return build_run_command(name, load_entrypoint(FLOWS[name]))
        except Exception as exc:  # a flow that fails to import must not hide the others
            if Settings.debug:
                raise
            return _unavailable_command(name, f"cannot load the flow {FLOWS[name]}: {type(exc).__name__}: {exc}")


def _unavailable_command(name: str, reason: str) -> click.Command:
    """A stand-in for a flow that cannot be loaded: failing with the reason when run."""

    def command():
        fail(reason)

    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command(name=name, help=f"(unavailable) {reason}", context_settings={"ignore_unknown_options": True,
                                                                               "allow_extra_args": True})(command)
    return typer.main.get_command(single)


run_app = typer.Typer(cls=_LazyFlowGroup, no_args_is_help=True,
                      help="Run one flow now, in this process; every flow parameter is an option.")
