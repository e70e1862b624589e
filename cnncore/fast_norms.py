"""Vectorised twins of the normalisation layers of ``cnncore.layers``, re-exported by ``fast_layers``.

Spatial batch norm and group norm on (N, C, H, W), and batch norm and layer
norm on (N, D) (the FullyConnectedNet's): the same arguments, results (to
rounding) and caches as the reference layers, bn_param's running statistics
and ghost batch norm's norm_batch included.

Every statistic is a reduction along contiguous rows of the input viewed
(rows, length): a matrix-vector product for sums, a row-wise dot product for
sums of products; never a transposed copy, never a reduction over several axes
(NumPy's generic reductions cost several microseconds of set-up each, which is
most of a layer's time at a batch of 2). Per-channel coefficients multiply
rows through one channel's worth of values repeated over its pixels, (C, H*W),
contiguous like x itself. The elementwise steps run chunk by chunk of images
(``backend.chunk_bytes``), so that what each chunk touches stays in cache from
one step to the next; a small batch is one chunk.
"""

from __future__ import annotations

from . import backend, checks
from .backend import array_module
from .layers import running_stats, update_running_stats


def row_dots(a, b):
    """a, b (..., L) -> (...): the dot product of each row pair, without the product array
    (numpy's vecdot, 2.0+; else (1, L) @ (L, 1) products, twice einsum's speed in NumPy 1.26)."""
    xp = array_module(a)
    if hasattr(xp, "vecdot"):
        return xp.vecdot(a, b)
    return xp.matmul(a[..., None, :], b[..., :, None])[..., 0, 0]


def _over_pixels(v, L):
    """(C,) -> (C, L): each channel's value repeated over its L pixels, contiguous, to
    broadcast over the images of (n, C, L): NumPy runs elementwise steps on two
    contiguous operands faster than with a (C, 1) column broadcast along each row
    (1.3-1.7x on 7x7 to 28x28 maps at batch 8 and up, NumPy 2.4), and repeat builds it
    faster than broadcast_to and a copy."""
    return array_module(v).repeat(v, L).reshape(v.shape[0], L)


def _group_sums(per_image, groups):
    """(N, C) per-image sums -> (C,) over the batch, or (groups, C) over each ghost group."""
    xp = array_module(per_image)
    if groups == 1:
        return backend.ones(xp, per_image.shape[0], per_image.dtype) @ per_image
    return per_image.reshape(groups, -1, per_image.shape[1]).sum(axis=1)


# ---------------------------------------------------------------------------
# Spatial batch norm
# ---------------------------------------------------------------------------


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
    shift), then out = x * scale + offset per channel (per image and channel with
    ghost groups). Neither x - mean nor x_hat is stored: the cache keeps x itself,
    which costs no memory, and the backward needs only per-channel affine maps of it.
    """
    scale, offset, cache = batchnorm_map(x, gamma, beta, bn_param)
    out = array_module(x).empty_like(x)
    N, C, H, W = x.shape
    channel_affine(x.reshape(N, C, H * W), scale, offset, out.reshape(N, C, H * W))
    return out, cache


def batchnorm_map(x, gamma, beta, bn_param):
    """Spatial batch norm of x (N, C, H, W) as the affine map it is once its statistics are
    known (taken, and bn_param's running ones updated, in train mode): (scale, offset, cache),
    out = x * scale + offset per channel; scale and offset (C,), or (groups, C) for ghost
    batch norm's groups of consecutive images; cache spatial_batchnorm_forward_fast's."""
    checks.require_float_array("x", x)
    checks.require_ndim("x", x, 4, "(N, C, H, W)")
    xp = array_module(x)
    N, C, H, W = x.shape
    g = checks.affine_params("gamma", gamma, C)
    bt = checks.affine_params("beta", beta, C)
    mode, eps, momentum = checks.bn_settings(bn_param, x.shape, N * H * W)
    groups = checks.bn_groups(bn_param, mode, N)
    running_mean, running_var = running_stats(bn_param, C, xp, x.dtype)
    if mode == "train":
        mean, var = _channel_mean_var(x.reshape(N, C, H * W), groups)
        update_running_stats(bn_param, mean, var, momentum)
    else:
        mean, var = running_mean, running_var
    inv_std = 1 / xp.sqrt(var + eps)
    scale = g * inv_std
    return scale, bt - mean * scale, (x, mean, inv_std, g, mode, gamma.shape, beta.shape)


def channel_affine(x3, scale, offset, out3, more=None):
    """out3 = x3 * scale + offset per channel, x3 and out3 (N, C, L); scale and offset (C,), or
    (groups, C) for ghost batch norm's groups of consecutive images; offset None: 0.
    more = (y3, y_scale): out3 += y3 * y_scale as well (batch norm's backward), in the same chunk.
    """
    xp = array_module(x3)
    N, C, L = x3.shape
    terms = [(x3, scale)] + ([more] if more else [])
    if scale.ndim == 1:  # one value per channel, repeated over the pixels: contiguous operands
        def per_channel(v):
            return _over_pixels(v, L)

        def of_images(a, rows):
            return a
    else:  # per ghost group: each image's row, (N, C, 1)
        def per_channel(v):
            return xp.repeat(v, N // v.shape[0], axis=0)[:, :, None]

        def of_images(a, rows):
            return a[rows]
    terms = [(y, per_channel(v)) for y, v in terms]
    offset = None if offset is None else per_channel(offset)
    buffer = None
    for rows in backend.image_chunks(x3, 2 + len(terms)):
        o = out3[rows]
        xp.multiply(terms[0][0][rows], of_images(terms[0][1], rows), out=o)
        for y, v in terms[1:]:
            if buffer is None:
                buffer = xp.empty_like(o)
            o += xp.multiply(y[rows], of_images(v, rows), out=buffer[: o.shape[0]])
        if offset is not None:
            o += of_images(offset, rows)


def _channel_mean_var(x3, groups=1):
    """Per-channel mean and (biased) variance of x3 (N, C, L) in one pass over memory,
    as mean(x**2) - mean(x)**2 from per-image sums and sums of squares: (C,) each, or
    (groups, C) for ghost batch norm's groups of N / groups consecutive images.

    That formula loses about (mean / std)**2 units in the last place to
    cancellation: nothing that matters in float64, which takes the sums of x
    itself. Narrower types first shift x by the channel means of the first
    image, chunk by chunk into a buffer that stays in cache (one more
    elementwise step): with the shift close to the mean, nothing cancels.
    """
    xp = array_module(x3)
    N, C, L = x3.shape
    ones = backend.ones(xp, L, x3.dtype)
    shift = None if x3.dtype.itemsize >= 8 else (x3[0] @ ones) / L
    chunks = backend.image_chunks(x3, 2)
    if len(chunks) == 1:
        s = x3 if shift is None else x3 - shift[:, None]
        sums, squares = s @ ones, row_dots(s, s)
    else:
        buffer = None if shift is None else xp.empty_like(x3[chunks[0]])
        sums, squares = xp.empty((N, C), dtype=x3.dtype), xp.empty((N, C), dtype=x3.dtype)
        for rows in chunks:
            s = x3[rows] if shift is None else xp.subtract(x3[rows], shift[:, None], out=buffer[: rows.stop - rows.start])
            sums[rows] = s @ ones
            squares[rows] = row_dots(s, s)
    M = N // groups * L
    mean = _group_sums(sums, groups) / M
    var = _group_sums(squares, groups) / M - mean * mean
    return (mean if shift is None else mean + shift), var


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
    L = H * W
    groups = mean.shape[0] if mean.ndim == 2 else 1
    M = N // groups * L
    d3, x3 = dout.reshape(N, C, L), x.reshape(N, C, L)
    dbeta = _group_sums(d3 @ backend.ones(xp, L, dout.dtype), groups)
    dgamma = (_group_sums(row_dots(d3, x3), groups) - mean * dbeta) * inv_std  # sum(dout * x_hat)
    a = g * inv_std
    dx = xp.empty_like(dout)
    if mode == "test":
        channel_affine(d3, a, None, dx.reshape(d3.shape))
        return dx, dgamma.reshape(gamma_shape), dbeta.reshape(beta_shape)
    b = -a * inv_std * dgamma / M  # through x_hat * mean(dx_hat * x_hat), x_hat = (x - mean) * inv_std
    c = -a * dbeta / M - b * mean
    channel_affine(d3, a, c, dx.reshape(d3.shape), more=(x3, b))
    if groups > 1:  # the groups' parts of dgamma and dbeta, summed
        dgamma, dbeta = dgamma.sum(axis=0), dbeta.sum(axis=0)
    return dx, dgamma.reshape(gamma_shape), dbeta.reshape(beta_shape)


# ---------------------------------------------------------------------------
# Spatial group norm
# ---------------------------------------------------------------------------


def spatial_groupnorm_forward_fast(x, gamma, beta, G, gn_param):
    """Group normalisation; the arguments, output and cache of layers.spatial_groupnorm_forward.

    x: (N, C, H, W); gamma, beta: (C,) or (1, C, 1, 1); G divides C; gn_param: optional 'eps'.
    Returns (out, cache): out (N, C, H, W); cache (x_hat, inv_std (N, G, 1), gamma
    as (1, C, 1, 1), G, gamma.shape, beta.shape), which either backward accepts.
    """
    xp = array_module(x)
    out = xp.empty_like(x)
    N, C, H, W = x.shape
    scale = offset = None

    def write(rows, x_hat_rows, g, bt):  # out = x_hat * gamma + beta, while the chunk is in cache
        nonlocal scale, offset
        if scale is None:
            scale, offset = (_over_pixels(v, H * W).reshape(C * H * W) for v in (g, bt))
        out_images = out[rows].reshape(-1, C * H * W)
        xp.multiply(x_hat_rows.reshape(-1, C * H * W), scale, out=out_images)
        out_images += offset

    cache = groupnorm_normalise(x, gamma, beta, G, gn_param, write)
    return out, cache


def groupnorm_normalise(x, gamma, beta, G, gn_param, write):
    """x_hat of spatial group norm, chunk by chunk of images: each chunk's handed to
    write(rows, x_hat_rows, gamma (C,), beta (C,)) while it is in cache, for the output.
    Returns spatial_groupnorm_forward_fast's cache."""
    checks.require_float_array("x", x)
    checks.require_ndim("x", x, 4, "(N, C, H, W)")
    xp = array_module(x)
    N, C, H, W = x.shape
    checks.groups(G, C)
    g = checks.affine_params("gamma", gamma, C)
    bt = checks.affine_params("beta", beta, C)
    eps = checks.norm_eps("gn_param", gn_param)
    L = C // G * H * W
    x_hat = xp.empty_like(x)
    inv_std = xp.empty((N, G), dtype=x.dtype)
    ones = backend.ones(xp, L, x.dtype)
    for rows in backend.image_chunks(x, 3):
        group_rows = x[rows].reshape(-1, L)  # one row per (image, group)
        x_hat_rows = x_hat[rows].reshape(-1, L)
        xp.subtract(group_rows, ((group_rows @ ones) / L)[:, None], out=x_hat_rows)
        inv = 1 / xp.sqrt(row_dots(x_hat_rows, x_hat_rows) / L + eps)
        x_hat_rows *= inv[:, None]
        inv_std[rows] = inv.reshape(-1, G)
        write(rows, x_hat[rows], g, bt)
    return x_hat, inv_std.reshape(N, G, 1), g.reshape(1, C, 1, 1), G, gamma.shape, beta.shape


def spatial_groupnorm_backward_fast(dout, cache):
    """dout: (N, C, H, W). Returns (dx, dgamma, dbeta), the latter two shaped like gamma/beta.

    cache: from either spatial_groupnorm_forward_fast or layers.spatial_groupnorm_forward.
    With dx_hat = gamma * dout, per group:
    dx = inv_std * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)),
    evaluated in that order, as the reference does (so a group of one value gets
    exactly 0); both means come from the per-(image, channel) sums that dgamma
    and dbeta need.
    """
    x_hat, inv_std, g, G, gamma_shape, beta_shape = cache
    checks.require_dout_shape(dout, x_hat.shape)
    xp = array_module(dout)
    N, C, H, W = dout.shape
    L, per_group = H * W, C // G
    d3 = dout.reshape(N, C, L)
    sums, dots = d3 @ backend.ones(xp, L, dout.dtype), row_dots(d3, x_hat.reshape(N, C, L))  # (N, C) each
    gC = g.reshape(C)
    to_groups = backend.ones(xp, per_group, dout.dtype) / (per_group * L)
    # mean(dx_hat) and mean(dx_hat * x_hat) per (image, group), (N, G, 1)
    mean_dxh = ((sums * gC).reshape(N, G, per_group) @ to_groups)[:, :, None]
    mean_dxh_xh = ((dots * gC).reshape(N, G, per_group) @ to_groups)[:, :, None]
    scale = _over_pixels(gC, L).reshape(C * L)
    dx = xp.empty_like(dout)
    buffer = None
    for rows in backend.image_chunks(dout, 3):
        d = dx[rows]
        xp.multiply(dout[rows].reshape(-1, C * L), scale, out=d.reshape(-1, C * L))
        groups = d.reshape(-1, G, per_group * L)
        if buffer is None:
            buffer = xp.empty_like(groups)
        groups -= mean_dxh[rows]
        groups -= xp.multiply(x_hat[rows].reshape(groups.shape), mean_dxh_xh[rows], out=buffer[: groups.shape[0]])
        groups *= inv_std[rows]
    ones_N = backend.ones(xp, N, dout.dtype)
    return dx, (ones_N @ dots).reshape(gamma_shape), (ones_N @ sums).reshape(beta_shape)


# ---------------------------------------------------------------------------
# Batch norm and layer norm on (N, D)
# ---------------------------------------------------------------------------


def batchnorm_forward_fast(x, gamma, beta, bn_param):
    """Batch normalisation over the batch axis; the arguments, output and cache of
    layers.batchnorm_forward (running statistics and ghost batch norm's norm_batch included),
    so either backward takes either forward's cache.

    x: (N, D); gamma, beta: (D,). Returns (out (N, D), cache).
    """
    checks.require_float_array("x", x)
    checks.require_ndim("x", x, 2, "(N, D)")
    xp = array_module(x)
    N, D = x.shape
    g = checks.affine_params("gamma", gamma, D)
    bt = checks.affine_params("beta", beta, D)
    mode, eps, momentum = checks.bn_settings(bn_param, x.shape, N)
    groups = checks.bn_groups(bn_param, mode, N)
    running_mean, running_var = running_stats(bn_param, D, xp, x.dtype)
    if mode == "train":
        xg = x if groups == 1 else x.reshape(groups, -1, D)
        n = xg.shape[-2]
        ones = backend.ones(xp, n, x.dtype)
        mean = (ones @ xg) / n  # (D,) or (groups, D)
        x_hat = xg - mean[..., None, :]
        var = (ones @ (x_hat * x_hat)) / n
        inv_std = (1 / xp.sqrt(var + eps))[..., None, :]  # (1, D) or (groups, 1, D), as the reference keeps it
        x_hat *= inv_std
        update_running_stats(bn_param, mean, var, momentum)
    else:
        inv_std = 1 / xp.sqrt(running_var + eps)
        x_hat = (x - running_mean) * inv_std
        inv_std = inv_std[None, :]
    out = (x_hat * g).reshape(N, D)
    out += bt
    return out, (x_hat, inv_std, g, mode, gamma.shape, beta.shape)


def batchnorm_backward_fast(dout, cache):
    """dout: (N, D). Returns (dx, dgamma, dbeta); layers.batchnorm_backward_alt's closed form.

    cache: from batchnorm_forward_fast or layers.batchnorm_forward.
    dx = inv_std * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)), dx_hat = dout * gamma,
    the means taken within each normalisation group.
    """
    x_hat, inv_std, g, mode, gamma_shape, beta_shape = cache
    N, D = x_hat.size // x_hat.shape[-1], x_hat.shape[-1]
    checks.require_dout_shape(dout, (N, D))
    xp = array_module(dout)
    ones = backend.ones(xp, N, dout.dtype)
    x_rows = x_hat.reshape(N, D)
    dbeta = ones @ dout
    dgamma = row_dots(dout.T, x_rows.T)
    if mode == "test":
        return dout * (g * inv_std), dgamma.reshape(gamma_shape), dbeta.reshape(beta_shape)
    dxh = (dout * g).reshape(x_hat.shape)
    n = x_hat.shape[-2]
    ones = backend.ones(xp, n, dout.dtype)
    mean_dxh = (ones @ dxh) / n
    mean_dxh_xh = (ones @ (dxh * x_hat)) / n
    dxh -= mean_dxh[..., None, :]
    dxh -= x_hat * mean_dxh_xh[..., None, :]
    dxh *= inv_std
    return dxh.reshape(N, D), dgamma.reshape(gamma_shape), dbeta.reshape(beta_shape)


def layernorm_forward_fast(x, gamma, beta, ln_param):
    """Layer normalisation of each sample over its D features; the arguments, output and
    cache of layers.layernorm_forward. x: (N, D); gamma, beta: (D,)."""
    checks.require_float_array("x", x)
    checks.require_ndim("x", x, 2, "(N, D)")
    xp = array_module(x)
    D = x.shape[1]
    g = checks.affine_params("gamma", gamma, D)
    bt = checks.affine_params("beta", beta, D)
    eps = checks.norm_eps("ln_param", ln_param)
    x_hat = x - ((x @ backend.ones(xp, D, x.dtype)) / D)[:, None]
    inv_std = (1 / xp.sqrt(row_dots(x_hat, x_hat) / D + eps))[:, None]
    x_hat *= inv_std
    out = x_hat * g
    out += bt
    return out, (x_hat, inv_std, g, gamma.shape, beta.shape)


def layernorm_backward_fast(dout, cache):
    """dout: (N, D). Returns (dx, dgamma, dbeta); cache from either layer norm forward."""
    x_hat, inv_std, g, gamma_shape, beta_shape = cache
    checks.require_dout_shape(dout, x_hat.shape)
    xp = array_module(dout)
    N, D = dout.shape
    ones = backend.ones(xp, N, dout.dtype)
    dgamma, dbeta = row_dots(dout.T, x_hat.T), ones @ dout
    dxh = dout * g
    mean_dxh = (dxh @ backend.ones(xp, D, dout.dtype)) / D
    mean_dxh_xh = row_dots(dxh, x_hat) / D
    dxh -= mean_dxh[:, None]
    dxh -= x_hat * mean_dxh_xh[:, None]
    dxh *= inv_std
    return dxh, dgamma.reshape(gamma_shape), dbeta.reshape(beta_shape)
