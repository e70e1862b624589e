"""Datasets for the Solver, as CS231n prepares them.

`load_dataset(name, ...)` returns the Solver's data dict:

    X_train, X_val, X_test: (N, C, H, W) float arrays (float32 or float64)
    y_train, y_val, y_test: (N,) int64 labels in 0..num_classes-1
    class_names:            list of str, class_names[k] names label k
    mean:                   (C,) per-channel mean of the raw training images

Preprocessing is the CS231n one: convert to float, then subtract the per-channel
mean computed on the (subsampled) training split only, from every split. The raw
intensity scale is kept (digits 0..16, CIFAR-10 0..255), so X + mean[:, None, None]
gives back the raw pixels.

Two datasets:

- "digits": scikit-learn's bundled 8x8 handwritten digits (1,797 images, works
  offline), shape (N, 1, 8, 8), split stratified by class into 1,197 / 300 / 300.
- "cifar10": the official binary release, (N, 3, 32, 32). It is downloaded once
  into the cache directory (the `data_dir` argument, else $CNNCORE_DATA_DIR, else
  ~/.cache/cnncore), checked against its md5, extracted with every member path
  checked, and parsed from raw bytes with NumPy (never unpickled). The validation
  split is a seeded random 1,000 images taken out of the 50,000 training images.

Every random choice derives from `seed`, so the same call gives the same arrays.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

KNOWN_DATASETS = ("digits", "cifar10")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR10_DIRNAME = "cifar-10-batches-bin"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
CIFAR10_META_FILE = "batches.meta.txt"
CIFAR10_NUM_VAL = 1000

DATA_DIR_ENV = "CNNCORE_DATA_DIR"

_CIFAR10_IMAGE_SHAPE = (3, 32, 32)  # channels (R, G, B), rows, columns
_CIFAR10_NUM_CLASSES = 10
_CIFAR10_RECORD_BYTES = 1 + int(np.prod(_CIFAR10_IMAGE_SHAPE))  # label byte + pixels

_DIGITS_NUM_VAL = 300
_DIGITS_NUM_TEST = 300

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_MAX_SEED = 2**32 - 1  # scikit-learn's random_state limit

# Independent random streams per choice, so that changing num_test, say, leaves
# the training subset unchanged.
_STREAM_TRAIN, _STREAM_VAL, _STREAM_TEST, _STREAM_CARVE_VAL = range(4)

_DOWNLOAD_CHUNK = 1 << 20


class DatasetUnavailableError(RuntimeError):
    """The dataset's files are not on disk and could not be downloaded."""


class CorruptDatasetError(ValueError):
    """A dataset file is present but wrong: bad checksum, truncated, bad labels,
    or an archive member that would land outside the target directory."""


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
        splits hold 1,197 / 300 / 300 images. For cifar10, num_val images
        (default 1,000) are taken out of the 50,000 training images and the
        training split is the rest; the test split holds 10,000.
    dtype: "float32" or "float64", the dtype of every X and of mean.
    seed: non-negative int; the same seed gives the same splits and subsets.
    data_dir: cifar10 cache directory (else $CNNCORE_DATA_DIR, else
        ~/.cache/cnncore). Unused by digits.
    download: cifar10 only; when False a missing dataset raises instead of
        being downloaded.

    Returns a dict with X_train, y_train, X_val, y_val, X_test, y_test as
    (N, C, H, W) arrays of `dtype` and (N,) int64 arrays, class_names (list of
    str) and mean ((C,) array of `dtype`, already subtracted from every X).

    Raises ValueError for a bad argument, DatasetUnavailableError when cifar10
    is neither on disk nor downloadable, CorruptDatasetError for a bad file.
    """
    _check_name(name)
    dtype = _check_dtype(dtype)
    seed = _check_seed(seed)
    for arg, count in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        _check_count(arg, count)

    if name == "digits":
        splits, class_names = _digits_splits(seed)
        splits["val"] = _subsample(splits["val"], num_val, "num_val", seed, _STREAM_VAL)
    else:
        splits, class_names = _cifar10_splits(num_val, seed, data_dir, download)
    splits["train"] = _subsample(splits["train"], num_train, "num_train", seed, _STREAM_TRAIN)
    splits["test"] = _subsample(splits["test"], num_test, "num_test", seed, _STREAM_TEST)

    data = _centre(splits, dtype)
    data["class_names"] = class_names
    return data


# --------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------


def _check_name(name):
    if name not in KNOWN_DATASETS:
        raise ValueError(f"name must be one of {KNOWN_DATASETS}, got {name!r}")


def _check_dtype(dtype) -> np.dtype:
    # np.dtype(None) is float64 and np.dtype(...) == None is True, so None is
    # caught here before NumPy can quietly turn it into float64.
    try:
        resolved = None if dtype is None else np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return resolved


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_seed(seed) -> int:
    if not _is_int(seed) or not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed must be an int in 0..{_MAX_SEED}, got {seed!r}")
    return int(seed)


def _check_count(arg: str, count, available: int | None = None, what: str = "") -> None:
    """count must be None or a positive int, and no more than `available` when given."""
    if count is None:
        return
    if not _is_int(count) or count < 1:
        raise ValueError(f"{arg} must be a positive int or None, got {count!r}")
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


# --------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------


def _digits_splits(seed: int):
    """scikit-learn's 8x8 digits split stratified by class into train/val/test.

    Returns ({"train"|"val"|"test": (X, y)}, class_names) with X of shape
    (N, 1, 8, 8) float64 in 0..16 and y int64; N is 1,197 / 300 / 300.
    """
    digits = load_digits()
    X = digits.images[:, None, :, :]
    y = digits.target.astype(np.int64)
    X_rest, X_test, y_rest, y_test = train_test_split(
        X, y, test_size=_DIGITS_NUM_TEST, stratify=y, random_state=seed
    )
    X_train, X_val, y_train, y_val = train_test_split(
        X_rest, y_rest, test_size=_DIGITS_NUM_VAL, stratify=y_rest, random_state=seed
    )
    splits = {"train": (X_train, y_train), "val": (X_val, y_val), "test": (X_test, y_test)}
    return splits, [str(label) for label in digits.target_names]


# --------------------------------------------------------------------------
# CIFAR-10: cache directory, download, extraction, parsing
# --------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: data_dir if given, else $CNNCORE_DATA_DIR, else ~/.cache/cnncore."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or Path.home() / ".cache" / "cnncore"
    return Path(data_dir).expanduser()


def _cifar10_splits(num_val, seed: int, data_dir, download: bool):
    """CIFAR-10 as {"train"|"val"|"test": (X, y)} uint8/int64 arrays, plus class names.

    num_val images (default 1,000) are taken at random out of the training
    batches; the rest form the training split.
    """
    root = _ensure_cifar10(data_dir, download)
    X_all, y_all, X_test, y_test = load_cifar10_batches(root)
    class_names = load_cifar10_class_names(root)

    num_val = CIFAR10_NUM_VAL if num_val is None else num_val
    n_all = len(y_all)
    # At least one image must stay in the training split.
    what = f" ({n_all} CIFAR-10 training images, one stays for training)"
    _check_count("num_val", num_val, n_all - 1, what)
    is_val = np.zeros(n_all, dtype=bool)
    is_val[_choose(n_all, num_val, _rng(seed, _STREAM_CARVE_VAL))] = True
    splits = {
        "train": (X_all[~is_val], y_all[~is_val]),
        "val": (X_all[is_val], y_all[is_val]),
        "test": (X_test, y_test),
    }
    return splits, class_names


def _cifar10_required_files():
    return (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE, CIFAR10_META_FILE)


def _ensure_cifar10(data_dir, download: bool) -> Path:
    """The extracted CIFAR-10 directory, downloading it first when allowed and needed."""
    cache = resolve_data_dir(data_dir)
    root = cache / CIFAR10_DIRNAME
    missing = [name for name in _cifar10_required_files() if not (root / name).is_file()]
    if not missing:
        return root
    if not download:
        raise DatasetUnavailableError(
            _unavailable_message(root, f"{root / missing[0]} is missing and download=False")
        )
    # Module constants read at call time, so tests can point them at a local archive.
    return download_cifar10(cache, url=CIFAR10_URL, md5=CIFAR10_MD5)


def _unavailable_message(root: Path, problem: str, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5) -> str:
    """Where the files were looked for, what went wrong, and how to place them by hand."""
    cache = root.parent
    return (
        f"CIFAR-10 is not available: {problem}.\n"
        f"Looked for the extracted files in {root}.\n"
        f"To place them by hand, download {url} (md5 {md5}) on a machine with "
        f"network access and run\n"
        f"    tar -xzf {CIFAR10_ARCHIVE} -C {cache}\n"
        f"so that {root / CIFAR10_TRAIN_FILES[0]} exists; or point data_dir= or "
        f"${DATA_DIR_ENV} at a directory that already holds {CIFAR10_DIRNAME}/."
    )


def download_cifar10(
    data_dir: str | os.PathLike | None = None,
    *,
    url: str = CIFAR10_URL,
    md5: str = CIFAR10_MD5,
    progress: bool = True,
) -> Path:
    """Download, verify and extract the CIFAR-10 binary archive into the cache directory.

    data_dir: cache directory (see resolve_data_dir); created if absent.
    url, md5: where to fetch the archive and its expected md5 hex digest.
    progress: show a tqdm progress bar while downloading.

    An archive already in the cache with the right md5 is reused. The download
    goes to a temporary file that is renamed only once its md5 matches, so a
    failed or bad download leaves nothing behind. Returns the extracted
    directory, data_dir / "cifar-10-batches-bin".

    Raises DatasetUnavailableError when the download fails, CorruptDatasetError
    when the md5 does not match or an archive member is unsafe to extract.
    """
    cache = resolve_data_dir(data_dir)
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / CIFAR10_ARCHIVE
    if not (archive.is_file() and _md5(archive) == md5):
        _fetch_verified(url, archive, md5, progress)
    _safe_extract(archive, cache)
    return cache / CIFAR10_DIRNAME


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_DOWNLOAD_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_verified(url: str, dest: Path, md5: str, progress: bool) -> None:
    """Download url to dest through a temporary file in dest's directory; rename only if md5 matches."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _stream(url, out, progress)
        actual = _md5(tmp)
        if actual != md5:
            raise CorruptDatasetError(
                f"{url} downloaded with md5 {actual}, expected {md5}; the file was "
                f"removed. Try again, or place the archive by hand as {dest}."
            )
        os.replace(tmp, dest)
    except OSError as exc:  # urllib.error.URLError is an OSError too
        raise DatasetUnavailableError(
            _unavailable_message(dest.parent / CIFAR10_DIRNAME, f"downloading {url} failed ({exc})", url, md5)
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)


def _stream(url: str, out, progress: bool) -> None:
    """Copy the body at url into the open binary file `out`, with a progress bar."""
    with urllib.request.urlopen(url, timeout=60) as response:
        total = response.headers.get("Content-Length")
        with tqdm(
            total=int(total) if total else None,
            unit="B",
            unit_scale=True,
            desc=f"Downloading {CIFAR10_ARCHIVE}",
            disable=not progress,
        ) as bar:
            for chunk in iter(lambda: response.read(_DOWNLOAD_CHUNK), b""):
                out.write(chunk)
                bar.update(len(chunk))


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract a .tar.gz into dest after checking every member before writing any.

    Only regular files and directories whose paths stay inside dest are
    accepted; anything else (`../` paths, absolute paths, links, devices)
    raises CorruptDatasetError and nothing is extracted.
    """
    dest = dest.resolve()
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for member in members:
            _check_member(member, archive, dest)
        # The "data" filter (Python >= 3.11.4) re-checks the same and drops
        # unsafe permission bits; our own check above covers older versions.
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **extra)


def _check_member(member: tarfile.TarInfo, archive: Path, dest: Path) -> None:
    target = (dest / member.name).resolve()
    if not (member.isfile() or member.isdir()):
        problem = "is not a regular file or directory"
    elif not target.is_relative_to(dest):
        problem = f"would be extracted outside {dest}"
    else:
        return
    raise CorruptDatasetError(f"{archive}: refusing to extract member {member.name!r}, which {problem}")


def load_cifar10_batches(root: str | os.PathLike):
    """Parse the CIFAR-10 binary batches in root (a "cifar-10-batches-bin" directory).

    Each .bin file is a sequence of 3,073-byte records: one label byte (0..9),
    then 3,072 pixel bytes: the 1,024 red, then 1,024 green, then 1,024 blue
    values of a 32x32 image, each plane row-major. Files may hold any whole
    number of records.

    Returns (X_train, y_train, X_test, y_test): X_train (N_train, 3, 32, 32) and
    X_test (N_test, 3, 32, 32) uint8, channels in R, G, B order; y_train
    (N_train,) and y_test (N_test,) int64. The training arrays are
    data_batch_1..5 concatenated in order (50,000 images in the official files).

    Raises DatasetUnavailableError for a missing file, CorruptDatasetError for a
    truncated file or a label byte above 9.
    """
    root = Path(root)
    batches = [_read_cifar10_batch(root / name) for name in CIFAR10_TRAIN_FILES]
    X_train = np.concatenate([X for X, _ in batches])
    y_train = np.concatenate([y for _, y in batches])
    X_test, y_test = _read_cifar10_batch(root / CIFAR10_TEST_FILE)
    return X_train, y_train, X_test, y_test


def load_cifar10_class_names(root: str | os.PathLike) -> list[str]:
    """The 10 class names from root/batches.meta.txt, one per line; index k names label k."""
    path = Path(root) / CIFAR10_META_FILE
    _require_file(path)
    names = [line.strip() for line in path.read_text(encoding="ascii").splitlines() if line.strip()]
    if len(names) != _CIFAR10_NUM_CLASSES:
        raise CorruptDatasetError(
            f"{path} is corrupt: expected {_CIFAR10_NUM_CLASSES} class names, found {len(names)}"
        )
    return names


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DatasetUnavailableError(_unavailable_message(path.parent, f"{path} is missing"))


def _read_cifar10_batch(path: Path):
    """One binary batch file -> (X, y): X (N, 3, 32, 32) uint8, y (N,) int64."""
    _require_file(path)
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    if raw.size == 0 or raw.size % _CIFAR10_RECORD_BYTES:
        raise CorruptDatasetError(
            f"{path} is truncated: {raw.size} bytes is not a positive whole number "
            f"of {_CIFAR10_RECORD_BYTES}-byte records; delete it and download again"
        )
    records = raw.reshape(-1, _CIFAR10_RECORD_BYTES)
    y = records[:, 0].astype(np.int64)
    bad = np.flatnonzero(y >= _CIFAR10_NUM_CLASSES)
    if bad.size:
        raise CorruptDatasetError(
            f"{path} is corrupt: record {bad[0]} has label byte {y[bad[0]]}, "
            f"expected 0..{_CIFAR10_NUM_CLASSES - 1}; delete it and download again"
        )
    # copy(): frombuffer views the read-only bytes; callers get their own array.
    X = records[:, 1:].reshape(-1, *_CIFAR10_IMAGE_SHAPE).copy()
    return X, y
