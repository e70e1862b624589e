"""Tests for cnncore.download: the cache directory, verified downloads and the not-available message.

Downloads come from a local folder (file://) or a local http.server on 127.0.0.1.
"""

import gzip
import hashlib
import http.server
import threading

import pytest
from data_fixtures import http_folder, offline  # noqa: F401  (fixtures)

from cnncore.download import (
    CorruptDatasetError,
    DownloadError,
    content_md5,
    fetch_verified,
    resolve_data_dir,
    unavailable_message,
)

PAYLOAD = bytes(range(256)) * 40


def _md5(raw: bytes) -> str:
    return hashlib.md5(raw).hexdigest()


def test_cache_dir_prefers_argument_then_environment_then_home(tmp_path, monkeypatch):
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir() == tmp_path / "env-cache"
    monkeypatch.delenv("CNNCORE_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "cnncore"


def test_fetch_over_http_keeps_the_file_when_its_md5_matches(http_folder, tmp_path):
    served, base = http_folder
    (served / "blob.bin").write_bytes(PAYLOAD)
    dest = tmp_path / "blob.bin"
    fetch_verified(base + "blob.bin", dest, _md5(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD
    assert list(tmp_path.glob("*.part")) == []


def test_gunzip_checks_the_decompressed_content_not_the_wrapper(tmp_path):
    # Two gzip wrappers of the same content: different bytes, one content digest.
    fast, best = gzip.compress(PAYLOAD, compresslevel=1, mtime=0), gzip.compress(PAYLOAD, compresslevel=9, mtime=1)
    assert fast != best
    for i, wrapped in enumerate((fast, best)):
        source = tmp_path / f"copy{i}.gz"
        source.write_bytes(wrapped)
        dest = tmp_path / f"kept{i}.gz"
        fetch_verified(source.as_uri(), dest, _md5(PAYLOAD), gunzip=True)
        assert content_md5(dest, gunzip=True) == _md5(PAYLOAD)


def test_wrong_md5_raises_corrupt_and_leaves_nothing(http_folder, tmp_path):
    served, base = http_folder
    (served / "blob.bin").write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(CorruptDatasetError, match=r"blob\.bin downloaded with md5 .*, expected 0{32}"):
        fetch_verified(base + "blob.bin", cache / "blob.bin", "0" * 32)
    assert list(cache.iterdir()) == []


def test_http_404_raises_download_error_and_leaves_nothing(http_folder, tmp_path):
    _, base = http_folder
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(DownloadError, match="404"):
        fetch_verified(base + "absent.bin", cache / "absent.bin", _md5(PAYLOAD))
    assert list(cache.iterdir()) == []


class _ShortBodyHandler(http.server.BaseHTTPRequestHandler):
    """Promises 1,000 bytes and sends 10: the connection drops mid-download."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"0123456789")

    def log_message(self, *args):
        pass


def test_connection_dropped_mid_body_raises_download_error_and_leaves_nothing(tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), _ShortBodyHandler)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    cache = tmp_path / "cache"
    cache.mkdir()
    try:
        with pytest.raises(DownloadError, match="closed after 10 of 1,000 bytes"):
            fetch_verified(f"http://127.0.0.1:{server.server_address[1]}/x", cache / "x", _md5(PAYLOAD))
    finally:
        thread.join(timeout=10)
        server.server_close()
    assert list(cache.iterdir()) == []


def test_body_that_is_not_gzip_raises_corrupt_naming_the_url(tmp_path):
    source = tmp_path / "plain.gz"
    source.write_bytes(PAYLOAD)
    with pytest.raises(CorruptDatasetError, match=r"plain\.gz is not a valid gzip file"):
        fetch_verified(source.as_uri(), tmp_path / "kept.gz", _md5(PAYLOAD), gunzip=True)
    assert not (tmp_path / "kept.gz").exists()


def test_unavailable_message_names_folder_every_attempt_and_how_to_place(tmp_path):
    folder = tmp_path / "mnist"
    text = unavailable_message("MNIST", "t10k files not found", folder, "copy them into the folder",
                               [("https://a.example/x.gz", "timed out"), ("https://b.example/x.gz", "HTTP 404")])
    assert text.startswith("MNIST is not available: t10k files not found.")
    assert f"Looked for the files in {folder}." in text
    assert "https://a.example/x.gz: timed out" in text and "https://b.example/x.gz: HTTP 404" in text
    assert "To place them by hand, copy them into the folder" in text
    assert "$CNNCORE_DATA_DIR" in text and "holds mnist/" in text
