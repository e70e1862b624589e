"""The three-layer convolutional network of CS231n assignment 2, with optional normalisation.

    conv - [norm] - relu - 2x2 max pool - affine - relu - affine - softmax

The norm layer, after the convolution, is spatial batch norm or spatial group
norm (layer norm and instance norm being group norm with G=1 and G=C).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import checks, fast_layers, layers
from .backend import require_device, to_numpy
from .layer_utils import (
    POOL_2X2,
    affine_relu_backward,
    affine_relu_forward,
    conv_relu_pool_backward,
    conv_relu_pool_forward,
)

NORMALIZATIONS = ("none", "batchnorm", "groupnorm", "layernorm", "instancenorm")
_DTYPES = {"float32": np.float32, "float64": np.float64}


def canonical_normalization(normalization) -> str:
    """None or 'none' -> 'none'; otherwise one of NORMALIZATIONS, else ValueError."""
    name = "none" if normalization is None else normalization
    if name not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS} or None, got {normalization!r}")
    return name


def canonical_dtype(dtype) -> type:
    """np.float32 or np.float64 from a dtype or its name, else ValueError."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return _DTYPES[name]


class ThreeLayerConvNet:
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
        """
        if len(tuple(input_dim)) != 3:
            raise ValueError(f"input_dim must be (C, H, W), got {input_dim!r}")
        C, H, W = (checks.require_positive_int("input_dim", int(d)) for d in input_dim)
        for name, value in (("num_filters", num_filters), ("filter_size", filter_size),
                            ("hidden_dim", hidden_dim), ("num_classes", num_classes)):
            checks.require_positive_int(name, value)
        if filter_size % 2 == 0:
            raise ValueError(f"filter_size must be odd so the conv keeps H and W, got {filter_size}")
        if H < 2 or W < 2:
            raise ValueError(f"input_dim's H and W must be at least 2 for the 2x2 pool, got {input_dim!r}")
        if reg < 0:
            raise ValueError(f"reg must be >= 0, got {reg!r}")
        self.normalization = canonical_normalization(normalization)
        self.num_groups = {"layernorm": 1, "instancenorm": num_filters}.get(self.normalization, num_groups)
        if self.normalization == "groupnorm":
            checks.groups(num_groups, num_filters)
        self.dtype = canonical_dtype(dtype)
        self.xp = require_device(device)
        self.device = device
        self.input_dim = (C, H, W)
        self.reg = float(reg)
        self.use_fast = use_fast
        self.config = {
            "input_dim": [C, H, W], "num_filters": num_filters, "filter_size": filter_size,
            "hidden_dim": hidden_dim, "num_classes": num_classes, "weight_scale": weight_scale,
            "reg": self.reg, "dtype": np.dtype(self.dtype).name, "normalization": self.normalization,
            "num_groups": self.num_groups,
        }
        self.conv_param = {"stride": 1, "pad": (filter_size - 1) // 2}
        self.bn_param = {"mode": "train"}
        self.gn_param = {}

        rng = np.random.default_rng(seed)
        pooled = num_filters * (H // 2) * (W // 2)
        shapes = {
            "W1": (num_filters, C, filter_size, filter_size),
            "W2": (pooled, hidden_dim),
            "W3": (hidden_dim, num_classes),
        }
        params = {}
        for i, (name, shape) in enumerate(shapes.items(), start=1):
            params[name] = weight_scale * rng.standard_normal(shape)
            params[f"b{i}"] = np.zeros(shape[-1] if i > 1 else num_filters)
        if self.normalization != "none":
            params["gamma1"] = np.ones(num_filters)
            params["beta1"] = np.zeros(num_filters)
        self.params = {k: self.xp.asarray(v, dtype=self.dtype) for k, v in params.items()}

    # ------------------------------------------------------------------
    # Forward and backward
    # ------------------------------------------------------------------

    def _layers(self):
        """(conv, pool, batch norm, group norm), each a (forward, backward) pair: the
        fast twins, or the naive loops and reference norms when use_fast is False."""
        if self.use_fast:
            f = fast_layers
            return ((f.conv_forward_fast, f.conv_backward_fast),
                    (f.max_pool_forward_fast, f.max_pool_backward_fast),
                    (f.spatial_batchnorm_forward_fast, f.spatial_batchnorm_backward_fast),
                    (f.spatial_groupnorm_forward_fast, f.spatial_groupnorm_backward_fast))
        return ((layers.conv_forward_naive, layers.conv_backward_naive),
                (layers.max_pool_forward_naive, layers.max_pool_backward_naive),
                (layers.spatial_batchnorm_forward, layers.spatial_batchnorm_backward),
                (layers.spatial_groupnorm_forward, layers.spatial_groupnorm_backward))

    def _check_input(self, X, y):
        if X.ndim != 4 or tuple(X.shape[1:]) != self.input_dim:
            raise ValueError(
                f"X must have shape (N, {', '.join(map(str, self.input_dim))}) to match input_dim, "
                f"got {tuple(X.shape)}"
            )
        if y is not None and len(y) != len(X):
            raise ValueError(f"y has {len(y)} labels but X has {len(X)} images")

    def loss(self, X, y=None):
        """Scores, or the loss and its gradients.

        X: (N, C, H, W) images; y: (N,) integer labels, or None.
        Returns, if y is None: scores (N, num_classes), computed in test mode (batch
        norm uses its running statistics). Otherwise (loss, grads): the softmax loss
        plus L2 regularisation as a Python float, and grads with the keys and shapes
        of self.params.
        """
        self._check_input(X, y)
        xp = self.xp
        X = xp.asarray(X, dtype=self.dtype)
        mode = "test" if y is None else "train"
        p = self.params
        (conv_f, conv_b), (pool_f, pool_b), batchnorm, groupnorm = self._layers()

        # Max pooling commutes with relu (max is monotone), so the relu acts on the
        # pooled map, a quarter of the size; the fused layer also never stores the
        # full-size activation.
        fused = self.use_fast and self.normalization == "none"
        if fused:
            r, conv_cache = conv_relu_pool_forward(X, p["W1"], p["b1"], self.conv_param, POOL_2X2)
        else:
            a, conv_cache = conv_f(X, p["W1"], p["b1"], self.conv_param)
            norm_cache = None
            if self.normalization == "batchnorm":
                self.bn_param["mode"] = mode
                a, norm_cache = batchnorm[0](a, p["gamma1"], p["beta1"], self.bn_param)
            elif self.normalization != "none":
                a, norm_cache = groupnorm[0](a, p["gamma1"], p["beta1"], self.num_groups, self.gn_param)
            pooled, pool_cache = pool_f(a, POOL_2X2)
            r, relu_cache = layers.relu_forward(pooled)
        h, hidden_cache = affine_relu_forward(r, p["W2"], p["b2"])
        scores, scores_cache = layers.affine_forward(h, p["W3"], p["b3"])
        if y is None:
            return scores

        y = xp.asarray(y)
        data_loss, dscores = layers.softmax_loss(scores, y)
        weights = ("W1", "W2", "W3") if self.reg else ()  # reg=0: no passes over the weights
        # Summed on the array's device and read back once: each float() is a GPU sync.
        loss = data_loss + 0.5 * self.reg * sum((p[w] * p[w]).sum() for w in weights)

        grads = {}
        dh, grads["W3"], grads["b3"] = layers.affine_backward(dscores, scores_cache)
        dr, grads["W2"], grads["b2"] = affine_relu_backward(dh, hidden_cache)
        # Nothing upstream of the first layer needs dX.
        if fused:
            _, grads["W1"], grads["b1"] = conv_relu_pool_backward(dr, conv_cache, need_dx=False)
        else:
            da = pool_b(layers.relu_backward(dr, relu_cache), pool_cache)
            if self.normalization == "batchnorm":
                da, grads["gamma1"], grads["beta1"] = batchnorm[1](da, norm_cache)
            elif self.normalization != "none":
                da, grads["gamma1"], grads["beta1"] = groupnorm[1](da, norm_cache)
            if self.use_fast:
                _, grads["W1"], grads["b1"] = conv_b(da, conv_cache, need_dx=False)
            else:
                _, grads["W1"], grads["b1"] = conv_b(da, conv_cache)
        for w in weights:
            grads[w] = grads[w] + self.reg * p[w]
        return float(loss), grads

    def predict(self, X, batch_size: int = 500) -> np.ndarray:
        """Predicted class labels (N,) as a NumPy int64 array, computed in batches."""
        labels = [to_numpy(self.xp.argmax(self.loss(X[i : i + batch_size]), axis=1))
                  for i in range(0, len(X), batch_size)]
        return np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------
    # State: parameters plus batch norm's running statistics
    # ------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters and running statistics as host NumPy copies."""
        state = {k: np.array(to_numpy(v)) for k, v in self.params.items()}
        for key in ("running_mean", "running_var"):
            if key in self.bn_param:
                state[f"bn_{key}"] = np.array(to_numpy(self.bn_param[key]))
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore parameters (and running statistics) saved by state_dict.

        Raises ValueError when names or shapes don't match this model.
        """
        expected = {k: tuple(v.shape) for k, v in self.params.items()}
        given = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("bn_")}
        if given != expected:
            raise ValueError(f"state does not match this model: expected parameters {expected}, got {given}")
        self.params = {k: self.xp.asarray(state[k], dtype=self.dtype) for k in expected}
        for key in ("running_mean", "running_var"):
            if f"bn_{key}" in state:
                self.bn_param[key] = self.xp.asarray(state[f"bn_{key}"], dtype=self.dtype)

    def save(self, path: str | os.PathLike) -> Path:
        """Write config and state to an .npz file (no pickle). Returns the path."""
        path = Path(path)
        arrays = {f"state/{k}": v for k, v in self.state_dict().items()}
        np.savez(path, config=np.array(json.dumps(self.config)), **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> ThreeLayerConvNet:
        """Rebuild a model saved by save()."""
        with np.load(path, allow_pickle=False) as f:
            config = json.loads(str(f["config"]))
            state = {k.removeprefix("state/"): f[k] for k in f.files if k.startswith("state/")}
        model = cls(**{**config, "input_dim": tuple(config["input_dim"])}, device=device)
        model.load_state_dict(state)
        return model
