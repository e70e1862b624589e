"""Stratified splits and the bundled digits, remembered on disk so that scikit-learn is imported once.

scikit-learn makes the stratified splits (``train_test_split``) and holds the digits,
and importing it costs 1-2 s on an idle 2-core machine (it imports SciPy's statistics):
in every process that loads the digits or the t10k-only MNIST split, a sweep's own and
its workers' alike, before its first trial. Its results are the same for the same
inputs and scikit-learn version, so the first process to compute one writes it to a
small ``.npz`` file and the others read it back, to the bit:

- ``stratified_carve_indices(y, count, seed)``: the indices ``train_test_split(...,
  test_size=count, stratify=y, random_state=seed)`` keeps and takes out, keyed by a
  digest of y, count, seed and scikit-learn's version;
- ``bundled_digits()``: ``sklearn.datasets.load_digits``'s images, targets and target
  names, keyed by scikit-learn's version.

The files live under $XDG_CACHE_HOME (else ~/.cache)/cnncore/splits. They are read
with ``allow_pickle=False`` and checked (shapes, dtypes, and that the indices split
range(len(y)) in two); a file that fails is computed again and replaced. A folder that
cannot be written only costs the time: the result is computed as before. Files are
written whole (a temporary file renamed), so processes that race on one read either
nothing or all of it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np

_log = logging.getLogger("cnncore.data")

# What a cached file may fail with when it is read: cut short, not an npz, a key missing or an object array.
_UNREADABLE = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnncore" / "splits"


def _sklearn_version() -> str:
    return metadata.version("scikit-learn")  # read from its metadata: no import


def stratified_carve_indices(y: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, out): int64 indices of the images that ``train_test_split`` keeps and takes out when
    it carves `count` images out of labels y (N,), stratified by class, with random_state seed;
    X[rest], X[out] are its two parts of X, in its order."""
    y = np.ascontiguousarray(y)
    digest = hashlib.sha256(y.dtype.str.encode() + y.tobytes()).hexdigest()[:20]
    name = f"stratified-{digest}-n{len(y)}-count{count}-seed{seed}-sklearn{_sklearn_version()}.npz"

    def compute() -> dict:
        from sklearn.model_selection import train_test_split  # ~1 s to import: only when not cached

        rest, out = train_test_split(np.arange(len(y)), test_size=count, stratify=y, random_state=seed)
        return {"rest": rest.astype(np.int64), "out": out.astype(np.int64)}

    def valid(found: dict) -> bool:
        rest, out = found["rest"], found["out"]
        if rest.dtype != np.int64 or out.dtype != np.int64 or len(out) != count or len(rest) != len(y) - count:
            return False
        seen = np.zeros(len(y), dtype=bool)
        both = np.concatenate([rest, out])
        if both.size and (both.min() < 0 or both.max() >= len(y)):
            return False
        seen[both] = True
        return bool(seen.all())

    found = _remembered(name, compute, valid)
    return found["rest"], found["out"]


def bundled_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float64, target (1797,) int64, target_names (10,) int64): scikit-learn's
    bundled digits, as ``load_digits`` returns them."""
    name = f"digits-sklearn{_sklearn_version()}.npz"

    def compute() -> dict:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return {"images": np.asarray(digits.images, dtype=np.float64),
                "target": np.asarray(digits.target, dtype=np.int64),
                "target_names": np.asarray(digits.target_names, dtype=np.int64)}

    def valid(found: dict) -> bool:
        images, target = found["images"], found["target"]
        return (images.dtype == np.float64 and images.ndim == 3 and images.shape[1:] == (8, 8)
                and target.dtype == np.int64 and target.shape == (len(images),)
                and found["target_names"].dtype == np.int64)

    found = _remembered(name, compute, valid)
    return found["images"], found["target"], found["target_names"]


def _remembered(name: str, compute, valid) -> dict:
    """The arrays of cache_dir()/name when it reads back valid, else compute()'s, written there."""
    path = cache_dir() / name
    try:
        with np.load(path, allow_pickle=False) as stored:
            found = {key: stored[key] for key in stored.files}
        if valid(found):
            return found
        _log.debug("the cached %s is not what it should be: computing it again", path)
    except FileNotFoundError:
        pass
    except _UNREADABLE as exc:
        _log.debug("the cached %s cannot be read (%s): computing it again", path, exc)
    found = compute()
    _write(path, found)
    return found


def _write(path: Path, arrays: dict) -> None:
    """Save arrays to path whole (a temporary file in the same folder, then renamed); a folder that
    cannot be written is passed over."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez(file, **arrays)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as exc:
        _log.debug("the split cache %s cannot be written (%s): it is computed each time", path, exc)
