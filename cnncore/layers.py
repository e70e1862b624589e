"""Reference layers: one pure forward/backward pair per layer, as in CS231n assignment 2.

Every forward returns ``(out, cache)``; every backward takes ``(dout, cache)`` and
returns the gradients of the forward's inputs in the order they were passed. The
convolution and pooling here are the naive loops, kept for reading and checking;
``cnncore.fast_layers`` holds their vectorised twins.

Conventions shared by all layers:
- layers compute on float32 or float64 arrays: x (and w for affine and conv) of
  float16, integer or bool dtype is refused with a ValueError naming the argument
  and its dtype, never silently widened or truncated (the naive conv would round
  its sums to integers; float16 has already lost what the layer would compute with);
- inputs are never modified; outputs keep the input dtype (float32 stays float32);
- every backward checks that dout has the shape of its forward's output, so a
  mismatched gradient fails naming dout rather than broadcasting into a wrong result;
- normalisation layers refuse eps <= 0, and batch norm a momentum outside [0, 1],
  an empty batch in train mode and a norm_batch (ghost batch norm's group size)
  that is not a positive integer dividing the batch in train mode, before
  bn_param is touched;
- gamma and beta may be given as (C,) or (1, C, 1, 1), and their gradients come
  back in the shape given;
- ``bn_param`` carries the running statistics between calls, as in the seed: it
  is the only state, and it is the caller's.
"""

from __future__ import annotations

import math

import numpy as np

from . import checks
from .backend import array_module

# ---------------------------------------------------------------------------
# Affine and ReLU
# ---------------------------------------------------------------------------


def affine_forward(x, w, b):
    """Fully connected layer: out = x.reshape(N, D) @ w + b.

    x: (N, d_1, ..., d_k) with D = d_1 * ... * d_k; w: (D, M); b: (M,).
    Returns (out, cache): out (N, M); cache (x, w, b).
    """
    checks.require_float_array("x", x)
    checks.require_float_array("w", w)
    D = math.prod(x.shape[1:])
    if w.ndim != 2 or w.shape[0] != D:
        raise ValueError(f"w must have shape ({D}, M) to match x of shape {tuple(x.shape)}, got {tuple(w.shape)}")
    if b.shape != (w.shape[1],):
        raise ValueError(f"b must have shape ({w.shape[1]},), got {tuple(b.shape)}")
    out = x.reshape(x.shape[0], D) @ w
    out += b
    return out, (x, w, b)


def affine_backward(dout, cache, need_dx: bool = True):
    """dout: (N, M). Returns (dx, dw, db) shaped like x, w, b.

    need_dx=False skips the input gradient and returns None for dx: a network's
    first layer has nothing upstream that needs it.
    """
    x, w, b = cache
    checks.require_dout_shape(dout, (x.shape[0], w.shape[1]))
    x2 = x.reshape(x.shape[0], -1)
    dx = (dout @ w.T).reshape(x.shape) if need_dx else None
    dw = x2.T @ dout
    db = array_module(dout).ones(dout.shape[0], dtype=dout.dtype) @ dout  # a product: faster than sum(axis=0)
    return dx, dw, db


def relu_forward(x):
    """Rectified linear unit, elementwise.

    x: array of any shape. Returns (out, cache): out has x's shape and dtype; cache is x.
    """
    checks.require_float_array("x", x)
    return array_module(x).maximum(x, 0), x


def relu_backward(dout, cache):
    """dx = dout where the input was positive, else 0 (the subgradient at 0 is 0)."""
    x = cache
    checks.require_dout_shape(dout, x.shape)
    return dout * (x > 0)


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------


def _check_loss_inputs(x, y):
    checks.require_float_array("x", x)
    checks.require_ndim("x", x, 2, "(N, C) class scores")
    if x.shape[0] == 0:  # the loss is a mean over the batch: of nothing, it would be NaN
        raise ValueError(f"x must hold at least one row of scores, got an empty batch of shape {tuple(x.shape)}")
    checks.require_labels(y, x.shape[0], x.shape[1])
    checks.require_finite("x", x)


def softmax_loss(x, y):
    """Softmax (cross-entropy) loss averaged over the batch.

    x: (N, C) scores, N >= 1; y: (N,) integer labels in [0, C).
    Returns (loss, dx): loss a scalar of x's dtype, dx (N, C) the gradient of the loss.
    """
    _check_loss_inputs(x, y)
    xp = array_module(x)
    N = x.shape[0]
    shifted = x - x.max(axis=1, keepdims=True)  # softmax is shift-invariant; this avoids overflow
    log_probs = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    rows = xp.arange(N)
    loss = -log_probs[rows, y].sum() / N
    dx = xp.exp(log_probs)
    dx[rows, y] -= 1
    dx /= N
    return loss, dx


def svm_loss(x, y):
    """Multiclass SVM (hinge) loss with margin 1, averaged over the batch.

    x: (N, C) scores, N >= 1; y: (N,) integer labels in [0, C).
    Returns (loss, dx): loss a scalar of x's dtype, dx (N, C).
    """
    _check_loss_inputs(x, y)
    xp = array_module(x)
    N = x.shape[0]
    rows = xp.arange(N)
    margins = xp.maximum(0, x - x[rows, y][:, None] + 1)
    margins[rows, y] = 0
    loss = margins.sum() / N
    positive = (margins > 0).astype(x.dtype)
    dx = positive
    dx[rows, y] -= positive.sum(axis=1)
    dx /= N
    return loss, dx


# ---------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------


def _normalize(x, axis, eps):
    """x_hat = (x - mean) / sqrt(var + eps) over ``axis`` (biased variance).

    Returns (x_hat, mean, var, inv_std) with mean/var/inv_std keeping dims.
    """
    xp = array_module(x)
    mean = x.mean(axis=axis, keepdims=True)
    var = x.var(axis=axis, keepdims=True)
    inv_std = 1 / xp.sqrt(var + eps)
    return (x - mean) * inv_std, mean, var, inv_std


def _normalize_backward(dx_hat, x_hat, inv_std, axis):
    """Gradient through x_hat = (x - mean) * inv_std over ``axis``, in closed form.

    dx = inv_std * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)).
    """
    return inv_std * (
        dx_hat
        - dx_hat.mean(axis=axis, keepdims=True)
        - x_hat * (dx_hat * x_hat).mean(axis=axis, keepdims=True)
    )


def batchnorm_forward(x, gamma, beta, bn_param):
    """Batch normalisation over the batch axis.

    x: (N, D); gamma, beta: (D,) scale and shift.
    bn_param: dict with 'mode' ('train' or 'test'), optional 'eps' (1e-5),
      'momentum' (0.9, the weight of the OLD running value, in [0, 1]),
      'norm_batch' (see below) and 'running_mean', 'running_var' (D,) (zeros on
      first use); eps must be > 0, and train mode needs N >= 1. In train mode the
      batch statistics (biased variance) normalise x and update the running ones:
      running = momentum * running + (1 - momentum) * batch. In test mode the
      running statistics normalise x.
    Ghost batch norm: with bn_param['norm_batch'] = g (a positive integer; absent or
      None: g = N, the whole batch, bit for bit), train mode splits the N rows into
      N / g consecutive groups of g and normalises each group with its own mean and
      biased variance, as if each group were a batch of its own (g must divide N).
      The running statistics are updated once per call, from the mean over the groups
      of their means and of their biased variances: at g = N that is the update
      above; the running averages' time constant, in steps, is the same at every g;
      and test mode then normalises with what training normalised with on average
      (E[batch variance] at g, not the population variance, which is larger by the
      variance of a group's mean). Test mode ignores norm_batch.
      g = 1 is allowed, as a batch of one row is: every feature is then normalised
      over a single value, so x_hat = 0, out = beta and dx = 0 (degenerate).
    Returns (out, cache): out (N, D); cache for batchnorm_backward.
    """
    checks.require_float_array("x", x)
    checks.require_ndim("x", x, 2, "(N, D)")
    return _batchnorm_forward(x, gamma, beta, bn_param, x.shape)


def _batchnorm_forward(x2, gamma, beta, bn_param, x_shape):
    """Batch norm of x2 (M, D), the rows of x (x_shape, N = x_shape[0] images) that share each
    feature's statistics, one image's rows after another (so a ghost batch's rows are consecutive)."""
    xp = array_module(x2)
    M, D = x2.shape
    g = checks.affine_params("gamma", gamma, D)
    bt = checks.affine_params("beta", beta, D)
    mode, eps, momentum = checks.bn_settings(bn_param, x_shape, M)
    groups = checks.bn_groups(bn_param, mode, x_shape[0])
    running_mean, running_var = running_stats(bn_param, D, xp, x2.dtype)
    if mode == "train":
        # (M, D), or (groups, M / groups, D): the statistics are taken over axis -2 either way.
        x_hat, mean, var, inv_std = _normalize(x2 if groups == 1 else x2.reshape(groups, -1, D), -2, eps)
        update_running_stats(bn_param, _rows(mean), _rows(var), momentum)
    else:
        inv_std = 1 / xp.sqrt(running_var + eps)
        x_hat = (x2 - running_mean) * inv_std
        inv_std = inv_std[None, :]
    out = _rows(g * x_hat + bt)
    cache = (x_hat, inv_std, g, mode, gamma.shape, beta.shape)
    return out, cache


def running_stats(bn_param, D, xp, dtype):
    """(running_mean, running_var) of bn_param; they start as zeros (D,) on first
    use and are stored there, in either mode. Call after checks.bn_settings."""
    for key in ("running_mean", "running_var"):
        if bn_param.get(key) is None:
            bn_param[key] = xp.zeros(D, dtype=dtype)
    return bn_param["running_mean"], bn_param["running_var"]


def update_running_stats(bn_param, mean, var, momentum):
    """running = momentum * running + (1 - momentum) * batch, for the mean and the variance.

    mean, var: the batch's (D,), or (groups, D), one row per ghost batch norm group: the
    running statistics then move once, toward the groups' mean mean and mean variance.
    """
    if mean.ndim == 2:
        mean, var = mean.mean(axis=0), var.mean(axis=0)
    bn_param["running_mean"] = momentum * bn_param["running_mean"] + (1 - momentum) * mean
    bn_param["running_var"] = momentum * bn_param["running_var"] + (1 - momentum) * var


def batchnorm_backward(dout, cache):
    """Batch norm backward, step by step through the computational graph.

    dout: (N, D). Returns (dx, dgamma, dbeta); dgamma/dbeta shaped like gamma/beta.
    The graph, within each normalisation group of n rows (n = N without a norm_batch):
    mu = mean(x); xc = x - mu; var = mean(xc**2); s = sqrt(var + eps);
    x_hat = xc / s; out = gamma * x_hat + beta. Each line below undoes one of those.
    """
    x_hat, inv_std, dx_hat, dgamma, dbeta, mode = _batchnorm_backward_start(dout, cache)
    if mode == "test":
        return _rows(dx_hat * inv_std), dgamma, dbeta
    n = x_hat.shape[-2]
    s = 1 / inv_std
    xc = x_hat * s
    dxc = dx_hat * inv_std  # through x_hat = xc / s, with s held
    ds = -(dx_hat * xc).sum(axis=-2, keepdims=True) * inv_std**2  # through 1 / s
    dvar = ds * inv_std / 2  # through s = sqrt(var + eps)
    dxc = dxc + dvar * 2 * xc / n  # through var = mean(xc ** 2)
    dmu = -dxc.sum(axis=-2, keepdims=True)  # through xc = x - mu
    dx = dxc + dmu / n  # through mu = mean(x)
    return _rows(dx), dgamma, dbeta


def batchnorm_backward_alt(dout, cache):
    """Batch norm backward in the simplified closed form (same result, fewer passes).

    dx = inv_std * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)), dx_hat = dout * gamma,
    the means taken within each normalisation group.
    """
    x_hat, inv_std, dx_hat, dgamma, dbeta, mode = _batchnorm_backward_start(dout, cache)
    if mode == "test":
        return _rows(dx_hat * inv_std), dgamma, dbeta
    return _rows(_normalize_backward(dx_hat, x_hat, inv_std, -2)), dgamma, dbeta


def _batchnorm_backward_start(dout, cache):
    """What both batch norm backwards begin with: the cache unpacked, dout (M, D) checked and viewed
    as x_hat is ((M, D), or (groups, M / groups, D) for ghost batch norm), dgamma, dbeta and
    dx_hat = dout * gamma. Returns (x_hat, inv_std, dx_hat, dgamma, dbeta, mode)."""
    x_hat, inv_std, g, mode, gamma_shape, beta_shape = cache
    checks.require_dout_shape(dout, _rows(x_hat).shape)
    dout = dout.reshape(x_hat.shape)
    dgamma, dbeta = _affine_param_grads(dout, x_hat, gamma_shape, beta_shape)
    return x_hat, inv_std, dout * g, dgamma, dbeta, mode


def _rows(a):
    """a (..., D) as (M, D): ghost batch norm's groups (groups, n, D) back to the rows of x."""
    return a.reshape(-1, a.shape[-1]) if a.ndim != 2 else a


def _affine_param_grads(dout, x_hat, gamma_shape, beta_shape):
    """dgamma = sum(dout * x_hat), dbeta = sum(dout) over all but the feature axis (last)."""
    rows = (-1, dout.shape[-1])
    dgamma = (dout * x_hat).reshape(rows).sum(axis=0).reshape(gamma_shape)
    dbeta = dout.reshape(rows).sum(axis=0).reshape(beta_shape)
    return dgamma, dbeta


def layernorm_forward(x, gamma, beta, ln_param):
    """Layer normalisation: each sample normalised over its D features.

    x: (N, D); gamma, beta: (D,); ln_param: dict with optional 'eps' (1e-5, > 0).
    Same in train and test: there are no running statistics.
    Returns (out, cache): out (N, D).
    """
    checks.require_float_array("x", x)
    checks.require_ndim("x", x, 2, "(N, D)")
    D = x.shape[1]
    g = checks.affine_params("gamma", gamma, D)
    bt = checks.affine_params("beta", beta, D)
    x_hat, _, _, inv_std = _normalize(x, 1, checks.norm_eps("ln_param", ln_param))
    return g * x_hat + bt, (x_hat, inv_std, g, gamma.shape, beta.shape)


def layernorm_backward(dout, cache):
    """dout: (N, D). Returns (dx, dgamma, dbeta)."""
    x_hat, inv_std, g, gamma_shape, beta_shape = cache
    checks.require_dout_shape(dout, x_hat.shape)
    dgamma, dbeta = _affine_param_grads(dout, x_hat, gamma_shape, beta_shape)
    return _normalize_backward(dout * g, x_hat, inv_std, 1), dgamma, dbeta


# ---------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------


def dropout_forward(x, dropout_param):
    """Inverted dropout.

    x: array of any shape.
    dropout_param: dict with 'p' (the probability of KEEPING a unit, in (0, 1]),
      'mode' ('train' or 'test') and optional 'seed' (same seed, same mask).
    In train mode each unit is kept with probability p and scaled by 1/p, so the
    expected output equals x and test mode is the identity.
    Returns (out, cache): out like x; cache (dropout_param, mask, x.shape), mask
    None in test mode.
    """
    checks.require_float_array("x", x)
    p = dropout_param.get("p")
    if p is None or not 0 < p <= 1:
        raise ValueError(f"dropout_param['p'] (keep probability) must be in (0, 1], got {p!r}")
    mode = dropout_param.get("mode", "train")
    if mode not in ("train", "test"):
        raise ValueError(f"dropout_param['mode'] must be 'train' or 'test', got {mode!r}")
    if mode == "test":
        return x, (dropout_param, None, x.shape)
    xp = array_module(x)
    rng = xp.random.default_rng(dropout_param.get("seed"))
    mask = (rng.random(x.shape) < p).astype(x.dtype) / x.dtype.type(p)
    return x * mask, (dropout_param, mask, x.shape)


def dropout_backward(dout, cache):
    """dx = dout * mask in train mode, dout in test mode."""
    _, mask, shape = cache
    checks.require_dout_shape(dout, shape)
    return dout if mask is None else dout * mask


# ---------------------------------------------------------------------------
# Convolution and max pooling: the naive loops
# ---------------------------------------------------------------------------


def conv_forward_naive(x, w, b, conv_param):
    """Convolution (cross-correlation, as in every deep learning library), by loops.

    x: (N, C, H, W); w: (F, C, HH, WW); b: (F,).
    conv_param: 'stride' (positive int) and 'pad' (zero-padding on every side).
    The windows must tile the padded input: (H + 2*pad - HH) % stride == 0.
    Returns (out, cache): out (N, F, H', W') with H' = 1 + (H + 2*pad - HH) // stride
    (and likewise W'); cache (x, w, b, conv_param).
    """
    N, F, Ho, Wo = checks.conv_forward_inputs(x, w, b, conv_param)
    s, pad = conv_param["stride"], conv_param["pad"]
    _, _, HH, WW = w.shape
    x_pad = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((N, F, Ho, Wo), dtype=x.dtype)
    for n in range(N):
        for f in range(F):
            for i in range(Ho):
                for j in range(Wo):
                    window = x_pad[n, :, i * s : i * s + HH, j * s : j * s + WW]
                    out[n, f, i, j] = np.sum(window * w[f]) + b[f]
    return out, (x, w, b, conv_param)


def conv_backward_naive(dout, cache):
    """dout: (N, F, H', W'). Returns (dx, dw, db) shaped like x, w, b."""
    x, w, b, conv_param = cache
    checks.require_dout_shape(dout, checks.conv_output_shape(x, w, conv_param))
    s, pad = conv_param["stride"], conv_param["pad"]
    N, F, Ho, Wo = dout.shape
    _, _, HH, WW = w.shape
    x_pad = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    dx_pad = np.zeros_like(x_pad)
    dw = np.zeros_like(w)
    db = dout.sum(axis=(0, 2, 3))
    for n in range(N):
        for f in range(F):
            for i in range(Ho):
                for j in range(Wo):
                    rows, cols = slice(i * s, i * s + HH), slice(j * s, j * s + WW)
                    dw[f] += x_pad[n, :, rows, cols] * dout[n, f, i, j]
                    dx_pad[n, :, rows, cols] += w[f] * dout[n, f, i, j]
    dx = dx_pad[:, :, pad : pad + x.shape[2], pad : pad + x.shape[3]]
    return dx, dw, db


def max_pool_forward_naive(x, pool_param):
    """Max pooling, by loops.

    x: (N, C, H, W); pool_param: 'pool_height', 'pool_width', 'stride'.
    Windows need not tile the input: H' = 1 + (H - pool_height) // stride, and
    rows/columns past the last whole window are ignored (as in torch's max_pool2d).
    Returns (out, cache): out (N, C, H', W'); cache (x, pool_param).
    """
    checks.require_float_array("x", x)
    N, C, Ho, Wo = checks.pool_output_shape(x, pool_param)
    ph, pw, s = pool_param["pool_height"], pool_param["pool_width"], pool_param["stride"]
    out = np.empty((N, C, Ho, Wo), dtype=x.dtype)
    for i in range(Ho):
        for j in range(Wo):
            out[:, :, i, j] = x[:, :, i * s : i * s + ph, j * s : j * s + pw].max(axis=(2, 3))
    return out, (x, pool_param)


def max_pool_backward_naive(dout, cache):
    """dout: (N, C, H', W'). Returns dx shaped like x.

    Each window's gradient goes to ONE input: its maximum, and among tied maxima
    the first in row-major order (as PyTorch does), so the total gradient is
    conserved. Overlapping windows add their gradients where they share an input.
    """
    x, pool_param = cache
    checks.require_dout_shape(dout, checks.pool_output_shape(x, pool_param))
    ph, pw, s = pool_param["pool_height"], pool_param["pool_width"], pool_param["stride"]
    N, C, Ho, Wo = dout.shape
    dx = np.zeros_like(x)
    for n in range(N):
        for c in range(C):
            for i in range(Ho):
                for j in range(Wo):
                    window = x[n, c, i * s : i * s + ph, j * s : j * s + pw]
                    r, q = np.unravel_index(np.argmax(window), window.shape)
                    dx[n, c, i * s + r, j * s + q] += dout[n, c, i, j]
    return dx


def global_avg_pool_forward(x):
    """Global average pooling: each channel's mean over its H x W positions (ResNet's last pool).

    x: (N, C, H, W). Returns (out, cache): out (N, C); cache x.shape.
    One reduction, as vectorised as it gets: it has no naive twin.
    """
    checks.require_float_array("x", x)
    checks.require_ndim("x", x, 4, "(N, C, H, W)")
    return x.mean(axis=(2, 3)), x.shape


def global_avg_pool_backward(dout, cache):
    """dout: (N, C). Returns dx (N, C, H, W): every position gets its channel's dout / (H * W)."""
    x_shape = cache
    N, C, H, W = x_shape
    checks.require_dout_shape(dout, (N, C))
    dx = array_module(dout).empty(x_shape, dtype=dout.dtype)
    dx[...] = (dout / (H * W))[:, :, None, None]
    return dx


# ---------------------------------------------------------------------------
# Spatial normalisation
# ---------------------------------------------------------------------------


def spatial_batchnorm_forward(x, gamma, beta, bn_param):
    """Batch normalisation per channel, over the batch and both spatial axes.

    x: (N, C, H, W); gamma, beta: (C,) or (1, C, 1, 1); bn_param as in batchnorm_forward,
    norm_batch included: with norm_batch = g, each consecutive group of g images is
    normalised per channel over its own g*H*W values.
    Returns (out, cache): out (N, C, H, W); cache (batchnorm's cache for the
    (N*H*W, C) rows, x.shape).
    """
    checks.require_float_array("x", x)
    checks.require_ndim("x", x, 4, "(N, C, H, W)")
    N, C, H, W = x.shape
    x2 = x.transpose(0, 2, 3, 1).reshape(-1, C)
    out2, cache = _batchnorm_forward(x2, gamma, beta, bn_param, x.shape)
    return out2.reshape(N, H, W, C).transpose(0, 3, 1, 2), (cache, x.shape)


def spatial_batchnorm_backward(dout, cache):
    """dout: (N, C, H, W). Returns (dx, dgamma, dbeta), the latter two shaped like gamma/beta."""
    rows_cache, x_shape = cache
    checks.require_dout_shape(dout, x_shape)
    N, C, H, W = dout.shape
    dout2 = dout.transpose(0, 2, 3, 1).reshape(-1, C)
    dx2, dgamma, dbeta = batchnorm_backward_alt(dout2, rows_cache)
    return dx2.reshape(N, H, W, C).transpose(0, 3, 1, 2), dgamma, dbeta


def spatial_groupnorm_forward(x, gamma, beta, G, gn_param):
    """Group normalisation (Wu & He, 2018): each sample's channels split into G groups,
    each group normalised over its C/G channels and all H x W positions.

    x: (N, C, H, W); gamma, beta: (C,) or (1, C, 1, 1), per channel; G divides C;
    gn_param: dict with optional 'eps' (1e-5, > 0). G=1 is layer norm over (C, H, W),
    G=C is instance norm. No running statistics: train and test are the same.
    Returns (out, cache): out (N, C, H, W).
    """
    checks.require_float_array("x", x)
    checks.require_ndim("x", x, 4, "(N, C, H, W)")
    N, C, H, W = x.shape
    checks.groups(G, C)
    g = checks.affine_params("gamma", gamma, C).reshape(1, C, 1, 1)
    bt = checks.affine_params("beta", beta, C).reshape(1, C, 1, 1)
    xg = x.reshape(N, G, -1)
    x_hat, _, _, inv_std = _normalize(xg, 2, checks.norm_eps("gn_param", gn_param))
    x_hat = x_hat.reshape(N, C, H, W)
    return g * x_hat + bt, (x_hat, inv_std, g, G, gamma.shape, beta.shape)


def spatial_groupnorm_backward(dout, cache):
    """dout: (N, C, H, W). Returns (dx, dgamma, dbeta), the latter two shaped like gamma/beta."""
    x_hat, inv_std, g, G, gamma_shape, beta_shape = cache
    checks.require_dout_shape(dout, x_hat.shape)
    N, C, H, W = dout.shape
    dgamma = (dout * x_hat).sum(axis=(0, 2, 3)).reshape(gamma_shape)
    dbeta = dout.sum(axis=(0, 2, 3)).reshape(beta_shape)
    dx_hat = (dout * g).reshape(N, G, -1)
    dx = _normalize_backward(dx_hat, x_hat.reshape(N, G, -1), inv_std, 2)
    return dx.reshape(N, C, H, W), dgamma, dbeta
