"""Solver: learning, reproducibility, checkpoints, callbacks, failures, options."""

import math
import pickle

import numpy as np
import pytest

from cnncore.solver import NonFiniteLossError, Solver

NUM_CLASSES, INPUT_DIM = 3, 4
BATCH_SIZE = 50
NUM_TRAIN = 300
ITERATIONS_PER_EPOCH = NUM_TRAIN // BATCH_SIZE


class TwoLayerNet:
    """affine - relu - affine - softmax, with a running input mean as a buffer.

    The buffer stands in for batch norm's running statistics: it is in
    state_dict() but not in params, so tests see whether it travels with them;
    and like them it only exists after the first training forward pass.
    """

    def __init__(self, hidden_dim=16, dtype=np.float64, seed=0):
        rng = np.random.default_rng(seed)
        self.params = {
            "W1": (0.1 * rng.standard_normal((INPUT_DIM, hidden_dim))).astype(dtype),
            "b1": np.zeros(hidden_dim, dtype),
            "W2": (0.1 * rng.standard_normal((hidden_dim, NUM_CLASSES))).astype(dtype),
            "b2": np.zeros(NUM_CLASSES, dtype),
        }
        self.input_mean = None

    def state_dict(self):
        buffers = {} if self.input_mean is None else {"input_mean": self.input_mean}
        return {**self.params, **buffers}

    def load_state_dict(self, state):
        self.input_mean = state.get("input_mean")
        self.params = {k: v for k, v in state.items() if k != "input_mean"}

    def loss(self, X, y=None):
        p = self.params
        hidden = np.maximum(X @ p["W1"] + p["b1"], 0)
        scores = hidden @ p["W2"] + p["b2"]
        if y is None:
            return scores
        previous = 0 if self.input_mean is None else self.input_mean
        self.input_mean = 0.9 * previous + 0.1 * X.mean(axis=0)
        n = X.shape[0]
        shifted = scores - scores.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        dscores = np.exp(log_probs)
        dscores[np.arange(n), y] -= 1
        dscores /= n
        dhidden = (dscores @ p["W2"].T) * (hidden > 0)
        grads = {"W1": X.T @ dhidden, "b1": dhidden.sum(axis=0),
                 "W2": hidden.T @ dscores, "b2": dscores.sum(axis=0)}
        return -log_probs[np.arange(n), y].mean(), grads


class ParamsOnlyNet(TwoLayerNet):
    """The same net without state_dict: the Solver must fall back on params."""

    state_dict = None
    load_state_dict = None


class DivergingNet(TwoLayerNet):
    """Returns a non-finite loss at the given 1-based training call."""

    def __init__(self, bad_call, bad_loss=math.nan):
        super().__init__()
        self.bad_call, self.bad_loss, self.calls = bad_call, bad_loss, 0

    def loss(self, X, y=None):
        out = super().loss(X, y)
        if y is None:
            return out
        self.calls += 1
        return (self.bad_loss if self.calls == self.bad_call else out[0]), out[1]


def make_data(seed=0, num_val=90, dtype=np.float64):
    """Three well separated Gaussian blobs: a net of this size reaches ~100%."""
    rng = np.random.default_rng(seed)
    centers = 3.0 * rng.standard_normal((NUM_CLASSES, INPUT_DIM))

    def split(n):
        y = rng.integers(NUM_CLASSES, size=n)
        X = centers[y] + 0.5 * rng.standard_normal((n, INPUT_DIM))
        return X.astype(dtype), y

    X_train, y_train = split(NUM_TRAIN)
    X_val, y_val = split(num_val)
    return {"X_train": X_train, "y_train": y_train, "X_val": X_val, "y_val": y_val}


def make_solver(model=None, data=None, **options):
    defaults = dict(update_rule="adam", optim_config={"learning_rate": 1e-2},
                    batch_size=BATCH_SIZE, num_epochs=2, verbose=False, seed=0,
                    num_train_samples=100, num_val_samples=50, lr_decay=0.9)
    return Solver(model or TwoLayerNet(), data or make_data(), **{**defaults, **options})


def assert_same_run(a, b):
    """Two solvers (and their models) hold identical results, bit for bit."""
    assert a.loss_history == b.loss_history
    assert a.train_acc_history == b.train_acc_history
    assert a.val_acc_history == b.val_acc_history
    assert (a.epoch, a.iteration, a.best_val_acc) == (b.epoch, b.iteration, b.best_val_acc)
    state_a, state_b = a._model_state(), b._model_state()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        np.testing.assert_array_equal(state_a[name], state_b[name], err_msg=name)


# ------------------------------------------------------------------ training

def test_solver_learns_separable_data():
    solver = make_solver(num_epochs=5)
    solver.train()
    assert solver.best_val_acc > 0.95
    assert np.mean(solver.loss_history[-ITERATIONS_PER_EPOCH:]) < solver.loss_history[0]


def test_train_ends_with_best_params_and_best_state_in_model():
    model = TwoLayerNet()
    solver = make_solver(model, num_epochs=3)
    solver.train()
    for name, best in solver.best_params.items():
        np.testing.assert_array_equal(model.params[name], best)
        assert model.params[name] is not best  # a copy: training on won't alias it
    np.testing.assert_array_equal(model.input_mean, solver.best_state["input_mean"])


def test_histories_have_one_entry_per_iteration_and_per_check():
    solver = make_solver(num_epochs=3)
    solver.train()
    assert len(solver.loss_history) == 3 * ITERATIONS_PER_EPOCH
    # Checks at the first iteration and at each epoch end (the last included).
    assert len(solver.train_acc_history) == len(solver.val_acc_history) == 3 + 1
    assert all(isinstance(v, float) for v in solver.loss_history + solver.val_acc_history)


def test_learning_rate_decays_once_per_epoch():
    solver = make_solver(num_epochs=3, lr_decay=0.5)
    solver.train()
    for config in solver.optim_configs.values():
        assert config["learning_rate"] == 1e-2 * 0.5**3


def test_float32_model_stays_float32():
    model = TwoLayerNet(dtype=np.float32)
    solver = make_solver(model, data=make_data(dtype=np.float32), update_rule="sgd_momentum")
    solver.train()
    for name, w in {**model.params, **solver.best_params}.items():
        assert w.dtype == np.float32, name
    assert all(c["velocity"].dtype == np.float32 for c in solver.optim_configs.values())


def test_check_accuracy_scores_in_batches():
    solver = make_solver()
    data = make_data()
    acc_small = solver.check_accuracy(data["X_val"], data["y_val"], batch_size=7)
    acc_one = solver.check_accuracy(data["X_val"], data["y_val"], batch_size=1000)
    assert acc_small == acc_one


def test_verbose_shows_a_progress_bar(capsys):
    make_solver(verbose=True, print_every=2).train()
    err = capsys.readouterr().err
    assert "train" in err and "val_acc" in err and "loss" in err


# ----------------------------------------------------------- reproducibility

def test_same_seed_gives_identical_runs():
    a, b = make_solver(seed=3), make_solver(seed=3)
    a.train()
    b.train()
    assert_same_run(a, b)


def test_different_seeds_give_different_runs():
    a, b = make_solver(seed=3), make_solver(seed=4)
    a.train()
    b.train()
    assert a.loss_history != b.loss_history


def test_reset_then_train_repeats_a_seeded_run():
    model = TwoLayerNet()
    solver = make_solver(model)
    solver.train()
    first = list(solver.loss_history)
    model.__init__()
    solver._reset()
    solver.train()
    assert solver.loss_history == first


# --------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("model_class", [TwoLayerNet, ParamsOnlyNet])
@pytest.mark.parametrize("resume", ["resume_from", "load_checkpoint"])
def test_resumed_run_matches_uninterrupted_run_bit_for_bit(tmp_path, model_class, resume):
    straight = make_solver(model_class(), num_epochs=4)
    straight.train()

    path = tmp_path / "run.npz"
    make_solver(model_class(), num_epochs=2, checkpoint_path=path).train()
    # A fresh model with other weights: everything must come from the file.
    if resume == "resume_from":
        resumed = make_solver(model_class(seed=99), num_epochs=4, resume_from=path)
    else:
        resumed = make_solver(model_class(seed=99), num_epochs=4, seed=123)
        resumed.load_checkpoint(path)
    assert resumed.epoch == 2
    resumed.train()

    assert_same_run(straight, resumed)
    for name, config in straight.optim_configs.items():
        assert config["t"] == resumed.optim_configs[name]["t"]
        np.testing.assert_array_equal(config["m"], resumed.optim_configs[name]["m"])
        assert config["learning_rate"] == resumed.optim_configs[name]["learning_rate"]


def test_checkpoint_loads_without_pickle_and_holds_the_state(tmp_path):
    path = tmp_path / "ckpt.npz"
    solver = make_solver(num_epochs=2, checkpoint_path=path)
    solver.train()
    with np.load(path, allow_pickle=False) as f:
        files = set(f.files)
        assert f["epoch"].item() == 2
        assert f["iteration"].item() == 2 * ITERATIONS_PER_EPOCH
        assert f["learning_rate"].item() == pytest.approx(1e-2 * 0.9**2)
        assert f["optim/W1/t"].dtype == np.int64 and f["optim/W1/t"].shape == ()
        assert len(f["loss_history"]) == 2 * ITERATIONS_PER_EPOCH
    expected = {"format", "manifest", "update_rule", "epoch", "iteration", "learning_rate",
                "best_val_acc", "loss_history", "train_acc_history", "val_acc_history",
                "rng_state", "model/input_mean", "best_state/input_mean", "best_params/W1",
                "optim/W1/m", "optim/W1/v", "optim/W1/beta1"}
    assert expected <= files
    assert "best_params/input_mean" not in files


def test_checkpoint_is_written_atomically_without_leftovers(tmp_path):
    path = tmp_path / "sub" / "ckpt.npz"
    make_solver(num_epochs=3, checkpoint_path=str(path)).train()
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.npz"]


def test_checkpoint_name_writes_one_file_per_epoch(tmp_path):
    make_solver(num_epochs=2, checkpoint_name=str(tmp_path / "net")).train()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["net_epoch_1.npz", "net_epoch_2.npz"]


def test_checkpoint_for_another_architecture_is_rejected(tmp_path):
    path = tmp_path / "ckpt.npz"
    make_solver(num_epochs=1, checkpoint_path=path).train()
    with pytest.raises(ValueError, match=r"does not match the model: W1 has shape \(4, 16\)"):
        make_solver(TwoLayerNet(hidden_dim=8), resume_from=path)


def _trained_net():
    model = TwoLayerNet()
    data = make_data()
    model.loss(data["X_train"][:2], data["y_train"][:2])  # creates the buffer
    return model


def _net_without_b2():
    model = TwoLayerNet()
    del model.params["b2"]
    return model


@pytest.mark.parametrize("make_model, message", [
    (_trained_net, r"missing from the checkpoint: \['input_mean'\]"),
    (_net_without_b2, r"parameters not in the model: \['b2'\]"),
])
def test_checkpoint_with_other_names_is_rejected(tmp_path, make_model, message):
    path = tmp_path / "ckpt.npz"
    make_solver(ParamsOnlyNet(), num_epochs=1, checkpoint_path=path).train()
    with pytest.raises(ValueError, match=message):
        make_solver(make_model(), resume_from=path)


def test_checkpoint_with_another_update_rule_is_rejected(tmp_path):
    path = tmp_path / "ckpt.npz"
    make_solver(num_epochs=1, checkpoint_path=path).train()
    with pytest.raises(ValueError, match="update_rule 'adam'"):
        make_solver(update_rule="sgd", resume_from=path)


def test_file_that_is_not_a_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, W1=np.zeros(3))
    with pytest.raises(ValueError, match="not a Solver checkpoint"):
        make_solver(resume_from=path)


# ----------------------------------------------------------------- callbacks

def test_callbacks_are_called_per_iteration_and_per_check():
    iterations, checks = [], []
    solver = make_solver(num_epochs=3, lr_decay=0.5,
                         on_iteration=iterations.append, on_epoch=checks.append)
    solver.train()

    assert len(iterations) == 3 * ITERATIONS_PER_EPOCH
    assert all(d.keys() == {"iteration", "epoch", "loss", "learning_rate"} for d in iterations)
    assert [d["iteration"] for d in iterations] == list(range(1, 3 * ITERATIONS_PER_EPOCH + 1))
    assert [d["loss"] for d in iterations] == solver.loss_history
    # The last iteration of epoch 1 still ran at the undecayed rate, with 0 epochs done.
    last_of_first = iterations[ITERATIONS_PER_EPOCH - 1]
    assert (last_of_first["epoch"], last_of_first["learning_rate"]) == (0, 1e-2)
    assert iterations[ITERATIONS_PER_EPOCH]["learning_rate"] == 1e-2 * 0.5

    assert len(checks) == 3 + 1
    assert all(d.keys() == {"epoch", "iteration", "train_acc", "val_acc", "best_val_acc", "loss"}
               for d in checks)
    assert [d["epoch"] for d in checks] == [0, 1, 2, 3]
    assert [d["iteration"] for d in checks] == [1] + [ITERATIONS_PER_EPOCH * e for e in (1, 2, 3)]
    assert [d["val_acc"] for d in checks] == solver.val_acc_history
    assert checks[-1]["best_val_acc"] == solver.best_val_acc


# ---------------------------------------------------------- non-finite loss

@pytest.mark.parametrize("bad_loss", [math.nan, math.inf])
def test_non_finite_loss_stops_training_and_restores_best(bad_loss):
    bad_call = ITERATIONS_PER_EPOCH + 4  # in the second epoch, after two checks
    model = DivergingNet(bad_call, bad_loss)
    solver = make_solver(model, num_epochs=3)
    with pytest.raises(NonFiniteLossError) as info:
        solver.train()

    err = info.value
    assert isinstance(err, FloatingPointError)
    assert (err.iteration, err.epoch) == (bad_call, 1)
    assert f"loss became {bad_loss} at iteration {bad_call}" in str(err)
    assert f"(val acc {solver.best_val_acc:.3f})" in str(err)
    assert len(solver.loss_history) == bad_call
    assert repr(solver.loss_history[-1]) == repr(bad_loss)  # repr: nan != nan
    assert solver.iteration == bad_call - 1
    assert len(solver.val_acc_history) == 2
    for name, best in solver.best_params.items():
        np.testing.assert_array_equal(model.params[name], best)
    np.testing.assert_array_equal(model.input_mean, solver.best_state["input_mean"])


def test_non_finite_loss_before_any_check_leaves_params_unapplied():
    model = DivergingNet(bad_call=1)
    before = {k: v.copy() for k, v in model.params.items()}
    with pytest.raises(NonFiniteLossError, match="no accuracy check had run yet") as info:
        make_solver(model).train()
    assert (info.value.iteration, info.value.epoch, info.value.best_val_acc) == (1, 0, None)
    for name, w in before.items():
        np.testing.assert_array_equal(model.params[name], w)


def test_non_finite_loss_error_survives_pickling():
    # Prefect and multiprocessing move a task's exception between processes.
    err = pickle.loads(pickle.dumps(NonFiniteLossError(math.inf, 7, 1, 0.5)))
    assert (err.loss, err.iteration, err.epoch, err.best_val_acc) == (math.inf, 7, 1, 0.5)
    assert str(err).startswith("loss became inf at iteration 7 (1 epoch completed)")


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("change, message", [
    ({"drop": "X_val"}, "data is missing X_val"),
    ({"y_train": np.zeros(299, int)}, "X_train has 300 rows but y_train has 299"),
    ({"y_val": np.zeros(3, int)}, "X_val has 90 rows but y_val has 3"),
])
def test_bad_data_is_rejected(change, message):
    data = make_data()
    data.pop(change.pop("drop", None), None)
    data.update(change)
    with pytest.raises(ValueError, match=message):
        make_solver(data=data)


@pytest.mark.parametrize("option, value, message", [
    ("batch_size", 0, "batch_size must be a positive int, got 0"),
    ("batch_size", 2.5, "batch_size must be a positive int"),
    ("num_epochs", -1, "num_epochs must be a positive int, got -1"),
    ("num_epochs", True, "num_epochs must be a positive int"),
    ("update_rule", "nesterov", "update_rule must be one of .*'sgd_momentum'; got 'nesterov'"),
    ("lr_decay", 0, "lr_decay must be a number > 0, got 0"),
    ("lr_decay", -0.5, "lr_decay must be a number > 0"),
    ("num_train_samples", 0, "num_train_samples must be a positive int or None"),
    ("seed", -1, "seed must be an int >= 0 or None"),
    ("on_epoch", "print", "on_epoch must be callable or None"),
])
def test_bad_options_are_rejected(option, value, message):
    with pytest.raises(ValueError, match=message):
        make_solver(**{option: value})


def test_unknown_arguments_are_rejected_by_name():
    with pytest.raises(ValueError, match='Unrecognized arguments "learning_rate", "epochs"'):
        make_solver(learning_rate=1e-3, epochs=3)


def test_cs231n_defaults():
    solver = Solver(TwoLayerNet(), make_data())
    assert solver.update_rule.__name__ == "sgd"
    assert (solver.lr_decay, solver.batch_size, solver.num_epochs) == (1.0, 100, 10)
    assert (solver.num_train_samples, solver.num_val_samples) == (1000, None)
    assert (solver.checkpoint_name, solver.print_every, solver.verbose) == (None, 10, True)


def test_overflowing_scores_stop_training_as_a_non_finite_loss():
    """A net whose scores overflow to inf fails in softmax_loss's finiteness check; the
    Solver reports that as the non-finite loss it is, at the iteration it happened."""
    from cnncore.cnn import ThreeLayerConvNet

    rng = np.random.default_rng(0)
    data = {"X_train": rng.standard_normal((40, 1, 4, 4)), "y_train": rng.integers(0, 3, 40),
            "X_val": rng.standard_normal((10, 1, 4, 4)), "y_val": rng.integers(0, 3, 10)}
    net = ThreeLayerConvNet(input_dim=(1, 4, 4), num_filters=2, filter_size=3, hidden_dim=4, num_classes=3,
                            dtype=np.float32, seed=0)
    net.params["W3"][:] = np.inf  # the first forward pass gives non-finite scores
    solver = Solver(net, data, num_epochs=1, batch_size=10, verbose=False, seed=0)
    with pytest.raises(NonFiniteLossError, match="at iteration 1") as info:
        solver.train()
    assert info.value.iteration == 1
