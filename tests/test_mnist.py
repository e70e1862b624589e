"""Tests for cnncore.mnist and load_dataset("mnist").

The parser and downloader run on small files the tests write in the official IDX
layout (gzip'd and raw), with the module's digest table pointed at those files'
digests. Downloads come from a local folder (file://) or a local http.server.
The last tests read the real t10k files where $CNNCORE_DATA_DIR leads to them
(`CNNCORE_DATA_DIR=/work/shared/data` on this project's machines) and are
skipped, with the reason, where it does not.
"""

import gzip
import hashlib
import logging
import struct
import types
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import REAL_DATA_DIR, http_folder, offline  # noqa: F401  (fixtures)

from cnncore import mnist
from cnncore.data import CorruptDatasetError, DatasetUnavailableError, load_dataset
from cnncore.mnist import MNIST_FILES, download_mnist, load_mnist, read_idx

TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = MNIST_FILES
# Class counts of the official t10k labels (the shared copy's README); the
# synthetic 10,000-image test set has the same counts.
T10K_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def idx_bytes(values: np.ndarray) -> bytes:
    """values in the IDX layout: magic 0x000008<ndim>, the sizes as big-endian uint32, the bytes row-major."""
    header = struct.pack(f">{1 + values.ndim}I", 0x0800 | values.ndim, *values.shape)
    return header + np.ascontiguousarray(values, dtype=np.uint8).tobytes()


def md5(raw: bytes) -> str:
    return hashlib.md5(raw).hexdigest()


def random_set(rng, per_class: int):
    """(images (N, 28, 28) uint8, labels (N,)) with per_class images of every digit, shuffled."""
    labels = rng.permutation(np.repeat(np.arange(10), per_class))
    return rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8), labels


class MnistFolder:
    """<cache>/mnist/ holding the four files; writes keep mnist.MNIST_MD5 pointed at their digests."""

    def __init__(self, cache: Path, monkeypatch, gz=(True, True, True, True)):
        self.cache, self.folder, self.gz = cache, cache / "mnist", dict(zip(MNIST_FILES, gz))
        self.folder.mkdir(parents=True)
        self.digests = dict(mnist.MNIST_MD5)
        monkeypatch.setattr(mnist, "MNIST_MD5", self.digests)

    def path(self, name: str) -> Path:
        return self.folder / (f"{name}.gz" if self.gz[name] else name)

    def write(self, name: str, raw: bytes, trust: bool = True) -> Path:
        """Write raw (gzip'd if this file is); trust=True records its md5 as the expected one."""
        self.path(name).write_bytes(gzip.compress(raw) if self.gz[name] else raw)
        if trust:
            self.digests[name] = md5(raw)
        return self.path(name)

    def write_set(self, images_name: str, labels_name: str, images, labels) -> None:
        self.write(images_name, idx_bytes(images))
        self.write(labels_name, idx_bytes(labels))


@pytest.fixture(params=[(True, True, True, True), (False, False, False, False), (True, False, False, True)],
                ids=["gzip", "raw", "mixed"])
def small(request, tmp_path, monkeypatch):
    """Four small MNIST files (40 training, 20 test images) under tmp_path/cache/mnist."""
    rng = np.random.default_rng(0)
    files = MnistFolder(tmp_path / "cache", monkeypatch, request.param)
    files.X_train, files.y_train = random_set(rng, 4)
    files.X_test, files.y_test = random_set(rng, 2)
    files.write_set(TRAIN_IMAGES, TRAIN_LABELS, files.X_train, files.y_train)
    files.write_set(TEST_IMAGES, TEST_LABELS, files.X_test, files.y_test)
    return files


# --------------------------------------------------------------------------
# Parsing and verification
# --------------------------------------------------------------------------


def test_reads_images_and_labels_from_gzip_or_raw_files(small):
    found = load_mnist(small.cache, download=False)
    assert found.X_train.shape == (40, 1, 28, 28) and found.X_train.dtype == np.uint8
    assert found.y_train.dtype == np.int64 and found.note == ""
    np.testing.assert_array_equal(found.X_train[:, 0], small.X_train)
    np.testing.assert_array_equal(found.y_train, small.y_train)
    np.testing.assert_array_equal(found.X_test[:, 0], small.X_test)
    np.testing.assert_array_equal(found.y_test, small.y_test)


def test_pixels_are_rows_of_28_values(tmp_path):
    raw = bytearray(idx_bytes(np.zeros((2, 28, 28), dtype=np.uint8)))
    raw[16 + 28 * 28 + 2 * 28 + 5] = 7  # image 1, row 2, column 5
    (tmp_path / "images").write_bytes(bytes(raw))
    images = read_idx(tmp_path / "images", 3)
    assert images.shape == (2, 28, 28) and images[1, 2, 5] == 7 and np.count_nonzero(images) == 1


@pytest.mark.parametrize("cut, problem", [(-100, "is truncated"), (7, "is truncated"), (None, "has extra bytes")])
def test_file_of_the_wrong_length_raises_naming_it(small, cut, problem):
    raw = idx_bytes(small.X_test)
    raw = raw + b"\0" * 3 if cut is None else raw[:cut]
    path = small.write(TEST_IMAGES, raw)
    with pytest.raises(CorruptDatasetError, match=rf"{path} {problem}: "):
        load_mnist(small.cache, download=False)


def test_wrong_magic_raises_naming_file(small):
    # An images file where the labels file should be: magic 0x803, not 0x801.
    path = small.write(TEST_LABELS, idx_bytes(small.X_test))
    with pytest.raises(CorruptDatasetError, match=rf"{path} has magic number 0x00000803, expected 0x00000801"):
        load_mnist(small.cache, download=False)


def test_wrong_digest_raises_naming_file(small):
    changed = small.X_train.copy()
    changed[3, 10, 10] ^= 1
    path = small.write(TRAIN_IMAGES, idx_bytes(changed), trust=False)
    with pytest.raises(CorruptDatasetError, match=rf"{path} has md5 {md5(idx_bytes(changed))} .*expected "):
        load_mnist(small.cache, download=False)


def test_fewer_labels_than_images_raises_naming_both_files(small):
    small.write(TEST_LABELS, idx_bytes(small.y_test[:-1]))
    with pytest.raises(CorruptDatasetError, match=r"holds 20 images but .*t10k-labels.* holds 19 labels"):
        load_mnist(small.cache, download=False)


def test_label_above_9_raises_naming_file(small):
    labels = small.y_train.copy()
    labels[3] = 10
    path = small.write(TRAIN_LABELS, idx_bytes(labels))
    with pytest.raises(CorruptDatasetError, match=rf"{path} is corrupt: label 3 is 10, expected 0..9"):
        load_mnist(small.cache, download=False)


def test_images_other_than_28x28_raise_naming_file(small):
    path = small.write(TEST_IMAGES, idx_bytes(small.X_test[:, :, :27]))
    with pytest.raises(CorruptDatasetError, match=rf"{path} holds 28x27 images, expected 28x28"):
        load_mnist(small.cache, download=False)


def test_broken_gzip_raises_naming_file(tmp_path, monkeypatch):
    files = MnistFolder(tmp_path / "cache", monkeypatch)
    X, y = random_set(np.random.default_rng(1), 1)
    files.write_set(TEST_IMAGES, TEST_LABELS, X, y)
    path = files.path(TEST_IMAGES)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(CorruptDatasetError, match=rf"{path} is not a valid gzip file"):
        load_mnist(files.cache, download=False)


# --------------------------------------------------------------------------
# Missing files and downloads
# --------------------------------------------------------------------------


def test_missing_files_without_download_name_the_folder_and_how_to_place_them(tmp_path):
    with pytest.raises(DatasetUnavailableError) as info:
        load_mnist(tmp_path / "nowhere", download=False)
    message = str(info.value)
    assert f"Looked for the files in {tmp_path / 'nowhere' / 'mnist'}." in message
    assert "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (raw or .gz) not found (download=False)" in message
    assert "To place them by hand, download train-images-idx3-ubyte.gz" in message


def test_missing_files_offline_name_every_url_tried_with_its_error():
    with pytest.raises(DatasetUnavailableError, match="could not be downloaded") as info:
        load_dataset("mnist")  # the cache of $CNNCORE_DATA_DIR, empty
    message = str(info.value)
    for mirror in mnist.MNIST_MIRRORS:
        assert f"{mirror}{TEST_IMAGES}.gz: <urlopen error network disabled in tests>" in message
        # An unreachable mirror is not waited on again for the later files.
        assert f"{mirror}{TRAIN_LABELS}.gz: not tried: the mirror was unreachable" in message


def _serve(folder: Path, small) -> None:
    """Copies of small's files, gzip'd with another wrapper, in folder as a mirror holds them."""
    folder.mkdir(exist_ok=True)
    for name in MNIST_FILES:
        raw = small.path(name).read_bytes()
        raw = gzip.decompress(raw) if small.gz[name] else raw
        (folder / f"{name}.gz").write_bytes(gzip.compress(raw, compresslevel=1, mtime=0))


@pytest.mark.parametrize("small", [(False, False, False, False)], indirect=True, ids=["raw"])
def test_absent_files_are_downloaded_from_the_first_mirror_that_has_them(small, tmp_path, monkeypatch):
    _serve(tmp_path / "mirror", small)
    mirrors = ((tmp_path / "empty").as_uri() + "/", (tmp_path / "mirror").as_uri() + "/")
    monkeypatch.setattr(mnist, "MNIST_MIRRORS", mirrors)
    found = load_mnist(tmp_path / "fresh", progress=False)
    np.testing.assert_array_equal(found.X_train[:, 0], small.X_train)
    np.testing.assert_array_equal(found.y_test, small.y_test)
    assert sorted(p.name for p in (tmp_path / "fresh" / "mnist").iterdir()) == sorted(f"{n}.gz" for n in MNIST_FILES)


def test_download_mnist_over_http(small, http_folder, tmp_path, monkeypatch):
    served, base = http_folder
    _serve(served, small)
    monkeypatch.setattr(mnist, "MNIST_MIRRORS", (base,))
    folder = download_mnist(tmp_path / "fresh", progress=False)
    assert folder == tmp_path / "fresh" / "mnist"
    np.testing.assert_array_equal(load_mnist(tmp_path / "fresh", download=False).y_train, small.y_train)


def test_download_with_wrong_content_keeps_nothing_and_says_why(small, http_folder, tmp_path, monkeypatch):
    served, base = http_folder
    _serve(served, small)
    (served / f"{TEST_IMAGES}.gz").write_bytes(gzip.compress(b"not mnist"))
    monkeypatch.setattr(mnist, "MNIST_MIRRORS", (base,))
    with pytest.raises(DatasetUnavailableError, match=rf"{base}{TEST_IMAGES}\.gz: .* downloaded with md5 "):
        load_mnist(tmp_path / "fresh", progress=False)
    assert sorted(p.name for p in (tmp_path / "fresh" / "mnist").iterdir()) == sorted(
        f"{n}.gz" for n in MNIST_FILES if n != TEST_IMAGES)


# --------------------------------------------------------------------------
# load_dataset("mnist")
# --------------------------------------------------------------------------


def test_with_training_files_validation_is_carved_stratified_out_of_training(small):
    out = load_dataset("mnist", data_dir=small.cache, num_val=10, download=False)
    assert [len(out[f"y_{s}"]) for s in ("train", "val", "test")] == [30, 10, 20]
    assert out["X_train"].shape == (30, 1, 28, 28) and out["class_names"] == [str(k) for k in range(10)]
    assert np.bincount(out["y_val"], minlength=10).tolist() == [1] * 10  # 4 of each class: 1 each to val
    assert out["description"].startswith("MNIST (train-images-idx3-ubyte")
    assert "minus a stratified validation split of 10 with seed 0" in out["description"]


@pytest.mark.parametrize("small", [(True, True, True, True)], indirect=True, ids=["gzip"])
@pytest.mark.parametrize("num_val, problem", [(None, "at most 30"), (5, "at least 10")])
def test_validation_size_must_leave_every_class_on_both_sides(small, num_val, problem):
    with pytest.raises(ValueError, match=f"num_val must be {problem} .*split stratified"):
        load_dataset("mnist", data_dir=small.cache, num_val=num_val, download=False)


@pytest.fixture(scope="module")
def t10k_raw(tmp_path_factory):
    """A synthetic 10,000-image t10k set (the official class counts), raw IDX files, and its digests."""
    rng = np.random.default_rng(2)
    labels = rng.permutation(np.repeat(np.arange(10), T10K_CLASS_COUNTS))
    images = rng.integers(0, 256, size=(10_000, 28, 28), dtype=np.uint8)
    folder = tmp_path_factory.mktemp("t10k-only") / "mnist"
    folder.mkdir()
    raws = {TEST_IMAGES: idx_bytes(images), TEST_LABELS: idx_bytes(labels)}
    for name, raw in raws.items():
        (folder / name).write_bytes(raw)
    return types.SimpleNamespace(cache=folder.parent, images=images, labels=labels,
                                 digests={name: md5(raw) for name, raw in raws.items()})


@pytest.fixture
def t10k_only(t10k_raw, monkeypatch):
    monkeypatch.setattr(mnist, "MNIST_MD5", {**mnist.MNIST_MD5, **t10k_raw.digests})
    return t10k_raw


def test_test_only_split_is_6000_1000_3000_and_partitions_the_test_set(t10k_only):
    out = load_dataset("mnist", data_dir=t10k_only.cache, download=False)
    assert [len(out[f"y_{s}"]) for s in ("train", "val", "test")] == [6000, 1000, 3000]
    raw = np.concatenate([out[f"X_{s}"] for s in ("train", "val", "test")]) + out["mean"][:, None, None]
    # Integers 0..255 minus then plus a float64 mean round back exactly.
    ours = sorted(image.tobytes() for image in np.round(raw).astype(np.uint8)[:, 0])
    assert ours == sorted(image.tobytes() for image in t10k_only.images)


def test_test_only_split_is_stratified_by_class(t10k_only):
    out = load_dataset("mnist", data_dir=t10k_only.cache, download=False)
    total = np.array(T10K_CLASS_COUNTS)
    for split in ("train", "val", "test"):
        expected = total * len(out[f"y_{split}"]) / total.sum()
        # Stratified splitting rounds each class's share: within one image of it.
        assert np.all(np.abs(np.bincount(out[f"y_{split}"], minlength=10) - expected) <= 1), split


def test_test_only_split_is_seeded(t10k_only):
    a, b, c = (load_dataset("mnist", data_dir=t10k_only.cache, download=False, seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a["X_val"], b["X_val"])
    np.testing.assert_array_equal(a["y_test"], b["y_test"])
    assert not np.array_equal(a["X_val"], c["X_val"])


def test_test_only_mode_says_so_in_the_description_and_once_in_the_log(t10k_only, caplog):
    with caplog.at_level(logging.INFO, logger="cnncore.data"):
        out = load_dataset("mnist", data_dir=t10k_only.cache, download=False, seed=3)
    folder = t10k_only.cache / "mnist"
    assert out["description"] == (
        "MNIST test set only (t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, 10,000 images) split stratified "
        f"6,000/1,000/3,000 with seed 3: the 60,000 training images were not found in {folder} (download=False)")
    assert [r.getMessage() for r in caplog.records if r.name == "cnncore.data"].count(out["description"]) == 1
    assert all(r.levelno == logging.INFO for r in caplog.records if r.getMessage() == out["description"])


def test_test_only_subsets_are_drawn_from_the_splits_and_described(t10k_only):
    out = load_dataset("mnist", data_dir=t10k_only.cache, download=False, num_train=500, num_val=50, num_test=200)
    assert [len(out[f"y_{s}"]) for s in ("train", "val", "test")] == [500, 50, 200]
    assert out["description"].endswith("; seeded random subsets kept (train/val/test): 500/50/200")


# --------------------------------------------------------------------------
# The real t10k files, where $CNNCORE_DATA_DIR leads to them
# --------------------------------------------------------------------------

# The shared copy's README: md5 and sha256 of the decompressed official files.
README_DIGESTS = {
    TEST_IMAGES: ("2646ac647ad5339dbf082846283269ea",
                  "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    TEST_LABELS: ("27ae3e4e09519cfbb04c329615203637",
                  "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}


def _real_t10k() -> dict[str, Path]:
    folder = Path(REAL_DATA_DIR or ".") / "mnist"
    found = {name: next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)
             for name in (TEST_IMAGES, TEST_LABELS)}
    return found if REAL_DATA_DIR and all(found.values()) else {}


needs_real_t10k = pytest.mark.skipif(
    not _real_t10k(),
    reason=(f"CNNCORE_DATA_DIR={REAL_DATA_DIR}" if REAL_DATA_DIR else "CNNCORE_DATA_DIR, not set,")
    + f" does not lead to mnist/{TEST_IMAGES}[.gz] and mnist/{TEST_LABELS}[.gz]; run with "
      "CNNCORE_DATA_DIR=<folder holding mnist/> to check the real files")


@needs_real_t10k
@pytest.mark.parametrize("name", [TEST_IMAGES, TEST_LABELS])
def test_real_t10k_files_have_the_published_digests(name):
    path = _real_t10k()[name]
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    assert (md5(raw), hashlib.sha256(raw).hexdigest()) == README_DIGESTS[name]
    assert mnist.MNIST_MD5[name] == README_DIGESTS[name][0]


@needs_real_t10k
def test_real_t10k_holds_10000_images_with_the_published_class_counts(monkeypatch):
    monkeypatch.setenv("CNNCORE_DATA_DIR", REAL_DATA_DIR)
    found = load_mnist(download=False)
    assert found.X_test.shape == (10_000, 1, 28, 28)
    assert np.bincount(found.y_test, minlength=10).tolist() == T10K_CLASS_COUNTS


@needs_real_t10k
def test_real_t10k_only_loads_as_a_stratified_6000_1000_3000_split(monkeypatch):
    monkeypatch.setenv("CNNCORE_DATA_DIR", REAL_DATA_DIR)
    out = load_dataset("mnist", dtype="float32", download=False)
    assert [out[f"X_{s}"].shape[0] for s in ("train", "val", "test")] == [6000, 1000, 3000]
    assert out["X_train"].dtype == np.float32 and out["X_train"].shape[1:] == (1, 28, 28)
    assert out["description"].startswith("MNIST test set only (t10k-images-idx3-ubyte")
    total = np.array(T10K_CLASS_COUNTS)
    for split, n in (("train", 6000), ("val", 1000), ("test", 3000)):
        assert np.all(np.abs(np.bincount(out[f"y_{split}"], minlength=10) - total * n / 10_000) <= 1), split
