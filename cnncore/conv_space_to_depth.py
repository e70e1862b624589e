"""A strided convolution regrouped as a stride-1 one (space-to-depth), for ``fast_conv``.

SpaceToDepth maps the input, the filters and their gradients between the two
convolutions; ``fast_conv`` runs the stride-1 one through its own kernels and
decides when that pays (space_to_depth_wins).
"""

from __future__ import annotations

from .backend import array_module
from .conv_geometry import Geometry


class SpaceToDepth:
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
