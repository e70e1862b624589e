"""Diagnostics of normalisation statistics, on inputs whose answers are known.

The nets here pass their input straight to the first norm layer (an identity weight:
a 1x1 convolution or a square affine layer with zero bias), so the features the
statistics are taken of are the constructed ones.
"""

import math

import numpy as np
import pytest
from scipy.special import gammaln, polygamma

from cnncore import backend, diagnostics
from cnncore.cnn import ConvNet, ThreeLayerConvNet
from cnncore.fc_net import FullyConnectedNet

BATCH, BATCHES, CHANNELS = 8, 400, 16
# Var(batch mean) is estimated from K=400 batches: relative standard error sqrt(2/399) = 7%
# per channel; the median over 16 channels has about 1.25 * 7% / 4 = 2.2%. 10% is over
# four standard errors (six seeds of these tests came within 4.1%).
N_EFF_TOL = 0.10


def identity_conv_net(normalization="batchnorm", channels=4, size=4, **kw):
    """A three-layer net whose norm layer sees its input images unchanged (1x1 identity conv)."""
    net = ThreeLayerConvNet(input_dim=(channels, size, size), num_filters=channels, filter_size=1, hidden_dim=5,
                            num_classes=3, weight_scale=0.3, dtype=np.float64, normalization=normalization,
                            seed=0, **kw)
    net.params["W1"] = np.eye(channels).reshape(channels, channels, 1, 1)
    return net


def identity_fc_net(normalization="batchnorm", features=16):
    net = FullyConnectedNet([features], input_dim=features, num_classes=3, normalization=normalization,
                            weight_scale=0.3, dtype=np.float64, seed=0)
    net.params["W1"] = np.eye(features)
    return net


def trigamma(x):
    return float(polygamma(1, x))


def test_iid_gaussian_features_give_n_eff_close_to_the_batch_size_in_fc_batch_norm():
    X = np.random.default_rng(0).standard_normal((4000, 16))
    moments = diagnostics.sample_batch_moments(identity_fc_net(), X, BATCH, BATCHES, seed=1)
    metrics = diagnostics.effective_sample_sizes(moments)
    assert metrics["norm1/nominal"] == BATCH
    assert metrics["norm1/n_eff"] == pytest.approx(BATCH, rel=N_EFF_TOL)


def test_a_feature_constant_within_each_image_gives_n_eff_close_to_b_not_bhw():
    per_image = np.random.default_rng(0).standard_normal((2000, CHANNELS, 1, 1))
    X = np.broadcast_to(per_image, (2000, CHANNELS, 4, 4)).copy()
    moments = diagnostics.sample_batch_moments(identity_conv_net(channels=CHANNELS), X, BATCH, BATCHES, seed=1)
    metrics = diagnostics.effective_sample_sizes(moments)
    assert metrics["norm1/nominal"] == BATCH * 4 * 4
    assert metrics["norm1/n_eff"] == pytest.approx(BATCH, rel=N_EFF_TOL)


def test_a_feature_iid_over_positions_gives_n_eff_close_to_bhw():
    X = np.random.default_rng(0).standard_normal((2000, CHANNELS, 4, 4))
    moments = diagnostics.sample_batch_moments(identity_conv_net(channels=CHANNELS), X, BATCH, BATCHES, seed=1)
    assert diagnostics.effective_sample_sizes(moments)["norm1/n_eff"] == pytest.approx(BATCH * 4 * 4, rel=N_EFF_TOL)


def test_log_batch_variance_spread_follows_the_chi_square_law():
    # The biased variance of n Gaussian values is sigma^2 * chi2(n - 1) / n, so the
    # standard deviation of its log is sqrt(trigamma((n - 1) / 2)): 0.126 for n = 128.
    X = np.random.default_rng(0).standard_normal((2000, CHANNELS, 4, 4))
    moments = diagnostics.sample_batch_moments(identity_conv_net(channels=CHANNELS), X, BATCH, BATCHES, seed=1)
    expected = math.sqrt(trigamma((BATCH * 4 * 4 - 1) / 2))
    # The sample std of K=400 values has relative standard error 1/sqrt(2*399) = 3.5% per
    # channel, about 1.1% for the median over 16 channels.
    assert diagnostics.log_variance_spreads(moments)["norm1/log_var_spread"] == pytest.approx(expected, rel=0.06)


def test_group_log_variances_are_each_samples_group_variances():
    rng = np.random.default_rng(0)
    pattern = rng.standard_normal((1, 1, 12))
    scales = np.exp(rng.standard_normal((5, 3, 1)))
    a = (scales * pattern).reshape(5, 6, 2, 3)  # 3 groups of 2 channels, each a scaled copy of pattern
    expected = np.log(scales[..., 0] ** 2 * pattern.var())
    np.testing.assert_allclose(diagnostics.group_log_variances(a, 3), expected, rtol=1e-12)


def test_group_statistics_spread_follows_the_chi_square_law():
    # Group norm with G=2 of 4 channels on 4x4 maps: each group variance pools m = 32
    # values, so the std over images of its log is sqrt(trigamma((m - 1) / 2)); over
    # 3000 images the sample std has relative standard error 1.3%; 6% is over four.
    X = np.random.default_rng(0).standard_normal((3000, 4, 4, 4))
    net = identity_conv_net("groupnorm", num_groups=2)
    spread = diagnostics.group_statistics_spread(net, X, batch_size=700)["norm1/group_log_var_spread"]
    assert spread == pytest.approx(math.sqrt(trigamma(31 / 2)), rel=0.06)


def test_group_statistics_spread_leaves_out_batch_norm_layers():
    X = np.random.default_rng(0).standard_normal((10, 4, 4, 4))
    assert diagnostics.group_statistics_spread(identity_conv_net("batchnorm"), X) == {}


@pytest.mark.parametrize("make", [
    lambda: ConvNet(input_dim=(3, 8, 8), num_filters=(4, 4), filter_size=3, hidden_dim=8, num_classes=3,
                    weight_scale=0.3, normalization="groupnorm", num_groups=2, dtype=np.float64, seed=0),
    lambda: identity_fc_net("layernorm"),
], ids=["conv-groupnorm", "fc-layernorm"])
def test_group_kind_norms_have_equal_train_and_test_mode_errors(make):
    net = make()
    rng = np.random.default_rng(0)
    shape = (3, 8, 8) if isinstance(net, ConvNet) else (16,)
    X, y = rng.standard_normal((53, *shape)), rng.integers(0, 3, 53)
    errors = diagnostics.train_test_error(net, X, y, batch_size=4)
    assert errors["train_mode_error"] == errors["test_mode_error"]
    assert errors["test_mode_error"] == np.mean(net.predict(X) != y)


def test_batch_norm_whose_running_statistics_are_its_only_batchs_has_equal_train_and_test_errors():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 16)) * 2 + 1, rng.integers(0, 3, 40)
    net = identity_fc_net()
    net.bn_params[0]["running_mean"], net.bn_params[0]["running_var"] = X.mean(axis=0), X.var(axis=0)
    errors = diagnostics.train_test_error(net, X, y, batch_size=40)
    assert errors["train_mode_error"] == errors["test_mode_error"]
    # Not equal by construction: with running statistics that are not the batch's, test mode scores otherwise.
    net.bn_params[0]["running_mean"] = X.mean(axis=0) + 3 * X.std(axis=0)
    shifted = diagnostics.train_test_error(net, X, y, batch_size=40)
    assert shifted["train_mode_error"] == errors["train_mode_error"] != shifted["test_mode_error"]
    # In batches of 4 the batch statistics differ from the running ones, and so do the scores.
    assert not np.allclose(net.scores(X[:4], "train"), net.scores(X[:4], "test"))


def test_train_mode_scores_each_batch_with_its_own_statistics_and_test_mode_with_the_running_ones():
    """Running statistics far from the data's (zero mean, unit variance for features of mean 3 and sd 2): in
    one batch of every image, train mode is the net normalising with the whole set's statistics, test mode
    the net as predict() scores it, and the two disagree."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 16)) * 2 + 3
    net = identity_fc_net()
    net.bn_params[0]["running_mean"], net.bn_params[0]["running_var"] = np.zeros(16), np.ones(16)
    train_labels = net.scores(X, "train").argmax(axis=1)
    test_labels = net.predict(X)
    y = train_labels.copy()
    y[:6] = (y[:6] + 1) % 3  # 6 of 60 wrong in train mode, whatever test mode says
    errors = diagnostics.train_test_error(net, X, y, batch_size=60)
    assert errors["train_mode_error"] == pytest.approx(6 / 60)
    assert errors["test_mode_error"] == pytest.approx(np.mean(test_labels != y))
    assert np.mean(test_labels != train_labels) > 0.1  # the two modes really do score differently here
    assert errors["test_mode_error"] != pytest.approx(errors["train_mode_error"])


def test_train_mode_error_counts_every_image_once_in_batches_of_the_training_size():
    """53 images in batches of 4: the last batch is filled from the start, and those images are not
    counted twice. With batch norm's statistics in train mode taken per batch, each image's label
    depends on its batch; with a group-kind norm it does not, so the train-mode error is the test
    mode's exactly, and a count off by the refilled images would show."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((53, 16)) * 2 + 3
    net = identity_fc_net("layernorm")
    y = rng.integers(0, 3, 53)
    errors = diagnostics.train_test_error(net, X, y, batch_size=4)
    expected = np.mean(net.scores(X, "train").argmax(axis=1) != y)
    assert errors["train_mode_error"] == pytest.approx(expected) and 0 < expected < 1
    assert errors["test_mode_error"] == pytest.approx(np.mean(net.predict(X) != y))


def test_test_mode_labels_at_hand_give_the_errors_scoring_would_and_are_what_is_counted():
    # A trial hands the final net's predicted test labels to its diagnostics: the same fractions to the bit,
    # with no test-mode pass of their own (labels that differ from the net's change exactly those errors).
    rng = np.random.default_rng(3)
    X_train, X, y = rng.standard_normal((90, 3, 8, 8)), rng.standard_normal((53, 3, 8, 8)), rng.integers(0, 3, 53)
    net = ConvNet(input_dim=(3, 8, 8), num_filters=(4, 4), filter_size=3, hidden_dim=8, num_classes=3,
                  weight_scale=0.3, normalization="batchnorm", dtype=np.float64, seed=0)
    net.loss(X_train[:30], rng.integers(0, 3, 30))  # running statistics that are not the initial ones
    labels = net.predict(X)
    assert diagnostics.train_test_error(net, X, y, 4, test_labels=labels) == diagnostics.train_test_error(net, X, y, 4)
    given = diagnostics.recomputed_statistics_error(net, X_train, X, y, test_labels=labels)
    assert given == diagnostics.recomputed_statistics_error(net, X_train, X, y)
    wrong = (labels + 1) % 3
    assert diagnostics.train_test_error(net, X, y, 4, test_labels=wrong)["test_mode_error"] == np.mean(wrong != y)
    moved = diagnostics.recomputed_statistics_error(net, X_train, X, y, test_labels=wrong)
    assert moved["running_error"] == np.mean(wrong != y) and moved["recomputed_error"] == given["recomputed_error"]
    with pytest.raises(ValueError, match=r"test_labels must hold one label per image of X \(53,\)"):
        diagnostics.train_test_error(net, X, y, 4, test_labels=labels[:-1])


def test_recomputed_equals_running_when_the_running_statistics_are_the_true_ones():
    rng = np.random.default_rng(0)
    X_train = rng.standard_normal((300, 4, 4, 4)) * 3 + 2
    X, y = rng.standard_normal((50, 4, 4, 4)) * 3 + 2, rng.integers(0, 3, 50)
    net = identity_conv_net()
    net.bn_param["running_mean"] = X_train.mean(axis=(0, 2, 3))
    net.bn_param["running_var"] = X_train.var(axis=(0, 2, 3))
    metrics = diagnostics.recomputed_statistics_error(net, X_train, X, y, batch_size=64)
    assert metrics["recomputed_error"] == metrics["running_error"]
    # Pooled over 5 chunks against one pass: equal to rounding.
    assert metrics["norm1/mean_gap"] < 1e-12 and metrics["norm1/log_var_gap"] < 1e-12


def test_running_statistics_off_by_known_amounts_give_those_gaps():
    """Running means off by one sd (up in two channels, down in two) and variances off by a factor e^0.5 (up,
    down): gaps of 1 sd and 0.5 in log variance, whichever way each channel is off."""
    rng = np.random.default_rng(0)
    X_train = rng.standard_normal((200, 4, 4, 4)) * 3 + 2
    X, y = X_train[:30], rng.integers(0, 3, 30)
    net = identity_conv_net()
    mean, var = X_train.mean(axis=(0, 2, 3)), X_train.var(axis=(0, 2, 3))
    net.bn_param["running_mean"] = mean + np.array([1, 1, -1, -1]) * np.sqrt(var)
    net.bn_param["running_var"] = var * np.exp(np.array([0.5, -0.5, 0.5, -0.5]))
    metrics = diagnostics.recomputed_statistics_error(net, X_train, X, y, batch_size=64)
    assert metrics["norm1/mean_gap"] == pytest.approx(1.0, rel=1e-9)
    assert metrics["norm1/log_var_gap"] == pytest.approx(0.5, rel=1e-9)


def test_statistics_are_recomputed_layer_by_layer():
    rng = np.random.default_rng(0)
    X_train = rng.standard_normal((120, 3, 8, 8))
    net = ConvNet(input_dim=(3, 8, 8), num_filters=(4, 4), filter_size=3, hidden_dim=8, num_classes=3,
                  weight_scale=0.3, normalization="batchnorm", dtype=np.float64, seed=0)
    recomputed = diagnostics.recompute_bn_statistics(net, X_train, batch_size=50)
    first = net.norm_inputs(X_train, "test")[0]
    np.testing.assert_allclose(recomputed[0]["running_mean"], first.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(recomputed[0]["running_var"], first.var(axis=(0, 2, 3)), rtol=1e-12)
    # The second layer's input is computed with the first layer's recomputed statistics,
    # not with its running ones (zeros here, which give very different inputs).
    bn_params = net.copy_bn_params()
    bn_params[0].update(running_mean=recomputed[0]["running_mean"], running_var=recomputed[0]["running_var"])
    second = net.norm_inputs(X_train, "test", bn_params)[1]
    np.testing.assert_allclose(recomputed[1]["running_mean"], second.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(recomputed[1]["running_var"], second.var(axis=(0, 2, 3)), rtol=1e-12)
    assert not np.allclose(net.norm_inputs(X_train, "test")[1].var(axis=(0, 2, 3)), second.var(axis=(0, 2, 3)))


def test_no_diagnostic_changes_the_model():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((60, 3, 8, 8)), rng.integers(0, 3, 60)
    net = ConvNet(input_dim=(3, 8, 8), num_filters=(4, 4), filter_size=3, hidden_dim=8, num_classes=3,
                  weight_scale=0.3, normalization="batchnorm", dtype=np.float64, seed=0)
    net.loss(X[:20], y[:20])  # running statistics away from their zeros
    net.loss(X[:5])  # and every bn_param in test mode
    before = net.state_dict()
    modes = [p["mode"] for p in net.bn_params]
    moments = diagnostics.sample_batch_moments(net, X, 4, 5)
    diagnostics.effective_sample_sizes(moments), diagnostics.log_variance_spreads(moments)
    diagnostics.train_test_error(net, X, y, 8)
    diagnostics.recomputed_statistics_error(net, X, X, y, batch_size=25)
    diagnostics.batch_noise(net, X, 4, num_batches=3)
    after = net.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    assert [p["mode"] for p in net.bn_params] == modes


def test_batch_sizes_beyond_the_images_and_mismatched_labels_are_named():
    X = np.zeros((10, 16))
    net = identity_fc_net()
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1 and <= 10, got 11"):
        diagnostics.sample_batch_moments(net, X, 11)
    with pytest.raises(ValueError, match="y has 9 labels but X has 10 images"):
        diagnostics.train_test_error(net, X, np.zeros(9, dtype=int), 2)


def test_a_ghost_batch_norm_net_is_measured_on_batches_of_its_norm_batch():
    """Each sampled batch is one normalization group: a net with norm_batch = 2 measured at 2 images
    gives what the same net without norm_batch gives at 2, and any batch size may be asked for."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((41, 4, 4, 4)) * 2 + 1, rng.integers(0, 3, 41)
    ghost, plain = identity_conv_net(norm_batch=2), identity_conv_net()
    for net in (ghost, plain):
        net.bn_param["running_mean"], net.bn_param["running_var"] = np.full(4, 1.0), np.full(4, 4.0)
    got, want = (diagnostics.sample_batch_moments(net, X, 2, 20, seed=3)[0] for net in (ghost, plain))
    assert got.nominal == want.nominal == 2 * 4 * 4
    np.testing.assert_array_equal(got.means, want.means)
    assert diagnostics.train_test_error(ghost, X, y, 2) == diagnostics.train_test_error(plain, X, y, 2)
    diagnostics.train_test_error(ghost, X, y, 3)  # 3 images, one group, though norm_batch 2 would not divide them
    assert ghost.bn_param["norm_batch"] == 2  # the model's own bn_params keep it


# ---------------------------------------------------------------------------
# batch_noise: the noise batch statistics inject, relative to the signal, at every layer
# ---------------------------------------------------------------------------


def expected_batch_noise(n):
    """sqrt(2 (1 - E[s])) for n independent standard normal values per channel and batch.

    With population statistics (mean 0, variance 1) x_hat_pop = z, and with the batch's,
    x_hat_train = (z - m) / s (m the batch mean, s the biased sample sd; eps is negligible
    against unit variance). Per batch, mean(x_hat_train**2) = 1 = mean(z**2) and
    mean(x_hat_train * z) = mean((z - m) * z) / s = s**2 / s = s, so
    mean((x_hat_train - z)**2) = 2 (1 - s): the ratio of sums tends to sqrt(2 (1 - E[s])),
    with E[s] = sqrt(2/n) Gamma(n/2) / Gamma((n-1)/2) (the chi distribution with n - 1
    degrees of freedom, scaled by 1/sqrt(n)): about sqrt(1.5 / n) for large n.
    """
    mean_s = math.sqrt(2 / n) * math.exp(gammaln(n / 2) - gammaln((n - 1) / 2))
    return math.sqrt(2 * (1 - mean_s))


def test_expected_batch_noise_is_about_the_square_root_of_one_and_a_half_over_n_for_large_n():
    assert expected_batch_noise(10_000) == pytest.approx(math.sqrt(1.5 / 10_000), rel=1e-3)


# Over K = 200 batches and 16 channels, each channel's per-batch 2 (1 - s) has a relative sd of
# about 1 (a scaled chi-square with few degrees of freedom), so the mean over 3,200 has about 2%
# and its square root 1%; four seeds of these tests came within 2.4% (sd 1.2%): 4% is over three.
NOISE_TOL = 0.04


@pytest.mark.parametrize("batch, size", [(2, 4), (8, 1)], ids=["conv-2-images-of-4x4", "conv-8-images-of-1x1"])
def test_independent_gaussian_features_give_the_batch_noise_of_n_values(batch, size):
    X = np.random.default_rng(0).standard_normal((4000, CHANNELS, size, size))
    net = identity_conv_net(channels=CHANNELS, size=size)
    found = diagnostics.batch_noise(net, X, batch, num_batches=200, seed=1)
    assert found["norm1/batch_noise"] == pytest.approx(expected_batch_noise(batch * size * size), rel=NOISE_TOL)
    assert found["batch_noise_max"] == found["norm1/batch_noise"]


def _two_batch_norm_layers():
    """An FC net whose second norm layer sees the first's output unchanged: identity weights,
    zero biases and a beta of 10 on the first layer, so its relu passes everything."""
    net = FullyConnectedNet([CHANNELS, CHANNELS], input_dim=CHANNELS, num_classes=3, normalization="batchnorm",
                            weight_scale=0.3, dtype=np.float64, seed=0)
    net.params["W1"], net.params["W2"] = np.eye(CHANNELS), np.eye(CHANNELS)
    net.params["beta1"] = np.full(CHANNELS, 10.0)
    return net


def test_a_feature_normalised_upstream_keeps_the_noise_that_normalisation_put_there():
    """Layer 2 normalises what layer 1 already normalised over the same images: its batch mean
    never moves (n_eff is inflated without bound), yet its output carries layer 1's noise, no
    less: both layers' batch_noise is that of n = 8 independent values."""
    X = np.random.default_rng(0).standard_normal((4000, CHANNELS))
    net = _two_batch_norm_layers()
    found = diagnostics.batch_noise(net, X, BATCH, num_batches=200, seed=1)
    assert found["norm1/batch_noise"] == pytest.approx(expected_batch_noise(BATCH), rel=NOISE_TOL)
    assert found["norm2/batch_noise"] == pytest.approx(found["norm1/batch_noise"], rel=1e-3)
    moments = diagnostics.sample_batch_moments(net, X, BATCH, BATCHES, seed=1)
    n_eff = diagnostics.effective_sample_sizes(moments)
    assert n_eff["norm1/n_eff"] == pytest.approx(BATCH, rel=N_EFF_TOL)
    assert n_eff["norm2/n_eff"] > 1000 * BATCH  # what the issue found inflated


def test_batch_noise_is_zero_where_the_batch_statistics_are_the_population_ones():
    """Every batch the whole of X: its statistics are the population's, and nothing is noise."""
    X = np.random.default_rng(0).standard_normal((40, 4, 4, 4)) * 2 + 1
    found = diagnostics.batch_noise(identity_conv_net(), X, 40, num_batches=2)
    assert found["norm1/batch_noise"] < 1e-12


def test_batch_noise_uses_the_population_statistics_given_and_needs_batch_norm():
    X = np.random.default_rng(0).standard_normal((200, 4, 4, 4))
    net = identity_conv_net()
    population = diagnostics.recompute_bn_statistics(net, X)
    assert diagnostics.batch_noise(net, X, 4, population, num_batches=20) == diagnostics.batch_noise(
        net, X, 4, num_batches=20)
    # Population means 3 sd off: x_hat_pop = z - 3 against x_hat_train ~ z, a ratio near 3 / sqrt(1 + 9).
    far = [{**population[0], "running_mean": population[0]["running_mean"] + 3}]
    assert diagnostics.batch_noise(net, X, 4, far, num_batches=20)["norm1/batch_noise"] == pytest.approx(
        3 / math.sqrt(10), rel=0.05)
    assert diagnostics.batch_noise(identity_conv_net("groupnorm", num_groups=2), X, 4) == {}


def test_batch_noise_measures_every_layer_of_a_deep_net_with_batch_norm():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 3, 8, 8))
    net = ConvNet(input_dim=(3, 8, 8), num_filters=(4, 4, 4), filter_size=3, hidden_dim=8, num_classes=3,
                  weight_scale=0.3, normalization="batchnorm", dtype=np.float64, seed=0)
    small, large = (diagnostics.batch_noise(net, X, b, num_batches=30) for b in (2, 32))
    assert set(small) == {"norm1/batch_noise", "norm2/batch_noise", "norm3/batch_noise", "batch_noise_max"}
    # Fewer images per batch statistic, more noise, at every layer.
    assert all(small[k] > large[k] for k in small)


# ---------------------------------------------------------------------------
# Many batches in one forward pass: what each batch passed alone measures
# ---------------------------------------------------------------------------


def _trained_conv_net(normalization="batchnorm"):
    rng = np.random.default_rng(0)
    net = ConvNet(input_dim=(3, 6, 8), num_filters=(4, 4), filter_size=3, hidden_dim=8, num_classes=3,
                  weight_scale=0.5, normalization=normalization, num_groups=2, dtype=np.float64, seed=0)
    X, y = rng.standard_normal((45, 3, 6, 8)) * 2 + 1, rng.integers(0, 3, 45)
    net.loss(X[:20], y[:20])  # running statistics away from their zeros
    return net, X, y


@pytest.mark.parametrize("batch", [1, 2, 3, 7])
def test_batches_passed_together_measure_what_each_batch_passed_alone_measures(monkeypatch, batch):
    """The diagnostics pass up to the model's scoring batch of images at once, each batch normalised on its
    own; with a scoring batch of 1 every batch passes alone, as in training. The two agree to float64's rounding, batch by
    batch, and the model's own norm_batch (none here) is not what groups the images."""
    net, X, y = _trained_conv_net()
    population = diagnostics.recompute_bn_statistics(net, X)

    def measured():
        return (diagnostics.sample_batch_moments(net, X, batch, 9, seed=2),
                diagnostics.train_test_error(net, X, y, batch, seed=2),
                diagnostics.batch_noise(net, X, batch, population, num_batches=9, seed=2))

    together = measured()
    monkeypatch.setattr(backend, "CPU_SCORING_IMAGES", 1)
    alone = measured()
    for got, want in zip(together[0], alone[0]):
        assert got.nominal == want.nominal == batch * 6 * 8 // (4 if got.name == "norm2" else 1)
        assert got.means.shape == got.variances.shape == (9, 4)
        np.testing.assert_allclose(got.means, want.means, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got.variances, want.variances, rtol=1e-12)
    assert together[1] == alone[1]
    assert together[2] == pytest.approx(alone[2], rel=1e-12)
    if batch > 1:  # each batch's statistics, not the pass's: batches differ from one another
        assert np.ptp(together[0][0].means, axis=0).min() > 1e-3


def test_a_net_without_batch_norm_is_scored_once_and_both_modes_agree():
    net, X, y = _trained_conv_net("groupnorm")
    errors = diagnostics.train_test_error(net, X, y, 2)
    assert errors["train_mode_error"] == errors["test_mode_error"] == np.mean(net.predict(X) != y)


@pytest.mark.parametrize("shape, groups", [((6, 5, 3, 4), 1), ((6, 5, 3, 4), 3), ((8, 7), 4), ((300, 2, 40, 40), 2)],
                         ids=["conv", "conv-3-groups", "fc-4-groups", "conv-blocks-of-channels"])
def test_group_channel_moments_are_each_groups_float64_moments_whatever_the_mean(shape, groups):
    """A large mean against a unit spread, in float32: the moments are float64's, not float32's (whose variance
    by the mean of squares would have lost every digit), per group of consecutive images and per channel."""
    a = (np.random.default_rng(0).standard_normal(shape) + 1e4).astype(np.float32)
    means, variances = diagnostics.group_channel_moments(a, groups)
    reference = a.astype(np.float64).reshape(groups, shape[0] // groups, shape[1], -1)
    np.testing.assert_allclose(means, reference.mean(axis=(1, 3)), rtol=1e-14)
    np.testing.assert_allclose(variances, reference.var(axis=(1, 3)), rtol=1e-10)
    whole = diagnostics.channel_moments(a)
    np.testing.assert_allclose(whole[1], a.astype(np.float64).var(axis=(0, *range(2, a.ndim))), rtol=1e-10)
