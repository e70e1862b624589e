"""The gradient checker on functions whose gradients are known in closed form,
and on a deliberately wrong backward, so it is known to be able to fail."""

import numpy as np
import pytest

from cnncore.gradient_check import (
    check_layer_gradients,
    eval_numerical_gradient,
    eval_numerical_gradient_array,
    rel_error,
)

# Central differences with h = 1e-5 on these polynomials: truncation is
# h**2 * f''' / 6 ~ 1e-10, rounding eps * |f| / h ~ 1e-11.
NUMERIC_TOL = 1e-8


def test_rel_error_of_known_pair():
    assert rel_error(np.array([1.0, 2.0]), np.array([1.0, 2.2])) == pytest.approx(0.2 / 4.2, rel=1e-12)


def test_rel_error_is_zero_for_equal_arrays_and_for_empty_ones():
    x = np.random.default_rng(1).standard_normal((3, 4))
    assert rel_error(x, x.copy()) == 0.0
    assert rel_error(np.zeros(0), np.zeros(0)) == 0.0


def test_rel_error_floors_the_denominator_so_two_tiny_values_stay_small():
    assert rel_error(np.array([0.0]), np.array([1e-12])) == pytest.approx(1e-4)


def test_rel_error_rejects_arrays_of_different_shapes():
    with pytest.raises(ValueError, match=r"one shape, got \(3,\) and \(1, 3\)"):
        rel_error(np.zeros(3), np.zeros((1, 3)))


def test_numerical_gradient_of_sum_of_cubes_is_three_x_squared():
    x = np.random.default_rng(2).standard_normal((3, 4))
    grad = eval_numerical_gradient(lambda v: np.sum(v**3), x.copy(), verbose=False)
    assert rel_error(grad, 3 * x**2) < NUMERIC_TOL


def test_numerical_gradient_restores_the_point_it_perturbs():
    x = np.random.default_rng(3).standard_normal(5)
    before = x.copy()
    eval_numerical_gradient(lambda v: np.sum(np.sin(v)), x, verbose=False)
    np.testing.assert_array_equal(x, before)


def test_numerical_gradient_verbose_prints_each_entry(capsys):
    eval_numerical_gradient(lambda v: float(np.sum(v**2)), np.array([1.0, 2.0]), verbose=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("(0,)")


def test_numerical_gradient_array_is_jacobian_transpose_times_upstream():
    rng = np.random.default_rng(4)
    A, x = rng.standard_normal((3, 5)), rng.standard_normal(5)
    df = rng.standard_normal(3)
    # f(x) = A @ x, so d sum(f * df) / dx = A.T @ df.
    grad = eval_numerical_gradient_array(lambda v: A @ v, x.copy(), df)
    assert rel_error(grad, A.T @ df) < NUMERIC_TOL


def test_numerical_gradient_array_copies_outputs_that_alias_the_input():
    # f returns x itself: without copying, f(x + h) and f(x - h) would be one array.
    x = np.array([1.0, -2.0, 3.0])
    grad = eval_numerical_gradient_array(lambda v: v, x.copy(), np.ones(3))
    np.testing.assert_allclose(grad, np.ones(3), rtol=1e-9)


def _square_forward(x, w):
    return x**2 * w, (x, w)


def _square_backward(dout, cache):
    x, w = cache
    return 2 * x * w * dout, x**2 * dout


def _square_backward_wrong_dw(dout, cache):
    dx, dw = _square_backward(dout, cache)
    return dx, 1.01 * dw


def test_check_layer_gradients_passes_a_correct_backward():
    rng = np.random.default_rng(5)
    errors = check_layer_gradients(_square_forward, _square_backward, [rng.standard_normal(4), rng.standard_normal(4)],
                                   wrt=[0, 1], names=["dx", "dw"])
    assert set(errors) == {"dx", "dw"}
    assert max(errors.values()) < NUMERIC_TOL


def test_check_layer_gradients_flags_a_wrong_backward():
    rng = np.random.default_rng(6)
    errors = check_layer_gradients(_square_forward, _square_backward_wrong_dw,
                                   [rng.standard_normal(4), rng.standard_normal(4)], wrt=[0, 1])
    assert errors["arg0"] < NUMERIC_TOL
    # A 1% error in dw: |1.01 g - g| / (|1.01 g| + |g|) = 0.01 / 2.01.
    assert errors["arg1"] == pytest.approx(0.01 / 2.01, rel=1e-6)


def test_check_layer_gradients_accepts_a_single_gradient_and_leaves_args_untouched():
    x, w = np.array([0.5, -1.5]), np.array([2.0, 3.0])
    x_before, w_before = x.copy(), w.copy()
    errors = check_layer_gradients(_square_forward, lambda d, c: _square_backward(d, c)[0], [x, w], wrt=[0])
    assert list(errors) == ["arg0"] and errors["arg0"] < NUMERIC_TOL
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(w, w_before)


def test_check_layer_gradients_needs_one_name_per_gradient():
    with pytest.raises(ValueError, match=r"names must give one name per index in wrt \(2\), got 1"):
        check_layer_gradients(_square_forward, _square_backward, [np.ones(2), np.ones(2)], wrt=[0, 1], names=["dx"])

