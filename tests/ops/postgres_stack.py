"""The compose stack run natively: a throwaway Postgres cluster, and the compose file's settings for the servers.

No container engine runs here or in CI, so tests/ops/test_postgres_stack.py runs
what docker-compose.yml runs as local processes on free 127.0.0.1 ports: the
servers' commands and environments are read from the compose file, with the
compose network's names (postgres:5432, mlflow:5000, /mlartifacts) replaced by
local ones, so a change to the compose settings is a change to what is tested.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from .conftest import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
INIT_SQL = REPO_ROOT / "docker" / "postgres-init.sql"
# How the compose network names the database server, and the variable that holds its password.
COMPOSE_DATABASE_ADDRESS = "@postgres:5432/"
PASSWORD_VARIABLE = re.compile(r"\$\{POSTGRES_PASSWORD[^}]*\}")
# pg_ctl's own bounded waits: a cluster this small starts and stops in well under a second.
PG_CTL_WAIT_S = 60


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here, or no way to run them as the postgres user."""


def postgres_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin with initdb and pg_ctl (Debian's layout)."""
    found = [d for d in Path("/usr/lib/postgresql").glob("*/bin")
             if (d / "initdb").exists() and (d / "pg_ctl").exists()]
    if not found:
        raise PostgresUnavailable("no initdb and pg_ctl under /usr/lib/postgresql/*/bin "
                                  "(`apt-get install postgresql` installs them; .ci/run does)")
    return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)


def as_postgres_user() -> list[str]:
    """The prefix that runs a command as the `postgres` user: initdb and postgres refuse root."""
    try:
        postgres = pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable("there is no `postgres` user (Debian's postgresql package makes it)") from None
    if os.geteuid() == postgres.pw_uid:
        return []
    if os.geteuid() == 0 and shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--"]
    raise PostgresUnavailable("a cluster must be made and run as the `postgres` user: "
                              "run the tests as root (runuser) or as postgres")


@dataclass(frozen=True)
class Cluster:
    """A running cluster: the compose stack's user and databases, on 127.0.0.1:port."""

    port: int
    user: str
    password: str
    bin_dir: Path

    @property
    def address(self) -> str:
        return f"@127.0.0.1:{self.port}/"

    def client_env(self, env: dict[str, str]) -> dict[str, str]:
        """env plus the password where libpq (psql, psycopg2) and asyncpg look for it."""
        return {**env, "PGPASSWORD": self.password}

    def query(self, database: str, sql: str) -> list[str]:
        """The rows of a one-column query, as text."""
        return self.psql(database, "-tA", "-c", sql).splitlines()

    def psql(self, database: str, *args: str) -> str:
        done = subprocess.run([str(self.bin_dir / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                               "-p", str(self.port), "-U", self.user, "-d", database, *args],
                              capture_output=True, text=True, env=self.client_env(dict(os.environ)), timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"psql {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout


def _compose_services() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def _run_checked(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=PG_CTL_WAIT_S * 2)
    if done.returncode != 0:
        raise PostgresUnavailable(f"{what} failed ({done.returncode}): {(done.stdout + done.stderr).strip()[-2000:]}")


@contextlib.contextmanager
def postgres_cluster(port: int) -> Iterator[Cluster]:
    """A new cluster in a temporary folder owned by postgres, on 127.0.0.1:port with password auth only.

    Made as docker-compose.yml's postgres service makes its own: the superuser and
    the first database are POSTGRES_USER and POSTGRES_DB, then docker/postgres-init.sql
    runs. Stopped and its folder removed on exit, whatever happened; no
    system-wide cluster or configuration is touched.
    """
    bin_dir, prefix = postgres_bin_dir(), as_postgres_user()
    settings = _compose_services()["postgres"]["environment"]
    cluster = Cluster(port=port, user=settings["POSTGRES_USER"], password=secrets.token_urlsafe(24), bin_dir=bin_dir)
    # /tmp, not pytest's tmp_path: the postgres user cannot enter root's 0700 pytest folders.
    root = Path(tempfile.mkdtemp(prefix="cnncore-postgres-"))
    data = root / "data"
    pg_ctl = [*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-t", str(PG_CTL_WAIT_S)]
    try:
        shutil.chown(root, "postgres", "postgres")
        password_file = root / "password"
        password_file.write_text(cluster.password)
        password_file.chmod(0o600)
        shutil.chown(password_file, "postgres", "postgres")
        _run_checked([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", cluster.user,
                      f"--pwfile={password_file}", "--auth=scram-sha-256", "-E", "UTF8", "--no-instructions"],
                     "initdb")
        password_file.unlink()
        with open(data / "postgresql.conf", "a") as conf:
            # Loopback only, its own port and socket folder; durability is worth nothing to a throwaway cluster.
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{root}'\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        (data / "pg_hba.conf").write_text(f"host all {cluster.user} 127.0.0.1/32 scram-sha-256\n")
        _run_checked([*pg_ctl, "-l", str(root / "server.log"), "start"], "pg_ctl start")
        try:
            cluster.psql("postgres", "-c", f'CREATE DATABASE "{settings["POSTGRES_DB"]}"')
            cluster.psql(settings["POSTGRES_DB"], "-f", str(INIT_SQL))
            yield cluster
        finally:
            stop = subprocess.run([*pg_ctl, "-m", "fast", "stop"], capture_output=True, timeout=PG_CTL_WAIT_S * 2)
            if stop.returncode != 0:  # clients that would not let go: stop without waiting for them
                subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True, timeout=PG_CTL_WAIT_S * 2)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _local_environment(service: dict, cluster: Cluster) -> dict[str, str]:
    """A compose service's environment for the local cluster: database URLs re-addressed, the password filled in."""
    return {key: PASSWORD_VARIABLE.sub(cluster.password, str(value)).replace(COMPOSE_DATABASE_ADDRESS, cluster.address)
            for key, value in service.get("environment", {}).items()}


def _options(command: list[str]) -> dict[str, str | None]:
    """{--flag: value} of a compose command's `--flag=value` and bare `--flag` items."""
    return dict((item.split("=", 1) + [None])[:2] for item in command if item.startswith("--"))


def mlflow_server(cluster: Cluster, port: int, artifacts: Path) -> tuple[list[str], dict[str, str]]:
    """(command, environment additions) of compose's mlflow service, on 127.0.0.1:port with a local artifacts folder.

    Every option is compose's except where the compose network differs: the
    address, the artifacts volume, and the Host headers that name the server.
    """
    service = _compose_services()["mlflow"]
    options = _options(service["command"])
    options.update({"--host": "127.0.0.1", "--port": str(port), "--artifacts-destination": str(artifacts),
                    "--allowed-hosts": f"127.0.0.1:{port},localhost:{port}"})
    command = [sys.executable, "-m", *[item for item in service["command"] if not item.startswith("--")]]
    command += [flag if value is None else f"{flag}={value}" for flag, value in options.items()]
    return command, _local_environment(service, cluster)


def prefect_server(cluster: Cluster, port: int) -> tuple[list[str], dict[str, str]]:
    """(command, environment additions) of compose's prefect-server service, on 127.0.0.1:port."""
    service = _compose_services()["prefect-server"]
    command = list(service["command"])
    command[command.index("--host") + 1] = "127.0.0.1"
    command[command.index("--port") + 1] = str(port)
    env = _local_environment(service, cluster)
    env.pop("PREFECT_UI_API_URL", None)  # the UI is not under test
    return [sys.executable, "-m", *command], env


def prefect_worker(name: str) -> list[str]:
    """Compose's worker command, under the given worker name."""
    command = list(_compose_services()["worker"]["command"])
    command[command.index("--name") + 1] = name
    return [sys.executable, "-m", *command]


def deployments_file_for_this_checkout(folder: Path) -> Path:
    """prefect.yaml with its pull step pointed at this checkout instead of the image's /app."""
    declared = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    (step,) = declared["pull"]
    step["prefect.deployments.steps.set_working_directory"]["directory"] = str(REPO_ROOT)
    path = folder / "prefect.yaml"
    path.write_text(yaml.safe_dump(declared, sort_keys=False))
    return path
