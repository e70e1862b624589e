"""Argument checks shared by the layers, the optimisers and the Solver: one helper per kind of argument.

Each raises ``ValueError`` naming the argument, what was expected and what came,
so a shape mistake is reported where it was made rather than deep in a matmul.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from . import memory
from .backend import array_module


def require_ndim(name: str, a, ndim: int, layout: str) -> None:
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional {layout}, got shape {tuple(a.shape)}")


def require_keys(name: str, param: dict, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in param]
    if missing:
        raise ValueError(f"{name} is missing {missing}; expected keys {list(keys)}")


def require_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None,
                optional: bool = False) -> int | None:
    """value as a Python int: an integer (Python or NumPy, not bool) in [minimum, maximum]; None if optional."""
    if type(value) is int and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
        return value  # the common case, without the slower isinstance checks against numbers.Integral
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (
            (minimum is None or value >= minimum) and (maximum is None or value <= maximum)):
        if maximum is None and minimum in (0, 1):
            expected = "a positive integer" if minimum == 1 else "a non-negative integer"
        else:
            bounds = [f">= {minimum}" if minimum is not None else "", f"<= {maximum}" if maximum is not None else ""]
            expected = " ".join(["an integer", " and ".join(b for b in bounds if b)]).strip()
        raise ValueError(f"{name} must be {expected}{' or None' if optional else ''}, got {value!r}")
    return int(value)


def require_positive_int(name: str, value) -> int:
    return require_int(name, value, minimum=1)


def require_nonnegative_int(name: str, value) -> int:
    return require_int(name, value, minimum=0)


def require_real(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """value as a float: a finite real number (not bool) in the interval given, e.g. low=0, low_open=True for > 0."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        left = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        right = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        interval = " and ".join(b for b in (left, right) if b)
        raise ValueError(f"{name} must be a finite number{' ' + interval if interval else ''}, got {value!r}")
    return float(value)


FLOAT_DTYPES = ("float32", "float64")


def require_float_dtype(name: str, dtype) -> str:
    """The name of dtype (a dtype, a type or a name) when it is float32 or float64, else ValueError.

    float16 is refused rather than widened: its 11-bit mantissa has already lost what the
    model would compute with, and a silent cast would hide that.
    """
    try:
        resolved = None if dtype is None else np.dtype(dtype).name
    except TypeError:
        resolved = None
    if resolved not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got {dtype!r}")
    return resolved


# Compared with `in`, these cost about 50 ns a call where np.dtype(dtype).name took 2 us:
# the layers check every array input on every call.
_FLOAT_ARRAY_DTYPES = tuple(np.dtype(name) for name in FLOAT_DTYPES)


def require_float_array(name: str, a) -> None:
    """a must be an array of float32 or float64 values (not float16, integers or bools).

    A dtype check only, never a pass over the values: cheap enough for every layer call.
    """
    dtype = getattr(a, "dtype", None)
    if dtype is None or dtype not in _FLOAT_ARRAY_DTYPES:
        raise ValueError(f"{name} must be a float32 or float64 array, got "
                         f"{'dtype ' + str(dtype) if dtype is not None else type(a).__name__}")


def require_dout_shape(dout, shape: tuple[int, ...]) -> None:
    """dout, a backward pass's upstream gradient, must have the shape its forward's output had."""
    given = getattr(dout, "shape", None)
    if given is None or tuple(given) != tuple(shape):
        got = tuple(given) if given is not None else type(dout).__name__
        raise ValueError(f"dout must have shape {tuple(shape)}, the shape of the forward's output, got {got}")


class NonFiniteError(ValueError):
    """An array that must be finite holds NaN or inf (a diverging network's scores, say)."""


def require_finite(name: str, a) -> None:
    xp = array_module(a)
    if not bool(xp.isfinite(a).all()):
        raise NonFiniteError(f"{name} must be finite, got NaN or inf")


def require_labels(y, num_samples: int, num_classes: int | None, *, name: str = "y", x_name: str = "x") -> None:
    """y: integer labels of shape (num_samples,) in [0, num_classes); >= 0 only when num_classes is None.

    name and x_name: how the caller calls the labels and the inputs they belong to.
    """
    dtype = getattr(y, "dtype", None)
    if getattr(y, "ndim", None) != 1 or y.shape[0] != num_samples:
        got = tuple(y.shape) if hasattr(y, "shape") else type(y).__name__
        raise ValueError(f"{name} must have shape ({num_samples},) to match {x_name}, got {got}")
    if dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer class labels, got dtype {dtype}")
    if num_samples:
        low, high = int(y.min()), int(y.max())
        if low < 0 or (num_classes is not None and high >= num_classes):
            expected = "labels >= 0" if num_classes is None else f"labels in [0, {num_classes})"
            raise ValueError(f"{name} must hold {expected}, got values in [{low}, {high}]")


def affine_params(name: str, p, num_features: int):
    """Reshape gamma or beta, given as (D,) or (1, D, 1, 1), to (D,).

    The caller keeps the original shape to return the gradient in it.
    """
    if tuple(p.shape) not in ((num_features,), (1, num_features, 1, 1)):
        raise ValueError(
            f"{name} must have shape ({num_features},) or (1, {num_features}, 1, 1), "
            f"got {tuple(p.shape)}"
        )
    return p.reshape(num_features)


def bn_mode(bn_param: dict) -> str:
    mode = bn_param.get("mode", "train")
    if mode not in ("train", "test"):
        raise ValueError(f"bn_param['mode'] must be 'train' or 'test', got {mode!r}")
    return mode


def norm_eps(name: str, param: dict) -> float:
    """param['eps'] (default 1e-5), the variance floor of a normalisation layer, as a float > 0.

    name: how the caller calls param ("bn_param", "ln_param", "gn_param").
    A negative eps can make var + eps negative and the output NaN; 0 divides by 0
    on a constant channel.
    """
    return require_real(f"{name}['eps']", param.get("eps", 1e-5), low=0, low_open=True)


def bn_settings(bn_param: dict, x_shape: tuple[int, ...], values_per_channel: int) -> tuple[str, float, float]:
    """(mode, eps, momentum) of batch norm's bn_param, checked before anything is written to it.

    values_per_channel: how many values of x each channel's statistics pool (N,
    or N*H*W for spatial batch norm). Train mode needs at least one: the mean of
    nothing is NaN, and the running statistics would become NaN for good.
    momentum (default 0.9), the weight of the old running value, must lie in [0, 1].
    """
    mode = bn_mode(bn_param)
    eps = norm_eps("bn_param", bn_param)
    momentum = require_real("bn_param['momentum']", bn_param.get("momentum", 0.9), low=0, high=1)
    if mode == "train" and values_per_channel == 0:
        raise ValueError(f"x must hold at least one value per channel in train mode, got shape {tuple(x_shape)}: "
                         "the statistics of an empty batch are NaN and would turn bn_param's running statistics NaN")
    return mode, eps, momentum


def bn_groups(bn_param: dict, mode: str, N: int) -> int:
    """How many groups batch norm normalises the N images of x in, each with its own statistics:
    N // bn_param['norm_batch'] in train mode (ghost batch norm), 1 without a norm_batch or in test mode.

    norm_batch (optional; absent or None: the whole batch) must be a positive integer in
    either mode, and in train mode it must divide N: the groups are consecutive and equal.
    """
    g = require_int("bn_param['norm_batch']", bn_param.get("norm_batch"), minimum=1, optional=True)
    if g is None or mode != "train" or g == N:
        return 1
    if N % g:
        raise ValueError(f"bn_param['norm_batch'] = {g} must divide the batch's {N} images "
                         f"({N} % {g} = {N % g}, expected 0): ghost batch norm normalises each "
                         f"consecutive group of {g} images with its own statistics")
    return N // g


def conv_output_shape(x, w, conv_param: dict) -> tuple[int, int, int, int]:
    """Validate a convolution's arguments; return (N, F, H_out, W_out).

    H_out = 1 + (H + 2 * pad - HH) / stride, which must be a whole number: the
    filter windows tile the padded input exactly, as CS231n assumes.
    """
    require_ndim("x", x, 4, "(N, C, H, W)")
    require_ndim("w", w, 4, "(F, C, HH, WW)")
    require_keys("conv_param", conv_param, ("stride", "pad"))
    stride = require_positive_int("conv_param['stride']", conv_param["stride"])
    pad = require_nonnegative_int("conv_param['pad']", conv_param["pad"])
    N, C, H, W = x.shape
    F, Cw, HH, WW = w.shape
    if Cw != C:
        raise ValueError(f"w has {Cw} input channels (w.shape[1]) but x has {C} (x.shape[1])")
    sizes = []
    for axis, n, k in (("height", H, HH), ("width", W, WW)):
        span = n + 2 * pad - k
        if span < 0:
            raise ValueError(
                f"w's filter {axis} {k} exceeds x's padded {axis} {n + 2 * pad} (conv_param['pad'] = {pad})"
            )
        if span % stride:
            raise ValueError(
                f"conv_param['stride'] = {stride} and conv_param['pad'] = {pad} with w's filter {axis} {k} "
                f"do not tile x's {axis} {n}: "
                f"({n} + 2*{pad} - {k}) % {stride} = {span % stride}, expected 0"
            )
        sizes.append(1 + span // stride)
    return N, F, sizes[0], sizes[1]


def conv_forward_inputs(x, w, b, conv_param: dict) -> tuple[int, int, int, int]:
    """Validate every argument of a convolution's forward; return (N, F, H_out, W_out).

    x and w must be float32 or float64 arrays, their shapes and conv_param as
    conv_output_shape requires, and b of shape (F,), one bias per filter. The output
    and the padded input must fit in memory (cnncore.memory): a pad of 10**6 raises
    MemoryLimitError, a ValueError naming conv_param['pad'], before anything is allocated.
    """
    require_float_array("x", x)
    require_float_array("w", w)
    shape = conv_output_shape(x, w, conv_param)
    F = shape[1]
    if tuple(b.shape) != (F,):
        raise ValueError(f"b must have shape ({F},) to match w's {F} filters, got {tuple(b.shape)}")
    # The output and the padded input: a pad of 10**6 would ask for terabytes before any work.
    N, C, H, W = x.shape
    pad = conv_param["pad"]
    memory.require_fits(x.dtype.itemsize * (math.prod(shape) + N * C * (H + 2 * pad) * (W + 2 * pad)),
                        f"a convolution of x {tuple(x.shape)} by w {tuple(w.shape)} with conv_param['pad'] = {pad} "
                        f"(output {shape})")
    return shape


def pool_output_shape(x, pool_param: dict) -> tuple[int, int, int, int]:
    """Validate a max pool's arguments; return (N, C, H_out, W_out).

    H_out = 1 + (H - pool_height) // stride: windows that would overhang the
    bottom or right edge are dropped, as ``torch.nn.functional.max_pool2d`` does.
    """
    require_ndim("x", x, 4, "(N, C, H, W)")
    require_keys("pool_param", pool_param, ("pool_height", "pool_width", "stride"))
    ph = require_positive_int("pool_param['pool_height']", pool_param["pool_height"])
    pw = require_positive_int("pool_param['pool_width']", pool_param["pool_width"])
    stride = require_positive_int("pool_param['stride']", pool_param["stride"])
    N, C, H, W = x.shape
    if ph > H or pw > W:
        raise ValueError(f"pool_param's window {ph}x{pw} (pool_height x pool_width) does not fit x's {H}x{W}")
    return N, C, 1 + (H - ph) // stride, 1 + (W - pw) // stride


def image_dims(input_dim) -> tuple[int, int, int]:
    """input_dim, an image's (C, H, W), as three positive Python ints."""
    dims = tuple(input_dim) if not isinstance(input_dim, (str, bytes)) and hasattr(input_dim, "__len__") else ()
    if len(dims) != 3:
        raise ValueError(f"input_dim must be (C, H, W), got {input_dim!r}")
    return tuple(require_positive_int(f"input_dim[{i}]", d) for i, d in enumerate(dims))


def groups(G, C: int) -> int:
    require_positive_int("G", G)
    if C % G:
        raise ValueError(f"G={G} groups must divide the {C} channels (C % G = {C % G}, expected 0)")
    return G



# ---------------------------------------------------------------------------
# The Solver's data and options
# ---------------------------------------------------------------------------

DATA_KEYS = ("X_train", "y_train", "X_val", "y_val")


def training_data(data, input_dim=None, num_classes: int | None = None) -> tuple:
    """(X_train, y_train, X_val, y_val) of a Solver's data dict, checked.

    Each X must be a float32 or float64 array (the model casts to its own dtype),
    non-empty, finite (NaN or inf would surface only as "loss became nan" some
    iterations later) and of images (N, *input_dim) when input_dim is given;
    each y integer labels (N,), >= 0 and < num_classes when it is given.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"data must be a dict with keys {', '.join(DATA_KEYS)}, got {type(data).__name__}")
    missing = [k for k in DATA_KEYS if k not in data]
    if missing:
        raise ValueError(f"data is missing {', '.join(missing)}; expected keys {', '.join(DATA_KEYS)}")
    for split in ("train", "val"):
        x_name, y_name = f"X_{split}", f"y_{split}"
        X, y = data[x_name], data[y_name]
        require_float_array(x_name, X)
        if len(X) != len(y):
            raise ValueError(f"{x_name} has {len(X)} rows but {y_name} has {len(y)}")
        if len(X) == 0:
            raise ValueError(f"{x_name} is empty")
        if input_dim is not None and tuple(X.shape[1:]) != tuple(input_dim):
            raise ValueError(f"{x_name} holds images of shape {tuple(X.shape[1:])} but the model's "
                             f"input_dim is {tuple(input_dim)}")
        require_finite(x_name, X)
        require_labels(y, len(X), num_classes, name=y_name, x_name=x_name)
    return tuple(data[k] for k in DATA_KEYS)


def require_increasing_fractions(name: str, values) -> tuple[float, ...]:
    """values as a tuple of floats, strictly increasing, each in (0, 1)."""
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a sequence of fractions in (0, 1), got {values!r}")
    fractions = tuple(require_real(f"{name}[{i}]", f, low=0, high=1, low_open=True, high_open=True)
                      for i, f in enumerate(values))
    if any(later <= earlier for earlier, later in zip(fractions, fractions[1:])):
        raise ValueError(f"{name} must be strictly increasing, got {list(fractions)}")
    return fractions


def require_writable_file(name: str, path) -> None:
    """path must name a file whose folder can be created and written to: the folder is
    created if need be, and a temporary file written in it and removed."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a folder; expected the path of a file to write")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{name} {str(path)!r} cannot be written: its folder {str(folder)!r} cannot be "
                         f"created or written to ({exc.strerror or exc})") from exc
