"""Stores a user cannot write, and names they should not have to escape: a read-only store is read by `cnnflow
runs` and `cnnflow report` (no lock file made first) and refused by `cnnflow run` in one line before any server
starts; a report name with a quote, and a params file that is not UTF-8, are refused with exit 2 naming them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess

import pytest

from flows.tracking import connect

from .conftest import CNNFLOW

REPORT_LINE = "The one line this study's report is known by."


@contextlib.contextmanager
def read_only(folder):
    """folder made read-only for this process: a read-only bind mount as root (where permissions are no
    barrier), the write bits taken off otherwise."""
    if os.geteuid() == 0:
        if not shutil.which("mount"):
            pytest.skip("as root, a read-only store needs `mount --bind -o ro`, and there is no mount here")
        source = folder.with_name(folder.name + "-source")
        folder.rename(source)
        folder.mkdir()
        done = subprocess.run(["mount", "--bind", "-o", "ro", str(source), str(folder)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            folder.rmdir()
            source.rename(folder)
            pytest.skip(f"cannot make a read-only bind mount here: {done.stderr.strip()}")
        try:
            yield
        finally:
            subprocess.run(["umount", str(folder)], check=True)
    else:
        paths = [folder, *folder.rglob("*")]
        modes = {p: p.stat().st_mode for p in paths}
        for p in paths:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p in reversed(paths):
                p.chmod(modes[p])


@pytest.fixture
def store(tmp_path):
    """A sqlite store (folder tmp_path/mlruns) holding a finished run and a study sweep's parent with its report."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    made = connect(uri)
    with made.start_run("faults", "a-run") as run:
        run.log_metrics({"test_acc": 0.5})
    with made.start_run("faults", "ro-study", tags={"sweep_name": "ro-study", "sweep_role": "parent"}) as parent:
        parent.log_text(f"# A study\n\n{REPORT_LINE}\n", "study/report.md")
    (tmp_path / "mlruns" / "mlflow.db.init.lock").unlink()
    return uri, tmp_path / "mlruns"


def cnnflow(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(CNNFLOW), *args], env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture
def env(ops_env, tmp_path) -> dict:
    return {**ops_env, "CNNCORE_SERVER_HOME": str(tmp_path / "server"), "COLUMNS": "200"}


def test_a_read_only_store_is_read_by_runs_and_report_and_refused_by_run(store, env, tmp_path):
    uri, folder = store
    with read_only(folder):
        listed = cnnflow(env, "runs", "--tracking-uri", uri, "--output", "json")
        assert listed.returncode == 0, listed.stderr
        assert {"a-run", "ro-study"} <= {row["run"] for row in json.loads(listed.stdout)}
        reported = cnnflow(env, "report", "ro-study", "--tracking-uri", uri)
        assert reported.returncode == 0, reported.stderr
        assert REPORT_LINE in reported.stdout
        assert not (folder / "mlflow.db.init.lock").exists()

        refused = cnnflow(env, "run", "train", "--tracking-uri", uri)
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines() == [
            f"error: the MLflow store {uri} is read-only here (its database file cannot be written): runs cannot be "
            "logged to it; `cnnflow runs` and `cnnflow report` can read it. Nothing was logged."]
        assert not (tmp_path / "server").exists()  # said before any Prefect server was started


@pytest.mark.parametrize("name", ["x'y", 'a"b', "../etc", ""])
def test_a_report_name_that_no_sweep_can_have_is_refused_naming_it(env, tmp_path, name):
    done = cnnflow(env, "report", name, "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {name!r} is not a sweep name (letters, digits, '_', '.' and '-', starting with a letter or a digit); "
        "`cnnflow runs` lists the runs and their sweeps"]
    assert not (tmp_path / "m.db").exists()  # refused before the store was opened


def test_a_tag_value_with_a_quote_is_matched_exactly_by_the_stores_search(tmp_path):
    made = connect(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = made.experiment_id("faults")
    for value in ("x'y", 'x"y', "x"):
        made.create_run_in(experiment, value, parent_id=None, params=None, tags={"label": value}).finish()
    for value in ("x'y", 'x"y', "x"):
        assert [r.name for r in made.find_runs(experiment, {"label": value})] == [value]
    with pytest.raises(ValueError, match="holds both quote characters"):
        made.find_runs(experiment, {"label": "x'\"y"})


def test_a_params_file_that_is_not_utf8_is_refused_naming_it(env, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_bytes(b"config:\n  num_epochs: \xff\xfe 2\n")
    done = cnnflow(env, "run", "train", "--params", str(params))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {params} is not UTF-8 text (byte 22 is 0xff): a YAML or JSON file of the flow's parameters was "
        "expected"]
