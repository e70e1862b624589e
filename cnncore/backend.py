"""The array backend: the few places where NumPy and CuPy differ.

Every fast layer, the model, the optimisers and the Solver take their array
module from their inputs (``array_module(x)``): NumPy arrays run on NumPy, CuPy
arrays on CuPy, with one copy of the math. This is the only module that imports
cupy, and it does so lazily, so a machine without it never pays for it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np

DEVICES = ("cpu", "cuda")


def _cupy() -> ModuleType | None:
    """The cupy module if it is importable, else None (never raises)."""
    try:
        return importlib.import_module("cupy")
    except Exception:  # ImportError, or a CUDA runtime that fails to load
        return None


def array_module(*arrays) -> ModuleType:
    """The NumPy-API namespace of the given arrays: cupy for CuPy arrays, else numpy."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            return _cupy()
    return np


def require_device(device: str) -> ModuleType:
    """The array module for ``device`` ('cpu' or 'cuda'), with a clear error when absent."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        return np
    cp = _cupy()
    if cp is None:
        raise RuntimeError(
            "device='cuda' needs CuPy, which is not installed or cannot load: "
            "install the 'gpu' extra (pip install -e '.[gpu]') on a machine with an NVIDIA GPU"
        )
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device
        raise RuntimeError(f"device='cuda' asked for, but CUDA reports no usable GPU: {exc}") from exc
    if count < 1:
        raise RuntimeError("device='cuda' asked for, but CUDA reports no GPU on this machine")
    return cp


def device_name(device: str) -> str:
    """A person-readable name of the device: the GPU's model for 'cuda', the CPU's for 'cpu'."""
    if require_device(device) is np:
        import platform

        return _cpu_model() or platform.machine() or "cpu"
    cp = _cupy()
    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def to_device(x, device: str):
    """``x`` as an array on ``device`` (no copy when it is already there)."""
    xp = require_device(device)
    return xp.asarray(x)


def to_numpy(x) -> np.ndarray:
    """``x`` as a NumPy array on the host (no copy when it already is one)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "get"):  # cupy.ndarray
        return x.get()
    return np.asarray(x)


def device_of(x) -> str:
    """'cuda' for a CuPy array, 'cpu' otherwise."""
    return "cpu" if array_module(x) is np else "cuda"


# The fast convolution works on chunks of images whose columns and products
# take about this many bytes on the CPU: small enough to stay in cache between
# the copy that builds them and the products that read them, large enough that
# Python's per-call cost is spread over many images. 4 MiB measured best for
# the conv layers of bench_train.py on a 2-core AMD EPYC (1 MiB L2 per core,
# 32 MiB L3); 1 and 2 MiB were 5-15% slower, 8 MiB the same.
CPU_CHUNK_BYTES = 1 << 22


def chunk_bytes(xp: ModuleType) -> int:
    """Bytes of columns and products the fast convolution works on at once for arrays of ``xp``.

    NumPy: CPU_CHUNK_BYTES, so the columns stay in cache. CuPy: no limit (the
    whole batch in one product), since a GPU wants few large kernels and has
    no cache to fit.
    """
    return CPU_CHUNK_BYTES if xp is np else 1 << 62


def sliding_windows(x, window_shape: tuple[int, ...], axis: tuple[int, ...]):
    """Read-only strided view of every window of ``x`` over ``axis`` (no copy).

    Same semantics as ``numpy.lib.stride_tricks.sliding_window_view``: the window
    axes are appended at the end, the windowed axes shrink to ``n - k + 1``.
    """
    xp = array_module(x)
    if xp is np:
        return np.lib.stride_tricks.sliding_window_view(x, window_shape, axis=axis)
    out_shape = list(x.shape)
    for ax, k in zip(axis, window_shape):
        out_shape[ax] = x.shape[ax] - k + 1
    strides = tuple(x.strides) + tuple(x.strides[ax] for ax in axis)
    return xp.lib.stride_tricks.as_strided(x, tuple(out_shape) + tuple(window_shape), strides)

