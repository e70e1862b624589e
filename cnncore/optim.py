"""First-order update rules, with CS231n's interface.

Every rule has the signature

    next_w, config = rule(w, dw, config=None)

w:      array of any shape and floating dtype, the current weights.
dw:     array of w's shape, the gradient of the loss with respect to w.
config: dict of hyperparameters (learning rate, momentum, ...) and of the
        state the rule carries between calls (velocity, caches, step count).
        Missing entries are filled with the rule's defaults, in place, as in
        CS231n; pass the returned config to the next call for the same w.

Returns next_w, a new array with w's shape and dtype (w itself is never
modified), and the config. State arrays are zeros_like(w) from w's own array
module, so CuPy weights get CuPy state and the same code runs on both.

RULES declares each rule's hyperparameters (with CS231n's defaults) and the
state entries it keeps in config. Every call checks the hyperparameters it uses
against BOUNDS (learning_rate finite and > 0; momentum, decay_rate, beta1, beta2
in [0, 1); epsilon finite and > 0) with a few float comparisons, and raises
ValueError naming config['key'] before config is changed. check_config also
refuses keys a rule does not know, for callers that build configs from user
input (the Solver's optim_config).
"""

import math
from typing import NamedTuple

from cnncore import checks
from cnncore.backend import array_module


class Rule(NamedTuple):
    """What an update rule reads from and keeps in its config."""

    hyperparameters: dict[str, float]  # name -> default (CS231n's)
    state: tuple[str, ...]  # entries the rule keeps between calls for one weight array


RULES = {
    "sgd": Rule({"learning_rate": 1e-2}, ()),
    "sgd_momentum": Rule({"learning_rate": 1e-2, "momentum": 0.9}, ("velocity",)),
    "rmsprop": Rule({"learning_rate": 1e-2, "decay_rate": 0.99, "epsilon": 1e-8}, ("cache",)),
    "adam": Rule({"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}, ("m", "v", "t")),
}

# (low, high, low included): each hyperparameter lies in [low, high) or (low, high).
# The comparisons also refuse NaN (every comparison with it is False) and inf.
BOUNDS = {
    "learning_rate": (0.0, math.inf, False),
    "momentum": (0.0, 1.0, True),
    "decay_rate": (0.0, 1.0, True),
    "beta1": (0.0, 1.0, True),
    "beta2": (0.0, 1.0, True),
    "epsilon": (0.0, math.inf, False),
}


def sgd(w, dw, config=None):
    """Vanilla stochastic gradient descent: next_w = w - learning_rate * dw.

    config:
      learning_rate: float > 0, default 1e-2.
    """
    config, [lr] = _hyperparameters(config, "sgd")
    return _as_dtype_of(w - lr * dw, w), config


def sgd_momentum(w, dw, config=None):
    """Stochastic gradient descent with momentum.

        velocity = momentum * velocity - learning_rate * dw
        next_w   = w + velocity

    config:
      learning_rate: float > 0, default 1e-2.
      momentum: float in [0, 1), default 0.9; 0 is vanilla SGD.
      velocity: array of w's shape, the running step; starts at zeros.
    """
    config, [lr, mu] = _hyperparameters(config, "sgd_momentum")
    v = _state(config, "velocity", w) * mu  # a new array: the old velocity is left as it was
    v -= lr * dw
    config["velocity"] = v
    return _as_dtype_of(w + v, w), config


def rmsprop(w, dw, config=None):
    """RMSProp: per-weight step sizes from a moving average of squared gradients.

        cache  = decay_rate * cache + (1 - decay_rate) * dw**2
        next_w = w - learning_rate * dw / (sqrt(cache) + epsilon)

    config:
      learning_rate: float > 0, default 1e-2.
      decay_rate: float in [0, 1), default 0.99.
      epsilon: float > 0, default 1e-8; keeps the division finite where cache is 0.
      cache: array of w's shape, the moving average; starts at zeros.
    """
    config, [lr, rho, eps] = _hyperparameters(config, "rmsprop")
    xp = array_module(w)
    cache = rho * _state(config, "cache", w) + (1.0 - rho) * (dw * dw)
    config["cache"] = cache
    next_w = w - lr * dw / (xp.sqrt(cache) + eps)
    return _as_dtype_of(next_w, w), config


def adam(w, dw, config=None):
    """Adam: momentum on the gradient and RMSProp's scaling, both bias-corrected.

        t      = t + 1
        m      = beta1 * m + (1 - beta1) * dw
        v      = beta2 * v + (1 - beta2) * dw**2
        next_w = w - learning_rate * (m / (1 - beta1**t))
                     / (sqrt(v / (1 - beta2**t)) + epsilon)

    t is incremented before the bias correction, as in CS231n's reference, so
    the first call divides by (1 - beta1) and (1 - beta2) rather than by 0.

    config:
      learning_rate: float > 0, default 1e-3.
      beta1: float in [0, 1), default 0.9; decay of the first moment m.
      beta2: float in [0, 1), default 0.999; decay of the second moment v.
      epsilon: float > 0, default 1e-8.
      m, v: arrays of w's shape; start at zeros.
      t: int, the number of updates made so far; starts at 0.
    """
    config, [lr, beta1, beta2, eps] = _hyperparameters(config, "adam")
    xp = array_module(w)
    t = int(config.get("t", 0)) + 1
    m = beta1 * _state(config, "m", w) + (1.0 - beta1) * dw
    v = beta2 * _state(config, "v", w) + (1.0 - beta2) * (dw * dw)
    m_hat = m / (1.0 - beta1**t)
    v_hat = v / (1.0 - beta2**t)
    config.update(m=m, v=v, t=t)
    next_w = w - lr * m_hat / (xp.sqrt(v_hat) + eps)
    return _as_dtype_of(next_w, w), config


UPDATE_RULES = {
    "sgd": sgd,
    "sgd_momentum": sgd_momentum,
    "rmsprop": rmsprop,
    "adam": adam,
}


def get_update_rule(name):
    """The update rule called `name` (a key of UPDATE_RULES).

    Raises ValueError naming the argument and listing the known rules.
    """
    rule = UPDATE_RULES.get(name) if isinstance(name, str) else None
    if rule is None:
        known = ", ".join(repr(k) for k in sorted(UPDATE_RULES))
        raise ValueError(f"update_rule must be one of {known}; got {name!r}")
    return rule


def check_config(rule: str, config, name: str = "config") -> None:
    """Refuse a config for the named rule with a key that is not one of its hyperparameters
    (a misspelling such as 'lr' would leave the default rate in force) or a value out of range.

    name: how the caller calls config in the errors ("optim_config").
    """
    known = RULES[rule].hyperparameters
    for key, value in config.items():
        if key not in known:
            raise ValueError(f"{name} has the key {key!r}, which is not a hyperparameter of update_rule {rule!r}; "
                             f"its hyperparameters are {', '.join(known)}")
    _hyperparameters(dict(config), rule, name)


def _hyperparameters(config, rule, name="config"):
    """(config, values): config (a new dict when None) with the rule's missing
    hyperparameters set to their defaults, in place, as in CS231n; values, the
    hyperparameters as floats in RULES order. Each is checked first, so a bad
    one raises ValueError naming name['key'] with config unchanged.

    Runs per parameter per iteration: a dict lookup and two comparisons a
    hyperparameter (about 0.1 us each), messages built only on failure.
    """
    if config is None:
        config = {}
    values = []
    missing = False
    for key, default, low, high, low_included in _CHECKED[rule]:
        value = config.get(key, _MISSING)
        if value is _MISSING:
            value, missing = default, True
        try:
            inside = (low <= value if low_included else low < value) and value < high
        except (TypeError, ValueError):  # not a number, or an array
            inside = False
        if not inside:
            _refuse(name, key, value)
        values.append(float(value))
    if missing:
        for key, default in RULES[rule].hyperparameters.items():
            config.setdefault(key, default)
    return config, values


def _refuse(config_name, key, value):
    """Raise the ValueError for value, out of BOUNDS[key], naming config_name[key]."""
    low, high, low_included = BOUNDS[key]
    name = f"{config_name}[{key!r}]"
    checks.require_real(name, value, low=low, high=None if high == math.inf else high,
                        low_open=not low_included, high_open=True)
    raise ValueError(f"{name} must be a single real number, got {value!r}")


_MISSING = object()
# Per rule: (key, default, *BOUNDS[key]) for each hyperparameter, unpacked in one step per call.
_CHECKED = {name: tuple((key, default, *BOUNDS[key]) for key, default in rule.hyperparameters.items())
            for name, rule in RULES.items()}


def _state(config, key, w):
    """config[key], or zeros shaped like w when the rule has not run yet."""
    # Not config.get(key, zeros_like(w)): that would allocate on every call.
    return config[key] if key in config else array_module(w).zeros_like(w)


def _as_dtype_of(next_w, w):
    """next_w in w's dtype.

    Hyperparameters are Python floats, which do not upcast float32 arrays;
    this guards the remaining path, a gradient of a wider dtype than w.
    """
    return next_w.astype(w.dtype, copy=False)
