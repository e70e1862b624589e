"""Tests for cnncore.split_cache: scikit-learn's stratified splits and digits, remembered on disk.

What is read back must be what scikit-learn computes, to the bit; a file that is
damaged, forged or left by another scikit-learn version must not be believed; a cache
that cannot be written must cost only time.
"""

import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from cnncore import split_cache
from cnncore.data import load_dataset


@pytest.fixture(autouse=True)
def cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "cnncore" / "splits"


def labels(n=257, classes=7, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


def expected_carve(y, count, seed):
    return train_test_split(np.arange(len(y)), test_size=count, stratify=y, random_state=seed)


@pytest.mark.parametrize("count, seed", [(40, 0), (101, 12345)])
def test_carve_indices_are_train_test_splits_cold_and_warm(cache_home, count, seed):
    y = labels()
    rest, out = expected_carve(y, count, seed)
    for _ in range(2):  # computed and written, then read back
        got_rest, got_out = split_cache.stratified_carve_indices(y, count, seed)
        np.testing.assert_array_equal(got_rest, rest)
        np.testing.assert_array_equal(got_out, out)
        assert got_rest.dtype == got_out.dtype == np.int64
    assert len(list(cache_home.glob("stratified-*.npz"))) == 1


def test_the_key_tells_labels_counts_and_seeds_apart(cache_home):
    y = labels()
    other = y.copy()
    other[[0, 1]] = other[[1, 0]] if other[0] != other[1] else (other[0] + 1) % 7
    for args in ((y, 40, 0), (y, 41, 0), (y, 40, 1), (other, 40, 0)):
        rest, out = split_cache.stratified_carve_indices(*args)
        np.testing.assert_array_equal(out, expected_carve(*args)[1])
    assert len(list(cache_home.glob("stratified-*.npz"))) == 4


def test_bundled_digits_are_load_digits_cold_and_warm(cache_home):
    digits = load_digits()
    for _ in range(2):
        images, target, names = split_cache.bundled_digits()
        np.testing.assert_array_equal(images, digits.images)
        np.testing.assert_array_equal(target, digits.target)
        np.testing.assert_array_equal(names, digits.target_names)
        assert images.dtype == np.float64 and target.dtype == np.int64
    assert [p.name.startswith("digits-sklearn") for p in cache_home.iterdir()] == [True]


def test_digits_splits_from_the_cache_match_scikit_learn_to_the_bit():
    digits = load_digits()
    X, y = digits.images[:, None], digits.target.astype(np.int64)
    X_rest, X_test, y_rest, y_test = train_test_split(X, y, test_size=300, stratify=y, random_state=5)
    X_train, X_val, y_train, y_val = train_test_split(X_rest, y_rest, test_size=300, stratify=y_rest, random_state=5)
    for _ in range(2):
        data = load_dataset("digits", seed=5)
        for split, (X_s, y_s) in {"train": (X_train, y_train), "val": (X_val, y_val), "test": (X_test, y_test)}.items():
            np.testing.assert_array_equal(data[f"X_{split}"] + data["mean"][:, None, None], X_s)
            np.testing.assert_array_equal(data[f"y_{split}"], y_s)


def _the_one_file(cache_home):
    (path,) = cache_home.glob("stratified-*.npz")
    return path


@pytest.mark.parametrize("damage", ["garbage", "truncated", "duplicate index", "wrong count", "object array",
                                    "key missing"])
def test_a_damaged_or_forged_file_is_computed_again_and_replaced(cache_home, damage):
    y, count, seed = labels(), 40, 3
    rest, out = expected_carve(y, count, seed)
    split_cache.stratified_carve_indices(y, count, seed)
    path = _the_one_file(cache_home)
    if damage == "garbage":
        path.write_bytes(b"not an npz at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "duplicate index":
        forged = out.copy()
        forged[0] = rest[0]  # one image in both parts, another in neither
        np.savez(path, rest=rest, out=forged)
    elif damage == "wrong count":
        np.savez(path, rest=np.concatenate([rest, out[:1]]), out=out[1:])
    elif damage == "object array":
        np.savez(path, rest=np.array([rest], dtype=object), out=out)
    else:
        np.savez(path, rest=rest)
    got_rest, got_out = split_cache.stratified_carve_indices(y, count, seed)
    np.testing.assert_array_equal(got_rest, rest)
    np.testing.assert_array_equal(got_out, out)
    with np.load(path, allow_pickle=False) as stored:  # rewritten whole
        np.testing.assert_array_equal(stored["out"], out)


def test_forged_digits_are_not_believed(cache_home):
    split_cache.bundled_digits()
    (path,) = cache_home.glob("digits-*.npz")
    np.savez(path, images=np.zeros((5, 8, 8), np.float32), target=np.zeros(5, np.int64),
             target_names=np.arange(10))
    images, _, _ = split_cache.bundled_digits()
    np.testing.assert_array_equal(images, load_digits().images)


def test_another_scikit_learn_versions_file_is_not_read(cache_home, monkeypatch):
    y = labels()
    split_cache.stratified_carve_indices(y, 40, 0)
    np.savez(_the_one_file(cache_home), rest=np.arange(40, len(y)), out=np.arange(40))  # valid, but not this split
    monkeypatch.setattr(split_cache, "_sklearn_version", lambda: "0.0.other")
    _, out = split_cache.stratified_carve_indices(y, 40, 0)
    np.testing.assert_array_equal(out, expected_carve(y, 40, 0)[1])
    assert len(list(cache_home.glob("stratified-*.npz"))) == 2


def test_a_cache_that_cannot_be_written_costs_only_time(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    y = labels()
    for _ in range(2):
        _, out = split_cache.stratified_carve_indices(y, 40, 0)
        np.testing.assert_array_equal(out, expected_carve(y, 40, 0)[1])
    assert not list(tmp_path.glob("**/*.tmp")) and not list(tmp_path.glob("**/.*.tmp"))


def test_a_warm_process_loads_the_digits_without_importing_scikit_learn(cache_home):
    code = ("import sys; from cnncore.data import load_dataset; d = load_dataset('digits', seed=2); "
            "print('sklearn' in sys.modules, d['y_test'][:20].tolist())")
    cold, warm = (subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(
        " ", 1) for _ in range(2))
    assert cold[0] == "True" and warm[0] == "False"
    assert warm[1] == cold[1]
