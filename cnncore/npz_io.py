"""Reading and writing the project's .npz files (model files, Solver checkpoints) without pickle.

Both directions refuse what pickle would be needed for: object arrays are never
written, and files are always read with ``allow_pickle=False``. A file that is
missing, empty, truncated or not a zip archive raises ``NpzFileError`` naming the
file and what was wrong, rather than NumPy's or zipfile's bare exception.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np


class NpzFileError(ValueError):
    """An .npz file that cannot be read: missing, empty, truncated or corrupt."""


def read_npz(path: str | os.PathLike, what: str = "file") -> dict[str, np.ndarray]:
    """Every array of the .npz file at path, loaded into memory.

    what: how the caller names the file in errors ("checkpoint", "model file").
    Raises NpzFileError naming path when it cannot be read as an .npz archive.
    """
    path = Path(path)
    if path.is_dir():
        raise NpzFileError(f"{what} {path} is a directory, not an .npz file")
    if not path.exists():
        raise NpzFileError(f"{what} {path} does not exist")
    if not path.is_file():
        raise NpzFileError(f"{what} {path} is not a regular file (a device, a pipe or a socket), not an .npz file")
    if path.stat().st_size == 0:
        raise NpzFileError(f"{what} {path} is empty (0 bytes): it was not written completely")
    if not zipfile.is_zipfile(path):
        raise NpzFileError(f"{what} {path} is not an .npz archive (truncated, corrupt, or another format)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        # BadZipFile: not a zip or cut off before its directory; EOFError/ValueError: an
        # entry cut short or malformed; ValueError also for entries that would need pickle.
        raise NpzFileError(f"{what} {path} is truncated or corrupt and cannot be read "
                           f"({type(exc).__name__}: {exc})") from exc


def write_npz_atomically(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """np.savez to a temporary file beside path, fsync'd, then os.replace'd over path.

    A crash never leaves a half-written file at path. Raises TypeError for object
    arrays, which only pickle could store (and read_npz would refuse).
    """
    pickled = [name for name, a in arrays.items() if np.asarray(a).dtype.hasobject]
    if pickled:
        raise TypeError(f"cannot write object arrays without pickle: {pickled}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
