"""The harness's pieces (tests/harness.py), each on its own; tests/ops/test_harness.py signals a whole test run."""

import os
import re
import signal
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

import harness


@pytest.mark.parametrize("text, named", [
    ("/tmp/pytest-of-me/pytest-12", True),
    ("/tmp/pytest-of-me/pytest-12/test_x0/mlflow.db", True),
    ("sqlite:////tmp/pytest-of-me/pytest-12/m.db", True),
    ("--basetemp=/tmp/pytest-of-me/pytest-12", True),
    ("/tmp/pytest-of-me/pytest-123/test_x0", False),  # another run's folder, which must be left alone
    ("/tmp/pytest-of-me/pytest-12.old", False),
    ("/tmp/pytest-of-me/pytest-1", False),
])
def test_a_folder_is_named_by_itself_and_the_paths_below_it_only(text, named):
    assert harness.names_folder([text], "/tmp/pytest-of-me/pytest-12") is named


@pytest.mark.parametrize("load, limit", [(0.5, 60.0), (2.0, 60.0), (8.0, 240.0), (16.0, 480.0), (100.0, 900.0)])
def test_the_start_up_limit_grows_with_the_load_per_core(monkeypatch, load, limit):
    monkeypatch.delenv(harness.START_ENV, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert harness.startup_limit_s(60) == limit


def test_the_start_up_limit_is_the_environments_when_set(monkeypatch):
    monkeypatch.setenv(harness.START_ENV, "42")
    assert harness.startup_limit_s(60) == 42.0


@pytest.fixture
def restored_signal_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_termination_signal_interrupts_once_and_a_second_does_not_cut_the_teardown_short(
        restored_signal_handlers, sig):
    harness.stop_on_termination_signals()
    with pytest.raises(KeyboardInterrupt, match=f"stopped by {signal.Signals(sig).name}"):
        os.kill(os.getpid(), sig)
        time.sleep(5)  # not reached: the handler raises as soon as the signal arrives
    os.kill(os.getpid(), signal.SIGTERM)  # ignored now: this test goes on


def test_a_seeded_prefect_home_holds_a_migrated_database_in_one_file(tmp_path):
    """What seed_prefect_home copies: a sqlite database at Prefect's newest migration with its block types
    registered, nothing of it left in a write-ahead log, and the memo that says the blocks are registered."""
    import prefect

    home = harness.seed_prefect_home(tmp_path / "home")
    assert sorted(p.name for p in home.iterdir()) == sorted(harness.PREFECT_HOME_FILES)
    with closing(sqlite3.connect(home / "prefect.db")) as db:
        (version,), = db.execute("SELECT version_num FROM alembic_version").fetchall()
        block_types = db.execute("SELECT count(*) FROM block_type").fetchone()[0]
    migrations = Path(prefect.__file__).parent / "server" / "database" / "_migrations" / "versions" / "sqlite"
    revises = {m.group(1) for f in migrations.glob("*.py")
               for m in [re.search(r'^down_revision = "(\w+)"', f.read_text(), re.M)] if m}
    assert any(migrations.glob(f"*_{version}_*.py")) and version not in revises  # the newest migration
    assert block_types > 0
    assert "block_auto_registration" in (home / "memo_store.toml").read_text()
