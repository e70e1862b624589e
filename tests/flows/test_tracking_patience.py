"""The bounded wait for a tracking server that stops answering (no server needed: failures are made up)."""

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
    monkeypatch.setattr(patience, "_down", set())
    monkeypatch.setattr(patience, "_FIRST_DELAY_S", 0.05)


def test_a_blip_shorter_than_the_wait_is_ridden_out(monkeypatch):
    monkeypatch.setenv(patience.WAIT_ENV, "5")
    flaky = Flaky(3, REFUSED)
    assert flaky.call() == "answered" and flaky.calls == 4


def test_past_the_wait_the_call_fails_and_later_calls_fail_at_once(monkeypatch):
    monkeypatch.setenv(patience.WAIT_ENV, "0.5")
    started = time.monotonic()
    with pytest.raises(patience.TrackingUnavailableError, match=r"stopped answering \(waited 0.5 s"):
        Flaky(1000, REFUSED).call()
    assert 0.3 < time.monotonic() - started < 3
    again = Flaky(1000, REFUSED)
    started = time.monotonic()
    with pytest.raises(patience.TrackingUnavailableError):
        again.call()
    assert again.calls == 1 and time.monotonic() - started < 0.2  # marked down: one try, no waiting
    back = Flaky(0, REFUSED)
    assert back.call() == "answered"
    assert Flaky.uri not in patience._down  # a call that got through marks the store up again


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
