"""The Solver's checkpoint: the whole training state in one .npz file, without pickle.

A checkpoint is written atomically and read through ``cnncore.npz_io``, so a
crash never leaves a half-written file, and an empty, truncated or corrupt one
raises ``npz_io.NpzFileError`` naming it. Entries (format 2):

  format              CHECKPOINT_FORMAT, a 0-d integer
  manifest            JSON: the names under model/, best_params/ and best_state/
                      (null when there is no best state), and per parameter the
                      kind of each optim entry ("array", or a "numpy" or "python"
                      scalar, rebuilt as such)
  model_config        JSON of model.config, when the model has one (every cnncore
                      model does); a resume into a model configured otherwise is refused
  update_rule         the update rule's name
  epoch, iteration    0-d integers: epochs completed, updates applied
  learning_rate       0-d float, the rate in effect (for reading; the optim entries hold it)
  best_val_acc        0-d float
  loss_history, train_acc_history, val_acc_history    float64 (n,)
  rng_state           JSON of the Solver's generator state (bit_generator.state)
  model/<name>        model.state_dict(), or model.params for a model without one
  best_params/<name>, best_state/<name>    the best model seen
  optim/<param>/<key> every entry of every parameter's update-rule config,
                      scalars as 0-d arrays of their own dtype

Format 1 (before model_config) is refused with a message saying so.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnncore import optim
from cnncore.backend import device_of, to_device, to_numpy
from cnncore.npz_io import read_npz, write_npz_atomically

# Bumped whenever the layout changes, so an old file fails clearly.
CHECKPOINT_FORMAT = 2


@dataclass
class TrainingState:
    """Everything a Solver needs to continue a run exactly where it stopped."""

    update_rule: str
    epoch: int
    iteration: int
    best_val_acc: float
    loss_history: list[float]
    train_acc_history: list[float]
    val_acc_history: list[float]
    rng_state: dict
    model_state: dict  # name -> array
    model_config: dict | None  # model.config as JSON gives it back, or None
    best_params: dict
    best_state: dict | None
    optim_configs: dict  # parameter name -> update-rule config


def model_config_of(model) -> dict | None:
    """model.config as it comes back from JSON (tuples as lists), or None when the model has none.

    Raises ValueError when model.config is not a dict or cannot be written as JSON,
    so that the problem shows before training rather than at the first checkpoint.
    """
    config = getattr(model, "config", None)
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ValueError(f"model.config must be a dict to be recorded in checkpoints, got {type(config).__name__}")
    try:
        return json.loads(json.dumps(config, sort_keys=True, default=_numpy_to_python))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model.config must be JSON-serialisable to be recorded in checkpoints: {exc}") from exc


def _numpy_to_python(value):
    """NumPy scalars and arrays as the Python values JSON can write (a weight_scale of np.float32, say)."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON-serialisable")


def has_state_dict(model) -> bool:
    """Whether the model saves and restores its whole state (parameters and buffers)."""
    return callable(getattr(model, "state_dict", None)) and callable(getattr(model, "load_state_dict", None))


def model_state(model) -> dict:
    """The model's whole state: model.state_dict(), or model.params without one (not copies)."""
    return model.state_dict() if has_state_dict(model) else model.params


def load_model_state(model, state: dict) -> None:
    """Load host arrays into the model, on the device its parameters live on."""
    device = device_of(next(iter(model.params.values())))
    state = {k: to_device(v, device) for k, v in state.items()}
    if has_state_dict(model):
        model.load_state_dict(state)
    else:
        model.params.update(state)


def save(path: str | os.PathLike, state: TrainingState) -> Path:
    """Write state to the .npz file at path, atomically. Returns the path."""
    arrays = {}
    manifest = {
        "model": _put_arrays(arrays, "model", state.model_state),
        "best_params": _put_arrays(arrays, "best_params", state.best_params),
        "best_state": None if state.best_state is None else _put_arrays(arrays, "best_state", state.best_state),
        "optim": {p: _put_config(arrays, f"optim/{p}", config) for p, config in state.optim_configs.items()},
    }
    if state.model_config is not None:
        arrays["model_config"] = np.asarray(json.dumps(state.model_config, sort_keys=True))
    lr = next(iter(state.optim_configs.values()), {}).get("learning_rate")
    arrays.update(
        format=np.asarray(CHECKPOINT_FORMAT),
        manifest=np.asarray(json.dumps(manifest)),
        update_rule=np.asarray(state.update_rule),
        epoch=np.asarray(state.epoch),
        iteration=np.asarray(state.iteration),
        learning_rate=np.asarray(math.nan if lr is None else float(lr)),
        best_val_acc=np.asarray(float(state.best_val_acc)),
        loss_history=np.asarray(state.loss_history, dtype=np.float64),
        train_acc_history=np.asarray(state.train_acc_history, dtype=np.float64),
        val_acc_history=np.asarray(state.val_acc_history, dtype=np.float64),
        rng_state=np.asarray(json.dumps(state.rng_state)),
    )
    return write_npz_atomically(path, arrays)


def load(path: str | os.PathLike) -> TrainingState:
    """The training state saved at path.

    Raises npz_io.NpzFileError when the file is missing, empty, truncated or
    corrupt, and ValueError naming the file when it is an .npz file but not a
    checkpoint of this format, or one whose entries do not hold what they must (a
    manifest that is not JSON or names an array the file lacks, an rng_state that
    its NumPy bit generator does not take).
    """
    arrays = read_npz(path, "checkpoint")
    if not is_checkpoint(arrays):
        raise ValueError(f"{path} is not a Solver checkpoint (no format or manifest entry)")
    config_text, model_state = saved_model(arrays, path)
    manifest = _manifest(arrays, path)
    try:
        best_state = manifest["best_state"]
        return TrainingState(
            update_rule=str(_scalar(arrays, "update_rule", path)),
            epoch=int(_scalar(arrays, "epoch", path)),
            iteration=int(_scalar(arrays, "iteration", path)),
            best_val_acc=float(_scalar(arrays, "best_val_acc", path)),
            loss_history=_entry(arrays, "loss_history", path).tolist(),
            train_acc_history=_entry(arrays, "train_acc_history", path).tolist(),
            val_acc_history=_entry(arrays, "val_acc_history", path).tolist(),
            rng_state=_rng_state(arrays, path),
            model_state=model_state,
            model_config=None if config_text is None else _json(config_text, "model_config", path),
            best_params=_take_arrays(arrays, "best_params", manifest["best_params"], path),
            best_state=None if best_state is None else _take_arrays(arrays, "best_state", best_state, path),
            optim_configs={p: _take_config(arrays, f"optim/{p}", kinds, path)
                           for p, kinds in manifest["optim"].items()},
        )
    except (KeyError, TypeError, AttributeError) as exc:  # a manifest of another shape than save() writes
        raise ValueError(f"checkpoint {path} is corrupt: its manifest does not describe its arrays "
                         f"({type(exc).__name__}: {exc})") from exc


def is_checkpoint(arrays: dict) -> bool:
    """Whether the arrays read from an .npz file are a Solver checkpoint's."""
    return "format" in arrays and "manifest" in arrays


def saved_model(arrays: dict, path) -> tuple[str | None, dict]:
    """(the model's configuration as saved, JSON text, or None when the Solver had none; the model's
    state) from a checkpoint's arrays, for load() and for loading the model alone."""
    if _scalar(arrays, "format", path) != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} has format {arrays['format'].item()}; "
                         f"this Solver reads format {CHECKPOINT_FORMAT}")
    names = _manifest(arrays, path).get("model")
    if not isinstance(names, list):
        raise ValueError(f"checkpoint {path} is corrupt: its manifest lists no model arrays (model: {names!r})")
    config = str(_scalar(arrays, "model_config", path)) if "model_config" in arrays else None
    return config, _take_arrays(arrays, "model", names, path)


def _entry(arrays: dict, name: str, path) -> np.ndarray:
    """The entry called name, or ValueError naming the checkpoint and what it lacks."""
    if name not in arrays:
        raise ValueError(f"checkpoint {path} is corrupt: it has no {name!r} entry, which its manifest "
                         f"or format {CHECKPOINT_FORMAT} names")
    return arrays[name]


def _scalar(arrays: dict, name: str, path):
    """The 0-d entry called name as a Python scalar, or ValueError naming the checkpoint."""
    value = _entry(arrays, name, path)
    if value.shape != ():
        raise ValueError(f"checkpoint {path} is corrupt: its {name!r} entry must hold one value, "
                         f"got shape {value.shape}")
    return value.item()


def _json(text: str, name: str, path):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"checkpoint {path} is corrupt: its {name} entry is not valid JSON ({exc})") from exc


def _manifest(arrays: dict, path) -> dict:
    manifest = _json(str(_scalar(arrays, "manifest", path)), "manifest", path)
    if not isinstance(manifest, dict):
        raise ValueError(f"checkpoint {path} is corrupt: its manifest must be a JSON object, got {manifest!r}")
    return manifest


def _rng_state(arrays: dict, path) -> dict:
    """The saved state of the Solver's generator, checked by handing it to a fresh bit generator of its kind
    (so that a bad one fails here, naming the file, not when the Solver restores it)."""
    state = _json(str(_scalar(arrays, "rng_state", path)), "rng_state", path)
    kind = state.get("bit_generator") if isinstance(state, dict) else None
    generator = getattr(np.random, kind, None) if isinstance(kind, str) else None
    if not (isinstance(generator, type) and issubclass(generator, np.random.BitGenerator)):
        raise ValueError(f"checkpoint {path} is corrupt: its rng_state names no NumPy bit generator "
                         f"(bit_generator: {kind!r})")
    try:
        generator().state = state
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        raise ValueError(f"checkpoint {path} is corrupt: its rng_state is not a valid {kind} state "
                         f"({type(exc).__name__}: {exc})") from exc
    return state


def check_resumable(path, state: TrainingState, *, update_rule: str, model_state: dict,
                    model_config: dict | None) -> None:
    """ValueError, naming the checkpoint at path, unless state can continue a run of this
    update rule on a model with this state and configuration (model_config_of(model))."""
    if state.update_rule != update_rule:
        raise ValueError(f"checkpoint {path} was trained with update_rule {state.update_rule!r}, "
                         f"this Solver uses {update_rule!r}")
    _check_same_config(path, state.model_config, model_config)
    _check_matches_model(path, state.model_state, model_state, set(state.optim_configs))
    known = set(optim.RULES[update_rule].hyperparameters) | set(optim.RULES[update_rule].state)
    unknown = sorted({key for config in state.optim_configs.values() for key in config} - known)
    if unknown:
        raise ValueError(f"checkpoint {path} holds optim entries {unknown} that update_rule {update_rule!r} "
                         f"does not have")


def _check_same_config(path, saved, current):
    """ValueError listing the keys whose values differ between the saved and the current model.config."""
    if saved is None and current is None:
        return
    if saved is None or current is None:
        has, lacks = ("the model", "the checkpoint") if saved is None else ("the checkpoint", "the model")
        raise ValueError(f"checkpoint {path} cannot resume this model: {has} records a model configuration "
                         f"(model.config) and {lacks} does not")
    absent = "(absent)"
    differing = [f"{key}: {saved.get(key, absent)!r} in the checkpoint, {current.get(key, absent)!r} in the model"
                 for key in sorted(set(saved) | set(current)) if saved.get(key, absent) != current.get(key, absent)]
    if differing:
        raise ValueError(f"checkpoint {path} was saved from a model configured otherwise: " + "; ".join(differing))


def _check_matches_model(path, saved, current, saved_params):
    """ValueError unless the saved model state fits the current one.

    Every entry of the current state must be saved, with the same shape. The
    checkpoint may hold more entries than the model, as long as they are not
    parameters: a fresh model creates buffers such as batch norm's running
    statistics only on its first forward pass.
    """
    problems = []
    missing = sorted(set(current) - set(saved))
    unexpected = sorted((set(saved) - set(current)) & saved_params)
    if missing:
        problems.append(f"missing from the checkpoint: {missing}")
    if unexpected:
        problems.append(f"parameters not in the model: {unexpected}")
    for name in sorted(set(saved) & set(current)):
        if tuple(saved[name].shape) != tuple(current[name].shape):
            problems.append(f"{name} has shape {tuple(saved[name].shape)} in the "
                            f"checkpoint but {tuple(current[name].shape)} in the model")
    if problems:
        raise ValueError(f"checkpoint {path} does not match the model: " + "; ".join(problems))


def _put_arrays(out, prefix, arrays):
    """Store arrays under "<prefix>/<name>" on the host; returns the names."""
    for name, value in arrays.items():
        out[f"{prefix}/{name}"] = to_numpy(value)
    return list(arrays)


def _take_arrays(arrays, prefix, names, path):
    return {name: _entry(arrays, f"{prefix}/{name}", path) for name in names}


def _put_config(out, prefix, config):
    """Store an update-rule config under "<prefix>/<key>"; returns {key: kind}.

    The kind records how to rebuild each entry: "array" as an array, "numpy"
    as a NumPy scalar of its dtype, "python" as a Python scalar (the saved
    0-d array keeps the dtype either way, so floats come back bit for bit).
    """
    kinds = {}
    for key, value in config.items():
        # np.generic first: np.float64 is also a Python float.
        if isinstance(value, np.generic):
            kinds[key] = "numpy"
        elif isinstance(value, (bool, int, float, str)):
            kinds[key] = "python"
        elif hasattr(value, "shape") and hasattr(value, "dtype"):
            kinds[key] = "array"
        else:
            raise TypeError(f"cannot checkpoint optim config entry {prefix}/{key}: "
                            f"{type(value).__name__} is not an array or a scalar")
        out[f"{prefix}/{key}"] = to_numpy(value)
    return kinds


def _take_config(arrays, prefix, kinds, path):
    rebuild = {"array": lambda a: a, "numpy": lambda a: a[()], "python": lambda a: a.item()}
    unknown = sorted({str(kind) for kind in kinds.values()} - set(rebuild))
    if unknown:
        raise ValueError(f"checkpoint {path} is corrupt: its manifest gives {prefix} entries of unknown kinds "
                         f"{unknown}; expected {sorted(rebuild)}")
    return {key: rebuild[kind](_entry(arrays, f"{prefix}/{key}", path)) for key, kind in kinds.items()}
