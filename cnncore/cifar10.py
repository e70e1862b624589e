"""CIFAR-10: the official binary release, downloaded, verified, extracted and parsed.

The archive `cifar-10-binary.tar.gz` is downloaded once into the cache directory
(the `data_dir` argument, else $CNNCORE_DATA_DIR, else ~/.cache/cnncore), checked
against its published md5, extracted with every member path checked, and parsed
from raw bytes with NumPy (never unpickled). `load_cifar10` returns the raw
uint8 images; splitting and centring are cnncore.data's.

To use a copy of your own: `tar -xzf cifar-10-binary.tar.gz -C <data_dir>`, so
that <data_dir>/cifar-10-batches-bin/data_batch_1.bin exists.
"""

from __future__ import annotations

import gzip
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np

from .download import (
    CorruptDatasetError,
    DatasetUnavailableError,
    DownloadError,
    content_md5,
    fetch_verified,
    resolve_data_dir,
    unavailable_message,
)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR10_DIRNAME = "cifar-10-batches-bin"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
CIFAR10_META_FILE = "batches.meta.txt"
CIFAR10_NUM_VAL = 1000

_IMAGE_SHAPE = (3, 32, 32)  # channels (R, G, B), rows, columns
_NUM_CLASSES = 10
_RECORD_BYTES = 1 + int(np.prod(_IMAGE_SHAPE))  # label byte + pixels


def load_cifar10(data_dir: str | os.PathLike | None = None, download: bool = True):
    """The whole CIFAR-10 release, downloading it first when allowed and needed.

    Returns (X_train, y_train, X_test, y_test, class_names, root): the arrays of
    load_cifar10_batches, the 10 class names and the extracted directory.
    """
    root = _ensure_cifar10(data_dir, download)
    return (*load_cifar10_batches(root), load_cifar10_class_names(root), root)


def _ensure_cifar10(data_dir, download: bool) -> Path:
    """The extracted CIFAR-10 directory, downloading it first when allowed and needed."""
    cache = resolve_data_dir(data_dir)
    root = cache / CIFAR10_DIRNAME
    required = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE, CIFAR10_META_FILE)
    missing = [name for name in required if not (root / name).is_file()]
    if not missing:
        return root
    if not download:
        raise DatasetUnavailableError(_unavailable_message(root, f"{root / missing[0]} is missing and download=False"))
    # Module constants read at call time, so tests can point them at a local archive.
    return download_cifar10(cache, url=CIFAR10_URL, md5=CIFAR10_MD5)


def _unavailable_message(root: Path, problem: str, url: str | None = None, md5: str | None = None) -> str:
    """Where the files were looked for, what went wrong, and how to place them by hand."""
    url, md5 = url or CIFAR10_URL, md5 or CIFAR10_MD5
    how = (f"download {url} (md5 {md5}) on a machine with network access and run\n"
           f"    tar -xzf {CIFAR10_ARCHIVE} -C {root.parent}\n"
           f"so that {root / CIFAR10_TRAIN_FILES[0]} exists")
    return unavailable_message("CIFAR-10", problem, root, how)


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
    if not (archive.is_file() and content_md5(archive) == md5):
        try:
            fetch_verified(url, archive, md5, progress=progress)
        except DownloadError as exc:
            raise DatasetUnavailableError(
                _unavailable_message(cache / CIFAR10_DIRNAME, f"downloading {url} failed ({exc})", url, md5)
            ) from exc
    _safe_extract(archive, cache)
    return cache / CIFAR10_DIRNAME


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract a .tar.gz into dest after checking every member before writing any.

    Only regular files and directories whose paths stay inside dest are
    accepted; anything else (`../` paths, absolute paths, links, devices)
    raises CorruptDatasetError and nothing is extracted.
    """
    dest = dest.resolve()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, archive, dest)
            # The "data" filter (Python >= 3.11.4) re-checks the same and drops
            # unsafe permission bits; our own check above covers older versions.
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=members, **extra)
    except (EOFError, tarfile.ReadError, zlib.error, gzip.BadGzipFile) as exc:
        # A gzip stream cut short, or bytes that are not a tar.gz at all.
        raise CorruptDatasetError(f"{archive} is truncated or corrupt and cannot be extracted "
                                  f"({type(exc).__name__}: {exc}); delete it and download again") from exc


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
    batches = [_read_batch(root / name) for name in CIFAR10_TRAIN_FILES]
    X_train = np.concatenate([X for X, _ in batches])
    y_train = np.concatenate([y for _, y in batches])
    X_test, y_test = _read_batch(root / CIFAR10_TEST_FILE)
    return X_train, y_train, X_test, y_test


def load_cifar10_class_names(root: str | os.PathLike) -> list[str]:
    """The 10 class names from root/batches.meta.txt, one per line; index k names label k."""
    path = Path(root) / CIFAR10_META_FILE
    _require_file(path)
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError as exc:
        raise CorruptDatasetError(f"{path} is corrupt: the official file holds ASCII class names, but byte "
                                  f"{exc.start} is {exc.object[exc.start]:#04x}; delete it and download again") from exc
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != _NUM_CLASSES:
        raise CorruptDatasetError(f"{path} is corrupt: expected {_NUM_CLASSES} class names, found {len(names)}")
    return names


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DatasetUnavailableError(_unavailable_message(path.parent, f"{path} is missing"))


def _read_batch(path: Path):
    """One binary batch file -> (X, y): X (N, 3, 32, 32) uint8, y (N,) int64."""
    _require_file(path)
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    if raw.size == 0 or raw.size % _RECORD_BYTES:
        raise CorruptDatasetError(
            f"{path} is truncated: {raw.size} bytes is not a positive whole number "
            f"of {_RECORD_BYTES}-byte records; delete it and download again"
        )
    records = raw.reshape(-1, _RECORD_BYTES)
    y = records[:, 0].astype(np.int64)
    bad = np.flatnonzero(y >= _NUM_CLASSES)
    if bad.size:
        raise CorruptDatasetError(
            f"{path} is corrupt: record {bad[0]} has label byte {y[bad[0]]}, "
            f"expected 0..{_NUM_CLASSES - 1}; delete it and download again"
        )
    # copy(): frombuffer views the read-only bytes; callers get their own array.
    X = records[:, 1:].reshape(-1, *_IMAGE_SHAPE).copy()
    return X, y
