"""The one door to MLflow: every write and every read of runs goes through this package.

    store = tracking.connect(tracking_uri)             # checks that the store answers first
    with store.start_run("cnncore-sweeps", "bn-vs-gn", params=...) as parent:
        with parent.child("bn-vs-gn/00 batchnorm", params=config.model_dump()) as run:
            run.log_metrics({"test_acc": 0.97})
    records = store.find_runs(parent.experiment_id, {"sweep_role": "trial"})   # list[RunRecord]

- ``store``: where runs go (``connect``, the URI rules), and ``Store``, one MLflow
  store named by its URI (cheap, picklable: a trial worker process rebuilds its own
  client from the URI), whose reads return ``RunRecord``s, plain data.
- ``run``: ``Run``, a handle bound to one run id; it logs, finishes, fails and opens
  child runs. As a context manager it ends the run FINISHED, or FAILED (KILLED on
  an interrupt) with the reason when the body raises. To change what or how runs
  log, this is the file.
- ``names``: the run statuses and tags both share, and ``RunRecord``.
- ``views``: saved views of an experiment's runs page (one sweep's trials, grouped and
  charted), which MLflow's UI opens from a link.
- ``patience``: how long a call waits for a tracking server that stopped answering
  (``CNNCORE_TRACKING_WAIT_S``), and ``TrackingUnavailableError`` after that.

Everything goes through an explicit ``MlflowClient`` and run ids, never MLflow's
active-run stack, so task threads log to the runs they are handed (the stack is
thread-local). Code that holds a value in memory uses it, rather than reading a
parameter back as a string. Nothing outside this package imports mlflow, except
flows/serving.py, the served model's own code file.
"""

from . import liveness
from .patience import StoreFullError, TrackingUnavailableError
from .names import FAILED, FINISHED, KILLED, RUNNING, RunRecord, failure_reason
from .run import TAG_FAILURE_REASON, TAG_MODEL_URI, Run
from .store import (DEFAULT_STORE, DEFAULT_UI_URL, REPO_ROOT, Store, artifact_root, connect, default_tracking_uri,
                    import_client, is_database, is_server, require_writable, resolve_tracking_uri, sqlite_path,
                    tracked_flow_run)
from .views import BarChart, LineChart, in_page, save_children_view

__all__ = ["BarChart", "DEFAULT_STORE", "DEFAULT_UI_URL", "FAILED", "FINISHED", "KILLED", "LineChart", "REPO_ROOT",
           "RUNNING", "Run", "RunRecord", "Store", "StoreFullError", "TAG_FAILURE_REASON", "TAG_MODEL_URI",
           "TrackingUnavailableError", "artifact_root", "connect", "default_tracking_uri", "failure_reason",
           "import_client", "in_page", "is_database", "is_server", "liveness", "require_writable",
           "resolve_tracking_uri", "sqlite_path", "tracked_flow_run"]
