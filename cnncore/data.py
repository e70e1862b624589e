"""Datasets for the Solver, as CS231n prepares them.

`load_dataset(name, ...)` returns the Solver's data dict:

    X_train, X_val, X_test: (N, C, H, W) float arrays (float32 or float64)
    y_train, y_val, y_test: (N,) int64 labels in 0..num_classes-1
    class_names:            list of str, class_names[k] names label k
    mean:                   (C,) per-channel mean of the raw training images
    description:            one line: which files were used, the split sizes and why

Preprocessing is the CS231n one: convert to float, then subtract the per-channel
mean computed on the (subsampled) training split only, from every split. The raw
intensity scale is kept (digits 0..16, CIFAR-10 and MNIST 0..255), so
X + mean[:, None, None] gives back the raw pixels.

The dtype rule of the project: datasets come as float32 or float64 only. Any
other dtype, float16 included, is refused with a ValueError naming `dtype`
(cnncore.checks.require_float_dtype): float16 has already lost what the model
would compute with, and a silent cast would hide that.

Three datasets:

- "digits": scikit-learn's bundled 8x8 handwritten digits (1,797 images, works
  offline), shape (N, 1, 8, 8), split stratified by class into 1,197 / 300 / 300.
- "cifar10": the official binary release, (N, 3, 32, 32) (cnncore.cifar10). The
  validation split is a seeded random 1,000 images taken out of the 50,000
  training images; the test split is the 10,000 test images.
- "mnist": the official IDX files, (N, 1, 28, 28) (cnncore.mnist, which says
  where to put them). With all four files: a seeded stratified 5,000 images
  taken out of the 60,000 training images for validation, the 10,000 t10k
  images for test. With only the t10k files: those 10,000 images split
  stratified 6,000 / 1,000 / 3,000, and the description (also logged at INFO
  on the "cnncore.data" logger) says so.

The files of CIFAR-10 and MNIST are looked for in the `data_dir` argument, else
$CNNCORE_DATA_DIR, else ~/.cache/cnncore, and downloaded there when absent
(cnncore.download). Every random choice derives from `seed`, so the same call
gives the same arrays. The description is the one key the Solver does not read.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from .checks import require_float_dtype, require_int
from .cifar10 import (  # noqa: F401  (re-exported: cnncore.data is the public door)
    CIFAR10_ARCHIVE,
    CIFAR10_DIRNAME,
    CIFAR10_MD5,
    CIFAR10_META_FILE,
    CIFAR10_NUM_VAL,
    CIFAR10_TEST_FILE,
    CIFAR10_TRAIN_FILES,
    CIFAR10_URL,
    download_cifar10,
    load_cifar10,
    load_cifar10_batches,
    load_cifar10_class_names,
)
from .download import (  # noqa: F401
    DATA_DIR_ENV,
    CorruptDatasetError,
    DatasetUnavailableError,
    resolve_data_dir,
)
from .mnist import (  # noqa: F401
    MNIST_CLASS_NAMES,
    MNIST_DIRNAME,
    MNIST_FILES,
    MNIST_MIRRORS,
    download_mnist,
    load_mnist,
)
from .split_cache import bundled_digits, stratified_carve_indices

KNOWN_DATASETS = ("digits", "cifar10", "mnist")
# (C, H, W) of one image of each dataset, as load_dataset returns it.
IMAGE_SHAPES = {"digits": (1, 8, 8), "cifar10": (3, 32, 32), "mnist": (1, 28, 28)}

MNIST_NUM_VAL = 5000
# The t10k-only split: val and test are carved out stratified, train is the rest.
MNIST_TEST_ONLY_VAL = 1000
MNIST_TEST_ONLY_TEST = 3000

_DIGITS_NUM_VAL = 300
_DIGITS_NUM_TEST = 300
_DIGITS_IMAGES = 1797
# The official releases' sizes: (training images, test images).
_RELEASE_SIZES = {"cifar10": (50_000, 10_000), "mnist": (60_000, 10_000)}
NUM_CLASSES = {"digits": 10, "cifar10": 10, "mnist": 10}

_MAX_SEED = 2**32 - 1  # scikit-learn's random_state limit

# Independent random streams per choice, so that changing num_test, say, leaves
# the training subset unchanged.
_STREAM_TRAIN, _STREAM_VAL, _STREAM_TEST, _STREAM_CARVE_VAL = range(4)

_log = logging.getLogger("cnncore.data")


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


def load_dataset(
    name: str,
    *,
    num_train: int | None = None,
    num_val: int | None = None,
    num_test: int | None = None,
    dtype="float64",
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> dict:
    """Load, split, subsample and mean-centre a dataset for the Solver.

    name: one of KNOWN_DATASETS.
    num_train, num_val, num_test: how many images each split keeps, a seeded
        random subset of the split; None keeps the whole split. For digits the
        splits hold 1,197 / 300 / 300 images. For cifar10 and mnist with its
        training files, num_val images (default 1,000 and 5,000) are taken out
        of the training images (stratified by class for mnist) and the training
        split is the rest; the test split holds 10,000. For mnist from the t10k
        files only, the splits hold 6,000 / 1,000 / 3,000 images.
    dtype: "float32" or "float64", the dtype of every X and of mean.
    seed: int in 0..2**32-1; the same seed gives the same splits and subsets.
    data_dir: cifar10 and mnist cache directory (else $CNNCORE_DATA_DIR, else
        ~/.cache/cnncore). Unused by digits.
    download: cifar10 and mnist; when False missing files raise (cifar10, the
        t10k files of mnist) or are done without (mnist's training files)
        instead of being downloaded.

    Returns a dict with X_train, y_train, X_val, y_val, X_test, y_test as
    (N, C, H, W) arrays of `dtype` and (N,) int64 arrays, class_names (list of
    str), mean ((C,) array of `dtype`, already subtracted from every X) and
    description (str), also logged at INFO on the "cnncore.data" logger.

    Raises ValueError for a bad argument, DatasetUnavailableError when a dataset
    is neither on disk nor downloadable, CorruptDatasetError for a bad file.
    """
    if name not in KNOWN_DATASETS:
        raise ValueError(f"name must be one of {KNOWN_DATASETS}, got {name!r}")
    dtype = require_float_dtype("dtype", dtype)
    seed = require_int("seed", seed, minimum=0, maximum=_MAX_SEED)
    for arg, count in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        _check_count(arg, count)

    if name == "digits":
        splits, class_names, description = _digits_splits(seed)
    elif name == "cifar10":
        splits, class_names, description = _cifar10_splits(num_val, seed, data_dir, download)
    else:
        splits, class_names, description = _mnist_splits(num_val, seed, data_dir, download)
    split_sizes = _sizes(splits)
    # Where num_val already chose the validation split's size (cifar10, mnist
    # with its training files), subsampling it to num_val keeps it whole.
    for split, count, stream in (("train", num_train, _STREAM_TRAIN), ("val", num_val, _STREAM_VAL),
                                 ("test", num_test, _STREAM_TEST)):
        splits[split] = _subsample(splits[split], count, f"num_{split}", seed, stream)
    if _sizes(splits) != split_sizes:
        description += f"; seeded random subsets kept (train/val/test): {_sizes(splits)}"

    data = _centre(splits, np.dtype(dtype))
    data["class_names"] = class_names
    data["description"] = description
    _log.info(description)
    return data


def split_sizes(name: str, *, num_val: int | None = None,
                data_dir: str | os.PathLike | None = None) -> tuple[int, int, int]:
    """(train, val, test): how many images load_dataset(name, num_val=num_val) splits the dataset into,
    before num_train, num_val and num_test take their subsets; from the official releases' sizes,
    without reading an image, so that a count too big for the data is refused before any work.

    mnist counts the t10k-only split (6,000 / 1,000 / 3,000) when the data folder holds the two
    t10k files but not the training files, else the full release's; cifar10 the full release's.
    Both are what the official files give (smaller files of one's own are checked when loaded).
    Raises ValueError naming num_val when it cannot be carved out of the training images.
    """
    if name not in KNOWN_DATASETS:
        raise ValueError(f"name must be one of {KNOWN_DATASETS}, got {name!r}")
    _check_count("num_val", num_val)
    if name == "digits":
        return _DIGITS_IMAGES - _DIGITS_NUM_VAL - _DIGITS_NUM_TEST, _DIGITS_NUM_VAL, _DIGITS_NUM_TEST
    if name == "mnist" and mnist_test_only(data_dir):
        num_test = MNIST_TEST_ONLY_TEST
        return _RELEASE_SIZES["mnist"][1] - MNIST_TEST_ONLY_VAL - num_test, MNIST_TEST_ONLY_VAL, num_test
    n_all, n_test = _RELEASE_SIZES[name]
    carved = num_val if num_val is not None else (CIFAR10_NUM_VAL if name == "cifar10" else MNIST_NUM_VAL)
    keep = 1 if name == "cifar10" else NUM_CLASSES[name]  # training images that must stay (one per class)
    _check_count("num_val", carved, n_all - keep, f" (the {n_all:,} {name} training images, {keep} kept for training)")
    return n_all - carved, carved, n_test


def mnist_test_only(data_dir: str | os.PathLike | None = None) -> bool:
    """Whether <data_dir>/mnist holds the t10k files (raw or .gz) but not both training files: load_dataset
    then splits the 10,000 t10k images (unless a download brings the training files)."""
    from .mnist import MNIST_TEST_IMAGES, MNIST_TEST_LABELS, MNIST_TRAIN_IMAGES, MNIST_TRAIN_LABELS

    folder = resolve_data_dir(data_dir) / MNIST_DIRNAME

    def present(file: str) -> bool:
        return (folder / file).is_file() or (folder / f"{file}.gz").is_file()

    return (present(MNIST_TEST_IMAGES) and present(MNIST_TEST_LABELS)
            and not (present(MNIST_TRAIN_IMAGES) and present(MNIST_TRAIN_LABELS)))


# --------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------


def _check_count(arg: str, count, available: int | None = None, what: str = "", at_least: int = 1) -> None:
    """count must be None or a positive int in at_least..available (when given)."""
    if require_int(arg, count, minimum=1, optional=True) is None:
        return
    if count < at_least:
        raise ValueError(f"{arg} must be at least {at_least}{what}, got {count}")
    if available is not None and count > available:
        raise ValueError(f"{arg} must be at most {available}{what}, got {count}")


# --------------------------------------------------------------------------
# Splitting, subsampling, centring
# --------------------------------------------------------------------------


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([stream, seed])


def _choose(available: int, count: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a random `count`-subset of range(available); all if count is None."""
    if count is None:
        return np.arange(available)
    return np.sort(rng.choice(available, size=count, replace=False))


def _subsample(split, count, arg: str, seed: int, stream: int):
    """split: (X, y) with N images. Returns a seeded random `count`-subset (X[idx], y[idx])."""
    X, y = split
    _check_count(arg, count, len(y), f" (the split holds {len(y)} images)")
    idx = _choose(len(y), count, _rng(seed, stream))
    return X[idx], y[idx]


def _stratified_carve(X, y, count: int, seed: int):
    """((X_rest, y_rest), (X_out, y_out)): `count` images taken out of (X, y), stratified by class."""
    rest, out = stratified_carve_indices(y, count, seed)  # train_test_split's, remembered on disk
    return (X[rest], y[rest]), (X[out], y[out])


def _centre(splits: dict, dtype: np.dtype) -> dict:
    """Convert every split to `dtype` and subtract the training split's per-channel mean.

    splits: {"train"|"val"|"test": (X, y)} with X of shape (N, C, H, W).
    Returns {"X_train", "y_train", ..., "mean"}; mean has shape (C,).
    """
    # Accumulate in float64 so a float32 request does not lose precision over
    # ~50M CIFAR-10 pixels; only the result is cast.
    mean = splits["train"][0].mean(axis=(0, 2, 3), dtype=np.float64).astype(dtype)
    data = {"mean": mean}
    for split, (X, y) in splits.items():
        data[f"X_{split}"] = X.astype(dtype) - mean[None, :, None, None]
        data[f"y_{split}"] = np.asarray(y, dtype=np.int64)
    return data


def _sizes(splits: dict) -> str:
    return "/".join(f"{len(splits[s][1]):,}" for s in ("train", "val", "test"))


# --------------------------------------------------------------------------
# The datasets: each gives its splits as {"train"|"val"|"test": (X, y)}
# with raw intensities, its class names and its description.
# --------------------------------------------------------------------------


def _stratified_three_ways(X, y, num_val: int, num_test: int, seed: int) -> dict:
    """{"train", "val", "test": (X, y)}: num_test images carved off stratified by class, then num_val."""
    rest, test = _stratified_carve(X, y, num_test, seed)
    train, val = _stratified_carve(*rest, num_val, seed)
    return {"train": train, "val": val, "test": test}


def _digits_splits(seed: int):
    """scikit-learn's 8x8 digits split stratified by class into train/val/test.

    X has shape (N, 1, 8, 8) float64 in 0..16 and y int64; N is 1,197 / 300 / 300.
    """
    images, y, target_names = bundled_digits()
    X = images[:, None, :, :]
    splits = _stratified_three_ways(X, y, _DIGITS_NUM_VAL, _DIGITS_NUM_TEST, seed)
    text = f"scikit-learn's 8x8 digits ({len(y):,} images) split stratified {_sizes(splits)} with seed {seed}"
    return splits, [str(label) for label in target_names], text


def _cifar10_splits(num_val, seed: int, data_dir, download: bool):
    """CIFAR-10 with num_val images (default 1,000) taken at random out of the training batches."""
    X_all, y_all, X_test, y_test, class_names, root = load_cifar10(data_dir, download)
    num_val = CIFAR10_NUM_VAL if num_val is None else num_val
    n_all = len(y_all)
    # At least one image must stay in the training split.
    _check_count("num_val", num_val, n_all - 1, f" ({n_all} CIFAR-10 training images, one stays for training)")
    is_val = np.zeros(n_all, dtype=bool)
    is_val[_choose(n_all, num_val, _rng(seed, _STREAM_CARVE_VAL))] = True
    splits = {
        "train": (X_all[~is_val], y_all[~is_val]),
        "val": (X_all[is_val], y_all[is_val]),
        "test": (X_test, y_test),
    }
    text = (f"CIFAR-10 binary release from {root}: the {n_all:,} training images minus a random "
            f"validation split of {num_val:,} with seed {seed}, test = the {len(y_test):,} test images "
            f"({_sizes(splits)})")
    return splits, class_names, text


def _mnist_splits(num_val, seed: int, data_dir, download: bool):
    """MNIST: the training files minus a stratified validation split, or the t10k files split three ways."""
    found = load_mnist(data_dir, download=download)
    *others, last = [path.name for path in found.files]
    names = f"{', '.join(others)} and {last}"
    if found.X_train is None:
        splits = _stratified_three_ways(found.X_test, found.y_test, MNIST_TEST_ONLY_VAL, MNIST_TEST_ONLY_TEST, seed)
        text = (f"MNIST test set only ({names}, {len(found.y_test):,} images) split stratified "
                f"{_sizes(splits)} with seed {seed}: {found.note}")
        return splits, list(MNIST_CLASS_NAMES), text

    num_val = MNIST_NUM_VAL if num_val is None else num_val
    n_all, n_classes = len(found.y_train), len(np.unique(found.y_train))
    # A stratified split needs at least one image of every class on each side.
    what = f" ({n_all:,} MNIST training images in {n_classes} classes, split stratified)"
    _check_count("num_val", num_val, n_all - n_classes, what, at_least=n_classes)
    train, val = _stratified_carve(found.X_train, found.y_train, num_val, seed)
    splits = {"train": train, "val": val, "test": (found.X_test, found.y_test)}
    text = (f"MNIST ({names}): the {n_all:,} training images minus a stratified validation split of "
            f"{num_val:,} with seed {seed}, test = the {len(found.y_test):,} t10k images ({_sizes(splits)})")
    return splits, list(MNIST_CLASS_NAMES), text
