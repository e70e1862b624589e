"""Fixtures shared by the dataset tests (test_data, test_cifar10, test_mnist, test_download).

A test module imports `offline` (autouse) and, where it serves files over HTTP,
`http_folder`. No dataset test can reach the network or the user's home cache:
the cache is under tmp_path, and every URL but file:// and http://127.0.0.1
fails as if there were no network.
"""

import functools
import http.server
import os
import threading
import urllib.error
import urllib.request

import pytest

# Read before any fixture replaces it: the tests against the real MNIST files
# follow the value the test run was started with.
REAL_DATA_DIR = os.environ.get("CNNCORE_DATA_DIR")

_LOCAL_PREFIXES = ("file:", "http://127.0.0.1:")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Cache under tmp_path/env-cache; any URL but a local one fails as if there were no network."""
    monkeypatch.setenv("CNNCORE_DATA_DIR", str(tmp_path / "env-cache"))
    real_urlopen = urllib.request.urlopen

    def local_only(url, *args, **kwargs):
        if not str(url).startswith(_LOCAL_PREFIXES):
            raise urllib.error.URLError("network disabled in tests")
        return real_urlopen(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", local_only)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output free of access logs
        pass


@pytest.fixture
def http_folder(tmp_path):
    """A folder served by http.server on 127.0.0.1: yields (folder, base URL ending in /)."""
    folder = tmp_path / "served-over-http"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()
