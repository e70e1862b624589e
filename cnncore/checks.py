"""Argument checks shared by the layers: one helper per kind of argument.

Each raises ``ValueError`` naming the argument, what was expected and what came,
so a shape mistake is reported where it was made rather than deep in a matmul.
"""

from __future__ import annotations

from .backend import array_module


def require_ndim(name: str, a, ndim: int, layout: str) -> None:
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional {layout}, got shape {tuple(a.shape)}")


def require_keys(name: str, param: dict, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in param]
    if missing:
        raise ValueError(f"{name} is missing {missing}; expected keys {list(keys)}")


def require_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def require_nonnegative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


class NonFiniteError(ValueError):
    """An array that must be finite holds NaN or inf (a diverging network's scores, say)."""


def require_finite(name: str, a) -> None:
    xp = array_module(a)
    if not bool(xp.isfinite(a).all()):
        raise NonFiniteError(f"{name} must be finite, got NaN or inf")


def require_labels(y, num_samples: int, num_classes: int) -> None:
    """y: integer labels of shape (num_samples,) in [0, num_classes)."""
    if y.ndim != 1 or y.shape[0] != num_samples:
        raise ValueError(f"y must have shape ({num_samples},) to match x, got {tuple(y.shape)}")
    if y.dtype.kind not in "iu":
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    if num_samples and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"y must hold labels in [0, {num_classes}), got values in [{int(y.min())}, {int(y.max())}]"
        )


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


def groups(G, C: int) -> int:
    require_positive_int("G", G)
    if C % G:
        raise ValueError(f"G={G} groups must divide the {C} channels (C % G = {C % G}, expected 0)")
    return G

