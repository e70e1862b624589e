"""The bounded wait for a tracking server that stops answering (no server needed: failures are made up)."""

import threading
import time

import pytest

from flows.tracking import patience


class Flaky:
    """A store-like object whose call fails with a connection error the first `failures` times."""

    uri = "http://127.0.0.1:1"

    def __init__(self, failures: int, error: Exception):
        self.failures, self.error, self.calls = failures, error, 0

    @patience.patient
    def call(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "answered"


REFUSED = Exception("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/create failed with exception "
                    "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded")


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.setattr(patience, "_down", {})
    monkeypatch.setattr(patience, "_FIRST_DELAY_S", 0.05)


def test_a_blip_shorter_than_the_wait_is_ridden_out(monkeypatch):
    monkeypatch.setenv(patience.WAIT_ENV, "5")
    flaky = Flaky(3, REFUSED)
    assert flaky.call() == "answered" and flaky.calls == 4


def test_past_the_wait_the_call_fails_and_later_calls_fail_at_once(monkeypatch):
    monkeypatch.setenv(patience.WAIT_ENV, "0.5")
    started = time.monotonic()
    with pytest.raises(patience.TrackingUnavailableError, match=r"stopped answering \(waited 0.5 s") as first:
        Flaky(1000, REFUSED).call()
    assert 0.3 < time.monotonic() - started < 3
    again = Flaky(1000, REFUSED)
    started = time.monotonic()
    with pytest.raises(patience.TrackingUnavailableError) as second:
        again.call()
    # Marked down: no request at all (a hung server would cost a request timeout each), the same one line.
    assert again.calls == 0 and time.monotonic() - started < 0.2 and str(second.value) == str(first.value)
    monkeypatch.setattr(patience, "RECHECK_DOWN_S", 0.0)  # later on, a call tries once more
    back = Flaky(0, REFUSED)
    assert back.call() == "answered" and back.calls == 1
    assert Flaky.uri not in patience._down  # a call that got through marks the store up again
    monkeypatch.setattr(patience, "RECHECK_DOWN_S", 30.0)
    assert Flaky(0, REFUSED).call() == "answered"


def test_a_call_waiting_for_the_server_stops_when_another_finds_it_down(monkeypatch):
    monkeypatch.setenv(patience.WAIT_ENV, "60")
    waiting = Flaky(10**6, REFUSED)
    outcome = {}

    def wait_in_a_thread():
        started = time.monotonic()
        try:
            waiting.call()
        except patience.TrackingUnavailableError as exc:
            outcome["error"], outcome["waited"] = str(exc), time.monotonic() - started

    thread = threading.Thread(target=wait_in_a_thread)
    thread.start()
    time.sleep(0.5)
    patience.mark_down(Flaky.uri, "the MLflow tracking server at http://127.0.0.1:1 stopped answering (a trial said so)")
    thread.join(5)
    assert not thread.is_alive() and outcome["waited"] < 2  # not the 60 s its own wait allowed
    assert outcome["error"].startswith("the MLflow tracking server at http://127.0.0.1:1 stopped answering")


def test_a_refused_request_is_not_retried():
    refused = Flaky(1, ValueError("RESOURCE_DOES_NOT_EXIST: run 'x' not found"))
    with pytest.raises(ValueError, match="not found"):
        refused.call()
    assert refused.calls == 1


@pytest.mark.parametrize("text", ["-1", "soon", "nan"])
def test_a_bad_wait_setting_is_named(monkeypatch, text):
    monkeypatch.setenv(patience.WAIT_ENV, text)
    with pytest.raises(ValueError, match="CNNCORE_TRACKING_WAIT_S must be a number of seconds >= 0"):
        patience.wait_s()


class FullDisk(Flaky):
    def __init__(self, uri: str, error: Exception):
        super().__init__(1, error)
        self.uri = uri


def sqlite_full() -> Exception:
    """What SQLAlchemy raises on a full disk: the sqlite3 error as its cause, under MLflow's own."""
    import sqlite3

    try:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as exc:
            raise RuntimeError("(sqlite3.OperationalError) database or disk is full [SQL: ...]") from exc
    except RuntimeError as outer:
        try:
            raise Exception("MlflowException: failed to update the run") from outer
        except Exception as top:
            return top


def test_a_full_store_is_said_at_once_in_one_line_and_its_reserve_given_back(tmp_path, monkeypatch):
    monkeypatch.setenv(patience.WAIT_ENV, "30")
    db = tmp_path / "mlflow.db"
    patience.keep_reserve(db)
    reserve = patience.reserve_path(db)
    assert reserve.stat().st_size == patience.RESERVE_BYTES and reserve.stat().st_mode & 0o777 == 0o600
    full = FullDisk(f"sqlite:///{db}", sqlite_full())
    started = time.monotonic()
    with pytest.raises(patience.StoreFullError) as raised:
        full.call()
    assert time.monotonic() - started < 1 and full.calls == 1  # not waited for: waiting frees no space
    message = str(raised.value)
    assert message.startswith(f"the MLflow store sqlite:///{db} is full: database or disk is full (") and \
        "free of " in message and "\n" not in message
    assert not reserve.exists()
    assert patience._down == {}  # the store answers: later calls (the FAILED marks) are still made


def test_a_full_store_is_recognised_by_errno_and_its_password_masked():
    import errno

    disk = OSError(errno.ENOSPC, "No space left on device", "/data/mlflow.db-journal")
    assert patience.store_full(disk) == "No space left on device (/data/mlflow.db-journal)"
    assert patience.store_full(OSError(errno.EACCES, "Permission denied")) is None
    assert patience.store_full(ValueError("could not convert")) is None
    error = patience.full_store_error("postgresql+psycopg2://me:s3cret@db:5432/mlflow",
                                      "could not extend file: No space left on device")
    assert "s3cret" not in str(error) and "postgresql+psycopg2://me:***@db:5432/mlflow is full" in str(error)


def test_no_reserve_where_the_disk_has_no_room_for_it(tmp_path, monkeypatch):
    import errno

    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(patience.os, "posix_fallocate", no_room)
    patience.keep_reserve(tmp_path / "mlflow.db")
    assert not patience.reserve_path(tmp_path / "mlflow.db").exists()
