"""The .npz reader and writer behind model files and Solver checkpoints: no pickle, clear errors."""

import numpy as np
import pytest

from cnncore.npz_io import NpzFileError, read_npz, write_npz_atomically


def test_round_trip_keeps_arrays_and_strings(tmp_path):
    path = write_npz_atomically(tmp_path / "sub" / "a.npz", {"x": np.arange(3.0), "s": np.asarray("hi")})
    data = read_npz(path)
    assert data["x"].tolist() == [0.0, 1.0, 2.0] and data["s"].item() == "hi"
    assert [p.name for p in path.parent.iterdir()] == ["a.npz"]  # no temporary file left behind


@pytest.mark.parametrize("content, problem", [
    (b"", "empty"),
    (b"not a zip archive " * 20, "not an .npz archive"),
    (None, "not an .npz archive"),  # a real archive cut in half
])
def test_unreadable_files_name_the_file_and_the_problem(tmp_path, content, problem):
    good = write_npz_atomically(tmp_path / "good.npz", {"x": np.zeros(100)})
    bad = tmp_path / "bad.npz"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2] if content is None else content)
    with pytest.raises(NpzFileError, match=rf"checkpoint .*bad\.npz is {problem}"):
        read_npz(bad, "checkpoint")


def test_missing_file_and_single_npy_are_refused(tmp_path):
    with pytest.raises(NpzFileError, match="does not exist"):
        read_npz(tmp_path / "none.npz")
    np.save(tmp_path / "one.npy", np.zeros(2))
    with pytest.raises(NpzFileError, match="not an .npz archive"):
        read_npz(tmp_path / "one.npy")


def test_object_arrays_are_never_written_nor_read(tmp_path):
    with pytest.raises(TypeError, match="without pickle"):
        write_npz_atomically(tmp_path / "o.npz", {"o": np.array([None])})
    assert not (tmp_path / "o.npz").exists()
    np.savez(tmp_path / "pickled.npz", o=np.array([{"a": 1}], dtype=object))
    with pytest.raises(NpzFileError, match="pickled.npz"):
        read_npz(tmp_path / "pickled.npz")
