"""The links a run ends with: the MLflow UI's (with how to start it, only while it is not up) and the
Prefect UI's flow run."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import typer

from flows import tracking
from flows.cli import run as cli_run
from flows.answers import render
from flows.servers import free_port, mlflow_ui_shows_run

from .conftest import MLFLOW_API, rest


def a_run_on(server: str) -> str:
    experiment = rest(server, f"{MLFLOW_API}/experiments/create", {"name": f"links-{free_port()}"})
    return rest(server, f"{MLFLOW_API}/runs/create", {"experiment_id": experiment["experiment_id"]})["run"]["info"][
        "run_id"]


def test_an_mlflow_ui_shows_a_run_only_when_it_has_it(mlflow_server):
    run_id = a_run_on(mlflow_server)
    assert mlflow_ui_shows_run(mlflow_server, run_id)
    assert not mlflow_ui_shows_run(mlflow_server, "0" * 32)  # another store's run
    assert not mlflow_ui_shows_run(f"http://127.0.0.1:{free_port()}", run_id)  # no UI there


def test_the_hint_to_start_the_mlflow_ui_is_left_out_while_the_ui_shows_the_run(mlflow_server, monkeypatch,
                                                                                  tmp_path):
    local_store = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = SimpleNamespace(run_id=a_run_on(mlflow_server))
    monkeypatch.setattr(tracking, "DEFAULT_UI_URL", f"http://127.0.0.1:{free_port()}")  # no UI up
    assert cli_run._ui_hint(local_store, result).startswith("start it with `")
    monkeypatch.setattr(tracking, "DEFAULT_UI_URL", mlflow_server)  # the links' UI is up, with the run
    assert cli_run._ui_hint(local_store, result) == ""
    assert cli_run._ui_hint({"tracking_uri": mlflow_server}, result) == ""  # a tracking server serves its UI


def test_the_answer_ends_with_the_prefect_flow_run_when_there_is_one():
    text = render({"answer": 42}, prefect_link="http://127.0.0.1:4242/runs/flow-run/abc")
    assert text.splitlines()[-1] == "Prefect flow run: http://127.0.0.1:4242/runs/flow-run/abc"
    assert "Prefect" not in render({"answer": 42})


def test_a_run_slow_to_start_says_so_once_and_one_that_has_spoken_does_not(monkeypatch, capsys):
    from flows import progress

    monkeypatch.setattr(cli_run, "STARTING_SILENCE_S", 0.2)
    monkeypatch.setattr(progress, "said_a_line", threading.Event())
    cli_run._say_if_slow_to_start("train")
    time.sleep(1.0)
    assert capsys.readouterr().err.startswith("cnnflow run train: starting (loading Prefect, MLflow and the flow;")
    progress.said_a_line.set()
    cli_run._say_if_slow_to_start("train")
    time.sleep(1.0)
    assert capsys.readouterr().err == ""


def test_an_error_is_the_last_line_no_starting_notice_after_it(monkeypatch, capsys):
    """An error printed as the notice's wait runs out (CI: a refused grid at load 6) ends the command's output:
    the notice comes before it or not at all."""
    from flows import progress
    from flows.cli import console
    from flows.cli.errors import fail

    monkeypatch.setattr(console, "silence_after_the_last_word", lambda verbose: None)  # this process logs on
    monkeypatch.setattr(cli_run, "STARTING_SILENCE_S", 0.3)
    monkeypatch.setattr(progress, "said_a_line", threading.Event())
    with progress._first_line:  # the error is being printed when the wait runs out
        cli_run._say_if_slow_to_start("sweep")
        time.sleep(0.6)
        with pytest.raises(typer.Exit):
            fail("the grid search asks for too many trials", 2)
    time.sleep(0.3)
    assert capsys.readouterr().err == "error: the grid search asks for too many trials\n"
