"""Vectorised twins of the naive convolution and max pool in ``cnncore.layers``.

Same arguments, same results (to rounding: 1e-12 relative in float64), and
caches that either implementation's backward accepts, with no Python loop over
output pixels. The loops left run over a few chunks of images and over the
filter or pool-window offsets.

Convolution is im2col + matrix products, one chunk of images at a time. The
chunk is small enough (``backend.chunk_bytes``) that its columns are still in
cache when the products read them: the full column matrix, HH*WW times the
size of x, never exists, and the backward pass rebuilds the columns rather
than caching them. The columns are built for one filter row at a time
(WW*C taps, channels last; see _row_columns), so the copy expands x only
WW-fold, and the product of each filter row is summed over the HH rows.
Measured on a 2-core AMD EPYC (OpenBLAS, 1 thread, float32), these products
ran as fast as one product with all the taps and twice as fast as the classic
(C*HH*WW, N*H'*W') layout, whose copy also took longer.

Max pooling takes elementwise maxima over the window offsets of strided views,
which is much faster than a reduction over tiny axes. The forward also records
which offset won each window (int8) so the backward routes the gradient without
comparing again.

``conv_relu_pool_forward_fast`` fuses conv -> relu -> max pool: it pools each
chunk's convolution output while it is in cache, and applies the relu to the
pooled map (a quarter of the size for 2x2 pools: max pooling commutes with
relu), so the full-size activation is neither written nor kept.

Every function takes its array module from its inputs, so CuPy arrays run here
unchanged on a GPU.

Arguments are checked as in ``cnncore.layers``, with the same messages: x and w
must be float32 or float64 arrays (float16, integer and bool arrays are refused,
naming the argument and its dtype; a dtype check, not a pass over memory), and
every backward checks that dout has the shape of its forward's output.
"""

from __future__ import annotations

import math

from . import checks
from .backend import array_module, chunk_bytes, sliding_windows
from .layers import _running_stats, _update_running_stats


# ---------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------


def _offset_view(a, i, j, stride, Ho, Wo):
    """a[..., i + stride*h, j + stride*w] for h < Ho, w < Wo: a strided view."""
    return a[..., i : i + stride * (Ho - 1) + 1 : stride, j : j + stride * (Wo - 1) + 1 : stride]


def _images_per_chunk(N, bytes_per_image, xp):
    return max(1, min(N, chunk_bytes(xp) // max(bytes_per_image, 1)))


def _image_chunks(x, arrays):
    """Slices of x's batch: chunks of images over which ``arrays`` arrays like x fit in cache."""
    N = x.shape[0]
    n = _images_per_chunk(N, arrays * x[:1].nbytes, array_module(x))
    return [slice(start, min(start + n, N)) for start in range(0, N, n)]


def _row_columns(x, w_shape, stride, pad, Ho, Wo):
    """Yield (rows, R) for consecutive chunks of the n images of x (N, C, H, W).

    rows is a slice of the batch. R (n, H + 2*pad, Wo, WW * C) holds, for each
    padded input row and output column w, the WW * C inputs a filter row meets
    there, in (j, c) order: channels last, so that each is one contiguous run
    of the padded input to copy. Filter row i at output row h reads padded row
    h * stride + i, so the im2col columns of filter row i are a strided slice
    of R (see _filter_row_columns): the copy expands x WW-fold, not HH*WW-fold,
    and the products over the HH filter rows, with WW * C taps each, run as
    fast as one product with all the taps. Chunks are sized so that R and the
    chunk's output stay in cache; R is reused from one chunk to the next: use
    it before asking for the next chunk.
    """
    xp = array_module(x)
    N, C, H, W = x.shape
    F, _, _, WW = w_shape
    Hp = H + 2 * pad
    n = _images_per_chunk(N, (Hp * Wo * WW * C + 2 * Ho * Wo * F) * x.itemsize, xp)
    x_pad = xp.zeros((n, Hp, W + 2 * pad, C), dtype=x.dtype)  # the border stays 0
    R = xp.empty((n, Hp, Wo, WW, C), dtype=x.dtype)
    for start in range(0, N, n):
        rows = slice(start, min(start + n, N))
        m = rows.stop - start
        x_pad[:m, pad : pad + H, pad : pad + W] = x[rows].transpose(0, 2, 3, 1)
        windows = sliding_windows(x_pad[:m], (WW,), axis=(2,))[:, :, ::stride]  # (m, Hp, Wo, C, WW)
        R[:m] = windows.transpose(0, 1, 2, 4, 3)
        yield rows, R[:m].reshape(m, Hp, Wo, WW * C)


def _filter_row_columns(R, i, stride, Ho):
    """(n, Ho * Wo, WW * C): what filter row i meets at each output position (a view when stride is 1)."""
    n, _, Wo, taps = R.shape
    return R[:, i : i + stride * (Ho - 1) + 1 : stride].reshape(n, Ho * Wo, taps)


def _filter_rows(w):
    """w (F, C, HH, WW) as (HH, WW * C, F): per filter row, its taps in R's (j, c) order."""
    F, C, HH, WW = w.shape
    return w.transpose(2, 3, 1, 0).reshape(HH, WW * C, F)


class _ConvForward:
    """The convolution of one chunk of images at a time, channels last.

    __call__(R) returns product (n, H'W', F): the sum over filter rows of their
    columns @ their taps, without the bias. The buffers are reused.
    """

    def __init__(self, w, stride, Ho):
        self.w_rows = _filter_rows(w)
        self.stride, self.Ho = stride, Ho
        self._product = self._scratch = None

    def __call__(self, R):
        xp = array_module(R)
        n, _, Wo, _ = R.shape
        if self._product is None:
            shape = (n, self.Ho * Wo, self.w_rows.shape[2])
            self._product, self._scratch = xp.empty(shape, dtype=R.dtype), xp.empty(shape, dtype=R.dtype)
        product, scratch = self._product[:n], self._scratch[:n]
        for i, taps in enumerate(self.w_rows):
            cols = _filter_row_columns(R, i, self.stride, self.Ho)
            if i == 0:
                xp.matmul(cols, taps, out=product)
            else:
                product += xp.matmul(cols, taps, out=scratch)
        return product


class _ConvBackward:
    """The gradients of one convolution, accumulated chunk by chunk of images.

    add(rows, dout, R) takes the output gradient of the images ``rows``,
    (n, F, H'W') in any memory layout, with their row columns R; result()
    returns (dx, dw, db), dx None when need_dx is False.
    """

    def __init__(self, x, w, conv_param, need_dx):
        xp = self.xp = array_module(x)
        self.x_shape, self.w = x.shape, w
        self.stride, self.pad = conv_param["stride"], conv_param["pad"]
        F, C, HH, WW = w.shape
        self.dw_rows = xp.zeros((F, HH, WW * C), dtype=x.dtype)  # in R's tap order
        self.db = xp.zeros(F, dtype=x.dtype)
        self.dx = xp.empty(x.shape, dtype=x.dtype) if need_dx else None
        self._ones = self._dx_pad = None
        # With stride 1, dx is itself a convolution: of dout, padded by HH - 1 - pad,
        # with the filters flipped and input and output channels swapped. That runs
        # at the forward pass's speed, where the scatter-add of col2im is slow: 25-35%
        # less time for 3x3 and 5x5 filters on 8 to 64 channels (float32 and float64,
        # 1 thread). With fewer than 8 input channels the products have too few
        # columns, and col2im was as fast or faster (3 channels, 7x7). Square filters
        # and pad < HH only; other shapes take col2im.
        self._dx_pad_width = HH - 1 - self.pad
        self._dx_filters = None
        if need_dx and self.stride == 1 and HH == WW and self._dx_pad_width >= 0 and C >= 8:
            self._dx_filters = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)

    def add(self, rows, dout, R):
        n, F, P = dout.shape
        Ho = P // R.shape[2]
        # Per filter row, one (F, H'W') @ (H'W', WW*C) product per image, summed.
        for i in range(self.w.shape[2]):
            self.dw_rows[:, i] += self.xp.matmul(dout, _filter_row_columns(R, i, self.stride, Ho)).sum(axis=0)
        self.add_input_gradients(rows, dout, Ho)

    def add_input_gradients(self, rows, dout, Ho):
        """add() without dw: db and dx of the images ``rows``, for dout (n, F, H'W')."""
        xp = self.xp
        n, F, P = dout.shape
        if self._ones is None:
            self._ones = xp.ones(P, dtype=dout.dtype)
        self.db += xp.matmul(dout, self._ones).sum(axis=0)  # a product: faster than sum over (0, 2)
        if self._dx_filters is not None:
            dout4 = dout.reshape(n, F, Ho, P // Ho)
            _convolve(dout4, self._dx_filters, None, 1, self._dx_pad_width, self.dx[rows])
        elif self.dx is not None:
            # Column gradients in (c, i, j) order and channels first, (n, C*HH*WW, H'W'),
            # so that each scatter-add below runs along whole output rows.
            self.dx[rows] = self._col2im(xp.matmul(self.w.reshape(F, -1).T, dout))

    def _col2im(self, dcols):
        """Adjoint of im2col for one chunk: sum the column gradients back onto (n, C, H, W)."""
        N, C, H, W = self.x_shape
        HH, WW = self.w.shape[2:]
        n, s, pad = dcols.shape[0], self.stride, self.pad
        if self._dx_pad is None:
            self._dx_pad = self.xp.empty((n, C, H + 2 * pad, W + 2 * pad), dtype=dcols.dtype)
        dx_pad = self._dx_pad[:n]
        dx_pad.fill(0)
        Ho, Wo = (H + 2 * pad - HH) // s + 1, (W + 2 * pad - WW) // s + 1
        dcols = dcols.reshape(n, C, HH, WW, Ho, Wo)
        for i in range(HH):
            for j in range(WW):
                _offset_view(dx_pad, i, j, s, Ho, Wo)[...] += dcols[:, :, i, j]
        return dx_pad[:, :, pad : pad + H, pad : pad + W]

    def result(self, dw=None):
        """(dx, dw, db); dw from the products add() summed unless given."""
        if dw is None:
            F, C, HH, WW = self.w.shape
            dw = self.xp.ascontiguousarray(self.dw_rows.reshape(F, HH, WW, C).transpose(0, 3, 1, 2))
        return self.dx, dw, self.db


def conv_forward_fast(x, w, b, conv_param):
    """Convolution as chunked im2col + matrix products; the arguments, output and
    cache of conv_forward_naive.

    x: (N, C, H, W); w: (F, C, HH, WW); b: (F,); conv_param: 'stride', 'pad'.
    Returns (out, cache): out (N, F, H', W'); cache (x, w, b, conv_param).
    """
    N, F, Ho, Wo = checks.conv_forward_inputs(x, w, b, conv_param)
    out = array_module(x).empty((N, F, Ho, Wo), dtype=x.dtype)
    _convolve(x, w, b, conv_param["stride"], conv_param["pad"], out)
    return out, (x, w, b, conv_param)


def _convolve(x, w, b, stride, pad, out):
    """out (N, F, H', W') = the convolution of x with w, plus b unless b is None."""
    xp = array_module(x)
    if _winograd_wins(x.shape, w.shape, stride):
        return _winograd_convolve(x, w, b, pad, out)
    N, F, Ho, Wo = out.shape
    out = out.reshape(N, F, Ho * Wo)
    convolve = _ConvForward(w, stride, Ho)
    for rows, R in _row_columns(x, w.shape, stride, pad, Ho, Wo):
        # From channels last to out's channels first while in cache, adding the bias on the way.
        product = convolve(R).transpose(0, 2, 1)
        if b is None:
            out[rows] = product
        else:
            xp.add(product, b.reshape(F, 1), out=out[rows])


# Winograd F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural
# Networks", CVPR 2016, arXiv:1509.09308): each 2x2 block of a stride-1 3x3
# convolution's output is Y = A^T [(G g G^T) * (B^T d B)] A, d the 4x4 input tile
# under it (tiles overlap by 2), g a 3x3 filter and * elementwise; summed over
# input channels, the 16 elementwise products become 16 matrix products of
# (F, C) filters by (C, tiles) inputs: 16 multiplications per 4 outputs where the
# direct convolution takes 36, 2.25x fewer. B^T and A^T hold only 0 and +-1, so
# their transforms are additions; G's 1/2 are exact in binary.
_WINOGRAD_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_WINOGRAD_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_WINOGRAD_AT = ((1, 1, 1, 0), (0, 1, -1, -1))
# Fewer input channels than this leave the products too short to pay for the transforms.
WINOGRAD_MIN_CHANNELS = 16


def _winograd_wins(x_shape, w_shape, stride):
    F, C, HH, WW = w_shape
    return stride == 1 and HH == WW == 3 and C >= WINOGRAD_MIN_CHANNELS


def _combine(xp, matrix, parts, outs):
    """outs[a] = sum_i matrix[a][i] * parts[i], for a matrix of 0 and +-1 entries
    whose rows each have a +1: additions and subtractions into the out arrays."""
    for row, out in zip(matrix, outs):
        terms = sorted(((c, p) for c, p in zip(row, parts) if c), key=lambda term: -term[0])
        (_, first), *rest = terms
        for k, (c, p) in enumerate(rest):
            (xp.add if c > 0 else xp.subtract)(first if k == 0 else out, p, out=out)


def _winograd_chunks(x, shapes):
    """Yield (rows, buffers, fresh) for chunks of the images of x (N, C, H, W), of even sizes.

    shapes maps a buffer's name to its shape for a chunk of n images; buffers
    maps the names to arrays of those shapes, reused from chunk to chunk, with
    two more: "x_pad" (H', W', n, C) and "rows" (4, th, W', n, C) for
    _winograd_input_tiles. fresh: they are uninitialised (the first chunk, and
    a shorter last one); otherwise they keep their contents from the previous
    chunk. Chunks are sized so that the buffers stay in cache.
    """
    xp = array_module(x)
    N, C = x.shape[:2]
    th, tw = shapes["V"](1)[2:4]
    shapes = {"x_pad": lambda n: (2 * th + 2, 2 * tw + 2, n, C),
              "rows": lambda n: (4, th, 2 * tw + 2, n, C), **shapes}
    n = _images_per_chunk(N, sum(math.prod(shape(1)) for shape in shapes.values()) * x.itemsize, xp)
    n = -(-N // -(-N // n))  # as many chunks, of even sizes
    flat = {name: xp.empty(math.prod(shape(n)), dtype=x.dtype) for name, shape in shapes.items()}
    for start in range(0, N, n):
        m = min(n, N - start)
        buffers = {name: flat[name][: math.prod(shape(m))].reshape(shape(m)) for name, shape in shapes.items()}
        yield slice(start, start + m), buffers, start == 0 or m < n


def _winograd_input_tiles(x, pad, buffers, fresh):
    """buffers["V"] (4, 4, th, tw, n, C) = B^T d B for every 4x4 input tile d of
    x (n, C, H, W) padded by pad; fresh as _winograd_chunks yields it."""
    xp = array_module(x)
    H, W = x.shape[2:]
    x_pad, rows_t, V = buffers["x_pad"], buffers["rows"], buffers["V"]
    th, tw = V.shape[2:4]
    if fresh:  # the border is 0, and stays 0 while the chunks are of one size
        x_pad.fill(0)
    x_pad[pad : pad + H, pad : pad + W] = x.transpose(2, 3, 0, 1)
    _combine(xp, _WINOGRAD_BT, [x_pad[i : i + 2 * th : 2] for i in range(4)], rows_t)
    for a in range(4):
        _combine(xp, _WINOGRAD_BT, [rows_t[a, :, j : j + 2 * tw : 2] for j in range(4)], V[a])


def _winograd_tile_grid(Ho, Wo):
    return -(-Ho // 2), -(-Wo // 2)


def _winograd_output_map(dtype, xp):
    """kron(A^T, A^T) (4, 16): A^T m A for the 16 entries of a tile m in row-major order."""
    At = xp.asarray(_WINOGRAD_AT, dtype=dtype)
    return xp.kron(At, At)


def _winograd_filter_map(dtype, xp):
    """kron(G, G) (16, 9): G g G^T for the 9 taps of a 3x3 filter g in row-major order."""
    G = xp.asarray(_WINOGRAD_G, dtype=dtype)
    return xp.kron(G, G)


def _winograd_convolve(x, w, b, pad, out):
    """_convolve for stride 1 and 3x3 filters by Winograd F(2x2, 3x3), a chunk of images at a time.

    Every buffer is laid out (tile row, tile column, image, channel): each
    transform step is one ufunc call whose inner loop runs over the chunk's
    images and channels, contiguous, and the 16 products are one batched
    matmul, (16, tiles * n, C) @ (16, C, F). Outputs of odd height or width get
    a tile grid one row or column too large, its extra inputs 0, cropped.
    """
    xp = array_module(x)
    N, C, H, W = x.shape
    F = w.shape[0]
    _, _, Ho, Wo = out.shape
    th, tw = _winograd_tile_grid(Ho, Wo)
    # G g G^T per (filter, channel) as one product.
    U = (w.reshape(F * C, 9) @ _winograd_filter_map(w.dtype, xp).T).T.reshape(16, F, C).transpose(0, 2, 1)
    AtA = _winograd_output_map(x.dtype, xp)
    shapes = {  # per chunk of n images
        "V": lambda n: (4, 4, th, tw, n, C),  # B^T d B
        "M": lambda n: (4, 4, th, tw, n, F),  # the 16 products
        "AtM": lambda n: (2, 2, th, tw, n, F),  # A^T m A, by output position in the tile
        "Y": lambda n: (2 * th, 2 * tw, n, F),  # A^T M A, each tile in its place
    }
    for rows, buffers, fresh in _winograd_chunks(x, shapes):
        V, M, AtM, Y = (buffers[name] for name in shapes)
        _winograd_input_tiles(x[rows], pad, buffers, fresh)
        m = V.shape[4]
        xp.matmul(V.reshape(16, -1, C), U, out=M.reshape(16, -1, F))
        xp.matmul(AtA, M.reshape(16, -1), out=AtM.reshape(4, -1))  # A^T m A, in one product
        Y.reshape(th, 2, tw, 2, m, F)[...] = AtM.transpose(2, 0, 3, 1, 4, 5)
        y = Y[:Ho, :Wo].transpose(2, 3, 0, 1)  # (m, F, Ho, Wo)
        if b is None:
            out[rows] = y
        else:
            xp.add(y, b.reshape(F, 1, 1), out=out[rows])


def _winograd_filter_gradient(x, dout, pad):
    """dw (F, C, 3, 3) of _winograd_convolve(x, w, b, pad, out) for dout, the gradient of out.

    The adjoint of the forward's steps: per chunk, the input tiles V as in the
    forward, each output gradient tile (2x2) mapped back through A^T . A to
    its 16 entries, and the 16 products dU[k] += V[k]^T @ dM[k], (C, tiles * n)
    @ (tiles * n, F); then through G . G^T back to the 9 taps. 2.25x fewer
    multiplications than the direct products, as in the forward.
    """
    xp = array_module(x)
    C = x.shape[1]
    F, Ho, Wo = dout.shape[1:]
    th, tw = _winograd_tile_grid(Ho, Wo)
    shapes = {
        "V": lambda n: (4, 4, th, tw, n, C),
        "dM": lambda n: (4, 4, th, tw, n, F),  # the output gradient's tiles through A^T . A's adjoint
        "dY": lambda n: (2, 2, th, tw, n, F),  # dout by position in its tile; beyond (Ho, Wo) 0
    }
    AtA_T = _winograd_output_map(x.dtype, xp).T
    dU = xp.zeros((16, C, F), dtype=x.dtype)
    for rows, buffers, fresh in _winograd_chunks(x, shapes):
        V, dM, dY = (buffers[name] for name in shapes)
        _winograd_input_tiles(x[rows], pad, buffers, fresh)
        if fresh:
            dY.fill(0)
        for a in range(2):
            for c in range(2):
                grid = dout[rows, :, a::2, c::2]
                dY[a, c, : grid.shape[2], : grid.shape[3]] = grid.transpose(2, 3, 0, 1)
        xp.matmul(AtA_T, dY.reshape(4, -1), out=dM.reshape(16, -1))
        dU += xp.matmul(V.reshape(16, -1, C).transpose(0, 2, 1), dM.reshape(16, -1, F))
    dw = _winograd_filter_map(x.dtype, xp).T @ dU.reshape(16, C * F)  # (9, C * F)
    return xp.ascontiguousarray(dw.reshape(3, 3, C, F).transpose(3, 2, 0, 1))


def conv_backward_fast(dout, cache, need_dx: bool = True):
    """dout: (N, F, H', W'). Returns (dx, dw, db) shaped like x, w, b.

    cache: from conv_forward_fast or conv_forward_naive (they are the same).
    need_dx=False skips the input gradient and returns None for dx: the first
    layer of a network has nothing upstream that needs it.
    """
    x, w, b, conv_param = cache
    checks.require_dout_shape(dout, checks.conv_output_shape(x, w, conv_param))
    N, F, Ho, Wo = dout.shape
    grads = _ConvBackward(x, w, conv_param, need_dx)
    dout3 = dout.reshape(N, F, Ho * Wo)
    col2im = need_dx and grads._dx_filters is None  # whose scratch wants the chunks below
    if _winograd_wins(x.shape, w.shape, conv_param["stride"]) and not col2im:
        grads.add_input_gradients(slice(None), dout3, Ho)
        return grads.result(_winograd_filter_gradient(x, dout, conv_param["pad"]))
    for rows, R in _row_columns(x, w.shape, conv_param["stride"], conv_param["pad"], Ho, Wo):
        grads.add(rows, dout3[rows], R)
    return grads.result()


# ---------------------------------------------------------------------------
# Max pooling
# ---------------------------------------------------------------------------


class _PoolCache(tuple):
    """(x, pool_param), the naive layer's cache, also carrying ``winner``: the
    row-major offset of each window's first maximum, found by the forward.

    max_pool_backward_naive unpacks the two entries and ignores winner;
    max_pool_backward_fast uses it, and finds it again from x when given a
    plain (x, pool_param) cache.
    """

    winner = None


def _pool_windows(x, pool_param):
    """Yield (k, view) for each window offset in row-major order, view (N, C, H', W')."""
    _, _, Ho, Wo = checks.pool_output_shape(x, pool_param)
    ph, pw, s = pool_param["pool_height"], pool_param["pool_width"], pool_param["stride"]
    for i in range(ph):
        for j in range(pw):
            yield i * pw + j, _offset_view(x, i, j, s, Ho, Wo)


def _pool_argmax(x, pool_param, out, winner):
    """Window maxima of x into out (N, C, H', W') and the offset of each window's
    first maximum in row-major order into winner (an integer array like out).

    Ties go to the first maximum, as in max_pool_backward_naive's argmax (and
    PyTorch): every comparison below is a strict '>' of a later offset against
    an earlier one.
    """
    if pool_param["pool_height"] == pool_param["pool_width"] == 2:
        return _pool_argmax_2x2(x, pool_param, out, winner)
    xp = array_module(x)
    for k, view in _pool_windows(x, pool_param):
        if k == 0:
            out[...] = view
            winner.fill(0)
            continue
        better = (view > out).astype(winner.dtype)
        xp.maximum(out, view, out=out)
        winner -= better * (winner - k)  # winner = k where better: integer arithmetic, no masked copy


def _pool_argmax_2x2(x, pool_param, out, winner):
    """_pool_argmax for 2x2 windows, as a tree: the maxima of the top and bottom
    pairs, then of the two; a quarter fewer passes over the strided views."""
    xp = array_module(x)
    top_left, top_right, bottom_left, bottom_right = (view for _, view in _pool_windows(x, pool_param))
    xp.maximum(top_left, top_right, out=out)
    bottom = xp.maximum(bottom_left, bottom_right)
    right = (top_right > top_left).astype(winner.dtype)  # offset 1 beats 0
    below = (bottom > out).astype(winner.dtype)  # the bottom pair beats the top one
    xp.maximum(out, bottom, out=out)
    winner[...] = (bottom_right > bottom_left).astype(winner.dtype)
    winner += 2 - right  # 2 or 3, less the top pair's offset
    winner *= below
    winner += right  # offset 0 or 1 above, 2 or 3 below


def _winner_dtype(xp, pool_param):
    return xp.int8 if pool_param["pool_height"] * pool_param["pool_width"] <= 127 else xp.int32


def _unpool(dout, winner, pool_param, dx):
    """Route dout (N, C, H', W') to each window's winner in dx (N, C, H, W), in place."""
    xp = array_module(dout)
    ph, pw, s = pool_param["pool_height"], pool_param["pool_width"], pool_param["stride"]
    N, C, Ho, Wo = dout.shape
    H, W = dx.shape[2:]
    overlapping = s < ph or s < pw
    if not (s == ph == pw and H == s * Ho and W == s * Wo):  # some inputs are in no window
        dx.fill(0)
    for k, dx_view in _pool_windows(dx, pool_param):
        if overlapping:  # an input in several windows sums their gradients
            dx_view += dout * (winner == k)
        else:
            xp.multiply(dout, winner == k, out=dx_view)
    return dx


def _max_pool(x, pool_param):
    """(out, winner) of _pool_argmax for the whole batch, a few images at a time,
    so that each chunk's strided views and temporaries stay in cache."""
    xp = array_module(x)
    checks.require_float_array("x", x)
    shape = checks.pool_output_shape(x, pool_param)
    out = xp.empty(shape, dtype=x.dtype)
    winner = xp.empty(shape, dtype=_winner_dtype(xp, pool_param))
    for rows in _image_chunks(x, 4):
        _pool_argmax(x[rows], pool_param, out[rows], winner[rows])
    return out, winner


def max_pool_forward_fast(x, pool_param):
    """Max pooling as elementwise maxima of strided views; arguments and output of
    max_pool_forward_naive (any stride, overlapping windows included).

    x: (N, C, H, W). Returns (out, cache): out (N, C, H', W'); cache (x, pool_param)
    carrying the argmax of each window for the backward (see _PoolCache).
    """
    out, winner = _max_pool(x, pool_param)
    cache = _PoolCache((x, pool_param))
    cache.winner = winner
    return out, cache


def max_pool_backward_fast(dout, cache):
    """dout: (N, C, H', W'). Returns dx shaped like x.

    As max_pool_backward_naive: each window's gradient goes to its first maximum
    in row-major order. cache: from either max_pool_forward_fast or
    max_pool_forward_naive.
    """
    x, pool_param = cache
    checks.require_dout_shape(dout, checks.pool_output_shape(x, pool_param))
    winner = getattr(cache, "winner", None)
    if winner is None:
        winner = _max_pool(x, pool_param)[1]
    dx = array_module(x).empty_like(x)
    for rows in _image_chunks(x, 4):
        _unpool(dout[rows], winner[rows], pool_param, dx[rows])
    return dx


# ---------------------------------------------------------------------------
# Spatial normalisation
# ---------------------------------------------------------------------------
# Twins of layers.spatial_batchnorm_* and layers.spatial_groupnorm_*: the same
# arguments and results. Every per-channel or per-group statistic is a
# reduction along contiguous rows of x viewed (rows, length): a matrix-vector
# product for sums, an einsum for sums of products; never a transposed copy.
# The elementwise steps run chunk by chunk of images, so that the few arrays
# each chunk touches stay in cache from one step to the next.


def _row_sums(a):
    """a (R, L) -> (R,) row sums, as one matrix-vector product."""
    return a @ array_module(a).ones(a.shape[1], dtype=a.dtype)


def _row_dots(a, b):
    """a, b (R, L) -> (R,): sum(a * b) along each row, without the product array,
    as R (1, L) @ (L, 1) products (twice as fast as einsum's 'ij,ij->i' in NumPy 2.4)."""
    return array_module(a).matmul(a[:, None, :], b[:, :, None]).reshape(a.shape[0])


def _per_image_channel(rows_reduction, a, *others):
    """rows_reduction over each (image, channel) row of a (N, C, H, W) (and of
    the arrays in others, alike): (N, C)."""
    N, C = a.shape[:2]
    return rows_reduction(*(t.reshape(N * C, -1) for t in (a, *others))).reshape(N, C)


def _channel(v, image_shape):
    """(C,) -> (C, H, W) = image_shape, each channel's value repeated over its
    pixels: one image's worth, to broadcast over the images of (n, C, H, W).

    Elementwise steps with it read two contiguous arrays, which NumPy runs about
    1.7x as fast as broadcasting a (C, 1, 1) column along each row (NumPy 2.4).
    """
    xp = array_module(v)
    return xp.ascontiguousarray(xp.broadcast_to(v.reshape(-1, 1, 1), image_shape))


def spatial_batchnorm_forward_fast(x, gamma, beta, bn_param):
    """Batch normalisation per channel; the arguments and output of
    layers.spatial_batchnorm_forward (bn_param's running statistics and norm_batch included).

    x: (N, C, H, W); gamma, beta: (C,) or (1, C, 1, 1).
    Returns (out, cache): out (N, C, H, W); cache (x, mean, inv_std, gamma (C,), mode,
    gamma.shape, beta.shape) for spatial_batchnorm_backward_fast, where mean and
    inv_std are (C,), or (N / norm_batch, C) in train mode with ghost groups (one row
    per group). The reference layer's cache holds x_hat instead of x: each backward
    takes its own forward's cache, as the sandwiches of layer_utils pair them.

    Two passes over x and one write of out, the least memory traffic there is:
    the statistics in one pass (sums and sums of squares of x less a per-channel
    shift, chunk by chunk in cache), then out = x * scale + offset per channel
    (per image and channel with ghost groups). Neither x - mean nor x_hat is
    stored: the cache keeps x itself, which costs no memory, and the backward
    needs only per-channel affine maps of it.
    """
    checks.require_float_array("x", x)
    checks.require_ndim("x", x, 4, "(N, C, H, W)")
    xp = array_module(x)
    N, C, H, W = x.shape
    g = checks.affine_params("gamma", gamma, C)
    bt = checks.affine_params("beta", beta, C)
    mode, eps, momentum = checks.bn_settings(bn_param, x.shape, N * H * W)
    groups = checks.bn_groups(bn_param, mode, N)
    running_mean, running_var = _running_stats(bn_param, C, xp, x.dtype)
    chunks = _image_chunks(x, 3)
    if mode == "train":
        mean, var = _channel_mean_var(x, chunks, groups)
        _update_running_stats(bn_param, mean, var, momentum)
    else:
        mean, var = running_mean, running_var
    inv_std = 1 / xp.sqrt(var + eps)
    scale = g * inv_std
    offset = bt - mean * scale
    out = xp.empty_like(x)
    scale, offset = (_per_image(v, x.shape) for v in (scale, offset))
    for rows in chunks:
        xp.multiply(x[rows], scale[rows], out=out[rows])
        out[rows] += offset[rows]
    return out, (x, mean, inv_std, g, mode, gamma.shape, beta.shape)


def _per_image(v, x_shape):
    """A per-channel coefficient v, (C,) or (groups, C) (one row per ghost group of
    consecutive images), as an array that broadcasts against x[rows] for a slice of images.

    (C,): one contiguous (C, H, W) image, repeated over the images by a view (see _channel);
    (groups, C): each image's row as (N, C, 1, 1).
    """
    xp = array_module(v)
    N = x_shape[0]
    if v.ndim == 1:
        return xp.broadcast_to(_channel(v, x_shape[1:]), x_shape)
    return xp.repeat(v, N // v.shape[0], axis=0)[:, :, None, None]


def _channel_mean_var(x, chunks, groups=1):
    """Per-channel mean and (biased) variance of x (N, C, H, W) in one pass over memory,
    as mean(x**2) - mean(x)**2 from per-image sums and sums of squares: (C,) each, or
    (groups, C) for ghost batch norm's groups of N / groups consecutive images.

    That formula loses about (mean / std)**2 units in the last place to
    cancellation: nothing that matters in float64, which takes the sums of x
    itself. Narrower types first shift each chunk by the channel means of the
    first image, into a buffer that stays in cache (one more elementwise step):
    with the shift close to the mean, nothing cancels.
    """
    xp = array_module(x)
    N, C, H, W = x.shape
    shift = None
    if x.dtype.itemsize < 8:
        shift = _channel(_per_image_channel(_row_sums, x[:1])[0] / (H * W), x.shape[1:])
        buffer = xp.empty_like(x[chunks[0]])
    sums, squares = xp.empty((N, C), dtype=x.dtype), xp.empty((N, C), dtype=x.dtype)
    for rows in chunks:
        s = x[rows] if shift is None else xp.subtract(x[rows], shift, out=buffer[: rows.stop - rows.start])
        sums[rows] = _per_image_channel(_row_sums, s)
        squares[rows] = _per_image_channel(_row_dots, s, s)
    M = N // groups * H * W
    mean = _group_sums(sums, groups) / M
    var = _group_sums(squares, groups) / M - mean * mean
    return (mean if shift is None else mean + shift[:, 0, 0]), var


def _group_sums(per_image, groups):
    """(N, C) per-image sums -> (C,) over the batch, or (groups, C) over each ghost group."""
    if groups == 1:
        return per_image.sum(axis=0)
    return per_image.reshape(groups, -1, per_image.shape[1]).sum(axis=1)


def spatial_batchnorm_backward_fast(dout, cache):
    """dout: (N, C, H, W). Returns (dx, dgamma, dbeta), the latter two shaped like gamma/beta.

    With dx_hat = gamma * dout, per channel (and ghost group; train mode):
    dx = inv_std * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)),
    which is dout * a + x * b + c per channel; dx = inv_std * dx_hat in test mode.
    Two passes over dout and x: the per-channel sums of dout and dout * x (from
    which dbeta and dgamma follow), then dx. sum(dout * x_hat) is taken as
    (sum(dout * x) - mean * sum(dout)) * inv_std, which loses about
    |mean| / std units in the last place to cancellation: nothing in float64,
    and in float32 only for inputs whose mean is large against their spread.
    """
    x, mean, inv_std, g, mode, gamma_shape, beta_shape = cache
    checks.require_dout_shape(dout, x.shape)
    xp = array_module(dout)
    N, C, H, W = dout.shape
    groups = mean.shape[0] if mean.ndim == 2 else 1
    M = N // groups * H * W
    chunks = _image_chunks(dout, 3)
    sums, dots = xp.empty((N, C), dtype=dout.dtype), xp.empty((N, C), dtype=dout.dtype)
    for rows in chunks:
        sums[rows] = _per_image_channel(_row_sums, dout[rows])
        dots[rows] = _per_image_channel(_row_dots, dout[rows], x[rows])
    dbeta = _group_sums(sums, groups)
    dgamma = (_group_sums(dots, groups) - mean * dbeta) * inv_std  # sum(dout * x_hat)
    a = g * inv_std
    dx = xp.empty_like(dout)
    if mode == "test":
        xp.multiply(dout, _channel(a, dout.shape[1:]), out=dx)
        return dx, dgamma.reshape(gamma_shape), dbeta.reshape(beta_shape)
    b = -a * inv_std * dgamma / M  # through x_hat * mean(dx_hat * x_hat), x_hat = (x - mean) * inv_std
    c = -a * dbeta / M - b * mean
    x_part = xp.empty_like(x[chunks[0]])
    a, b, c = (_per_image(v, dout.shape) for v in (a, b, c))
    for rows in chunks:
        d, t = dx[rows], x_part[: rows.stop - rows.start]
        xp.multiply(dout[rows], a[rows], out=d)
        d += xp.multiply(x[rows], b[rows], out=t)
        d += c[rows]
    if groups > 1:  # the groups' parts of dgamma and dbeta, summed
        dgamma, dbeta = dgamma.sum(axis=0), dbeta.sum(axis=0)
    return dx, dgamma.reshape(gamma_shape), dbeta.reshape(beta_shape)


def spatial_groupnorm_forward_fast(x, gamma, beta, G, gn_param):
    """Group normalisation; the arguments, output and cache of layers.spatial_groupnorm_forward.

    x: (N, C, H, W); gamma, beta: (C,) or (1, C, 1, 1); G divides C; gn_param: optional 'eps'.
    Returns (out, cache): out (N, C, H, W); cache (x_hat, inv_std (N, G, 1), gamma
    as (1, C, 1, 1), G, gamma.shape, beta.shape), which either backward accepts.
    """
    checks.require_float_array("x", x)
    checks.require_ndim("x", x, 4, "(N, C, H, W)")
    xp = array_module(x)
    N, C, H, W = x.shape
    checks.groups(G, C)
    g = checks.affine_params("gamma", gamma, C).reshape(1, C, 1, 1)
    bt = checks.affine_params("beta", beta, C).reshape(1, C, 1, 1)
    eps = checks.norm_eps("gn_param", gn_param)
    L = C // G * H * W
    x_hat, out = xp.empty_like(x), xp.empty_like(x)
    inv_std = xp.empty((N, G), dtype=x.dtype)
    for rows in _image_chunks(x, 3):
        group_rows = x[rows].reshape(-1, L)  # one row per (image, group)
        x_hat_rows = x_hat[rows].reshape(-1, L)
        xp.subtract(group_rows, (_row_sums(group_rows) / L)[:, None], out=x_hat_rows)
        inv = 1 / xp.sqrt(_row_dots(x_hat_rows, x_hat_rows) / L + eps)
        x_hat_rows *= inv[:, None]
        inv_std[rows] = inv.reshape(-1, G)
        xp.multiply(x_hat[rows], g, out=out[rows])
        out[rows] += bt
    return out, (x_hat, inv_std.reshape(N, G, 1), g, G, gamma.shape, beta.shape)


def spatial_groupnorm_backward_fast(dout, cache):
    """dout: (N, C, H, W). Returns (dx, dgamma, dbeta), the latter two shaped like gamma/beta.

    cache: from either spatial_groupnorm_forward_fast or layers.spatial_groupnorm_forward.
    With dx_hat = gamma * dout, per group:
    dx = inv_std * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)),
    evaluated in that order, as the reference does; both means come from the
    per-(image, channel) sums that dgamma and dbeta need.
    """
    x_hat, inv_std, g, G, gamma_shape, beta_shape = cache
    checks.require_dout_shape(dout, x_hat.shape)
    xp = array_module(dout)
    N, C, H, W = dout.shape
    sums = xp.empty((N, C), dtype=dout.dtype)
    dots = xp.empty((N, C), dtype=dout.dtype)
    dx = xp.empty_like(dout)
    for rows in _image_chunks(dout, 3):
        sums[rows] = _per_image_channel(_row_sums, dout[rows])
        dots[rows] = _per_image_channel(_row_dots, dout[rows], x_hat[rows])
        group_means = [(s * g.reshape(C)).reshape(-1, G, C // G).mean(axis=2, keepdims=True) / (H * W)
                       for s in (sums[rows], dots[rows])]  # mean(dx_hat), mean(dx_hat * x_hat): (n, G, 1)
        d = dx[rows]
        xp.multiply(dout[rows], g, out=d)
        groups = d.reshape(-1, G, C // G * H * W)
        groups -= group_means[0]
        groups -= x_hat[rows].reshape(groups.shape) * group_means[1]
        groups *= inv_std[rows]
    return dx, dots.sum(axis=0).reshape(gamma_shape), sums.sum(axis=0).reshape(beta_shape)


# ---------------------------------------------------------------------------
# conv -> relu -> max pool, fused
# ---------------------------------------------------------------------------


def _channels_last(xp, shape, dtype):
    """A new (N, C, H, W) array whose memory is laid out (N, H, W, C): a transposed view."""
    N, C, H, W = shape
    return xp.empty((N, H, W, C), dtype=dtype).transpose(0, 3, 1, 2)


def conv_relu_pool_forward_fast(x, w, b, conv_param, pool_param):
    """conv -> relu -> max pool without the full-size activation in memory.

    x: (N, C, H, W); w: (F, C, HH, WW); b: (F,); conv_param and pool_param as
    for the separate layers. Each chunk of images is convolved and pooled while
    its output is in cache, channels last as the product leaves it; the relu
    acts on the pooled map, since relu(max(a)) = max(relu(a)), and its gradient
    is the same as the chain's.
    Returns (out, cache): out (N, F, H'', W''), equal to the separate layers'
    to rounding; cache for conv_relu_pool_backward_fast.
    """
    xp = array_module(x)
    N, F, Ho, Wo = checks.conv_forward_inputs(x, w, b, conv_param)
    convolve = _ConvForward(w, conv_param["stride"], Ho)
    out = None
    for rows, R in _row_columns(x, w.shape, conv_param["stride"], conv_param["pad"], Ho, Wo):
        m = rows.stop - rows.start
        product = convolve(R)
        product += b
        a = product.reshape(m, Ho, Wo, F).transpose(0, 3, 1, 2)  # (m, F, Ho, Wo), channels last
        if out is None:  # a chunk's pooled buffer, reused; the pooled arrays for the whole batch
            _, _, Hp, Wp = checks.pool_output_shape(a, pool_param)
            pooled = _channels_last(xp, (m, F, Hp, Wp), x.dtype)
            out = xp.empty((N, F, Hp, Wp), dtype=x.dtype)
            winner = _channels_last(xp, (N, F, Hp, Wp), _winner_dtype(xp, pool_param))
        _pool_argmax(a, pool_param, pooled[:m], winner[rows])
        out[rows] = pooled[:m]
    xp.maximum(out, 0, out=out)
    return out, (x, w, b, conv_param, pool_param, out, winner)


def conv_relu_pool_backward_fast(dout, cache, need_dx: bool = True):
    """dout: (N, F, H'', W''). Returns (dx, dw, db); dx is None when need_dx is False.

    The conv output's gradient is rebuilt one chunk at a time from dout and the
    winners the forward recorded, channels last, and used while it is in cache.
    """
    x, w, b, conv_param, pool_param, out, winner = cache
    checks.require_dout_shape(dout, out.shape)
    xp = array_module(x)
    dpooled = dout * (out > 0)  # relu's gradient, on the pooled map
    F, _, HH, WW = w.shape
    s, pad = conv_param["stride"], conv_param["pad"]
    Ho, Wo = (x.shape[2] + 2 * pad - HH) // s + 1, (x.shape[3] + 2 * pad - WW) // s + 1
    grads = _ConvBackward(x, w, conv_param, need_dx)
    da = None
    for rows, R in _row_columns(x, w.shape, s, pad, Ho, Wo):
        m = rows.stop - rows.start
        if da is None:
            da = _channels_last(xp, (m, F, Ho, Wo), x.dtype)
            dp = _channels_last(xp, (m,) + dout.shape[1:], x.dtype)
        dp[:m] = dpooled[rows]
        _unpool(dp[:m], winner[rows], pool_param, da[:m])
        grads.add(rows, da[:m].reshape(m, F, Ho * Wo), R)
    return grads.result()
