"""cnncore.memory: the limit, the refusal's words, and the model estimates pinned to real nets."""

import numpy as np
import pytest

from cnncore import memory
from cnncore.cnn import ConvNet, ThreeLayerConvNet
from cnncore.fast_layers import conv_forward_fast
from cnncore.fc_net import FullyConnectedNet, TwoLayerNet
from cnncore.layers import conv_forward_naive
from cnncore.memory import GIB, LIMIT_ENV, MemoryLimitError
from cnncore.resnet import ResNet


@pytest.fixture
def available(monkeypatch):
    """available(n): the system reports n bytes available."""
    monkeypatch.delenv(LIMIT_ENV, raising=False)

    def set_available(nbytes):
        monkeypatch.setattr(memory, "available_bytes", lambda: nbytes)

    return set_available


def test_the_default_limit_is_half_the_available_memory(available):
    available(8 * GIB)
    assert memory.limit() == (4 * GIB, "half the 8 GiB available now")


def test_the_environment_sets_the_limit_instead(monkeypatch, available):
    available(8 * GIB)
    monkeypatch.setenv(LIMIT_ENV, "20")
    assert memory.limit() == (20 * GIB, f"${LIMIT_ENV}=20")


@pytest.mark.parametrize("text", ["0", "-1", "lots", "nan", "inf"])
def test_a_bad_limit_in_the_environment_is_refused_naming_the_variable(monkeypatch, text):
    monkeypatch.setenv(LIMIT_ENV, text)
    with pytest.raises(ValueError, match=rf"\${LIMIT_ENV} must be a number of GiB > 0, got '{text}'"):
        memory.require_fits(10 * GIB, "this")


def test_over_the_limit_is_refused_saying_what_how_much_and_how_to_raise_it(available):
    available(8 * GIB)
    with pytest.raises(MemoryLimitError, match=rf"^the thing would need about 5 GiB of memory, more than the limit "
                                               rf"of 4 GiB \(half the 8 GiB available now\); set \${LIMIT_ENV} to "
                                               r"raise the limit if that is meant$"):
        memory.require_fits(5 * GIB, "the thing")
    memory.require_fits(4 * GIB, "the thing")  # at the limit: fits


def test_small_estimates_never_read_the_system(monkeypatch):
    def unreadable():
        raise AssertionError("read the system for a small estimate")

    monkeypatch.setattr(memory, "available_bytes", unreadable)
    memory.require_fits(memory.CHEAP_BYTES, "a small thing")


def test_without_a_readable_available_memory_only_the_variable_limits(available, monkeypatch):
    available(None)
    memory.require_fits(10**15, "a huge thing")
    monkeypatch.setenv(LIMIT_ENV, "1")
    with pytest.raises(MemoryLimitError):
        memory.require_fits(2 * GIB, "a huge thing")


def test_the_available_memory_is_read_on_this_machine():
    found = memory.available_bytes()
    assert found is not None and found > 0


# ------------------------------------------------------------------ the estimates against real nets


NETS = [
    (ThreeLayerConvNet, dict(input_dim=(1, 8, 8), num_filters=4, filter_size=3, hidden_dim=8)),
    (ThreeLayerConvNet, dict(input_dim=(3, 9, 7), num_filters=5, filter_size=5, hidden_dim=6,
                             normalization="groupnorm", num_groups=5)),
    (ConvNet, dict(input_dim=(1, 28, 28), num_filters=(4, 6, 8), filter_size=3, hidden_dim=10,
                   normalization="batchnorm")),
    (ConvNet, dict(input_dim=(2, 13, 11), num_filters=(3, 3), filter_size=3, hidden_dim=4, num_classes=3)),
    (ConvNet, dict(input_dim=(1, 28, 28), num_filters=(2, 2, 2, 2, 2), filter_size=3, hidden_dim=4)),  # 1x1 maps
    (FullyConnectedNet, dict(hidden_dims=[7, 5], input_dim=12, normalization="batchnorm")),
    (FullyConnectedNet, dict(hidden_dims=[], input_dim=12, num_classes=4)),
    (FullyConnectedNet, dict(hidden_dims=[9, 9, 9], input_dim=20, normalization="layernorm")),
    (TwoLayerNet, dict(input_dim=12, hidden_dim=6, num_classes=3)),
    (ResNet, dict(input_dim=(1, 28, 28), num_filters=4)),
    (ResNet, dict(input_dim=(3, 7, 9), num_filters=2, blocks_per_stage=2, normalization=None, num_classes=3)),
]


@pytest.mark.parametrize("cls, kwargs", NETS, ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_the_parameter_count_read_from_a_config_is_the_nets_own(cls, kwargs):
    net = cls(**kwargs, seed=0)
    assert memory.parameter_count(net.config) == sum(p.size for p in net.params.values())


def test_a_step_needs_more_at_a_bigger_batch_and_with_more_optimiser_state():
    config = ThreeLayerConvNet(input_dim=(1, 8, 8), num_filters=4, filter_size=3, hidden_dim=8).config
    assert memory.training_step_bytes(config, 64) > memory.training_step_bytes(config, 32)
    assert memory.training_step_bytes(config, 32, 2) > memory.training_step_bytes(config, 32, 0)


def test_a_float64_net_needs_more_than_the_same_in_float32():
    config = ThreeLayerConvNet(input_dim=(1, 8, 8), num_filters=4, filter_size=3, hidden_dim=8).config
    assert memory.training_step_bytes({**config, "dtype": "float64"}, 8) > memory.training_step_bytes(config, 8)


@pytest.mark.parametrize("config", [{"model": "SomeOtherNet"}, {"model": "ConvNet", "num_filters": "many"},
                                    {"model": "ConvNet", "input_dim": [1, 8, 8], "dtype": "float999"}])
def test_a_config_it_cannot_read_gets_no_estimate(config):
    assert memory.parameter_count(config) is None or memory.training_step_bytes(config, 8) is None


# ------------------------------------------------------------------ the convolution's padding


@pytest.mark.parametrize("conv", [conv_forward_fast, conv_forward_naive])
def test_a_convolution_padded_beyond_memory_is_refused_naming_pad(conv):
    x, w, b = np.ones((1, 1, 4, 4)), np.ones((1, 1, 3, 3)), np.zeros(1)
    with pytest.raises(MemoryLimitError, match=r"^a convolution of x \(1, 1, 4, 4\) by w \(1, 1, 3, 3\) with "
                                               r"conv_param\['pad'\] = 1000000 \(output \(1, 1, 2000002, 2000002\)\) "
                                               r"would need about .* TiB of memory"):
        conv(x, w, b, {"stride": 1, "pad": 10**6})


def test_a_convolution_padded_more_than_its_filter_still_works_when_it_fits():
    x, w, b = np.ones((1, 1, 4, 4)), np.ones((1, 1, 3, 3)), np.zeros(1)
    out, _ = conv_forward_fast(x, w, b, {"stride": 1, "pad": 5})
    assert out.shape == (1, 1, 12, 12) and out[0, 0, 0, 0] == 0
