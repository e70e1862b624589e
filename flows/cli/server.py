"""`cnnflow server start|stop|status`: the long-lived local Prefect server that `cnnflow run` uses (flows.local_server)."""

from __future__ import annotations

import json
from typing import Annotated, Literal, Optional

import typer

from ..local_server import DEFAULT_PORT, HOME_ENV, PORT_ENV, START_TIMEOUT_S, STOP_GRACE_S
from .errors import CliError, one_line_errors

server_app = typer.Typer(
    no_args_is_help=True,
    help="The local Prefect server (127.0.0.1) that `cnnflow run` starts once and reuses while PREFECT_API_URL "
         f"is unset. Its home: ${HOME_ENV}, else $XDG_CACHE_HOME (or ~/.cache)/cnncore/prefect-server.",
)


def _tell(text: str) -> None:
    typer.echo(text, err=True)


@server_app.command()
def start(
    port: Annotated[Optional[int], typer.Option(
        min=0, max=65535, help=f"Port on 127.0.0.1; 0 picks a free one. Default: ${PORT_ENV}, else {DEFAULT_PORT}; "
                               "a free port when that one is taken.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the server to answer.")] = START_TIMEOUT_S,
):
    """Start the local Prefect server in the background (or find it running) and print its API URL."""
    with one_line_errors():
        from ..local_server import ServerError, ensure_server

        try:
            state, started = ensure_server(port=port, timeout_s=timeout, say=_tell)
        except ServerError as exc:
            raise CliError(f"the local Prefect server did not start: {exc}") from exc
        _tell(f"{'started' if started else 'already running:'} the local Prefect server (pid {state.pid}); "
              f"its flow runs: {state.runs_url}; `cnnflow server stop` stops it")
        typer.echo(state.api_url)


@server_app.command()
def status(
    output: Annotated[Literal["text", "json"], typer.Option(help="text for people, json for scripts.")] = "text",
):
    """Say whether the local Prefect server runs, and where; exit code 1 when it does not answer."""
    with one_line_errors():
        from ..local_server import server_status

        found = server_status()
        if output == "json":
            typer.echo(json.dumps({
                "running": found.running, "answering": found.answering, "stale": found.stale,
                "pid": found.state.pid if found.state else None,
                "api_url": found.state.api_url if found.state else None,
                "runs_url": found.state.runs_url if found.state else None, "home": str(found.home)}, indent=2))
        else:
            typer.echo(found.describe())
        if not found.answering:
            raise typer.Exit(1)


@server_app.command()
def stop(
    grace: Annotated[float, typer.Option(help="Seconds between SIGTERM and SIGKILL.")] = STOP_GRACE_S,
):
    """Stop the local Prefect server (its whole process group) and remove its state; nothing to do is no error."""
    with one_line_errors():
        from ..local_server import stop_server

        found = stop_server(grace_s=grace)
        if found.running:
            typer.echo(f"stopped the local Prefect server (pid {found.state.pid})")
        elif found.stale:
            typer.echo(f"the local Prefect server was not running; removed the stale state naming pid "
                       f"{found.state.pid}, which is gone")
        else:
            typer.echo("the local Prefect server was not running")
