"""The sweep flow, in the order it works: name, resume, load, fan out, summarise."""

from __future__ import annotations

import logging
import time
from datetime import timezone
from typing import Literal

from prefect import flow
from prefect.runtime import flow_run
from pydantic import PositiveInt

from .. import prefect_watch
from ..answers import log_answer
from ..config import SweepSpec
from ..load_data import load_data_once, load_dataset, log_dataset
from ..progress import record, say
from ..shutdown import StopRequest
from ..study import PRESETS, preset_spec
from ..tracking import FINISHED, connect
from . import lease
from ..forkserver import start_forkserver
from .executors import run_trials
from .results import SweepReport, TrialResult, best_trial
from .resume import find_finished_trials, open_sweep_run, skipped_trial

__all__ = ["NoTrialFinishedError", "SweepReport", "TrialResult", "sweep"]


class NoTrialFinishedError(RuntimeError):
    """A sweep whose every trial failed: there is no comparison to publish."""

    exit_code = 1

    def __init__(self, name: str, results: list[TrialResult]):
        reasons = dict.fromkeys(r.failure_reason or "no reason recorded" for r in results)
        first = next(iter(reasons), "")
        more = f" (and {len(reasons) - 1} other reasons)" if len(reasons) > 1 else ""
        super().__init__(f"sweep {name}: none of its {len(results)} trials finished, so there is nothing to compare; "
                         f"they failed with {first}{more}. The summary on the sweep's parent run lists each trial")


def resolved_spec(spec: SweepSpec, preset: str | None, resume: bool) -> SweepSpec:
    """The sweep that runs: preset's design when one is named (called spec.name when that is not the default),
    its name dated <name>-<UTC date and time of the flow run's start> when not resuming."""
    if preset is not None:
        named = spec.name != SweepSpec.model_fields["name"].default
        spec = preset_spec(preset, dataset=spec.base.dataset, **({"name": spec.name} if named else {}))
    if not resume:
        started = flow_run.scheduled_start_time.astimezone(timezone.utc)  # now, outside a flow run
        spec = spec.model_copy(update={"name": f"{spec.name}-{started:%Y%m%d-%H%M%S}"})
    return spec


def sweep_flow_run_name() -> str:
    """sweep-<the name the sweep runs under>, so that two sweeps' flow runs (two presets, two dated runs)
    are told apart in Prefect's UI."""
    given = {"spec": SweepSpec(), "preset": None, "resume": True, **flow_run.parameters}
    return f"sweep-{resolved_spec(SweepSpec.model_validate(given['spec']), given['preset'], given['resume']).name}"


@flow(name="sweep", flow_run_name=sweep_flow_run_name, log_prints=True, on_completion=[log_answer])
def sweep(
    spec: SweepSpec = SweepSpec(),
    experiment: str = "cnncore-sweeps",
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    max_workers: PositiveInt = 2,
    dask_address: str | None = None,
    trials_in: Literal["processes", "threads"] = "processes",
    preset: Literal[PRESETS] | None = None,
    resume: bool = True,
    system_metrics: bool = False,
) -> SweepReport:
    """Run every trial of spec, skipping those finished by an earlier run of the same sweep name.

    Failed trials are in the returned SweepReport, not raised; a sweep in which no trial
    finished has nothing to compare, and raises NoTrialFinishedError (its parent run FAILED).

    Args:
        spec: The sweep: a grid or seeded random search over TrainConfig fields.
        experiment: MLflow experiment to log to.
        tracking_uri: MLflow tracking URI; else $MLFLOW_TRACKING_URI, else the project's sqlite store.
        parent_run_id: MLflow run to nest the sweep's parent run under (a pipeline's).
        max_workers: Trials trained at once on this machine.
        dask_address: Address of a Dask scheduler (tcp://host:8786) to run the trials on; this machine when unset.
        trials_in: Locally, train each trial in a worker process (no GIL contention) or in its task's thread.
        preset: A study preset that replaces spec, named spec.name when that is not the default: bn-vs-gn (the
            Group Normalization paper's batch-size comparison on the three-layer net, on spec.base.dataset),
            mnist-convnet (BN against GN on a 3-block convnet), mnist-fc-control (BN against LN and none on
            CS231n's FullyConnectedNet: the positive control); each with a -small version. A study writes its
            report, tables and figures on the parent run.
        resume: Rerunning a sweep name resumes that sweep; false starts a fresh one named
            <name>-<UTC date and time>, as scheduled runs need.
        system_metrics: Record the machine's CPU, memory and disk use in the sweep's parent run.
    """
    start = time.perf_counter()
    spec = resolved_spec(spec, preset, resume)
    trials = spec.trials()
    start_forkserver(trials_in, dask_address)  # the workers' imports, beside the setup below
    say(f"sweep {spec.name}: {len(trials)} trials; opening its MLflow run, loading "
        f"{', '.join(dict.fromkeys(c.dataset for c in trials))}")
    store = connect(tracking_uri)
    owner = lease.new_owner()
    parent, resumed = open_sweep_run(store, experiment, spec, trials, parent_run_id, owner)
    stop = StopRequest()  # set by a trial, a signal, the lease finding the store gone, or Prefect's loss
    with (parent, lease.held(parent, owner, on_lost=stop.set), prefect_watch.on_lost(stop.set),
          parent.system_metrics(system_metrics)):
        parent.link_flow_run(spec.name)
        finished = find_finished_trials(parent, spec, trials)
        skipped = [skipped_trial(spec, i, c, finished[c.key()]) for i, c in enumerate(trials) if c.key() in finished]
        todo = {i: c for i, c in enumerate(trials) if c.key() not in finished}
        for data_spec in dict.fromkeys(c.data_spec() for c in todo.values()):
            # Load and record each dataset once, before the fan-out: the trials then find the
            # experiment's dataset record made (and, training in threads, the arrays loaded).
            log_dataset(parent, data_spec, load_dataset(data_spec), sizes=False)  # no metrics on a parent
        say(f"sweep {spec.name}: {len(trials)} trials, {len(skipped)} already finished"
            f"{' (resumed)' if resumed else ''}, {len(todo)} to run, "
            + (f"on the Dask cluster at {dask_address}" if dask_address else f"{max_workers} at a time"))
        results = sorted(skipped + run_trials(parent, spec, todo, max_workers, dask_address, trials_in, stop),
                         key=lambda r: r.index)
        # Imported here (run_trials has it imported while the trials train): the summary's pandas, scipy and
        # matplotlib would slow `cnnflow run sweep --help`.
        from .summary import (REPORT, answer_metrics, grid_table_markdown, publish_comparison,
                              show_answer_in_mlflow, summarise_sweep, write_study_report)

        say(f"writing the sweep's summary{', figures and study report' if spec.study else ' and figure'} "
            "to its MLflow run")
        grid = summarise_sweep(parent, spec, results)  # the summary table says which trials failed, and why
        if not any(r.status == FINISHED for r in results):
            raise NoTrialFinishedError(spec.name, results)
        differences, choice = [], None
        if spec.study:
            # The design paragraph counts updates per batch size from the training split's size.
            num_train = len(load_data_once(spec.base.data_spec())["y_train"])
            study = write_study_report(parent, spec, results, num_train)
            comparison, title, report_text, answer = (study.summary, study.summary_title, study.markdown,
                                                      study.answer)
            shown = {"report": "study/report.html"}
        else:
            choice = publish_comparison(parent, spec, results, grid)
            comparison, title, report_text, answer = grid.cells, grid.title, None, grid.answer
            differences = grid.differences.to_dict("records")
            shown = {"table": grid_table_markdown(grid), "numbers": answer_metrics(grid), "report": REPORT}
        # The parent's Overview answers, and a saved view charts its trials by normalization and batch size.
        charts_url = show_answer_in_mlflow(parent, spec, results, answer, **shown)
        parent.set_tags({"sweep_wall_time_s": f"{time.perf_counter() - start:.1f}"})
    # The link lands on the answer: the study's figure of its answer, or a grid's report (its answer, table and
    # figure).
    figure = (f"study/{study.answer_figure}.png" if study.answer_figure else "comparison.png") if spec.study \
        else REPORT
    # A study answers with its contrasts: a "best trial" among its cells would mean nothing.
    report = SweepReport(name=spec.name, parent_run_id=parent.id, url=parent.url_of(figure), trials=results,
                         best=None if spec.study else best_trial(results), wall_time_s=time.perf_counter() - start,
                         study_report=report_text, comparison_title=title, answer=answer, differences=differences,
                         choice=None if choice is None else choice.as_record(), charts_url=charts_url,
                         comparison=[] if comparison is None else comparison.to_dict("records"))
    for r in report.failed:  # in the run's logs; the console had each trial's progress line, and `cnnflow` lists them
        record(f"FAILED {r.run_name}: {r.failure_reason}", logging.WARNING)
    return report
