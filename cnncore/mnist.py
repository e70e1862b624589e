"""MNIST: the official IDX files, found or downloaded, verified and parsed with NumPy.

Where the files go
------------------
The loader looks in `<data_dir>/mnist/`, where data_dir is the `data_dir`
argument, else $CNNCORE_DATA_DIR, else ~/.cache/cnncore, for the four official
files, each either gzip'd (`.gz`) or decompressed:

    <data_dir>/mnist/train-images-idx3-ubyte[.gz]   60,000 training images
    <data_dir>/mnist/train-labels-idx1-ubyte[.gz]   their labels
    <data_dir>/mnist/t10k-images-idx3-ubyte[.gz]    10,000 test images
    <data_dir>/mnist/t10k-labels-idx1-ubyte[.gz]    their labels

To use a copy of your own, put the files there (`CNNCORE_DATA_DIR=/data` with
/data/mnist/train-images-idx3-ubyte.gz, ..., or `data_dir="/data"`). Files
that are absent are downloaded, when download=True and a mirror is reachable,
from MNIST_MIRRORS in turn (the one torchvision uses first, then
yann.lecun.com), as `.gz` files into the same folder. When only the two t10k
files can be found, the loader still works: cnncore.data splits those 10,000
images and says so.

What is verified
----------------
Every file, raw or gzip'd, found or downloaded, is checked twice before use:

- its digest: the md5 of its decompressed content must equal MNIST_MD5. The t10k
  digests are the ones the project's shared copy documents (its README, with
  sha256s) and that several public loaders check; the train digests
  (6bbc9ace..., a25bea73...) are the md5s of the decompressed official training
  files as published by public loaders that check decompressed files (e.g.
  pralab/secml's MNIST loader, prabhuomkar/pytorch-cpp's fetch_mnist.cmake),
  whose t10k values agree with ours. They could not be checked here against
  real training files (this project's machines have no copy). A download is
  kept only once its decompressed md5 matches. The `.gz` wrapper itself is not
  checked: its bytes depend on the compressor (torchvision's published .gz md5s,
  f68b3c2d... for the training images, fit the official archives only), and the
  content is what matters.
- its structure: the big-endian IDX header (magic 0x00000803 for images with 3
  dimensions, 0x00000801 for labels), exactly as many bytes as the header
  promises, 28x28 images, labels 0..9, as many labels as images.

Any failure raises CorruptDatasetError naming the file. Files are parsed from
bytes with NumPy, never unpickled.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import urllib.error
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .download import (
    GZIP_ERRORS,
    CorruptDatasetError,
    DatasetUnavailableError,
    DownloadError,
    fetch_verified,
    resolve_data_dir,
    unavailable_message,
)

MNIST_DIRNAME = "mnist"
MNIST_TRAIN_IMAGES = "train-images-idx3-ubyte"
MNIST_TRAIN_LABELS = "train-labels-idx1-ubyte"
MNIST_TEST_IMAGES = "t10k-images-idx3-ubyte"
MNIST_TEST_LABELS = "t10k-labels-idx1-ubyte"
MNIST_FILES = (MNIST_TRAIN_IMAGES, MNIST_TRAIN_LABELS, MNIST_TEST_IMAGES, MNIST_TEST_LABELS)
# Downloads fetch the t10k files first: they alone are enough to run.
_FETCH_ORDER = (MNIST_TEST_IMAGES, MNIST_TEST_LABELS, MNIST_TRAIN_IMAGES, MNIST_TRAIN_LABELS)

# md5 of each file's decompressed content (see the module docstring for the sources).
MNIST_MD5 = {
    MNIST_TRAIN_IMAGES: "6bbc9ace898e44ae57da46a324031adb",
    MNIST_TRAIN_LABELS: "a25bea736e30d166cdddb491f175f624",
    MNIST_TEST_IMAGES: "2646ac647ad5339dbf082846283269ea",
    MNIST_TEST_LABELS: "27ae3e4e09519cfbb04c329615203637",
}

# Tried in turn; each serves the official `<name>.gz` files.
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://yann.lecun.com/exdb/mnist/",
)

MNIST_CLASS_NAMES = tuple(str(k) for k in range(10))

_IMAGE_SHAPE = (28, 28)
_UNSIGNED_BYTE = 0x08  # the IDX type code of MNIST's values

_log = logging.getLogger("cnncore.data")


class MnistArrays(NamedTuple):
    """What load_mnist found: images (N, 1, 28, 28) uint8, labels (N,) int64.

    X_train and y_train are None when the training files are absent; `note` then
    says why (for the description of the split). files: the paths read.
    """

    X_train: np.ndarray | None
    y_train: np.ndarray | None
    X_test: np.ndarray
    y_test: np.ndarray
    folder: Path
    files: tuple[Path, ...]
    note: str


def load_mnist(data_dir: str | os.PathLike | None = None, *, download: bool = True,
               progress: bool = True) -> MnistArrays:
    """Find (or download), verify and parse the MNIST files in <data_dir>/mnist/.

    data_dir: see resolve_data_dir; download: fetch absent files from
    MNIST_MIRRORS; progress: show a progress bar while downloading.

    Returns MnistArrays. Only the two t10k files are required: without the
    training files, X_train and y_train are None and `note` says what was missing.

    Raises DatasetUnavailableError when a t10k file can be neither found nor
    downloaded (naming the folder and every URL tried with its error), and
    CorruptDatasetError naming the file for a bad digest or structure.
    """
    folder = resolve_data_dir(data_dir) / MNIST_DIRNAME
    missing = [name for name in _FETCH_ORDER if _find(folder, name) is None]
    attempts = _fetch(folder, missing, progress) if missing and download else []
    missing = [name for name in MNIST_FILES if _find(folder, name) is None]
    why = " (download=False)" if not download else " and could not be downloaded"

    missing_test = [name for name in (MNIST_TEST_IMAGES, MNIST_TEST_LABELS) if name in missing]
    if missing_test:
        problem = f"{' and '.join(missing_test)} (raw or .gz) not found{why}"
        raise DatasetUnavailableError(_unavailable_message(folder, problem, attempts))
    test_files = (_find(folder, MNIST_TEST_IMAGES), _find(folder, MNIST_TEST_LABELS))
    X_test, y_test = _read_pair(*test_files)

    if MNIST_TRAIN_IMAGES in missing or MNIST_TRAIN_LABELS in missing:
        note = f"the 60,000 training images were not found in {folder}{why}"
        return MnistArrays(None, None, X_test, y_test, folder, test_files, note)
    train_files = (_find(folder, MNIST_TRAIN_IMAGES), _find(folder, MNIST_TRAIN_LABELS))
    X_train, y_train = _read_pair(*train_files)
    return MnistArrays(X_train, y_train, X_test, y_test, folder, train_files + test_files, "")


def download_mnist(data_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Download every MNIST file absent from <data_dir>/mnist/; return that folder.

    Each file is tried on MNIST_MIRRORS in turn and kept only once the md5 of
    its decompressed content matches MNIST_MD5. Raises DatasetUnavailableError
    naming every URL tried with its error when a file could not be fetched.
    """
    folder = resolve_data_dir(data_dir) / MNIST_DIRNAME
    attempts = _fetch(folder, [name for name in _FETCH_ORDER if _find(folder, name) is None], progress)
    still_missing = [name for name in MNIST_FILES if _find(folder, name) is None]
    if still_missing:
        problem = f"{' and '.join(still_missing)} could not be downloaded"
        raise DatasetUnavailableError(_unavailable_message(folder, problem, attempts))
    return folder


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes with `ndim` dimensions (gunzipped first if it ends in .gz).

    Layout: a big-endian header, the magic number 0x0000 08 <ndim> then ndim
    uint32 sizes, then the values row-major. Returns a uint8 array of those
    sizes. Raises CorruptDatasetError naming the file for a wrong magic number,
    a file shorter or longer than the header promises, or a broken gzip stream.
    """
    path = Path(path)
    return _parse_idx(_read_bytes(path), path, ndim)


def _find(folder: Path, name: str) -> Path | None:
    """folder/name, else folder/name.gz, whichever is a file; None when neither is."""
    return next((path for path in (folder / name, folder / f"{name}.gz") if path.is_file()), None)


def _unavailable_message(folder: Path, problem: str, attempts) -> str:
    gz_names = ", ".join(f"{name}.gz" for name in MNIST_FILES)
    how = (f"download {gz_names} from {' or '.join(MNIST_MIRRORS)} "
           f"on a machine with network access and copy them, gzip'd or decompressed, into {folder} "
           f"(the two t10k files alone are enough to run)")
    return unavailable_message("MNIST", problem, folder, how, attempts)


def _fetch(folder: Path, names: list[str], progress: bool) -> list[tuple[str, str]]:
    """Download each of names as <name>.gz from the first mirror that serves it verified.

    Returns (url, error) for every try that failed. A mirror that could not be
    reached is not tried again for the later files, so an offline machine pays
    the connection timeout once per mirror, not once per file.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return [(str(folder), f"cannot create the folder ({exc})")]
    attempts, unreachable = [], set()
    for name in names:
        for mirror in MNIST_MIRRORS:
            url = f"{mirror}{name}.gz"
            if mirror in unreachable:
                attempts.append((url, "not tried: the mirror was unreachable for an earlier file"))
                continue
            try:
                fetch_verified(url, folder / f"{name}.gz", MNIST_MD5[name], gunzip=True, progress=progress)
            except (DownloadError, CorruptDatasetError) as exc:
                attempts.append((url, str(exc)))
                _log.info("MNIST: %s failed: %s", url, exc)
                if _is_unreachable(exc):
                    unreachable.add(mirror)
                continue
            _log.info("MNIST: downloaded %s into %s", url, folder)
            break
    return attempts


def _is_unreachable(exc: Exception) -> bool:
    """True when no connection was made at all (as opposed to an HTTP error or a bad file)."""
    cause = exc.__cause__
    return isinstance(cause, (urllib.error.URLError, TimeoutError)) and not isinstance(cause, urllib.error.HTTPError)


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when its name ends in .gz."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except GZIP_ERRORS as exc:
        raise CorruptDatasetError(f"{path} is not a valid gzip file ({exc}); delete it and place it again") from exc


def _read_verified(path: Path, ndim: int) -> np.ndarray:
    """Parse path (structure checks) and check its decompressed md5 against MNIST_MD5."""
    raw = _read_bytes(path)
    values = _parse_idx(raw, path, ndim)
    name = path.name.removesuffix(".gz")
    expected = MNIST_MD5[name]  # read at call time, so tests can point it at their files
    actual = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    if actual != expected:
        raise CorruptDatasetError(
            f"{path} has md5 {actual} (decompressed content), expected {expected} for the official "
            f"{name}; delete it and place the official file again"
        )
    return values


def _read_pair(images_path: Path, labels_path: Path):
    """Images (N, 1, 28, 28) uint8 and labels (N,) int64 from one verified pair of files."""
    images = _read_verified(images_path, 3)
    if images.shape[1:] != _IMAGE_SHAPE:
        rows, cols = images.shape[1:]
        raise CorruptDatasetError(f"{images_path} holds {rows}x{cols} images, expected 28x28")
    labels = _read_verified(labels_path, 1).astype(np.int64)
    bad = np.flatnonzero(labels >= len(MNIST_CLASS_NAMES))
    if bad.size:
        raise CorruptDatasetError(f"{labels_path} is corrupt: label {bad[0]} is {labels[bad[0]]}, expected 0..9")
    if len(labels) != len(images):
        raise CorruptDatasetError(
            f"{images_path} holds {len(images):,} images but {labels_path} holds {len(labels):,} labels"
        )
    # copy(): frombuffer views read-only bytes; callers get their own writable array.
    return images[:, None].copy(), labels


def _parse_idx(raw: bytes, path: Path, ndim: int) -> np.ndarray:
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise CorruptDatasetError(f"{path} is truncated: {len(raw)} bytes, shorter than its {header}-byte IDX header")
    magic, *sizes = np.frombuffer(raw, dtype=">u4", count=1 + ndim).tolist()
    expected_magic = _UNSIGNED_BYTE << 8 | ndim
    if magic != expected_magic:
        raise CorruptDatasetError(
            f"{path} has magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(unsigned bytes in {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    promised = header + math.prod(sizes)
    if len(raw) != promised:
        problem = "is truncated" if len(raw) < promised else "has extra bytes"
        raise CorruptDatasetError(
            f"{path} {problem}: {len(raw):,} bytes, its header promises {promised:,} "
            f"({' x '.join(map(str, sizes))} values after the {header}-byte header)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(sizes)
