"""Fixtures shared across the test modules, and the harness every test run gets.

The harness (the second half of this file): a test run stopped by SIGTERM, SIGHUP or
Ctrl-C unwinds as for Ctrl-C, so every fixture stops the servers it started; whatever
is still running at the end with the run's temporary folders in its environment,
command line or working directory is killed and named (tests/harness.py). Servers
are waited for with a start-up limit that grows with the machine's load.
"""

import numpy as np
import pytest

import harness


def _arrays_in(args):
    """Every array among args, including the values of dict arguments (bn_param's running stats)."""
    for a in args:
        if isinstance(a, np.ndarray):
            yield a
        elif isinstance(a, dict):
            yield from (v for v in a.values() if isinstance(v, np.ndarray))


def _to_float32(a):
    """a with its float arrays cast to float32, looking inside dicts (bn_param's running stats)."""
    if isinstance(a, dict):
        return {k: _to_float32(v) for k, v in a.items()}
    if isinstance(a, np.ndarray) and a.dtype.kind == "f":
        return a.astype(np.float32)
    return a


def _as_tuple(grads):
    return grads if isinstance(grads, tuple) else (grads,)


def _check_layer_contract(forward, backward, args, seed=0):
    """Run forward and backward on float32 copies of args and assert the layer contract.

    - forward's output and every gradient backward returns are float32;
    - no input array (nor dout, nor an array inside a dict argument) is modified:
      each is compared with a copy taken before the call;
    - backward gives the same gradients when called twice on one cache, so it
      did not consume or modify the cache.
    Returns (out, grads) for further checks.
    """
    args = [_to_float32(a) for a in args]
    snapshots = [(a, a.copy()) for a in _arrays_in(args)]
    out, cache = forward(*args)
    assert out.dtype == np.float32, f"forward returned {out.dtype} for float32 inputs"
    dout = np.random.default_rng(seed).standard_normal(out.shape).astype(np.float32)
    snapshots.append((dout, dout.copy()))
    grads = _as_tuple(backward(dout, cache))
    for i, g in enumerate(grads):
        if g is not None:
            assert g.dtype == np.float32, f"gradient {i} is {g.dtype} for float32 inputs"
    for original, snapshot in snapshots:
        np.testing.assert_array_equal(original, snapshot, err_msg="an input was modified in place")
    for first, second in zip(grads, _as_tuple(backward(dout, cache))):
        if first is not None:
            np.testing.assert_array_equal(first, second, err_msg="backward is not repeatable on one cache")
    return out, grads


@pytest.fixture
def layer_contract():
    """The float32-in-float32-out and inputs-untouched checks, as a function of (forward, backward, args)."""
    return _check_layer_contract


# ---------------------------------------------------------------- the harness


def pytest_configure(config):
    harness.stop_on_termination_signals()


@pytest.fixture(scope="session", autouse=True)
def leave_nothing_behind(tmp_path_factory, request):
    """Set up first and torn down last: after every other fixture has stopped its servers, anything left
    running under this run's temporary folders is killed, and named on the terminal."""
    harness.watch_folder(tmp_path_factory.getbasetemp())
    yield
    left = harness.kill_leftovers()
    if left:
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"killed {len(left)} process(es) a test or fixture left behind:", *left]
        for line in lines:
            reporter.write_line(line, yellow=True) if reporter else print(line)
