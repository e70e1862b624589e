"""What every model shares: the loss's frame, input checks, prediction, state and model files.

A model (ThreeLayerConvNet, ConvNet, FullyConnectedNet, TwoLayerNet, ResNet) subclasses
Classifier and supplies its architecture: the parameters, ``_forward`` and
``_backward``, its input shape and its norm layers. The rest lives here, once.

Dtype rule. A model computes in its own dtype, float32 or float64, chosen at
construction. Its input X must be a float32 or float64 array and is cast to the
model's dtype. float16, integer and bool input is refused with a ValueError
naming X and its dtype, never widened silently: float16 has already lost the
digits the model would compute with, and integer pixels are almost always data
that was never normalised.

Norm-layer protocol (what cnncore.diagnostics reads):
  norm_layers() -> [NormLayer]: one entry per normalisation layer, in forward
    order, with its index i (that of gamma{i}, beta{i}), its kind ('batchnorm' or
    'groupnorm'; layer norm and instance norm are group norm with one group and
    with one group per channel) and its number of groups.
  bn_params: one dict per norm layer, aligned with norm_layers(): a batch norm
    layer's bn_param ('mode', 'running_mean', 'running_var'; the running
    statistics exist from construction, zeros until trained; 'norm_batch' when
    the model normalises in ghost batches, model.norm_batch, which a train-mode
    batch's size must then be a multiple of), or the (empty) parameter dict of a
    group-kind layer.
  norm_inputs(X, mode, bn_params=None, count=None) -> [array]: the input of each
    norm layer (of the first count) for the batch X: (N, C, H, W) after a
    convolution, (N, D) after an affine layer. mode 'train' normalises with batch
    statistics, 'test' with running ones.
  scores(X, mode, bn_params=None) -> (N, num_classes) scores in that mode.
  Both take bn_params to compute with (they set each batch norm dict's 'mode');
  without it they work on copies of the model's, so the model never changes.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import backend, checkpoint, checks, memory, npz_io
from .backend import array_module, require_device, to_numpy
from .layers import softmax_loss

MODEL_MODULES = ("cnncore.cnn", "cnncore.fc_net", "cnncore.resnet")  # imported by load_model, to know every model class
LEGACY_MODEL = "ThreeLayerConvNet"  # files written before configs named their model
LEGACY_RUNNING_STATS = {"bn_running_mean": "running_mean", "bn_running_var": "running_var"}


@dataclass(frozen=True)
class NormLayer:
    """One normalisation layer: index i (of gamma{i}), kind 'batchnorm' or 'groupnorm', its groups G."""

    index: int
    kind: str
    num_groups: int | None = None

    @property
    def name(self) -> str:
        return f"norm{self.index}"


class Classifier:
    """Base of the models: the loss's frame, checks, predict, state_dict, save and load.

    See the module's docstring for the dtype rule and the norm-layer protocol.
    A subclass's __init__ calls _setup first and then sets params and bn_params.
    It implements:
      _forward(X, mode, bn_params) -> (scores, cache), X already checked and cast;
      _backward(dscores, cache) -> grads of the data loss, keyed like params;
      _check_input_shape(X); norm_layers(); _norm_inputs(X, mode, bn_params, count): the inputs
        of the first count norm layers, running no layer past the last of them.
    """

    params: dict
    bn_params: list

    def _setup(self, *, config: dict, num_classes, weight_scale, reg, dtype, device, norm_batch=None) -> None:
        """Check and keep the arguments every model has; config: the constructor's arguments.

        norm_batch: ghost batch norm's images per statistics group (None: the whole batch),
        a positive integer, given to every batch norm layer's bn_param. It is kept, and
        recorded in config, only when config's normalization is batch norm: the other
        norms never mix images, and a model without it keeps the config (and so the
        model files and checkpoints) it had before norm_batch existed.
        """
        self.num_classes = checks.require_positive_int("num_classes", num_classes)
        self.weight_scale = self._checked_weight_scale(weight_scale)
        self.reg = checks.require_real("reg", reg, low=0)
        self.dtype = np.dtype(checks.require_float_dtype("dtype", dtype)).type
        norm_batch = checks.require_int("norm_batch", norm_batch, minimum=1, optional=True)
        self.norm_batch = norm_batch if config.get("normalization") == "batchnorm" else None
        self.xp = require_device(device)
        self.device = device
        ghost = {} if self.norm_batch is None else {"norm_batch": self.norm_batch}
        self.config = {"model": type(self).__name__, **config, **ghost, "num_classes": self.num_classes,
                       "weight_scale": self.weight_scale, "reg": self.reg, "dtype": np.dtype(self.dtype).name}

    def _checked_weight_scale(self, weight_scale):
        """The standard deviation of the initial weights, a real > 0 (a model may allow more)."""
        return checks.require_real("weight_scale", weight_scale, low=0, low_open=True)

    def _as_params(self, arrays: dict) -> dict:
        return {k: self.xp.asarray(v, dtype=self.dtype) for k, v in arrays.items()}

    def _new_bn_param(self, num_features: int) -> dict:
        """A batch norm layer's bn_param, its running statistics zeros, as batchnorm_forward starts them,
        and the model's norm_batch when it has one."""
        zeros = self.xp.zeros(num_features, dtype=self.dtype)
        bn_param = {"mode": "train", "running_mean": zeros, "running_var": zeros.copy()}
        if self.norm_batch is not None:
            bn_param["norm_batch"] = self.norm_batch
        return bn_param

    # ------------------------------------------------------------------
    # Loss, scores, prediction
    # ------------------------------------------------------------------

    def loss(self, X, y=None):
        """Scores, or the loss and its gradients.

        X: (N, ...) inputs of the model's input shape, float32 or float64; y: (N,)
        integer labels, or None.
        Returns, if y is None: scores (N, num_classes), computed in test mode (batch
        norm uses its running statistics, dropout is off). Otherwise (loss, grads):
        the softmax loss plus 0.5 * reg * sum(W**2) over the weights, as a Python
        float, and grads with the keys and shapes of self.params.
        """
        X = self._checked_input(X, y)
        mode = "test" if y is None else "train"
        scores, cache = self._forward(X, mode, self._with_mode(self.bn_params, mode))
        if y is None:
            return scores
        data_loss, dscores = softmax_loss(scores, self.xp.asarray(y))
        grads = self._backward(dscores, cache)
        p = self.params
        weights = [k for k in p if k.startswith("W")] if self.reg else []  # reg=0: no passes over the weights
        # Summed on the array's device and read back once: each float() is a GPU sync.
        loss = data_loss + 0.5 * self.reg * sum((p[w] * p[w]).sum() for w in weights)
        for w in weights:
            grads[w] += self.reg * p[w]  # the backward's own new array: no copy of it
        return float(loss), grads

    def scores(self, X, mode: str = "test", bn_params: list | None = None):
        """Scores (N, num_classes) of X with the norm layers (and dropout) in mode 'train' or 'test'.

        bn_params: the statistics to use and update (see the norm-layer protocol);
        None: copies of the model's, which stay untouched.
        """
        X = self._checked_input(X, None)
        return self._forward(X, mode, self._with_mode(self._own_or(bn_params), mode))[0]

    def norm_inputs(self, X, mode: str = "train", bn_params: list | None = None, count: int | None = None) -> list:
        """The input of each norm layer for the batch X, in the order of norm_layers().

        mode and bn_params as for scores(); the model's own statistics never change.
        count: only the first count layers' inputs (all by default); the forward pass
        stops there, which is what a layer-by-layer diagnostic needs.
        """
        num_layers = len(self.norm_layers())
        count = num_layers if count is None else checks.require_int("count", count, minimum=0, maximum=num_layers)
        X = self._checked_input(X, None)
        return self._norm_inputs(X, mode, self._with_mode(self._own_or(bn_params), mode), count)

    def predict(self, X, batch_size: int | None = None) -> np.ndarray:
        """Predicted class labels (N,) as a NumPy int64 array, computed in batches in test mode
        (batch_size images at a time; None: backend.scoring_images, which keeps a batch in cache).

        Raises ValueError when X holds NaN or inf: its scores would be NaN, and argmax
        would call every such image class 0.
        """
        batch_size = self.scoring_batch(batch_size)
        labels = [to_numpy(self.xp.argmax(self.loss(self._finite(X[i : i + batch_size], i)), axis=1))
                  for i in range(0, len(X), batch_size)]
        return np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, dtype=np.int64)

    def scoring_batch(self, batch_size: int | None = None) -> int:
        """batch_size, checked, or (None) how many images a pass that no backward follows takes at once on
        this model's device (backend.scoring_images): the size of predict's and the diagnostics' passes."""
        if batch_size is None:
            return backend.scoring_images(self.xp)
        return checks.require_positive_int("batch_size", batch_size)

    @staticmethod
    def _finite(X, offset: int):
        """X unchanged, or ValueError naming the first image (offset + its index) that holds NaN or inf.

        Only float arrays are looked at; loss() refuses every other input itself.
        """
        if getattr(X, "dtype", None) is not None and X.dtype.kind == "f" and X.ndim:
            finite = array_module(X).isfinite(X.reshape(len(X), -1)).all(axis=1)
            if not bool(finite.all()):
                first = offset + int(to_numpy(finite).argmin())
                raise checks.NonFiniteError(f"X must be finite, but image {first} holds NaN or inf "
                                            "(its scores would be NaN, and argmax would call it class 0)")
        return X

    def copy_bn_params(self) -> list:
        """Deep copies of bn_params, to compute with without touching the model."""
        return copy.deepcopy(self.bn_params)

    def _own_or(self, bn_params):
        return self.copy_bn_params() if bn_params is None else bn_params

    def _with_mode(self, bn_params: list, mode: str) -> list:
        """bn_params with every batch norm layer's mode set to mode."""
        if mode not in ("train", "test"):
            raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
        layers = self.norm_layers()
        if len(bn_params) != len(layers):
            raise ValueError(f"bn_params must hold one dict per norm layer ({len(layers)}), got {len(bn_params)}")
        for layer, bn_param in zip(layers, bn_params):
            if layer.kind == "batchnorm":
                bn_param["mode"] = mode
        return bn_params

    def _checked_input(self, X, y):
        """X checked (dtype, shape, not empty) and cast to the model's dtype on its device."""
        checks.require_float_array("X", X)
        self._check_input_shape(X)
        if X.shape[0] == 0:
            raise ValueError(f"X is empty: expected at least one example, got shape {tuple(X.shape)}")
        if y is not None and len(y) != len(X):
            raise ValueError(f"y has {len(y)} labels but X has {len(X)} images")
        return self.xp.asarray(X, dtype=self.dtype)

    # ------------------------------------------------------------------
    # State: parameters plus batch norm's running statistics
    # ------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters, and running_mean{i}, running_var{i} of each batch norm layer i, as host NumPy copies."""
        state = {k: np.array(to_numpy(v)) for k, v in self.params.items()}
        for name, bn_param, key in self._running_stat_slots():
            state[name] = np.array(to_numpy(bn_param[key]))
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore parameters and running statistics saved by state_dict.

        Running statistics that state lacks keep their values (a model saved before
        its first forward pass had none). The names of files written before models
        had several norm layers (bn_running_mean, bn_running_var) are read as those
        of the only batch norm layer. Raises ValueError when names or shapes don't
        match this model.
        """
        state = self._renamed_legacy(state)
        slots = self._running_stat_slots()
        expected = {k: tuple(v.shape) for k, v in self.params.items()}
        expected.update({name: tuple(bn_param[key].shape) for name, bn_param, key in slots})
        given = {k: tuple(np.shape(v)) for k, v in state.items()}
        problems = [k for k in self.params if k not in given] + [k for k in given if k not in expected]
        problems += [k for k in expected if k in given and given[k] != expected[k]]
        if problems:
            raise ValueError(f"state does not match this model ({', '.join(sorted(set(problems)))}): "
                             f"expected {expected}, got {given}")
        self.params = self._as_params({k: state[k] for k in self.params})
        for name, bn_param, key in slots:
            if name in state:
                bn_param[key] = self.xp.asarray(state[name], dtype=self.dtype)

    def _running_stat_slots(self) -> list[tuple[str, dict, str]]:
        """(state name, bn_param, key) for the running mean and variance of each batch norm layer."""
        return [(f"{key}{layer.index}", bn_param, key)
                for layer, bn_param in zip(self.norm_layers(), self.bn_params) if layer.kind == "batchnorm"
                for key in ("running_mean", "running_var")]

    def _renamed_legacy(self, state: dict) -> dict:
        batchnorms = [layer.index for layer in self.norm_layers() if layer.kind == "batchnorm"]
        if len(batchnorms) != 1:
            return dict(state)
        return {(f"{LEGACY_RUNNING_STATS[k]}{batchnorms[0]}" if k in LEGACY_RUNNING_STATS else k): v
                for k, v in state.items()}

    # ------------------------------------------------------------------
    # Files
    # ------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write config (JSON) and state (state/<name>) to the .npz file path, atomically; no pickle."""
        arrays = {f"state/{k}": v for k, v in self.state_dict().items()}
        return npz_io.write_npz_atomically(path, {"config": np.array(json.dumps(self.config)), **arrays})

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> Classifier:
        """Rebuild a model saved by save(), or the model of a Solver checkpoint that records model_config.

        Raises npz_io.NpzFileError for a file that cannot be read, ValueError for one
        that holds another model class or whose config or arrays do not fit.
        """
        config, state = _read_model_file(path)
        name = config.get("model", LEGACY_MODEL)
        if cls is not Classifier and name != cls.__name__:
            raise ValueError(f"model file {path} holds a {name}, not a {cls.__name__}: "
                             f"use {name}.load or cnncore.classifier.load_model")
        return _build(path, _model_classes(), config, state, device)


class ImageClassifier(Classifier):
    """A model of images (input_dim = (C, H, W)) whose norm layers share one normalization:
    'none', 'batchnorm', or a group kind ('groupnorm', 'layernorm', 'instancenorm').

    A subclass sets input_dim and normalization, and implements _norm_groups().
    """

    input_dim: tuple[int, int, int]
    normalization: str

    def _norm_groups(self) -> list[tuple[int, int | None]]:
        """(index i of gamma{i}, groups G or None for batch norm) of each norm layer, in forward order."""
        raise NotImplementedError

    def _check_input_shape(self, X) -> None:
        if X.ndim != 4 or tuple(X.shape[1:]) != self.input_dim:
            raise ValueError(
                f"X must have shape (N, {', '.join(map(str, self.input_dim))}) to match input_dim, "
                f"got {tuple(X.shape)}"
            )

    def norm_layers(self) -> list[NormLayer]:
        if self.normalization == "none":
            return []
        kind = "batchnorm" if self.normalization == "batchnorm" else "groupnorm"
        return [NormLayer(i, kind, G) for i, G in self._norm_groups()]


def load_model(path: str | os.PathLike, device: str = "cpu") -> Classifier:
    """Rebuild whichever model the file at path holds (its config names the class); see Classifier.load."""
    return Classifier.load(path, device)


def _model_classes() -> dict[str, type]:
    import importlib

    for module in MODEL_MODULES:
        importlib.import_module(module)
    found, todo = {}, [Classifier]
    while todo:
        for sub in todo.pop().__subclasses__():
            found[sub.__name__] = sub
            todo.append(sub)
    return found


def _read_model_file(path) -> tuple[dict, dict]:
    """(config, state) of a model file (config, state/<name>) or of a Solver checkpoint
    (format, manifest, model/<name>, model_config)."""
    arrays = npz_io.read_npz(path, "model file")
    if "config" in arrays:
        key, text = "config", arrays["config"]
        state = {k.removeprefix("state/"): v for k, v in arrays.items() if k.startswith("state/")}
    elif checkpoint.is_checkpoint(arrays):
        key, (text, state) = "model_config", checkpoint.saved_model(arrays, path)
        if text is None:
            raise ValueError(f"{path} is a Solver checkpoint without the model's configuration (no model_config "
                             "entry): build the model with its constructor and load the checkpoint with the "
                             "Solver (resume_from) instead")
    else:
        raise ValueError(f"{path} is neither a model file (no config entry) nor a Solver checkpoint "
                         f"(no format and manifest entries); it holds {sorted(arrays)}")
    try:
        config = json.loads(str(text))
    except json.JSONDecodeError as exc:
        raise ValueError(f"model file {path}: its {key} entry is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"model file {path}: its {key} entry must be a JSON object, got {config!r}")
    return config, state


def _build(path, classes: dict, config: dict, state: dict, device: str) -> Classifier:
    kwargs = dict(config)
    name = kwargs.pop("model", LEGACY_MODEL)
    if name not in classes:
        raise ValueError(f"model file {path} names an unknown model {name!r}; known: {sorted(classes)}")
    # Before building: a config edited (or damaged) to num_filters=10**9 would otherwise allocate
    # hundreds of GiB of weights before load_state_dict could say that they do not fit the file's arrays.
    needed = memory.construction_bytes(config)
    if needed is not None:
        sizes = ", ".join(f"{k}={config[k]}" for k in ("input_dim", "num_filters", "filter_size", "hidden_dim",
                                                         "hidden_dims", "blocks_per_stage") if k in config)
        memory.require_fits(needed, f"model file {path}: its config ({sizes}) describes a {name} that")
    try:
        model = classes[name](**kwargs, device=device)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model file {path}: its config does not build a {name} ({exc})") from exc
    try:
        model.load_state_dict(state)
    except ValueError as exc:
        raise ValueError(f"model file {path}: {exc}") from exc
    return model
