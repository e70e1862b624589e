"""Tests for cnncore.cifar10 through cnncore.data: download, extraction, parsing, splits.

CIFAR-10 is never fetched: the tests write small files in the official binary
layout, pack them as a tar.gz and serve it through a file:// URL.
"""

import hashlib
import io
import pathlib
import tarfile
import tempfile
import types

import numpy as np
import pytest
from data_fixtures import offline  # noqa: F401  (autouse: no network, cache under tmp_path)
from hypothesis import given, settings
from hypothesis import strategies as st

from cnncore import cifar10, data
from cnncore.data import (
    CIFAR10_DIRNAME,
    CIFAR10_TEST_FILE,
    CIFAR10_TRAIN_FILES,
    CorruptDatasetError,
    DatasetUnavailableError,
    download_cifar10,
    load_cifar10_batches,
    load_cifar10_class_names,
    load_dataset,
    resolve_data_dir,
)

RECORDS_PER_BATCH = 7
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --------------------------------------------------------------------------
# CIFAR-10 helpers: files in the exact binary layout
# --------------------------------------------------------------------------


def _record(label: int, image: np.ndarray) -> bytes:
    """One 3,073-byte record: label byte, then the red, green, blue 32x32 planes row-major."""
    red, green, blue = image
    return bytes([label]) + red.tobytes() + green.tobytes() + blue.tobytes()


def _write_batch(path, labels, images) -> None:
    path.write_bytes(b"".join(_record(int(k), img) for k, img in zip(labels, images)))


def _random_batch(rng, n=RECORDS_PER_BATCH):
    labels = rng.integers(0, 10, size=n)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    return labels, images


def _write_cifar_tree(root, rng):
    """Write the five training batches, the test batch and the meta file into root."""
    root.mkdir(parents=True)
    train = [_random_batch(rng) for _ in CIFAR10_TRAIN_FILES]
    for name, (labels, images) in zip(CIFAR10_TRAIN_FILES, train):
        _write_batch(root / name, labels, images)
    test = _random_batch(rng)
    _write_batch(root / CIFAR10_TEST_FILE, *test)
    (root / "batches.meta.txt").write_text("\n".join(CLASS_NAMES) + "\n\n")
    return types.SimpleNamespace(
        y_train=np.concatenate([y for y, _ in train]),
        X_train=np.concatenate([X for _, X in train]),
        y_test=test[0],
        X_test=test[1],
    )


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def cifar(tmp_path):
    """A small CIFAR-10 archive on disk: its file:// URL, md5 and the arrays it holds."""
    src = tmp_path / "src"
    expected = _write_cifar_tree(src / CIFAR10_DIRNAME, np.random.default_rng(0))
    archive = tmp_path / "served" / "cifar-10-binary.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / CIFAR10_DIRNAME, arcname=CIFAR10_DIRNAME)
    expected.archive = archive
    expected.url = archive.as_uri()
    expected.md5 = _md5(archive)
    expected.cache = tmp_path / "cache"
    return expected


@pytest.fixture
def cifar_root(cifar):
    """The small archive downloaded and extracted into cifar.cache; returns the extracted dir."""
    return download_cifar10(cifar.cache, url=cifar.url, md5=cifar.md5, progress=False)


def _tar_with(path, member: tarfile.TarInfo, payload: bytes = b"") -> None:
    member.size = len(payload) if member.isfile() else 0
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)


# --------------------------------------------------------------------------
# CIFAR-10: download, extraction, parsing
# --------------------------------------------------------------------------


def test_download_extract_parse_round_trips_pixels_and_labels(cifar, cifar_root):
    assert cifar_root == cifar.cache / CIFAR10_DIRNAME
    X_train, y_train, X_test, y_test = load_cifar10_batches(cifar_root)
    assert X_train.shape == (5 * RECORDS_PER_BATCH, 3, 32, 32) and X_train.dtype == np.uint8
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64
    np.testing.assert_array_equal(X_train, cifar.X_train)
    np.testing.assert_array_equal(y_train, cifar.y_train)
    np.testing.assert_array_equal(X_test, cifar.X_test)
    np.testing.assert_array_equal(y_test, cifar.y_test)
    assert load_cifar10_class_names(cifar_root) == CLASS_NAMES


def test_download_with_progress_bar_writes_archive_into_cache(cifar):
    download_cifar10(cifar.cache, url=cifar.url, md5=cifar.md5, progress=True)
    assert sorted(p.name for p in cifar.cache.iterdir()) == [CIFAR10_DIRNAME, "cifar-10-binary.tar.gz"]


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_any_whole_number_of_records_round_trips(n, seed):
    labels, images = _random_batch(np.random.default_rng(seed), n)
    with tempfile.TemporaryDirectory() as tmp:  # hypothesis reruns; tmp_path would be shared
        root = pathlib.Path(tmp)
        for name in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE):
            _write_batch(root / name, labels, images)
        X_train, y_train, X_test, y_test = load_cifar10_batches(root)
    np.testing.assert_array_equal(X_test, images)
    np.testing.assert_array_equal(y_test, labels)
    np.testing.assert_array_equal(X_train, np.concatenate([images] * 5))
    np.testing.assert_array_equal(y_train, np.tile(labels, 5))


def test_record_layout_is_label_then_red_green_blue_planes_row_major(tmp_path):
    root = tmp_path / CIFAR10_DIRNAME
    root.mkdir()
    record = bytearray(3073)
    record[0] = 6
    record[1 + 0 * 1024 + 0 * 32 + 1] = 11  # red, row 0, column 1
    record[1 + 1 * 1024 + 2 * 32 + 5] = 22  # green, row 2, column 5
    record[1 + 2 * 1024 + 31 * 32 + 30] = 33  # blue, row 31, column 30
    for name in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE):
        (root / name).write_bytes(bytes(record))
    X_train, y_train, _, _ = load_cifar10_batches(root)
    image = X_train[0]
    assert y_train[0] == 6
    assert (image[0, 0, 1], image[1, 2, 5], image[2, 31, 30]) == (11, 22, 33)
    assert np.count_nonzero(image) == 3


def test_load_dataset_cifar10_carves_validation_out_of_training(cifar, cifar_root):
    out = load_dataset("cifar10", data_dir=cifar.cache, download=False, num_val=5)
    n = 5 * RECORDS_PER_BATCH
    assert out["X_train"].shape == (n - 5, 3, 32, 32) and out["X_val"].shape == (5, 3, 32, 32)
    assert out["X_test"].shape == (RECORDS_PER_BATCH, 3, 32, 32)
    assert out["class_names"] == CLASS_NAMES and out["mean"].shape == (3,)
    raw = np.concatenate([out["X_train"], out["X_val"]]) + out["mean"][:, None, None]
    # Integers 0..255 minus then plus a float64 mean round back exactly.
    assert _image_multiset(np.round(raw).astype(np.uint8)) == _image_multiset(cifar.X_train)


def _image_multiset(X):
    return sorted(image.tobytes() for image in X)


def test_load_dataset_cifar10_train_mean_is_zero_and_scale_is_raw(cifar, cifar_root):
    out = load_dataset("cifar10", data_dir=cifar.cache, download=False, num_val=5, dtype="float32")
    assert out["X_train"].dtype == np.float32
    # float32 over 30 * 1024 values of size <= 255: 1e-3 leaves a wide margin.
    np.testing.assert_allclose(out["X_train"].mean(axis=(0, 2, 3)), 0.0, atol=1e-3)
    raw_test = out["X_test"] + out["mean"][:, None, None]
    np.testing.assert_allclose(raw_test, cifar.X_test, atol=1e-3)


def test_load_dataset_cifar10_default_val_does_not_fit_small_files(cifar, cifar_root):
    with pytest.raises(ValueError, match="num_val must be at most 34"):
        load_dataset("cifar10", data_dir=cifar.cache, download=False)


def test_load_dataset_cifar10_is_seeded(cifar, cifar_root):
    a, b, c = (load_dataset("cifar10", data_dir=cifar.cache, download=False, num_val=5, seed=s) for s in (2, 2, 3))
    np.testing.assert_array_equal(a["y_val"], b["y_val"])
    np.testing.assert_array_equal(a["X_train"], b["X_train"])
    assert not np.array_equal(a["X_val"], c["X_val"])
    assert not np.array_equal(a["X_train"], c["X_train"])


def test_load_dataset_downloads_when_files_are_missing(cifar, monkeypatch):
    monkeypatch.setattr(cifar10, "CIFAR10_URL", cifar.url)
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", cifar.md5)
    out = load_dataset("cifar10", num_val=5)  # cache from $CNNCORE_DATA_DIR
    assert out["X_train"].shape[0] == 5 * RECORDS_PER_BATCH - 5
    assert (resolve_data_dir() / CIFAR10_DIRNAME / CIFAR10_TEST_FILE).is_file()


def test_archive_already_in_cache_is_reused_without_network(cifar):
    cifar.cache.mkdir()
    (cifar.cache / "cifar-10-binary.tar.gz").write_bytes(cifar.archive.read_bytes())
    root = download_cifar10(cifar.cache, url="https://unreachable.invalid/x.tar.gz", md5=cifar.md5)
    assert (root / CIFAR10_TRAIN_FILES[0]).is_file()


def test_wrong_md5_raises_corrupt_and_leaves_no_file(cifar):
    with pytest.raises(CorruptDatasetError, match="md5"):
        download_cifar10(cifar.cache, url=cifar.url, md5="0" * 32, progress=False)
    assert list(cifar.cache.iterdir()) == []


def test_failed_download_raises_unavailable_and_leaves_no_file(cifar):
    with pytest.raises(DatasetUnavailableError, match="downloading .* failed"):
        download_cifar10(cifar.cache, url=cifar.url + ".absent", md5=cifar.md5, progress=False)
    assert list(cifar.cache.iterdir()) == []


def test_missing_data_without_download_explains_where_and_how(tmp_path):
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("cifar10", data_dir=tmp_path / "nowhere", download=False)
    message = str(info.value)
    assert str(tmp_path / "nowhere" / CIFAR10_DIRNAME) in message
    assert data.CIFAR10_URL in message and data.CIFAR10_MD5 in message
    assert "tar -xzf" in message and "download=False" in message


def test_missing_data_with_no_network_raises_unavailable(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="network disabled in tests") as info:
        load_dataset("cifar10", data_dir=tmp_path / "c")
    assert data.CIFAR10_URL in str(info.value)


def test_missing_batch_file_raises_naming_it(cifar, cifar_root):
    (cifar_root / "data_batch_3.bin").unlink()
    with pytest.raises(DatasetUnavailableError, match=r"data_batch_3\.bin is missing") as info:
        load_cifar10_batches(cifar_root)
    assert data.CIFAR10_URL in str(info.value)


def test_truncated_batch_raises_naming_file_and_size(cifar, cifar_root):
    path = cifar_root / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:-100])
    size = RECORDS_PER_BATCH * 3073 - 100
    with pytest.raises(CorruptDatasetError, match=rf"data_batch_2\.bin is truncated: {size} bytes"):
        load_cifar10_batches(cifar_root)


def test_empty_batch_raises_truncated(cifar, cifar_root):
    (cifar_root / CIFAR10_TEST_FILE).write_bytes(b"")
    with pytest.raises(CorruptDatasetError, match=r"test_batch\.bin is truncated: 0 bytes"):
        load_cifar10_batches(cifar_root)


def test_label_byte_200_raises_corrupt_naming_file(cifar, cifar_root):
    path = cifar_root / "data_batch_4.bin"
    raw = bytearray(path.read_bytes())
    raw[3 * 3073] = 200  # label byte of the fourth record
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptDatasetError, match=r"data_batch_4\.bin is corrupt: record 3 has label byte 200"):
        load_cifar10_batches(cifar_root)


def test_wrong_number_of_class_names_raises_corrupt(cifar, cifar_root):
    (cifar_root / "batches.meta.txt").write_text("cat\ndog\n")
    with pytest.raises(CorruptDatasetError, match="expected 10 class names, found 2"):
        load_cifar10_class_names(cifar_root)


@pytest.mark.parametrize("name", ["../evil.txt", f"{CIFAR10_DIRNAME}/../../evil.txt", "ABSOLUTE"])
def test_tar_member_escaping_the_directory_is_rejected(tmp_path, name):
    outside = tmp_path / "evil.txt"
    member = tarfile.TarInfo(str(outside) if name == "ABSOLUTE" else name)
    archive = tmp_path / "bad.tar.gz"
    _tar_with(archive, member, b"pwned")
    cache = tmp_path / "cache"
    with pytest.raises(CorruptDatasetError, match="refusing to extract"):
        download_cifar10(cache, url=archive.as_uri(), md5=_md5(archive), progress=False)
    assert not outside.exists()
    assert not (cache / CIFAR10_DIRNAME).exists()


def test_tar_symlink_member_is_rejected(tmp_path):
    member = tarfile.TarInfo(f"{CIFAR10_DIRNAME}/data_batch_1.bin")
    member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive = tmp_path / "link.tar.gz"
    _tar_with(archive, member)
    with pytest.raises(CorruptDatasetError, match="not a regular file or directory"):
        download_cifar10(tmp_path / "cache", url=archive.as_uri(), md5=_md5(archive), progress=False)
