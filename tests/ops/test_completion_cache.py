"""TAB completion of a flow's options without importing the flow: from a cache of its options, rebuilt when
the package's sources change."""

from __future__ import annotations

import json
import subprocess
import sys

from flows.cli import completion_cache

from .conftest import CNNFLOW

# The completion request a shell sends for `cnnflow run sweep --norm<TAB>`, as typer's bash script does.
NORM_TAB = {"_CNNFLOW_COMPLETE": "complete_bash", "COMP_WORDS": "cnnflow run sweep --norm", "COMP_CWORD": "3"}
# `cnnflow` itself, in a process where importing Prefect (and so any flow) fails.
WITHOUT_PREFECT = "import sys; sys.modules['prefect'] = None; from flows.cli import app; app(prog_name='cnnflow')"


def test_a_second_tab_completes_the_flows_options_without_importing_the_flow(tmp_path, ops_env):
    env = {**ops_env, "XDG_CACHE_HOME": str(tmp_path), **NORM_TAB}
    assert not completion_cache.cache_file().is_relative_to(tmp_path)  # this process's own cache is not touched
    first = subprocess.run([str(CNNFLOW)], capture_output=True, text=True, env=env, timeout=120)
    assert first.stdout.split() == ["--normalization", "--norm-batch"]
    cached = json.loads((tmp_path / "cnncore" / "completion.json").read_text())
    assert cached["key"] == completion_cache.sources_key() and "sweep" in cached["flows"]

    second = subprocess.run([sys.executable, "-c", WITHOUT_PREFECT], capture_output=True, text=True, env=env,
                            timeout=60)
    assert second.stdout.split() == ["--normalization", "--norm-batch"], second.stderr[-2000:]
    values = subprocess.run([sys.executable, "-c", WITHOUT_PREFECT], capture_output=True, text=True, timeout=60,
                            env={**env, "COMP_WORDS": "cnnflow run sweep --normalization g", "COMP_CWORD": "4"})
    assert values.stdout.split() == ["groupnorm"]


def test_a_stale_or_broken_cache_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = completion_cache.cache_file()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"key": "from-other-sources", "flows": {"sweep": []}}))
    assert completion_cache.cached_command("sweep") is None
    path.write_text("{not json")
    assert completion_cache.cached_command("sweep") is None
