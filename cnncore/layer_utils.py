"""Sandwich layers: common stacks of layers composed into one forward/backward pair.

Built from the fast layers in ``cnncore.fast_layers`` (convolution, pooling,
spatial norms) and the others in ``cnncore.layers``. Each forward returns
``(out, cache)``; each backward takes ``(dout, cache)`` and returns the
gradients of the forward's array inputs, in order.
"""

from __future__ import annotations

from .fast_layers import (
    conv_backward_fast,
    conv_forward_fast,
    conv_relu_pool_backward_fast,
    conv_relu_pool_forward_fast,
    max_pool_backward_fast,
    max_pool_forward_fast,
    spatial_batchnorm_backward_fast,
    spatial_batchnorm_forward_fast,
    spatial_groupnorm_backward_fast,
    spatial_groupnorm_forward_fast,
)
from .layers import affine_backward, affine_forward, relu_backward, relu_forward

POOL_2X2 = {"pool_height": 2, "pool_width": 2, "stride": 2}


def affine_relu_forward(x, w, b):
    """affine -> relu. x: (N, d_1, ..., d_k); w: (D, M); b: (M,). Returns (out (N, M), cache)."""
    a, fc_cache = affine_forward(x, w, b)
    out, relu_cache = relu_forward(a)
    return out, (fc_cache, relu_cache)


def affine_relu_backward(dout, cache):
    """Returns (dx, dw, db)."""
    fc_cache, relu_cache = cache
    return affine_backward(relu_backward(dout, relu_cache), fc_cache)


def conv_relu_forward(x, w, b, conv_param):
    """conv -> relu. x: (N, C, H, W); w: (F, C, HH, WW); b: (F,). Returns (out (N, F, H', W'), cache)."""
    a, conv_cache = conv_forward_fast(x, w, b, conv_param)
    out, relu_cache = relu_forward(a)
    return out, (conv_cache, relu_cache)


def conv_relu_backward(dout, cache):
    """Returns (dx, dw, db)."""
    conv_cache, relu_cache = cache
    return conv_backward_fast(relu_backward(dout, relu_cache), conv_cache)


def conv_relu_pool_forward(x, w, b, conv_param, pool_param=POOL_2X2):
    """conv -> relu -> max pool (2x2, stride 2 unless pool_param says otherwise).

    Fused (see conv_relu_pool_forward_fast): the full-size activation is never stored.
    Returns (out (N, F, H'', W''), cache).
    """
    return conv_relu_pool_forward_fast(x, w, b, conv_param, pool_param)


def conv_relu_pool_backward(dout, cache, need_dx=True):
    """Returns (dx, dw, db); dx is None when need_dx is False."""
    return conv_relu_pool_backward_fast(dout, cache, need_dx=need_dx)


def conv_bn_relu_pool_forward(x, w, b, gamma, beta, conv_param, bn_param, pool_param=POOL_2X2):
    """conv -> spatial batch norm -> relu -> max pool. gamma, beta: (F,) or (1, F, 1, 1).

    Returns (out, cache); bn_param's running statistics are updated in train mode.
    """
    a, conv_cache = conv_forward_fast(x, w, b, conv_param)
    an, norm_cache = spatial_batchnorm_forward_fast(a, gamma, beta, bn_param)
    return _pool_relu_forward(an, pool_param, conv_cache, norm_cache)


def conv_bn_relu_pool_backward(dout, cache, need_dx=True):
    """Returns (dx, dw, db, dgamma, dbeta)."""
    return _conv_norm_relu_pool_backward(dout, cache, spatial_batchnorm_backward_fast, need_dx)


def conv_gn_relu_pool_forward(x, w, b, gamma, beta, conv_param, G, gn_param, pool_param=POOL_2X2):
    """conv -> spatial group norm (G groups) -> relu -> max pool.

    Returns (out, cache).
    """
    a, conv_cache = conv_forward_fast(x, w, b, conv_param)
    an, norm_cache = spatial_groupnorm_forward_fast(a, gamma, beta, G, gn_param)
    return _pool_relu_forward(an, pool_param, conv_cache, norm_cache)


def conv_gn_relu_pool_backward(dout, cache, need_dx=True):
    """Returns (dx, dw, db, dgamma, dbeta)."""
    return _conv_norm_relu_pool_backward(dout, cache, spatial_groupnorm_backward_fast, need_dx)


def _pool_relu_forward(an, pool_param, conv_cache, norm_cache):
    """relu -> max pool, as max pool -> relu: they commute, and the pooled map is smaller."""
    pooled, pool_cache = max_pool_forward_fast(an, pool_param)
    out, relu_cache = relu_forward(pooled)
    return out, (conv_cache, norm_cache, pool_cache, relu_cache)


def _conv_norm_relu_pool_backward(dout, cache, norm_backward, need_dx):
    conv_cache, norm_cache, pool_cache, relu_cache = cache
    dan = max_pool_backward_fast(relu_backward(dout, relu_cache), pool_cache)
    da, dgamma, dbeta = norm_backward(dan, norm_cache)
    dx, dw, db = conv_backward_fast(da, conv_cache, need_dx=need_dx)
    return dx, dw, db, dgamma, dbeta
