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
        # Every fast layer asks, several times a call: NumPy arrays answer without a string test.
        if type(a) is not np.ndarray and type(a).__module__.startswith("cupy"):
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
# A forward pass that no backward follows (scoring, evaluation, the diagnostics) takes this many
# images at a time on the CPU: their activations stay in cache from one layer to the next.
# Measured on the mnist-convnet net (3 blocks of 32 3x3 filters on 28x28, 1 thread, float32) in
# test mode: 5,800 images/s at 64 against 5,000 at 500 with batch norm, 4,600 against 3,100
# with group norm; 32 and 128 within 5% of 64.
CPU_SCORING_IMAGES = 64


# glibc's mallopt parameters, and the values retain_freed_memory sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
RETAINED_BYTES = 1 << 30


def retain_freed_memory() -> bool:
    """Let this process reuse the memory NumPy frees instead of returning it to the OS.

    glibc's malloc serves blocks above a threshold (128 KiB, rising to the largest
    freed) with fresh mmaps and returns a free heap top above twice that to the OS;
    every training step then gets its activations and gradients from pages that
    the kernel must fault in and zero again. Measured on the 3-block MNIST
    convnet's step (1 BLAS thread, float32): 3,300 page faults a step at batch 8,
    18.7 ms a step, against 0.4 faults and 8.5 ms with freed memory kept; 4,200
    and 37 ms against 25 ms at batch 32. This sets both thresholds to 1 GiB
    (mallopt), so blocks up to that size come from, and go back to, the heap.
    The process keeps its peak heap until it exits: what a training process
    would fault in again at the next step anyway.

    Called by Solver.train(); benchmarks call it for both sides of a comparison.
    Process-wide and idempotent. Returns False where it does not apply (no glibc:
    macOS, Windows, musl), True once set.
    """
    global _retaining
    if _retaining is None:
        _retaining = _set_malloc_thresholds(RETAINED_BYTES)
    return _retaining


_retaining: bool | None = None


def _set_malloc_thresholds(nbytes: int) -> bool:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, nbytes)) and bool(mallopt(_M_TRIM_THRESHOLD, nbytes))


def chunk_bytes(xp: ModuleType) -> int:
    """Bytes of columns and products the fast convolution works on at once for arrays of ``xp``.

    NumPy: CPU_CHUNK_BYTES, so the columns stay in cache. CuPy: no limit (the
    whole batch in one product), since a GPU wants few large kernels and has
    no cache to fit.
    """
    return CPU_CHUNK_BYTES if xp is np else 1 << 62


def scoring_images(xp: ModuleType) -> int:
    """Images a forward pass without a backward takes at once for arrays of ``xp``: NumPy
    CPU_SCORING_IMAGES; CuPy 500, since a GPU wants few large kernels."""
    return CPU_SCORING_IMAGES if xp is np else 500


def images_per_chunk(N: int, bytes_per_image: int, xp: ModuleType) -> int:
    """How many of N images of bytes_per_image fit in chunk_bytes(xp) (1 to N), spread over
    chunks of even sizes so that the last chunk is not a sliver."""
    n = max(1, min(N, chunk_bytes(xp) // max(bytes_per_image, 1)))
    return -(-N // -(-N // n)) if N else 1


def image_chunks(x, arrays: int) -> list[slice]:
    """Slices of x's batch (axis 0): chunks of images over which ``arrays`` arrays like x fit
    in chunk_bytes, the fast layers' unit of work."""
    N = x.shape[0]
    n = images_per_chunk(N, arrays * x[:1].nbytes, array_module(x))
    return [slice(start, min(start + n, N)) for start in range(0, N, n)]


def ones(xp: ModuleType, n: int, dtype):
    """A read-only vector of n ones of dtype, made once per (array module, n, dtype).

    The fast layers take sums along rows as products with a vector of ones (a
    matrix-vector product beats NumPy's generic reductions); at a batch of 2 making
    that vector cost as much as the sum it serves. Callers never write into it.
    """
    key = (xp, n, dtype)
    vector = _ONES.get(key)
    if vector is None:
        if len(_ONES) >= _ONES_KEPT:  # sizes seen by a process are few; never let them pile up
            _ONES.clear()
        vector = xp.ones(n, dtype=dtype)
        if xp is np:
            vector.flags.writeable = False
        _ONES[key] = vector
    return vector


_ONES: dict = {}
_ONES_KEPT = 256


def strided_view(a, shape: tuple[int, ...], strides: tuple[int, ...]):
    """A view of a's memory with the given shape and strides (bytes), as ``as_strided``.

    For a contiguous NumPy array it is built by the ndarray constructor, in about
    2 us where ``numpy.lib.stride_tricks.as_strided`` takes about 15: the fast conv
    builds one such view per chunk of images. Read it only: windows overlap.
    """
    xp = array_module(a)
    if xp is np and a.flags.c_contiguous:
        return np.ndarray(shape, a.dtype, a, 0, strides)
    return xp.lib.stride_tricks.as_strided(a, shape, strides)


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

