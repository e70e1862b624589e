"""What `cnnflow` shows in the terminal: the lines a person needs, not the libraries' chatter.

By default (no --verbose):
- the environment of this process, set before MLflow is imported, turns off MLflow's
  artifact progress bars and its INFO lines (`quiet_environment`);
- Prefect's console shows WARNING and above, and the flows' progress lines
  (flows.progress.say, the ``cnncore.progress`` logger) plainly, without time or level
  (`configure_prefect_console`). Prefect's INFO lines ("Task run 'fit model' - Finished
  in state Completed()") still reach the Prefect API, so the UI has them all.
With --verbose everything is shown, the progress lines still plainly.

Telemetry is off either way (flows.TELEMETRY_OFF, set when the package is imported; a
value set by the user wins): this machine may well be offline, where MLflow and Prefect
log errors trying to send it.
"""

from __future__ import annotations

import logging
import os
import sys

from ..progress import PROGRESS_LOGGER

QUIET = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_LOGGING_LEVEL": "WARNING",
         # MLflow prints two links ("View run ... at", "View experiment at") for every run it ends.
         "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def quiet_environment(verbose: bool) -> None:
    """Settings read by MLflow (and Prefect's in-process server) at import: call before either is imported."""
    for key, value in ({} if verbose else QUIET).items():
        os.environ.setdefault(key, value)


def _is_progress(record: logging.LogRecord) -> bool:
    return record.name == PROGRESS_LOGGER or record.name.startswith(PROGRESS_LOGGER + ".")


# The flow and task engines' own accounts of a run that failed or was stopped, each with a timestamp and the
# exception's repr: the CLI says the same once, as its error (or a trial's progress line does).
_ENGINE_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
_ENGINE_FAILURE = ("Encountered exception during execution", "Crash detected!", "Finished in state Failed",
                   "Finished in state Crashed", "Task run failed with")


class ConsoleFilter(logging.Filter):
    """Lets through the progress lines, and Prefect's other records at WARNING and above except the flow and
    task engines' reports of the failure that the CLI's error gives (everything when verbose)."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose or _is_progress(record):
            return True
        return record.levelno >= logging.WARNING and not (
            record.name in _ENGINE_LOGGERS and record.getMessage().startswith(_ENGINE_FAILURE))


class ConsoleFormatter(logging.Formatter):
    """Wraps a console handler's formatter: progress lines as their bare text, and (unless tracebacks)
    other records without their traceback (the CLI says a failure in one line; the API keeps it whole)."""

    def __init__(self, inner: logging.Formatter, tracebacks: bool):
        super().__init__()
        self.inner = inner
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        if _is_progress(record):
            return record.getMessage()
        if self.tracebacks:
            return self.inner.format(record)
        plain = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None, "stack_info": None})
        return self.inner.format(plain)


def configure_prefect_console(verbose: bool, tracebacks: bool) -> None:
    """Filter and format every Prefect console handler as above (Prefect configures logging on import)."""
    import prefect.logging.configuration  # noqa: F401  (Prefect configures logging on import)
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in (logging.getLogger(), *(logging.getLogger(n) for n in logging.root.manager.loggerDict)):
        for handler in getattr(logger, "handlers", []):
            if not isinstance(handler, PrefectConsoleHandler):
                continue
            for old in [f for f in handler.filters if isinstance(f, ConsoleFilter)]:
                handler.removeFilter(old)
            handler.addFilter(ConsoleFilter(verbose))
            inner = handler.formatter.inner if isinstance(handler.formatter, ConsoleFormatter) else handler.formatter
            handler.setFormatter(ConsoleFormatter(inner or logging.Formatter(), tracebacks))


def silence_after_the_last_word(verbose: bool) -> None:
    """Once the command has printed its answer or its error, nothing more on the console (unless verbose):
    Prefect's exit handlers, still sending queued events and logs, warn when that takes a while ("EventsWorker
    - Still processing items"), after the line that should be last. Their records still reach the API."""
    if verbose or "prefect.logging.handlers" not in sys.modules:
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in (logging.getLogger(), *(logging.getLogger(n) for n in logging.root.manager.loggerDict)):
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                handler.setLevel(logging.CRITICAL + 1)
