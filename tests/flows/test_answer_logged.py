"""A flow run's logs end with its answer wherever it runs (a deployment, a worker), not only in `cnnflow run`'s
terminal: the flows' on_completion hook, flows.answers.log_answer."""

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogWorker

from flows.answers import render
from flows.train import train


def test_a_train_runs_logs_end_with_the_answer_cnnflow_would_print(store, tiny):
    state = train(config=tiny, tracking_uri=store.uri, run_name="answered", return_state=True)
    APILogWorker.drain_all(timeout=10)
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    messages = [log.message for log in sorted(logs, key=lambda log: log.timestamp)]
    answer = render(state.result()).splitlines()
    assert answer[-1].startswith("MLflow run: http")
    assert messages[-len(answer) - 3:].count(answer[-1]) == 1  # among the run's last lines, once
    assert all(line in messages for line in answer)
