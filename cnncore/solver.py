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
the Solver then uses them wherever it saves or restores a whole model. A
`num_classes` attribute bounds the labels, and a `config` dict is recorded in
checkpoints, so that a resume into a model configured otherwise is refused.

Additions to CS231n's Solver, all off by default: a seeded random generator
for reproducible runs, per-iteration and per-check callbacks, a tqdm progress
bar in place of prints, pickle-free .npz checkpoints that resume a run bit for
bit (cnncore.checkpoint), a NonFiniteLossError that stops a diverging run at
once, step decay of the learning rate at fractions of training (lr_steps), and
the final model kept beside the best one (final_state).

Every argument (data, options, optim_config, checkpoint folders, the checkpoint
to resume) is checked at construction, before any training or file writing.
"""

import math
from collections.abc import Mapping

import numpy as np
from tqdm import tqdm

from cnncore import checkpoint, checks, optim
from cnncore.backend import retain_freed_memory, to_numpy
from cnncore.checks import NonFiniteError


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
      data: dict with "X_train", "y_train", "X_val", "y_val"; X arrays are
        float32 or float64 with one row per example, finite; y arrays hold the
        integer labels (N,), >= 0 and < model.num_classes when the model has it.

    Optional arguments (CS231n's):
      update_rule: name of an update rule in cnncore.optim; default "sgd".
      optim_config: dict of hyperparameters for the update rule, copied for
        every parameter; every rule takes "learning_rate". A key the rule does
        not have (a misspelling such as "lr") is refused.
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
      lr_steps: fractions of training, strictly increasing in (0, 1); empty by
        default. After update number round(f * total) (at least 1) for each
        fraction f, of total = num_epochs * iterations per epoch, the learning
        rate is multiplied by lr_step_factor, on top of lr_decay: the Group
        Normalization paper's division by 10 at fixed points of training. The
        steps follow from the iteration count, so a resumed run with the same
        num_epochs takes them at the same updates.
      lr_step_factor: the factor of each step, in (0, 1]; 0.1.
      on_iteration: callable(dict) or None, called after every update with
        {"iteration", "epoch", "loss", "learning_rate"}.
      on_epoch: callable(dict) or None, called after every accuracy check
        (first iteration, each epoch end, last iteration) with
        {"epoch", "iteration", "train_acc", "val_acc", "best_val_acc", "loss"}.
      checkpoint_path: str or Path or None; at each epoch end the whole
        training state is written there atomically (cnncore.checkpoint).
      resume_from: str or Path or None; a checkpoint to load before training
        (see load_checkpoint).

    In both payloads "iteration" is the number of updates applied so far,
    "epoch" the number of epochs completed (Solver.epoch), "loss" the latest
    minibatch loss and "learning_rate" the rate the latest update used.

    Attributes after train(): loss_history, train_acc_history,
    val_acc_history (lists of floats), epoch, iteration, best_val_acc,
    best_params (copies of model.params at the best check), best_state (a copy
    of model.state_dict() there, or None when the model has no state_dict),
    optim_configs (one update-rule config per parameter name), and
    final_state: the model at the end of training, before the best one is
    swapped in (a copy of model.state_dict(), or of model.params for a model
    without one; None until train() completes). To evaluate the final model,
    model.load_state_dict(solver.final_state) (or model.params =
    solver.final_state).
    """

    def __init__(self, model, data, **kwargs):
        self.model = model
        self.X_train, self.y_train, self.X_val, self.y_val = checks.training_data(
            data, getattr(model, "input_dim", None), getattr(model, "num_classes", None))

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
        self.lr_steps = kwargs.pop("lr_steps", ())
        self.lr_step_factor = kwargs.pop("lr_step_factor", 0.1)
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
        optim.check_config(self.update_rule_name, self.optim_config, "optim_config")
        self._model_config = checkpoint.model_config_of(model)

        # Everything is checked before the first write: the checkpoint to
        # resume is read and matched, then the checkpoint folders are tried,
        # and only then does anything change.
        resumed = None if resume_from is None else self._read_checkpoint(resume_from)
        for name, path in self._checkpoint_paths(epoch=1).items():
            checks.require_writable_file(name, path)
        self._reset()
        if resumed is not None:
            self._restore(resumed)

    def _validate_options(self):
        """Reject bad options here, before any training time is spent."""
        checks.require_positive_int("batch_size", self.batch_size)
        checks.require_positive_int("num_epochs", self.num_epochs)
        checks.require_positive_int("print_every", self.print_every)
        checks.require_int("num_train_samples", self.num_train_samples, minimum=1, optional=True)
        checks.require_int("num_val_samples", self.num_val_samples, minimum=1, optional=True)
        checks.require_int("seed", self.seed, minimum=0, optional=True)
        # Python floats: a NumPy float64 would upcast float32 rates.
        self.lr_decay = checks.require_real("lr_decay", self.lr_decay, low=0, low_open=True)
        self.lr_step_factor = checks.require_real("lr_step_factor", self.lr_step_factor, low=0, high=1,
                                                  low_open=True)
        self.lr_steps = checks.require_increasing_fractions("lr_steps", self.lr_steps)
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
        self.final_state = None
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
        saves the checkpoints asked for. At the end, final_state keeps the
        model as training left it, and model.params (and the model's state,
        when it has a state_dict) are set to the best seen.

        The process keeps the memory NumPy frees for the next step's arrays
        (backend.retain_freed_memory): a step's arrays would otherwise come
        from fresh pages, faulted in again at every step.
        """
        retain_freed_memory()
        iterations_per_epoch = max(self.X_train.shape[0] // self.batch_size, 1)
        num_iterations = self.num_epochs * iterations_per_epoch
        step_iterations = [max(1, round(f * num_iterations)) for f in self.lr_steps]
        with self._progress_bar(num_iterations) as bar:
            for t in range(self.iteration, num_iterations):
                self._step()
                self._after_update(t, bar)
                for _ in range(step_iterations.count(self.iteration)):
                    self._scale_learning_rate(self.lr_step_factor)
                epoch_end = (t + 1) % iterations_per_epoch == 0
                if epoch_end:
                    self.epoch += 1
                    self._scale_learning_rate(self.lr_decay)
                if t == 0 or epoch_end or t == num_iterations - 1:
                    self._check_and_record(bar)
                if epoch_end:
                    self._save_checkpoints()
        self.final_state = _copy_arrays(self._model_state())
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

    def _scale_learning_rate(self, factor):
        for config in self.optim_configs.values():
            config["learning_rate"] *= factor

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
                           if checkpoint.has_state_dict(self.model) else None)

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

    def _checkpoint_paths(self, epoch):
        """{option name: path} of the checkpoints written at the end of epoch."""
        paths = {}
        if self.checkpoint_path is not None:
            paths["checkpoint_path"] = self.checkpoint_path
        if self.checkpoint_name is not None:
            paths["checkpoint_name"] = f"{self.checkpoint_name}_epoch_{epoch}.npz"
        return paths

    def _save_checkpoints(self):
        for path in self._checkpoint_paths(self.epoch).values():
            self.save_checkpoint(path)

    def save_checkpoint(self, path):
        """Write the whole training state to the .npz file `path`, atomically.

        The keys are listed in cnncore.checkpoint; nothing is pickled.
        """
        checkpoint.save(path, checkpoint.TrainingState(
            update_rule=self.update_rule_name, epoch=self.epoch, iteration=self.iteration,
            best_val_acc=self.best_val_acc, loss_history=self.loss_history,
            train_acc_history=self.train_acc_history, val_acc_history=self.val_acc_history,
            rng_state=self._rng.bit_generator.state, model_state=self._model_state(),
            model_config=self._model_config, best_params=self.best_params, best_state=self.best_state,
            optim_configs=self.optim_configs))

    def load_checkpoint(self, path):
        """Restore the training state saved by save_checkpoint.

        The model's state, the optimiser configs, the histories, the best
        model, the epoch and iteration counters and the generator all come
        back, so train() continues from the next epoch up to num_epochs and
        gives the same results as a run that was never interrupted.

        Raises npz_io.NpzFileError naming the file when it is missing, empty,
        truncated or corrupt, and ValueError when its format or update rule
        differ from this solver's, its model configuration (model.config)
        differs from the model's (listing the differing keys), or its
        parameter names or shapes do not match the model. Nothing is changed
        before these checks pass.
        """
        self._restore(self._read_checkpoint(path))

    def _read_checkpoint(self, path):
        state = checkpoint.load(path)
        checkpoint.check_resumable(path, state, update_rule=self.update_rule_name,
                                   model_state=self._model_state(), model_config=self._model_config)
        return state

    def _restore(self, state):
        checkpoint.load_model_state(self.model, state.model_state)
        for name in ("optim_configs", "best_params", "best_state", "best_val_acc", "epoch", "iteration",
                     "loss_history", "train_acc_history", "val_acc_history"):
            setattr(self, name, getattr(state, name))
        self._rng.bit_generator.state = state.rng_state

    def _model_state(self):
        return checkpoint.model_state(self.model)


def _copy_arrays(arrays):
    return {k: v.copy() for k, v in arrays.items()}
