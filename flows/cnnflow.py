"""The `cnnflow` console script: the CLI (flows.cli), and the shell's prompt back as soon as it is done.

A finished command's interpreter would spend 1-2 s on an idle machine (5 s and more
under load) tearing down the thousands of modules a flow imports (Prefect, MLflow,
pandas, scikit-learn) before the shell gets its prompt back: a silence after the
answer. So the process leaves with os._exit once every exit handler has run: Python
joins the remaining non-daemon threads, then runs the atexit handlers, last registered
first; this module registers its own before anything else is imported, so it runs
last, after Prefect has sent its last logs and events, logging has flushed its
handlers and multiprocessing has joined its children. Only the teardown is skipped. And once
the command has said its last word, Prefect's exit handlers say nothing more on the console.
"""

import atexit
import os
import sys

_status = 0


def _leave() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone (`cnnflow runs | head -1`), or the stream closed
            pass
    os._exit(_status)


def main() -> None:
    global _status
    atexit.register(_leave)
    from flows.cli import app

    try:
        app()
    except SystemExit as exc:  # always, from typer: the status Python would exit with
        _status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        raise
    except KeyboardInterrupt:
        _status = 130
        raise
    except BaseException:
        _status = 1
        raise
    finally:
        from flows.cli.console import silence_after_the_last_word
        from flows.cli.errors import Settings

        silence_after_the_last_word(Settings.verbose)


if __name__ == "__main__":
    main()
