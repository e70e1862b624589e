"""Dataset files on disk: where they live, fetching them verified, and what to say when they are missing.

Shared by the CIFAR-10 and MNIST loaders:

- `resolve_data_dir(data_dir)`: the cache directory, the `data_dir` argument, else
  $CNNCORE_DATA_DIR, else ~/.cache/cnncore.
- `fetch_verified(url, dest, md5)`: download into a temporary file beside dest,
  check its md5 (of the decompressed content with gunzip=True), and only then
  rename it to dest, so a failed or wrong download leaves nothing behind.
- `unavailable_message(...)`: the text of a DatasetUnavailableError: what is
  missing, every place that was looked at (the folder, each URL with its error)
  and how to place the files by hand.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

DATA_DIR_ENV = "CNNCORE_DATA_DIR"

# Seconds a connection or a single read may stall before the download counts as
# failed: long enough for a slow mirror, short enough that an unreachable one
# does not hold up a fallback.
DOWNLOAD_TIMEOUT_S = 15

_CHUNK = 1 << 20

# What reading a damaged or non-gzip file through gzip raises.
GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


class DatasetUnavailableError(RuntimeError):
    """The dataset's files are not on disk and could not be downloaded."""


class CorruptDatasetError(ValueError):
    """A dataset file is present but wrong: bad checksum, truncated, bad header or
    labels, or an archive member that would land outside the target directory."""


class DownloadError(OSError):
    """Fetching a URL failed: no network, an HTTP error, a short body, or no room to write."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: data_dir if given, else $CNNCORE_DATA_DIR, else ~/.cache/cnncore."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or Path.home() / ".cache" / "cnncore"
    return Path(data_dir).expanduser()


def content_md5(path: str | os.PathLike, *, gunzip: bool = False, name: str | None = None) -> str:
    """md5 hex digest of the file at path, of its decompressed content when gunzip is True.

    Raises CorruptDatasetError naming `name` (default: path) when gunzip is True and
    the file is not a whole gzip stream.
    """
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with (gzip.open if gunzip else open)(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                digest.update(chunk)
    except GZIP_ERRORS as exc:
        raise CorruptDatasetError(f"{name or path} is not a valid gzip file ({exc})") from exc
    return digest.hexdigest()


def fetch_verified(
    url: str,
    dest: Path,
    md5: str,
    *,
    gunzip: bool = False,
    progress: bool = False,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> None:
    """Download url to dest, keeping it only when its md5 matches.

    dest: the final path; its directory must exist. md5: expected hex digest of
    the file, or of its decompressed content when gunzip=True (for .gz files
    whose wrapper differs between copies). The body goes to a temporary file in
    dest's directory that is renamed to dest only once the digest matches; on
    any failure it is removed and dest is left as it was.

    Raises DownloadError when the fetch fails (network, HTTP status, short body,
    a directory that cannot be written), CorruptDatasetError when the digest
    does not match or the body is not valid gzip.
    """
    try:
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    except OSError as exc:
        raise DownloadError(f"cannot write into {dest.parent} ({exc})") from exc
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                _stream(url, out, dest.name, progress, timeout)
        except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
            raise DownloadError(str(exc)) from exc
        actual = content_md5(tmp, gunzip=gunzip, name=url)
        if actual != md5:
            what = "decompressed content" if gunzip else "file"
            raise CorruptDatasetError(
                f"{url} downloaded with md5 {actual} ({what}), expected {md5}; the file was "
                f"removed. Try again, or place the file by hand as {dest}."
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _stream(url: str, out, label: str, progress: bool, timeout: float) -> None:
    """Copy the body at url into the open binary file `out`, with a progress bar."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = response.headers.get("Content-Length")
        total = int(total) if total else None
        written = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"Downloading {label}", disable=not progress) as bar:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                out.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    # http.client ends a body cut short without an error; the length says so.
    if total is not None and written != total:
        raise DownloadError(f"the connection closed after {written:,} of {total:,} bytes")


def unavailable_message(
    dataset: str,
    problem: str,
    folder: Path,
    how_to_place: str,
    attempts: Sequence[tuple[str, str]] = (),
) -> str:
    """The text of a DatasetUnavailableError.

    dataset: its name ("MNIST"); problem: what went wrong, one clause; folder:
    where the files were looked for; how_to_place: what to download and where to
    put it, completing "To place them by hand, ..."; attempts: (url, error) for
    every download tried.
    """
    lines = [f"{dataset} is not available: {problem}.", f"Looked for the files in {folder}."]
    if attempts:
        lines.append("Tried to download:")
        lines += [f"    {url}: {error}" for url, error in attempts]
    lines.append(
        f"To place them by hand, {how_to_place}; or point data_dir= or ${DATA_DIR_ENV} at a "
        f"directory that already holds {folder.name}/."
    )
    return "\n".join(lines)
