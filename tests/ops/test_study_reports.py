"""The committed study reports are what the code produces, as far as a machine can tell another's numbers.

`make studies SIZE=-small` wrote docs/studies/<sweep>-small/, trials.csv included. A
training trajectory depends on the BLAS kernel OpenBLAS picks for the CPU (changing
only OPENBLAS_CORETYPE moves single trials by points), so two checks:

- on one machine, a study reproduces itself exactly: the same small preset run twice,
  in two fresh stores, gives the same trials to the last bit (trials train in worker
  processes with one BLAS thread each);
- across machines, statistically: each committed small preset is run afresh with a
  kernel other than this CPU's own (OPENBLAS_CORETYPE, as a machine that picks another
  would), and each cell of the committed trials (arm x g, the study's measure) must
  agree with the fresh run's: the two means differ by no more than the 95% interval of
  a difference of two means over seeds (Welch's t, from both runs' spreads), or by
  AGREE_POINTS when that interval is narrower (two seeds that err on the same images
  have no spread to measure). With two seeds a cell's interval is wide: this catches a
  change that moves the numbers far (a broken layer, a wrong measure), not a small one,
  which only the full presets' intervals can show.

A change that moves the numbers on purpose regenerates the reports it affects in the same
commit (`make studies SIZE=-small`, and `make studies` for the full ones).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from cnncore.mnist import MNIST_DIRNAME
from flows.browser import Chromium, chromium_binary
from flows.provenance import blas
from flows.study.presets import preset_spec
from flows.study.statistics import cell_estimates
from flows.study.trials import arms, design_of

from .conftest import CNNFLOW

pytestmark = pytest.mark.slow

STUDIES = Path(__file__).resolve().parents[2] / "docs" / "studies"
KEYS = ["normalization", "batch_size", "norm_batch", "seed"]
MEASURES = ["test_error", "final_test_error", "best_val_test_error", "precise_test_error"]
# Points of error two runs' cell means may differ by even where neither run has a spread to measure:
# 5 of the small presets' 500 MNIST test images (digits: 1.7 of its 300).
AGREE_POINTS = 1.0
# The small presets whose reports are committed, as `make studies SIZE=-small` writes them: (preset, sweep name).
COMMITTED = [(name.replace("bn-vs-gn-digits", "bn-vs-gn"), name)
             for name in sorted(p.parent.name for p in STUDIES.glob("*-small/trials.csv"))]


def mnist_available() -> bool:
    folder = Path(os.environ.get("CNNCORE_DATA_DIR", "~/.cache/cnncore")).expanduser() / MNIST_DIRNAME
    return any(folder.glob("t10k-images-idx3-ubyte*"))


def other_kernel() -> str | None:
    """An OpenBLAS kernel other than the one this CPU gets (every x86-64 with AVX runs SandyBridge's), or None
    where NumPy's BLAS is not OpenBLAS on x86."""
    here = blas()
    if not here.startswith("openblas") or os.uname().machine not in ("x86_64", "AMD64"):
        return None
    return "Haswell" if "kernel Sandybridge" in here else "SandyBridge"


def run_small_preset(preset: str, name: str, tmp_path: Path, env: dict, **extra_env) -> pd.DataFrame:
    """The preset run in a fresh store and exported; returns its trials.csv and leaves its report in tmp_path/name
    (name: a folder; the sweep keeps the preset's own name, which `cnnflow report` asks for)."""
    store = tmp_path / f"mlflow-{len(list(tmp_path.glob('mlflow-*')))}.db"
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{store}", "CNNCORE_DATA_DIR": os.environ.get("CNNCORE_DATA_DIR", ""),
           **extra_env}
    done = subprocess.run([str(CNNFLOW), "run", "sweep", "--preset", preset, "--experiment", "studies"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / name
    exported = subprocess.run([str(CNNFLOW), "report", preset_spec(preset).name, "--to", str(folder)], env=env,
                              capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0, exported.stderr[-3000:]
    return pd.read_csv(folder / "trials.csv").sort_values(KEYS, ignore_index=True)


def cells(trials: pd.DataFrame, preset: str) -> dict[tuple, object]:
    """{(arm, g): Estimate} of the study's measure, as the report computes them."""
    long = arms(trials, design_of(preset_spec(preset)))
    return {(c.normalization, c.norm_batch): c.estimate for c in cell_estimates(long)}


def test_a_small_preset_reproduces_itself_exactly_on_one_machine(tmp_path, ops_env, prefect_server):
    if not mnist_available():
        pytest.skip("the MNIST files are not where $CNNCORE_DATA_DIR points (CI sets it; see the README)")
    env = {**ops_env, "PREFECT_API_URL": prefect_server}
    first = run_small_preset("normbatch-convnet3-small", "first", tmp_path, env)
    second = run_small_preset("normbatch-convnet3-small", "second", tmp_path, env)
    pd.testing.assert_frame_equal(first[KEYS + MEASURES], second[KEYS + MEASURES], check_exact=True,
                                  obj="normbatch-convnet3-small: two runs on this machine")
    assert len(first) == 6 and first["precise_test_error"].notna().sum() == 4


@pytest.mark.parametrize("preset, name", COMMITTED)
def test_a_committed_small_preset_agrees_with_a_fresh_run_on_another_kernel(tmp_path, ops_env, prefect_server,
                                                                            preset, name):
    if preset != "bn-vs-gn-small" and not mnist_available():
        pytest.skip("the MNIST files are not where $CNNCORE_DATA_DIR points (CI sets it; see the README)")
    kernel = other_kernel()
    env = {**ops_env, "PREFECT_API_URL": prefect_server}
    fresh = run_small_preset(preset, name, tmp_path, env, **({"OPENBLAS_CORETYPE": kernel} if kernel else {}))
    if kernel:  # the fresh trials trained on the kernel asked for, and the report says so
        report = (tmp_path / name / "report.md").read_text()
        (trained,) = re.findall(r"^- trials trained with BLAS: `(.*)`$", report, re.M)
        assert f"kernel {kernel.replace('SandyBridge', 'Sandybridge')}," in trained
    committed = pd.read_csv(STUDIES / name / "trials.csv")
    assert sorted(map(tuple, fresh[["normalization", "batch_size", "seed"]].values.tolist())) == \
        sorted(map(tuple, committed[["normalization", "batch_size", "seed"]].values.tolist()))
    now, then = cells(fresh, preset), cells(committed, preset)
    assert now.keys() == then.keys()
    for key, a in now.items():
        b = then[key]
        spread = math.sqrt(a.sd ** 2 / a.n + b.sd ** 2 / b.n)
        df = max(a.n + b.n - 2, 1)
        allowed = max(stats.t.ppf(0.975, df) * spread, AGREE_POINTS)
        assert abs(a.mean - b.mean) <= allowed, (
            f"{name} {key}: committed mean {b.mean:.2f} (n={b.n}, sd {b.sd:.2f}) against {a.mean:.2f} now "
            f"(n={a.n}, sd {a.sd:.2f}, kernel {kernel or 'this CPU'}): more than the {allowed:.2f} points two runs "
            f"may differ by")


@pytest.mark.skipif(chromium_binary() is None,
                    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
def test_mlflows_artifact_view_shows_the_study_report_with_its_figures(tmp_path, ops_env, prefect_server, mlflow_server):
    """What a user opens in MLflow: the parent run's study/report.html, rendered by MLflow's own artifact view
    (a sandboxed iframe of its own), in a fresh browser profile: the answer first, and every figure loaded."""
    env = {**ops_env, "PREFECT_API_URL": prefect_server, "MLFLOW_TRACKING_URI": mlflow_server}
    done = subprocess.run([str(CNNFLOW), "run", "sweep", "--preset", "bn-vs-gn-small", "--name", "html-view",
                           "--experiment", "studies"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (link,) = re.findall(r"http://127\.0\.0\.1:\d+/#/experiments/\d+/runs/\w+", done.stdout)
    url = f"{link}/artifactPath/study/report.html?workflowType=machine_learning"
    with Chromium(1400, 1000) as browser:
        browser.load(url, "document.querySelector('iframe.mlflow-html-iframe')", timeout_s=180)
        frames = [t for t in browser.send("Target.getTargets")["targetInfos"] if t["type"] == "iframe"]
        assert frames, "MLflow showed no frame for report.html"
        session = browser.send("Target.attachToTarget", targetId=frames[0]["targetId"], flatten=True)["sessionId"]

        def inside(expression: str):
            return browser.send("Runtime.evaluate", session, expression=expression, returnByValue=True,
                                awaitPromise=True)["result"].get("value")

        deadline = time.monotonic() + 60
        while not inside("document.images.length > 0 && Array.from(document.images).every(i => i.complete)"):
            assert time.monotonic() < deadline, "the report's figures did not load"
            time.sleep(0.5)
        images = inside("Array.from(document.images).map(i => [i.naturalWidth, i.naturalHeight, i.alt])")
        headings = inside("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
    assert len(images) == 2 and all(w > 500 and h > 300 for w, h, _ in images)
    assert headings[0].startswith("The answer") and headings.index("Provenance") > headings.index("Design")
