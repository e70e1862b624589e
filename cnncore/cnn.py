"""Convolutional networks: CS231n's three-layer net, and a deeper net built of the same blocks.

    ThreeLayerConvNet: conv - [norm] - relu - 2x2 max pool - affine - relu - affine - softmax
    ConvNet:           {conv - [norm] - relu - 2x2 max pool} x L - affine - relu - affine - softmax

The norm layer, after each convolution, is spatial batch norm or spatial group
norm (layer norm and instance norm being group norm with G=1 and G=C). Each block
is one sandwich of cnncore.layer_utils, chosen once at construction.

The pool rule: each block's 2x2 pool halves H and W, flooring odd sizes; a block
whose map is smaller than the pool window (H or W under 2) keeps its map and has
no pool. So on 28x28 MNIST images five blocks put their norm layers on 28x28, 14x14,
7x7, 3x3 and 1x1 maps (block_maps), and a sixth block would sit on 1x1 maps again.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import checks
from .classifier import ImageClassifier
from .layer_utils import (
    FAST_LAYERS,
    NAIVE_LAYERS,
    POOL_2X2,
    affine_relu_backward,
    affine_relu_forward,
    conv_bn_relu_pool_forward,
    conv_gn_relu_pool_forward,
    conv_pool_block_backward,
    conv_relu_pool_forward,
    norm_relu_pool_forward,
)
from .layers import affine_backward, affine_forward
from .net_shapes import block_maps

NORMALIZATIONS = ("none", "batchnorm", "groupnorm", "layernorm", "instancenorm")


def canonical_normalization(normalization) -> str:
    """None or 'none' -> 'none'; otherwise one of NORMALIZATIONS, else ValueError."""
    name = "none" if normalization is None else normalization
    if name not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS} or None, got {normalization!r}")
    return name


class _ConvClassifier(ImageClassifier):
    """What the conv nets share: argument checks, parameters, and the conv blocks.

    Block i (1-based) has W{i} (F_i, C_{i-1}, k, k), b{i} (F_i,) and, with a norm
    layer, gamma{i}, beta{i} (F_i,). Its conv has stride 1 and pad (k - 1) // 2, so
    it keeps H and W; its 2x2 pool halves them, flooring odd sizes, unless the map is
    smaller than the window (the pool rule of the module's docstring). The hidden
    affine layer W{L+1}, b{L+1} and the scores' W{L+2}, b{L+2} follow.
    """

    def _setup_conv(self, input_dim, num_filters: tuple, filter_size, hidden_dim, num_classes, weight_scale, reg,
                    dtype, normalization, num_groups, use_fast, seed, device, norm_batch=None) -> None:
        C, H, W = checks.image_dims(input_dim)
        filters = tuple(checks.require_positive_int(f"num_filters[{i}]", F) for i, F in enumerate(num_filters))
        if not filters:
            raise ValueError("num_filters must name at least one block's filters, got ()")
        filter_size = checks.require_positive_int("filter_size", filter_size)
        hidden_dim = checks.require_positive_int("hidden_dim", hidden_dim)
        if filter_size % 2 == 0:
            raise ValueError(f"filter_size must be odd so the conv keeps H and W, got {filter_size}")
        num_groups = checks.require_positive_int("num_groups", num_groups)
        self.normalization = canonical_normalization(normalization)
        self.groups = [self._groups_of_block(num_groups, F, filters) for F in filters]
        self.input_dim = (C, H, W)
        self.layers = FAST_LAYERS if use_fast else NAIVE_LAYERS
        self.conv_param = {"stride": 1, "pad": (filter_size - 1) // 2}
        self._setup(config={"input_dim": [C, H, W], "num_filters": list(filters), "filter_size": filter_size,
                            "hidden_dim": hidden_dim, "normalization": self.normalization, "num_groups": num_groups},
                    num_classes=num_classes, weight_scale=weight_scale, reg=reg, dtype=dtype, device=device,
                    norm_batch=norm_batch)

        maps = block_maps(H, W, len(filters))
        self.pool_params = [POOL_2X2 if pools else None for _, _, pools in maps]
        H, W, pools = maps[-1]
        H, W = (H // 2, W // 2) if pools else (H, W)
        channels = (C, *filters)
        weights = [(F, channels[i], filter_size, filter_size) for i, F in enumerate(filters)]
        weights += [(filters[-1] * H * W, hidden_dim), (hidden_dim, self.num_classes)]
        # Weights first, in order, from one generator: ThreeLayerConvNet's draws, so one
        # block and the same seed give the same parameters.
        rng = np.random.default_rng(seed)
        params = {}
        for i, shape in enumerate(weights, start=1):
            params[f"W{i}"] = self.weight_scale * rng.standard_normal(shape)
            params[f"b{i}"] = np.zeros(shape[0] if i <= len(filters) else shape[-1])
        if self.normalization != "none":
            for i, F in enumerate(filters, start=1):
                params[f"gamma{i}"], params[f"beta{i}"] = np.ones(F), np.zeros(F)
        self.params = self._as_params(params)
        self.num_blocks = len(filters)
        self.bn_params = [self._new_bn_param(F) if self.normalization == "batchnorm" else {}
                          for F in filters] if self.normalization != "none" else []
        self._block_forward = {"none": self._plain_block, "batchnorm": self._batchnorm_block}.get(
            self.normalization, self._groupnorm_block)

    def _groups_of_block(self, num_groups, F, filters):
        """G of a block with F filters: None without group norm, 1 for layer norm, F for instance norm."""
        if self.normalization in ("none", "batchnorm"):
            return None
        G = {"layernorm": 1, "instancenorm": F}.get(self.normalization, num_groups)
        if F % G:
            raise ValueError(f"num_groups={G} groups must divide the {F} channels of every block "
                             f"(num_filters={filters!r}; {F} % {G} = {F % G}, expected 0)")
        return G

    def _norm_groups(self) -> list[tuple[int, int | None]]:
        return list(enumerate(self.groups, start=1))

    # ------------------------------------------------------------------
    # Block i: conv - [norm] - relu - 2x2 max pool, one sandwich
    # ------------------------------------------------------------------

    def _conv_block_forward(self, i, x, bn_params):
        """Block i on x: (out, cache), through the sandwich of the model's normalisation."""
        return self._block_forward(i, x, bn_params[i - 1] if bn_params else None)

    def _conv_block_backward(self, i, dout, cache, grads, need_dx=True):
        """Fills grads with W{i}, b{i} (gamma{i}, beta{i}); returns dx (None unless need_dx)."""
        dx, *block_grads = conv_pool_block_backward(dout, cache, need_dx=need_dx)
        grads.update(zip((f"W{i}", f"b{i}", f"gamma{i}", f"beta{i}"), block_grads))
        return dx

    def _plain_block(self, i, x, _):
        # On the fast layers conv, relu and pool are fused: the full-size map is never stored.
        return conv_relu_pool_forward(x, self.params[f"W{i}"], self.params[f"b{i}"], self.conv_param,
                                      self.pool_params[i - 1], self.layers)

    def _batchnorm_block(self, i, x, bn_param):
        p = self.params
        return conv_bn_relu_pool_forward(x, p[f"W{i}"], p[f"b{i}"], p[f"gamma{i}"], p[f"beta{i}"], self.conv_param,
                                         bn_param, self.pool_params[i - 1], self.layers)

    def _groupnorm_block(self, i, x, gn_param):
        p = self.params
        return conv_gn_relu_pool_forward(x, p[f"W{i}"], p[f"b{i}"], p[f"gamma{i}"], p[f"beta{i}"], self.conv_param,
                                         self.groups[i - 1], gn_param, self.pool_params[i - 1], self.layers)

    def _conv_output(self, i, x):
        """Block i's convolution alone: the input of its norm layer."""
        return self.layers.conv_forward(x, self.params[f"W{i}"], self.params[f"b{i}"], self.conv_param)[0]

    def _after_conv(self, i, a, norm_param):
        """The rest of block i (norm, relu, pool) on its convolution's output a, as its sandwich computes it."""
        p = self.params
        norm = (("batchnorm", p[f"gamma{i}"], p[f"beta{i}"], norm_param) if self.normalization == "batchnorm" else
                ("groupnorm", p[f"gamma{i}"], p[f"beta{i}"], self.groups[i - 1], norm_param))
        return norm_relu_pool_forward(a, norm, self.pool_params[i - 1], self.layers)

    # ------------------------------------------------------------------
    # The whole net: the blocks, then affine - relu - affine
    # ------------------------------------------------------------------

    def _forward(self, X, mode, bn_params):
        L, p = self.num_blocks, self.params
        out, block_caches = X, []
        for i in range(1, L + 1):
            out, cache = self._conv_block_forward(i, out, bn_params)
            block_caches.append(cache)
        hidden, hidden_cache = affine_relu_forward(out, p[f"W{L + 1}"], p[f"b{L + 1}"])
        scores, scores_cache = affine_forward(hidden, p[f"W{L + 2}"], p[f"b{L + 2}"])
        return scores, (block_caches, hidden_cache, scores_cache)

    def _backward(self, dscores, cache):
        block_caches, hidden_cache, scores_cache = cache
        L, grads = self.num_blocks, {}
        dhidden, grads[f"W{L + 2}"], grads[f"b{L + 2}"] = affine_backward(dscores, scores_cache)
        dout, grads[f"W{L + 1}"], grads[f"b{L + 1}"] = affine_relu_backward(dhidden, hidden_cache)
        for i in range(L, 0, -1):
            # Nothing upstream of the first block needs dX.
            dout = self._conv_block_backward(i, dout, block_caches[i - 1], grads, need_dx=i > 1)
        return grads

    def _norm_inputs(self, X, mode, bn_params, count):
        # Each block opened after its conv, whose output is the norm layer's input: the same
        # operations as its sandwich, each conv once. The blocks stop at the last input asked for.
        inputs, out = [], X
        for i in range(1, count + 1):
            inputs.append(self._conv_output(i, out))
            if i < count:
                out = self._after_conv(i, inputs[-1], bn_params[i - 1])
        return inputs


class ThreeLayerConvNet(_ConvClassifier):
    """conv - [norm] - relu - 2x2 max pool - affine - relu - affine - softmax.

    Input: minibatches of N images of shape (C, H, W). The convolution has stride 1
    and pad (filter_size - 1) // 2, so it keeps H and W for odd filter sizes; the
    pool halves them, flooring odd sizes.

    Parameters live in ``self.params``: W1 (F, C, k, k), b1 (F,), W2 (F*H/2*W/2, hidden),
    b2, W3 (hidden, classes), b3, plus gamma1/beta1 (F,) with a norm layer.
    Batch norm's running statistics live in ``self.bn_param``.
    """

    def __init__(
        self,
        input_dim=(3, 32, 32),
        num_filters: int = 32,
        filter_size: int = 7,
        hidden_dim: int = 100,
        num_classes: int = 10,
        weight_scale: float = 1e-3,
        reg: float = 0.0,
        dtype=np.float32,
        normalization: str | None = None,
        num_groups: int = 4,
        use_fast: bool = True,
        seed: int | None = None,
        device: str = "cpu",
        norm_batch: int | None = None,
    ):
        """
        input_dim: (C, H, W) of one image.
        num_filters, filter_size: F filters of size filter_size x filter_size.
        hidden_dim, num_classes: widths of the two affine layers.
        weight_scale: standard deviation of the initial weights (biases start at 0).
        reg: L2 strength; the loss adds 0.5 * reg * sum(W**2) over W1, W2, W3.
        dtype: float32 or float64, for parameters and computation.
        normalization: None/'none', 'batchnorm', 'groupnorm' (num_groups groups),
          'layernorm' (group norm, G=1) or 'instancenorm' (group norm, G=F).
        use_fast: the vectorised conv, pool and spatial norms of fast_layers (False selects
          the naive loops and the reference norms, for checking).
        seed: seeds the weight initialisation.
        device: 'cpu' (NumPy) or 'cuda' (CuPy).
        norm_batch: batch norm's images per statistics group (ghost batch norm, see
          layers.batchnorm_forward); None: the whole batch. Ignored by the other norms.
        """
        F = checks.require_positive_int("num_filters", num_filters)
        self._setup_conv(input_dim, (F,), filter_size, hidden_dim, num_classes, weight_scale, reg, dtype,
                         normalization, num_groups, use_fast, seed, device, norm_batch)
        # G as the norm uses it: 1 for layer norm, F for instance norm.
        self.num_groups = self.groups[0] or num_groups
        self.config.update(num_filters=F, num_groups=self.num_groups)

    @property
    def bn_param(self) -> dict | None:
        """Batch norm's bn_param, running statistics included (None without batch norm)."""
        return self.bn_params[0] if self.normalization == "batchnorm" else None


class ConvNet(_ConvClassifier):
    """{conv - [norm] - relu - 2x2 max pool} x L - affine - relu - affine - softmax.

    One block per entry of num_filters; a block whose map is under 2 pixels in H or W
    keeps it and has no pool (the module's pool rule: five blocks on MNIST's 28x28 put
    their norm layers on 28, 14, 7, 3 and 1 pixel maps). Parameters: W1..WL, b1..bL
    (and gamma1..gammaL, beta1..betaL with a norm layer) for the blocks, W{L+1}, b{L+1} for the hidden
    affine layer and W{L+2}, b{L+2} for the scores: one block has ThreeLayerConvNet's
    names, and with the same seed and arguments its parameters, loss and gradients.
    Batch norm's running statistics live in ``self.bn_params`` (one dict per block).
    """

    def __init__(
        self,
        input_dim=(3, 32, 32),
        num_filters: Sequence[int] | int = (32,),
        filter_size: int = 7,
        hidden_dim: int = 100,
        num_classes: int = 10,
        weight_scale: float = 1e-3,
        reg: float = 0.0,
        dtype=np.float32,
        normalization: str | None = None,
        num_groups: int = 4,
        use_fast: bool = True,
        seed: int | None = None,
        device: str = "cpu",
        norm_batch: int | None = None,
    ):
        """
        input_dim: (C, H, W) of one image.
        num_filters: filters of each block, e.g. (16, 32, 64) (an int F is (F,)); each
          block's 2x2 pool halves H and W, flooring; a block whose map is under 2 in H or
          W keeps it, without a pool (so any number of blocks fits).
        filter_size: every conv's filters are filter_size x filter_size (odd).
        hidden_dim, num_classes: widths of the two affine layers.
        weight_scale: standard deviation of the initial weights (biases start at 0).
        reg: L2 strength; the loss adds 0.5 * reg * sum(W**2) over every W.
        dtype: float32 or float64, for parameters and computation.
        normalization: None/'none', 'batchnorm', 'groupnorm' (num_groups groups in every
          block, as Wu & He use one G for all layers; it must divide every block's
          filters), 'layernorm' (G=1) or 'instancenorm' (G=F of each block).
        use_fast: the vectorised layers (False: the naive loops, for checking).
        seed: seeds the weight initialisation.
        device: 'cpu' (NumPy) or 'cuda' (CuPy).
        norm_batch: batch norm's images per statistics group (ghost batch norm, see
          layers.batchnorm_forward); None: the whole batch. Ignored by the other norms.
        """
        if isinstance(num_filters, (int, np.integer)) and not isinstance(num_filters, bool):
            num_filters = (num_filters,)
        if isinstance(num_filters, (str, bytes)) or not isinstance(num_filters, Sequence):
            raise ValueError(f"num_filters must be a sequence of positive integers such as (16, 32), "
                             f"got {num_filters!r}")
        self._setup_conv(input_dim, tuple(num_filters), filter_size, hidden_dim, num_classes, weight_scale, reg,
                         dtype, normalization, num_groups, use_fast, seed, device, norm_batch)
