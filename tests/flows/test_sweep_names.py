"""A sweep's Prefect flow run is named after the sweep that runs: a preset's name, a dated name when not
resuming, so two sweeps' flow runs are told apart in Prefect's UI."""

import re

from prefect import flow
from prefect.runtime import flow_run

from flows.config import SweepSpec
from flows.study import preset_spec
from flows.sweep import sweep
from flows.sweep.flow import resolved_spec, sweep_flow_run_name


@flow(flow_run_name=sweep_flow_run_name)
def named_like_a_sweep(spec: SweepSpec = SweepSpec(), preset: str | None = None, resume: bool = True) -> tuple:
    """The sweep flow's parameters and naming, without its work: (flow run name, the name the sweep runs as)."""
    return flow_run.name, resolved_spec(spec, preset, resume).name


def test_each_preset_names_its_flow_run_after_its_own_sweep():
    names = [named_like_a_sweep(preset=preset)[0] for preset in ("bn-vs-gn-small", "mnist-convnet-small")]
    assert names == [f"sweep-{preset_spec('bn-vs-gn-small').name}", f"sweep-{preset_spec('mnist-convnet-small').name}"]
    assert len(set(names)) == 2 and "sweep-bn-vs-gn" not in names  # not the default spec's name


def test_a_preset_given_a_name_and_a_fresh_sweep_are_named_as_they_run():
    run_name, name = named_like_a_sweep(spec=SweepSpec(name="mine"), preset="bn-vs-gn-small", resume=False)
    assert re.fullmatch(r"mine-\d{8}-\d{6}", name) and run_name == f"sweep-{name}"


def test_a_fresh_sweeps_flow_run_and_parent_run_share_its_dated_name(store, tiny):
    state = sweep(spec=SweepSpec(name="dated", base=tiny, space={"train_seed": [0]}), tracking_uri=store.uri,
                  resume=False, trials_in="threads", return_state=True)
    report = state.result()
    assert re.fullmatch(r"dated-\d{8}-\d{6}", report.name)
    parent = store.client.get_run(report.parent_run_id)
    assert parent.info.run_name == report.name
    assert parent.data.tags["prefect.flow_run_name"] == f"sweep-{report.name}"
