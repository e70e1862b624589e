"""The lines a user must see while a flow runs: progress and summaries, one plain line each.

``say(text)`` logs the line on the ``cnncore.progress`` logger at INFO; inside a
Prefect run it also goes to the run's logger, so the Prefect UI shows it beside
the run. The `cnnflow` command shows these lines plainly in the terminal and keeps
Prefect's own INFO chatter for --verbose.
"""

from __future__ import annotations

import logging

LOGGER = logging.getLogger("cnncore.progress")


def say(text: str) -> None:
    LOGGER.info(text)
    try:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging import get_run_logger

        if FlowRunContext.get() or TaskRunContext.get():
            get_run_logger().info(text)
    except ImportError:  # pragma: no cover - prefect comes with the project
        pass
