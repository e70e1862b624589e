"""The load-data flow, and the memo that loads each dataset once per process.

Every flow gets its images through ``load_data_once(spec)``: the first call with
a DataSpec loads and preprocesses the data (cnncore.data.load_dataset), later
calls with an equal spec return the same arrays, made read-only so no trial can
change what the next one sees. The memo keeps the last few specs, so a
pipeline's load-data, sweep and train steps load the digits once.

    python -m flows.load_data               # digits, every image
    cnnflow run load-data --num-train 500
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import NonNegativeInt, PositiveInt

from cnncore import data as datasets

from .config import DatasetName, DataSpec, FloatDType
from .tracking import Run, tracked_flow_run

MEMO_SIZE = 2  # a CIFAR-10 float64 copy is 1.4 GB: keep only the recent ones

_memo: OrderedDict[DataSpec, dict] = OrderedDict()
_memo_lock = threading.Lock()


def load_data_once(spec: DataSpec) -> dict:
    """The Solver's data dict for spec, loaded on the first call and remembered.

    Concurrent callers wait for one load rather than each doing it.
    """
    with _memo_lock:
        if spec in _memo:
            _memo.move_to_end(spec)
            return _memo[spec]
        data = datasets.load_dataset(spec.dataset, num_train=spec.num_train, num_val=spec.num_val,
                                     num_test=spec.num_test, dtype=spec.dtype, seed=spec.data_seed)
        for value in data.values():
            if isinstance(value, np.ndarray):
                value.setflags(write=False)
        _memo[spec] = data
        while len(_memo) > MEMO_SIZE:
            _memo.popitem(last=False)
        return data


def clear_data_memo() -> None:
    with _memo_lock:
        _memo.clear()


def dataset_source(spec: DataSpec) -> str | None:
    """Where the dataset comes from, for MLflow's dataset record (None: the digits bundled with scikit-learn)."""
    return {"cifar10": datasets.CIFAR10_URL, "mnist": datasets.MNIST_MIRRORS[0]}.get(spec.dataset)


def _may_pass_on_retry(task, task_run, state) -> bool:
    """Whether a failed load is worth another try: a failed transfer or read (an OSError) may pass; the
    loader's verdicts do not change in 5 s: files not found after every mirror was tried
    (DatasetUnavailableError, whose message says how to place them), a bad file, a bad argument."""
    try:
        state.result()
    except (datasets.DatasetUnavailableError, ValueError):
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False


@task(name="load dataset", task_run_name="load {spec.dataset}", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=_may_pass_on_retry)
def load_dataset(spec: DataSpec) -> dict:
    return load_data_once(spec)


@task(name="log dataset", cache_policy=NO_CACHE)
def log_dataset(run: Run, spec: DataSpec, data: dict, sizes: bool = True) -> None:
    """The splits as the run's dataset inputs, and (when sizes) their sizes as metrics."""
    run.log_datasets(spec.dataset, data, source=dataset_source(spec))
    if sizes:
        counts = {f"num_{split}": len(data[f"y_{split}"]) for split in ("train", "val", "test")}
        run.log_metrics({**counts, "num_classes": len(data["class_names"])})


@flow(name="load-data", log_prints=True)
def load_data(
    dataset: DatasetName = "digits",
    num_train: PositiveInt | None = None,
    num_val: PositiveInt | None = None,
    num_test: PositiveInt | None = None,
    dtype: FloatDType = "float32",
    data_seed: NonNegativeInt = 0,
    experiment: str = "cnncore-data",
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
) -> dict:
    """Load a dataset into the Solver's data dict and record it in MLflow.

    Returns X_train, y_train, X_val, y_val, X_test, y_test, class_names and mean
    (see cnncore.data.load_dataset).

    Args:
        dataset: Dataset to load.
        num_train: Training images to use (a seeded subset); all when unset.
        num_val: Validation images to use (a seeded subset); the loader's split when unset.
        num_test: Test images to use (a seeded subset); all when unset.
        dtype: Floating-point type of the images.
        data_seed: Seed of the train/val/test split and subsets.
        experiment: MLflow experiment to log to.
        tracking_uri: MLflow tracking URI; else $MLFLOW_TRACKING_URI, else the project's sqlite store.
        parent_run_id: MLflow run to nest this run under.
    """
    spec = DataSpec(dataset=dataset, num_train=num_train, num_val=num_val, num_test=num_test, dtype=dtype,
                    data_seed=data_seed)
    with tracked_flow_run(experiment, f"load-data-{dataset}", tracking_uri=tracking_uri,
                          parent_run_id=parent_run_id, params=spec.model_dump()) as run:
        data = load_dataset(spec)
        log_dataset(run, spec, data)
    shapes = ", ".join(f"{k} {data[k].shape}" for k in ("X_train", "X_val", "X_test"))
    print(f"Loaded {dataset}: {shapes}, {len(data['class_names'])} classes")
    return data


if __name__ == "__main__":
    load_data()  # the defaults; `cnnflow run load-data --help` lists every option
