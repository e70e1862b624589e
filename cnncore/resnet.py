"""A small residual network: the closest CPU-sized relative of the Group Normalization paper's ResNet-50.

    stem:     conv 3x3 - norm - relu                                  width F
    stage 1:  {basic block} x d, identity shortcuts                   width F,  the input's H x W
    stage 2:  {basic block} x d, the first downsampling by 2          width 2F, H/2 x W/2
    stage 3:  {basic block} x d, the first downsampling by 2          width 4F, H/4 x W/4
    head:     global average pool - affine - softmax

A basic block (He et al., 2016) is relu(norm(conv(relu(norm(conv(x))))) + shortcut(x)),
the shortcut the identity, or a projection (conv - norm) where the block changes
width and size. What it keeps of ResNet-50: a stem, three stages of residual blocks
whose widths double as the maps halve, a norm layer after every conv (projections
included), global average pooling, and the last norm of each block starting with
gamma = 0 (Goyal et al., 2017's recipe for ResNet-50), so each block starts as
its shortcut. What it drops, to train on a CPU in about a minute: the bottleneck
blocks (1x1-3x3-1x1), the 7x7 stride-2 stem and its max pool, the fourth stage, and
most of the width and depth. With d = 1 it has 9 norm layers (the stem, 2 per block,
2 projections); on 28x28 MNIST they sit on 28x28, 14x14 and 7x7 maps, 3 on each.

Downsampling. The library's convolutions must tile their padded input exactly
((H + 2*pad - k) % stride == 0), which ResNet's 3x3 stride-2 pad-1 conv does only on
odd maps: on 28x28, (28 + 2 - 3) % 2 = 1. So the downsampling conv is 4x4, stride 2,
pad 1, along an even axis (3x3 along an odd one), and the projection 2x2, stride 2,
pad 0 (1x1 along an odd axis): both give ceil(H / 2), and both windows are centred on
the same input point (2i + 1/2 along an even axis, 2i along an odd one), so the
shortcut and the main path see the same place. Any input size works, square or not.

Parameters: conv i (1-based, in the order stem; then per block its first conv, its
second, its projection) has W{i} (F_i, C_i, kh, kw), b{i} (F_i,) and, with a norm
layer, gamma{i}, beta{i} (F_i,): norm layer i is conv i's. The scores' affine layer
is W{n+1}, b{n+1} after n convs. Batch norm's running statistics live in
``self.bn_params``, one dict per norm layer.
"""

from __future__ import annotations

import math

import numpy as np

from . import checks
from .classifier import ImageClassifier
from .cnn import canonical_normalization
from .layer_utils import (
    FAST_LAYERS,
    NAIVE_LAYERS,
    conv_norm_relu_backward,
    conv_norm_relu_forward,
    residual_block_backward,
    residual_block_forward,
    spatial_norm_forward,
)
from .layers import affine_backward, affine_forward, global_avg_pool_backward, global_avg_pool_forward, relu_forward
from .net_shapes import NUM_STAGES, ConvUnit, layout, stage_maps  # stage_maps: part of this module's API


class ResNet(ImageClassifier):
    """stem - 3 stages of basic residual blocks - global average pool - affine - softmax.

    See the module's docstring for the layout, the downsampling and the parameter names.
    """

    def __init__(
        self,
        input_dim=(3, 32, 32),
        num_filters: int = 8,
        blocks_per_stage: int = 1,
        num_classes: int = 10,
        weight_scale: float | None = None,
        reg: float = 0.0,
        dtype=np.float32,
        normalization: str | None = "batchnorm",
        num_groups: int = 4,
        zero_init_residual: bool = True,
        use_fast: bool = True,
        seed: int | None = None,
        device: str = "cpu",
        norm_batch: int | None = None,
    ):
        """
        input_dim: (C, H, W) of one image (any size: see the module's downsampling).
        num_filters: F, the width of the stem and of stage 1; stages 2 and 3 have 2F and 4F.
        blocks_per_stage: d, basic blocks in each stage (1 + 6d + 2 norm layers).
        num_classes: the scores' width.
        weight_scale: the standard deviation of every initial weight, as in the other nets;
          None (the default): He initialisation, sqrt(2 / fan_in) for each conv and
          sqrt(1 / fan_in) for the affine layer, which keeps a net without norm trainable.
        reg: L2 strength; the loss adds 0.5 * reg * sum(W**2) over every W.
        dtype: float32 or float64, for parameters and computation.
        normalization: 'batchnorm' (the default, ResNet-50's), 'groupnorm' (num_groups groups
          in every layer; it must divide F), 'layernorm' (G=1), 'instancenorm' (G=C), or
          None/'none'.
        zero_init_residual: start the last norm of each block with gamma = 0 (Goyal et al.,
          2017), so every block starts as its shortcut.
        use_fast: the vectorised conv and norms (False: the naive loops and reference norms).
        seed: seeds the weight initialisation.
        device: 'cpu' (NumPy) or 'cuda' (CuPy).
        norm_batch: batch norm's images per statistics group (ghost batch norm, see
          layers.batchnorm_forward); None: the whole batch. Ignored by the other norms.
        """
        C, H, W = checks.image_dims(input_dim)
        F = checks.require_positive_int("num_filters", num_filters)
        depth = checks.require_positive_int("blocks_per_stage", blocks_per_stage)
        num_groups = checks.require_positive_int("num_groups", num_groups)
        if not isinstance(zero_init_residual, bool):
            raise ValueError(f"zero_init_residual must be True or False, got {zero_init_residual!r}")
        self.normalization = canonical_normalization(normalization)
        if self.normalization == "groupnorm" and F % num_groups:
            raise ValueError(f"num_groups={num_groups} groups must divide num_filters={F}, the narrowest "
                             f"layers' channels ({F} % {num_groups} = {F % num_groups}, expected 0)")
        self.input_dim = (C, H, W)
        self.layers = FAST_LAYERS if use_fast else NAIVE_LAYERS
        self._setup(config={"input_dim": [C, H, W], "num_filters": F, "blocks_per_stage": depth,
                            "normalization": self.normalization, "num_groups": num_groups,
                            "zero_init_residual": zero_init_residual},
                    num_classes=num_classes, weight_scale=weight_scale, reg=reg, dtype=dtype, device=device,
                    norm_batch=norm_batch)
        self.num_groups = num_groups
        self.stem, self.blocks = layout(C, H, W, F, depth)
        self.units = [self.stem] + [u for block in self.blocks for u in (block.a, block.b, block.projection) if u]
        self.fc_index = len(self.units) + 1
        # G of each unit's group-kind norm (None for batch norm): 1 for layer norm, C for instance norm.
        self.unit_groups = [None if self.normalization in ("none", "batchnorm") else
                            {"layernorm": 1, "instancenorm": u.out_channels}.get(self.normalization, num_groups)
                            for u in self.units]
        self.params = self._as_params(self._initial_params(F, seed, zero_init_residual))
        self.bn_params = [self._new_bn_param(u.out_channels) if self.normalization == "batchnorm" else {}
                          for u in self.units] if self.normalization != "none" else []

    def _checked_weight_scale(self, weight_scale):
        return None if weight_scale is None else super()._checked_weight_scale(weight_scale)

    def _initial_params(self, F, seed, zero_init_residual) -> dict:
        """Weights in unit order from one generator, then the affine layer; gammas 1 (0 for the last
        norm of each block with zero_init_residual), betas and biases 0."""
        rng = np.random.default_rng(seed)
        params = {}
        for u in self.units:
            fan_in = u.in_channels * u.kernel[0] * u.kernel[1]
            scale = math.sqrt(2 / fan_in) if self.weight_scale is None else self.weight_scale
            params[f"W{u.index}"] = scale * rng.standard_normal((u.out_channels, u.in_channels, *u.kernel))
            params[f"b{u.index}"] = np.zeros(u.out_channels)
        fan_in = F * 2 ** (NUM_STAGES - 1)
        scale = math.sqrt(1 / fan_in) if self.weight_scale is None else self.weight_scale
        params[f"W{self.fc_index}"] = scale * rng.standard_normal((fan_in, self.num_classes))
        params[f"b{self.fc_index}"] = np.zeros(self.num_classes)
        if self.normalization != "none":
            last = {block.b.index for block in self.blocks} if zero_init_residual else set()
            for u in self.units:
                params[f"gamma{u.index}"] = np.full(u.out_channels, 0.0 if u.index in last else 1.0)
                params[f"beta{u.index}"] = np.zeros(u.out_channels)
        return params

    # ------------------------------------------------------------------
    # The norm-layer protocol
    # ------------------------------------------------------------------

    def _norm_groups(self) -> list[tuple[int, int | None]]:
        return [(u.index, G) for u, G in zip(self.units, self.unit_groups)]

    def _unit_args(self, unit: ConvUnit, bn_params) -> tuple:
        """(w, b, conv_param, norm spec) of a unit, as layer_utils' conv units take them."""
        p, i = self.params, unit.index
        if self.normalization == "none":
            norm = None
        elif self.normalization == "batchnorm":
            norm = ("batchnorm", p[f"gamma{i}"], p[f"beta{i}"], bn_params[i - 1])
        else:
            norm = ("groupnorm", p[f"gamma{i}"], p[f"beta{i}"], self.unit_groups[i - 1], bn_params[i - 1])
        return p[f"W{i}"], p[f"b{i}"], unit.conv_param, norm

    # ------------------------------------------------------------------
    # Forward and backward
    # ------------------------------------------------------------------

    def _forward(self, X, mode, bn_params):
        h, stem_cache = conv_norm_relu_forward(X, *self._unit_args(self.stem, bn_params), self.layers)
        block_caches = []
        for block in self.blocks:
            projection = block.projection and self._unit_args(block.projection, bn_params)
            h, cache = residual_block_forward(h, self._unit_args(block.a, bn_params),
                                              self._unit_args(block.b, bn_params), projection, self.layers)
            block_caches.append(cache)
        pooled, pool_cache = global_avg_pool_forward(h)
        p = self.params
        scores, fc_cache = affine_forward(pooled, p[f"W{self.fc_index}"], p[f"b{self.fc_index}"])
        return scores, (stem_cache, block_caches, pool_cache, fc_cache)

    def _backward(self, dscores, cache):
        stem_cache, block_caches, pool_cache, fc_cache = cache
        grads = {}
        dpooled, grads[f"W{self.fc_index}"], grads[f"b{self.fc_index}"] = affine_backward(dscores, fc_cache)
        dh = global_avg_pool_backward(dpooled, pool_cache)
        for block, block_cache in zip(reversed(self.blocks), reversed(block_caches)):
            dh, *unit_grads = residual_block_backward(dh, block_cache)
            for unit, g in zip((block.a, block.b, block.projection), unit_grads):
                if unit is not None:
                    _put(grads, unit, g)
        _, *stem_grads = conv_norm_relu_backward(dh, stem_cache, need_dx=False)  # nothing upstream needs dX
        _put(grads, self.stem, stem_grads)
        return grads

    def _norm_inputs(self, X, mode, bn_params, count):
        # Unit by unit, the blocks' sandwiches opened up: each conv's output is a norm layer's
        # input. A diagnostic's path, which keeps the training path's sandwiches as they are.
        inputs = []

        def normalised(unit, x):
            w, b, conv_param, norm = self._unit_args(unit, bn_params)
            a = self.layers.conv_forward(x, w, b, conv_param)[0]
            inputs.append(a)
            return spatial_norm_forward(a, norm, self.layers)[0]

        h = relu_forward(normalised(self.stem, X))[0]
        for block in self.blocks:
            if len(inputs) >= count:
                break
            y = normalised(block.b, relu_forward(normalised(block.a, h))[0])
            h = relu_forward(y + (h if block.projection is None else normalised(block.projection, h)))[0]
        return inputs[:count]


def _put(grads: dict, unit: ConvUnit, unit_grads) -> None:
    """A conv unit's (dw, db[, dgamma, dbeta]) into grads, under its parameters' names."""
    grads.update(zip((f"W{unit.index}", f"b{unit.index}", f"gamma{unit.index}", f"beta{unit.index}"), unit_grads))
