"""docker-compose.yml and the Dockerfile: the stack the issue asks for, validated by compose where it exists."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess

import pytest
import yaml

from .conftest import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
STACK = {"postgres", "prefect-server", "mlflow", "worker"}
# compose interpolates the whole file, so every command needs the password set.
WITH_PASSWORD = {**os.environ, "POSTGRES_PASSWORD": "only-for-config"}


def compose_command() -> list[str] | None:
    """`docker compose` (the v2 plugin) where it works, else `docker-compose`, else None."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.fixture(scope="module")
def compose() -> list[str]:
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed; "
                    "`apt-get install docker-compose` (no engine needed) runs this check")
    return command


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


@pytest.mark.parametrize("profile", [[], ["--profile", "dask"]], ids=["stack", "with-dask"])
def test_compose_config_validates(compose, profile):
    done = subprocess.run([*compose, "-f", str(COMPOSE_FILE), *profile, "config", "--quiet"],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=WITH_PASSWORD, timeout=120)
    assert done.returncode == 0, done.stderr


def test_compose_config_resolves_every_service(compose):
    done = subprocess.run([*compose, "-f", str(COMPOSE_FILE), "config", "--services"],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=WITH_PASSWORD, timeout=120)
    assert done.returncode == 0, done.stderr
    assert STACK <= set(done.stdout.split())


def test_compose_refuses_to_start_without_a_postgres_password_and_says_how_to_set_it(compose, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "POSTGRES_PASSWORD"}
    no_env_file = tmp_path / "empty.env"  # a developer's own .env beside the compose file would set it
    no_env_file.write_text("")
    done = subprocess.run([*compose, "--env-file", str(no_env_file), "-f", str(COMPOSE_FILE), "config", "--quiet"],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=120)
    assert done.returncode != 0
    assert "set POSTGRES_PASSWORD in the environment or in .env" in done.stderr


def test_the_postgres_password_has_no_default():
    uses = re.findall(r"\$\{POSTGRES_PASSWORD([^}]*)\}", COMPOSE_FILE.read_text())
    assert uses
    for use in uses:
        assert use.startswith(":?"), f"${{POSTGRES_PASSWORD{use}}} gives the password a default"


def test_no_database_url_or_command_line_carries_the_password(services):
    for name, service in services.items():
        command = " ".join(service.get("command", []))
        assert "POSTGRES_PASSWORD" not in command and "PGPASSWORD" not in command, name
        for key, value in service.get("environment", {}).items():
            # user:password@ in a URL; the servers read the password from PGPASSWORD instead.
            assert not re.search(r"://[^/@:]+:[^/@]+@", str(value)), f"{name}'s {key} holds a password"


def test_every_published_port_is_bound_to_loopback(services):
    published = [(name, port) for name, service in services.items() for port in service.get("ports", [])]
    assert published
    for name, port in published:
        assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond 127.0.0.1"
    assert "ports" not in services["postgres"]


def test_postgres_has_a_healthcheck_that_the_servers_wait_for(services):
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    for name in ("prefect-server", "mlflow"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_prefect_server_is_backed_by_postgres(services):
    url = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in url


def test_mlflow_server_uses_postgres_served_artifacts_on_a_volume_and_allowed_hosts(services):
    mlflow = services["mlflow"]
    command = " ".join(mlflow["command"])
    # The store URI comes from the environment (`mlflow server` reads MLFLOW_BACKEND_STORE_URI), out of `ps`.
    assert "--backend-store-uri" not in command
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert "--serve-artifacts" in command
    destination = re.search(r"--artifacts-destination=(\S+)", command).group(1)
    volume, _, mount = next(v for v in mlflow["volumes"] if v.endswith(destination)).partition(":")
    assert volume in yaml.safe_load(COMPOSE_FILE.read_text())["volumes"]  # a named volume, not a host path
    hosts = re.search(r"--allowed-hosts=(\S+)", command).group(1).split(",")
    assert {"mlflow:5000", "127.0.0.1:5000", "localhost:5000"} <= set(hosts)


def test_worker_is_built_from_the_project_and_points_at_both_servers(services):
    worker = services["worker"]
    assert worker["build"] == "."
    assert worker["command"][:3] == ["prefect", "worker", "start"]
    assert worker["command"][worker["command"].index("--pool") + 1] == _work_pool_in_prefect_yaml()
    environment = worker["environment"]
    assert environment["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert environment["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def _work_pool_in_prefect_yaml() -> str:
    declared = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    (pool,) = {d["work_pool"]["name"] for d in declared["deployments"]}
    return pool


def test_dockerfile_copies_only_what_the_dockerignore_lets_through():
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    ignored = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    sources = [part for line in dockerfile.splitlines() if line.startswith("COPY ")
               for part in line.split()[1:-1]]
    assert {"pyproject.toml", "cnncore", "flows", "prefect.yaml"} <= set(sources)
    for source in sources:
        assert (REPO_ROOT / source).exists(), source
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f"{source} is in .dockerignore"
    assert re.search(r'pip install "\.\[[^\]]*dask[^\]]*postgres[^\]]*\]"', dockerfile)
