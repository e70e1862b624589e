"""A convolution's shapes and the layouts its kernels share (see ``fast_conv``).

Geometry derives, once per call, what every kernel needs from x's and w's shapes,
the stride and the padding; the direct kernel's choice of pitched rows
(pitched_wins, its threshold PITCHED_MIN_TAPS_PER_FILTER set by
``fast_conv.forced``) is part of it, as it changes the columns' layout.
"""

from __future__ import annotations


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


def batch_chunks(N, n):
    """(rows, m, first) for chunks of n images of a batch of N: the last may be smaller."""
    for start in range(0, N, n):
        m = min(n, N - start)
        yield slice(start, start + m), m, start == 0
