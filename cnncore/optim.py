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
"""

from cnncore.backend import array_module


def sgd(w, dw, config=None):
    """Vanilla stochastic gradient descent: next_w = w - learning_rate * dw.

    config:
      learning_rate: float, default 1e-2.
    """
    config = _with_defaults(config, learning_rate=1e-2)
    lr = float(config["learning_rate"])
    return _as_dtype_of(w - lr * dw, w), config


def sgd_momentum(w, dw, config=None):
    """Stochastic gradient descent with momentum.

        velocity = momentum * velocity - learning_rate * dw
        next_w   = w + velocity

    config:
      learning_rate: float, default 1e-2.
      momentum: float in [0, 1), default 0.9; 0 is vanilla SGD.
      velocity: array of w's shape, the running step; starts at zeros.
    """
    config = _with_defaults(config, learning_rate=1e-2, momentum=0.9)
    lr, mu = float(config["learning_rate"]), float(config["momentum"])
    v = mu * _state(config, "velocity", w) - lr * dw
    config["velocity"] = v
    return _as_dtype_of(w + v, w), config


def rmsprop(w, dw, config=None):
    """RMSProp: per-weight step sizes from a moving average of squared gradients.

        cache  = decay_rate * cache + (1 - decay_rate) * dw**2
        next_w = w - learning_rate * dw / (sqrt(cache) + epsilon)

    config:
      learning_rate: float, default 1e-2.
      decay_rate: float in [0, 1), default 0.99.
      epsilon: float, default 1e-8; keeps the division finite where cache is 0.
      cache: array of w's shape, the moving average; starts at zeros.
    """
    config = _with_defaults(
        config, learning_rate=1e-2, decay_rate=0.99, epsilon=1e-8
    )
    lr, rho, eps = (
        float(config[k]) for k in ("learning_rate", "decay_rate", "epsilon")
    )
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
      learning_rate: float, default 1e-3.
      beta1: float, default 0.9; decay of the first moment m.
      beta2: float, default 0.999; decay of the second moment v.
      epsilon: float, default 1e-8.
      m, v: arrays of w's shape; start at zeros.
      t: int, the number of updates made so far; starts at 0.
    """
    config = _with_defaults(
        config, learning_rate=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-8, t=0
    )
    lr, beta1, beta2, eps = (
        float(config[k]) for k in ("learning_rate", "beta1", "beta2", "epsilon")
    )
    xp = array_module(w)
    t = int(config["t"]) + 1
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


def _with_defaults(config, **defaults):
    """config (a new dict when None) with every missing default filled in."""
    if config is None:
        config = {}
    for key, value in defaults.items():
        config.setdefault(key, value)
    return config


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
