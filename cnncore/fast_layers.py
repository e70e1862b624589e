"""Vectorised twins of the naive convolution and max pool in ``cnncore.layers``.

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

from . import checks, fast_conv
from .backend import array_module, chunk_bytes
from .layers import _running_stats, _update_running_stats


# ---------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------


def _offset_view(a, i, j, stride, Ho, Wo):
    """a[..., i + stride*h, j + stride*w] for h < Ho, w < Wo: a strided view."""
    return a[..., i : i + stride * (Ho - 1) + 1 : stride, j : j + stride * (Wo - 1) + 1 : stride]


def _images_per_chunk(N, bytes_per_image, xp):
    return max(1, min(N, chunk_bytes(xp) // max(bytes_per_image, 1)))


def _image_chunks(x, arrays):
    """Slices of x's batch: chunks of images over which ``arrays`` arrays like x fit in cache."""
    N = x.shape[0]
    n = _images_per_chunk(N, arrays * x[:1].nbytes, array_module(x))
    return [slice(start, min(start + n, N)) for start in range(0, N, n)]


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
    pairs, then of the two; a quarter fewer passes over the strided views."""
    xp = array_module(x)
    top_left, top_right, bottom_left, bottom_right = (view for _, view in _pool_windows(x, pool_param))
    xp.maximum(top_left, top_right, out=out)
    bottom = xp.maximum(bottom_left, bottom_right)
    right = (top_right > top_left).astype(winner.dtype)  # offset 1 beats 0
    below = (bottom > out).astype(winner.dtype)  # the bottom pair beats the top one
    xp.maximum(out, bottom, out=out)
    winner[...] = (bottom_right > bottom_left).astype(winner.dtype)
    winner += 2 - right  # 2 or 3, less the top pair's offset
    winner *= below
    winner += right  # offset 0 or 1 above, 2 or 3 below


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
    """(out, winner) of _pool_argmax for the whole batch, a few images at a time,
    so that each chunk's strided views and temporaries stay in cache."""
    xp = array_module(x)
    checks.require_float_array("x", x)
    shape = checks.pool_output_shape(x, pool_param)
    out = xp.empty(shape, dtype=x.dtype)
    winner = xp.empty(shape, dtype=_winner_dtype(xp, pool_param))
    for rows in _image_chunks(x, 4):
        _pool_argmax(x[rows], pool_param, out[rows], winner[rows])
    return out, winner


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
    dx = array_module(x).empty_like(x)
    for rows in _image_chunks(x, 4):
        _unpool(dout[rows], winner[rows], pool_param, dx[rows])
    return dx


# ---------------------------------------------------------------------------
# Spatial normalisation
# ---------------------------------------------------------------------------
# Twins of layers.spatial_batchnorm_* and layers.spatial_groupnorm_*: the same
# arguments and results. Every per-channel or per-group statistic is a
# reduction along contiguous rows of x viewed (rows, length): a matrix-vector
# product for sums, an einsum for sums of products; never a transposed copy.
# The elementwise steps run chunk by chunk of images, so that the few arrays
# each chunk touches stay in cache from one step to the next.


def _row_sums(a):
    """a (R, L) -> (R,) row sums, as one matrix-vector product."""
    return a @ array_module(a).ones(a.shape[1], dtype=a.dtype)


def _row_dots(a, b):
    """a, b (R, L) -> (R,): sum(a * b) along each row, without the product array,
    as R (1, L) @ (L, 1) products (twice as fast as einsum's 'ij,ij->i' in NumPy 2.4)."""
    return array_module(a).matmul(a[:, None, :], b[:, :, None]).reshape(a.shape[0])


def _per_image_channel(rows_reduction, a, *others):
    """rows_reduction over each (image, channel) row of a (N, C, H, W) (and of
    the arrays in others, alike): (N, C)."""
    N, C = a.shape[:2]
    return rows_reduction(*(t.reshape(N * C, -1) for t in (a, *others))).reshape(N, C)


def _channel(v, image_shape):
    """(C,) -> (C, H, W) = image_shape, each channel's value repeated over its
    pixels: one image's worth, to broadcast over the images of (n, C, H, W).

    Elementwise steps with it read two contiguous arrays, which NumPy runs about
    1.7x as fast as broadcasting a (C, 1, 1) column along each row (NumPy 2.4).
    """
    xp = array_module(v)
    return xp.ascontiguousarray(xp.broadcast_to(v.reshape(-1, 1, 1), image_shape))


def spatial_batchnorm_forward_fast(x, gamma, beta, bn_param):
    """Batch normalisation per channel; the arguments and output of
    layers.spatial_batchnorm_forward (bn_param's running statistics and norm_batch included).

    x: (N, C, H, W); gamma, beta: (C,) or (1, C, 1, 1).
    Returns (out, cache): out (N, C, H, W); cache (x, mean, inv_std, gamma (C,), mode,
    gamma.shape, beta.shape) for spatial_batchnorm_backward_fast, where mean and
    inv_std are (C,), or (N / norm_batch, C) in train mode with ghost groups (one row
    per group). The reference layer's cache holds x_hat instead of x: each backward
    takes its own forward's cache, as the sandwiches of layer_utils pair them.

    Two passes over x and one write of out, the least memory traffic there is:
    the statistics in one pass (sums and sums of squares of x less a per-channel
    shift, chunk by chunk in cache), then out = x * scale + offset per channel
    (per image and channel with ghost groups). Neither x - mean nor x_hat is
    stored: the cache keeps x itself, which costs no memory, and the backward
    needs only per-channel affine maps of it.
    """
    checks.require_float_array("x", x)
    checks.require_ndim("x", x, 4, "(N, C, H, W)")
    xp = array_module(x)
    N, C, H, W = x.shape
    g = checks.affine_params("gamma", gamma, C)
    bt = checks.affine_params("beta", beta, C)
    mode, eps, momentum = checks.bn_settings(bn_param, x.shape, N * H * W)
    groups = checks.bn_groups(bn_param, mode, N)
    running_mean, running_var = _running_stats(bn_param, C, xp, x.dtype)
    chunks = _image_chunks(x, 3)
    if mode == "train":
        mean, var = _channel_mean_var(x, chunks, groups)
        _update_running_stats(bn_param, mean, var, momentum)
    else:
        mean, var = running_mean, running_var
    inv_std = 1 / xp.sqrt(var + eps)
    scale = g * inv_std
    offset = bt - mean * scale
    out = xp.empty_like(x)
    scale, offset = (_per_image(v, x.shape) for v in (scale, offset))
    for rows in chunks:
        xp.multiply(x[rows], scale[rows], out=out[rows])
        out[rows] += offset[rows]
    return out, (x, mean, inv_std, g, mode, gamma.shape, beta.shape)


def _per_image(v, x_shape):
    """A per-channel coefficient v, (C,) or (groups, C) (one row per ghost group of
    consecutive images), as an array that broadcasts against x[rows] for a slice of images.

    (C,): one contiguous (C, H, W) image, repeated over the images by a view (see _channel);
    (groups, C): each image's row as (N, C, 1, 1).
    """
    xp = array_module(v)
    N = x_shape[0]
    if v.ndim == 1:
        return xp.broadcast_to(_channel(v, x_shape[1:]), x_shape)
    return xp.repeat(v, N // v.shape[0], axis=0)[:, :, None, None]


def _channel_mean_var(x, chunks, groups=1):
    """Per-channel mean and (biased) variance of x (N, C, H, W) in one pass over memory,
    as mean(x**2) - mean(x)**2 from per-image sums and sums of squares: (C,) each, or
    (groups, C) for ghost batch norm's groups of N / groups consecutive images.

    That formula loses about (mean / std)**2 units in the last place to
    cancellation: nothing that matters in float64, which takes the sums of x
    itself. Narrower types first shift each chunk by the channel means of the
    first image, into a buffer that stays in cache (one more elementwise step):
    with the shift close to the mean, nothing cancels.
    """
    xp = array_module(x)
    N, C, H, W = x.shape
    shift = None
    if x.dtype.itemsize < 8:
        shift = _channel(_per_image_channel(_row_sums, x[:1])[0] / (H * W), x.shape[1:])
        buffer = xp.empty_like(x[chunks[0]])
    sums, squares = xp.empty((N, C), dtype=x.dtype), xp.empty((N, C), dtype=x.dtype)
    for rows in chunks:
        s = x[rows] if shift is None else xp.subtract(x[rows], shift, out=buffer[: rows.stop - rows.start])
        sums[rows] = _per_image_channel(_row_sums, s)
        squares[rows] = _per_image_channel(_row_dots, s, s)
    M = N // groups * H * W
    mean = _group_sums(sums, groups) / M
    var = _group_sums(squares, groups) / M - mean * mean
    return (mean if shift is None else mean + shift[:, 0, 0]), var


def _group_sums(per_image, groups):
    """(N, C) per-image sums -> (C,) over the batch, or (groups, C) over each ghost group."""
    if groups == 1:
        return per_image.sum(axis=0)
    return per_image.reshape(groups, -1, per_image.shape[1]).sum(axis=1)


def spatial_batchnorm_backward_fast(dout, cache):
    """dout: (N, C, H, W). Returns (dx, dgamma, dbeta), the latter two shaped like gamma/beta.

    With dx_hat = gamma * dout, per channel (and ghost group; train mode):
    dx = inv_std * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)),
    which is dout * a + x * b + c per channel; dx = inv_std * dx_hat in test mode.
    Two passes over dout and x: the per-channel sums of dout and dout * x (from
    which dbeta and dgamma follow), then dx. sum(dout * x_hat) is taken as
    (sum(dout * x) - mean * sum(dout)) * inv_std, which loses about
    |mean| / std units in the last place to cancellation: nothing in float64,
    and in float32 only for inputs whose mean is large against their spread.
    """
    x, mean, inv_std, g, mode, gamma_shape, beta_shape = cache
    checks.require_dout_shape(dout, x.shape)
    xp = array_module(dout)
    N, C, H, W = dout.shape
    groups = mean.shape[0] if mean.ndim == 2 else 1
    M = N // groups * H * W
    chunks = _image_chunks(dout, 3)
    sums, dots = xp.empty((N, C), dtype=dout.dtype), xp.empty((N, C), dtype=dout.dtype)
    for rows in chunks:
        sums[rows] = _per_image_channel(_row_sums, dout[rows])
        dots[rows] = _per_image_channel(_row_dots, dout[rows], x[rows])
    dbeta = _group_sums(sums, groups)
    dgamma = (_group_sums(dots, groups) - mean * dbeta) * inv_std  # sum(dout * x_hat)
    a = g * inv_std
    dx = xp.empty_like(dout)
    if mode == "test":
        xp.multiply(dout, _channel(a, dout.shape[1:]), out=dx)
        return dx, dgamma.reshape(gamma_shape), dbeta.reshape(beta_shape)
    b = -a * inv_std * dgamma / M  # through x_hat * mean(dx_hat * x_hat), x_hat = (x - mean) * inv_std
    c = -a * dbeta / M - b * mean
    x_part = xp.empty_like(x[chunks[0]])
    a, b, c = (_per_image(v, dout.shape) for v in (a, b, c))
    for rows in chunks:
        d, t = dx[rows], x_part[: rows.stop - rows.start]
        xp.multiply(dout[rows], a[rows], out=d)
        d += xp.multiply(x[rows], b[rows], out=t)
        d += c[rows]
    if groups > 1:  # the groups' parts of dgamma and dbeta, summed
        dgamma, dbeta = dgamma.sum(axis=0), dbeta.sum(axis=0)
    return dx, dgamma.reshape(gamma_shape), dbeta.reshape(beta_shape)


def spatial_groupnorm_forward_fast(x, gamma, beta, G, gn_param):
    """Group normalisation; the arguments, output and cache of layers.spatial_groupnorm_forward.

    x: (N, C, H, W); gamma, beta: (C,) or (1, C, 1, 1); G divides C; gn_param: optional 'eps'.
    Returns (out, cache): out (N, C, H, W); cache (x_hat, inv_std (N, G, 1), gamma
    as (1, C, 1, 1), G, gamma.shape, beta.shape), which either backward accepts.
    """
    checks.require_float_array("x", x)
    checks.require_ndim("x", x, 4, "(N, C, H, W)")
    xp = array_module(x)
    N, C, H, W = x.shape
    checks.groups(G, C)
    g = checks.affine_params("gamma", gamma, C).reshape(1, C, 1, 1)
    bt = checks.affine_params("beta", beta, C).reshape(1, C, 1, 1)
    eps = checks.norm_eps("gn_param", gn_param)
    L = C // G * H * W
    x_hat, out = xp.empty_like(x), xp.empty_like(x)
    inv_std = xp.empty((N, G), dtype=x.dtype)
    for rows in _image_chunks(x, 3):
        group_rows = x[rows].reshape(-1, L)  # one row per (image, group)
        x_hat_rows = x_hat[rows].reshape(-1, L)
        xp.subtract(group_rows, (_row_sums(group_rows) / L)[:, None], out=x_hat_rows)
        inv = 1 / xp.sqrt(_row_dots(x_hat_rows, x_hat_rows) / L + eps)
        x_hat_rows *= inv[:, None]
        inv_std[rows] = inv.reshape(-1, G)
        xp.multiply(x_hat[rows], g, out=out[rows])
        out[rows] += bt
    return out, (x_hat, inv_std.reshape(N, G, 1), g, G, gamma.shape, beta.shape)


def spatial_groupnorm_backward_fast(dout, cache):
    """dout: (N, C, H, W). Returns (dx, dgamma, dbeta), the latter two shaped like gamma/beta.

    cache: from either spatial_groupnorm_forward_fast or layers.spatial_groupnorm_forward.
    With dx_hat = gamma * dout, per group:
    dx = inv_std * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)),
    evaluated in that order, as the reference does; both means come from the
    per-(image, channel) sums that dgamma and dbeta need.
    """
    x_hat, inv_std, g, G, gamma_shape, beta_shape = cache
    checks.require_dout_shape(dout, x_hat.shape)
    xp = array_module(dout)
    N, C, H, W = dout.shape
    sums = xp.empty((N, C), dtype=dout.dtype)
    dots = xp.empty((N, C), dtype=dout.dtype)
    dx = xp.empty_like(dout)
    for rows in _image_chunks(dout, 3):
        sums[rows] = _per_image_channel(_row_sums, dout[rows])
        dots[rows] = _per_image_channel(_row_dots, dout[rows], x_hat[rows])
        group_means = [(s * g.reshape(C)).reshape(-1, G, C // G).mean(axis=2, keepdims=True) / (H * W)
                       for s in (sums[rows], dots[rows])]  # mean(dx_hat), mean(dx_hat * x_hat): (n, G, 1)
        d = dx[rows]
        xp.multiply(dout[rows], g, out=d)
        groups = d.reshape(-1, G, C // G * H * W)
        groups -= group_means[0]
        groups -= x_hat[rows].reshape(groups.shape) * group_means[1]
        groups *= inv_std[rows]
    return dx, dots.sum(axis=0).reshape(gamma_shape), sums.sum(axis=0).reshape(beta_shape)


# ---------------------------------------------------------------------------
# conv -> relu -> max pool, fused
# ---------------------------------------------------------------------------


def conv_relu_pool_forward_fast(x, w, b, conv_param, pool_param):
    """conv -> relu -> max pool without the full-size activation in memory.

    x: (N, C, H, W); w: (F, C, HH, WW); b: (F,); conv_param and pool_param as
    for the separate layers. Each chunk of images is convolved and pooled while
    its output is in cache; the relu acts on the pooled map, since
    relu(max(a)) = max(relu(a)), and its gradient is the same as the chain's.
    Returns (out, cache): out (N, F, H'', W''), equal to the separate layers'
    to rounding; cache for conv_relu_pool_backward_fast.
    """
    xp = array_module(x)
    checks.conv_forward_inputs(x, w, b, conv_param)
    out = winner = None
    for rows, a in fast_conv.output_chunks(x, w, b, conv_param["stride"], conv_param["pad"]):
        if out is None:
            N, F = x.shape[0], w.shape[0]
            _, _, Hp, Wp = checks.pool_output_shape(a, pool_param)
            out = xp.empty((N, F, Hp, Wp), dtype=x.dtype)
            winner = xp.empty((N, F, Hp, Wp), dtype=_winner_dtype(xp, pool_param))
        _pool_argmax(a, pool_param, out[rows], winner[rows])
    xp.maximum(out, 0, out=out)
    return out, (x, w, b, conv_param, pool_param, out, winner)


def conv_relu_pool_backward_fast(dout, cache, need_dx: bool = True):
    """dout: (N, F, H'', W''). Returns (dx, dw, db); dx is None when need_dx is False.

    The conv output's gradient is rebuilt one chunk at a time from dout and the
    winners the forward recorded, and used while it is in cache.
    """
    x, w, b, conv_param, pool_param, out, winner = cache
    checks.require_dout_shape(dout, out.shape)
    dpooled = dout * (out > 0)  # relu's gradient, on the pooled map

    def unpool(rows, da):
        _unpool(dpooled[rows], winner[rows], pool_param, da)

    return fast_conv.gradients(x, w, conv_param["stride"], conv_param["pad"], need_dx, fill_dout=unpool)
