"""The `cnnflow` command: its top level and the commands that are not flows (ui, serve, runs, report); the
`server` commands come from server.py, `run` from run.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from .. import credentials
from ..deployments import PREFECT_YAML
from .completion import CompletionGroup
from .errors import CliError, Settings, one_line_errors
from .run import run_app
from .server import server_app

app = typer.Typer(
    cls=CompletionGroup,  # --show-completion/--install-completion take the shell's name (completion.py)
    name="cnnflow",
    help="Run, schedule and inspect cnncore's Prefect flows, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
app.add_typer(run_app, name="run")
app.add_typer(server_app, name="server")


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug/--no-debug", help="Show tracebacks instead of one-line errors.")]
    = False,
    verbose: Annotated[bool, typer.Option("--verbose/--no-verbose", "-v", help=(
        "Show everything Prefect and MLflow say (Prefect's INFO lines, MLflow's progress bars); by default "
        "only warnings, errors and the flows' progress lines."))] = False,
):
    Settings.debug = debug
    Settings.verbose = verbose
    # Before any command imports MLflow or Prefect's server, which read these once.
    from .console import quiet_environment

    quiet_environment(verbose)


# The UI's server keeps nothing to save (the store is written by the runs): a short grace, then SIGKILL.
UI_STOP_GRACE_S = 3.0


@app.command()
def ui(
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port on 127.0.0.1; 0 picks a free one. The links "
                                                            "the flows leave in Prefect point at 5000.")] = 5000,
    backend_store_uri: Annotated[Optional[str], typer.Option(
        help="MLflow store to show; default: $MLFLOW_TRACKING_URI when it is a database URI, "
             "else the project's sqlite store (mlruns/mlflow.db).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the UI to answer.")] = 90.0,
):
    """Start the MLflow UI on 127.0.0.1 for the project's store, print its address, and keep it up until Ctrl-C.

    Stopped by a signal, it stops its server and exits 128 + the signal's number (Ctrl-C 130, SIGTERM 143).
    """
    with one_line_errors():
        from .. import tracking
        from ..shutdown import interruption, termination_as_interrupt
        from ..servers import background_server, free_port, mlflow_server_command, port_is_taken

        uri = tracking.resolve_tracking_uri(backend_store_uri)  # a masked password put back from the environment
        shown = credentials.mask(uri)
        if tracking.is_server(uri):
            typer.echo(f"MLFLOW_TRACKING_URI points at a tracking server; its UI is at {shown}")
            return
        artifacts = None
        if (root := tracking.artifact_root(uri)) is not None:
            root.parent.mkdir(parents=True, exist_ok=True)  # the database's folder
            artifacts = root.as_uri()
        port = port or free_port()
        if port_is_taken(port):
            raise CliError(f"port {port} on 127.0.0.1 is taken; choose another with --port (0 picks a free one)")
        address = f"http://127.0.0.1:{port}"
        command, env = mlflow_server_command(uri, port, default_artifact_root=artifacts)
        typer.echo(f"starting the MLflow UI on {shown} ...", err=True)
        try:
            with termination_as_interrupt(), background_server(command, f"{address}/health", timeout_s=timeout,
                                                               env={**os.environ, **env},
                                                               stop_grace_s=UI_STOP_GRACE_S) as process:
                typer.echo(f"MLflow UI: {address}  (Ctrl-C stops it)")
                _mention_local_prefect_ui()
                code = process.wait()
                raise CliError(f"the MLflow UI exited with code {code}")
        except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM or SIGHUP: the server is stopped on the way out
            stopped = interruption(exc)
            typer.echo(f"{stopped}: the MLflow UI is stopped", err=True)
            raise typer.Exit(128 + signal.Signals[stopped.signal_name].value) from None  # 130, 143, 129


def _mention_local_prefect_ui() -> None:
    """Where the flow runs are, when they go to the local Prefect server (PREFECT_API_URL unset)."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from ..local_server import server_status

    local = server_status()
    if local.answering:
        typer.echo(f"Prefect UI: {local.state.runs_url}  (the local Prefect server; `cnnflow server stop` stops it)")


@app.command()
def serve(
    file: Annotated[Path, typer.Option("--file", "-f", help="Deployment declarations to serve.")] = PREFECT_YAML,
    deployment: Annotated[Optional[list[str]], typer.Option(
        "--deployment", "-d", help="Serve only this deployment (its name in prefect.yaml); repeatable.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Most flow runs at once; unlimited when unset.")] = None,
):
    """Serve prefect.yaml's deployments, with their schedules, from this process until Ctrl-C.

    Needs a Prefect server: PREFECT_API_URL set (`prefect server start`, or the
    docker-compose stack). Scheduled and ad hoc runs (`prefect deployment run
    'sweep/weekly-bn-vs-gn' -p ...`) execute here, in subprocesses.
    """
    with one_line_errors():
        from .. import deployments

        specs = deployments.read_deployments(file, only=deployment)
        api = deployments.require_prefect_api()
        runner_deployments = [deployments.to_runner_deployment(spec) for spec in specs]
        typer.echo(f"serving {', '.join(s.full_name for s in specs)} against {api}", err=True)
        from prefect import serve as prefect_serve

        prefect_serve(*runner_deployments, limit=limit)


@app.command()
def runs(
    experiment: Annotated[Optional[list[str]], typer.Option(
        "--experiment", "-e", help="Experiment name; repeatable. Default: every experiment.")] = None,
    limit: Annotated[int, typer.Option(help="Most recent runs to show.", min=1)] = 20,
    tracking_uri: Annotated[Optional[str], typer.Option(
        help="MLflow tracking URI; else $MLFLOW_TRACKING_URI, else the project's sqlite store.")] = None,
    output: Annotated[Literal["table", "json"], typer.Option(help="table for people, json for scripts.")] = "table",
):
    """List recent MLflow runs, newest first: name, parent, status, key parameters, val/test accuracy."""
    with one_line_errors():
        from .runs_table import print_runs_table, recent_runs

        rows = recent_runs(tracking_uri, experiment, limit)
        if output == "json":
            typer.echo(json.dumps(rows, indent=2))
        else:
            print_runs_table(rows)


@app.command()
def report(
    name: Annotated[str, typer.Argument(help="The study's sweep name, e.g. mnist-fc-control.")],
    to: Annotated[Optional[Path], typer.Option(help="Folder to copy the report, its figures and tables into.")] = None,
    experiment: Annotated[Optional[list[str]], typer.Option(
        "--experiment", "-e", help="Experiment to look in; repeatable. Default: every experiment.")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(
        help="MLflow tracking URI; else $MLFLOW_TRACKING_URI, else the project's sqlite store.")] = None,
    format: Annotated[Literal["auto", "answer", "md"], typer.Option(
        "--format", "-f", help="answer: the report's title and answer, drawn for the terminal; md: the whole "
                               "report as markdown; auto: answer to a terminal, md to a pipe or a file.")] = "auto",
):
    """Print a study's report (the latest sweep of that name); --to also copies its figures and tables."""
    with one_line_errors():
        from .report import REPORT, answer_section, export_study, find_study, for_terminal

        run, record = find_study(tracking_uri, name, experiment)
        markdown = export_study(run, to)
        if format == "md" or (format == "auto" and not sys.stdout.isatty()):
            typer.echo(markdown.rstrip())
        else:
            width = shutil.get_terminal_size((100, 40)).columns
            typer.echo(for_terminal(answer_section(markdown), width))
            typer.echo(f"\nThe whole report: `cnnflow report {name} --format md`, or with its figures and tables "
                       f"`--to DIR`; in MLflow: {run.url_of(REPORT)}")
        if to is not None:
            typer.echo(f"\nwritten to {to}/ (report.md, figures, tables) from run {record.id}", err=True)
