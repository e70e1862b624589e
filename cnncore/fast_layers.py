"""Vectorised twins of the naive layers in ``cnncore.layers``: convolution, max pool, and
(from ``cnncore.fast_norms``) the normalisation layers.

Same arguments, same results (to rounding: 1e-12 relative in float64), and
caches that either implementation's backward accepts, with no Python loop over
output pixels. The loops left run over a few chunks of images and over the
filter or pool-window offsets.

The convolutions run on the kernels of ``cnncore.fast_conv``: im2col + one
GEMM per chunk of images, or Winograd F(2x2, 3x3), whichever is faster for the
shape; the backward rebuilds the columns chunk by chunk rather than caching
them, so the full column matrix, HH*WW times the size of x, never exists.

Max pooling takes elementwise maxima over the window offsets of strided views,
which is much faster than a reduction over tiny axes. The forward also records
which offset won each window (int8) so the backward routes the gradient without
comparing again.

``conv_relu_pool_forward_fast`` fuses conv -> relu -> max pool: it pools each
chunk's convolution output while it is in cache, and applies the relu to the
pooled map (a quarter of the size for 2x2 pools: max pooling commutes with
relu), so the full-size activation is neither written nor kept.

Every function takes its array module from its inputs, so CuPy arrays run here
unchanged on a GPU.

Arguments are checked as in ``cnncore.layers``, with the same messages: x and w
must be float32 or float64 arrays (float16, integer and bool arrays are refused,
naming the argument and its dtype; a dtype check, not a pass over memory), and
every backward checks that dout has the shape of its forward's output.
"""

from __future__ import annotations

from . import backend, checks, fast_conv
from .backend import array_module
from .fast_norms import batchnorm_map, channel_affine, groupnorm_normalise
from .fast_norms import (  # noqa: F401  (the norms' twins, re-exported: fast_layers is the fast layers' API)
    batchnorm_backward_fast,
    batchnorm_forward_fast,
    layernorm_backward_fast,
    layernorm_forward_fast,
    spatial_batchnorm_backward_fast,
    spatial_batchnorm_forward_fast,
    spatial_groupnorm_backward_fast,
    spatial_groupnorm_forward_fast,
)


# ---------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------


def _offset_view(a, i, j, stride, Ho, Wo):
    """a[..., i + stride*h, j + stride*w] for h < Ho, w < Wo: a strided view."""
    return a[..., i : i + stride * (Ho - 1) + 1 : stride, j : j + stride * (Wo - 1) + 1 : stride]


def conv_forward_fast(x, w, b, conv_param):
    """Convolution by the fastest kernel for its shape (see cnncore.fast_conv); the
    arguments, output and cache of conv_forward_naive.

    x: (N, C, H, W); w: (F, C, HH, WW); b: (F,); conv_param: 'stride', 'pad'.
    Returns (out, cache): out (N, F, H', W'); cache (x, w, b, conv_param).
    """
    N, F, Ho, Wo = checks.conv_forward_inputs(x, w, b, conv_param)
    out = array_module(x).empty((N, F, Ho, Wo), dtype=x.dtype)
    fast_conv.convolve(x, w, b, conv_param["stride"], conv_param["pad"], out)
    return out, (x, w, b, conv_param)


def conv_backward_fast(dout, cache, need_dx: bool = True):
    """dout: (N, F, H', W'). Returns (dx, dw, db) shaped like x, w, b.

    cache: from conv_forward_fast or conv_forward_naive (they are the same).
    need_dx=False skips the input gradient and returns None for dx: the first
    layer of a network has nothing upstream that needs it.
    """
    x, w, b, conv_param = cache
    checks.require_dout_shape(dout, checks.conv_output_shape(x, w, conv_param))
    return fast_conv.gradients(x, w, conv_param["stride"], conv_param["pad"], need_dx, dout=dout)


# ---------------------------------------------------------------------------
# Max pooling
# ---------------------------------------------------------------------------


class _PoolCache(tuple):
    """(x, pool_param), the naive layer's cache, also carrying ``winner``: the
    row-major offset of each window's first maximum, found by the forward.

    max_pool_backward_naive unpacks the two entries and ignores winner;
    max_pool_backward_fast uses it, and finds it again from x when given a
    plain (x, pool_param) cache.
    """

    winner = None


def _pool_windows(x, pool_param):
    """Yield (k, view) for each window offset in row-major order, view (N, C, H', W')."""
    _, _, Ho, Wo = checks.pool_output_shape(x, pool_param)
    ph, pw, s = pool_param["pool_height"], pool_param["pool_width"], pool_param["stride"]
    for i in range(ph):
        for j in range(pw):
            yield i * pw + j, _offset_view(x, i, j, s, Ho, Wo)


def _pool_argmax(x, pool_param, out, winner):
    """Window maxima of x into out (N, C, H', W') and the offset of each window's
    first maximum in row-major order into winner (an integer array like out).

    Ties go to the first maximum, as in max_pool_backward_naive's argmax (and
    PyTorch): every comparison below is a strict '>' of a later offset against
    an earlier one.
    """
    if pool_param["pool_height"] == pool_param["pool_width"] == 2:
        return _pool_argmax_2x2(x, pool_param, out, winner)
    xp = array_module(x)
    for k, view in _pool_windows(x, pool_param):
        if k == 0:
            out[...] = view
            winner.fill(0)
            continue
        better = (view > out).astype(winner.dtype)
        xp.maximum(out, view, out=out)
        winner -= better * (winner - k)  # winner = k where better: integer arithmetic, no masked copy


def _pool_argmax_2x2(x, pool_param, out, winner):
    """_pool_argmax for 2x2 windows, as a tree: the maxima of the top and bottom
    pairs, then of the two; a quarter fewer passes over the strided views. The
    comparisons' booleans are read as int8 where they are (bool and int8 share a
    layout), so the winner costs integer arithmetic and no casts."""
    _argmax_of_four(*(view for _, view in _pool_windows(x, pool_param)), out, winner)


def _argmax_of_four(top_left, top_right, bottom_left, bottom_right, out, winner):
    """out = the maximum of the four, winner = the offset (0-3) of its first in that order."""
    xp = array_module(out)
    xp.maximum(top_left, top_right, out=out)
    bottom = xp.maximum(bottom_left, bottom_right)
    right = xp.greater(top_right, top_left).view(xp.int8)  # offset 1 beats 0
    lower_right = xp.greater(bottom_right, bottom_left).view(xp.int8)  # offset 3 beats 2
    below = xp.greater(bottom, out).view(xp.int8)  # the bottom pair beats the top one
    xp.maximum(out, bottom, out=out)
    # winner = below ? 2 + lower_right : right, as right + below * (2 + lower_right - right)
    lower_right -= right
    lower_right += 2
    lower_right *= below
    xp.add(lower_right, right, out=winner)


def _winner_dtype(xp, pool_param):
    return xp.int8 if pool_param["pool_height"] * pool_param["pool_width"] <= 127 else xp.int32


def _unpool(dout, winner, pool_param, dx):
    """Route dout (N, C, H', W') to each window's winner in dx (N, C, H, W), in place."""
    xp = array_module(dout)
    ph, pw, s = pool_param["pool_height"], pool_param["pool_width"], pool_param["stride"]
    N, C, Ho, Wo = dout.shape
    H, W = dx.shape[2:]
    overlapping = s < ph or s < pw
    if not (s == ph == pw and H == s * Ho and W == s * Wo):  # some inputs are in no window
        dx.fill(0)
    for k, dx_view in _pool_windows(dx, pool_param):
        if overlapping:  # an input in several windows sums their gradients
            dx_view += dout * (winner == k)
        else:
            xp.multiply(dout, winner == k, out=dx_view)
    return dx


def _max_pool(x, pool_param):
    """(out, winner) of _pool_argmax for the whole batch (see _pool_chunks)."""
    xp = array_module(x)
    checks.require_float_array("x", x)
    shape = checks.pool_output_shape(x, pool_param)
    out = xp.empty(shape, dtype=x.dtype)
    winner = xp.empty(shape, dtype=_winner_dtype(xp, pool_param))
    _pool_chunks(x, pool_param, out, winner)
    return out, winner


def _pool_chunks(x, pool_param, out, winner):
    """_pool_argmax of x into out and winner, a few images at a time, so that each chunk's
    strided views and temporaries stay in cache; winner None: the maxima alone (a pass with
    no backward to route). 2x2 windows at stride 2 that tile the map (pools_in_planes) are
    first copied into four contiguous planes, one per offset: a copy of a stride-2 view runs
    about twice as fast as an arithmetic step reading it, and the comparisons then read
    contiguous data (1.2-2x faster than comparing the views, 32 channels of 14x14 to 28x28
    at 2-64 images)."""
    if not pools_in_planes(x.shape, pool_param):
        for rows in backend.image_chunks(x, 4):
            if winner is None:
                _pool_maxima(x[rows], pool_param, out[rows])
            else:
                _pool_argmax(x[rows], pool_param, out[rows], winner[rows])
        return
    N, C, H, W = x.shape
    Ho, Wo = H // 2, W // 2
    chunks = backend.image_chunks(x, 2)
    planes = array_module(x).empty((chunks[0].stop - chunks[0].start, C, 2, 2, Ho, Wo), dtype=x.dtype)
    for rows in chunks:
        p = planes[: rows.stop - rows.start]
        p[...] = _in_pool_order(x[rows])
        _pool_planes(p, out[rows], None if winner is None else winner[rows])


def _pool_maxima(x, pool_param, out):
    """The window maxima of x into out, over the strided views, without their winners."""
    xp = array_module(x)
    for k, view in _pool_windows(x, pool_param):
        if k == 0:
            out[...] = view
        else:
            xp.maximum(out, view, out=out)


def _pool_planes(p, out, winner):
    """The 2x2 windows' maxima of planes p (n, C, 2, 2, H', W') into out (n, C, H', W'), and with
    winner given each window's winner (_argmax_of_four); without, p is overwritten as scratch."""
    if winner is not None:
        _argmax_of_four(p[:, :, 0, 0], p[:, :, 0, 1], p[:, :, 1, 0], p[:, :, 1, 1], out, winner)
        return
    xp = array_module(p)
    xp.maximum(p[:, :, 0, 0], p[:, :, 0, 1], out=out)
    xp.maximum(p[:, :, 1, 0], p[:, :, 1, 1], out=p[:, :, 1, 0])
    xp.maximum(out, p[:, :, 1, 0], out=out)


def _in_pool_order(a):
    """a (n, C, H, W), H and W even, viewed (n, C, 2, 2, H/2, W/2): the 2x2 windows' four offsets as planes."""
    n, C, H, W = a.shape
    return a.reshape(n, C, H // 2, 2, W // 2, 2).transpose(0, 1, 3, 5, 2, 4)


def max_pool_forward_fast(x, pool_param):
    """Max pooling as elementwise maxima of strided views; arguments and output of
    max_pool_forward_naive (any stride, overlapping windows included).

    x: (N, C, H, W). Returns (out, cache): out (N, C, H', W'); cache (x, pool_param)
    carrying the argmax of each window for the backward (see _PoolCache).
    """
    out, winner = _max_pool(x, pool_param)
    cache = _PoolCache((x, pool_param))
    cache.winner = winner
    return out, cache


def max_pool_backward_fast(dout, cache):
    """dout: (N, C, H', W'). Returns dx shaped like x.

    As max_pool_backward_naive: each window's gradient goes to its first maximum
    in row-major order. cache: from either max_pool_forward_fast or
    max_pool_forward_naive.
    """
    x, pool_param = cache
    checks.require_dout_shape(dout, checks.pool_output_shape(x, pool_param))
    winner = getattr(cache, "winner", None)
    if winner is None:
        winner = _max_pool(x, pool_param)[1]
    return unpool_fast(dout, winner, pool_param, x.shape)


# ---------------------------------------------------------------------------
# spatial norm -> 2x2 max pool: the norm's output written in the pool's order
# ---------------------------------------------------------------------------


def pools_in_planes(x_shape, pool_param) -> bool:
    """Whether spatial_norm_pool_forward_fast takes its fused path: 2x2 windows at stride 2
    tiling even maps."""
    ph, pw, s = pool_param["pool_height"], pool_param["pool_width"], pool_param["stride"]
    return ph == pw == s == 2 and x_shape[2] % 2 == 0 and x_shape[3] % 2 == 0


def spatial_norm_pool_forward_fast(x, kind, norm_args, pool_param, record_winners: bool = True):
    """Spatial batch norm ("batchnorm", norm_args (gamma, beta, bn_param)) or group norm
    ("groupnorm", (gamma, beta, G, gn_param)) of x (N, C, H, W), then a 2x2 stride-2 max
    pool (pools_in_planes must hold). Returns (pooled (N, C, H/2, W/2), the norm's cache,
    winner): the norm's cache as its fast forward returns it, winner as max_pool_forward_fast
    records it (see _PoolCache); with them layer_utils' sandwich runs the usual backward.
    record_winners False: winner is None (a pass with no backward: a third of the pool's work).

    The norm's output is written, as the affine map it ends with computes it, into four
    planes, one per offset in the 2x2 windows (N, C, 2, 2, H/2, W/2): that map reads x
    through one strided view, and the pool then compares contiguous planes, where
    pooling the norm's output would read four strided views (NumPy runs an operation on
    a stride-2 view about 6x slower than on contiguous data).
    """
    xp = array_module(x)
    N, C, H, W = x.shape
    Ho, Wo = H // 2, W // 2
    planes = xp.empty((N, C, 2, 2, Ho, Wo), dtype=x.dtype)

    # The strided view copied into the planes, then the affine map on them in place: a
    # copy of the view runs about twice as fast as an arithmetic operation reading it.
    def per_images(v, rows):  # a coefficient (C,), or one row per image (N, C)
        return v if v.ndim == 1 else v[rows]

    if kind == "batchnorm":
        scale, offset, cache = batchnorm_map(x, *norm_args)
        if scale.ndim == 2:  # ghost groups: each image its group's row
            scale, offset = (xp.repeat(v, N // v.shape[0], axis=0) for v in (scale, offset))
        for rows in backend.image_chunks(x, 2):
            target = planes[rows]
            target[...] = _in_pool_order(x[rows])
            flat = target.reshape(-1, C, H * W)
            channel_affine(flat, per_images(scale, rows), per_images(offset, rows), flat)
    else:
        def write(rows, x_hat_rows, g, bt):
            target = planes[rows]
            target[...] = _in_pool_order(x_hat_rows)
            flat = target.reshape(-1, C, H * W)
            channel_affine(flat, g, bt, flat)

        cache = groupnorm_normalise(x, *norm_args, write)
    pooled = xp.empty((N, C, Ho, Wo), dtype=x.dtype)
    winner = xp.empty((N, C, Ho, Wo), dtype=_winner_dtype(xp, pool_param)) if record_winners else None
    for rows in backend.image_chunks(planes, 2):
        _pool_planes(planes[rows], pooled[rows], None if winner is None else winner[rows])
    return pooled, cache, winner


def unpool_fast(dout, winner, pool_param, x_shape):
    """dx (x_shape) of a max pool whose windows' winners were recorded (winner), for dout."""
    dx = array_module(dout).empty(x_shape, dtype=dout.dtype)
    for rows in backend.image_chunks(dx, 4):
        _unpool(dout[rows], winner[rows], pool_param, dx[rows])
    return dx


# ---------------------------------------------------------------------------
# conv -> relu -> max pool, fused
# ---------------------------------------------------------------------------


def conv_relu_pool_forward_fast(x, w, b, conv_param, pool_param, record_winners: bool = True):
    """conv -> relu -> max pool without the full-size activation in memory.

    x: (N, C, H, W); w: (F, C, HH, WW); b: (F,); conv_param and pool_param as
    for the separate layers. Each chunk of images is convolved and pooled while
    its output is in cache; the relu acts on the pooled map, since
    relu(max(a)) = max(relu(a)), and its gradient is the same as the chain's.
    Returns (out, cache): out (N, F, H'', W''), equal to the separate layers'
    to rounding; cache for conv_relu_pool_backward_fast.

    record_winners False: the pool keeps its maxima alone, not where each window's
    was (a third of the pool's work), for a pass that is seldom followed by a
    backward (a net in test mode); a backward then finds them by running this
    forward again, to the same bits.
    """
    xp = array_module(x)
    checks.conv_forward_inputs(x, w, b, conv_param)
    out = winner = None
    for rows, a in fast_conv.output_chunks(x, w, b, conv_param["stride"], conv_param["pad"]):
        if out is None:
            N, F = x.shape[0], w.shape[0]
            _, _, Hp, Wp = checks.pool_output_shape(a, pool_param)
            out = xp.empty((N, F, Hp, Wp), dtype=x.dtype)
            if record_winners:
                winner = xp.empty((N, F, Hp, Wp), dtype=_winner_dtype(xp, pool_param))
        _pool_chunks(a, pool_param, out[rows], None if winner is None else winner[rows])
    xp.maximum(out, 0, out=out)
    return out, (x, w, b, conv_param, pool_param, out, winner)


def conv_relu_pool_backward_fast(dout, cache, need_dx: bool = True):
    """dout: (N, F, H'', W''). Returns (dx, dw, db); dx is None when need_dx is False.

    The conv output's gradient is rebuilt one chunk at a time from dout and the
    winners the forward recorded, and used while it is in cache.
    """
    x, w, b, conv_param, pool_param, out, winner = cache
    checks.require_dout_shape(dout, out.shape)
    if winner is None:  # a forward without record_winners
        winner = conv_relu_pool_forward_fast(x, w, b, conv_param, pool_param)[1][-1]
    dpooled = dout * (out > 0)  # relu's gradient, on the pooled map

    def unpool(rows, da):
        _unpool(dpooled[rows], winner[rows], pool_param, da)

    return fast_conv.gradients(x, w, conv_param["stride"], conv_param["pad"], need_dx, fill_dout=unpool)
