"""`cnnflow report NAME`: the answer to a terminal, the whole markdown to a pipe or with --format md, and the
studies the store has when NAME is none of them. The study's parent run is made in a real sqlite store the
way a sweep leaves it (tags, study/report.md); the command reads nothing else."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows import cli

from .conftest import CNNFLOW
from .test_terminal import in_a_terminal

REPORT = """# BN vs GN across batch sizes: a test study

Provenance:

- commit: `abc`

## Design

Sweep `a-study`: BN, GN x batch size 32, 4 x seeds 0, 1.

## The answer: does BN lose more than GN as the batch shrinks?

| batch | n | interaction (points) | verdict |
|---|---|---|---|
| 4 | 2 | +2.00 | cannot tell |

In short: cannot tell at batch 4.

![the interaction against batch size](interaction_vs_batch_size.png)

## How to read the verdicts

Intervals, not means.
"""


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> str:
    """A store with a study's parent run (its report artifact) and a plain grid's: its URI."""
    folder = tmp_path_factory.mktemp("report-store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("studies", artifact_location=(folder / "artifacts").as_uri())
    for name, report in (("a-grid", None), ("a-study", REPORT)):
        run = client.create_run(experiment, run_name=name, tags={"sweep_name": name, "sweep_role": "parent"})
        if report:
            client.log_text(run.info.run_id, report, "study/report.md")
        client.set_terminated(run.info.run_id)
    return uri


def report(uri: str, *args: str):
    return CliRunner().invoke(cli.app, ["report", *args, "--tracking-uri", uri], catch_exceptions=False)


def test_the_answer_format_draws_the_title_and_the_answer_section_only(studies):
    done = report(studies, "a-study", "--format", "answer")
    assert done.exit_code == 0, done.output
    assert "BN vs GN across batch sizes: a test study" in done.output
    assert "In short: cannot tell at batch 4." in done.output
    assert "interaction (points)" in done.output and "|---|" not in done.output  # a table, drawn
    assert "(figure: the interaction against batch size, interaction_vs_batch_size.png)" in done.output
    assert "Provenance" not in done.output and "How to read the verdicts" not in done.output
    assert "`cnnflow report a-study --format md`" in done.output


def test_markdown_is_the_whole_report_and_what_a_pipe_gets_by_default(studies):
    assert report(studies, "a-study", "--format", "md").output.strip() == REPORT.strip()
    assert report(studies, "a-study").output.strip() == REPORT.strip()  # CliRunner's output is no terminal


def test_a_terminal_gets_the_answer_by_default(studies, tmp_path, ops_env):
    code, printed = in_a_terminal([str(CNNFLOW), "report", "a-study", "--tracking-uri", studies],
                                  {**ops_env, "COLUMNS": "100"}, tmp_path, 120)
    assert code == 0, printed
    assert "In short: cannot tell at batch 4." in printed and "Provenance" not in printed


def test_a_name_that_is_no_sweep_lists_the_studies_there(studies):
    done = CliRunner().invoke(cli.app, ["report", "nonexistent", "--tracking-uri", studies])
    assert done.exit_code == 1
    assert done.output.strip() == (f"error: no sweep named 'nonexistent' in {studies}. "
                                   "Studies there, newest first: a-study.")  # not the grid: it has no report
