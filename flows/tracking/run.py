"""Everything a flow logs to one MLflow run goes through ``Run``: values, artifacts, models, status."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .. import credentials, prefect_watch
from ..shutdown import interruption
from .patience import StoreFullError, TrackingUnavailableError, mark_down, patient, store_full
from .names import (FAILED, FINISHED, KILLED, MAX_TAG_CHARS, MLFLOW_DATASET_CONTEXT, MLFLOW_NOTE, RUNNING,
                    RunRecord, failure_reason, prefect_tags)

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

SERVING_CODE = Path(__file__).resolve().parents[1] / "serving.py"
TAG_FAILURE_REASON = "failure_reason"
TAG_MODEL_URI = "model_uri"
# MLflow's limit: a param value holds at most 6000 characters.
_MAX_PARAM_CHARS = 6000
_DATASET_LOCK = threading.Lock()


class RunStore(Protocol):
    """What a Run needs of the store it belongs to (``store.Store`` is the one implementation); a
    protocol, so that the store can make Runs without the two modules importing each other."""

    uri: str

    @property
    def client(self) -> MlflowClient: ...

    def create_run_in(self, experiment_id: str, name: str, *, parent_id: str | None,
                      params: dict[str, Any] | None, tags: dict[str, Any] | None) -> Run: ...

    def record(self, run_id: str) -> RunRecord: ...

    def run_url(self, experiment_id: str, run_id: str, artifact: str | None = None) -> str: ...

    def ui_command(self) -> str: ...


@dataclass(frozen=True)
class Run:
    """A handle bound to one run of a store: everything a flow logs to that run goes through it."""

    store: RunStore
    id: str
    experiment_id: str = field(compare=False)

    @property
    def _client(self) -> MlflowClient:
        return self.store.client

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.finish()
            return
        if isinstance(exc, TrackingUnavailableError) and not isinstance(exc, StoreFullError):
            mark_down(self.store.uri, str(exc))  # a worker's or another thread's finding: no second wait
        # The failure that ended the block is what to report; a store that cannot take the FAILED status
        # now leaves the run RUNNING, for a rerun to repair.
        with contextlib.suppress(TrackingUnavailableError):
            self.fail(exc)

    def child(self, name: str, *, params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None) -> Run:
        """A new RUNNING run in this run's experiment, nested under it."""
        return self.store.create_run_in(self.experiment_id, name, parent_id=self.id, params=params, tags=tags)

    def record(self) -> RunRecord:
        return self.store.record(self.id)

    # ------------------------------------------------------------ status

    @patient
    def finish(self) -> None:
        self._client.set_terminated(self.id, FINISHED)

    @patient
    def fail(self, exc: BaseException) -> None:
        """FAILED, or KILLED when the work was stopped (a signal; a reason whose stops_work is true, as a lost
        Prefect server's), with a failure_reason tag and the traceback.

        A run already FINISHED stays so: whoever trained it finished it, so its work is complete and logged, and
        what broke after (a stop that reached the trial worker on its way back) is no reason to redo it."""
        if self._client.get_run(self.id).info.status == FINISHED:
            return
        interrupted = interruption(exc)
        # Each write on its own: on a full disk the status may still fit where the reason and traceback do not.
        with _unless_full():
            self._client.set_tag(self.id, TAG_FAILURE_REASON, failure_reason(interrupted or exc))
        with _unless_full():
            self._client.log_text(self.id, credentials.mask("".join(traceback.format_exception(exc))),
                                  "failure/traceback.txt")
        stopped = interrupted is not None or getattr(exc, "stops_work", False)
        self._client.set_terminated(self.id, KILLED if stopped else FAILED)

    @patient
    def reopen(self) -> None:
        """Set the run back to RUNNING (resuming it), retag it with the current flow run, and drop the reason
        an earlier attempt failed (a finished run must not keep saying it failed)."""
        self._client.update_run(self.id, status=RUNNING)
        self.set_tags(prefect_tags())
        if TAG_FAILURE_REASON in self._client.get_run(self.id).data.tags:
            self._client.delete_tag(self.id, TAG_FAILURE_REASON)

    @patient
    def delete(self) -> None:
        self._client.delete_run(self.id)

    # ------------------------------------------------------------ values

    @patient
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # log_batch splits into MLflow's per-request limits itself.
        self._client.log_batch(self.id, params=[Param(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in params.items()])

    @patient
    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.id, tags=[RunTag(k, str(v)[:MAX_TAG_CHARS]) for k, v in tags.items()])

    def describe(self, markdown: str) -> None:
        """The run's description, MLflow's mlflow.note.content: the markdown its Overview shows first (folded
        after a few lines, with "Show more")."""
        self.set_tags({MLFLOW_NOTE: markdown})

    @patient
    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        self._client.log_batch(self.id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    @patient
    def log_metric_history(self, key: str, values: list[float], first_step: int = 0) -> None:
        """values[i] logged as `key` at step first_step + i, in one request (MLflow's client splits more
        than 1,000 values into requests of 1,000)."""
        from mlflow.entities import Metric

        now = _now_ms()
        self._client.log_batch(self.id, metrics=[Metric(key, float(v), now, first_step + i)
                                                 for i, v in enumerate(values)])

    # ------------------------------------------------------------ artifacts

    @patient
    def log_figure(self, figure, artifact_file: str) -> None:
        self._client.log_figure(self.id, figure, artifact_file)

    @patient
    def log_png(self, png: bytes, artifact_file: str) -> None:
        """PNG bytes already rendered (a figure shown elsewhere too) as the artifact artifact_file."""
        folder, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="cnncore-png-") as tmp:
            path = Path(tmp) / name
            path.write_bytes(png)
            self._client.log_artifact(self.id, str(path), folder or None)

    @patient
    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.id, text, artifact_file)

    @patient
    def log_table(self, table: pd.DataFrame, name: str) -> None:
        """The table as <name>.csv and as an MLflow table <name>.json, both replaced if present."""
        self._client.log_text(self.id, table.to_csv(index=False), f"{name}.csv")
        artifact = f"{name}.json"
        folder = str(Path(artifact).parent) if "/" in artifact else None
        if artifact in {f.path for f in self._client.list_artifacts(self.id, folder)}:
            # MlflowClient.log_table would append the rows to the old table (a resumed
            # sweep's summary): write the file in its format instead; it stays registered.
            self._client.log_text(self.id, table.to_json(orient="split", index=False, date_format="iso"), artifact)
        else:
            self._client.log_table(self.id, table, artifact)

    @patient
    def download(self, artifact_path: str, dest: str | Path) -> Path:
        """Copy an artifact (a file or a folder) of the run into dest; returns the local path."""
        with _quiet_downloads():
            return Path(self._client.download_artifacts(self.id, artifact_path, str(dest)))

    @patient
    def log_datasets(self, name: str, data: dict, source: str | None = None) -> None:
        """The train, val and test splits as the run's dataset inputs (name, shape, digest)."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        inputs = []
        for split, context in (("train", "training"), ("val", "validation"), ("test", "testing")):
            if f"X_{split}" not in data:
                continue
            dataset = mlflow.data.from_numpy(features=data[f"X_{split}"], targets=data[f"y_{split}"],
                                             name=f"{name}-{split}", source=source)
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
        # The store inserts a dataset on first use with check-then-insert: two writers logging
        # the same new dataset race on its unique key. Threads of this process take turns; a
        # writer in another process (a second sweep, a trial worker, a Dask worker) that loses
        # the race has its insert rolled back, and once more finds the dataset and only links it.
        from mlflow.exceptions import MlflowException

        with _DATASET_LOCK:
            try:
                self._client.log_inputs(self.id, datasets=inputs)
            except MlflowException:
                self._client.log_inputs(self.id, datasets=inputs)

    @patient
    def log_model(self, net, mean: np.ndarray, images: np.ndarray) -> str:
        """Log the net as an MLflow pyfunc model (and its .npz under checkpoint/); returns the model URI.

        The model is "models from code" (flows/serving.py, nothing pickled): it
        takes raw float images (N, C, H, W), subtracts the training mean and
        returns the predicted labels (N,) as int64. images: a few raw images,
        the input example and the source of the signature.
        """
        import mlflow
        from mlflow.models import Model, ModelSignature, infer_signature

        import cnncore

        example = np.asarray(images, dtype=np.float64)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = net.save(Path(tmp) / "model.npz")
            mean_file = Path(tmp) / "mean.npy"
            np.save(mean_file, np.asarray(mean, dtype=np.float64), allow_pickle=False)
            labels = net.predict(example - mean.reshape(1, -1, 1, 1))
            logged = self._client.create_logged_model(self.experiment_id, name="model", source_run_id=self.id)
            info = Model.log(
                artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=self.id, model_id=logged.model_id,
                python_model=str(SERVING_CODE),
                artifacts={"checkpoint": str(checkpoint), "mean": str(mean_file)},
                code_paths=[str(Path(cnncore.__file__).parent)],
                # Outputs only: an input schema admits one dtype, and the model takes float32 and float64.
                signature=ModelSignature(outputs=infer_signature(example, labels).outputs),
                input_example=example,
                pip_requirements=[f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}"],
            )
            self._client.log_artifact(self.id, str(checkpoint), "checkpoint")
        self.set_tags({TAG_MODEL_URI: info.model_uri})
        return info.model_uri

    @contextlib.contextmanager
    def system_metrics(self, enabled: bool = True, interval_s: float = 10.0) -> Iterator[None]:
        """While the block runs, MLflow samples this machine's CPU, memory and disk into the run's
        system/ metrics every interval_s seconds (when enabled)."""
        if not enabled:
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.id, sampling_interval=interval_s, tracking_uri=self.store.uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    # ------------------------------------------------------------ links

    @property
    def url(self) -> str:
        return self.store.run_url(self.experiment_id, self.id)

    def url_of(self, artifact: str) -> str:
        """The run's page in the MLflow UI, opened on one of its artifacts."""
        return self.store.run_url(self.experiment_id, self.id, artifact)

    def link_flow_run(self, name: str) -> None:
        """A Prefect link artifact on the current flow run pointing at this MLflow run (named name)."""
        from prefect.artifacts import create_link_artifact
        from prefect.runtime import flow_run

        prefect_watch.optional(  # a lost Prefect server must not fail a run MLflow records
            create_link_artifact,
            link=self.url,
            link_text=f"MLflow run {name}",
            key=f"mlflow-{flow_run.flow_name or 'run'}".lower().replace("_", "-"),
            description=f"MLflow run `{self.id}` in the store `{credentials.mask(self.store.uri)}`; "
                        f"open the UI with `{self.store.ui_command()}`.",
        )


@contextlib.contextmanager
def _unless_full() -> Iterator[None]:
    """Skip a write that a full store refuses (the next one may still fit)."""
    try:
        yield
    except Exception as exc:
        if store_full(exc) is None:
            raise


@contextlib.contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No progress bar: MLflow draws one per download, which buries a command's own output."""
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous


def _now_ms() -> int:
    return int(time.time() * 1000)
