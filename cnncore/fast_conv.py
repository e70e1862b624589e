"""The convolution kernels behind ``fast_layers``' conv layers, and the rule that picks one per shape.

Two algorithms compute the same convolution (to rounding), as cuDNN and oneDNN
offer several and pick one per shape:

- direct: im2col + GEMM. The columns of a chunk of images, (n, C*HH*WW, P) in
  (c, i, j) tap order, are ONE strided copy of the padded input (a view with the
  window offsets as axes: no loop over offsets), and the chunk's output is ONE
  batched product w (F, C*HH*WW) @ columns, (n, F, P): channels first, the
  layers' own layout. The bias rides in the product as one more tap whose
  column is all ones, and db comes back from the backward's product the same
  way. At stride 1 the padded input can be stored with a row pitch (see
  Geometry) so that each tap's columns are one contiguous run of it: the copy
  then runs at memory speed, 3-5x faster than copying Wo values at a time, for
  a few outputs per row that are computed and dropped. 1x1 filters at stride 1
  without padding need no columns at all.
- Winograd F(2x2, 3x3) (``conv_winograd``): 2.25x fewer multiplications for
  stride-1 3x3 filters, paid for with transforms of the input and output tiles.

Strided convolutions whose filters the stride tiles may run as stride-1 ones by
space-to-depth (``conv_space_to_depth``). The shapes, and the direct kernel's
choice of layout, are ``conv_geometry.Geometry``'s.

``algorithm(g, pass_)`` picks one by shape and pass; the WINOGRAD_* thresholds and
conv_geometry's PITCHED_MIN_TAPS_PER_FILTER hold the crossovers, measured on this project's
machines by ``benchmarks/bench_conv_algorithms.py``, which times every kernel on
every pass of the nets' convolutions and shows what the rule picks.

The backward passes: dw from the same columns (one batched product per chunk,
(n, F, P) @ (n, P, C*HH*WW + 1), summed over the images), or from Winograd's
tiles; dx at stride 1 is itself a convolution (of dout, padded by HH-1-pad,
with the flipped filters and the channels swapped), run by whichever kernel
suits its shape; at larger strides dx is col2im, the adjoint of the column copy.

Chunks of images are sized so that their buffers stay in cache
(``backend.chunk_bytes``) between the copy that writes them and the product
that reads them, and the buffers are reused from chunk to chunk. Every function
takes its array module from its inputs.
"""

from __future__ import annotations

import contextlib
import sys

from . import backend, conv_geometry
from .backend import array_module, strided_view
from .conv_geometry import Geometry, batch_chunks
from .conv_space_to_depth import SpaceToDepth
from .conv_winograd import winograd_applies, winograd_filter_gradient, winograd_output_chunks


# ---------------------------------------------------------------------------
# Direct: im2col + GEMM
# ---------------------------------------------------------------------------


class _Columns:
    """Reusable buffers for the im2col columns (n, taps [+ 1], positions) of chunks of up
    to n images, the last row all ones when a bias is folded into the product.

    Every tap's columns, copied in one go, then one product: measured faster than
    building one filter row's taps and running a product per filter row (the old
    layout of this module, which copies the input WW-fold instead of HH*WW-fold):
    1.3-1.6x for 7x7 and 5x5 filters on 3 channels, even for 3x3 on 32 (1 thread,
    float32, batch 2 to 128). The copy runs at memory speed; the short products
    and their sums do not.
    """

    def __init__(self, g: Geometry, n: int, xp, dtype, bias_row: bool):
        self.g = g
        self.crop_h, self.crop_w = max(0, -g.pad_h), max(0, -g.pad_w)
        self.ph, self.pw = max(g.pad_h, 0), max(g.pad_w, 0)
        self.rows = g.H + 2 * g.pad_h
        self.row_length = g.pitch if g.pitched else g.W + 2 * g.pad_w
        image_size = self.rows * self.row_length + (g.WW - 1 if g.pitched else 0)
        # Zeroed once: the interior is rewritten for every chunk, the border never.
        self.padded = xp.zeros((n, g.C, image_size), dtype=dtype)
        self.columns = xp.empty((n, g.taps + bias_row, g.positions), dtype=dtype)
        if bias_row:
            self.columns[:, -1] = 1

    def of(self, src):
        """The columns (m, taps [+ 1], positions) of src (m, C, H, W), in the reused buffer."""
        g, m = self.g, src.shape[0]
        if self.crop_h or self.crop_w:
            src = src[:, :, self.crop_h : g.H - self.crop_h, self.crop_w : g.W - self.crop_w]
        images = self.padded[:m]
        grid = images[:, :, : self.rows * self.row_length].reshape(m, g.C, self.rows, self.row_length)
        grid[:, :, self.ph : self.ph + src.shape[2], self.pw : self.pw + src.shape[3]] = src
        sn, sc, e = images.strides[0], images.strides[1], images.itemsize
        row = self.row_length * e
        if g.pitched:
            shape, strides = (m, g.C, g.HH, g.WW, g.positions), (sn, sc, row, e, e)
        else:
            s = g.stride
            shape, strides = (m, g.C, g.HH, g.WW, g.Ho, g.Wo), (sn, sc, row, e, s * row, s * e)
        columns = self.columns[:m]
        columns[:, : g.taps].reshape(shape)[...] = strided_view(images, shape, strides)  # the one copy
        return columns


def column_chunks(x, g: Geometry, bias_row: bool, extra_bytes_per_image: int = 0):
    """Yield (rows, cols) for consecutive chunks of the images of x: rows a slice of the
    batch, cols (m, taps [+ 1], g.positions) the im2col columns of those images, taps in
    (c, i, j) order (w.reshape(F, -1)'s), then a row of ones if bias_row, so that
    [w | b] @ cols is the chunk's convolution at g.positions (see Geometry).

    Without columns to build (g.needs_columns False) cols is x itself and bias_row is
    ignored. The buffers are reused from chunk to chunk: use cols before asking for the
    next. extra_bytes_per_image: what the caller keeps per image beside the columns.
    """
    xp = array_module(x)
    if not g.needs_columns:
        yield slice(0, g.N), x.reshape(g.N, g.C, g.positions)
        return
    per_image = ((g.taps + 1) * g.positions + g.C * (g.H + 2 * g.pad_h + 1) * (g.W + 2 * g.pad_w + 1)) * x.itemsize
    n = backend.images_per_chunk(g.N, per_image + extra_bytes_per_image, xp)
    columns = _Columns(g, n, xp, x.dtype, bias_row)
    for rows, _, _ in batch_chunks(g.N, n):
        yield rows, columns.of(x[rows])


def _valid(a, g: Geometry):
    """a (m, F, g.positions) as (m, F, Ho, Wo): the outputs computed, less the dropped columns."""
    m, F = a.shape[:2]
    if g.extra_columns:
        return a.reshape(m, F, g.Ho, g.pitch)[..., : g.Wo]
    return a.reshape(m, F, g.Ho, g.Wo)


def _filter_matrix(w, b):
    """w (F, C, HH, WW) as (F, taps), with b (F,) as one more column unless b is None."""
    F = w.shape[0]
    if b is None:
        return w.reshape(F, -1)
    w_ext = array_module(w).empty((F, w[0].size + 1), dtype=w.dtype)
    w_ext[:, :-1] = w.reshape(F, -1)
    w_ext[:, -1] = b
    return w_ext


def direct_output_chunks(x, w, b, g: Geometry, out=None):
    """Yield (rows, product) for consecutive chunks of the images of x: product (m, F, Ho, Wo)
    the convolution of those images with w, plus b unless None.

    With out (N, F, Ho, Wo) given, product is out[rows], written there by the
    product itself where it can land there (no extra columns); otherwise it is a
    view of a buffer reused from chunk to chunk: use it before asking for the next.
    """
    xp = array_module(x)
    F, P = g.F, g.positions
    fold = b is not None and g.needs_columns
    w_mat = _filter_matrix(w, b if fold else None)
    direct = out is not None and not g.extra_columns
    out3 = out.reshape(g.N, F, P) if direct else None
    product = None
    for rows, cols in column_chunks(x, g, fold, 0 if direct else F * P * x.itemsize):
        m = rows.stop - rows.start
        if product is None and not direct:
            product = xp.empty((m, F, P), dtype=x.dtype)
        chunk = out3[rows] if direct else product[:m]
        xp.matmul(w_mat, cols, out=chunk)
        if b is not None and not fold:
            chunk += b.reshape(F, 1)
        if out is not None and not direct:
            out[rows] = _valid(chunk, g)  # the extra columns dropped
            yield rows, out[rows]
        else:
            yield rows, _valid(chunk, g)


def direct_gradients(x, w, g: Geometry, need_dx: bool, dout=None, fill_dout=None):
    """(dx or None, dw, db) of the direct convolution, chunk by chunk of images, for the
    gradient of its output: dout (N, F, Ho, Wo), or fill_dout(rows, view) writing the
    gradient of the images ``rows`` into view (m, F, Ho, Wo), so that a caller can build
    it while it is in cache.
    """
    xp = array_module(x)
    F, P = g.F, g.positions
    dx = xp.empty((g.N, g.C, g.H, g.W), dtype=x.dtype) if need_dx else None
    fold = g.needs_columns  # db as the product's last column
    # dout read where it lies when the product's layout is its own; else copied, chunk by chunk
    dout3 = dout.reshape(g.N, F, P) if dout is not None and not g.extra_columns else None
    dw_ext = db = buffer = None
    for rows, cols in column_chunks(x, g, fold, 2 * F * P * x.itemsize):
        m = rows.stop - rows.start
        if dout3 is not None:
            dout_m = dout3[rows]
        else:
            if buffer is None:  # the dropped columns' gradients stay 0
                buffer = (xp.zeros if g.extra_columns else xp.empty)((m, F, P), dtype=x.dtype)
            dout_m = buffer[:m]
            if fill_dout is None:
                _valid(dout_m, g)[...] = dout[rows]
            else:
                fill_dout(rows, _valid(dout_m, g))
        # Per image (F, P) @ (P, taps [+ 1]), summed over the chunk's images.
        part = xp.matmul(dout_m, cols.transpose(0, 2, 1)).sum(axis=0)
        if dw_ext is None:
            dw_ext = part
        else:
            dw_ext += part
        if not fold:
            db_part = (dout_m @ backend.ones(xp, P, x.dtype)).sum(axis=0)
            db = db_part if db is None else db + db_part
        if need_dx:
            _input_gradient(w, _valid(dout_m, g), g, dx[rows], dout_m)
    if dw_ext is None:  # an empty batch
        return dx, xp.zeros(w.shape, dtype=x.dtype), xp.zeros(F, dtype=x.dtype)
    if fold:
        return dx, xp.ascontiguousarray(dw_ext[:, :-1]).reshape(w.shape), dw_ext[:, -1].copy()
    return dx, dw_ext.reshape(w.shape), db


def dx_by_convolution(g: Geometry) -> bool:
    """Whether dx is a convolution of dout (else col2im; see _input_gradient).

    The convolution copies F*HH*WW rows of dout's columns, col2im adds C*HH*WW rows
    of column gradients back, each add reading and writing: with few input
    channels against many filters the convolution copies far more. Measured (1
    thread, float32, the whole backward, benchmarks/bench_conv_algorithms.py):
    3 channels in and 32 filters 7x7 at batch 50, col2im 2.8x faster; 1 in and 32
    out (3x3), 1.6-1.9x; 8, 16, 32 or 64 in and as many out, the convolution
    1.04-2.0x faster. At stride s > 1 the convolution would read dout dilated by
    s - 1 zeros, s**2 times the products: col2im always.
    """
    return g.stride == 1 and g.C * DX_CONVOLUTION_MAX_FILTERS_PER_CHANNEL >= g.F


DX_CONVOLUTION_MAX_FILTERS_PER_CHANNEL = 2


def _input_gradient(w, dout, g: Geometry, dx, dout_pitched=None):
    """dx (m, C, H, W) of the images whose output gradient is dout (m, F, Ho, Wo).

    A convolution of dout, padded by HH - 1 - pad, with the flipped filters and the
    channels swapped, run by the forward's kernels; or col2im: the column
    gradients w.T @ dout summed back onto the inputs they were copied from (see
    dx_by_convolution). dout_pitched: dout in g's pitched layout (m, F,
    g.positions), its dropped columns 0, when the caller has it: col2im's sums
    are then contiguous runs of the padded input, one per tap.
    """
    xp = array_module(dout)
    if dx_by_convolution(g):
        flipped = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
        convolve(dout, flipped, None, 1, g.HH - 1 - g.pad_h, dx, pad_w=g.WW - 1 - g.pad_w)
        return
    m, s, ph, pw = dout.shape[0], g.stride, g.pad_h, g.pad_w
    w_rows = w.reshape(g.F, g.taps).T
    if g.pitched and dout_pitched is not None:
        rows, pitch, P = g.H + 2 * ph, g.pitch, g.positions
        dcols = xp.matmul(w_rows, dout_pitched).reshape(m, g.C, g.HH, g.WW, P)
        dx_pad = xp.zeros((m, g.C, rows * pitch + g.WW - 1), dtype=dout.dtype)
        for i in range(g.HH):
            for j in range(g.WW):
                dx_pad[:, :, i * pitch + j : i * pitch + j + P] += dcols[:, :, i, j]
        dx[...] = dx_pad[:, :, : rows * pitch].reshape(m, g.C, rows, pitch)[:, :, ph : ph + g.H, pw : pw + g.W]
        return
    dcols = xp.matmul(w_rows, dout.reshape(m, g.F, -1)).reshape(m, g.C, g.HH, g.WW, g.Ho, g.Wo)
    dx_pad = xp.zeros((m, g.C, g.H + 2 * ph, g.W + 2 * pw), dtype=dout.dtype)
    for i in range(g.HH):
        for j in range(g.WW):
            dx_pad[:, :, i : i + s * (g.Ho - 1) + 1 : s, j : j + s * (g.Wo - 1) + 1 : s] += dcols[:, :, i, j]
    dx[...] = dx_pad[:, :, ph : ph + g.H, pw : pw + g.W]


# ---------------------------------------------------------------------------
# Strided convolutions by space-to-depth
# ---------------------------------------------------------------------------


def space_to_depth_wins(g: Geometry, pass_: str = "forward") -> bool:
    """Whether a strided convolution's pass runs as a stride-1 one by space-to-depth (else
    im2col on the exact grid, dx by col2im).

    It pays in the backward, where dx becomes a convolution instead of strided
    scatter-adds, for filters that the stride divides into 2 or more blocks a side:
    then the regrouped filter has no zero taps. Measured (1 thread, float32, best
    of 3 interleaved): 4x4 filters at stride 2 (the ResNet's downsampling, 8 or 16
    channels, batch 2 to 32), the backward 1.10-1.30x faster, the forward 0.84-1.07x;
    2x2 filters at stride 2 (its projections: 1x1 after), 0.96-1.08x and 0.66-0.94x;
    3x3 at stride 2 (padded to 4x4, 16/9 of the products), about 0.5x both ways.
    """
    if g.stride == 1 or min(g.C, g.F) < SPACE_TO_DEPTH_MIN_CHANNELS:
        return False
    if pass_ == "forward":
        return SPACE_TO_DEPTH_FORWARD
    blocks = g.HH % g.stride == 0 and g.WW % g.stride == 0 and min(g.HH, g.WW) >= 2 * g.stride
    return blocks or SPACE_TO_DEPTH_ANY_FILTER


SPACE_TO_DEPTH_MIN_CHANNELS = 1
SPACE_TO_DEPTH_FORWARD = False  # (forced by tests and benchmarks)
SPACE_TO_DEPTH_ANY_FILTER = False


def s2d_output_chunks(x, w, b, g: Geometry, out=None):
    """Yield (rows, product) as direct_output_chunks does, by space-to-depth."""
    s2d = SpaceToDepth(g)
    for rows, product in output_chunks(s2d.input(x), s2d.filters(w), b, 1, 0):
        product = product[:, :, : g.Ho, : g.Wo]
        if out is not None:
            out[rows] = product
            product = out[rows]
        yield rows, product


def s2d_gradients(x, w, g: Geometry, need_dx, dout=None, fill_dout=None):
    """(dx or None, dw, db) of the space-to-depth convolution."""
    xp = array_module(x)
    s2d = SpaceToDepth(g)
    q = s2d.geometry
    dout_q = xp.zeros((q.N, q.F, q.Ho, q.Wo), dtype=x.dtype)  # beyond (Ho, Wo): 0
    if dout is None:
        fill_dout(slice(0, g.N), dout_q[:, :, : g.Ho, : g.Wo])
    else:
        dout_q[:, :, : g.Ho, : g.Wo] = dout
    dx_q, dw_q, db = gradients(s2d.input(x), s2d.filters(w), 1, 0, need_dx, dout=dout_q)
    dx = None
    if need_dx:
        dx = xp.empty(x.shape, dtype=x.dtype)
        s2d.input_gradient(dx_q, dx)
    return dx, s2d.filter_gradient(dw_q), db


# ---------------------------------------------------------------------------
# The choice, and the entry points
# ---------------------------------------------------------------------------


def algorithm(g: Geometry, pass_: str = "forward") -> str:
    """'winograd' or 'direct': the faster for this shape on the CPU, for the forward pass
    (and dx, itself a convolution) or for the filter gradient (pass_="filter gradient").

    Winograd's transforms cost per input and output value, where the
    multiplications it saves grow with channels in and out. For the forward it
    wins with WINOGRAD_MIN_CHANNELS of each, on maps its 2x2 tiles cover with
    little waste (WINOGRAD_MIN_TILE_USE: 7x7 maps need 4x4 tiles, 77% used); for
    dw, whose output transform is the small (16, C, F) one, from
    WINOGRAD_MIN_CHANNELS_DW, on any map; either once the batch has
    WINOGRAD_MIN_OUTPUTS output positions to spread its fixed costs over.
    Measured by benchmarks/bench_conv_algorithms.py (1 thread, float32, best of 3
    interleaved, load average 14-20), Winograd's time against the pitched direct
    path's: 32 channels in and out on 14x14 maps at batch 8 / 32, forward 0.92 /
    1.00, dx 1.08 / 1.14, dw 0.79 / 0.76 (at batch 2: 1.14-1.37, and 392 outputs);
    on 7x7 maps at batch 32, forward 1.01, dx 1.23, dw 0.89; 16 channels on 14x14
    at batch 32, dw 0.93; 64 channels on 8x8 at batch 8, 0.74-0.85 on every pass,
    at batch 2 1.08-1.21; on 16x16 at batch 64, 0.89-1.00.
    """
    if not winograd_applies(g) or g.N * g.Ho * g.Wo < WINOGRAD_MIN_OUTPUTS:
        return "direct"
    if pass_ == "filter gradient":
        return "winograd" if min(g.C, g.F) >= WINOGRAD_MIN_CHANNELS_DW else "direct"
    tiles = 4 * -(-g.Ho // 2) * -(-g.Wo // 2)
    if min(g.C, g.F) < WINOGRAD_MIN_CHANNELS or g.Ho * g.Wo < WINOGRAD_MIN_TILE_USE * tiles:
        return "direct"
    return "winograd"


WINOGRAD_MIN_CHANNELS = 64
WINOGRAD_MIN_CHANNELS_DW = 16
WINOGRAD_MIN_TILE_USE = 0.85
WINOGRAD_MIN_OUTPUTS = 512

_NEVER = 1 << 40
# The thresholds under which one kernel runs wherever it applies (see forced).
KERNELS = {
    "direct, exact grid": {"PITCHED_MIN_TAPS_PER_FILTER": _NEVER, "WINOGRAD_MIN_CHANNELS": _NEVER,
                           "WINOGRAD_MIN_CHANNELS_DW": _NEVER, "SPACE_TO_DEPTH_MIN_CHANNELS": _NEVER},
    "direct, pitched rows": {"PITCHED_MIN_TAPS_PER_FILTER": -1, "WINOGRAD_MIN_CHANNELS": _NEVER,
                             "WINOGRAD_MIN_CHANNELS_DW": _NEVER},
    "winograd": {"WINOGRAD_MIN_CHANNELS": 0, "WINOGRAD_MIN_CHANNELS_DW": 0, "WINOGRAD_MIN_TILE_USE": 0,
                 "WINOGRAD_MIN_OUTPUTS": 0},
    "space to depth": {"SPACE_TO_DEPTH_MIN_CHANNELS": 0, "SPACE_TO_DEPTH_FORWARD": True,
                       "SPACE_TO_DEPTH_ANY_FILTER": True},
    "no space to depth": {"SPACE_TO_DEPTH_MIN_CHANNELS": _NEVER},
    "dx by convolution": {"DX_CONVOLUTION_MAX_FILTERS_PER_CHANNEL": _NEVER},
    "dx by col2im": {"DX_CONVOLUTION_MAX_FILTERS_PER_CHANNEL": 0},
}


@contextlib.contextmanager
def forced(*kernels: str):
    """Within the block, the kernels named (keys of KERNELS, e.g. "winograd", or
    "direct, pitched rows" and "dx by col2im") run wherever they apply, whatever the
    shape: for tests and benchmarks that compare kernels. Not thread-safe: it sets
    the thresholds (this module's, and conv_geometry's pitched rows) and restores
    them on leaving."""
    settings = {name: value for kernel in kernels for name, value in KERNELS[kernel].items()}
    homes = {name: _threshold_home(name) for name in settings}
    saved = {name: getattr(homes[name], name) for name in settings}
    for name, value in settings.items():
        setattr(homes[name], name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(homes[name], name, value)


def _threshold_home(name: str):
    """The module whose functions read the threshold name."""
    return conv_geometry if hasattr(conv_geometry, name) else sys.modules[__name__]


def convolve(x, w, b, stride, pad, out, pad_w=None):
    """out (N, F, Ho, Wo) = the convolution of x (N, C, H, W) with w (F, C, HH, WW), plus b
    (F,) unless None, by the algorithm that suits the shape. pad_w: the width's padding
    when it differs from the height's (pad)."""
    for _ in output_chunks(x, w, b, stride, pad, out, pad_w):
        pass


def output_chunks(x, w, b, stride, pad, out=None, pad_w=None):
    """Yield (rows, product) for chunks of the images of x: product (m, F, Ho, Wo) their
    convolution with w plus b (unless None), while it is in cache. With out given,
    product is out[rows], written; otherwise a buffer reused from chunk to chunk."""
    g = Geometry(x.shape, w.shape, stride, pad, pad_w)
    if space_to_depth_wins(g):
        return s2d_output_chunks(x, w, b, g, out)
    chunks = winograd_output_chunks if algorithm(g) == "winograd" else direct_output_chunks
    return chunks(x, w, b, g, out)


def gradients(x, w, stride, pad, need_dx=True, dout=None, fill_dout=None):
    """(dx or None, dw, db) of convolve(x, w, b, stride, pad) for the gradient of its output:
    dout (N, F, Ho, Wo), or fill_dout(rows, view) writing each chunk's into view."""
    g = Geometry(x.shape, w.shape, stride, pad)
    xp = array_module(x)
    if space_to_depth_wins(g, "gradients"):
        return s2d_gradients(x, w, g, need_dx, dout, fill_dout)
    if algorithm(g, "filter gradient") == "direct":
        return direct_gradients(x, w, g, need_dx, dout, fill_dout)
    if dout is None:
        dout = xp.empty((g.N, g.F, g.Ho, g.Wo), dtype=x.dtype)
        fill_dout(slice(0, g.N), dout)
    dw = winograd_filter_gradient(x, g, dout)
    dout3 = dout.reshape(g.N, g.F, -1)
    db = backend.ones(xp, g.N, x.dtype) @ (dout3 @ backend.ones(xp, dout3.shape[2], x.dtype))
    dx = None
    if need_dx:
        dx = xp.empty(x.shape, dtype=x.dtype)
        _input_gradient(w, dout, g, dx)
    return dx, dw, db
