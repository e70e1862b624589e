"""One-line errors: every failure of a cnnflow command is one message on stderr (one line, or the lines
the error itself is written in) and an exit code.

Exit code 2 for parameters refused before any work, 1 for a run that failed;
`cnnflow --debug ...` lets the traceback through instead.
"""

from __future__ import annotations

import contextlib
import re
import typing
from collections.abc import Iterator

import typer


class CliError(Exception):
    """A failure to report as one line, with an exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class Settings:
    """Process-wide switches set by the top-level options."""

    debug = False
    verbose = False


def fail(message: str, exit_code: int = 1) -> typing.NoReturn:
    """`error: MESSAGE` on stderr, then exit. A message of several lines (a list of URLs tried, say) keeps
    them, each with its indentation; spaces within a line are collapsed. Any store password is masked:
    the last line of defence, so that no error shows one."""
    from ..credentials import mask

    lines = [line.rstrip() for line in mask(str(message)).strip().splitlines() if line.strip()] or [""]
    text = "\n".join(line[:len(line) - len(line.lstrip())] + " ".join(line.split()) for line in lines)
    from ..progress import saying

    with saying():  # no "starting" notice after it (flows.cli.run)
        typer.echo(f"error: {text}", err=True)
    from .console import silence_after_the_last_word

    silence_after_the_last_word(Settings.verbose)  # what still unwinds (Prefect draining its events) prints nothing after it
    raise typer.Exit(exit_code)


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP unwind the command (runs marked KILLED, servers and workers stopped),
    then exit with 128 + the signal's number and one line saying so."""
    import signal

    from ..shutdown import Interrupted, termination_as_interrupt

    try:
        with termination_as_interrupt():
            yield
    except Interrupted as exc:
        fail(f"{exc}: unfinished MLflow runs were marked KILLED; running the same command again resumes "
             "a sweep", 128 + signal.Signals[exc.signal_name].value)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn any exception into `error: ...` on stderr and a non-zero exit (unless --debug)."""
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:
        if Settings.debug:
            raise
        if isinstance(exc, CliError):
            fail(str(exc), exc.exit_code)
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            fail(describe_validation_error(exc), 2)
        if isinstance(exc, ValueError) or type(exc).__module__.startswith(("flows.", "cnncore.")):
            # The project's own errors say what went wrong and what to do; some say how bad.
            fail(str(exc), getattr(exc, "exit_code", 1))
        fail(f"{type(exc).__name__}: {exc}", 1)


# Boilerplate in a nested pydantic error's text: its count line, [type=...] and docs link.
_PYDANTIC_NOISE = re.compile(r"\d+ validation errors? for \w+\s*|\s*\[type=[^\]]*\]|\s*For further information visit \S+|Value error, ")


def describe_validation_error(exc, options: list | None = None,
                              root: tuple[str, ...] = ()) -> str:
    """One line for a pydantic ValidationError: each problem as `--flag: message (got value)`
    (options: the FlowOptions that name the flags)."""
    flags = {o.path: o.flag for o in options or []}
    problems = []
    for error in exc.errors():
        loc = (*root, *(str(part) for part in error["loc"]))
        # A model-level error (loc is just the parameter) names no field.
        where = flags.get(loc) or ".".join(loc[1:])
        message = _PYDANTIC_NOISE.sub("", error["msg"].removeprefix("Value error, "))
        got = "" if error["type"] in ("value_error", "missing") else f" (got {error.get('input')!r})"
        problems.append(f"{where}: {message}{got}" if where else f"{message}{got}")
    return "invalid parameters: " + "; ".join(problems)
