"""The Docker image's dependencies: pinned by docker/constraints.txt, and that pinned set installs and works.

No container engine runs here or in CI, so the slow test replays the
Dockerfile's COPY and pip steps in a fresh venv instead of building the image.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
CONSTRAINTS = REPO_ROOT / "docker" / "constraints.txt"
CONSTRAINT_OPTION = "-c docker/constraints.txt"
IMAGE_EXTRAS = ("dask", "postgres")
# What the image's services import: the flows and the CLI, the servers, the Dask runner, both Postgres drivers.
IMAGE_IMPORTS = ("import cnncore, flows.cli, flows.train, flows.sweep, mlflow.server, prefect, prefect_dask, "
                 "psycopg2, asyncpg")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each Dockerfile instruction, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", dockerfile.read_text())
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            found.append((keyword.upper(), " ".join(arguments.split())))
    return found


def pins() -> dict[str, str]:
    """{canonical name: version} of docker/constraints.txt."""
    pinned = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pinned[canonicalize_name(name)] = version.strip()
    return pinned


def declared_for_the_image() -> list[Requirement]:
    """The project's dependencies and those of the extras the image installs."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for extra in IMAGE_EXTRAS for r in project["optional-dependencies"][extra]]
    return [Requirement(r) for r in project["dependencies"] + extras]


def pip_installs(dockerfile: Path) -> list[str]:
    """Every `pip install ...` command of the Dockerfile's RUN instructions."""
    return [command.strip() for keyword, arguments in instructions(dockerfile) if keyword == "RUN"
            for command in arguments.split("&&") if command.strip().startswith("pip install")]


def test_every_constraint_is_an_exact_pin():
    lines = [line for line in CONSTRAINTS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert lines
    for line in lines:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!-]+", line), line
    assert "cnncore" not in pins()  # the project is installed from the build context, not from the index


def test_every_declared_dependency_is_pinned_at_a_version_it_allows():
    pinned = pins()
    for requirement in declared_for_the_image():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement} is not pinned in {CONSTRAINTS.name}"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"{name}=={pinned[name]} does not satisfy the declared {requirement}")


def test_the_dockerfile_resolves_every_dependency_under_the_constraints():
    steps = instructions(DOCKERFILE)
    copied = [i for i, (keyword, arguments) in enumerate(steps)
              if keyword == "COPY" and "docker/constraints.txt" in arguments]
    resolving = [i for i, (keyword, arguments) in enumerate(steps) if keyword == "RUN" and "pip install" in arguments
                 and "--no-deps" not in arguments]
    assert copied and resolving and copied[0] < resolving[0]
    for command in pip_installs(DOCKERFILE):
        assert "--no-deps" in command or CONSTRAINT_OPTION in command, command
    assert any(f'".[{",".join(IMAGE_EXTRAS)}]"' in command for command in pip_installs(DOCKERFILE))


def copy_into(context: Path, *arguments: str) -> None:
    """COPY's semantics: a folder's contents into the destination; files into it when it ends in / (else onto it)."""
    *sources, destination = arguments
    target = context / destination
    for source in map(REPO_ROOT.joinpath, sources):
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif destination.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / source.name)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def replay_the_dockerfile(context: Path, venv: Path) -> None:
    """The Dockerfile's COPY and pip steps, with WORKDIR as context and the venv's pip as pip.

    Other RUN steps (creating the image's user) are not replayed; nor are its ENV
    values, which change how pip caches, not what it installs.
    """
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)  # only what the venv holds
    for keyword, arguments in instructions(DOCKERFILE):
        if keyword == "COPY":
            copy_into(context, *shlex.split(arguments))
        elif keyword == "RUN" and "pip " in arguments:
            done = subprocess.run(["bash", "-c", f"set -e; {arguments}"], cwd=context, env=env, capture_output=True,
                                  text=True, timeout=900)
            assert done.returncode == 0, f"RUN {arguments}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.mark.slow
def test_the_pinned_set_installs_as_the_dockerfile_does_imports_and_passes_pip_check(tmp_path):
    venv, context = tmp_path / "venv", tmp_path / "app"
    # --upgrade-deps: the image's pip is newer than the one some Python 3.11 releases bundle.
    subprocess.run([sys.executable, "-m", "venv", "--upgrade-deps", str(venv)], check=True, capture_output=True,
                   timeout=300)
    replay_the_dockerfile(context, venv)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True, env=env, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    freeze = subprocess.run([python, "-m", "pip", "freeze", "--exclude", "cnncore"], capture_output=True, text=True,
                            env=env, check=True, timeout=300).stdout
    installed = {canonicalize_name(name): version for name, _, version in
                 (line.partition("==") for line in freeze.splitlines() if "==" in line)}
    assert installed == pins()  # every package installed is pinned, at its pinned version
    imported = subprocess.run([python, "-c", IMAGE_IMPORTS], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=300)
    assert imported.returncode == 0, imported.stderr[-3000:]
    cli = subprocess.run([str(venv / "bin" / "cnnflow"), "--help"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
