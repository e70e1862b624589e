"""Solver: learning, reproducibility, callbacks, failures, options (checkpoints: test_checkpoint.py)."""

import math
import pickle

import numpy as np
import pytest
from solver_helpers import (
    ITERATIONS_PER_EPOCH,
    DivergingNet,
    ParamsOnlyNet,
    ThreeClassNet,
    TwoLayerNet,
    assert_same_run,
    make_data,
    make_solver,
)

from cnncore.solver import NonFiniteLossError, Solver

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


class _ParamsAtChecks:
    """on_epoch callback keeping a copy of the model's params and the val accuracy at every check."""

    def __init__(self, model):
        self.model, self.checks = model, []

    def __call__(self, info):
        self.checks.append((info["val_acc"], {k: v.copy() for k, v in self.model.params.items()}))


def test_the_best_params_are_the_first_check_with_the_highest_validation_accuracy():
    """Separable data: validation accuracy reaches 1.0 and stays there; a later check that only ties it is
    not better, so the best params are those of the first check at 1.0 (CS231n's strict >)."""
    model = TwoLayerNet()
    seen = _ParamsAtChecks(model)
    solver = make_solver(model, num_epochs=10, num_val_samples=None, on_epoch=seen)
    solver.train()
    accuracies = [acc for acc, _ in seen.checks]
    first_best = accuracies.index(max(accuracies))
    assert accuracies.count(max(accuracies)) >= 2, f"precondition: a tie at the best ({accuracies})"
    for name, value in seen.checks[first_best][1].items():
        np.testing.assert_array_equal(solver.best_params[name], value, err_msg=name)
    assert solver.best_val_acc == max(accuracies)


def test_a_batch_larger_than_the_training_set_still_trains_once_per_epoch():
    """Minibatches are drawn with replacement, so 400 of 300 images is a batch: one update an epoch."""
    solver = make_solver(num_epochs=3, batch_size=400)
    solver.train()
    assert (solver.iteration, solver.epoch, len(solver.loss_history)) == (3, 3, 3)
    assert len(solver.val_acc_history) == 3  # the first update ends the first epoch: one check for both


class _RowsScored(TwoLayerNet):
    """TwoLayerNet recording how many rows each test-mode call scores."""

    def __init__(self):
        super().__init__()
        self.scored = []

    def loss(self, X, y=None):
        if y is None:
            self.scored.append(len(X))
        return super().loss(X, y)


def test_validation_accuracy_is_measured_on_num_val_samples_images():
    model = _RowsScored()
    make_solver(model, num_epochs=2, num_train_samples=37, num_val_samples=20).train()
    # Each check scores the training sample, then the validation sample (in batches of 100: one call each).
    assert model.scored == [37, 20] * (1 + 2)


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
    ("batch_size", 0, "batch_size must be a positive integer, got 0"),
    ("batch_size", 2.5, "batch_size must be a positive integer"),
    ("num_epochs", -1, "num_epochs must be a positive integer, got -1"),
    ("num_epochs", True, "num_epochs must be a positive integer"),
    ("update_rule", "nesterov", "update_rule must be one of .*'sgd_momentum'; got 'nesterov'"),
    ("lr_decay", 0, "lr_decay must be a finite number > 0, got 0"),
    ("lr_decay", -0.5, "lr_decay must be a finite number > 0"),
    ("num_train_samples", 0, "num_train_samples must be a positive integer or None"),
    ("seed", -1, "seed must be a non-negative integer or None"),
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


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # the inf, on purpose
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


# -------------------------------------------------------- data, checked at construction

@pytest.mark.parametrize("dtype", [np.int64, np.float16, object])
@pytest.mark.parametrize("array", ["X_train", "X_val"])
def test_data_that_is_not_float32_or_float64_is_refused_naming_the_array(array, dtype):
    data = make_data()
    data[array] = data[array].astype(dtype)
    with pytest.raises(ValueError, match=rf"{array} must be a float32 or float64 array, got dtype {np.dtype(dtype)}"):
        make_solver(data=data)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("array", ["X_train", "X_val"])
def test_data_with_nan_or_inf_is_refused_naming_the_array(array, bad):
    data = make_data()
    data[array][7, 2] = bad
    with pytest.raises(ValueError, match=rf"{array} must be finite, got NaN or inf"):
        make_solver(data=data)


def _labels(split, change):
    data = make_data()
    data[f"y_{split}"] = change(data[f"y_{split}"].copy())
    return data


def _set_first(value):
    def change(y):
        y[0] = value
        return y
    return change


@pytest.mark.parametrize("model, split, change, message", [
    pytest.param(ThreeClassNet, "val", _set_first(3), r"y_val must hold labels in \[0, 3\), got values in \[0, 3\]",
                 id="y_val-too-large"),
    pytest.param(ThreeClassNet, "train", _set_first(7), r"y_train must hold labels in \[0, 3\), got values in \[0, 7\]",
                 id="y_train-too-large"),
    pytest.param(TwoLayerNet, "train", _set_first(-1), r"y_train must hold labels >= 0, got values in \[-1, 2\]",
                 id="y_train-negative-without-num_classes"),
    pytest.param(TwoLayerNet, "val", lambda y: y.astype(float),
                 r"y_val must hold integer class labels, got dtype float64", id="y_val-float"),
    pytest.param(TwoLayerNet, "train", lambda y: y[:, None], r"y_train must have shape \(300,\) to match X_train, "
                 r"got \(300, 1\)", id="y_train-2d"),
])
def test_labels_are_checked_at_construction_naming_the_array(model, split, change, message):
    with pytest.raises(ValueError, match=message):
        make_solver(model(), data=_labels(split, change))


def test_labels_up_to_num_classes_minus_one_are_accepted():
    data = make_data()
    assert data["y_val"].max() == 2
    make_solver(ThreeClassNet(), data=data)


# ------------------------------------------------------------------ optim_config

@pytest.mark.parametrize("rule, config, message", [
    ("adam", {"lr": 1.0}, r"optim_config has the key 'lr', which is not a hyperparameter of update_rule 'adam'; "
                          r"its hyperparameters are learning_rate, beta1, beta2, epsilon"),
    ("sgd", {"learning_rate": 1e-2, "momentum": 0.9}, r"optim_config has the key 'momentum'.*update_rule 'sgd'"),
    ("sgd", {"learning_rate": np.nan}, r"optim_config\['learning_rate'\] must be a finite number > 0, got nan"),
    ("adam", {"learning_rate": np.inf}, r"optim_config\['learning_rate'\] must be a finite number > 0, got inf"),
    ("sgd_momentum", {"momentum": 1.5}, r"optim_config\['momentum'\] must be a finite number >= 0 and < 1, got 1.5"),
    ("rmsprop", {"learning_rate": -1e-3}, r"optim_config\['learning_rate'\] must be a finite number > 0, got -0.001"),
], ids=["misspelled", "another-rules-key", "nan-rate", "inf-rate", "momentum-above-1", "negative-rate"])
def test_bad_optim_config_is_refused_at_construction_naming_the_key(rule, config, message):
    with pytest.raises(ValueError, match=message):
        make_solver(update_rule=rule, optim_config=config)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_lr_decay_is_refused(value):
    with pytest.raises(ValueError, match=rf"lr_decay must be a finite number > 0, got {value}"):
        make_solver(lr_decay=value)


# ------------------------------------------------------------------ lr_steps

def _rates_used(**options):
    rates = []
    solver = make_solver(on_iteration=lambda info: rates.append(info["learning_rate"]), **options)
    solver.train()
    return solver, rates


def test_lr_steps_multiply_the_rate_by_the_factor_after_each_fraction_of_training():
    # 4 epochs of 6 updates: steps after updates round(0.25 * 24) = 6 and round(0.5 * 24) = 12.
    _, rates = _rates_used(num_epochs=4, lr_decay=1.0, lr_steps=[0.25, 0.5], lr_step_factor=0.1)
    assert rates == [1e-2] * 6 + [1e-2 * 0.1] * 6 + [1e-2 * 0.1 * 0.1] * 12


def test_lr_steps_compose_with_lr_decay():
    # A step at update round(0.4 * 18) = 7, inside the second epoch; decays after 6, 12, 18.
    solver, rates = _rates_used(num_epochs=3, lr_decay=0.5, lr_steps=(0.4,), lr_step_factor=0.2)
    assert rates[5:8] == [1e-2, 1e-2 * 0.5, 1e-2 * 0.5 * 0.2]
    assert rates[12] == 1e-2 * 0.5 * 0.2 * 0.5
    assert solver._learning_rate() == 1e-2 * 0.5 * 0.2 * 0.5 * 0.5


def test_two_lr_steps_that_fall_on_one_update_are_both_taken():
    # 2 epochs of 6 updates: round(0.3 * 12) = 4 and round(0.32 * 12) = 4.
    _, rates = _rates_used(num_epochs=2, lr_decay=1.0, lr_steps=(0.3, 0.32), lr_step_factor=0.5)
    assert rates == [1e-2] * 4 + [1e-2 * 0.5 * 0.5] * 8


def test_lr_steps_are_off_by_default():
    _, rates = _rates_used(num_epochs=2, lr_decay=1.0)
    assert set(rates) == {1e-2}


@pytest.mark.parametrize("option, value, message", [
    ("lr_steps", [0.5, 0.5], r"lr_steps must be strictly increasing, got \[0.5, 0.5\]"),
    ("lr_steps", [0.6, 0.3], r"lr_steps must be strictly increasing"),
    ("lr_steps", [0.0, 0.5], r"lr_steps\[0\] must be a finite number > 0 and < 1, got 0.0"),
    ("lr_steps", (0.5, 1.0), r"lr_steps\[1\] must be a finite number > 0 and < 1, got 1.0"),
    ("lr_steps", "0.5", r"lr_steps must be a sequence of fractions in \(0, 1\), got '0.5'"),
    ("lr_steps", 0.5, r"lr_steps must be a sequence of fractions"),
    ("lr_step_factor", 0, r"lr_step_factor must be a finite number > 0 and <= 1, got 0"),
    ("lr_step_factor", 10, r"lr_step_factor must be a finite number > 0 and <= 1, got 10"),
    ("lr_step_factor", np.nan, r"lr_step_factor must be a finite number > 0 and <= 1, got nan"),
])
def test_bad_lr_steps_are_refused(option, value, message):
    with pytest.raises(ValueError, match=message):
        make_solver(**{option: value})


# ------------------------------------------------------------------ final model

class _LastUpdate:
    """on_iteration callback keeping a copy of the model's state after each update."""

    def __init__(self, model):
        self.model, self.state = model, None

    def __call__(self, info):
        self.state = {k: v.copy() for k, v in self.model.state_dict().items()}


def test_final_state_is_the_model_after_the_last_update_and_best_params_are_swapped_in():
    model = TwoLayerNet()
    last = _LastUpdate(model)
    solver = make_solver(model, num_epochs=3, on_iteration=last)
    assert solver.final_state is None
    solver.train()
    assert solver.final_state.keys() == last.state.keys() == {"W1", "b1", "W2", "b2", "input_mean"}
    for name, value in last.state.items():
        np.testing.assert_array_equal(solver.final_state[name], value, err_msg=name)
    for name, best in solver.best_params.items():
        np.testing.assert_array_equal(model.params[name], best)
    assert all(solver.final_state[k] is not v for k, v in model.params.items())  # copies, not the model's arrays


class _LastParams:
    """on_iteration callback keeping the model's params after each update: copies, and the arrays themselves."""

    def __init__(self, model):
        self.model, self.values, self.arrays = model, None, None

    def __call__(self, info):
        self.arrays = dict(self.model.params)
        self.values = {k: v.copy() for k, v in self.arrays.items()}


def test_final_state_of_a_model_without_state_dict_is_a_copy_of_its_params():
    model = ParamsOnlyNet()
    last = _LastParams(model)
    solver = make_solver(model, num_epochs=2, on_iteration=last)
    solver.train()
    assert solver.final_state.keys() == solver.best_params.keys()
    # The params as the last update left them, before the best ones were swapped in (here a different model).
    assert solver.val_acc_history[-1] < solver.best_val_acc, "precondition: the final model is not the best"
    assert solver.final_state.keys() == last.values.keys() == {"W1", "b1", "W2", "b2"}
    for name, value in last.values.items():
        np.testing.assert_array_equal(solver.final_state[name], value, err_msg=name)
    # Copies: no array shared with the model's last params, its params now, or the best params.
    for name, kept in solver.final_state.items():
        for other in (last.arrays[name], model.params[name], solver.best_params[name]):
            assert kept is not other and not np.shares_memory(kept, other), name
    for array in last.arrays.values():
        array += 1.0  # changing the arrays the model trained in leaves the final state as it was
    for name, value in last.values.items():
        np.testing.assert_array_equal(solver.final_state[name], value, err_msg=name)


def test_final_model_loaded_back_scores_the_last_checks_validation_accuracy():
    # The last accuracy check runs after the last update, on the whole validation set here.
    model = TwoLayerNet()
    solver = make_solver(model, num_epochs=3, num_val_samples=None)
    solver.train()
    data = make_data()
    model.load_state_dict(solver.final_state)
    assert solver.check_accuracy(data["X_val"], data["y_val"]) == solver.val_acc_history[-1]
