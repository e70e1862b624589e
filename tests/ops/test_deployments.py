"""prefect.yaml's deployments: valid for `prefect deploy`, served by `cnnflow serve`, triggered ad hoc."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from prefect.client.schemas.schedules import CronSchedule

from flows.cli.options import flow_options, validate_parameters
from flows.servers import stop_process_group
from flows.deployments import read_deployments, to_schedule

from .conftest import CNNFLOW, REPO_ROOT, deployments_on, rest, wait_for

PREFECT = [sys.executable, "-m", "prefect"]
EXPECTED = {"gradient-check/nightly", "train/nightly", "sweep/weekly-bn-vs-gn", "sweep/weekly-bn-vs-gn-study",
            "sweep/monthly-mnist-fc-control", "sweep/monthly-mnist-convnet"}
# A gradient check of two small layers: a served run that takes seconds.
QUICK_CHECK = '["relu_forward", "affine_forward"]'


def test_prefect_yaml_schedules_gradient_check_train_and_sweep_by_cron():
    specs = read_deployments()
    assert {s.full_name for s in specs} == EXPECTED
    for spec in specs:
        (entry,) = spec.schedules
        schedule = to_schedule(entry)
        assert schedule.cron == entry["cron"] and schedule.timezone == "UTC"
        CronSchedule(cron=schedule.cron, timezone=schedule.timezone)  # validates the expression


@pytest.mark.parametrize("spec", read_deployments(), ids=lambda s: s.full_name)
def test_prefect_yaml_parameters_are_valid_for_the_flow(spec):
    flow = spec.load_flow()
    validate_parameters(flow, spec.parameters, flow_options(flow))


def test_prefect_deploy_registers_every_deployment_for_the_work_pool(ops_env, prefect_server):
    env = {**ops_env, "PREFECT_API_URL": prefect_server}
    subprocess.run([*PREFECT, "work-pool", "create", "cnncore", "--type", "process", "--overwrite"],
                   check=True, capture_output=True, env=env, timeout=120)
    done = subprocess.run([*PREFECT, "--no-prompt", "deploy", "--all"], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    registered = deployments_on(prefect_server)
    assert EXPECTED <= set(registered)
    for name in EXPECTED:
        assert registered[name]["work_pool_name"] == "cnncore"
        assert registered[name]["schedules"][0]["schedule"]["cron"]


def test_serve_registers_the_schedules_and_runs_an_ad_hoc_trigger(tmp_path, ops_env, prefect_server):
    env = {**ops_env, "PREFECT_API_URL": prefect_server, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serving = subprocess.Popen([str(CNNFLOW), "serve"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                   cwd=tmp_path, start_new_session=True)
    try:
        def served():
            assert serving.poll() is None, log.read_text()[-3000:]
            found = deployments_on(prefect_server)
            # Served deployments name their flow by dotted path (flows.sweep.flow.sweep); prefect.yaml's
            # (what `prefect deploy` registered) as module:function.
            ready = EXPECTED <= set(found) and all(
                found[n]["schedules"] and ":" not in found[n]["entrypoint"] for n in EXPECTED)
            return found if ready else None

        registered = wait_for(served, 90, "cnnflow serve to register prefect.yaml's deployments", interval_s=0.5)
        crons = {name: registered[name]["schedules"][0]["schedule"]["cron"] for name in EXPECTED}
        assert crons == {s.full_name: s.schedules[0]["cron"] for s in read_deployments()}

        trigger = subprocess.run([*PREFECT, "deployment", "run", "gradient-check/nightly", "-p", f"only={QUICK_CHECK}"],
                                 capture_output=True, text=True, env=env, timeout=120)
        assert trigger.returncode == 0, trigger.stdout + trigger.stderr
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", trigger.stdout).group(1)

        def finished():
            state = rest(prefect_server, f"/flow_runs/{flow_run_id}")["state"]
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        state = wait_for(finished, 150, "the triggered flow run to finish", interval_s=1)
        assert state["type"] == "COMPLETED", log.read_text()[-3000:]
        run = rest(prefect_server, f"/flow_runs/{flow_run_id}")
        assert run["parameters"]["only"] == ["relu_forward", "affine_forward"]
        assert run["parameters"]["experiment"] == "cnncore-gradient-check"  # from prefect.yaml
        # The run's logs end with its answer, as `cnnflow run` would print it, with its MLflow link.
        def answer_logged():
            logs = rest(prefect_server, "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                                         "sort": "TIMESTAMP_ASC", "limit": 200})
            messages = [log["message"] for log in logs]
            return messages if any("gradients checked" in m for m in messages) else None

        answer = [m for m in wait_for(answer_logged, 30, "the run's answer in its logs") if "gradients checked" in m]
        assert re.search(r"\d+ gradients checked, .*http://\S+/#/experiments/\d+/runs/[0-9a-f]{32}", answer[-1])
    finally:
        stop_process_group(serving)


def test_serve_without_a_prefect_server_says_how_to_start_one(ops_env):
    done = subprocess.run([str(CNNFLOW), "serve"], capture_output=True, text=True, env=ops_env, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: cnnflow serve needs a Prefect server: start one (`prefect server start`, or the docker-compose "
        "stack) and set PREFECT_API_URL, e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api"]
