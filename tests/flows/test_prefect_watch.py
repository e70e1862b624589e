"""flows.prefect_watch: a Prefect server that stops answering is declared lost after the stated wait, the flows
told; Prefect calls a flow can do without are skipped, not waited for; a sweep whose trials all finished before the
loss still writes its summary and ends FINISHED."""

from __future__ import annotations

import http.server
import pickle
import threading
import time

import httpx
import pytest

from flows import prefect_watch
from flows.config import SweepSpec
from flows.prefect_watch import PrefectServerLostError
from flows.shutdown import StopRequest
from flows.sweep import flow as sweep_flow
from flows.sweep import sweep


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the standard library's name)
        self.send_response(200 if self.path.endswith("/health") else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_api():
    """A server answering GET /api/health, and a function that stops it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()

    yield f"http://127.0.0.1:{server.server_address[1]}/api", stop
    prefect_watch.reset()


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(prefect_watch, "POLL_S", 0.1)
    monkeypatch.setenv(prefect_watch.WAIT_ENV, "0.5")
    yield
    prefect_watch.reset()


def test_a_server_that_stops_answering_is_declared_lost_after_the_wait_and_the_flows_are_told(fake_api):
    api, stop_server = fake_api
    told = []
    with prefect_watch.watching(api, "the local Prefect server"), prefect_watch.on_lost(told.append):
        time.sleep(0.4)
        assert prefect_watch.lost() is None and told == []  # it answers: nothing happens
        stop_server()
        gone = time.monotonic()
        while not told and time.monotonic() - gone < 5:
            time.sleep(0.05)
    assert 0.4 < time.monotonic() - gone < 3
    (loss,) = told
    assert loss is prefect_watch.lost()
    assert str(loss).startswith(f"the local Prefect server at {api} stopped answering at ")
    assert "(no answer for 0.5 s, $CNNCORE_PREFECT_WAIT_S): the flow stopped there" in str(loss)
    assert str(loss).endswith("`cnnflow server start` starts it again")
    assert "the flow finished, and MLflow holds all it logged" in str(loss.after_the_flow_finished())


def test_a_loss_travels_through_a_stop_request_intact(fake_api):
    loss = PrefectServerLostError("the Prefect server", "http://h/api", 0.0, 30.0)
    assert str(pickle.loads(pickle.dumps(loss))) == str(loss)
    stop = StopRequest()
    stop.set(loss)
    with pytest.raises(PrefectServerLostError) as caught:
        stop.check()
    assert str(caught.value) == str(loss) and caught.value.stops_work


def test_a_registration_after_the_loss_is_told_at_once(fake_api):
    api, stop_server = fake_api
    stop_server()
    with prefect_watch.watching(api):
        while prefect_watch.lost() is None:
            time.sleep(0.05)
        told = []
        with prefect_watch.on_lost(told.append):
            assert told == [prefect_watch.lost()]


def test_the_chain_tells_a_stop_by_the_loss_from_the_engine_failing_to_reach_the_server():
    loss = PrefectServerLostError("the Prefect server", "http://h/api", 0.0, 30.0)
    try:
        try:
            raise loss
        except PrefectServerLostError:
            raise httpx.ConnectError("refused")  # what Prefect's engine raises reporting the failure
    except httpx.ConnectError as engine:
        assert prefect_watch.stopped_by_loss(engine) and prefect_watch.unreachable(engine)
    assert not prefect_watch.stopped_by_loss(ValueError("x")) and not prefect_watch.unreachable(ValueError("x"))
    # What Prefect's client raises once the loss has set its retries to 0 (seen under load).
    assert prefect_watch.unreachable(AssertionError("Retry handling ended without response or exception"))
    assert not prefect_watch.unreachable(AssertionError("x"))


def test_an_optional_call_is_skipped_at_once_when_the_server_does_not_answer(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    calls = []
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:1/api"}):
        started = time.monotonic()
        assert prefect_watch.optional(calls.append, "artifact") is None
    assert calls == [] and time.monotonic() - started < 3


def test_a_sweep_whose_trials_all_finished_before_the_loss_ends_finished(store, tiny, monkeypatch):
    """The loss comes while the summary is written: the summary and comparison are still written to MLflow, the
    Prefect artifact is skipped, and the parent is FINISHED (a loss before the trials ended stops the sweep)."""
    real = sweep_flow.run_trials

    def then_lose_the_server(*args, **kwargs):
        results = real(*args, **kwargs)
        loss = PrefectServerLostError("the local Prefect server", "http://127.0.0.1:1/api", time.time(), 30.0)
        monkeypatch.setattr(prefect_watch, "_lost", loss)
        for callback in list(prefect_watch._callbacks):
            callback(loss)
        return results

    monkeypatch.setattr(sweep_flow, "run_trials", then_lose_the_server)
    report = sweep(spec=SweepSpec(name="lost-late", base=tiny, space={"train_seed": [0, 1]}), tracking_uri=store.uri,
                   trials_in="threads")
    assert [t.status for t in report.trials] == ["FINISHED", "FINISHED"]
    (parent,) = [r for r in store.runs("cnncore-sweeps") if r.data.tags.get("sweep_role") == "parent"]
    assert parent.info.status == "FINISHED" and "failure_reason" not in parent.data.tags
    assert {"summary.csv", "comparison.png", "comparison/cells.csv", "comparison/report.html"} <= store.artifacts(parent.info.run_id)
