"""Winograd F(2x2, 3x3): stride-1 3x3 convolutions with 2.25x fewer multiplications.

The forward pass (winograd_output_chunks, chunk by chunk of images as the direct
kernel's) and the filter gradient (winograd_filter_gradient); dx is a convolution
of dout that ``fast_conv`` runs by whichever kernel suits it. When each runs is
``fast_conv.algorithm``'s choice.
"""

from __future__ import annotations

from . import backend
from .backend import array_module
from .conv_geometry import Geometry, batch_chunks

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
    for rows, m, _ in batch_chunks(g.N, n):
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
    for rows, m, _ in batch_chunks(g.N, n):
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
