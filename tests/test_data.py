"""Tests for cnncore.data: digits splits, preprocessing, argument checks, descriptions.

CIFAR-10 and MNIST have their own files (test_cifar10.py, test_mnist.py); the
shared download piece is tested in test_download.py.
"""

import logging

import numpy as np
import pytest
from data_fixtures import offline  # noqa: F401  (autouse: no network, cache under tmp_path)
from sklearn.datasets import load_digits

from cnncore.data import load_dataset


# --------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_shapes_dtypes_and_default_split_sizes(digits):
    for split, n in (("train", 1197), ("val", 300), ("test", 300)):
        assert digits[f"X_{split}"].shape == (n, 1, 8, 8)
        assert digits[f"X_{split}"].dtype == np.float64
        assert digits[f"y_{split}"].shape == (n,)
        assert digits[f"y_{split}"].dtype == np.int64
    assert digits["mean"].shape == (1,)
    assert digits["class_names"] == [str(k) for k in range(10)]


def test_digits_splits_are_stratified_by_class(digits):
    total = np.bincount(load_digits().target, minlength=10)
    for split in ("train", "val", "test"):
        y = digits[f"y_{split}"]
        expected = total * len(y) / total.sum()
        # Stratified splitting rounds each class's share, so each count is
        # within one image of its proportional share.
        assert np.all(np.abs(np.bincount(y, minlength=10) - expected) <= 1), split


def test_digits_splits_partition_the_whole_dataset(digits):
    raw = [digits[f"X_{s}"] + digits["mean"][:, None, None] for s in ("train", "val", "test")]
    ours = np.sort(np.concatenate(raw).reshape(-1, 64), axis=0)
    # Raw digits are small integers, so adding the mean back is exact to 1e-12.
    np.testing.assert_allclose(ours, np.sort(load_digits().data, axis=0), atol=1e-12)


def test_digits_same_seed_gives_same_data(digits):
    again = load_dataset("digits", seed=0)
    for key in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test", "mean"):
        np.testing.assert_array_equal(again[key], digits[key])


def test_digits_different_seed_gives_different_split(digits):
    other = load_dataset("digits", seed=1)
    assert not np.array_equal(other["y_val"], digits["y_val"])


def test_train_mean_is_zero_per_channel(digits):
    # 1,197 * 64 values of size <= 16 sum with float64 error far below 1e-10.
    np.testing.assert_allclose(digits["X_train"].mean(axis=(0, 2, 3)), 0.0, atol=1e-10)


def test_same_mean_is_subtracted_from_every_split_keeping_raw_scale(digits):
    for split in ("train", "val", "test"):
        raw = digits[f"X_{split}"] + digits["mean"][:, None, None]
        # Raw digits intensities are the integers 0..16; 1e-12 absorbs rounding.
        np.testing.assert_allclose(raw, np.round(raw), atol=1e-12)
        assert raw.min() >= -1e-12 and raw.max() <= 16 + 1e-12


def test_mean_comes_from_the_subsampled_training_split_only():
    small = load_dataset("digits", num_train=20, seed=3)
    raw_train = small["X_train"] + small["mean"][:, None, None]
    np.testing.assert_allclose(small["mean"], raw_train.mean(axis=(0, 2, 3)), rtol=1e-12)
    full = load_dataset("digits", seed=3)
    assert not np.allclose(small["mean"], full["mean"])


def test_float32_request_gives_float32_everywhere():
    out = load_dataset("digits", dtype="float32")
    for key in ("X_train", "X_val", "X_test", "mean"):
        assert out[key].dtype == np.float32, key
    assert out["y_train"].dtype == np.int64


def test_float64_accepts_numpy_dtype_objects():
    assert load_dataset("digits", dtype=np.float64, num_train=5)["X_train"].dtype == np.float64


def test_subsampling_gives_requested_sizes_drawn_from_each_split(digits):
    out = load_dataset("digits", num_train=100, num_val=50, num_test=20)
    for split, n in (("train", 100), ("val", 50), ("test", 20)):
        assert out[f"X_{split}"].shape == (n, 1, 8, 8)
        raw = out[f"X_{split}"] + out["mean"][:, None, None]
        pool = {row.tobytes() for row in (digits[f"X_{split}"] + digits["mean"][:, None, None]).round()}
        assert all(row.tobytes() in pool for row in raw.round()), split


def test_subsampling_is_seeded():
    a = load_dataset("digits", num_train=100, seed=5)
    b = load_dataset("digits", num_train=100, seed=5)
    c = load_dataset("digits", num_train=100, seed=6)
    np.testing.assert_array_equal(a["X_train"], b["X_train"])
    assert not np.array_equal(a["X_train"], c["X_train"])


def test_training_subset_does_not_depend_on_num_test():
    a = load_dataset("digits", num_train=100, num_test=10)
    b = load_dataset("digits", num_train=100, num_test=200)
    np.testing.assert_array_equal(a["y_train"], b["y_train"])


def test_unknown_name_raises_listing_known_names():
    with pytest.raises(ValueError, match=r"name must be one of .*digits.*cifar10.*mnist.*'imagenet'"):
        load_dataset("imagenet")


@pytest.mark.parametrize("dtype", ["int32", "float16", np.uint8, "nonsense", None])
def test_non_float32_or_float64_dtype_raises(dtype):
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        load_dataset("digits", dtype=dtype)


@pytest.mark.parametrize("count", [0, -3, 2.5, True, "10"])
@pytest.mark.parametrize("arg", ["num_train", "num_val", "num_test"])
def test_non_positive_int_count_raises_naming_argument(arg, count):
    with pytest.raises(ValueError, match=f"{arg} must be a positive int"):
        load_dataset("digits", **{arg: count})


@pytest.mark.parametrize("arg, available", [("num_train", 1197), ("num_val", 300), ("num_test", 300)])
def test_count_larger_than_split_raises_naming_what_is_available(arg, available):
    with pytest.raises(ValueError, match=f"{arg} must be at most {available}"):
        load_dataset("digits", **{arg: available + 1})


@pytest.mark.parametrize("seed", [-1, 1.0, 2**32, None])
def test_bad_seed_raises(seed):
    with pytest.raises(ValueError, match="seed must be an int"):
        load_dataset("digits", seed=seed)


def test_description_names_source_split_and_subsets_and_is_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="cnncore.data"):
        out = load_dataset("digits", seed=2, num_train=100)
    assert out["description"] == ("scikit-learn's 8x8 digits (1,797 images) split stratified 1,197/300/300 "
                                  "with seed 2; seeded random subsets kept (train/val/test): 100/300/300")
    assert [r.getMessage() for r in caplog.records if r.name == "cnncore.data"] == [out["description"]]
