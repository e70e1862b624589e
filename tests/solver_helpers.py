"""Small models, data and a Solver factory shared by the Solver and checkpoint tests."""

import math

import numpy as np

from cnncore.solver import Solver

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


class ThreeClassNet(TwoLayerNet):
    """The same net declaring num_classes, as cnncore's conv nets do: the Solver bounds labels by it."""

    num_classes = NUM_CLASSES


class ConfiguredNet(TwoLayerNet):
    """The same net with a config dict, as every cnncore model has: checkpoints record it."""

    def __init__(self, normalization="batchnorm", num_groups=2, hidden_dim=16, seed=0):
        super().__init__(hidden_dim=hidden_dim, seed=seed)
        self.config = {"hidden_dim": hidden_dim, "normalization": normalization, "num_groups": num_groups}


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
