"""End to end: the three-layer net trained by the Solver on the bundled digits data."""

import numpy as np
import pytest

from cnncore.cnn import ThreeLayerConvNet
from cnncore.data import load_dataset
from cnncore.solver import Solver

DIGITS_NET = dict(input_dim=(1, 8, 8), num_filters=16, filter_size=3, hidden_dim=64,
                  weight_scale=1e-2, reg=1e-3, num_groups=4, seed=0)


@pytest.fixture(scope="module")
def digits():
    return {dtype: load_dataset("digits", dtype=dtype, seed=0) for dtype in ("float32", "float64")}


def train_digits(data, normalization, dtype, num_epochs=10):
    model = ThreeLayerConvNet(**DIGITS_NET, normalization=normalization, dtype=dtype)
    solver = Solver(model, data, update_rule="adam", optim_config={"learning_rate": 2e-3},
                    lr_decay=0.95, batch_size=50, num_epochs=num_epochs, num_train_samples=None,
                    verbose=False, seed=0)
    solver.train()
    return model, solver


def test_overfits_one_hundred_samples(digits):
    data = digits["float64"]
    small = {**data, "X_train": data["X_train"][:100], "y_train": data["y_train"][:100]}
    model = ThreeLayerConvNet(**{**DIGITS_NET, "reg": 0.0}, dtype=np.float64)
    solver = Solver(model, small, update_rule="adam", optim_config={"learning_rate": 5e-3},
                    batch_size=25, num_epochs=20, verbose=False, seed=0)
    solver.train()
    assert solver.train_acc_history[-1] >= 0.95
    assert solver.loss_history[-1] < 0.1 * solver.loss_history[0]


@pytest.mark.parametrize("normalization", [None, "batchnorm", "groupnorm"])
def test_reaches_97_percent_on_digits(digits, normalization):
    model, solver = train_digits(digits["float32"], normalization, "float32")
    assert solver.best_val_acc >= 0.97
    # The best parameters are swapped in at the end, so the model scores what was reported.
    assert solver.check_accuracy(digits["float32"]["X_val"], digits["float32"]["y_val"]) == solver.best_val_acc


def test_float32_matches_float64_accuracy(digits):
    accuracies = {dtype: train_digits(digits[dtype], "batchnorm", dtype, num_epochs=5)[1].best_val_acc
                  for dtype in ("float32", "float64")}
    # Same seed and data: the runs differ only by rounding, a few images at most of 300.
    assert abs(accuracies["float32"] - accuracies["float64"]) <= 0.02
    assert min(accuracies.values()) >= 0.95


def test_errors_come_before_any_training(digits):
    data = digits["float64"]
    model = ThreeLayerConvNet(**DIGITS_NET)
    with pytest.raises(ValueError, match="X_train has 1197 rows but y_train has 10"):
        Solver(model, {**data, "y_train": data["y_train"][:10]})
    with pytest.raises(ValueError, match=r"input_dim is \(3, 8, 8\)"):
        Solver(ThreeLayerConvNet(**{**DIGITS_NET, "input_dim": (3, 8, 8)}), data)
    with pytest.raises(ValueError, match="update_rule must be one of"):
        Solver(model, data, update_rule="adagrad")
    with pytest.raises(ValueError, match="dataset|name"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="must divide the 16 channels"):
        ThreeLayerConvNet(**{**DIGITS_NET, "num_groups": 5}, normalization="groupnorm")
