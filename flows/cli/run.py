"""`cnnflow run FLOW`: one command per flow, its options generated from the flow's parameters.

A flow module is imported only when its command runs or shows its help; the list
of flows and their one-line summaries come from the modules' source, unimported,
so `cnnflow run --help` answers at once.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import os
import shutil
import sys
import threading
import typing
from pathlib import Path
from typing import Any, Optional

import click
import typer
from typer.core import TyperGroup

from .. import credentials, forkserver, progress
from ..deployments import entrypoint_module, load_entrypoint
from . import completion_cache
from .console import configure_prefect_console
from .errors import CliError, Settings, fail, one_line_errors, stopped_by_signals
from ..answers import Output, render
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
# The environment's say on --local-server/--no-local-server (false, 0, no: the temporary server).
LOCAL_SERVER_ENV = "CNNCORE_LOCAL_SERVER"
# Seconds a run may say nothing while it starts before it says that it is starting.
STARTING_SILENCE_S = 5.0


def flow_summary(entrypoint: str) -> str:
    """The first paragraph of the flow function's docstring, read from its source without importing it."""
    module, attr = entrypoint_module(entrypoint)
    base = _PACKAGE_ROOT / module.replace(".", "/")
    source = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == attr:
            return " ".join((ast.get_docstring(node) or "").split("\n\n")[0].split())
    return ""


def run_flow(flow, options: list[FlowOption], given: dict[str, Any]) -> None:
    from ..prefect_watch import PrefectServerLostError

    with one_line_errors(), stopped_by_signals():
        params = collect_parameters(options, given, given.get("params"))
        validated = validate_parameters(flow, params, options)
        if validated.get("tracking_uri"):  # the password stays in the environment; the flow run records it masked
            validated["tracking_uri"] = credentials.masked_for_flow(validated["tracking_uri"])
        _check_tracking_server(flow, validated)
        configure_prefect_console(verbose=Settings.verbose, tracebacks=Settings.debug)  # the server's lines too
        local_server = given.get("local_server", True)
        server = _server_name(flow, local_server)
        try:
            with _prefect_server(flow, local_server) as temporary_api_url:
                result, prefect_link, loss = _run_watched(flow, validated, temporary_api_url, server)
        except PrefectServerLostError as lost:
            _exit_lost(lost)
        text = render(result, given.get("output") or "table", width=shutil.get_terminal_size((120, 40)).columns,
                      ui_hint=_ui_hint(validated, result), prefect_link=prefect_link)
        if text:
            typer.echo(text)
        if loss is not None:  # the flow's answer is above; Prefect could not record its end
            _exit_lost(loss)


def _exit_lost(loss) -> typing.NoReturn:
    """The Prefect server's loss in one line, and out at once: the flow's workers are stopped and MLflow has it
    all, while Prefect's event and log workers would spend a minute at exit retrying what the server cannot take."""
    with progress.saying():
        typer.echo(f"error: {' '.join(str(loss).split())}", err=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader gone, or the stream closed
            stream.flush()
    os._exit(loss.exit_code)


def _run_watched(flow, validated: dict, api_url: str | None, server: str):
    """(flow(**validated), its Prefect link (_run_and_link), the loss of its Prefect server or None), the server
    watched (flows.prefect_watch): a server lost while the flow failed raises the loss, whatever Prefect's client
    raised after it (a bare ConnectError); lost while the flow finished, the result comes with the loss, to say
    after the answer.

    api_url: the server's API, when Prefect's settings do not name it (the temporary server).
    """
    from prefect.settings import PREFECT_API_URL

    from .. import prefect_watch

    with prefect_watch.watching(api_url or PREFECT_API_URL.value(), server):
        try:
            result, link = _run_and_link(flow, validated)
        except Exception as exc:
            loss = prefect_watch.lost()
            if loss is not None and prefect_watch.stopped_by_loss(exc):
                raise loss from None  # the flow stopped because of it (and Prefect's engine could not record that)
            if loss is None or not prefect_watch.unreachable(exc):
                raise  # the flow's own failure says more than the server's loss
            # Prefect's engine could not record the end of a flow whose body went on without the server.
            raise loss.after_the_flow_finished() from None
    loss = prefect_watch.lost()
    return result, link, None if loss is None else loss.after_the_flow_finished()


def _server_name(flow, local_server: bool) -> str:
    """How messages name the Prefect server the flow will report to (see _prefect_server)."""
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return "the Prefect server"
    return "the local Prefect server" if local_server else "Prefect's temporary server"


def _run_and_link(flow, params: dict) -> tuple[Any, str]:
    """The flow's result, and the link to its flow run in the Prefect UI ("" when the flow run dies with this
    process: Prefect's temporary server, or not a Prefect flow). The flow's own exception is raised as is."""
    from prefect import Flow
    from prefect.settings import get_current_settings

    if not isinstance(flow, Flow):
        return flow(**params), ""
    state = flow(**params, return_state=True)
    result = state.result()
    ui = get_current_settings().ui_url
    has_server = bool(get_current_settings().api.url)  # none: Prefect's temporary server, gone with the process
    link = f"{ui.rstrip('/')}/runs/flow-run/{state.state_details.flow_run_id}" if ui and has_server else ""
    return result, link


def _ui_hint(params: dict, result) -> str:
    """How to open the MLflow UI that a local store's links point at: "" for a tracking server (which serves
    it), or when the UI at the links' address already shows the result's run (`cnnflow ui` is up)."""
    from .. import tracking

    uri = tracking.resolve_tracking_uri(params.get("tracking_uri"))
    if tracking.is_server(uri):
        return ""
    from ..servers import mlflow_ui_shows_run

    run_id = next((getattr(result, a) for a in ("run_id", "parent_run_id") if getattr(result, a, None)), None)
    if run_id and mlflow_ui_shows_run(tracking.DEFAULT_UI_URL, run_id):
        return ""
    return f"start it with `{tracking.Store(uri).ui_command()}`"


def _prefect_server(flow, local_server: bool):
    """Where the flow reports: PREFECT_API_URL when Prefect has one (environment or profile); else the local
    server (flows.local_server), started if need be; with --no-local-server, Prefect's temporary server."""
    from prefect import Flow
    from prefect.settings import get_current_settings

    if not isinstance(flow, Flow) or get_current_settings().api.url:
        return contextlib.nullcontext()
    if not local_server:  # Prefect's temporary server, with a limit that grows with the load, dying with us
        from ..temporary_server import temporary_server

        return temporary_server()
    from ..local_server import ServerError, ensure_server, prefect_api

    try:
        state, _ = ensure_server(say=_tell)
    except ServerError as exc:
        raise CliError(f"the local Prefect server did not start: {exc} (`--no-local-server` runs the flow "
                       "with a temporary server inside this process instead)") from exc
    return prefect_api(state.api_url)


def _tell(text: str) -> None:
    """A line on stderr that counts as the run's first word (no "starting" line after it)."""
    with progress.saying():
        typer.echo(text, err=True)


def _check_tracking_server(flow, params: dict) -> None:
    """Fail before starting Prefect when the flow would log to a tracking server or database that does not answer.

    The flow makes the same check itself; doing it here first saves the seconds a
    temporary Prefect server takes to start, only to report the same line.
    """
    if "tracking_uri" not in inspect.signature(getattr(flow, "fn", flow)).parameters:
        return
    from .. import tracking

    uri = tracking.resolve_tracking_uri(params.get("tracking_uri"))
    if tracking.is_server(uri) or tracking.is_database(uri):
        tracking.connect(uri)
    else:
        tracking.require_writable(uri)  # a read-only sqlite store: said now, not after a server start


def build_run_command(command_name: str, flow) -> click.Command:
    """A click command whose options are flow_options(flow)."""
    options = flow_options(flow)
    parameters = [
        inspect.Parameter(
            "params", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
            default=typer.Option(None, "--params", metavar="FILE", rich_help_panel="Input files",
                                 help="YAML or JSON file of the flow's parameters, shaped as in prefect.yaml's "
                                      "`parameters:`; options given on the command line override it."),
        ),
        inspect.Parameter(
            "output", inspect.Parameter.KEYWORD_ONLY, annotation=Output,
            default=typer.Option(Output.table, "--output", "-o", rich_help_panel="Output",
                                 help="table: the run's answer for people (tables, errors, links); yaml or json: "
                                      "the whole result, for scripts.")),
        inspect.Parameter(
            "local_server", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
            default=typer.Option(True, "--local-server/--no-local-server", envvar=LOCAL_SERVER_ENV,
                                 rich_help_panel="Prefect server",
                                 help="With PREFECT_API_URL unset: report to cnnflow's long-lived local Prefect "
                                      "server (`cnnflow server`), started by the first run that needs it; "
                                      "--no-local-server: a temporary server inside this process instead, about "
                                      "10 s per run, its flow runs gone with it."),
        ),
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
        if not ctx.resilient_parsing and args and args[0] in FLOWS and not {"--help", "-h"} & set(args):
            _say_if_slow_to_start(args[0])
            # The trial workers' imports, beside this process's own (Prefect, the flow) and its run's start.
            forkserver.start_for_command(args[0], args[1:])
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
        if ctx.resilient_parsing and (cached := completion_cache.cached_command(name)) is not None:
            return cached  # a shell's TAB: the options it completes, without importing the flow
        try:
            command = build_run_command(name, load_entrypoint(FLOWS[name]))
            completion_cache.remember(name, command)
            return command
        except Exception as exc:  # a flow that fails to import must not hide the others
            if Settings.debug:
                raise
            return _unavailable_command(name, f"cannot load the flow {FLOWS[name]}: {type(exc).__name__}: {exc}")


def _say_if_slow_to_start(name: str) -> None:
    """One line, if the flow has said nothing STARTING_SILENCE_S after its command was resolved: importing
    Prefect, MLflow and the flow, and starting the flow run, take 2-4 s on an idle machine but 20-30 s on a
    loaded one, a silence that would look like a hang."""
    def say_starting() -> None:
        if not progress.said_a_line.wait(STARTING_SILENCE_S):
            progress.unless_said(lambda: typer.echo(
                f"cnnflow run {name}: starting (loading Prefect, MLflow and the flow; the machine's load average is "
                f"{os.getloadavg()[0]:.1f})", err=True))

    threading.Thread(target=say_starting, name="say-if-slow-to-start", daemon=True).start()


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
