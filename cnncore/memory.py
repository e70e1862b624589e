"""Whether a computation fits in memory, checked before anything is allocated.

A size typed by mistake (``pad=10**6``, ``num_filters=10**9``, a model file whose
config says so) should fail at once with a ValueError naming the argument, not with
NumPy's bare ``MemoryError`` after seconds of allocating, nor by driving the machine
into swap. So the layers, ``load_model`` and the flows' configurations estimate the
bytes they are about to need and compare the estimate with a limit:

    the limit = half the memory available now (MemAvailable in /proc/meminfo),
                or $CNNCORE_MEMORY_LIMIT_GIB (GiB) when set: raise it there to run
                something bigger on purpose.

Estimates under ``CHEAP_BYTES`` (64 MiB) pass without reading the system, so the
check costs a few integer multiplications on every ordinary call. Where the
available memory cannot be read (not Linux, no /proc), only the variable applies.

The model estimates (``parameter_count``, ``training_step_bytes``) read a model's
config, the JSON dict every cnncore net records (``model.config``), so they work
before the model exists. They know ThreeLayerConvNet, ConvNet, FullyConnectedNet,
TwoLayerNet and ResNet; for another class they return None (no estimate, no check), and a test
pins each known estimate to the parameters a real net has.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .net_shapes import block_maps, layout

LIMIT_ENV = "CNNCORE_MEMORY_LIMIT_GIB"
AVAILABLE_FRACTION = 0.5
CHEAP_BYTES = 64 * 2**20
GIB = 2**30

# One training step keeps, per conv block, about this many arrays of the block's output
# size (N, F, H, W): the conv's input and output, the norm's cache (its input and x_hat),
# the relu's output, the pooled map and the backward's gradients of each. An estimate
# that errs high: a net that needs more than the limit by this count is refused.
CONV_BLOCK_COPIES = 8
# Per hidden affine layer (N, D): its input, output, the norm's cache, relu, gradients.
AFFINE_COPIES = 6
# Parameter-sized arrays a Solver holds besides the update rule's state: the
# parameters, their gradients, the best parameters seen, and the float64 draw
# from which a float32 net's weights are cast at construction.
PARAMETER_COPIES = 4


class MemoryLimitError(ValueError):
    """A computation whose estimated memory is over the limit (see the module's docstring)."""


def available_bytes() -> int | None:
    """The memory available to new allocations now (MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def limit() -> tuple[int | None, str]:
    """(the limit in bytes, or None for no limit; how it was set, in words)."""
    text = os.environ.get(LIMIT_ENV)
    if text is not None and text.strip():
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not value > 0 or math.isinf(value):
            raise ValueError(f"${LIMIT_ENV} must be a number of GiB > 0, got {text!r}")
        return int(value * GIB), f"${LIMIT_ENV}={text.strip()}"
    available = available_bytes()
    if available is None:
        return None, "the available memory cannot be read here"
    return int(available * AVAILABLE_FRACTION), f"half the {gib(available)} available now"


def gib(nbytes: float) -> str:
    """A byte count for people: '3.2 GiB', '512 MiB', '1.2e+03 TiB'."""
    for unit, size in (("TiB", 2**40), ("GiB", GIB), ("MiB", 2**20)):
        if nbytes >= size:
            value = nbytes / size
            return f"{value:.3g} {unit}" if value < 1e4 else f"{value:.2g} {unit}"
    return f"{nbytes / 2**20:.2g} MiB"


def require_fits(nbytes: float, what: str) -> None:
    """MemoryLimitError unless nbytes (an estimate) is within the limit.

    what: the computation and the arguments that size it, e.g. "conv_forward with
    conv_param['pad'] = 1000000": the message reads "<what> would need about ...".
    """
    if nbytes <= CHEAP_BYTES:
        return
    bound, how = limit()
    if bound is None or nbytes <= bound:
        return
    raise MemoryLimitError(f"{what} would need about {gib(nbytes)} of memory, more than the limit of "
                           f"{gib(bound)} ({how}); set ${LIMIT_ENV} to raise the limit if that is meant")


# ------------------------------------------------------------------ models, from their configs


def _ints(value) -> list[int] | None:
    """value as a list of ints (a number, or a list of numbers), or None when it is neither."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values or not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                             and math.isfinite(v) for v in values):
        return None
    return [int(v) for v in values]


def _conv_layout(config: dict) -> tuple[list[int], list[int], list[tuple[int, int, int]]] | None:
    """(parameter counts, activation values per image, (F, H, W) of each block) of a conv net's config."""
    dims, filters = _ints(config.get("input_dim", [3, 32, 32])), _ints(config.get("num_filters", 32))
    k, hidden, classes = (_ints(config.get(key, default)) for key, default in
                          (("filter_size", 7), ("hidden_dim", 100), ("num_classes", 10)))
    if dims is None or len(dims) != 3 or None in (filters, k, hidden, classes):
        return None
    (C, H, W), k, hidden, classes = dims, k[0], hidden[0], classes[0]
    norm = config.get("normalization") not in (None, "none")
    counts, per_image, blocks = [], [], []
    for F, (H, W, pools) in zip(filters, block_maps(H, W, len(filters))):
        counts.append(F * C * k * k + F + (2 * F if norm else 0))
        per_image.append(CONV_BLOCK_COPIES * F * H * W)
        blocks.append((F, H, W))
        C, H, W = F, *((H // 2, W // 2) if pools else (H, W))
    counts += [C * H * W * hidden + hidden, hidden * classes + classes]
    per_image.append(AFFINE_COPIES * (hidden + classes))
    return counts, per_image, blocks


def _fc_layout(config: dict) -> tuple[list[int], list[int]] | None:
    """(parameter counts, activation values per image) of a fully connected net's config."""
    given = config.get("hidden_dims", config.get("hidden_dim", []))
    hidden = [] if isinstance(given, (list, tuple)) and not given else _ints(given)  # no hidden layer: fine
    D, classes = _ints(config.get("input_dim", 3 * 32 * 32)), _ints(config.get("num_classes", 10))
    if hidden is None or D is None or classes is None:
        return None
    norm = config.get("normalization") not in (None, "none")
    dims = [D[0], *hidden, classes[0]]
    counts = [dims[i] * dims[i + 1] + dims[i + 1] + (2 * dims[i + 1] if norm and i + 1 < len(dims) - 1 else 0)
              for i in range(len(dims) - 1)]
    return counts, [AFFINE_COPIES * d for d in dims]


def _resnet_layout(config: dict) -> tuple[list[int], list[int]] | None:
    """(parameter counts, activation values per image) of a ResNet's config: each conv unit counts
    as a conv block (CONV_BLOCK_COPIES arrays of its output), the affine layer as one."""
    dims = _ints(config.get("input_dim", [3, 32, 32]))
    F, depth, classes = (_ints(config.get(key, default)) for key, default in
                         (("num_filters", 8), ("blocks_per_stage", 1), ("num_classes", 10)))
    if dims is None or len(dims) != 3 or None in (F, depth, classes):
        return None
    stem, blocks = layout(*dims, F[0], depth[0])
    units = [stem] + [u for block in blocks for u in (block.a, block.b, block.projection) if u is not None]
    norm = config.get("normalization") not in (None, "none")
    counts = [u.out_channels * (u.in_channels * u.kernel[0] * u.kernel[1] + 1 + (2 if norm else 0)) for u in units]
    per_image = [CONV_BLOCK_COPIES * u.out_channels * u.out_size[0] * u.out_size[1] for u in units]
    width = units[-1].out_channels
    counts.append(width * classes[0] + classes[0])
    per_image.append(AFFINE_COPIES * (width + classes[0]))
    return counts, per_image


def _layout(config: dict) -> tuple[list[int], list[int]] | None:
    model = config.get("model", "ThreeLayerConvNet")
    if model in ("ThreeLayerConvNet", "ConvNet"):
        found = _conv_layout(config)
        return None if found is None else found[:2]
    if model in ("FullyConnectedNet", "TwoLayerNet"):
        return _fc_layout(config)
    if model == "ResNet":
        return _resnet_layout(config)
    return None


def parameter_count(config: dict) -> int | None:
    """The number of parameter values the net a config describes has, or None for an unknown model."""
    found = _layout(config)
    return None if found is None else sum(found[0])


def training_step_parts(config: dict, batch_size: int, state_per_parameter: int = 2) -> tuple[int, int] | None:
    """(bytes for the parameters, bytes for one step's activations) a Solver needs to train the config's
    net one step at batch_size, or None for an unknown model.

    The parameters count PARAMETER_COPIES times (values, gradients, the best kept, the float64 draw),
    plus state_per_parameter for the update rule (adam's m and v: 2); the activations count
    CONV_BLOCK_COPIES arrays of each conv block's output and AFFINE_COPIES of each affine layer's.
    """
    found, itemsize = _layout(config), _itemsize(config)
    if found is None or itemsize is None:
        return None
    return sum(found[0]) * itemsize * (PARAMETER_COPIES + state_per_parameter), batch_size * sum(found[1]) * itemsize


def training_step_bytes(config: dict, batch_size: int, state_per_parameter: int = 2) -> int | None:
    """The sum of training_step_parts, or None for an unknown model."""
    parts = training_step_parts(config, batch_size, state_per_parameter)
    return None if parts is None else sum(parts)


def construction_bytes(config: dict) -> int | None:
    """Bytes that building the config's net allocates (its parameters, drawn in float64, then cast)."""
    count, itemsize = parameter_count(config), _itemsize(config)
    return None if count is None or itemsize is None else count * (8 + itemsize)


def _itemsize(config: dict) -> int | None:
    try:
        return np.dtype(config.get("dtype", "float32")).itemsize
    except TypeError:
        return None
