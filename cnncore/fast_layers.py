"""Vectorised twins of the naive convolution and max pool in ``cnncore.layers``.

Same arguments, same caches, same results (to rounding: 1e-12 relative in
float64), with no Python loop over images, channels or output pixels. The only
loops left run over the few filter or pool-window offsets (HH * WW of them).

Convolution is im2col + one matrix product. The columns are laid out as
(C, HH, WW, N, H', W') so that both the forward product and the weight
gradient are single large GEMMs, and each column block is one strided copy of
the padded input. Max pooling takes elementwise maxima over the window offsets
of strided views, which is much faster than a reduction over tiny axes.

Every function takes its array module from its inputs, so CuPy arrays run here
unchanged on a GPU.
"""

from __future__ import annotations

from . import checks
from .backend import array_module

# ---------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------


def _pad_channels_first(x, pad):
    """x (N, C, H, W) -> zero-padded (C, N, H + 2*pad, W + 2*pad), one copy."""
    xp = array_module(x)
    N, C, H, W = x.shape
    out = xp.zeros((C, N, H + 2 * pad, W + 2 * pad), dtype=x.dtype)
    out[:, :, pad : pad + H, pad : pad + W] = x.transpose(1, 0, 2, 3)
    return out


def _offset_view(a, i, j, stride, Ho, Wo):
    """a[..., i + stride*h, j + stride*w] for h < Ho, w < Wo: a strided view."""
    return a[..., i : i + stride * (Ho - 1) + 1 : stride, j : j + stride * (Wo - 1) + 1 : stride]


def _im2col(x, HH, WW, stride, pad, Ho, Wo):
    """Columns of x (N, C, H, W) as (C * HH * WW, N * Ho * Wo).

    Row (c, i, j) holds, for every output position, the input pixel that filter
    tap (c, i, j) meets there.
    """
    xp = array_module(x)
    N, C = x.shape[:2]
    x_pad = _pad_channels_first(x, pad)
    cols = xp.empty((C, HH, WW, N, Ho, Wo), dtype=x.dtype)
    for i in range(HH):
        for j in range(WW):
            cols[:, i, j] = _offset_view(x_pad, i, j, stride, Ho, Wo)
    return cols.reshape(C * HH * WW, N * Ho * Wo)


def _col2im(dcols, x_shape, HH, WW, stride, pad, Ho, Wo):
    """Adjoint of _im2col: sum the column gradients back onto dx (N, C, H, W)."""
    xp = array_module(dcols)
    N, C, H, W = x_shape
    dcols = dcols.reshape(C, HH, WW, N, Ho, Wo)
    dx_pad = xp.zeros((C, N, H + 2 * pad, W + 2 * pad), dtype=dcols.dtype)
    for i in range(HH):
        for j in range(WW):
            _offset_view(dx_pad, i, j, stride, Ho, Wo)[...] += dcols[:, i, j]
    return xp.ascontiguousarray(dx_pad[:, :, pad : pad + H, pad : pad + W].transpose(1, 0, 2, 3))


def conv_forward_fast(x, w, b, conv_param):
    """Convolution as im2col + one GEMM; the arguments, output and cache of conv_forward_naive.

    x: (N, C, H, W); w: (F, C, HH, WW); b: (F,); conv_param: 'stride', 'pad'.
    Returns (out, cache): out (N, F, H', W'); cache (x, w, b, conv_param). The
    columns are recomputed in the backward pass rather than cached: they are
    HH * WW times the size of x.
    """
    N, F, Ho, Wo = checks.conv_output_shape(x, w, conv_param)
    if b.shape != (F,):
        raise ValueError(f"b must have shape ({F},) to match w's {F} filters, got {tuple(b.shape)}")
    s, pad = conv_param["stride"], conv_param["pad"]
    _, _, HH, WW = w.shape
    cols = _im2col(x, HH, WW, s, pad, Ho, Wo)
    out = (w.reshape(F, -1) @ cols).reshape(F, N, Ho, Wo) + b.reshape(F, 1, 1, 1)
    return array_module(x).ascontiguousarray(out.transpose(1, 0, 2, 3)), (x, w, b, conv_param)


def conv_backward_fast(dout, cache, need_dx: bool = True):
    """dout: (N, F, H', W'). Returns (dx, dw, db) shaped like x, w, b.

    need_dx=False skips the input gradient and returns None for dx: the first
    layer of a network has nothing upstream that needs it.
    """
    x, w, b, conv_param = cache
    s, pad = conv_param["stride"], conv_param["pad"]
    F, C, HH, WW = w.shape
    N, _, Ho, Wo = dout.shape
    dout2 = dout.transpose(1, 0, 2, 3).reshape(F, -1)
    cols = _im2col(x, HH, WW, s, pad, Ho, Wo)
    dw = (dout2 @ cols.T).reshape(w.shape)
    db = dout.sum(axis=(0, 2, 3))
    if not need_dx:
        return None, dw, db
    dcols = w.reshape(F, -1).T @ dout2
    return _col2im(dcols, x.shape, HH, WW, s, pad, Ho, Wo), dw, db


# ---------------------------------------------------------------------------
# Max pooling
# ---------------------------------------------------------------------------


def _pool_windows(x, pool_param):
    """Yield (k, view) for each window offset in row-major order, view (N, C, H', W')."""
    _, _, Ho, Wo = checks.pool_output_shape(x, pool_param)
    ph, pw, s = pool_param["pool_height"], pool_param["pool_width"], pool_param["stride"]
    for i in range(ph):
        for j in range(pw):
            yield i * pw + j, _offset_view(x, i, j, s, Ho, Wo)


def max_pool_forward_fast(x, pool_param):
    """Max pooling as elementwise maxima of strided views; arguments, output and
    cache of max_pool_forward_naive (any stride, overlapping windows included).

    x: (N, C, H, W). Returns (out, cache): out (N, C, H', W'); cache (x, pool_param).
    """
    xp = array_module(x)
    out = None
    for k, view in _pool_windows(x, pool_param):
        out = view.copy() if out is None else xp.maximum(out, view, out=out)
    return out, (x, pool_param)


def max_pool_backward_fast(dout, cache):
    """dout: (N, C, H', W'). Returns dx shaped like x.

    As max_pool_backward_naive: each window's gradient goes to its first maximum
    in row-major order. The winning offset is found by a running strict '>'
    over the offsets in that order, so a later tie never displaces the first.
    """
    x, pool_param = cache
    xp = array_module(x)
    best, winner = None, None
    for k, view in _pool_windows(x, pool_param):
        if best is None:
            best, winner = view.copy(), xp.zeros(view.shape, dtype=xp.int32)
            continue
        better = view > best
        xp.copyto(best, view, where=better)
        winner[better] = k
    dx = xp.zeros_like(x)
    dx_windows = dict(_pool_windows(dx, pool_param))
    for k, dx_view in dx_windows.items():
        dx_view += dout * (winner == k)
    return dx
