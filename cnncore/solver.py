"""Solver: trains a classification model with minibatch gradient descent.

The interface is CS231n's. A Solver is built from a model, the data and
options; train() runs the optimisation; afterwards model.params holds the
parameters that did best on the validation set, and the histories record the
run:

    data = {"X_train": X_train, "y_train": y_train,   # (N_train, ...), (N_train,)
            "X_val": X_val, "y_val": y_val}           # (N_val, ...), (N_val,)
    model = MyAwesomeModel(hidden_size=100, reg=10)
    solver = Solver(model, data,
                    update_rule="sgd",
                    optim_config={"learning_rate": 1e-4},
                    lr_decay=0.95,
                    num_epochs=5, batch_size=200,
                    print_every=100)
    solver.train()

The model must provide:
  model.params: dict mapping parameter names to arrays.
  model.loss(X, y) -> (loss, grads): the scalar loss of a minibatch X with
    labels y, and grads, a dict with the same keys as model.params.
  model.loss(X) -> scores: an array (N, num_classes), computed in test mode.
It may also provide state_dict() -> dict[str, array] and load_state_dict(d),
covering buffers beyond the parameters (batch-norm running statistics, say);
the Solver then uses them wherever it saves or restores a whole model.

Additions to CS231n's Solver, all off by default: a seeded random generator
for reproducible runs, per-iteration and per-check callbacks, a tqdm progress
bar in place of prints, pickle-free .npz checkpoints that resume a run bit for
bit, and a NonFiniteLossError that stops a diverging run at once.
"""

import json
import math
import numbers
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cnncore import optim
from cnncore.backend import device_of, to_device, to_numpy
from cnncore.checks import NonFiniteError

DATA_KEYS = ("X_train", "y_train", "X_val", "y_val")

# Bumped whenever the checkpoint layout changes, so an old file fails clearly.
CHECKPOINT_FORMAT = 1


class NonFiniteLossError(FloatingPointError):
    """Training stopped because a minibatch loss was nan or inf.

    Attributes:
      loss: the non-finite loss (nan, inf or -inf).
      iteration: 1-based number of the iteration whose loss it was; its update
        was not applied.
      epoch: epochs completed before that iteration (Solver.epoch).
      best_val_acc: validation accuracy of the parameters restored into the
        model, or None when no accuracy check had happened yet.
    """

    def __init__(self, loss, iteration, epoch, best_val_acc=None):
        self.loss = loss
        self.iteration = iteration
        self.epoch = epoch
        self.best_val_acc = best_val_acc
        if best_val_acc is None:
            kept = ("no accuracy check had run yet, so model.params holds the "
                    "parameters from before this iteration")
        else:
            kept = ("model.params holds the best parameters seen "
                    f"(val acc {best_val_acc:.3f})")
        epochs = f"{epoch} epoch{'' if epoch == 1 else 's'} completed"
        super().__init__(
            f"loss became {loss} at iteration {iteration} ({epochs}); training stopped, {kept}"
        )

    def __reduce__(self):
        # The default rebuilds from self.args (the message alone), which would
        # fail; Prefect and multiprocessing pickle exceptions across processes.
        return type(self), (self.loss, self.iteration, self.epoch, self.best_val_acc)


class Solver:
    """Trains a classification model; see the module docstring for the model contract.

    Required arguments:
      model: the model to train (model.params is updated as training goes).
      data: dict with "X_train", "y_train", "X_val", "y_val"; X arrays have one
        row per example, y arrays hold the integer labels.

    Optional arguments (CS231n's):
      update_rule: name of an update rule in cnncore.optim; default "sgd".
      optim_config: dict of hyperparameters for the update rule, copied for
        every parameter; every rule takes "learning_rate".
      lr_decay: after each epoch the learning rate is multiplied by this; 1.0.
      batch_size: minibatch size for the loss and gradient; 100.
      num_epochs: epochs to train for; 10.
      num_train_samples: training examples used for the train accuracy
        checks; 1000; None for all of them.
      num_val_samples: validation examples used for the val accuracy checks;
        None (all of them).
      checkpoint_name: if given, at each epoch end the state is also saved to
        "<checkpoint_name>_epoch_<epoch>.npz" (same format as checkpoint_path).
      print_every: the progress bar's loss is refreshed every print_every
        iterations; 10.
      verbose: show a tqdm progress bar over the iterations; True.

    Optional arguments (additions):
      seed: int or None; seeds the numpy Generator that draws the minibatches
        and the accuracy-check subsamples. The same seed, model and data give
        the same histories bit for bit. None: fresh OS entropy.
      on_iteration: callable(dict) or None, called after every update with
        {"iteration", "epoch", "loss", "learning_rate"}.
      on_epoch: callable(dict) or None, called after every accuracy check
        (first iteration, each epoch end, last iteration) with
        {"epoch", "iteration", "train_acc", "val_acc", "best_val_acc", "loss"}.
      checkpoint_path: str or Path or None; at each epoch end the whole
        training state is written there atomically (see save_checkpoint).
      resume_from: str or Path or None; a checkpoint to load before training
        (see load_checkpoint).

    In both payloads "iteration" is the number of updates applied so far,
    "epoch" the number of epochs completed (Solver.epoch), "loss" the latest
    minibatch loss and "learning_rate" the rate the latest update used.

    Attributes after train(): loss_history, train_acc_history,
    val_acc_history (lists of floats), epoch, iteration, best_val_acc,
    best_params (copies of model.params at the best check), best_state (a copy
    of model.state_dict() there, or None when the model has no state_dict),
    optim_configs (one update-rule config per parameter name).
    """

    def __init__(self, model, data, **kwargs):
        self.model = model
        self.X_train, self.y_train, self.X_val, self.y_val = _unpack_data(data)
        _check_images_fit_model(model, self.X_train, self.X_val)

        self.update_rule = kwargs.pop("update_rule", "sgd")
        self.optim_config = kwargs.pop("optim_config", {})
        self.lr_decay = kwargs.pop("lr_decay", 1.0)
        self.batch_size = kwargs.pop("batch_size", 100)
        self.num_epochs = kwargs.pop("num_epochs", 10)
        self.num_train_samples = kwargs.pop("num_train_samples", 1000)
        self.num_val_samples = kwargs.pop("num_val_samples", None)
        self.checkpoint_name = kwargs.pop("checkpoint_name", None)
        self.print_every = kwargs.pop("print_every", 10)
        self.verbose = kwargs.pop("verbose", True)

        self.seed = kwargs.pop("seed", None)
        self.on_iteration = kwargs.pop("on_iteration", None)
        self.on_epoch = kwargs.pop("on_epoch", None)
        self.checkpoint_path = kwargs.pop("checkpoint_path", None)
        resume_from = kwargs.pop("resume_from", None)

        if kwargs:
            extra = ", ".join(f'"{k}"' for k in kwargs)
            raise ValueError(f"Unrecognized arguments {extra}")
        self._validate_options()

        # As in CS231n, update_rule ends up as the function; the name is kept
        # for checkpoints.
        self.update_rule_name = self.update_rule
        self.update_rule = optim.get_update_rule(self.update_rule)

        self._reset()
        if resume_from is not None:
            self.load_checkpoint(resume_from)

    def _validate_options(self):
        """Reject bad options here, before any training time is spent."""
        _check_positive_int("batch_size", self.batch_size)
        _check_positive_int("num_epochs", self.num_epochs)
        _check_positive_int("print_every", self.print_every)
        _check_positive_int("num_train_samples", self.num_train_samples, optional=True)
        _check_positive_int("num_val_samples", self.num_val_samples, optional=True)
        _check_positive_int("seed", self.seed, optional=True, minimum=0)
        if not isinstance(self.lr_decay, numbers.Real) or not self.lr_decay > 0:
            raise ValueError(f"lr_decay must be a number > 0, got {self.lr_decay!r}")
        self.lr_decay = float(self.lr_decay)  # a NumPy float64 would upcast float32 rates
        if not isinstance(self.optim_config, Mapping):
            raise ValueError(f"optim_config must be a dict, got {self.optim_config!r}")
        for name in ("on_iteration", "on_epoch"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise ValueError(f"{name} must be callable or None, got {getattr(self, name)!r}")

    def _reset(self):
        """Set up the book-keeping for a fresh run, discarding any progress.

        Called by __init__. Also re-seeds the generator, so that _reset()
        followed by train() on a re-initialised model repeats a seeded run.
        """
        self.epoch = 0
        self.iteration = 0
        self.best_val_acc = 0
        self.best_params = {}
        self.best_state = None
        self.loss_history = []
        self.train_acc_history = []
        self.val_acc_history = []
        # Each parameter gets its own copy: the rules keep per-weight state.
        self.optim_configs = {p: dict(self.optim_config) for p in self.model.params}
        self._rng = np.random.default_rng(self.seed)

    # ------------------------------------------------------------------ training

    def _step(self):
        """Make one gradient update on a random minibatch (called by train()).

        Raises NonFiniteLossError, with the update not applied, when the loss
        is nan or inf.
        """
        idx = self._rng.integers(self.X_train.shape[0], size=self.batch_size)
        try:
            loss, grads = self.model.loss(self.X_train[idx], self.y_train[idx])
        except NonFiniteError:
            # Scores that overflowed to inf/NaN: the loss is not a number either.
            loss = math.nan
        loss = float(loss)
        self.loss_history.append(loss)
        if not math.isfinite(loss):
            self._stop_on_non_finite_loss(loss)

        for p, w in self.model.params.items():
            next_w, self.optim_configs[p] = self.update_rule(w, grads[p], self.optim_configs[p])
            self.model.params[p] = next_w
        self.iteration += 1

    def check_accuracy(self, X, y, num_samples=None, batch_size=100):
        """Classification accuracy of the model on the examples (X, y).

        X: array (N, ...); y: integer labels (N,).
        num_samples: if given and less than N, accuracy on that many examples
          drawn (with replacement, as CS231n) by the solver's generator.
        batch_size: examples scored per model.loss(X) call, to bound memory.
        Returns the fraction of examples classified correctly, a float.
        """
        N = X.shape[0]
        if num_samples is not None and N > num_samples:
            mask = self._rng.integers(N, size=num_samples)
            X, y = X[mask], y[mask]
            N = num_samples
        y_pred = np.concatenate([
            to_numpy(self.model.loss(X[start:start + batch_size]).argmax(axis=1))
            for start in range(0, N, batch_size)
        ])
        return float(np.mean(y_pred == to_numpy(y)))

    def train(self):
        """Run optimisation from the current iteration up to num_epochs.

        Accuracy is checked at the first iteration, at each epoch end and at
        the last iteration; each epoch end also decays the learning rate and
        saves the checkpoints asked for. At the end model.params (and the
        model's state, when it has a state_dict) are set to the best seen.
        """
        iterations_per_epoch = max(self.X_train.shape[0] // self.batch_size, 1)
        num_iterations = self.num_epochs * iterations_per_epoch
        with self._progress_bar(num_iterations) as bar:
            for t in range(self.iteration, num_iterations):
                self._step()
                self._after_update(t, bar)
                epoch_end = (t + 1) % iterations_per_epoch == 0
                if epoch_end:
                    self._end_epoch()
                if t == 0 or epoch_end or t == num_iterations - 1:
                    self._check_and_record(bar)
                if epoch_end:
                    self._save_checkpoints()
        self._swap_in_best()

    def _after_update(self, t, bar):
        """Progress bar and on_iteration callback for iteration t (0-based)."""
        bar.update(1)
        if self.verbose and t % self.print_every == 0:
            self._show_progress(bar)
        if self.on_iteration is not None:
            self.on_iteration({
                "iteration": self.iteration,
                "epoch": self.epoch,
                "loss": self.loss_history[-1],
                "learning_rate": self._learning_rate(),
            })

    def _end_epoch(self):
        self.epoch += 1
        for config in self.optim_configs.values():
            config["learning_rate"] *= self.lr_decay

    def _check_and_record(self, bar):
        """Measure train and val accuracy, keep the best model, report."""
        train_acc = self.check_accuracy(
            self.X_train, self.y_train, num_samples=self.num_train_samples)
        val_acc = self.check_accuracy(
            self.X_val, self.y_val, num_samples=self.num_val_samples)
        self.train_acc_history.append(train_acc)
        self.val_acc_history.append(val_acc)
        # The first check always counts, so best_params is never left empty
        # (CS231n's strict > against 0 would keep {} for an all-wrong model).
        if val_acc > self.best_val_acc or not self.best_params:
            self.best_val_acc = val_acc
            self._snapshot_best()
        if self.verbose:
            self._show_progress(bar)
        if self.on_epoch is not None:
            self.on_epoch({
                "epoch": self.epoch,
                "iteration": self.iteration,
                "train_acc": train_acc,
                "val_acc": val_acc,
                "best_val_acc": self.best_val_acc,
                "loss": self.loss_history[-1],
            })

    def _learning_rate(self):
        """The learning rate in effect (the same for every parameter), or None."""
        config = next(iter(self.optim_configs.values()), {})
        return config.get("learning_rate")

    def _progress_bar(self, num_iterations):
        return tqdm(total=num_iterations, initial=self.iteration, disable=not self.verbose,
                    desc="train", unit="it", dynamic_ncols=True)

    def _show_progress(self, bar):
        postfix = {"epoch": f"{self.epoch}/{self.num_epochs}",
                   "loss": f"{self.loss_history[-1]:.4g}"}
        if self.val_acc_history:
            postfix["train_acc"] = f"{self.train_acc_history[-1]:.3f}"
            postfix["val_acc"] = f"{self.val_acc_history[-1]:.3f}"
        bar.set_postfix(postfix)

    # ------------------------------------------------------------- best model

    def _snapshot_best(self):
        self.best_params = _copy_arrays(self.model.params)
        self.best_state = (_copy_arrays(self.model.state_dict())
                           if _has_state_dict(self.model) else None)

    def _swap_in_best(self):
        """Put the best model seen into self.model; False if there is none yet."""
        if not self.best_params:
            return False
        # Copies, so further training never aliases the kept best arrays.
        if self.best_state is not None:
            self.model.load_state_dict(_copy_arrays(self.best_state))
        else:
            self.model.params = _copy_arrays(self.best_params)
        return True

    def _stop_on_non_finite_loss(self, loss):
        restored = self._swap_in_best()
        raise NonFiniteLossError(
            loss,
            iteration=self.iteration + 1,
            epoch=self.epoch,
            best_val_acc=self.best_val_acc if restored else None,
        )

    # ------------------------------------------------------------ checkpoints

    def _save_checkpoints(self):
        """Save to checkpoint_path and/or the checkpoint_name file, if asked."""
        paths = []
        if self.checkpoint_path is not None:
            paths.append(self.checkpoint_path)
        if self.checkpoint_name is not None:
            paths.append(f"{self.checkpoint_name}_epoch_{self.epoch}.npz")
        for path in paths:
            self.save_checkpoint(path)

    def save_checkpoint(self, path):
        """Write the whole training state to the .npz file `path`, atomically.

        The file is written beside `path` and moved over it with os.replace,
        so a crash never leaves a half-written checkpoint. Nothing is pickled:
        np.load(path, allow_pickle=False) reads it. Keys:
          format, manifest (JSON: the names below, and per optimiser entry
            whether it is an "array", a "python" or a "numpy" scalar),
          update_rule, epoch, iteration, learning_rate, best_val_acc,
          loss_history, train_acc_history, val_acc_history,
          rng_state (JSON of the generator's bit_generator.state),
          model/<name> (model.state_dict(), or model.params without one),
          best_params/<name>, best_state/<name> (when there is a best state),
          optim/<param>/<key> (every entry of every parameter's config; scalars
            as 0-d arrays of their dtype).
        """
        arrays = {}
        manifest = {
            "model": _put_arrays(arrays, "model", self._model_state()),
            "best_params": _put_arrays(arrays, "best_params", self.best_params),
            "best_state": (None if self.best_state is None
                           else _put_arrays(arrays, "best_state", self.best_state)),
            "optim": {p: _put_config(arrays, f"optim/{p}", config)
                      for p, config in self.optim_configs.items()},
        }
        lr = self._learning_rate()
        arrays.update(
            format=np.asarray(CHECKPOINT_FORMAT),
            manifest=np.asarray(json.dumps(manifest)),
            update_rule=np.asarray(self.update_rule_name),
            epoch=np.asarray(self.epoch),
            iteration=np.asarray(self.iteration),
            learning_rate=np.asarray(math.nan if lr is None else float(lr)),
            best_val_acc=np.asarray(float(self.best_val_acc)),
            loss_history=np.asarray(self.loss_history, dtype=np.float64),
            train_acc_history=np.asarray(self.train_acc_history, dtype=np.float64),
            val_acc_history=np.asarray(self.val_acc_history, dtype=np.float64),
            rng_state=np.asarray(json.dumps(self._rng.bit_generator.state)),
        )
        _write_npz_atomically(path, arrays)

    def load_checkpoint(self, path):
        """Restore the training state saved by save_checkpoint.

        The model's state, the optimiser configs, the histories, the best
        model, the epoch and iteration counters and the generator all come
        back, so train() continues from the next epoch up to num_epochs and
        gives the same results as a run that was never interrupted.

        Raises ValueError if the file's format or update rule differ from this
        solver's, or its parameter names or shapes do not match the model.
        """
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        if "format" not in arrays or "manifest" not in arrays:
            raise ValueError(f"{path} is not a Solver checkpoint (no format or manifest entry)")
        if arrays["format"].item() != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint {path} has format {arrays['format'].item()}; "
                             f"this Solver reads format {CHECKPOINT_FORMAT}")
        saved_rule = arrays["update_rule"].item()
        if saved_rule != self.update_rule_name:
            raise ValueError(f"checkpoint {path} was trained with update_rule {saved_rule!r}, "
                             f"this Solver uses {self.update_rule_name!r}")
        manifest = json.loads(arrays["manifest"].item())
        model_state = _take_arrays(arrays, "model", manifest["model"])
        _check_matches_model(path, model_state, self._model_state(), set(manifest["optim"]))

        self._load_model_state(model_state)
        self.optim_configs = {p: _take_config(arrays, f"optim/{p}", kinds)
                              for p, kinds in manifest["optim"].items()}
        self.best_params = _take_arrays(arrays, "best_params", manifest["best_params"])
        self.best_state = (None if manifest["best_state"] is None
                           else _take_arrays(arrays, "best_state", manifest["best_state"]))
        self.best_val_acc = arrays["best_val_acc"].item()
        self.epoch = arrays["epoch"].item()
        self.iteration = arrays["iteration"].item()
        self.loss_history = arrays["loss_history"].tolist()
        self.train_acc_history = arrays["train_acc_history"].tolist()
        self.val_acc_history = arrays["val_acc_history"].tolist()
        self._rng.bit_generator.state = json.loads(arrays["rng_state"].item())

    def _model_state(self):
        return self.model.state_dict() if _has_state_dict(self.model) else self.model.params

    def _load_model_state(self, state):
        """Load host arrays into the model, on the device its parameters live on."""
        device = device_of(next(iter(self.model.params.values())))
        state = {k: to_device(v, device) for k, v in state.items()}
        if _has_state_dict(self.model):
            self.model.load_state_dict(state)
        else:
            self.model.params.update(state)


# ---------------------------------------------------------------- validation

def _unpack_data(data):
    """(X_train, y_train, X_val, y_val) from the data dict, checked."""
    if not isinstance(data, Mapping):
        raise ValueError(f"data must be a dict with keys {', '.join(DATA_KEYS)}, "
                         f"got {type(data).__name__}")
    missing = [k for k in DATA_KEYS if k not in data]
    if missing:
        raise ValueError(f"data is missing {', '.join(missing)}; "
                         f"expected keys {', '.join(DATA_KEYS)}")
    for split in ("train", "val"):
        X, y = data[f"X_{split}"], data[f"y_{split}"]
        if len(X) != len(y):
            raise ValueError(f"X_{split} has {len(X)} rows but y_{split} has {len(y)}")
        if len(X) == 0:
            raise ValueError(f"X_{split} is empty")
    return tuple(data[k] for k in DATA_KEYS)


def _check_images_fit_model(model, *arrays):
    """A model that declares input_dim (C, H, W) gets (N, C, H, W) images, checked
    here so a mismatch fails before training rather than at the first step."""
    input_dim = getattr(model, "input_dim", None)
    if input_dim is None:
        return
    for name, X in zip(("X_train", "X_val"), arrays):
        if tuple(X.shape[1:]) != tuple(input_dim):
            raise ValueError(f"{name} holds images of shape {tuple(X.shape[1:])} but the model's "
                             f"input_dim is {tuple(input_dim)}")


def _check_positive_int(name, value, optional=False, minimum=1):
    if optional and value is None:
        return
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or value < minimum):
        expected = "an int >= 0" if minimum == 0 else "a positive int"
        expected += " or None" if optional else ""
        raise ValueError(f"{name} must be {expected}, got {value!r}")


# --------------------------------------------------------------- checkpoints

def _has_state_dict(model):
    return callable(getattr(model, "state_dict", None)) and callable(
        getattr(model, "load_state_dict", None))


def _copy_arrays(arrays):
    return {k: v.copy() for k, v in arrays.items()}


def _put_arrays(out, prefix, arrays):
    """Store arrays under "<prefix>/<name>" on the host; returns the names."""
    for name, value in arrays.items():
        out[f"{prefix}/{name}"] = to_numpy(value)
    return list(arrays)


def _take_arrays(arrays, prefix, names):
    return {name: arrays[f"{prefix}/{name}"] for name in names}


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


def _take_config(arrays, prefix, kinds):
    rebuild = {"array": lambda a: a, "numpy": lambda a: a[()], "python": lambda a: a.item()}
    return {key: rebuild[kind](arrays[f"{prefix}/{key}"]) for key, kind in kinds.items()}


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


def _write_npz_atomically(path, arrays):
    """np.savez to a temporary file beside path, then os.replace it over path."""
    # An object array would be pickled and then refused by np.load(allow_pickle=False):
    # fail now, while the cause is known.
    pickled = [k for k, a in arrays.items() if a.dtype.hasobject]
    if pickled:
        raise TypeError(f"cannot checkpoint object arrays without pickle: {pickled}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
