"""The lines a person running a flow must see (progress, summaries), said through one logger.

    from flows.progress import say
    say(f"trial 3/8: val acc 0.912")

``say(text)`` logs text at INFO on the ``cnncore.progress`` logger. The ``cnnflow``
console shows these records plainly (no time, no level) while it hides Prefect's own
INFO lines unless ``--verbose``. Inside a Prefect flow or task run the line also goes
to that run's logs in the Prefect API (the UI shows it under the run), without a second
copy on the console. Outside ``cnnflow`` it is an ordinary log record: shown wherever
logging shows INFO records (Prefect's logging configuration does, on stderr).
``record(text, level)`` puts a line in the current run's logs only, for the UI: what the
console already says another way.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Callable, Iterator

PROGRESS_LOGGER = "cnncore.progress"

logger = logging.getLogger(PROGRESS_LOGGER)
# Set by the first line said: until then a command may say that it is still starting (flows.cli.run).
said_a_line = threading.Event()
# Held while a line is said and while the "starting" notice checks said_a_line and prints: the notice
# comes before the first line or not at all, never after an error that ended the command.
_first_line = threading.RLock()
# The root logger's WARNING level (Prefect's configuration, and Python's default) would drop these
# INFO records before any handler saw them.
logger.setLevel(logging.INFO)


def say(text: str) -> None:
    """Log text at INFO on the cnncore.progress logger; inside a Prefect run, also in that run's logs."""
    with saying():
        logger.info(text)
    record(text)


@contextlib.contextmanager
def saying() -> Iterator[None]:
    """Around a line that counts as the command's first word (a progress line, an error): see said_a_line."""
    with _first_line:
        said_a_line.set()
        yield


def unless_said(print_line: Callable[[], None]) -> None:
    """print_line(), unless a line was said: the "still starting" notice, which must not follow one."""
    with _first_line:
        if not said_a_line.is_set():
            print_line()


def record(text: str, level: int = logging.INFO) -> None:
    """Hand text to the handlers of the current Prefect run's logger (the API's, which the UI shows), not to
    its ancestors (the console): for what the console has already, or says in another way (a failed trial's
    progress line). Nothing outside a Prefect run."""
    if "prefect.context" not in sys.modules:  # Prefect not even imported: no run to log to
        return
    from prefect.context import FlowRunContext, TaskRunContext

    if TaskRunContext.get() is None and FlowRunContext.get() is None:
        return
    from prefect.logging import get_run_logger

    run_logger = get_run_logger()
    if not run_logger.isEnabledFor(level):
        return
    message, kwargs = run_logger.process(text, {})
    made = run_logger.logger.makeRecord(run_logger.logger.name, level, __file__, 0, message, (), None,
                                        extra=kwargs.get("extra"))
    for handler in run_logger.logger.handlers:
        if made.levelno >= handler.level:
            handler.handle(made)
