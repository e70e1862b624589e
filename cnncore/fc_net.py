"""Fully connected networks of CS231n assignments 1 and 2.

    TwoLayerNet:       affine - relu - affine - softmax
    FullyConnectedNet: {affine - [batch/layer norm] - relu - [dropout]} x (L - 1) - affine - softmax

Inputs of shape (N, d_1, ..., d_k) are flattened to (N, d_1 * ... * d_k), as
CS231n's affine layer does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from . import checks
from .classifier import Classifier, NormLayer
from .fast_norms import batchnorm_backward_fast, batchnorm_forward_fast, layernorm_backward_fast, layernorm_forward_fast
from .layers import affine_backward, affine_forward, dropout_backward, dropout_forward, relu_backward, relu_forward

# (forward, backward) of each norm layer; both take (x, gamma, beta, bn_param).
# The vectorised twins of layers' batchnorm_forward/batchnorm_backward_alt and layer norm: the same
# results and caches, with a fraction of the per-call cost that dominates at small batches.
_NORMS = {"batchnorm": (batchnorm_forward_fast, batchnorm_backward_fast),
          "layernorm": (layernorm_forward_fast, layernorm_backward_fast)}


class FullyConnectedNet(Classifier):
    """{affine - [batch/layer norm] - relu - [dropout]} x (L - 1) - affine - softmax.

    Parameters live in ``self.params``: W1..WL, b1..bL, and with a norm layer
    gamma1..gamma{L-1}, beta1..beta{L-1}. ``self.bn_params`` holds one dict per norm
    layer ({"mode": "train"} and running statistics for batch norm, {} for layer
    norm); ``self.dropout_param`` is {"mode": "train", "p": dropout_keep_ratio,
    "seed": seed} when dropout is on.
    """

    def __init__(
        self,
        hidden_dims: Sequence[int],
        input_dim: int = 3 * 32 * 32,
        num_classes: int = 10,
        dropout_keep_ratio: float = 1,
        normalization: str | None = None,
        reg: float = 0.0,
        weight_scale: float = 1e-2,
        dtype=np.float32,
        seed: int | None = None,
        device: str = "cpu",
        norm_batch: int | None = None,
    ):
        """
        hidden_dims: the width of each hidden layer (possibly none: a linear classifier).
        input_dim: D, the size of one flattened input.
        num_classes: the number of classes to score.
        dropout_keep_ratio: the probability of keeping a unit, in (0, 1]; 1 turns dropout off.
        normalization: None (or 'none'), 'batchnorm' or 'layernorm'.
        reg: L2 strength; the loss adds 0.5 * reg * sum(W**2) over every W.
        weight_scale: standard deviation of the initial weights (biases start at 0).
        dtype: float32 or float64, for parameters and computation.
        seed: seeds the weight initialisation and dropout's masks (the same mask at each
          call, as CS231n's gradient checks want).
        device: 'cpu' (NumPy) or 'cuda' (CuPy).
        norm_batch: batch norm's rows per statistics group (ghost batch norm, see
          layers.batchnorm_forward); None: the whole batch. Ignored by layer norm.
        """
        if isinstance(hidden_dims, (str, bytes)) or not isinstance(hidden_dims, Sequence):
            raise ValueError(f"hidden_dims must be a sequence of positive integers, got {hidden_dims!r}")
        hidden = [checks.require_positive_int(f"hidden_dims[{i}]", h) for i, h in enumerate(hidden_dims)]
        D = checks.require_positive_int("input_dim", input_dim)
        keep = checks.require_real("dropout_keep_ratio", dropout_keep_ratio, low=0, high=1, low_open=True)
        if normalization not in (None, "none", *_NORMS):
            raise ValueError(f"normalization must be None, 'batchnorm' or 'layernorm', got {normalization!r}")
        self.normalization = None if normalization == "none" else normalization
        checks.require_int("seed", seed, minimum=0, optional=True)
        self._setup(config={"hidden_dims": hidden, "input_dim": D, "dropout_keep_ratio": keep,
                            "normalization": self.normalization, "seed": seed},
                    num_classes=num_classes, weight_scale=weight_scale, reg=reg, dtype=dtype, device=device,
                    norm_batch=norm_batch)
        self.num_layers = len(hidden) + 1
        self.input_size = D

        dims = [D, *hidden, self.num_classes]
        rng = np.random.default_rng(seed)
        params = {}
        for i in range(1, self.num_layers + 1):
            params[f"W{i}"] = self.weight_scale * rng.standard_normal((dims[i - 1], dims[i]))
            params[f"b{i}"] = np.zeros(dims[i])
            if self.normalization is not None and i < self.num_layers:
                params[f"gamma{i}"], params[f"beta{i}"] = np.ones(dims[i]), np.zeros(dims[i])
        self.params = self._as_params(params)

        self.bn_params = []
        if self.normalization is not None:
            self.bn_params = [self._new_bn_param(h) if self.normalization == "batchnorm" else {} for h in hidden]
        self.use_dropout = keep != 1
        self.dropout_param = {"mode": "train", "p": keep, "seed": seed} if self.use_dropout else {}

    def _check_input_shape(self, X) -> None:
        if X.ndim < 2 or math.prod(X.shape[1:]) != self.input_size:
            raise ValueError(f"X must have shape (N, d_1, ..., d_k) with d_1 * ... * d_k = input_dim = "
                             f"{self.input_size}, got {tuple(X.shape)}")

    def norm_layers(self) -> list[NormLayer]:
        if self.normalization is None:
            return []
        kind, G = ("batchnorm", None) if self.normalization == "batchnorm" else ("groupnorm", 1)
        return [NormLayer(i, kind, G) for i in range(1, self.num_layers)]

    def _forward(self, X, mode, bn_params):
        x, caches = X, []
        for i in range(1, self.num_layers):
            x, cache = self._hidden_forward(i, x, mode, bn_params)
            caches.append(cache)
        L = self.num_layers
        scores, scores_cache = affine_forward(x, self.params[f"W{L}"], self.params[f"b{L}"])
        return scores, (caches, scores_cache)

    def _backward(self, dscores, cache):
        caches, scores_cache = cache
        L, grads = self.num_layers, {}
        dx, grads[f"W{L}"], grads[f"b{L}"] = affine_backward(dscores, scores_cache)
        for i in range(L - 1, 0, -1):
            dx = self._hidden_backward(i, dx, caches[i - 1], grads, need_dx=i > 1)  # nothing upstream needs dX
        return grads

    def _hidden_forward(self, i, x, mode, bn_params):
        """Hidden layer i: affine - [norm] - relu - [dropout]. Returns (out, cache)."""
        p = self.params
        a, fc_cache = affine_forward(x, p[f"W{i}"], p[f"b{i}"])
        norm_cache = drop_cache = None
        if self.normalization is not None:
            a, norm_cache = _NORMS[self.normalization][0](a, p[f"gamma{i}"], p[f"beta{i}"], bn_params[i - 1])
        out, relu_cache = relu_forward(a)
        if self.use_dropout:
            out, drop_cache = dropout_forward(out, {**self.dropout_param, "mode": mode})
        return out, (fc_cache, norm_cache, relu_cache, drop_cache)

    def _hidden_backward(self, i, dout, cache, grads, need_dx=True):
        """Fills grads with W{i}, b{i} (gamma{i}, beta{i}); returns dx (None unless need_dx)."""
        fc_cache, norm_cache, relu_cache, drop_cache = cache
        if self.use_dropout:
            dout = dropout_backward(dout, drop_cache)
        da = relu_backward(dout, relu_cache)
        if self.normalization is not None:
            da, grads[f"gamma{i}"], grads[f"beta{i}"] = _NORMS[self.normalization][1](da, norm_cache)
        dx, grads[f"W{i}"], grads[f"b{i}"] = affine_backward(da, fc_cache, need_dx=need_dx)
        return dx

    def _norm_inputs(self, X, mode, bn_params, count):
        inputs, x = [], X
        for i in range(1, count + 1):
            inputs.append(affine_forward(x, self.params[f"W{i}"], self.params[f"b{i}"])[0])
            if i < count:
                x, _ = self._hidden_forward(i, x, mode, bn_params)
        return inputs


class TwoLayerNet(FullyConnectedNet):
    """affine - relu - affine - softmax, CS231n's two-layer net: W1 (D, H), b1, W2 (H, C), b2."""

    def __init__(
        self,
        input_dim: int = 3 * 32 * 32,
        hidden_dim: int = 100,
        num_classes: int = 10,
        weight_scale: float = 1e-3,
        reg: float = 0.0,
        dtype=np.float64,
        seed: int | None = None,
        device: str = "cpu",
    ):
        """
        input_dim: D, the size of one flattened input; hidden_dim: H; num_classes: C.
        weight_scale: standard deviation of the initial weights (biases start at 0).
        reg: L2 strength; the loss adds 0.5 * reg * (sum(W1**2) + sum(W2**2)).
        dtype: float64 (CS231n's) or float32. seed: seeds the weight initialisation.
        device: 'cpu' (NumPy) or 'cuda' (CuPy).
        """
        hidden_dim = checks.require_positive_int("hidden_dim", hidden_dim)
        super().__init__([hidden_dim], input_dim, num_classes, reg=reg, weight_scale=weight_scale, dtype=dtype,
                         seed=seed, device=device)
        self.config = {"model": "TwoLayerNet", "input_dim": self.input_size, "hidden_dim": hidden_dim,
                       "num_classes": self.num_classes, "weight_scale": self.weight_scale, "reg": self.reg,
                       "dtype": np.dtype(self.dtype).name, "seed": seed}
