"""Sandwich layers: common stacks of layers composed into one forward/backward pair.

Each forward returns ``(out, cache)``; each backward takes ``(dout, cache)`` and
returns the gradients of the forward's array inputs, in order.

The convolution sandwiches take ``layers``, the implementations they compose:
FAST_LAYERS (the default: the vectorised conv, pool and spatial norms of
``cnncore.fast_layers``) or NAIVE_LAYERS (the loops and reference norms of
``cnncore.layers``, for checking). The cache remembers which, so the backward
always matches its forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import checks, fast_layers, layers as reference
from .backend import array_module
from .fast_norms import row_dots
from .layers import affine_backward, affine_forward, relu_backward, relu_forward, running_stats
from .net_shapes import POOL_2X2  # the nets' pool: part of their shapes



def _conv_backward_naive(dout, cache, need_dx=True):
    """layers.conv_backward_naive with conv_backward_fast's need_dx (dx is computed, then dropped)."""
    dx, dw, db = reference.conv_backward_naive(dout, cache)
    return (dx if need_dx else None), dw, db


@dataclass(frozen=True)
class LayerSet:
    """The conv, max pool and spatial norm implementations that the conv sandwiches compose.

    fuses_conv_relu_pool: whether conv_relu_pool runs the fused conv-relu-pool of
    fast_layers, which never stores the full-size activation, instead of the chain.
    folds_test_batchnorm: whether a conv's batch norm in test mode runs folded into the
    conv's filters and bias (fold_batchnorm) instead of as a layer of its own.
    """

    name: str
    conv_forward: Callable
    conv_backward: Callable  # (dout, cache, need_dx=True) -> (dx or None, dw, db)
    pool_forward: Callable
    pool_backward: Callable
    batchnorm_forward: Callable
    batchnorm_backward: Callable
    groupnorm_forward: Callable
    groupnorm_backward: Callable
    fuses_conv_relu_pool: bool
    folds_test_batchnorm: bool


FAST_LAYERS = LayerSet(
    "fast", fast_layers.conv_forward_fast, fast_layers.conv_backward_fast,
    fast_layers.max_pool_forward_fast, fast_layers.max_pool_backward_fast,
    fast_layers.spatial_batchnorm_forward_fast, fast_layers.spatial_batchnorm_backward_fast,
    fast_layers.spatial_groupnorm_forward_fast, fast_layers.spatial_groupnorm_backward_fast,
    fuses_conv_relu_pool=True, folds_test_batchnorm=True,
)
NAIVE_LAYERS = LayerSet(
    "naive", reference.conv_forward_naive, _conv_backward_naive,
    reference.max_pool_forward_naive, reference.max_pool_backward_naive,
    reference.spatial_batchnorm_forward, reference.spatial_batchnorm_backward,
    reference.spatial_groupnorm_forward, reference.spatial_groupnorm_backward,
    fuses_conv_relu_pool=False, folds_test_batchnorm=False,
)


def affine_relu_forward(x, w, b):
    """affine -> relu. x: (N, d_1, ..., d_k); w: (D, M); b: (M,). Returns (out (N, M), cache)."""
    a, fc_cache = affine_forward(x, w, b)
    out, relu_cache = relu_forward(a)
    return out, (fc_cache, relu_cache)


def affine_relu_backward(dout, cache):
    """Returns (dx, dw, db)."""
    fc_cache, relu_cache = cache
    return affine_backward(relu_backward(dout, relu_cache), fc_cache)


def conv_relu_forward(x, w, b, conv_param, layers=FAST_LAYERS):
    """conv -> relu. x: (N, C, H, W); w: (F, C, HH, WW); b: (F,). Returns (out (N, F, H', W'), cache)."""
    a, conv_cache = layers.conv_forward(x, w, b, conv_param)
    out, relu_cache = relu_forward(a)
    return out, (layers, conv_cache, relu_cache)


def conv_relu_backward(dout, cache):
    """Returns (dx, dw, db)."""
    layers, conv_cache, relu_cache = cache
    return layers.conv_backward(relu_backward(dout, relu_cache), conv_cache)


def conv_relu_pool_forward(x, w, b, conv_param, pool_param=POOL_2X2, layers=FAST_LAYERS):
    """conv -> relu -> max pool (2x2, stride 2 unless pool_param says otherwise; None: no pool).

    On FAST_LAYERS fused (see conv_relu_pool_forward_fast): the full-size activation
    is never stored. Returns (out (N, F, H'', W''), cache).
    """
    if layers.fuses_conv_relu_pool and pool_param is not None:
        out, cache = fast_layers.conv_relu_pool_forward_fast(x, w, b, conv_param, pool_param)
        return out, (fast_layers.conv_relu_pool_backward_fast, cache)
    return _conv_norm_relu_pool_forward(x, w, b, conv_param, pool_param, layers, None, None, ())


def conv_bn_relu_pool_forward(x, w, b, gamma, beta, conv_param, bn_param, pool_param=POOL_2X2,
                              layers=FAST_LAYERS):
    """conv -> spatial batch norm -> relu -> max pool (None: no pool). gamma, beta: (F,) or (1, F, 1, 1).

    Returns (out, cache); bn_param's running statistics are updated in train mode.
    """
    return _conv_norm_relu_pool_forward(x, w, b, conv_param, pool_param, layers, layers.batchnorm_forward,
                                        layers.batchnorm_backward, (gamma, beta, bn_param), "batchnorm")


def conv_gn_relu_pool_forward(x, w, b, gamma, beta, conv_param, G, gn_param, pool_param=POOL_2X2,
                              layers=FAST_LAYERS):
    """conv -> spatial group norm (G groups) -> relu -> max pool (None: no pool).

    Returns (out, cache).
    """
    return _conv_norm_relu_pool_forward(x, w, b, conv_param, pool_param, layers, layers.groupnorm_forward,
                                        layers.groupnorm_backward, (gamma, beta, G, gn_param), "groupnorm")


def conv_bn_relu_forward(x, w, b, gamma, beta, conv_param, bn_param, layers=FAST_LAYERS):
    """conv -> spatial batch norm -> relu. Returns (out, cache)."""
    return conv_bn_relu_pool_forward(x, w, b, gamma, beta, conv_param, bn_param, None, layers)


def conv_gn_relu_forward(x, w, b, gamma, beta, conv_param, G, gn_param, layers=FAST_LAYERS):
    """conv -> spatial group norm (G groups) -> relu. Returns (out, cache)."""
    return conv_gn_relu_pool_forward(x, w, b, gamma, beta, conv_param, G, gn_param, None, layers)


def conv_pool_block_backward(dout, cache, need_dx=True):
    """The backward of every conv-[norm]-relu-[pool] sandwich above: each cache names its own.

    Returns (dx, dw, db), plus (dgamma, dbeta) after a norm; dx is None when need_dx is False.
    """
    backward, inner = cache
    return backward(dout, inner, need_dx=need_dx)


conv_relu_pool_backward = conv_bn_relu_pool_backward = conv_gn_relu_pool_backward = conv_pool_block_backward
conv_bn_relu_backward = conv_gn_relu_backward = conv_pool_block_backward


def _conv_norm_relu_pool_forward(x, w, b, conv_param, pool_param, layers, norm_forward, norm_backward, norm_args,
                                 norm_kind=None):
    """conv -> [norm] -> [max pool] -> relu: relu and max pool commute (max is monotone),
    and the pooled map is a quarter of the size. pool_param None: no pool. On the fast
    layers a norm and a 2x2 pool run as one (fast_layers.spatial_norm_pool_forward_fast), and batch norm in
    test mode runs folded into the conv (fold_batchnorm): the sandwich is then a conv-relu-pool."""
    fold = _test_batchnorm_fold(w, b, (norm_kind, *norm_args), layers)
    if fold is not None:
        if layers.fuses_conv_relu_pool and pool_param is not None:  # test mode: seldom a backward
            out, inner = fast_layers.conv_relu_pool_forward_fast(x, fold.w, fold.b, conv_param, pool_param,
                                                                 record_winners=False)
            cache = (fast_layers.conv_relu_pool_backward_fast, inner)
        else:
            out, cache = conv_relu_pool_forward(x, fold.w, fold.b, conv_param, pool_param, layers)
        return out, (_folded_backward, (cache, fold))
    a, conv_cache = layers.conv_forward(x, w, b, conv_param)
    out, (backward, caches) = _norm_relu_pool_forward(a, pool_param, layers, norm_forward, norm_args, norm_kind)
    return out, (backward, (layers, conv_cache, norm_backward, *caches))


def _norm_relu_pool_forward(a, pool_param, layers, norm_forward, norm_args, norm_kind, backward=True):
    """The sandwich after its conv, on the conv's output a: (out, (backward, the caches after the conv's));
    backward False: only out is used (the fused pool then records no winners)."""
    if layers.fuses_conv_relu_pool and norm_kind and pool_param and fast_layers.pools_in_planes(a.shape, pool_param):
        pooled, norm_cache, winner = fast_layers.spatial_norm_pool_forward_fast(a, norm_kind, norm_args, pool_param,
                                                                                record_winners=backward)
        out, relu_cache = relu_forward(pooled)
        return out, (_conv_norm_pool_relu_backward, (norm_cache, (winner, pool_param, a.shape), relu_cache))
    norm_cache = pool_cache = None
    if norm_forward is not None:
        a, norm_cache = norm_forward(a, *norm_args)
    if pool_param is not None:
        a, pool_cache = layers.pool_forward(a, pool_param)
    out, relu_cache = relu_forward(a)
    return out, (_conv_norm_relu_pool_backward, (norm_cache, pool_cache, relu_cache))


def norm_relu_pool_forward(a, norm, pool_param=POOL_2X2, layers=FAST_LAYERS):
    """What conv_bn_relu_pool_forward or conv_gn_relu_pool_forward computes after its conv, on the conv's
    output a (N, F, H, W): the norm a spec names (see below; not None) -> relu -> max pool (None: no pool),
    by the same operations, so to the bit (but for batch norm in test mode, which the sandwich folds into its
    conv: the same map, to rounding). Returns out alone: for a diagnostic that records each norm layer's
    input (the conv's output) and goes on from it instead of convolving again. bn_param's running statistics
    are updated in train mode, as the sandwich updates them.
    """
    kind, *norm_args = norm
    norm_forward = {"batchnorm": layers.batchnorm_forward, "groupnorm": layers.groupnorm_forward}[kind]
    return _norm_relu_pool_forward(a, pool_param, layers, norm_forward, norm_args, kind, backward=False)[0]


def _folded_backward(dout, cache, need_dx):
    inner, fold = cache
    dx, dw, db = conv_pool_block_backward(dout, inner, need_dx)
    return (dx, *unfold_batchnorm_grads(dw, db, fold))


def _conv_norm_pool_relu_backward(dout, cache, need_dx):
    layers, conv_cache, norm_backward, norm_cache, (winner, pool_param, a_shape), relu_cache = cache
    da = fast_layers.unpool_fast(relu_backward(dout, relu_cache), winner, pool_param, a_shape)
    da, *norm_grads = norm_backward(da, norm_cache)
    dx, dw, db = layers.conv_backward(da, conv_cache, need_dx=need_dx)
    return (dx, dw, db, *norm_grads)


def _conv_norm_relu_pool_backward(dout, cache, need_dx):
    layers, conv_cache, norm_backward, norm_cache, pool_cache, relu_cache = cache
    da = relu_backward(dout, relu_cache)
    if pool_cache is not None:
        da = layers.pool_backward(da, pool_cache)
    norm_grads = ()
    if norm_backward is not None:
        da, *norm_grads = norm_backward(da, norm_cache)
    dx, dw, db = layers.conv_backward(da, conv_cache, need_dx=need_dx)
    return (dx, dw, db, *norm_grads)


# ---------------------------------------------------------------------------
# Batch norm in test mode, folded into the conv before it
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchNormFold:
    """fold_batchnorm's result: the folded filters w and bias b, and what unfold_batchnorm_grads needs."""

    w: object  # (F, C, HH, WW)
    b: object  # (F,)
    filters: object  # the conv's own w
    centred_bias: object  # (F,): the conv's bias less the running mean
    inv_std: object  # (F,)
    scale: object  # (F,): gamma * inv_std
    gamma_shape: tuple
    beta_shape: tuple


def fold_batchnorm(w, b, gamma, beta, bn_param) -> BatchNormFold:
    """Spatial batch norm in test mode after a conv, as the conv's own filters and bias.

    w: (F, C, HH, WW); b: (F,); gamma, beta: (F,) or (1, F, 1, 1); bn_param: batch norm's,
    its running statistics used (and made zeros (F,) when absent, as the layer makes them).
    With s = gamma / sqrt(running_var + eps) per filter,
    batchnorm(conv(x, w, b)) = conv(x, w * s, (b - running_mean) * s + beta):
    the same map, to rounding, without batch norm's passes over the conv's output
    (the usual inference-time fold). The gradients of w, b, gamma and beta follow from
    the folded conv's (unfold_batchnorm_grads).
    """
    xp = array_module(w)
    F = w.shape[0]
    g = checks.affine_params("gamma", gamma, F)
    bt = checks.affine_params("beta", beta, F)
    _, eps, _ = checks.bn_settings(bn_param, w.shape, F)
    mean, var = running_stats(bn_param, F, xp, w.dtype)
    inv_std = 1 / xp.sqrt(var + eps)
    scale = g * inv_std
    centred = b - mean
    return BatchNormFold(w * scale[:, None, None, None], centred * scale + bt, w, centred, inv_std, scale,
                         tuple(gamma.shape), tuple(beta.shape))


def unfold_batchnorm_grads(dw_folded, db_folded, fold: BatchNormFold):
    """(dw, db, dgamma, dbeta) of fold_batchnorm's inputs from the folded conv's dw and db: w and b reach
    the output through w * s and b * s, gamma through both (times the filters and the centred bias, over
    the std), beta through the bias alone."""
    F = dw_folded.shape[0]
    dw = dw_folded * fold.scale[:, None, None, None]
    db = db_folded * fold.scale
    dgamma = (row_dots(dw_folded.reshape(F, -1), fold.filters.reshape(F, -1)) + db_folded * fold.centred_bias)
    dgamma *= fold.inv_std
    return dw, db, dgamma.reshape(fold.gamma_shape), db_folded.reshape(fold.beta_shape)


def _test_batchnorm_fold(w, b, norm, layers) -> BatchNormFold | None:
    """fold_batchnorm for a conv's norm spec that is batch norm in test mode on layers that fold it, else None."""
    if not (layers.folds_test_batchnorm and norm and norm[0] == "batchnorm"):
        return None
    _, gamma, beta, bn_param = norm
    if not (isinstance(bn_param, dict) and bn_param.get("mode") == "test"):
        return None
    return fold_batchnorm(w, b, gamma, beta, bn_param)


# ---------------------------------------------------------------------------
# Residual networks: a conv and its norm as one unit, and the basic residual block
# ---------------------------------------------------------------------------
# A norm spec names a conv's norm layer and its arguments:
#   None                                        no norm
#   ("batchnorm", gamma, beta, bn_param)        spatial batch norm (bn_param updated in train mode)
#   ("groupnorm", gamma, beta, G, gn_param)     spatial group norm, G groups
# A conv unit is (w, b, conv_param, norm spec).


def spatial_norm_forward(x, norm, layers=FAST_LAYERS):
    """x: (N, C, H, W) through the norm a spec names (identity for None). Returns (out, cache)."""
    if norm is None:
        return x, None
    kind, *args = norm
    forward, backward = {"batchnorm": (layers.batchnorm_forward, layers.batchnorm_backward),
                         "groupnorm": (layers.groupnorm_forward, layers.groupnorm_backward)}[kind]
    out, cache = forward(x, *args)
    return out, (backward, cache)


def spatial_norm_backward(dout, cache):
    """Returns (dx, dgamma, dbeta), or (dout,) for no norm."""
    if cache is None:
        return (dout,)
    backward, inner = cache
    return backward(dout, inner)


def conv_norm_forward(x, w, b, conv_param, norm=None, layers=FAST_LAYERS):
    """conv -> [spatial norm] (a residual block's second conv, its projection). Returns (out, cache).
    On the fast layers batch norm in test mode runs folded into the conv (fold_batchnorm)."""
    fold = _test_batchnorm_fold(w, b, norm, layers)
    if fold is not None:
        out, conv_cache = layers.conv_forward(x, fold.w, fold.b, conv_param)
        return out, (layers, conv_cache, fold)
    a, conv_cache = layers.conv_forward(x, w, b, conv_param)
    out, norm_cache = spatial_norm_forward(a, norm, layers)
    return out, (layers, conv_cache, norm_cache)


def conv_norm_backward(dout, cache, need_dx=True):
    """Returns (dx, dw, db), plus (dgamma, dbeta) after a norm; dx is None when need_dx is False."""
    layers, conv_cache, norm_cache = cache
    if isinstance(norm_cache, BatchNormFold):
        dx, dw, db = layers.conv_backward(dout, conv_cache, need_dx=need_dx)
        return (dx, *unfold_batchnorm_grads(dw, db, norm_cache))
    da, *norm_grads = spatial_norm_backward(dout, norm_cache)
    dx, dw, db = layers.conv_backward(da, conv_cache, need_dx=need_dx)
    return (dx, dw, db, *norm_grads)


def conv_norm_relu_forward(x, w, b, conv_param, norm=None, layers=FAST_LAYERS):
    """conv -> [spatial norm] -> relu (a ResNet's stem, a residual block's first conv). Returns (out, cache)."""
    a, unit_cache = conv_norm_forward(x, w, b, conv_param, norm, layers)
    out, relu_cache = relu_forward(a)
    return out, (unit_cache, relu_cache)


def conv_norm_relu_backward(dout, cache, need_dx=True):
    """Returns (dx, dw, db), plus (dgamma, dbeta) after a norm."""
    unit_cache, relu_cache = cache
    return conv_norm_backward(relu_backward(dout, relu_cache), unit_cache, need_dx)


def residual_block_forward(x, unit_a, unit_b, shortcut=None, layers=FAST_LAYERS):
    """A basic residual block (He et al., 2016): relu(norm_b(conv_b(relu(norm_a(conv_a(x))))) + s(x)).

    unit_a, unit_b: the two conv units (w, b, conv_param, norm spec); shortcut: None for
    the identity (x must then have the block's output shape) or a projection's conv unit.
    Returns (out, cache).
    """
    h, cache_a = conv_norm_relu_forward(x, *unit_a, layers)
    y, cache_b = conv_norm_forward(h, *unit_b, layers)
    if shortcut is None:
        if x.shape != y.shape:
            raise ValueError(f"an identity shortcut needs the block's output shape {tuple(y.shape)} from x, got "
                             f"{tuple(x.shape)}: give a projection shortcut")
        s, cache_s = x, None
    else:
        s, cache_s = conv_norm_forward(x, *shortcut, layers)
    out, relu_cache = relu_forward(y + s)
    return out, (cache_a, cache_b, cache_s, relu_cache)


def residual_block_backward(dout, cache, need_dx=True):
    """Returns (dx, grads_a, grads_b, grads_shortcut): each grads a tuple (dw, db[, dgamma, dbeta])
    of its conv unit, () for an identity shortcut; dx is None when need_dx is False."""
    cache_a, cache_b, cache_s, relu_cache = cache
    dsum = relu_backward(dout, relu_cache)
    dh, *grads_b = conv_norm_backward(dsum, cache_b)
    dx, *grads_a = conv_norm_relu_backward(dh, cache_a, need_dx)
    grads_s = ()
    if cache_s is None:
        dx_s = dsum
    else:
        dx_s, *grads_s = conv_norm_backward(dsum, cache_s, need_dx)
    return (dx + dx_s if need_dx else None), tuple(grads_a), tuple(grads_b), tuple(grads_s)
