"""The array backend on a machine without CuPy: NumPy dispatch, device errors, and
the two helpers whose CuPy branch is exercised here through a stand-in module."""

import subprocess
import sys
import types
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnncore import backend


def test_array_module_of_numpy_arrays_is_numpy():
    assert backend.array_module(np.zeros(3), np.ones((2, 2), np.float32)) is np
    assert backend.array_module() is np


def test_array_module_of_a_cupy_array_is_cupy(monkeypatch):
    fake_cupy = types.ModuleType("cupy")
    monkeypatch.setattr(backend, "_cupy", lambda: fake_cupy)
    CupyArray = type("ndarray", (), {"__module__": "cupy._core.core"})
    assert backend.array_module(np.zeros(2), CupyArray()) is fake_cupy


def test_require_device_cpu_is_numpy():
    assert backend.require_device("cpu") is np


def test_require_device_cuda_without_cupy_asks_for_the_gpu_extra(monkeypatch):
    monkeypatch.setattr(backend, "_cupy", lambda: None)  # as on a machine without CuPy, whatever this one has
    with pytest.raises(RuntimeError, match=r"install the 'gpu' extra"):
        backend.require_device("cuda")


def test_require_device_cuda_with_cupy_but_no_gpu_says_so(monkeypatch):
    def no_driver():
        raise RuntimeError("cudaErrorNoDevice")

    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_driver)))
    monkeypatch.setattr(backend, "_cupy", lambda: fake_cupy)
    with pytest.raises(RuntimeError, match=r"no usable GPU: cudaErrorNoDevice"):
        backend.require_device("cuda")


def test_lazy_cupy_import_returns_none_where_cupy_is_absent():
    try:
        import cupy  # noqa: F401
    except Exception:
        assert backend._cupy() is None
    else:
        pytest.skip("cupy is installed on this machine")


@pytest.mark.parametrize("device", ["gpu", "CPU", "cuda:0", ""])
def test_require_device_rejects_unknown_names(device):
    with pytest.raises(ValueError, match=r"device must be one of \('cpu', 'cuda'\)"):
        backend.require_device(device)


def test_to_device_cpu_and_to_numpy_round_trip_without_copying():
    x = np.arange(6.0).reshape(2, 3)
    on_device = backend.to_device(x, "cpu")
    assert on_device is x
    assert backend.to_numpy(on_device) is x
    assert backend.device_of(x) == "cpu"


def test_to_numpy_converts_lists_and_fetches_device_arrays():
    np.testing.assert_array_equal(backend.to_numpy([[1, 2], [3, 4]]), np.array([[1, 2], [3, 4]]))
    device_array = types.SimpleNamespace(get=lambda: np.array([5.0, 6.0]))  # cupy's host transfer
    np.testing.assert_array_equal(backend.to_numpy(device_array), [5.0, 6.0])


@st.composite
def windowed_arrays(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=2, max_size=4)))
    axis = tuple(sorted(draw(st.sets(st.integers(0, len(shape) - 1), min_size=1, max_size=2))))
    window = tuple(draw(st.integers(1, shape[a])) for a in axis)
    return np.arange(np.prod(shape), dtype=np.float64).reshape(shape), window, axis


# "strided" is the CuPy branch (as_strided), run on NumPy through a stand-in
# module that is not numpy itself.
@pytest.mark.parametrize("branch", ["numpy", "strided"])
@settings(max_examples=30, deadline=None)
@given(windowed_arrays())
def test_sliding_windows_equals_numpy_sliding_window_view(branch, case):
    x, window, axis = case
    module = np if branch == "numpy" else types.SimpleNamespace(lib=np.lib)
    with mock.patch.object(backend, "array_module", lambda *arrays: module):
        got = backend.sliding_windows(x, window, axis)
    np.testing.assert_array_equal(got, np.lib.stride_tricks.sliding_window_view(x, window, axis=axis))



@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "a transposed view"])
def test_strided_view_reads_what_as_strided_reads(contiguous):
    a = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    if not contiguous:
        a = a.transpose(0, 2, 1)
    shape, strides = (3, 2, 2, 3), (a.strides[0], a.strides[1], a.strides[2], a.strides[2])
    np.testing.assert_array_equal(backend.strided_view(a, shape, strides),
                                  np.lib.stride_tricks.as_strided(a, shape, strides))


def test_freed_memory_is_reused_without_page_faults_once_retained():
    """In a fresh process, so that the setting stays there: after retain_freed_memory(),
    a training step's pattern (arrays of 0.2 to 3 MB held through the step, then all
    freed) allocated again comes back from the heap, not from fresh pages that the kernel
    must fault in. (Without it, glibc faults in about 99% of these pages at every cycle.)"""
    script = """
import resource, numpy as np
from cnncore import backend
retained = backend.retain_freed_memory()
assert backend.retain_freed_memory() == retained  # idempotent
sizes = (400_000, 100_000, 400_000, 25_000, 400_000, 100_000, 400_000)
def cycle():
    held = [np.ones(n) for n in sizes]
    del held
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    cycle()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(retained, faults / (sum(sizes) * 8 / 4096))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    if out[0] != "True":
        pytest.skip("no glibc mallopt on this platform: retain_freed_memory does not apply")
    assert float(out[1]) < 0.02, f"{float(out[1]):.0%} of the pages touched were faulted in again"
