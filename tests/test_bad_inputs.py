"""The library's bad inputs that once slipped through: each raises a ValueError (or the project's own
error, a ValueError too) naming the argument or the file, instead of returning NaN, calling NaN
images class 0, or surfacing a raw KeyError, JSONDecodeError, EOFError or UnicodeDecodeError."""

import hashlib
import json
import re
import tarfile

import numpy as np
import pytest
from solver_helpers import make_solver

from cnncore import checkpoint
from cnncore.checks import NonFiniteError
from cnncore.cifar10 import CIFAR10_DIRNAME, CIFAR10_META_FILE, load_cifar10_class_names
from cnncore.classifier import load_model
from cnncore.cnn import ThreeLayerConvNet
from cnncore.data import CorruptDatasetError, download_cifar10
from cnncore.gradient_check import check_layer_gradients, eval_numerical_gradient, eval_numerical_gradient_array
from cnncore.layers import affine_backward, affine_forward, softmax_loss, svm_loss
from cnncore.npz_io import NpzFileError, read_npz

pytestmark = pytest.mark.filterwarnings("error")  # a NaN computed on the way would be a RuntimeWarning


# ------------------------------------------------------------------ losses and gradient checks


@pytest.mark.parametrize("loss", [softmax_loss, svm_loss])
def test_a_loss_of_an_empty_batch_is_refused_naming_x(loss):
    with pytest.raises(ValueError, match=r"x must hold at least one row of scores, got an empty batch of shape \(0, 3\)"):
        loss(np.zeros((0, 3)), np.zeros(0, dtype=np.int64))


@pytest.mark.parametrize("loss", [softmax_loss, svm_loss])
def test_a_loss_of_one_row_still_works(loss):
    value, dx = loss(np.array([[1.0, 2.0, 0.5]]), np.array([1]))
    assert np.isfinite(value) and dx.shape == (1, 3)


@pytest.mark.parametrize("h", [0, 0.0, -1e-5, float("nan"), float("inf")])
def test_a_numerical_gradient_with_a_step_that_is_not_positive_is_refused_naming_h(h):
    with pytest.raises(ValueError, match=r"^h must be a finite number > 0, got"):
        eval_numerical_gradient(lambda a: float((a ** 2).sum()), np.ones(3), verbose=False, h=h)
    with pytest.raises(ValueError, match=r"^h must be a finite number > 0, got"):
        eval_numerical_gradient_array(lambda a: a ** 2, np.ones(3), np.ones(3), h=h)


def test_a_layer_check_with_h_zero_is_refused_before_the_layer_runs():
    calls = []

    def forward(x, w, b):
        calls.append("forward")
        return affine_forward(x, w, b)

    with pytest.raises(ValueError, match="h must be a finite number > 0, got 0"):
        check_layer_gradients(forward, affine_backward, [np.ones((2, 3)), np.ones((3, 2)), np.zeros(2)], wrt=[0],
                              h=0)
    assert calls == []


# ------------------------------------------------------------------ models


def small_net(**kwargs) -> ThreeLayerConvNet:
    return ThreeLayerConvNet(input_dim=(1, 8, 8), num_filters=4, filter_size=3, hidden_dim=8, seed=0,
                             dtype="float64", **kwargs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_predict_refuses_images_that_are_not_finite_naming_the_first(bad):
    X = np.random.default_rng(0).standard_normal((7, 1, 8, 8))
    X[5, 0, 3, 3] = bad
    X[6, 0, 0, 0] = bad
    with pytest.raises(NonFiniteError, match=r"X must be finite, but image 5 holds NaN or inf"):
        small_net().predict(X, batch_size=2)  # image 5 is in the third batch: counted across batches


def test_predict_of_finite_images_is_unchanged_by_the_check():
    net = small_net()
    X = np.random.default_rng(0).standard_normal((7, 1, 8, 8))
    assert np.array_equal(net.predict(X, batch_size=3), net.loss(X).argmax(axis=1))


def test_load_model_of_a_directory_says_it_is_a_directory(tmp_path):
    with pytest.raises(NpzFileError, match=rf"model file {tmp_path} is a directory, not an .npz file"):
        load_model(tmp_path)


def test_load_model_of_a_missing_file_still_says_it_does_not_exist(tmp_path):
    with pytest.raises(NpzFileError, match="does not exist"):
        load_model(tmp_path / "none.npz")


def with_config(path, tmp_path, **changes):
    """A copy of the model file at path whose config has the given changes."""
    arrays = read_npz(path)
    arrays["config"] = np.array(json.dumps({**json.loads(str(arrays["config"])), **changes}))
    edited = tmp_path / "edited.npz"
    np.savez(edited, **arrays)
    return edited


@pytest.mark.parametrize("changes, named", [
    ({"num_filters": 10**9}, "num_filters=1000000000"),
    ({"hidden_dim": 10**10}, "hidden_dim=10000000000"),
    ({"input_dim": [1, 10**6, 10**6]}, "input_dim=[1, 1000000, 1000000]"),
], ids=["num_filters", "hidden_dim", "input_dim"])
def test_load_model_refuses_a_config_too_big_for_memory_before_allocating(tmp_path, changes, named):
    edited = with_config(small_net().save(tmp_path / "net.npz"), tmp_path, **changes)
    # Allocating first would take seconds to fail (or swap); the refusal is arithmetic only.
    with pytest.raises(ValueError, match=rf"model file {edited}: its config \(.*{re.escape(named)}.*\) describes a "
                                         r"ThreeLayerConvNet that would need about .* of memory, more than the limit"):
        load_model(edited)


def test_load_model_still_loads_what_fits(tmp_path):
    net = small_net(normalization="batchnorm")
    loaded = load_model(net.save(tmp_path / "net.npz"))
    assert all(np.array_equal(loaded.params[k], v) for k, v in net.params.items())


# ------------------------------------------------------------------ checkpoints


@pytest.fixture
def saved(tmp_path):
    """A real Solver checkpoint's arrays and a writer for damaged copies of it."""
    good = tmp_path / "good.npz"
    make_solver(num_epochs=1, checkpoint_path=good).train()
    arrays = read_npz(good)

    def damaged(**changes):
        bad = dict(arrays)
        for key, value in changes.items():
            if value is None:
                del bad[key]
            else:
                bad[key] = np.asarray(value)
        path = tmp_path / "bad.npz"
        np.savez(path, **bad)
        return path

    return arrays, damaged


def manifest_of(arrays) -> dict:
    return json.loads(str(arrays["manifest"]))


@pytest.mark.parametrize("damage, message", [
    (lambda a: {"manifest": "{not json"}, r"its manifest entry is not valid JSON"),
    (lambda a: {"manifest": json.dumps([1, 2])}, r"its manifest must be a JSON object"),
    (lambda a: {"model/W1": None}, r"it has no 'model/W1' entry"),
    (lambda a: {"manifest": json.dumps({**manifest_of(a), "best_params": [*manifest_of(a)["best_params"], "W9"]})},
     r"it has no 'best_params/W9' entry"),
    (lambda a: {"manifest": json.dumps({k: v for k, v in manifest_of(a).items() if k != "optim"})},
     r"its manifest does not describe its arrays \(KeyError: 'optim'\)"),
    (lambda a: {"rng_state": "not json"}, r"its rng_state entry is not valid JSON"),
    (lambda a: {"rng_state": json.dumps({"bit_generator": "Nonesuch"})},
     r"its rng_state names no NumPy bit generator \(bit_generator: 'Nonesuch'\)"),
    (lambda a: {"rng_state": json.dumps({"bit_generator": "PCG64", "state": {"state": "x"}})},
     r"its rng_state is not a valid PCG64 state"),
    (lambda a: {"epoch": [1, 2]}, r"its 'epoch' entry must hold one value, got shape \(2,\)"),
    (lambda a: {"iteration": None}, r"it has no 'iteration' entry"),
], ids=["manifest-not-json", "manifest-not-object", "missing-model-array", "missing-best-array",
        "manifest-without-optim", "rng-not-json", "rng-unknown-generator", "rng-bad-state", "epoch-not-scalar",
        "no-iteration"])
def test_a_damaged_checkpoint_raises_value_error_naming_the_file_and_the_entry(saved, damage, message):
    arrays, damaged = saved
    path = damaged(**damage(arrays))
    with pytest.raises(ValueError, match=rf"^checkpoint {path} is corrupt: {message}"):
        checkpoint.load(path)


def test_a_damaged_checkpoint_is_refused_by_the_solver_and_load_model_alike(saved, tmp_path):
    _, damaged = saved
    path = damaged(**{"manifest": "{not json"})
    with pytest.raises(ValueError, match=rf"checkpoint {path} is corrupt"):
        make_solver(resume_from=path)
    with pytest.raises(ValueError, match=rf"checkpoint {path} is corrupt"):
        load_model(path)


def test_an_undamaged_checkpoint_loads(saved, tmp_path):
    arrays, damaged = saved
    state = checkpoint.load(damaged())
    assert state.rng_state == json.loads(str(arrays["rng_state"])) and state.epoch == 1


# ------------------------------------------------------------------ CIFAR-10 files


def test_a_truncated_cifar10_archive_is_named_as_corrupt(tmp_path):
    src = tmp_path / "src" / CIFAR10_DIRNAME
    src.mkdir(parents=True)
    (src / "data_batch_1.bin").write_bytes(bytes(np.random.default_rng(0).integers(0, 10, 3073 * 40, np.uint8)))
    whole = tmp_path / "whole.tar.gz"
    with tarfile.open(whole, "w:gz") as tar:
        tar.add(src, arcname=CIFAR10_DIRNAME)
    cut = tmp_path / "served" / "cifar-10-binary.tar.gz"
    cut.parent.mkdir()
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    md5 = hashlib.md5(cut.read_bytes()).hexdigest()  # the md5 matches: only the gzip stream is cut short
    with pytest.raises(CorruptDatasetError, match=r"cifar-10-binary.tar.gz is truncated or corrupt and cannot be "
                                                  r"extracted \(EOFError: .*\); delete it and download again"):
        download_cifar10(tmp_path / "cache", url=cut.as_uri(), md5=md5, progress=False)


def test_a_cifar10_meta_file_that_is_not_ascii_is_named_as_corrupt(tmp_path):
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "trück"]
    (tmp_path / CIFAR10_META_FILE).write_bytes("\n".join(names).encode("utf-8"))
    with pytest.raises(CorruptDatasetError, match=rf"{tmp_path / CIFAR10_META_FILE} is corrupt: the official file "
                                                  r"holds ASCII class names, but byte 56 is 0xc3"):
        load_cifar10_class_names(tmp_path)
