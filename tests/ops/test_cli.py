"""The `cnnflow` command: generated options, one-line errors, and real runs as a user types them."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import subprocess
import sys
import time
import urllib.request
from typing import NamedTuple

import numpy as np
import pytest
import yaml
import typer
from mlflow import MlflowClient
from pydantic import BaseModel
from typer.testing import CliRunner

from flows import cli
from flows.cli import options as cli_options
from flows.cli import run as cli_run
from flows.cli.console import configure_prefect_console
from flows.deployments import load_entrypoint
from flows.servers import free_port, mlflow_server_command, stop_process_group
from flows.config import SweepSpec, TrainConfig
from flows.progress import say
from flows.train import train

from .conftest import CNNFLOW, rest, strict_json, wait_for

# A few seconds of training: enough to exercise every step of the flow.
TINY_TRAIN = ["--num-train", "120", "--num-val", "40", "--num-test", "40", "--num-epochs", "1",
              "--num-filters", "4", "--hidden-dim", "16", "--batch-size", "20"]

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(cli.app, list(args), catch_exceptions=False)


def run_options(flow_name: str) -> list[cli_options.FlowOption]:
    return cli_options.flow_options(load_entrypoint(cli_run.FLOWS[flow_name]))


def test_train_options_are_generated_from_every_train_config_field():
    flags = {o.flag for o in run_options("train")}
    expected = {"--" + name.replace("_", "-") for name in TrainConfig.model_fields}
    assert expected <= flags
    assert {"--experiment", "--tracking-uri", "--run-name"} <= flags


class Small(BaseModel):
    seed: int = 0


class Outer(BaseModel):
    seed: int = 0
    inner: Small = Small()
    batch_size: int = 8


def test_flag_clashes_keep_the_shallowest_name_short():
    def flow_like(outer: Outer = Outer(), experiment: str = "x"):
        pass

    flags = {o.path: o.flag for o in cli_options.flow_options(flow_like)}
    assert flags[("outer", "seed")] == "--seed"
    assert flags[("outer", "inner", "seed")] == "--inner-seed"
    assert flags[("outer", "batch_size")] == "--batch-size"


def test_the_sweep_seeds_say_what_they_seed():
    flags = {o.path: o.flag for o in run_options("sweep")}
    assert flags[("spec", "search_seed")] == "--search-seed"
    assert flags[("spec", "base", "train_seed")] == "--train-seed"
    assert flags[("spec", "base", "data_seed")] == "--data-seed"
    assert not [flag for flag in flags.values() if flag == "--seed"]


def test_an_old_seed_name_in_a_params_file_is_refused_with_its_new_name(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("spec: {seed: 3, base: {seed: 1}}\n")
    result = invoke("run", "sweep", "--params", str(params))
    assert result.exit_code == 2
    assert "seed is now called search_seed" in result.output


def test_two_model_parameters_with_the_same_fields_get_their_parameter_names():
    def two(first: Small = Small(), second: Small = Small()):
        pass

    assert [o.flag for o in cli_options.flow_options(two)] == ["--first-seed", "--second-seed"]


@pytest.mark.parametrize("flow_name", sorted(cli_run.FLOWS))
def test_every_run_option_has_help(flow_name):
    options = run_options(flow_name)
    assert options, f"{flow_name} has no options"
    missing = [o.flag for o in options if not re.sub(r"\(default: .*\)|Must be .*", "", o.help).strip()]
    assert not missing, f"options of `cnnflow run {flow_name}` without help: {missing} (describe the field, or the parameter in the flow's Args: docstring)"


@pytest.mark.parametrize("flow_name", sorted(cli_run.FLOWS))
def test_run_help_lists_every_option(flow_name):
    # Rich sizes the help from COLUMNS (80 when unset), not from terminal_width: at 80 a long flag is cut short.
    result = runner.invoke(cli.app, ["run", flow_name, "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in run_options(flow_name):
        assert option.flag in result.output


@pytest.mark.parametrize("text, expected", [
    ("normalization=batchnorm,groupnorm", ("normalization", ["batchnorm", "groupnorm"])),
    ("batch_size=8,32", ("batch_size", [8, 32])),
    ("learning_rate=1e-3", ("learning_rate", [0.001])),
    ("learning_rate={low: 1.0e-4, high: 1.0e-2, log: true}", ("learning_rate", {"low": 1e-4, "high": 1e-2, "log": True})),
    ("num_train=[100, null]", ("num_train", [100, None])),
])
def test_space_assignments_parse_to_lists_and_intervals(text, expected):
    assert cli_options.parse_assignment(text) == expected


def test_space_file_and_options_merge_with_options_winning(tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text("normalization: [batchnorm, groupnorm]\nbatch_size: [8, 32]\n")
    params_file = tmp_path / "params.json"
    params_file.write_text(json.dumps({"spec": {"name": "from-file", "base": {"num_epochs": 2}}}))

    def sweep_like(spec: SweepSpec = SweepSpec()):
        pass

    options = cli_options.flow_options(sweep_like)
    given = {"space": ["batch_size=16"], "space_file": space_file, "num_epochs": 1, "name": None}
    params = cli_options.collect_parameters(options, given, str(params_file))
    assert params == {"spec": {"name": "from-file", "base": {"num_epochs": 1},
                               "space": {"normalization": ["batchnorm", "groupnorm"], "batch_size": [16]}}}


def test_invalid_option_value_is_one_line_and_exit_code_2():
    result = invoke("run", "train", "--batch-size", "0")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: invalid parameters: --batch-size: Input should be greater than 0 (got 0)"]


def test_inconsistent_configuration_is_one_line_and_exit_code_2():
    result = invoke("run", "train", "--normalization", "groupnorm", "--num-groups", "3")
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: invalid parameters: num_groups=3 must divide num_filters=16")


def test_unknown_choice_is_rejected_before_any_work(tmp_path, monkeypatch):
    store = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    result = runner.invoke(cli.app, ["run", "train", "--normalization", "batchnorn"])
    assert result.exit_code == 2
    assert "batchnorn" in result.output and "Traceback" not in result.output
    assert not store.exists()  # no store was even opened


def test_unknown_parameter_in_a_params_file_is_refused_with_exit_code_2(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("config: {batch_size: 8}\nbogus: 1\n")
    result = invoke("run", "train", "--params", str(params))
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: unknown parameters ['bogus']; train takes ['config', ")


@pytest.mark.parametrize("assignment", ["batch_size", "=8,32"])
def test_malformed_space_assignment_is_refused_with_exit_code_2(assignment):
    result = invoke("run", "sweep", "--space", assignment)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: expected KEY=VALUES, got {assignment!r}"]


def test_a_misspelt_space_field_is_refused_with_the_field_meant():
    result = invoke("run", "sweep", "--space", "normalizaton=batchnorm,groupnorm")
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    assert "space has fields ['normalizaton'] that TrainConfig lacks ('normalizaton': did you mean " \
           "'normalization'?)" in line


def test_unreadable_params_file_is_one_line(tmp_path):
    result = invoke("run", "train", "--params", str(tmp_path / "missing.yaml"))
    assert result.exit_code == 2
    assert result.output.startswith("error: cannot read") and len(result.output.strip().splitlines()) == 1


def test_flow_failure_is_one_line_without_traceback(monkeypatch, capsys):
    def exploding(config: TrainConfig = TrainConfig()):
        raise RuntimeError("the dataset went away")

    with pytest.raises(typer.Exit) as exit_info:
        cli_run.run_flow(exploding, cli_options.flow_options(exploding), {})
    assert exit_info.value.exit_code == 1
    assert capsys.readouterr().err == "error: RuntimeError: the dataset went away\n"


def test_unreachable_tracking_server_fails_fast_in_one_line_and_writes_nothing(
        tmp_path, monkeypatch, prefect_server, use_servers):
    use_servers(prefect=prefect_server)
    monkeypatch.chdir(tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = runner.invoke(cli.app, ["run", "train", "--tracking-uri", dead, *TINY_TRAIN])
    assert time.monotonic() - started < 30
    assert result.exit_code == 1
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert error_lines == [error_lines[0]] and f"{dead} is unreachable" in error_lines[0]
    assert "Nothing was logged" in error_lines[0]
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_runs_lists_a_finished_training_run(tmp_path, prefect_server, use_servers):
    use_servers(prefect=prefect_server)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = TrainConfig(num_train=120, num_val=40, num_test=40, num_epochs=1, num_filters=4, hidden_dim=16,
                         normalization="groupnorm", num_groups=2)
    result = train(config, experiment="cli-runs", run_name="tiny-gn", tracking_uri=store)

    listed = invoke("runs", "--tracking-uri", store, "--output", "json")
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.output)
    assert row["run"] == "tiny-gn" and row["status"] == "FINISHED" and row["experiment"] == "cli-runs"
    assert row["params"]["normalization"] == "groupnorm"
    assert row["test_acc"] == pytest.approx(result.test_acc)
    table = runner.invoke(cli.app, ["runs", "--tracking-uri", store], terminal_width=200)
    assert "tiny-gn" in table.output and f"{result.test_acc:.3f}" in table.output


def test_runs_names_an_unknown_experiment_in_one_line(tmp_path):
    result = invoke("runs", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "-e", "nope")
    assert result.exit_code == 1
    # (MLflow's own INFO lines about creating the new store may come first.)
    assert result.stderr.strip().splitlines()[-1].startswith("error: no experiment named ['nope']")


# ---------------------------------------------------------------- as a real subprocess


def _subprocess_env(ops_env, **extra) -> dict:
    return {**ops_env, "COLUMNS": "200", **extra}


def test_console_script_help_is_fast_and_lists_the_commands(ops_env):
    started = time.monotonic()
    done = subprocess.run([str(CNNFLOW), "--help"], capture_output=True, text=True, env=_subprocess_env(ops_env),
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 10
    for command in ("run", "serve", "ui", "runs", "server"):
        assert re.search(rf"^\W*{command}\b", done.stdout, re.M), done.stdout


def test_console_script_trains_on_small_digits_against_a_temporary_store(tmp_path, ops_env, prefect_server):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = _subprocess_env(ops_env, PREFECT_API_URL=prefect_server, MLFLOW_TRACKING_URI=store)
    done = subprocess.run([str(CNNFLOW), "run", "train", *TINY_TRAIN, "--normalization", "groupnorm",
                           "--num-groups", "2", "--experiment", "cli-subprocess"],
                          capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    listed = subprocess.run([str(CNNFLOW), "runs", "--output", "json"], capture_output=True, text=True,
                            env=env, timeout=120)
    [row] = json.loads(listed.stdout)
    assert row["experiment"] == "cli-subprocess"
    # It ends with its answer: the errors in one line, then the run's link (and how to open the UI).
    summary, link = done.stdout.strip().splitlines()[:2]
    assert re.fullmatch(rf"test error {100 * (1 - row['test_acc']):.2f}% \(best-validation net; final net "
                        r"\d+\.\d\d%\); best val acc \d\.\d{3}; .* of training, .* images/s", summary), summary
    assert link == f"MLflow run: http://127.0.0.1:5000/#/experiments/1/runs/{row['run_id']}?workflowType=machine_learning"
    assert "cnnflow ui --backend-store-uri " + store in done.stdout
    assert not [line for line in done.stderr.splitlines() if "ERROR" in line], done.stderr


@pytest.mark.parametrize("output", ["json", "yaml"])
def test_console_script_output_for_scripts_parses(tmp_path, ops_env, prefect_server, output):
    env = _subprocess_env(ops_env, PREFECT_API_URL=prefect_server, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'm.db'}")
    done = subprocess.run([str(CNNFLOW), "run", "train", *TINY_TRAIN, "--output", output], capture_output=True,
                          text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = strict_json(done.stdout) if output == "json" else yaml.safe_load(done.stdout)
    assert 0 <= result["test_acc"] <= 1 and result["config"]["num_train"] == 120
    assert result["url"].startswith("http://127.0.0.1:5000/#/experiments/")


def test_ui_prints_its_loopback_address_serves_the_store_and_stops_cleanly(tmp_path, ops_env):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ui = subprocess.Popen([str(CNNFLOW), "ui", "--port", "0", "--backend-store-uri", store],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_subprocess_env(ops_env),
                          start_new_session=True)
    try:
        line = ui.stdout.readline()  # bounded: cnnflow ui gives up after its own --timeout (90 s)
        match = re.match(r"MLflow UI: (http://127\.0\.0\.1:\d+)", line)
        assert match, line + ui.stderr.read()
        with urllib.request.urlopen(match.group(1) + "/health", timeout=10) as response:
            assert response.status == 200
        ui.send_signal(signal.SIGINT)  # as Ctrl-C does
        assert ui.wait(timeout=30) == 130  # 128 + SIGINT, as every cnnflow command stopped by Ctrl-C
        with pytest.raises(OSError):  # the server it started is gone too
            urllib.request.urlopen(match.group(1) + "/health", timeout=5)
    finally:
        stop_process_group(ui)


# ---------------------------------------------------------------- degenerate specs, refused before any work


@pytest.mark.parametrize("args, words", [
    (["run", "train", "--learning-rate", "inf"], "--learning-rate: Input should be a finite number"),
    (["run", "train", "--num-epochs", "5000"], "--num-epochs: Input should be less than or equal to 1000"),
    (["run", "load-data", "--num-train", "0"], "--num-train: Input should be greater than 0"),
    (["run", "gradient-check", "--only", "bogus"], "unknown gradient checks ['bogus']"),
    (["run", "sweep", "--space-file", "EMPTY"], "space names no field to sweep"),
    (["run", "sweep", "--params", "EMPTY_SPACE"], "space names no field to sweep"),
])
def test_degenerate_parameters_are_refused_at_once(tmp_path, monkeypatch, args, words):
    (tmp_path / "empty.yaml").write_text("{}\n")
    (tmp_path / "empty_space.yaml").write_text("spec: {space: {}}\n")
    args = [{"EMPTY": str(tmp_path / "empty.yaml"), "EMPTY_SPACE": str(tmp_path / "empty_space.yaml")}.get(a, a)
            for a in args]
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # a flow that started would start a server: slow
    started = time.monotonic()
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: invalid parameters:") and words in line
    assert time.monotonic() - started < 5


def test_ui_port_out_of_range_is_refused_in_one_line():
    result = runner.invoke(cli.app, ["ui", "--port", "70000"])
    assert result.exit_code == 2
    assert "Invalid value for '--port': Input should be less than or equal to 65535" in result.output
    assert "Traceback" not in result.output and "OverflowError" not in result.output


def test_a_store_password_goes_to_the_mlflow_server_in_its_environment_not_its_command_line():
    command, env = mlflow_server_command("postgresql+psycopg2://cnn:s3cret@db:5432/mlflow", 5000)
    assert not any("s3cret" in part for part in command)
    assert env["MLFLOW_BACKEND_STORE_URI"] == "postgresql+psycopg2://cnn:s3cret@db:5432/mlflow"
    command, env = mlflow_server_command("sqlite:////tmp/mlflow.db", 5000)
    assert command[command.index("--backend-store-uri") + 1] == "sqlite:////tmp/mlflow.db"
    assert "MLFLOW_BACKEND_STORE_URI" not in env
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"  # no job runner: 8 processes fewer


def test_an_old_flow_parameter_name_is_refused_with_its_new_name(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("seed: 1\n")
    result = invoke("run", "load-data", "--params", str(params))
    assert result.exit_code == 2
    assert result.output.strip().endswith("seed is now called data_seed")


# ---------------------------------------------------------------- quiet by default, --verbose for everything

HEAVY_PACKAGES = ("sklearn", "scipy", "matplotlib", "mlflow", "pandas")
# `cnnflow ARGS...` in this process, then the packages of argv[1] (comma-separated) it imported and the exit
# status the command would have given the shell (sys.exit's None is 0, a message 1).
IMPORTS_DRIVER = """
import sys
from flows.cli import app
packages = sys.argv[1].split(",")
sys.argv = ["cnnflow", *sys.argv[2:]]
try:
    app()
    code = 0
except SystemExit as stop:
    code = 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1
print("IMPORTED", ",".join(name for name in packages if name in sys.modules))
print("EXIT", code)
"""


class DriverRun(NamedTuple):
    status: int  # the exit status `cnnflow ARGS...` would have given the shell
    output: str  # its stdout, without the driver's report
    errors: str  # its stderr
    imported: list[str]  # the HEAVY_PACKAGES it imported


def heavy_packages_imported_by(ops_env, *args: str) -> DriverRun:
    """`cnnflow ARGS...` run by IMPORTS_DRIVER in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", IMPORTS_DRIVER, ",".join(HEAVY_PACKAGES), *args],
                          capture_output=True, text=True, env=_subprocess_env(ops_env), timeout=60)
    lines = done.stdout.splitlines()
    assert len(lines) >= 2 and lines[-2].startswith("IMPORTED ") and lines[-1].startswith("EXIT "), (
        done.stdout[-2000:] + done.stderr[-2000:])
    *output, imported, exited = lines
    return DriverRun(int(exited.removeprefix("EXIT ")), "\n".join(output), done.stderr,
                     [name for name in imported.removeprefix("IMPORTED ").split(",") if name])


def assert_help_without_heavy_packages(ops_env, *args: str) -> None:
    """`cnnflow ARGS... --help` succeeds, prints its usage and imports none of HEAVY_PACKAGES."""
    done = heavy_packages_imported_by(ops_env, *args, "--help")
    assert done.status == 0, done.errors[-2000:]
    assert f"Usage: {' '.join(['cnnflow', *args])} [OPTIONS]" in done.output, done.output
    assert done.imported == []


@pytest.mark.parametrize("args", [[], ["run"], ["server"], ["runs"]], ids=["cnnflow", "run", "server", "runs"])
def test_help_imports_none_of_the_heavy_packages(ops_env, args):
    assert_help_without_heavy_packages(ops_env, *args)


@pytest.mark.parametrize("flow", ["train", "sweep"])
def test_run_flow_help_imports_none_of_the_heavy_packages(ops_env, flow):
    assert_help_without_heavy_packages(ops_env, "run", flow)


def test_the_flow_configuration_models_import_without_scikit_learn(ops_env):
    done = subprocess.run([sys.executable, "-c", "import sys, flows.config, cnncore.data; "
                                                 "print([m for m in ('sklearn', 'scipy') if m in sys.modules])"],
                          capture_output=True, text=True, env=_subprocess_env(ops_env), timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


# Run as a grandchild of this process whose parent has gone: no shell among its parent processes.
WITHOUT_A_PARENT_SHELL = """
import os, subprocess, sys
if os.fork():
    os._exit(0)
os.setsid()
with open(sys.argv[1], "w") as out, open(sys.argv[2], "w") as err:
    code = subprocess.call(sys.argv[4:], stdout=out, stderr=err)
with open(sys.argv[3], "w") as status:
    status.write(str(code))
"""


def test_shell_completion_can_be_shown_and_completes_flow_options(ops_env, tmp_path):
    out, err, status = tmp_path / "out", tmp_path / "err", tmp_path / "status"
    subprocess.run([sys.executable, "-c", WITHOUT_A_PARENT_SHELL, str(out), str(err), str(status), str(CNNFLOW),
                    "--show-completion", "bash"], env=_subprocess_env(ops_env), timeout=60, check=True)
    wait_for(status.exists, 60, "cnnflow --show-completion bash to finish")
    time.sleep(0.1)  # the status file is written, then closed
    assert status.read_text() == "0", err.read_text()
    assert "complete -o default -F _cnnflow_completion cnnflow" in out.read_text()
    assert "_CNNFLOW_COMPLETE=complete_bash" in out.read_text()
    completed = subprocess.run([str(CNNFLOW)], capture_output=True, text=True, timeout=60, env=_subprocess_env(
        ops_env, _CNNFLOW_COMPLETE="complete_bash", COMP_WORDS="cnnflow run train --normaliz", COMP_CWORD="3"))
    assert completed.stdout.split() == ["--normalization"]


@pytest.mark.parametrize("args, shell", [(["--show-completion", "zsh"], "zsh"), (["--show-completion=fish"], "fish"),
                                         (["--show-completion"], "bash")])
def test_the_completion_script_is_the_named_shells_else_the_detected_ones(monkeypatch, args, shell):
    import shellingham

    monkeypatch.setattr(shellingham, "detect_shell", lambda *a, **k: ("bash", "/bin/bash"))
    shown = invoke(*args)
    assert shown.exit_code == 0
    assert f"complete_{shell}" in shown.output and "not supported" not in shown.output


@pytest.mark.parametrize("args, words", [
    (["--show-completion"], "--show-completion: no shell found among this command's parent processes; name it: "
                            "cnnflow --show-completion bash (or zsh, fish, powershell, pwsh)"),
    (["--install-completion"], "--install-completion: no shell found among this command's parent processes"),
    (["--show-completion", "tcsh"], "--show-completion: unknown shell 'tcsh'; name one of bash, zsh, fish, "
                                    "powershell, pwsh"),
])
def test_completion_without_a_shell_to_detect_says_how_to_name_one(monkeypatch, args, words):
    import shellingham

    def no_shell(*args, **kwargs):
        raise shellingham.ShellDetectionFailure()

    monkeypatch.setattr(shellingham, "detect_shell", no_shell)
    done = runner.invoke(cli.app, args)
    assert done.exit_code == 2
    assert done.output.strip().startswith(f"error: {words}")
    # Named, the shell needs no detection.
    assert "complete_bash" in invoke("--show-completion", "bash").output


@pytest.fixture
def prefect_console():
    """A Prefect console handler on the root logger writing to a string, for one test; the filters and
    formatters of every Prefect console handler are put back afterwards."""
    import prefect.logging.configuration  # noqa: F401  (Prefect configures logging on import)
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in logging.root.manager.loggerDict)]
    saved = {h: (list(h.filters), h.formatter) for lg in loggers for h in getattr(lg, "handlers", [])
             if isinstance(h, PrefectConsoleHandler)}
    stream = io.StringIO()
    handler = PrefectConsoleHandler(stream=stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s - %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield stream
    finally:
        logging.getLogger().removeHandler(handler)
        for h, (filters, formatter) in saved.items():
            h.filters[:] = filters
            h.setFormatter(formatter)


def say_and_log() -> None:
    say("trial 3 of 8: val acc 0.912")
    logging.getLogger("prefect.cnncore-test").info("Finished in state Completed()")
    logging.getLogger("prefect.cnncore-test").warning("the store is slow")


def test_the_quiet_console_shows_progress_lines_plainly_and_prefects_warnings_but_not_its_info(prefect_console):
    configure_prefect_console(verbose=False, tracebacks=False)
    say_and_log()
    assert prefect_console.getvalue().splitlines() == [
        "trial 3 of 8: val acc 0.912", "WARNING prefect.cnncore-test - the store is slow"]


def test_the_verbose_console_shows_prefects_info_too_and_progress_lines_still_plainly(prefect_console):
    configure_prefect_console(verbose=True, tracebacks=False)
    say_and_log()
    assert prefect_console.getvalue().splitlines() == [
        "trial 3 of 8: val acc 0.912", "INFO prefect.cnncore-test - Finished in state Completed()",
        "WARNING prefect.cnncore-test - the store is slow"]


def test_say_outside_a_run_is_one_info_record_on_the_progress_logger(caplog):
    with caplog.at_level(logging.INFO):
        say("loaded digits: 1,197 / 300 / 300")
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("cnncore.progress", "INFO", "loaded digits: 1,197 / 300 / 300")]


def test_say_in_a_flow_and_a_task_reaches_their_run_logs_once_and_the_console_once(
        caplog, prefect_server, use_servers):
    from prefect import flow, task
    from prefect.logging.handlers import APILogWorker

    use_servers(prefect=prefect_server)

    @task(name="says in a task")
    def task_that_says():
        say("said in the task")

    @flow(name="says")
    def flow_that_says():
        say("said in the flow")
        task_that_says()

    with caplog.at_level(logging.INFO):
        state = flow_that_says(return_state=True)
    APILogWorker.drain_all(timeout=30)

    def run_logs() -> list[dict]:
        return rest(prefect_server, "/logs/filter",
                    {"logs": {"flow_run_id": {"any_": [str(state.state_details.flow_run_id)]}}})

    # The server writes the logs it was sent in batches of its own: under load, a moment after they arrive.
    wait_for(lambda: {"said in the flow", "said in the task"} <= {log["message"] for log in run_logs()}, 60,
             "the flow's and the task's lines in the flow run's logs")
    logs = run_logs()
    said = {log["message"]: log for log in logs if log["message"].startswith("said in")}
    assert [log["message"] for log in logs].count("said in the flow") == 1
    assert said["said in the flow"]["task_run_id"] is None and said["said in the task"]["task_run_id"]
    assert [r.name for r in caplog.records if r.getMessage().startswith("said in")] == ["cnncore.progress"] * 2


def test_a_run_prints_no_error_no_download_bars_no_telemetry_and_no_prefect_info(tmp_path, ops_env, prefect_server):
    unused_home = tmp_path / "local-server"
    env = _subprocess_env(ops_env, PREFECT_API_URL=prefect_server, CNNCORE_SERVER_HOME=str(unused_home),
                          MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    done = subprocess.run([str(CNNFLOW), "run", "train", *TINY_TRAIN], capture_output=True, text=True, env=env,
                          timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    noise = [line for line in done.stderr.splitlines()
             if re.search(r"ERROR|Downloading artifacts|telemetry|\| INFO +\|| INFO mlflow", line, re.I)]
    assert noise == []
    assert not unused_home.exists()  # PREFECT_API_URL is set: the local server is neither used nor started


def test_verbose_shows_prefects_info_lines(tmp_path, ops_env, prefect_server):
    env = _subprocess_env(ops_env, PREFECT_API_URL=prefect_server,
                          MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    done = subprocess.run([str(CNNFLOW), "--verbose", "run", "train", *TINY_TRAIN], capture_output=True, text=True,
                          env=env, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"\| INFO +\| Task run 'fit model[^']*' - Finished in state Completed\(\)", done.stderr)
    assert "Downloading artifacts" in done.stderr


@pytest.mark.slow
def test_a_run_with_a_temporary_server_logs_no_telemetry_error(tmp_path, ops_env):
    env = _subprocess_env({k: v for k, v in ops_env.items() if k != "PREFECT_SERVER_ANALYTICS_ENABLED"},
                          MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    done = subprocess.run([str(CNNFLOW), "run", "train", *TINY_TRAIN, "--no-local-server"], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line for line in done.stderr.splitlines() if re.search("ERROR|telemetry", line, re.I)] == []


def test_a_sweep_ends_with_its_comparison_table_and_link_and_no_resume_starts_afresh(tmp_path, ops_env,
                                                                                     prefect_server):
    env = _subprocess_env(ops_env, PREFECT_API_URL=prefect_server, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'm.db'}")
    command = [str(CNNFLOW), "run", "sweep", "--name", "cli-grid", *TINY_TRAIN,
               "--space", "normalization=batchnorm,groupnorm", "--space", "train_seed=0,1", "--num-groups", "2"]
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = first.stdout.splitlines()
    # BN against GN at the one batch size run, over the 2 seeds, and their paired difference, as MLflow holds them.
    header = lines.index("Test error (%) of the final nets: mean and 95% CI over 2 seeds (train_seed 0, 1); "
                         "BN − GN: paired by seed (positive: GN better)")
    assert lines[header + 1].split() == ["normalization", "batch", "20"]
    rows = [line.split() for line in lines[header + 2:header + 5]]
    assert [row[0] for row in rows] == ["batchnorm", "groupnorm", "BN"]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    trials = [r for r in client.search_runs([client.get_experiment_by_name("cnncore-sweeps").experiment_id])
              if r.data.tags.get("sweep_name") == "cli-grid" and r.data.tags.get("sweep_role") == "trial"]
    error = {(r.data.params["normalization"], r.data.params["train_seed"]):
             100 * (1 - r.data.metrics["accuracy/final_test_acc"]) for r in trials}
    for row, norm in zip(rows, ("batchnorm", "groupnorm")):
        assert row[1] == f"{(error[norm, '0'] + error[norm, '1']) / 2:.2f}"
    difference = np.mean([error["batchnorm", s] - error["groupnorm", s] for s in ("0", "1")])
    assert re.fullmatch(re.escape(f"{difference:+.2f}") + r" \[-?\d+\.\d\d, -?\d+\.\d\d\] n=2",
                        " ".join(rows[2][3:]))
    assert re.search(r"^BN against GN: .*Only 2 seeds per cell: a smoke test, whose intervals mean little\.$",
                     first.stdout, re.M)
    # What picks a configuration is said (the final nets' validation error), never a lucky seed's "best trial".
    val_error = {norm: np.mean([100 * (1 - r.data.metrics["curves/val_acc"]) for r in trials
                                if r.data.params["normalization"] == norm]) for norm in ("batchnorm", "groupnorm")}
    chosen = min(val_error, key=val_error.get)
    assert re.search(rf"^lowest validation error: {chosen}: validation error {val_error[chosen]:.2f}% \(mean of 2 "
                     r"final nets\)", first.stdout, re.M)
    assert "best trial" not in first.stdout
    assert re.search(r"^MLflow parent run: http://127\.0\.0\.1:5000/#/experiments/\d+/runs/[0-9a-f]+/artifactPath/"
                     r"comparison/report\.html\?workflowType=machine_learning$", first.stdout, re.M)
    # Progress: a line per finished trial on stderr, with the count.
    assert len(re.findall(r"^\[\d/4\] (batchnorm|groupnorm) seed \d: test error", first.stderr, re.M)) == 4

    # The same name with another base configuration: refused before any trial, one line, exit status 2.
    changed = subprocess.run([*command, "--num-epochs", "2"], capture_output=True, text=True, env=env, timeout=240)
    assert changed.returncode == 2, changed.stderr[-3000:]
    assert [line for line in changed.stderr.splitlines() if line.startswith("error:")] == [
        "error: sweep 'cli-grid' already exists with another base configuration (num_epochs: 1 there, 2 here), and "
        "resuming it would mix the two. Give this sweep a new --name, or run it with --no-resume to start a fresh, "
        "dated sweep."]

    again = subprocess.run([*command, "--no-resume"], capture_output=True, text=True, env=env, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"^sweep cli-grid-\d{8}-\d{6}: 4 trials, 0 failed, 0 finished earlier", again.stdout, re.M)
