"""A sweep that fails says so: with no finished trial it raises one line naming the sweep and the reason, its
parent run is FAILED with that reason, its summary lists each trial, and no empty figure or comparison is
published as if it were a result; a rerun that then finishes clears the failure tags."""

from __future__ import annotations

import re
import warnings

import pytest

from flows.config import SweepSpec
from flows.sweep import sweep
from flows.sweep.flow import NoTrialFinishedError

DIVERGING = 1e9  # sgd at this rate overflows within 3 iterations (see test_flow_sweep.py)


def parent_of(store, name: str):
    (parent,) = [r for r in store.runs("cnncore-sweeps") if r.data.tags.get("sweep_role") == "parent"
                 and r.data.tags.get("sweep_name") == name]
    return parent


def test_a_sweep_with_no_finished_trial_fails_in_one_line_and_publishes_no_comparison(store, tiny):
    spec = SweepSpec(name="all-fail", base=tiny.model_copy(update={"learning_rate": DIVERGING}),
                     space={"train_seed": [0, 1]})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(NoTrialFinishedError) as caught:
            sweep(spec=spec, tracking_uri=store.uri, trials_in="threads")
    message = str(caught.value)
    assert "\n" not in message
    assert re.match(r"^sweep all-fail: none of its 2 trials finished, so there is nothing to compare; they failed "
                    r"with (NonFiniteLossError: loss became nan|ValueError: x must be finite)", message)
    # The divergence is reported by its error, not by NumPy's overflow warnings (nor matplotlib's empty legend).
    assert not [w for w in seen if issubclass(w.category, (RuntimeWarning, UserWarning))], [str(w.message) for w in seen]

    parent = parent_of(store, "all-fail")
    assert parent.info.status == "FAILED"
    assert parent.data.tags["failure_reason"] == f"NoTrialFinishedError: {message}"
    assert parent.data.tags["num_finished"] == "0" and parent.data.tags["num_failed"] == "2"
    artifacts = store.artifacts(parent.info.run_id)
    assert {"summary.csv", "summary.json"} <= artifacts
    assert not {"comparison.png", "comparison.csv", "comparison.json"} & artifacts


def test_a_rerun_that_finishes_clears_the_failure_tags_of_the_failed_sweep(store, tiny):
    failing = SweepSpec(name="fixed", base=tiny, space={"learning_rate": [DIVERGING]})
    with pytest.raises(NoTrialFinishedError):
        sweep(spec=failing, tracking_uri=store.uri, trials_in="threads")
    assert parent_of(store, "fixed").data.tags["failure_reason"].startswith("NoTrialFinishedError: ")

    # Rerun under the same name and base (so it resumes the same parent run), with a rate that trains.
    sweep(spec=failing.model_copy(update={"space": {"learning_rate": [DIVERGING, 1e-2]}}), tracking_uri=store.uri,
          trials_in="threads")
    parent = parent_of(store, "fixed")
    assert parent.info.status == "FINISHED"
    assert "failure_reason" not in parent.data.tags  # a stale reason would say the finished sweep failed
    assert parent.data.tags["num_finished"] == "1"
