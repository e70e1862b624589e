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
- Winograd F(2x2, 3x3) (see _WinogradTiles): 2.25x fewer multiplications for
  stride-1 3x3 filters, paid for with transforms of the input and output tiles.

``algorithm(g, pass_)`` picks one by shape and pass; the WINOGRAD_* thresholds and
PITCHED_MIN_TAPS_PER_FILTER hold the crossovers, measured on this project's
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

from . import backend
from .backend import array_module, strided_view


class Geometry:
    """A convolution's shapes, x (N, C, H, W), w (F, C, HH, WW) and out (N, F, Ho, Wo), and
    how the direct path lays out its columns; everything derived is computed once.

    pad_h, pad_w: zeros added on each side; a negative pad crops (dx's convolution
    of dout needs that when pad > HH - 1).

    pitched (stride 1 only): each padded image is stored as rows of ``pitch``
    elements, max(pad_w, 0) zeros, the row, then as many zeros as the widest
    output needs; a row's right padding is the zeros that end it and begin the
    next, so the columns of tap (i, j) are one contiguous run of the stored
    image, and only outputs Wo..pitch-1 of each row are computed and dropped
    (one column for 3x3 filters with pad 1). positions: the outputs computed
    per image, Ho * pitch when pitched, Ho * Wo otherwise.
    """

    __slots__ = ("N", "C", "H", "W", "F", "HH", "WW", "stride", "pad_h", "pad_w", "Ho", "Wo", "taps",
                 "pitched", "pitch", "positions", "extra_columns", "needs_columns")

    def __init__(self, x_shape, w_shape, stride, pad_h, pad_w=None, pitched=None):
        N, C, H, W = x_shape
        F, _, HH, WW = w_shape
        pad_w = pad_h if pad_w is None else pad_w
        self.N, self.C, self.H, self.W, self.F, self.HH, self.WW = N, C, H, W, F, HH, WW
        self.stride, self.pad_h, self.pad_w = stride, pad_h, pad_w
        self.Ho, self.Wo = (H + 2 * pad_h - HH) // stride + 1, (W + 2 * pad_w - WW) // stride + 1
        self.taps = C * HH * WW
        if pitched is None:
            pitched = pitched_wins(stride, self.taps, F)
        self.pitched = pitched and stride == 1
        pw = max(pad_w, 0)
        self.pitch = pw + W - 2 * max(-pad_w, 0) + max(0, pw - WW + 1) if self.pitched else self.Wo
        self.positions = self.Ho * self.pitch
        self.extra_columns = self.pitch != self.Wo
        self.needs_columns = not (HH == WW == stride == 1 and pad_h == pad_w == 0)


def pitched_wins(stride, taps, F) -> bool:
    """Whether the direct path should store pitched rows (stride 1 only).

    Pitched columns copy at memory speed where the exact (Ho, Wo) grid copies Wo
    values at a time, but the output then needs one more copy to drop the extra
    columns. The columns are taps deep and the output F deep: pitched pays when
    taps > PITCHED_MIN_TAPS_PER_FILTER * F. Measured (1 thread, float32, 3x3 pad 1,
    batch 32, forward and dw): 1 or 3 channels in and 32 out (taps/F 0.28, 0.84),
    exact 15-40% faster; 4 (1.1) even; 8 (2.25) and more, pitched 3-35% faster.
    """
    return stride == 1 and taps > PITCHED_MIN_TAPS_PER_FILTER * F


PITCHED_MIN_TAPS_PER_FILTER = 2


def _chunks(N, n):
    """(rows, m, first) for chunks of n images of a batch of N: the last may be smaller."""
    for start in range(0, N, n):
        m = min(n, N - start)
        yield slice(start, start + m), m, start == 0


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
    for rows, _, _ in _chunks(g.N, n):
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
# Winograd F(2x2, 3x3)
# ---------------------------------------------------------------------------
# Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016,
# arXiv:1509.09308): each 2x2 block of a stride-1 3x3 convolution's output is
# Y = A^T [(G g G^T) * (B^T d B)] A, d the 4x4 input tile under it (tiles overlap
# by 2), g a 3x3 filter and * elementwise. Summed over input channels, the 16
# elementwise products become 16 matrix products of (tiles, C) inputs by (C, F)
# filters: 16 multiplications per 4 outputs where the direct convolution takes
# 36, 2.25x fewer. B^T and A^T hold 0 and +-1 and G's 1/2 are exact in binary.
_WINOGRAD_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_WINOGRAD_AT = ((1, 1, 1, 0), (0, 1, -1, -1))
_winograd_maps: dict = {}


def _kron_maps(xp, dtype):
    """(kron(G, G) (16, 9), kron(A^T, A^T) (4, 16)) as arrays of dtype, made once per dtype:
    G g G^T and A^T m A for every filter g (3x3) or tile m (4x4) at once, as one product
    with the entries in row-major order."""
    key = (xp.__name__, xp.dtype(dtype).str)
    if key not in _winograd_maps:
        _winograd_maps[key] = tuple(xp.kron(xp.asarray(m, dtype=dtype), xp.asarray(m, dtype=dtype))
                                    for m in (_WINOGRAD_G, _WINOGRAD_AT))
    return _winograd_maps[key]


def winograd_applies(g: Geometry) -> bool:
    """Winograd F(2x2, 3x3) computes 3x3 convolutions at stride 1 without cropping."""
    return g.stride == 1 and g.HH == g.WW == 3 and g.pad_h >= 0 and g.pad_w >= 0


class _WinogradTiles:
    """B^T d B for every 4x4 input tile d of chunks of up to n images: V (16, tiles, C).

    A grid of th x tw tiles, each under a 2x2 block of outputs, covers (Ho, Wo),
    one row or column more when Ho or Wo is odd (its inputs beyond the padded
    image are 0, its outputs dropped). Tile (t, u) reads the padded input's rows
    2t..2t+3 and columns 2u..2u+3: even rows 2t and 2t+2 and odd rows 2t+1 and
    2t+3. So the input is first split by the parity of its padded row and column
    into four planes (one copy, channels last), and each stage of B^T . B is four
    additions of planes shifted by one tile: every operand is a contiguous run of
    tiles x images x channels, where gathering the overlapping tiles would copy
    the input four times, two values at a time. Tiles are ordered (t, u, image).
    """

    def __init__(self, g: Geometry, n: int, xp, dtype):
        self.g, self.xp = g, xp
        self.th, self.tw = -(-g.Ho // 2), -(-g.Wo // 2)
        self._allocate(n, dtype)
        # Where each parity class of x's rows and columns lands in the planes.
        self.parity = [[self._source(p, g.pad_h, g.H) + self._source(q, g.pad_w, g.W) for q in range(2)]
                       for p in range(2)]

    def _allocate(self, n, dtype):
        xp, C, th, tw = self.xp, self.g.C, self.th, self.tw
        self.n = n
        # Parity planes Q[p, q, i, j] = padded[2i + p, 2j + q]; zeroed once, their
        # interior rewritten for every chunk.
        self.planes = xp.zeros((2, 2, th + 1, tw + 1, n, C), dtype=dtype)
        self.rows = xp.empty((4, 2, th, tw + 1, n, C), dtype=dtype)
        self.V = xp.empty((4, 4, th, tw, n, C), dtype=dtype)

    @staticmethod
    def _source(parity, pad, size):
        """(first source index, first plane index, count) of x's rows (or columns) whose
        padded index has this parity."""
        first = (parity - pad) % 2
        return first, (first + pad) // 2, len(range(first, size, 2))

    def transformed(self, src):
        """V (16, th * tw * m, C) for the images src (m, C, H, W), m <= n (a view of the buffer)."""
        xp, m, th, tw = self.xp, src.shape[0], self.th, self.tw
        if m != self.n:  # a shorter last chunk: buffers of its own size
            self._allocate(m, src.dtype)
        Q, R, V = self.planes, self.rows, self.V
        for p in range(2):
            for q in range(2):
                h0, i0, nh, w0, j0, nw = self.parity[p][q]
                Q[p, q, i0 : i0 + nh, j0 : j0 + nw] = src[:, :, h0::2, w0::2].transpose(2, 3, 0, 1)
        # Rows: B^T's rows (d0 - d2, d1 + d2, d2 - d1, d1 - d3) of rows 2t..2t+3.
        even, odd = Q[0], Q[1]
        xp.subtract(even[:, :th], even[:, 1:], out=R[0])
        xp.add(odd[:, :th], even[:, 1:], out=R[1])
        xp.subtract(even[:, 1:], odd[:, :th], out=R[2])
        xp.subtract(odd[:, :th], odd[:, 1:], out=R[3])
        # Columns: the same combinations of columns 2u..2u+3, for the four rows at once.
        even, odd = R[:, 0], R[:, 1]
        xp.subtract(even[:, :, :tw], even[:, :, 1:], out=V[:, 0])
        xp.add(odd[:, :, :tw], even[:, :, 1:], out=V[:, 1])
        xp.subtract(even[:, :, 1:], odd[:, :, :tw], out=V[:, 2])
        xp.subtract(odd[:, :, :tw], odd[:, :, 1:], out=V[:, 3])
        return V.reshape(16, -1, self.g.C)


def _winograd_chunk_size(g: Geometry, xp, itemsize):
    tiles = -(-g.Ho // 2) * -(-g.Wo // 2)
    per_image = (28 * tiles * g.C + 20 * tiles * g.F) * itemsize
    return backend.images_per_chunk(g.N, per_image, xp)


def _output_blocks(a, th, tw):
    """a (m, F, 2th, 2tw) viewed as (2, 2, th, tw, m, F): each 2x2 block's entries by position."""
    m, F = a.shape[:2]
    return a.reshape(m, F, th, 2, tw, 2).transpose(3, 5, 2, 4, 0, 1)


def winograd_output_chunks(x, w, b, g: Geometry, out=None):
    """Yield (rows, product) as direct_output_chunks does, by Winograd F(2x2, 3x3)."""
    xp = array_module(x)
    F, C = g.F, g.C
    G, AT = _kron_maps(xp, x.dtype)
    U = xp.matmul(G, w.reshape(F * C, 9).T).reshape(16, F, C).transpose(0, 2, 1)  # G g G^T: (16, C, F)
    n = _winograd_chunk_size(g, xp, x.itemsize)
    tiles = _WinogradTiles(g, n, xp, x.dtype)
    th, tw = tiles.th, tiles.tw
    even = 2 * th == g.Ho and 2 * tw == g.Wo
    into_out = out is not None and even
    Y = None if into_out else xp.empty((n, F, 2 * th, 2 * tw), dtype=x.dtype)
    for rows, m, _ in _chunks(g.N, n):
        M = xp.matmul(tiles.transformed(x[rows]), U)  # (16, th * tw * m, F)
        blocks = xp.matmul(AT, M.reshape(16, -1)).reshape(2, 2, th, tw, m, F)  # A^T m A
        target = out[rows] if into_out else Y[:m]
        places = _output_blocks(target, th, tw)
        if b is None:
            places[...] = blocks
        else:
            xp.add(blocks, b, out=places)
        product = target if even else target[:, :, : g.Ho, : g.Wo]
        if out is not None and not into_out:
            out[rows] = product
            product = out[rows]
        yield rows, product


def winograd_filter_gradient(x, g: Geometry, dout):
    """dw (F, C, 3, 3) of the Winograd convolution for dout (N, F, Ho, Wo), its output's gradient.

    The adjoint of its steps, per chunk: dout's 2x2 blocks through A^T . A's
    adjoint to the 16 tile entries, dU[k] += V[k]^T @ dM[k]; at the end, dU back
    through G . G^T to the 9 taps.
    """
    xp = array_module(x)
    F, C = g.F, g.C
    G, AT = _kron_maps(xp, x.dtype)
    n = _winograd_chunk_size(g, xp, x.itemsize)
    tiles = _WinogradTiles(g, n, xp, x.dtype)
    th, tw = tiles.th, tiles.tw
    even = 2 * th == g.Ho and 2 * tw == g.Wo
    padded = None if even else xp.zeros((n, F, 2 * th, 2 * tw), dtype=x.dtype)  # beyond (Ho, Wo): 0
    blocks = xp.empty((2, 2, th, tw, n, F), dtype=x.dtype)
    dU = None
    for rows, m, _ in _chunks(g.N, n):
        V = tiles.transformed(x[rows])
        grad = dout[rows]
        if not even:
            padded[:m, :, : g.Ho, : g.Wo] = grad
            grad = padded[:m]
        dY = blocks[:, :, :, :, :m] if m == n else xp.empty((2, 2, th, tw, m, F), dtype=x.dtype)
        dY[...] = _output_blocks(grad, th, tw)
        dM = xp.matmul(AT.T, dY.reshape(4, -1)).reshape(16, -1, F)
        part = xp.matmul(V.transpose(0, 2, 1), dM)  # (16, C, F)
        if dU is None:
            dU = part
        else:
            dU += part
    dw = xp.matmul(G.T, dU.reshape(16, C * F))  # (9, C * F)
    return xp.ascontiguousarray(dw.reshape(9, C, F).transpose(2, 1, 0)).reshape(F, C, 3, 3)


# ---------------------------------------------------------------------------
# Strided convolutions by space-to-depth
# ---------------------------------------------------------------------------


class _SpaceToDepth:
    """A stride-s convolution as a stride-1 one: each s x s block of the padded input
    becomes s*s*C channels of one pixel, each filter's taps regrouped alike (padded to
    multiples of s with zeros), so that out[y, x] = sum over the s2d filter's kh x kw
    taps of the s2d input at (y + i, x + j).

    The stride-1 convolution then takes the fast paths (pitched rows, dx as a
    convolution of dout) where the strided one copies its columns a few values at
    a time and scatters dx back with strided adds. Its output may have a row or
    column more than the strided one's: dropped (and 0 in the backward's dout).
    """

    def __init__(self, g: Geometry):
        s = self.s = g.stride
        self.g = g
        self.kh, self.kw = -(-g.HH // s), -(-g.WW // s)
        # s2d rows and columns: the padded input's, rounded up to whole blocks, enough for Ho x Wo
        self.Hq = max(-(-(g.H + 2 * g.pad_h) // s), g.Ho + self.kh - 1)
        self.Wq = max(-(-(g.W + 2 * g.pad_w) // s), g.Wo + self.kw - 1)
        self.geometry = Geometry((g.N, s * s * g.C, self.Hq, self.Wq), (g.F, s * s * g.C, self.kh, self.kw), 1, 0)

    def input(self, x):
        """x (N, C, H, W) -> (N, s*s*C, Hq, Wq): padded, then each s x s block as channels (one copy)."""
        g, s, xp = self.g, self.s, array_module(x)
        padded = xp.zeros((g.N, g.C, self.Hq * s, self.Wq * s), dtype=x.dtype)
        padded[:, :, g.pad_h : g.pad_h + g.H, g.pad_w : g.pad_w + g.W] = x
        blocks = padded.reshape(g.N, g.C, self.Hq, s, self.Wq, s).transpose(0, 3, 5, 1, 2, 4)
        return xp.ascontiguousarray(blocks).reshape(g.N, s * s * g.C, self.Hq, self.Wq)

    def filters(self, w):
        """w (F, C, HH, WW) -> (F, s*s*C, kh, kw), taps beyond HH x WW 0."""
        g, s, xp = self.g, self.s, array_module(w)
        padded = xp.zeros((g.F, g.C, self.kh * s, self.kw * s), dtype=w.dtype)
        padded[:, :, : g.HH, : g.WW] = w
        blocks = padded.reshape(g.F, g.C, self.kh, s, self.kw, s).transpose(0, 3, 5, 1, 2, 4)
        return xp.ascontiguousarray(blocks).reshape(g.F, s * s * g.C, self.kh, self.kw)

    def filter_gradient(self, dw):
        """The inverse of filters for a gradient: (F, s*s*C, kh, kw) -> (F, C, HH, WW)."""
        g, s = self.g, self.s
        taps = dw.reshape(g.F, s, s, g.C, self.kh, self.kw).transpose(0, 3, 4, 1, 5, 2)
        return array_module(dw).ascontiguousarray(taps.reshape(g.F, g.C, self.kh * s, self.kw * s)[:, :, : g.HH, : g.WW])

    def input_gradient(self, dx, out):
        """The inverse of input for a gradient: (N, s*s*C, Hq, Wq) -> out (N, C, H, W)."""
        g, s = self.g, self.s
        blocks = dx.reshape(g.N, s, s, g.C, self.Hq, self.Wq).transpose(0, 3, 4, 1, 5, 2)
        out[...] = blocks.reshape(g.N, g.C, self.Hq * s, self.Wq * s)[:, :, g.pad_h : g.pad_h + g.H,
                                                                      g.pad_w : g.pad_w + g.W]


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
    s2d = _SpaceToDepth(g)
    for rows, product in output_chunks(s2d.input(x), s2d.filters(w), b, 1, 0):
        product = product[:, :, : g.Ho, : g.Wo]
        if out is not None:
            out[rows] = product
            product = out[rows]
        yield rows, product


def s2d_gradients(x, w, g: Geometry, need_dx, dout=None, fill_dout=None):
    """(dx or None, dw, db) of the space-to-depth convolution."""
    xp = array_module(x)
    s2d = _SpaceToDepth(g)
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
    this module's thresholds and restores them on leaving."""
    settings = {name: value for kernel in kernels for name, value in KERNELS[kernel].items()}
    saved = {name: globals()[name] for name in settings}
    globals().update(settings)
    try:
        yield
    finally:
        globals().update(saved)


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
