"""The speed paths of cnncore.fast_layers and fast_conv against the reference layers they stand for.

Chunking (one image per chunk, a partial last chunk, the whole batch at once),
the fused conv -> relu -> max pool, the pool's recorded argmax, the spatial
norms' twins, and caches passed between the fast and the reference backward.
Shapes cover stride 2 and 3, padding 0, both ways of computing dx (col2im at
stride > 1, a convolution of dout at stride 1), every conv kernel as the shape
chooses it (direct on the exact grid for few channels, on pitched rows for
more, Winograd F(2x2, 3x3) for 32+ channels in and out, dw too), overlapping and
non-tiling pools, ties. The choice of kernel is tested on the study nets' shapes.
"""

import copy

import numpy as np
import pytest

from cnncore import backend, fast_conv, fast_layers, layers

# In float64 the fast and reference layers sum the same terms in other orders:
# they agree to ~1e-15 relative to each array's largest entry.
SAME_TOL = 1e-12
CHUNK_SIZES = {"one image": 1, "partial last chunk": 2, "whole batch": 1 << 30}
CONVS = {
    "7x7-pad3": ((5, 3, 8, 8), (4, 3, 7, 7), {"stride": 1, "pad": 3}),
    "3x3-stride2-pad0": ((5, 2, 9, 7), (3, 2, 3, 3), {"stride": 2, "pad": 0}),
    "1x2-stride3": ((4, 2, 8, 9), (2, 2, 1, 2), {"stride": 3, "pad": 1}),
    # More taps than 2 per filter, stride 1: pitched rows; dx as a convolution of dout.
    "3x3-pad1-8-channels": ((5, 8, 6, 5), (3, 8, 3, 3), {"stride": 1, "pad": 1}),
    "5x5-pad0-9-channels": ((3, 9, 8, 7), (2, 9, 5, 5), {"stride": 1, "pad": 0}),
    # 3x3, stride 1, 16 or more channels in and out: Winograd F(2x2, 3x3) (see
    # small_winograd) for the output, dx and dw; odd output heights and widths crop the tile grid.
    "3x3-pad1-16-channels-winograd": ((3, 16, 7, 6), (16, 16, 3, 3), {"stride": 1, "pad": 1}),
    "3x3-pad0-17-channels-winograd": ((2, 17, 8, 5), (16, 17, 3, 3), {"stride": 1, "pad": 0}),
}
POOLS = {
    "2x2": {"pool_height": 2, "pool_width": 2, "stride": 2},
    "3x2-overlapping": {"pool_height": 3, "pool_width": 2, "stride": 1},
    "2x2-stride3-not-tiling": {"pool_height": 2, "pool_width": 2, "stride": 3},
}


def _assert_same(got, expected, name):
    np.testing.assert_allclose(got, expected, rtol=0, atol=SAME_TOL * np.abs(expected).max(), err_msg=name)


@pytest.fixture(params=list(CHUNK_SIZES.values()), ids=list(CHUNK_SIZES))
def chunk_images(request, monkeypatch):
    """The fast layers work on chunks of this many images (batches here have 3 to 6)."""
    monkeypatch.setattr(backend, "images_per_chunk", lambda N, bytes_per_image, xp: min(N, request.param))
    return request.param


@pytest.fixture
def small_winograd(monkeypatch):
    """Winograd for every 3x3 stride-1 conv with 16+ channels in and out, whatever its size,
    so that the named shapes, kept small for the naive loops' sake, reach it (the crossover
    fast_conv takes on real shapes is tested on the study nets' layers below)."""
    monkeypatch.setattr(fast_conv, "WINOGRAD_MIN_CHANNELS", 16)
    monkeypatch.setattr(fast_conv, "WINOGRAD_MIN_CHANNELS_DW", 16)  # (its own threshold, as it happens)
    monkeypatch.setattr(fast_conv, "WINOGRAD_MIN_OUTPUTS", 0)
    monkeypatch.setattr(fast_conv, "WINOGRAD_MIN_TILE_USE", 0)


def _conv_case(name, seed=0, integers=False):
    x_shape, w_shape, conv_param = CONVS[name]
    rng = np.random.default_rng(seed)
    if integers:  # small integers: many equal conv outputs, so pool windows tie
        x = rng.integers(-1, 2, x_shape).astype(float)
        w = rng.integers(-1, 2, w_shape).astype(float)
        return x, w, np.zeros(w_shape[0]), conv_param
    return rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[0]), conv_param


@pytest.mark.parametrize("conv", list(CONVS))
def test_chunked_conv_matches_naive_output_and_gradients(conv, chunk_images, small_winograd):
    x, w, b, conv_param = _conv_case(conv)
    out, cache = fast_layers.conv_forward_fast(x, w, b, conv_param)
    expected, naive_cache = layers.conv_forward_naive(x, w, b, conv_param)
    _assert_same(out, expected, "out")
    dout = np.random.default_rng(1).standard_normal(out.shape)
    for name, got, want in zip(("dx", "dw", "db"), fast_layers.conv_backward_fast(dout, cache),
                               layers.conv_backward_naive(dout, naive_cache)):
        _assert_same(got, want, name)


def _naive_conv_relu_pool(x, w, b, conv_param, pool_param, dout):
    a, conv_cache = layers.conv_forward_naive(x, w, b, conv_param)
    s, relu_cache = layers.relu_forward(a)
    out, pool_cache = layers.max_pool_forward_naive(s, pool_param)
    ds = layers.max_pool_backward_naive(dout, pool_cache)
    return out, layers.conv_backward_naive(layers.relu_backward(ds, relu_cache), conv_cache)


@pytest.mark.parametrize("integers", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("pool", list(POOLS))
@pytest.mark.parametrize("conv", list(CONVS))
def test_fused_conv_relu_pool_matches_the_naive_chain(conv, pool, integers, chunk_images, small_winograd):
    x, w, b, conv_param = _conv_case(conv, seed=2, integers=integers)
    pool_param = POOLS[pool]
    conv_out = layers.conv_forward_naive(x, w, b, conv_param)[0]
    if pool_param["pool_height"] > conv_out.shape[2] or pool_param["pool_width"] > conv_out.shape[3]:
        pytest.skip("the pool window does not fit this conv's output")
    out, cache = fast_layers.conv_relu_pool_forward_fast(x, w, b, conv_param, pool_param)
    dout = np.random.default_rng(3).standard_normal(out.shape)
    expected_out, expected_grads = _naive_conv_relu_pool(x, w, b, conv_param, pool_param, dout)
    np.testing.assert_array_equal(out > 0, expected_out > 0)
    _assert_same(out, expected_out, "out")
    grads = fast_layers.conv_relu_pool_backward_fast(dout, cache)
    for name, got, want in zip(("dx", "dw", "db"), grads, expected_grads):
        _assert_same(got, want, name)
    dx, dw, db = fast_layers.conv_relu_pool_backward_fast(dout, cache, need_dx=False)
    assert dx is None
    np.testing.assert_array_equal(dw, grads[1])
    np.testing.assert_array_equal(db, grads[2])


def test_fused_conv_relu_pool_keeps_float32_and_never_modifies_its_inputs(layer_contract):
    x, w, b, conv_param = _conv_case("7x7-pad3")
    layer_contract(fast_layers.conv_relu_pool_forward_fast, fast_layers.conv_relu_pool_backward_fast,
                   [x, w, b, conv_param, POOLS["2x2"]])


@pytest.mark.parametrize("pool", list(POOLS))
def test_pool_caches_pass_between_the_fast_and_the_naive_backward(pool, chunk_images):
    # Small integers: most windows tie, and the first maximum in row-major order wins.
    x = np.random.default_rng(4).integers(0, 3, (2, 3, 7, 8)).astype(float)
    pool_param = POOLS[pool]
    _, fast_cache = fast_layers.max_pool_forward_fast(x, pool_param)
    out, naive_cache = layers.max_pool_forward_naive(x, pool_param)
    dout = np.random.default_rng(5).standard_normal(out.shape)
    expected = layers.max_pool_backward_naive(dout, naive_cache)
    _assert_same(layers.max_pool_backward_naive(dout, fast_cache), expected, "naive backward, fast cache")
    _assert_same(fast_layers.max_pool_backward_fast(dout, naive_cache), expected, "fast backward, naive cache")
    _assert_same(fast_layers.max_pool_backward_fast(dout, fast_cache), expected, "fast backward, fast cache")


def test_conv_caches_pass_between_the_fast_and_the_naive_backward():
    x, w, b, conv_param = _conv_case("3x3-stride2-pad0")
    out, fast_cache = fast_layers.conv_forward_fast(x, w, b, conv_param)
    _, naive_cache = layers.conv_forward_naive(x, w, b, conv_param)
    dout = np.random.default_rng(6).standard_normal(out.shape)
    expected = layers.conv_backward_naive(dout, naive_cache)
    for got, want in zip(layers.conv_backward_naive(dout, fast_cache), expected):
        _assert_same(got, want, "naive backward, fast cache")
    for got, want in zip(fast_layers.conv_backward_fast(dout, naive_cache), expected):
        _assert_same(got, want, "fast backward, naive cache")


def _norm_inputs(shape=(6, 4, 3, 5), seed=7):
    rng = np.random.default_rng(seed)
    C = shape[1]
    # A mean far from 0 and unequal scales, so that centring matters.
    x = 3 + rng.standard_normal(shape) * rng.uniform(0.5, 2, (1, C, 1, 1))
    return x, 1 + 0.1 * rng.standard_normal(C), 0.1 * rng.standard_normal(C), rng.standard_normal(shape)


@pytest.mark.parametrize("gamma_shape", [(4,), (1, 4, 1, 1)], ids=["(C,)", "(1,C,1,1)"])
@pytest.mark.parametrize("mode", ["train", "test"])
def test_spatial_batchnorm_fast_matches_the_reference(mode, gamma_shape, chunk_images):
    x, gamma, beta, dout = _norm_inputs()
    gamma, beta = gamma.reshape(gamma_shape), beta.reshape(gamma_shape)
    rng = np.random.default_rng(8)
    bn_param = {"mode": mode, "momentum": 0.8, "running_mean": rng.standard_normal(4),
                "running_var": rng.uniform(0.5, 2, 4)}
    fast_param, reference_param = copy.deepcopy(bn_param), copy.deepcopy(bn_param)
    out, cache = fast_layers.spatial_batchnorm_forward_fast(x, gamma, beta, fast_param)
    expected, reference_cache = layers.spatial_batchnorm_forward(x, gamma, beta, reference_param)
    _assert_same(out, expected, "out")
    for key in ("running_mean", "running_var"):
        _assert_same(fast_param[key], reference_param[key], key)
    for name, got, want in zip(("dx", "dgamma", "dbeta"), fast_layers.spatial_batchnorm_backward_fast(dout, cache),
                               layers.spatial_batchnorm_backward(dout, reference_cache)):
        assert got.shape == want.shape
        _assert_same(got, want, name)


def test_spatial_batchnorm_fast_starts_running_statistics_as_the_reference_does():
    x, gamma, beta, _ = _norm_inputs()
    for mode in ("train", "test"):
        fast_param, reference_param = {"mode": mode}, {"mode": mode}
        fast_layers.spatial_batchnorm_forward_fast(x, gamma, beta, fast_param)
        layers.spatial_batchnorm_forward(x, gamma, beta, reference_param)
        assert set(fast_param) == set(reference_param)
        for key in ("running_mean", "running_var"):
            _assert_same(fast_param[key], reference_param[key], f"{mode} {key}")


@pytest.mark.parametrize("shape, G", [((6, 4, 3, 5), 1), ((6, 4, 3, 5), 2), ((6, 4, 3, 5), 4), ((3, 6, 1, 1), 6)],
                         ids=["layer-norm", "2-groups", "instance-norm", "one-value-per-group"])
def test_spatial_groupnorm_fast_matches_the_reference_and_shares_its_cache(shape, G, chunk_images):
    x, gamma, beta, dout = _norm_inputs(shape)
    out, cache = fast_layers.spatial_groupnorm_forward_fast(x, gamma, beta, G, {"eps": 1e-4})
    expected, reference_cache = layers.spatial_groupnorm_forward(x, gamma, beta, G, {"eps": 1e-4})
    _assert_same(out, expected, "out")
    expected_grads = layers.spatial_groupnorm_backward(dout, reference_cache)
    for caches in ((fast_layers.spatial_groupnorm_backward_fast, cache),
                   (fast_layers.spatial_groupnorm_backward_fast, reference_cache),
                   (layers.spatial_groupnorm_backward, cache)):
        backward, c = caches
        for name, got, want in zip(("dx", "dgamma", "dbeta"), backward(dout, c), expected_grads):
            # Groups of one value: x_hat and dx are exactly 0 in both orders of evaluation.
            np.testing.assert_allclose(got, want, rtol=0, atol=SAME_TOL * max(np.abs(want).max(), 1e-300),
                                       err_msg=f"{backward.__name__} {name}")


@pytest.mark.parametrize(
    "forward, backward, args",
    [
        pytest.param(fast_layers.spatial_batchnorm_forward_fast, fast_layers.spatial_batchnorm_backward_fast,
                     list(_norm_inputs()[:3]) + [{"mode": "train", "running_mean": np.zeros(4),
                                                  "running_var": np.ones(4)}], id="batchnorm"),
        pytest.param(fast_layers.spatial_groupnorm_forward_fast, fast_layers.spatial_groupnorm_backward_fast,
                     list(_norm_inputs()[:3]) + [2, {}], id="groupnorm"),
    ],
)
def test_fast_norm_keeps_float32_and_never_modifies_its_inputs(forward, backward, args, layer_contract):
    layer_contract(forward, backward, args)


@pytest.mark.parametrize("conv", list(CONVS))
def test_each_named_conv_takes_the_kernel_its_comment_says(conv, small_winograd):
    x_shape, w_shape, conv_param = CONVS[conv]
    g = fast_conv.Geometry(x_shape, w_shape, conv_param["stride"], conv_param["pad"])
    assert fast_conv.algorithm(g) == ("winograd" if conv.endswith("winograd") else "direct")
    if not conv.endswith("winograd"):
        assert g.pitched == (conv in {"7x7-pad3", "3x3-pad1-8-channels", "5x5-pad0-9-channels"})


@pytest.mark.parametrize("batch, dw_kernels", [
    (2, ["direct, exact grid", "direct, pitched rows", "direct, pitched rows"]),
    (8, ["direct, exact grid", "winograd", "direct, pitched rows"]),
    (32, ["direct, exact grid", "winograd", "winograd"]),
])
def test_the_mnist_convnets_layers_take_the_kernels_measured_fastest_for_them(batch, dw_kernels):
    """The 3-block MNIST convnet's convolutions (1 -> 32 channels on 28x28, 32 -> 32 on 14x14
    and on 7x7, all 3x3 pad 1): Winograd only where the crossover measured in fast_conv says,
    for the filter gradient of the 32-channel convs from 512 outputs a batch; never for their
    forwards (nor dx)."""
    layers_ = [((batch, 1, 28, 28), (32, 1, 3, 3)), ((batch, 32, 14, 14), (32, 32, 3, 3)),
               ((batch, 32, 7, 7), (32, 32, 3, 3))]
    for pass_, expected in (("forward", [k.replace("winograd", "direct, pitched rows") for k in dw_kernels]),
                            ("filter gradient", dw_kernels)):
        chosen = []
        for x_shape, w_shape in layers_:
            g = fast_conv.Geometry(x_shape, w_shape, 1, 1)
            kind = fast_conv.algorithm(g, pass_)
            chosen.append(kind if kind == "winograd" else f"direct, {'pitched rows' if g.pitched else 'exact grid'}")
        assert chosen == expected, pass_


def test_64_channel_convolutions_take_winograd_forward_too():
    g = fast_conv.Geometry((8, 64, 8, 8), (64, 64, 3, 3), 1, 1)
    assert fast_conv.algorithm(g) == fast_conv.algorithm(g, "filter gradient") == "winograd"


def test_chunk_budget_is_the_cpu_one_for_numpy_and_unbounded_elsewhere():
    assert backend.chunk_bytes(np) == backend.CPU_CHUNK_BYTES
    assert backend.chunk_bytes(object()) >= 1 << 60


def test_forcing_a_kernel_applies_it_within_the_block_and_restores_the_choice_after():
    g = fast_conv.Geometry((2, 32, 14, 14), (32, 32, 3, 3), 1, 1)  # direct by shape
    with fast_conv.forced("winograd", "dx by col2im"):
        assert fast_conv.algorithm(fast_conv.Geometry((2, 32, 14, 14), (32, 32, 3, 3), 1, 1)) == "winograd"
        assert not fast_conv.dx_by_convolution(g)
    assert fast_conv.algorithm(g) == "direct" and fast_conv.dx_by_convolution(g)
    with pytest.raises(KeyError):
        with fast_conv.forced("fft"):
            pass
    assert fast_conv.algorithm(g) == "direct"


def test_forcing_the_exact_grid_reaches_the_layout_the_geometry_chooses():
    # The pitched rows' threshold lives in conv_geometry, beside the Geometry that reads it.
    def geometry():
        return fast_conv.Geometry((2, 32, 14, 14), (32, 32, 3, 3), 1, 1)

    assert geometry().pitched
    with fast_conv.forced("direct, exact grid"):
        assert not geometry().pitched
    assert geometry().pitched
    with fast_conv.forced("direct, pitched rows"):
        assert fast_conv.Geometry((2, 1, 28, 28), (32, 1, 3, 3), 1, 1).pitched  # exact grid by shape


@pytest.mark.parametrize("w_shape, stride, pad, expected", [
    ((16, 8, 4, 4), 2, 1, True),  # the ResNet's downsampling: two 2x2 blocks a side, no zero taps
    ((16, 8, 2, 2), 2, 0, False),  # its projection: one block, 1x1 after
    ((16, 8, 3, 3), 2, 1, False),  # padded to 4x4: 16/9 of the products
    ((16, 8, 3, 3), 1, 1, False),  # stride 1: nothing to regroup
])
def test_space_to_depth_takes_the_backward_of_strided_convs_whose_filters_it_divides(w_shape, stride, pad, expected):
    g = fast_conv.Geometry((4, 8, 28, 28), w_shape, stride, pad)
    assert fast_conv.space_to_depth_wins(g, "gradients") == expected
    assert not fast_conv.space_to_depth_wins(g)  # the forward: as fast on the exact grid


@pytest.mark.parametrize("conv", list(CONVS))
def test_conv_on_an_empty_batch_gives_what_the_naive_loops_give(conv):
    x_shape, w_shape, conv_param = CONVS[conv]
    x = np.zeros((0, *x_shape[1:]))
    w, b = np.random.default_rng(9).standard_normal(w_shape), np.zeros(w_shape[0])
    out, cache = fast_layers.conv_forward_fast(x, w, b, conv_param)
    expected, naive_cache = layers.conv_forward_naive(x, w, b, conv_param)
    assert out.shape == expected.shape
    dout = np.zeros(out.shape)
    for got, want in zip(fast_layers.conv_backward_fast(dout, cache), layers.conv_backward_naive(dout, naive_cache)):
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)
