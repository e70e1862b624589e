"""Where a result came from: the commit, the package versions, the command, the user.

Every MLflow run carries these as tags (MLflow's own source tags, which its UI
shows), and every study report and figure states them, so that a number can be
traced to the code and the command that produced it.
"""

from __future__ import annotations

import functools
import getpass
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from .credentials import mask

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cnncore", "numpy", "mlflow", "prefect")
GIT_COMMIT_TAG = "mlflow.source.git.commit"
BLAS_TAG = "blas"  # a training run's BLAS (blas()): what its trajectory depends on


@functools.cache
def git_commit() -> str:
    """The checkout's commit (short hash), with "-dirty" when tracked files differ from it; "unknown" outside git.

    The exported study reports (docs/studies) do not count: they are what the code
    produces, and `make studies` rewrites one after another.
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs/studies")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


@functools.cache
def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def command() -> str:
    """The command line this process was started with, as a shell would take it (the program by its name),
    with any URI's password masked (it is recorded in tags and reports)."""
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else ["python"]
    return mask(shlex.join(argv))


def user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def blas() -> str:
    """The BLAS NumPy computes with in this process, as threadpoolctl sees it: library and version, the kernel
    it picked for this CPU (OpenBLAS's architecture, which OPENBLAS_CORETYPE overrides) and its threads now,
    e.g. "openblas 0.3.31 (libscipy_openblas64_), kernel Haswell, 1 thread".

    Training trajectories follow the kernel: an exact replay holds only where this line is the same.
    """
    import numpy  # loads the BLAS threadpoolctl reports
    from threadpoolctl import threadpool_info

    found = [info for info in threadpool_info() if info.get("user_api") == "blas"]
    # SciPy may load a BLAS of its own beside NumPy's: the one NumPy ships is the one its arrays use.
    own = [info for info in found if Path(info.get("filepath", "")).parent.name == f"{numpy.__name__}.libs"]
    found = own or found
    if not found:
        return "unknown"
    return "; ".join(f"{info.get('internal_api', '?')} {info.get('version') or '?'} ({info.get('prefix', '?')}), "
                     f"kernel {info.get('architecture') or 'unknown'}, {info.get('num_threads', '?')} "
                     f"thread{'s' * (info.get('num_threads') != 1)}" for info in found)


def provenance(command_line: str | None = None) -> dict[str, str]:
    """commit, versions (one line), BLAS, command and date (UTC), for a report's header or a figure's footer."""
    return {"commit": git_commit(),
            "versions": ", ".join(f"{name} {version}" for name, version in versions().items()),
            "blas": blas(),
            "command": command_line or command(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def run_tags() -> dict[str, str]:
    """MLflow's source tags for a run of this process: its commit, its command as the source, its user."""
    return {GIT_COMMIT_TAG: git_commit(), "mlflow.source.name": command(),
            "mlflow.source.type": "LOCAL", "mlflow.user": user()}
