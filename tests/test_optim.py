"""Update rules against CS231n's published values and their own formulas."""

import numpy as np
import pytest

from cnncore import optim

# CS231n's check inputs: a 4x5 weight, gradient and state, all linspaces.
N, D = 4, 5


def _linspace(lo, hi):
    return np.linspace(lo, hi, num=N * D).reshape(N, D)


def _w():
    return _linspace(-0.4, 0.6)


def _dw():
    return _linspace(-0.6, 0.4)


# The published arrays are printed to 8 decimals: a correct result is within
# half a unit in the 8th decimal of them (plus a hair for float rounding).
PUBLISHED_ATOL = 5.000001e-9


# CS231n's notebook checks: (config given with _w() and _dw(), expected results,
# 4x5 arrays keyed as in the returned config plus "next_w").
PUBLISHED = {
    "sgd_momentum": (
        lambda: {"learning_rate": 1e-3, "velocity": _linspace(0.6, 0.9)},
        {"next_w": [
            [0.1406, 0.20738947, 0.27417895, 0.34096842, 0.40775789],
            [0.47454737, 0.54133684, 0.60812632, 0.67491579, 0.74170526],
            [0.80849474, 0.87528421, 0.94207368, 1.00886316, 1.07565263],
            [1.14244211, 1.20923158, 1.27602105, 1.34281053, 1.4096]],
         "velocity": [
            [0.5406, 0.55475789, 0.56891579, 0.58307368, 0.59723158],
            [0.61138947, 0.62554737, 0.63970526, 0.65386316, 0.66802105],
            [0.68217895, 0.69633684, 0.71049474, 0.72465263, 0.73881053],
            [0.75296842, 0.76712632, 0.78128421, 0.79544211, 0.8096]]},
    ),
    "rmsprop": (
        lambda: {"learning_rate": 1e-2, "cache": _linspace(0.6, 0.9)},
        {"next_w": [
            [-0.39223849, -0.34037513, -0.28849239, -0.23659121, -0.18467247],
            [-0.132737, -0.08078555, -0.02881884, 0.02316247, 0.07515774],
            [0.12716641, 0.17918792, 0.23122175, 0.28326742, 0.33532447],
            [0.38739248, 0.43947102, 0.49155973, 0.54365823, 0.59576619]],
         "cache": [
            [0.5976, 0.6126277, 0.6277108, 0.64284931, 0.65804321],
            [0.67329252, 0.68859723, 0.70395734, 0.71937285, 0.73484377],
            [0.75037008, 0.7659518, 0.78158892, 0.79728144, 0.81302936],
            [0.82883269, 0.84469141, 0.86060554, 0.87657507, 0.8926]]},
    ),
    "adam": (
        lambda: {"learning_rate": 1e-2, "m": _linspace(0.6, 0.9),
                 "v": _linspace(0.7, 0.5), "t": 5},
        {"next_w": [
            [-0.40094747, -0.34836187, -0.29577703, -0.24319299, -0.19060977],
            [-0.1380274, -0.08544591, -0.03286534, 0.01971428, 0.0722929],
            [0.1248705, 0.17744702, 0.23002243, 0.28259667, 0.33516969],
            [0.38774145, 0.44031188, 0.49288093, 0.54544852, 0.59801459]],
         "v": [
            [0.69966, 0.68908382, 0.67851319, 0.66794809, 0.65738853],
            [0.64683452, 0.63628604, 0.6257431, 0.61520571, 0.60467385],
            [0.59414753, 0.58362676, 0.57311152, 0.56260183, 0.55209767],
            [0.54159906, 0.53110598, 0.52061845, 0.51013645, 0.49966]],
         "m": [
            [0.48, 0.49947368, 0.51894737, 0.53842105, 0.55789474],
            [0.57736842, 0.59684211, 0.61631579, 0.63578947, 0.65526316],
            [0.67473684, 0.69421053, 0.71368421, 0.73315789, 0.75263158],
            [0.77210526, 0.79157895, 0.81105263, 0.83052632, 0.85]],
         "t": 6},
    ),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_rule_matches_cs231n_published_values(name):
    make_config, expected = PUBLISHED[name]
    next_w, config = optim.UPDATE_RULES[name](_w(), _dw(), config=make_config())
    results = {"next_w": next_w, **config}
    for key, want in expected.items():
        np.testing.assert_allclose(results[key], want, rtol=0, atol=PUBLISHED_ATOL, err_msg=key)


def test_sgd_matches_formula():
    w, dw = _w(), _dw()
    next_w, config = optim.sgd(w, dw, {"learning_rate": 1e-3})
    np.testing.assert_array_equal(next_w, w - 1e-3 * dw)
    assert config["learning_rate"] == 1e-3


def test_sgd_momentum_matches_formula():
    w, dw, v = _w(), _dw(), _linspace(0.6, 0.9)
    config = {"learning_rate": 1e-3, "momentum": 0.5, "velocity": v.copy()}
    next_w, config = optim.sgd_momentum(w, dw, config)
    expected_v = 0.5 * v - 1e-3 * dw
    # Same operations in the same order: equal to the last bit.
    np.testing.assert_array_equal(config["velocity"], expected_v)
    np.testing.assert_array_equal(next_w, w + expected_v)


def test_rmsprop_matches_formula():
    w, dw, cache = _w(), _dw(), _linspace(0.6, 0.9)
    config = {"decay_rate": 0.9, "cache": cache.copy()}
    next_w, config = optim.rmsprop(w, dw, config)
    expected_cache = 0.9 * cache + 0.1 * dw**2
    expected_w = w - 1e-2 * dw / (np.sqrt(expected_cache) + 1e-8)
    # Written independently (dw**2, 0.1 for 1 - 0.9): a few ulps apart at most.
    np.testing.assert_allclose(config["cache"], expected_cache, rtol=1e-14)
    np.testing.assert_allclose(next_w, expected_w, rtol=1e-14)


def test_adam_first_step_increments_t_before_bias_correction():
    # From zero state, t becomes 1 first, so m_hat = dw and v_hat = dw**2:
    # the first step is lr * sign(dw), up to epsilon.
    w, dw = _w(), _dw()
    next_w, config = optim.adam(w, dw)
    expected = w - 1e-3 * dw / (np.abs(dw) + 1e-8)
    np.testing.assert_allclose(next_w, expected, rtol=1e-12)
    assert config["t"] == 1


@pytest.mark.parametrize("name", sorted(optim.UPDATE_RULES))
def test_rule_fills_cs231n_defaults(name):
    defaults = {
        "sgd": {"learning_rate": 1e-2},
        "sgd_momentum": {"learning_rate": 1e-2, "momentum": 0.9},
        "rmsprop": {"learning_rate": 1e-2, "decay_rate": 0.99, "epsilon": 1e-8},
        "adam": {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999,
                 "epsilon": 1e-8, "t": 1},
    }[name]
    _, config = optim.UPDATE_RULES[name](_w(), _dw())
    assert {k: config[k] for k in defaults} == defaults


@pytest.mark.parametrize("name", sorted(optim.UPDATE_RULES))
def test_rule_keeps_float32_through_repeated_steps(name):
    rule = optim.UPDATE_RULES[name]
    w, dw = _w().astype(np.float32), _dw().astype(np.float32)
    # A NumPy float64 hyperparameter would upcast float32 under NEP 50 rules.
    config = {"learning_rate": np.float64(1e-3)}
    for _ in range(3):
        w, config = rule(w, dw, config)
        assert w.dtype == np.float32
    state = [v for v in config.values() if isinstance(v, np.ndarray)]
    assert all(s.dtype == np.float32 for s in state)


@pytest.mark.parametrize("name", sorted(optim.UPDATE_RULES))
def test_rule_never_modifies_its_inputs(name):
    rule = optim.UPDATE_RULES[name]
    w, dw = _w(), _dw()
    next_w, config = rule(w, dw)
    next_w2, _ = rule(next_w, dw, config)
    np.testing.assert_array_equal(w, _w())
    np.testing.assert_array_equal(dw, _dw())
    assert next_w2 is not next_w and not np.shares_memory(next_w2, next_w)


@pytest.mark.parametrize("name", sorted(optim.UPDATE_RULES))
def test_get_update_rule_returns_the_named_rule(name):
    assert optim.get_update_rule(name) is optim.UPDATE_RULES[name]


@pytest.mark.parametrize("bad", ["sgd_nesterov", "", None, optim.sgd])
def test_get_update_rule_rejects_unknown_names(bad):
    with pytest.raises(ValueError, match=r"update_rule must be one of .*'adam'.*'sgd'"):
        optim.get_update_rule(bad)


# ---------------------------------------------------------------------------
# Hyperparameters: declared per rule, checked on every call
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(optim.UPDATE_RULES))
def test_rule_keeps_exactly_its_declared_hyperparameters_and_state_in_config(name):
    _, config = optim.UPDATE_RULES[name](_w(), _dw())
    declared = optim.RULES[name]
    assert set(config) == set(declared.hyperparameters) | set(declared.state)


OUT_OF_RANGE = [
    pytest.param(rule, "learning_rate", value, r"config\['learning_rate'\] must be a finite number > 0",
                 id=f"{rule}-learning_rate-{value}")
    for rule in sorted(optim.UPDATE_RULES) for value in (-1e-3, 0.0, float("nan"), float("inf"))
] + [
    pytest.param(rule, key, value, rf"config\['{key}'\] must be a finite number >= 0 and < 1, got {value}",
                 id=f"{rule}-{key}-{value}")
    for rule, key in (("sgd_momentum", "momentum"), ("rmsprop", "decay_rate"), ("adam", "beta1"), ("adam", "beta2"))
    for value in (1.5, 1.0, -0.1)
] + [
    pytest.param(rule, "epsilon", value, rf"config\['epsilon'\] must be a finite number > 0, got {value}",
                 id=f"{rule}-epsilon-{value}")
    for rule in ("rmsprop", "adam") for value in (0.0, -1e-8)
] + [
    pytest.param("sgd", "learning_rate", "1e-3", r"config\['learning_rate'\] must be a finite number > 0, got '1e-3'",
                 id="sgd-learning_rate-string"),
]


@pytest.mark.parametrize("rule, key, value, message", OUT_OF_RANGE)
def test_rule_refuses_a_hyperparameter_out_of_range_naming_it_with_config_unchanged(rule, key, value, message):
    config = {key: value}
    w, dw = _w(), _dw()
    with pytest.raises(ValueError, match=message):
        optim.UPDATE_RULES[rule](w, dw, config)
    assert list(config) == [key] and config[key] is value  # no default filled in, nothing replaced
    np.testing.assert_array_equal(w, _w())


def test_sgd_momentum_with_momentum_zero_is_sgd():
    next_w, _ = optim.sgd_momentum(_w(), _dw(), {"learning_rate": 1e-3, "momentum": 0.0})
    np.testing.assert_array_equal(next_w, optim.sgd(_w(), _dw(), {"learning_rate": 1e-3})[0])


def test_check_config_refuses_a_misspelled_key_naming_it_the_rule_and_its_hyperparameters():
    with pytest.raises(ValueError, match=r"optim_config has the key 'lr', which is not a hyperparameter of "
                                         r"update_rule 'adam'; its hyperparameters are learning_rate, beta1, beta2, "
                                         r"epsilon"):
        optim.check_config("adam", {"lr": 1.0}, "optim_config")


def test_check_config_refuses_state_entries_that_are_not_hyperparameters():
    with pytest.raises(ValueError, match=r"optim_config has the key 'velocity'"):
        optim.check_config("sgd_momentum", {"velocity": np.zeros(3)}, "optim_config")


def test_check_config_refuses_a_nan_learning_rate_naming_the_callers_name_for_the_config():
    with pytest.raises(ValueError, match=r"optim_config\['learning_rate'\] must be a finite number > 0, got nan"):
        optim.check_config("sgd", {"learning_rate": float("nan")}, "optim_config")


def test_check_config_accepts_every_rules_defaults_and_leaves_the_config_alone():
    for name, rule in optim.RULES.items():
        config = dict(rule.hyperparameters)
        optim.check_config(name, config)
        assert config == rule.hyperparameters
