"""Numerical gradients by central differences, and a checker for a layer's backward.

Run in float64: with h = 1e-5 the central difference is accurate to about
h**2 ~ 1e-10 relative, while float32 rounding alone would swamp it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .checks import require_real


def rel_error(x, y) -> float:
    """Worst elementwise relative error max(|x - y| / max(1e-8, |x| + |y|))."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"rel_error needs arrays of one shape, got {x.shape} and {y.shape}")
    if x.size == 0:
        return 0.0
    return float(np.max(np.abs(x - y) / np.maximum(1e-8, np.abs(x) + np.abs(y))))


def _central_differences(f: Callable, x: np.ndarray, h: float):
    """Yield (index, f(x + h e_i), f(x - h e_i)) for every element i of x.

    x is perturbed in place and restored after each pair, as in CS231n, so f may
    close over x; array results are copied before the next perturbation.
    """
    for ix in np.ndindex(x.shape):
        old = x[ix]
        x[ix] = old + h
        plus = np.array(f(x), copy=True)
        x[ix] = old - h
        minus = np.array(f(x), copy=True)
        x[ix] = old
        yield ix, plus, minus


def eval_numerical_gradient(f: Callable, x: np.ndarray, verbose: bool = True, h: float = 1e-5) -> np.ndarray:
    """Gradient of a scalar function f at x: df/dx_i ~ (f(x + h e_i) - f(x - h e_i)) / 2h.

    h: the step, a finite number > 0 (h = 0 would divide 0 by 0 for every element).
    """
    h = require_real("h", h, low=0, low_open=True)
    grad = np.zeros_like(x)
    for ix, plus, minus in _central_differences(f, x, h):
        grad[ix] = (plus - minus) / (2 * h)
        if verbose:
            print(ix, grad[ix])
    return grad


def eval_numerical_gradient_array(f: Callable, x: np.ndarray, df: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """Gradient of sum(f(x) * df) at x, for an array-valued f: what a backward pass
    computes given upstream gradient df. h as for eval_numerical_gradient."""
    h = require_real("h", h, low=0, low_open=True)
    grad = np.zeros_like(x)
    for ix, plus, minus in _central_differences(f, x, h):
        grad[ix] = np.sum((plus - minus) * df) / (2 * h)
    return grad


def layer_gradient_pairs(
    forward: Callable,
    backward: Callable,
    args: Sequence,
    wrt: Sequence[int],
    rng: np.random.Generator,
    h: float = 1e-5,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """A layer's analytic gradients beside their central-difference estimates.

    forward(*args) -> (out, cache); backward(dout, cache) -> the gradients of
    the inputs at positions ``wrt``, in that order (a single array when there is
    one). dout is drawn from ``rng`` (standard normal, out's shape). ``args`` are
    copied, so the caller's arrays are never touched.
    Returns [(analytic, numeric)] in the order of ``wrt``.
    """
    h = require_real("h", h, low=0, low_open=True)  # before the forward and backward run
    args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    out, cache = forward(*args)
    dout = rng.standard_normal(out.shape)
    analytic = backward(dout, cache)
    if not isinstance(analytic, tuple):
        analytic = (analytic,)
    pairs = []
    for position, grad in zip(wrt, analytic):

        def f(value, position=position):
            trial = list(args)
            trial[position] = value
            return forward(*trial)[0]

        pairs.append((grad, eval_numerical_gradient_array(f, args[position], dout, h=h)))
    return pairs


def check_layer_gradients(
    forward: Callable,
    backward: Callable,
    args: Sequence,
    wrt: Sequence[int],
    names: Sequence[str] | None = None,
    seed: int = 0,
    h: float = 1e-5,
) -> dict[str, float]:
    """Worst relative error (rel_error) between a layer's analytic and numerical gradients, per input.

    Arguments as layer_gradient_pairs, with dout drawn from default_rng(seed).
    Returns {name: error} with names defaulting to 'arg0', 'arg1', ...
    """
    names = list(names) if names is not None else [f"arg{i}" for i in wrt]
    if len(names) != len(wrt):
        raise ValueError(f"names must give one name per index in wrt ({len(wrt)}), got {len(names)}")
    pairs = layer_gradient_pairs(forward, backward, args, wrt, np.random.default_rng(seed), h=h)
    return {name: rel_error(grad, numeric) for name, (grad, numeric) in zip(names, pairs)}
