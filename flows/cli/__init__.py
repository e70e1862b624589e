"""`cnnflow`: run, schedule and inspect the project's Prefect flows from a shell.

    cnnflow run train --normalization groupnorm --batch-size 8
    cnnflow run sweep --space normalization=batchnorm,groupnorm --space batch_size=8,32
    cnnflow serve            # the deployments of prefect.yaml, on their schedules
    cnnflow ui               # the MLflow UI on the project's store, at 127.0.0.1
    cnnflow runs             # recent MLflow runs: params and accuracies
    cnnflow server status    # the local Prefect server `cnnflow run` uses (start, stop, status)

- ``app``: the top level (--debug, --verbose) and the commands that are not flows (ui, serve, runs, report);
- ``run``: `cnnflow run FLOW`, a command per flow, imported only when used;
- ``server``: `cnnflow server start|stop|status` (flows.local_server);
- ``console``: what the terminal shows: quiet by default, everything with --verbose;
- ``options``: the options generated from a flow's typed parameters, and their values parsed back;
- ``errors``: one-line errors and exit codes (2: parameters refused, 1: a failed run);
- ``report``: `cnnflow report`, a study's report read back from MLflow and exported;
- ``runs_table``: the `cnnflow runs` table;
- ``completion``: `--show-completion`/`--install-completion` with the shell named or detected;
- ``completion_cache``: TAB completion of a flow's options from a cache, without importing the flow.

The answer a run ends with is the flows' own (flows.answers); the console script is
flows.cnnflow, which hands the shell its prompt back as soon as the command is done.
"""

from .app import app

__all__ = ["app"]
