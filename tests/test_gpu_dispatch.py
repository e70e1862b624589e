"""The GPU path's CPU-side guarantees: NumPy dispatch, one module that knows CuPy, clear errors."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

import cnncore
from cnncore import backend
from cnncore.cnn import ThreeLayerConvNet
from cnncore.fast_layers import conv_forward_fast
from cnncore.optim import adam

HAS_CUPY = importlib.util.find_spec("cupy") is not None


def test_only_the_backend_module_imports_cupy():
    package = Path(cnncore.__file__).parent
    importers = {p.name for p in package.glob("*.py")
                 if re.search(r"^\s*(import cupy|from cupy)|import_module\(\"cupy\"\)", p.read_text(), re.M)}
    assert importers == {"backend.py"}


def test_numpy_inputs_stay_numpy_through_layers_and_optimisers():
    rng = np.random.default_rng(0)
    out, _ = conv_forward_fast(rng.standard_normal((1, 2, 5, 5)), rng.standard_normal((3, 2, 3, 3)),
                               np.zeros(3), {"stride": 1, "pad": 1})
    w, _ = adam(np.ones(4, dtype=np.float32), np.ones(4, dtype=np.float32))
    assert type(out) is np.ndarray and type(w) is np.ndarray and w.dtype == np.float32
    assert backend.array_module(out) is np and backend.device_of(out) == "cpu"


def test_cpu_model_keeps_numpy_parameters():
    net = ThreeLayerConvNet(input_dim=(1, 8, 8), num_filters=4, filter_size=3, hidden_dim=8, device="cpu")
    assert all(type(p) is np.ndarray for p in net.params.values())


@pytest.mark.skipif(HAS_CUPY, reason="CuPy is installed: the missing-CuPy error cannot occur")
def test_cuda_without_cupy_says_what_is_missing():
    with pytest.raises(RuntimeError, match=r"needs CuPy.*'gpu' extra"):
        ThreeLayerConvNet(input_dim=(1, 8, 8), device="cuda")
