"""The committed study reports are what the code produces now: the small presets, rerun, give the same trials.

`make studies SIZE=-small` wrote docs/studies/<sweep>-small/, trials.csv included. A
change that alters the numbers (a rounding change in a kernel, say) fails here and
must regenerate the reports it affects in the same commit (`make studies`, and
`make studies SIZE=-small`). Runs are deterministic on one machine: trials train in
worker processes with one BLAS thread each.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from cnncore.mnist import MNIST_DIRNAME

from .conftest import CNNFLOW

pytestmark = pytest.mark.slow

STUDIES = Path(__file__).resolve().parents[2] / "docs" / "studies"
KEYS = ["normalization", "batch_size", "seed"]


def mnist_available() -> bool:
    folder = Path(os.environ.get("CNNCORE_DATA_DIR", "~/.cache/cnncore")).expanduser() / MNIST_DIRNAME
    return any(folder.glob("t10k-images-idx3-ubyte*"))


@pytest.mark.parametrize("preset, name", [("bn-vs-gn-small", "bn-vs-gn-digits-small"),
                                          ("mnist-fc-control-small", "mnist-fc-control-small"),
                                          ("mnist-convnet-small", "mnist-convnet-small")])
def test_a_small_preset_reproduces_its_committed_trials(tmp_path, ops_env, prefect_server, preset, name):
    if preset.startswith("mnist") and not mnist_available():
        pytest.skip("the MNIST files are not where $CNNCORE_DATA_DIR points (CI sets it; see the README)")
    env = {**ops_env, "PREFECT_API_URL": prefect_server, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "CNNCORE_DATA_DIR": os.environ.get("CNNCORE_DATA_DIR", "")}
    done = subprocess.run([str(CNNFLOW), "run", "sweep", "--preset", preset, "--experiment", "studies"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    exported = subprocess.run([str(CNNFLOW), "report", name, "--to", str(tmp_path / name)], env=env,
                              capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0, exported.stderr[-3000:]

    now = pd.read_csv(tmp_path / name / "trials.csv").sort_values(KEYS, ignore_index=True)
    committed = pd.read_csv(STUDIES / name / "trials.csv").sort_values(KEYS, ignore_index=True)
    columns = [*KEYS, "test_error", "best_val_test_error"]
    pd.testing.assert_frame_equal(now[columns], committed[columns], check_exact=True,
                                  obj=f"{name}: trials now (left) against docs/studies/{name}/trials.csv (right)")
