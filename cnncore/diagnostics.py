"""How noisy are a model's normalisation statistics, and what does the noise cost?

Each function reads a model through the norm-layer protocol (see cnncore.classifier:
norm_layers, bn_params, norm_inputs, scores, copy_bn_params) and never changes it:
every forward pass computes with copies of its bn_params, so the parameters and the
running statistics are the same afterwards. Results are dicts of floats keyed
'norm{i}/<what>' per layer (i as in gamma{i}) or by name, ready to log as metrics.

A norm layer's input is (N, C, H, W) after a convolution and (N, D) after an affine
layer; a "channel" is axis 1, and batch norm pools each channel over every other
axis: N*H*W values, or N.

Batch statistics are measured at the normalization batch: the images one batch norm
statistic pools in training, the SGD batch or, for ghost batch norm, the model's
norm_batch. Each sampled batch is one such group of images, passed whole (the copies
of bn_params these functions compute with drop norm_batch), so a model trained with
norm_batch = g is measured on batches of g images, as its batch norm layers saw them.

Layer by layer:
  batch_noise: the noise batch statistics inject at each layer, relative to the signal
    (meaningful at every layer, behind other norm layers too)
  sample_batch_moments -> effective_sample_sizes, log_variance_spreads
  group_log_variances -> group_statistics_spread
Whole net:
  train_test_error, recompute_bn_statistics (precise batch norm's statistics),
  recomputed_statistics_error
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import checks
from .backend import array_module, to_numpy

# float64 values channel moments convert at a time: 2 MiB, which stays in cache.
_MOMENT_BLOCK = 2**18


@dataclass(frozen=True)
class LayerMoments:
    """Per-channel statistics of one norm layer's input over K batches.

    name, kind: the layer's ('norm{i}', 'batchnorm' or 'groupnorm').
    nominal: the values each batch statistic pools per channel (b*H*W, or b).
    means, variances: (K, C), each batch's per-channel mean and biased variance:
      what batch norm computes in train mode (for a group-kind layer, what it
      would compute there).
    """

    name: str
    kind: str
    nominal: int
    means: np.ndarray
    variances: np.ndarray


def channel_moments(a) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance of a (N, C, ...) over every axis but 1, in float64 on the host."""
    means, variances = group_channel_moments(a, 1)
    return means[0], variances[0]


def group_channel_moments(a, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """channel_moments of each of groups consecutive blocks of a's N images (a batch each): (groups, C) each.

    Two passes in float64 over a few channels at a time (their mean, then the mean square
    about it): float64's rounding whatever the mean, without a float64 copy of all of a
    (half the time of one for a 500-image batch of 32 28x28 maps).
    """
    a = to_numpy(a)
    N, C = a.shape[:2]
    x = a.reshape(groups, N // groups, C, -1)
    values = x.shape[1] * x.shape[3]  # per group and channel
    means, variances = np.empty((groups, C)), np.empty((groups, C))
    per_block = max(1, _MOMENT_BLOCK // (N * x.shape[3]))
    for c in range(0, C, per_block):
        block = x[:, :, c : c + per_block].astype(np.float64)
        mean = block.mean(axis=(1, 3))
        block -= mean[:, None, :, None]
        means[:, c : c + per_block] = mean
        variances[:, c : c + per_block] = np.einsum("gbcl,gbcl->gc", block, block) / values
    return means, variances


def sample_batch_moments(model, X, batch_size: int, num_batches: int = 200, seed: int = 0) -> list[LayerMoments]:
    """The batch statistics each norm layer sees in training, over num_batches batches.

    batch_size: the normalization batch (see the module's docstring).
    Draws num_batches batches of batch_size distinct images of X (each uniformly
    without replacement, independently of the others, from default_rng(seed)),
    passes each through the model in train mode on copies of its bn_params (so
    every batch norm layer normalises with the batch's own statistics, and dropout
    drops, as in training; the model's running statistics stay as they are), and records
    the per-channel mean and biased variance of every norm layer's input.
    Returns one LayerMoments per norm layer, in forward order.
    """
    batch_size = checks.require_int("batch_size", batch_size, minimum=1, maximum=len(X))
    num_batches = checks.require_int("num_batches", num_batches, minimum=2)
    chosen = _draw_batches(len(X), batch_size, num_batches, seed)
    layers = model.norm_layers()
    moments, nominal = [[] for _ in layers], [0] * len(layers)
    for rows, bn_params in _passes(model, len(chosen), batch_size):
        for k, a in enumerate(model.norm_inputs(X[chosen[rows]], "train", bn_params)):
            moments[k].append(group_channel_moments(a, len(a) // batch_size))
            nominal[k] = batch_size * math.prod(a.shape[2:])
    return [LayerMoments(layer.name, layer.kind, nominal[k], np.concatenate([m[0] for m in moments[k]]),
                         np.concatenate([m[1] for m in moments[k]]))
            for k, layer in enumerate(layers)]


def _draw_batches(num_images: int, batch_size: int, num_batches: int, seed: int) -> np.ndarray:
    """The indices of num_batches batches of batch_size distinct images, one after the other (each uniformly
    without replacement, independently of the others, from default_rng(seed))."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(num_images, batch_size, replace=False) for _ in range(num_batches)])


def _passes(model, num_images: int, batch_size: int):
    """(rows, bn_params) for forward passes over num_images images that are batches of batch_size one after
    the other: each pass a slice of whole batches, up to model.scoring_batch() images (the per-call cost of a
    pass is then paid once per pass, not once per batch of 2), and copies of the model's bn_params in which
    every batch norm layer normalises each batch with its own statistics (the model's norm_batch dropped,
    batch_size in its place, as ghost batch norm groups images), as if each batch passed alone. A model with
    dropout passes one batch at a time, its masks drawn per call as in training."""
    together = 1 if _has_dropout(model) else max(1, model.scoring_batch() // batch_size)
    per_pass = batch_size * together
    kinds = [layer.kind for layer in model.norm_layers()]
    for start in range(0, num_images, per_pass):
        rows = slice(start, min(start + per_pass, num_images))
        bn_params = whole_batch_bn_params(model)
        if rows.stop - rows.start > batch_size:
            for kind, bn_param in zip(kinds, bn_params):
                if kind == "batchnorm":
                    bn_param["norm_batch"] = batch_size
        yield rows, bn_params


def _has_dropout(model) -> bool:
    """Whether the model drops units in train mode (FullyConnectedNet's dropout): masks drawn per call."""
    return getattr(model, "use_dropout", False)


def effective_sample_size(means: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """n_eff per channel: Var(the feature) / Var(the batch mean), from K equal batches.

    means, variances: (K, C) per-batch means and biased variances of the same
    number of values each. Var(the feature) is that of all K batches' values
    pooled (the mean of the batch variances plus the variance of the batch means);
    Var(the batch mean) is the sample variance (ddof=1) of the K means. For
    independent values n_eff is the count each batch pools; values that move
    together (the positions of one image) make it smaller. Returns (C,).
    """
    pooled = variances.mean(axis=0) + means.var(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return pooled / means.var(axis=0, ddof=1)


def effective_sample_sizes(moments: list[LayerMoments]) -> dict[str, float]:
    """Per layer, 'norm{i}/n_eff': the median over channels of effective_sample_size,
    and 'norm{i}/nominal': the count each batch statistic pools (b*H*W, or b).

    The estimate of Var(the batch mean) from K batches has a relative standard
    error of about sqrt(2 / (K - 1)) per channel (10% at K=200); the median over
    channels is steadier.
    """
    metrics = {}
    for m in moments:
        metrics[f"{m.name}/n_eff"] = _median(effective_sample_size(m.means, m.variances))
        metrics[f"{m.name}/nominal"] = float(m.nominal)
    return metrics


def log_variance_spreads(moments: list[LayerMoments]) -> dict[str, float]:
    """Per layer, 'norm{i}/log_var_spread': the median over channels of the standard
    deviation (ddof=1) over the K batches of log(batch variance).

    It is the relative noise of the scale batch norm divides by: for n independent
    Gaussian values about sqrt(2 / (n - 1)).
    """
    metrics = {}
    for m in moments:
        with np.errstate(divide="ignore", invalid="ignore"):
            metrics[f"{m.name}/log_var_spread"] = _median(np.log(m.variances).std(axis=0, ddof=1))
    return metrics


def group_log_variances(a, num_groups: int) -> np.ndarray:
    """log(each sample's group variance), (N, G), as group norm computes the variance.

    a: (N, C, ...) a norm layer's input; each sample's C channels split into num_groups
    groups, each group's biased variance taken over its C/G channels and every position.
    """
    a = np.asarray(to_numpy(a), dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(a.reshape(len(a), num_groups, -1).var(axis=2))


def group_statistics_spread(model, X, batch_size: int | None = None) -> dict[str, float]:
    """Per group-kind norm layer (group, layer or instance norm), 'norm{i}/group_log_var_spread':
    the standard deviation (ddof=1) over every image of X of log(the image's group
    variance) (see group_log_variances), median over groups.

    It is how much the scale group norm divides by moves from one image to the next.
    The images pass in test mode, batch_size at a time (None: model.scoring_batch();
    group norm is the same in both modes); layers of the other kinds are left out.
    """
    batch_size = model.scoring_batch(batch_size)
    layers = [(k, layer) for k, layer in enumerate(model.norm_layers()) if layer.kind == "groupnorm"]
    logs = {k: [] for k, _ in layers}
    for i in range(0, len(X), batch_size) if layers else ():
        inputs = model.norm_inputs(X[i : i + batch_size], "test")
        for k, layer in layers:
            logs[k].append(group_log_variances(inputs[k], layer.num_groups))
    return {f"{layer.name}/group_log_var_spread": _median(np.concatenate(logs[k]).std(axis=0, ddof=1))
            for k, layer in layers}


def train_test_error(model, X, y, batch_size: int, seed: int = 0, test_labels=None) -> dict[str, float]:
    """The error on X in train mode, in batches of the normalization batch, against test mode.

    batch_size: the normalization batch (see the module's docstring).
    X is shuffled (default_rng(seed)) and cut into batches of batch_size, the last
    filled up with images from the start (predicted once, in their first batch), so
    every batch holds batch_size images as in training. Each batch is scored in train
    mode on copies of bn_params (batch norm with the batch's statistics, dropout on),
    and X in test mode (running statistics), where an image's scores do not depend on
    the images beside it. Returns 'train_mode_error' and 'test_mode_error', fractions
    of X misclassified. A net without batch norm or dropout scores the same in both
    modes (group norm has no running statistics): X is scored once, and both are the same.
    test_labels: the model's test-mode labels of X (model.predict(X)) when already at hand:
    X is then not scored in test mode again.
    """
    y = np.asarray(to_numpy(y))
    if len(y) != len(X):
        raise ValueError(f"y has {len(y)} labels but X has {len(X)} images")
    batch_size = checks.require_int("batch_size", batch_size, minimum=1, maximum=len(X))
    test_error = _test_mode_error(model, X, y, test_labels)
    if not (_has_dropout(model) or any(layer.kind == "batchnorm" for layer in model.norm_layers())):
        return {"train_mode_error": test_error, "test_mode_error": test_error}
    order = np.random.default_rng(seed).permutation(len(X))
    order = np.concatenate([order, order[: -len(X) % batch_size]])
    wrong = 0
    for rows, bn_params in _passes(model, len(order), batch_size):
        scored = order[rows][: max(0, len(X) - rows.start)]  # the refilled images at the end were scored before
        labels = _labels(model.scores(X[order[rows]], "train", bn_params))[: len(scored)]
        wrong += int((labels != y[scored]).sum())
    return {"train_mode_error": wrong / len(X), "test_mode_error": test_error}


def whole_batch_bn_params(model) -> list:
    """Copies of the model's bn_params without norm_batch: each batch they normalise is one group."""
    bn_params = model.copy_bn_params()
    for bn_param in bn_params:
        bn_param.pop("norm_batch", None)
    return bn_params


def recompute_bn_statistics(model, X_train, batch_size: int | None = None) -> list:
    """Copies of the model's bn_params with each batch norm layer's running mean and
    variance replaced by the exact statistics of its input over all of X_train.

    Layer by layer in forward order: layer k's input is computed in test mode with
    the layers before it already recomputed, batch_size images at a time (None:
    model.scoring_batch()), and its per-channel mean and biased variance pooled over
    every image and position.
    """
    batch_size = model.scoring_batch(batch_size)
    bn_params = model.copy_bn_params()
    for k, layer in enumerate(model.norm_layers()):
        if layer.kind != "batchnorm":
            continue
        count, mean, m2 = 0, 0.0, 0.0  # Chan et al.'s pairwise update: no cancellation
        for i in range(0, len(X_train), batch_size):
            a = model.norm_inputs(X_train[i : i + batch_size], "test", bn_params, count=k + 1)[k]
            n = a.shape[0] * math.prod(a.shape[2:])
            batch_mean, batch_var = channel_moments(a)
            delta, total = batch_mean - mean, count + n
            mean, m2 = mean + delta * n / total, m2 + batch_var * n + delta**2 * count * n / total
            count = total
        old = bn_params[k]["running_mean"]
        xp = array_module(old)
        bn_params[k]["running_mean"] = xp.asarray(mean, dtype=old.dtype)
        bn_params[k]["running_var"] = xp.asarray(m2 / count, dtype=old.dtype)
    return bn_params


def recomputed_statistics_error(model, X_train, X, y, batch_size: int | None = None,
                                recomputed: list | None = None, test_labels=None) -> dict[str, float]:
    """The test-mode error on X with the running averages against exact training-set statistics.

    Returns 'running_error' (the model as it is), 'recomputed_error' (every batch
    norm layer's running mean and variance replaced by recompute_bn_statistics: the
    error of precise batch norm), and per batch norm layer how far the running averages
    were from those statistics: 'norm{i}/mean_gap', the median over channels of
    |running mean - mean| / std, and 'norm{i}/log_var_gap', the median over channels
    of |log(running var / var)|. recomputed: recompute_bn_statistics(model, X_train)
    when already at hand, and test_labels the model's test-mode labels of X (model.predict(X))
    likewise. batch_size: images per pass (None: model.scoring_batch()).
    """
    y = np.asarray(to_numpy(y))
    if len(y) != len(X):
        raise ValueError(f"y has {len(y)} labels but X has {len(X)} images")
    if recomputed is None:
        recomputed = recompute_bn_statistics(model, X_train, batch_size)
    metrics = {"running_error": _test_mode_error(model, X, y, test_labels, batch_size),
               "recomputed_error": error_with(model, X, y, recomputed, batch_size)}
    for layer, own, exact in zip(model.norm_layers(), model.bn_params, recomputed):
        if layer.kind == "batchnorm":
            mean, var = (np.asarray(to_numpy(exact[k]), dtype=np.float64) for k in ("running_mean", "running_var"))
            run_mean, run_var = (np.asarray(to_numpy(own[k]), dtype=np.float64) for k in ("running_mean", "running_var"))
            with np.errstate(divide="ignore", invalid="ignore"):
                metrics[f"{layer.name}/mean_gap"] = _median(np.abs(run_mean - mean) / np.sqrt(var))
                metrics[f"{layer.name}/log_var_gap"] = _median(np.abs(np.log(run_var / var)))
    return metrics


def error_with(model, X, y, bn_params: list, batch_size: int | None = None) -> float:
    """The fraction of X that the model misclassifies in test mode with these bn_params (e.g.
    recompute_bn_statistics': the error of precise batch norm), batch_size images a pass (None:
    model.scoring_batch())."""
    batch_size = model.scoring_batch(batch_size)
    labels = np.concatenate([_labels(model.scores(X[i : i + batch_size], "test", bn_params))
                             for i in range(0, len(X), batch_size)])
    return float(np.mean(labels != np.asarray(to_numpy(y))))


def _test_mode_error(model, X, y, test_labels=None, batch_size: int | None = None) -> float:
    """error_with the model's own statistics, or (test_labels given) the same fraction from those labels."""
    if test_labels is None:
        return error_with(model, X, y, model.copy_bn_params(), batch_size)
    test_labels = np.asarray(to_numpy(test_labels))
    if test_labels.shape != (len(X),):
        raise ValueError(f"test_labels must hold one label per image of X ({len(X)},), got shape {test_labels.shape}")
    return float(np.mean(test_labels != np.asarray(to_numpy(y))))


def batch_noise(model, X, batch_size: int, population: list | None = None, num_batches: int = 50,
                seed: int = 0) -> dict[str, float]:
    """How much noise batch statistics inject at each norm layer, relative to the signal there:
    a measure that means the same at every layer, however many norm layers came before.

    'norm{i}/batch_noise' = RMS(x_hat_train - x_hat_pop) / RMS(x_hat_pop), where x_hat is
    norm layer i's normalised output (before its gamma and beta) on num_batches batches of
    batch_size distinct images of X (the normalization batch: see the module's docstring;
    drawn as sample_batch_moments draws them, from default_rng(seed)): x_hat_train in train
    mode, every batch norm layer normalising with the batch's own statistics, as in training;
    x_hat_pop with population statistics, every batch norm layer normalising with its input's
    statistics over X (precise batch norm: recompute_bn_statistics(model, X), or population
    when given). Both sums run over every value of every batch. The difference at layer i is
    the noise of its own batch statistics plus what the layers before it passed on; a layer
    whose input an earlier batch norm already normalised over the same images (its batch mean
    then barely moves, which inflates n_eff) still shows the noise that normalisation put there.
    Also 'batch_noise_max', the largest over the layers.

    Why x_hat: gamma and beta are the same in both modes, and a large beta would shrink the
    ratio without changing the noise; x_hat has unit variance per channel under population
    statistics, so every channel counts alike and layers and nets compare.
    Known answer: n independent values per channel and batch, Gaussian, at the first layer:
    batch_noise**2 tends to 2 (1 - E[s]), s the biased sample standard deviation of n standard
    normal values (E[s] = sqrt(2/n) Gamma(n/2) / Gamma((n-1)/2)), about 1.5 / n for large n.
    Group-kind layers are measured too (their x_hat moves only with what batch norm layers
    before them pass on); a model without batch norm gives {}. Dropout, if any, is on in train
    mode as in training, and its noise counts too.
    """
    layers = model.norm_layers()
    if not any(layer.kind == "batchnorm" for layer in layers):
        return {}
    batch_size = checks.require_int("batch_size", batch_size, minimum=1, maximum=len(X))
    num_batches = checks.require_int("num_batches", num_batches, minimum=1)
    if population is None:
        population = recompute_bn_statistics(model, X)
    chosen = _draw_batches(len(X), batch_size, num_batches, seed)
    noise, signal = np.zeros(len(layers)), np.zeros(len(layers))
    for rows, bn_params in _passes(model, len(chosen), batch_size):
        batch = X[chosen[rows]]
        trained = model.norm_inputs(batch, "train", bn_params)
        exact = model.norm_inputs(batch, "test", population)
        for k, layer in enumerate(layers):
            x_train = _normalised(trained[k], layer, population[k], "train", len(batch) // batch_size)
            x_pop = _normalised(exact[k], layer, population[k], "test")
            noise[k] += ((x_train - x_pop) ** 2).sum()
            signal[k] += (x_pop**2).sum()
    ratios = np.sqrt(noise / signal)
    metrics = {f"{layer.name}/batch_noise": float(r) for layer, r in zip(layers, ratios)}
    metrics["batch_noise_max"] = float(ratios.max())
    return metrics


def _normalised(a, layer, param: dict, mode: str, groups: int = 1) -> np.ndarray:
    """x_hat of a norm layer's input a (N, C, ...), in float64 on the host: batch norm in train mode over
    each of groups consecutive blocks of N / groups images (a batch each), in test mode with param's running
    statistics; a group-kind layer over each image's groups."""
    a = np.asarray(to_numpy(a), dtype=np.float64)
    eps = param.get("eps", 1e-5)
    if layer.kind == "groupnorm":
        per_image = a.reshape(len(a), layer.num_groups, -1)
        mean, var = per_image.mean(axis=2, keepdims=True), per_image.var(axis=2, keepdims=True)
        return ((per_image - mean) / np.sqrt(var + eps)).reshape(a.shape)
    if mode == "train":
        mean, var = group_channel_moments(a, groups)
    else:
        mean, var = (np.asarray(to_numpy(param[k]), dtype=np.float64)[None] for k in ("running_mean", "running_var"))
    batches = a.reshape(len(mean), -1, a.shape[1], math.prod(a.shape[2:]))
    column = (len(mean), 1, a.shape[1], 1)
    return ((batches - mean.reshape(column)) / np.sqrt(var.reshape(column) + eps)).reshape(a.shape)


def _labels(scores) -> np.ndarray:
    return np.asarray(to_numpy(array_module(scores).argmax(scores, axis=1)))


def _median(values: np.ndarray) -> float:
    """The median of the finite-or-infinite values (NaN from constant channels left out); NaN if none."""
    values = values[~np.isnan(values)]
    return float(np.median(values)) if values.size else math.nan
