"""The shapes of the nets' layers, from their sizes alone: what the nets build and what
cnncore.memory estimates from, before a net exists. A leaf: it imports no other cnncore module,
so the argument checks (which ask cnncore.memory whether a computation fits) never reach the nets.

The conv nets' blocks (block_maps, with the 2x2 max pool they end with) and the ResNet's conv
units and blocks (layout, stage_maps).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

POOL_2X2 = {"pool_height": 2, "pool_width": 2, "stride": 2}


def block_maps(height: int, width: int, num_blocks: int) -> list[tuple[int, int, bool]]:
    """(H, W, pools) of each conv block on height x width inputs: the map its conv and norm
    layer see, and whether its 2x2 pool runs (not when the map is under 2 in H or W)."""
    maps = []
    for _ in range(num_blocks):
        pools = height >= POOL_2X2["pool_height"] and width >= POOL_2X2["pool_width"]
        maps.append((height, width, pools))
        if pools:
            height, width = height // 2, width // 2
    return maps


NUM_STAGES = 3


@dataclass(frozen=True)
class ConvUnit:
    """Conv i of the net and the norm layer after it: in_channels -> out_channels, a kh x kw
    filter with conv_param's stride and pad, and out_size, the (H, W) of its output maps."""

    index: int
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    conv_param: dict
    out_size: tuple[int, int]


@dataclass(frozen=True)
class Block:
    """A basic block's two conv units and its projection (None: the identity shortcut)."""

    a: ConvUnit
    b: ConvUnit
    projection: ConvUnit | None


def downsampled(size: int) -> int:
    """ceil(size / 2): what the downsampling conv and the projection make of a map's side."""
    return (size + 1) // 2


def stage_maps(height: int, width: int) -> list[tuple[int, int]]:
    """(H, W) of each stage's maps on height x width inputs (the stem's are stage 1's)."""
    maps = [(height, width)]
    for _ in range(NUM_STAGES - 1):
        maps.append((downsampled(maps[-1][0]), downsampled(maps[-1][1])))
    return maps


def layout(C: int, H: int, W: int, F: int, depth: int) -> tuple[ConvUnit, list[Block]]:
    """The stem and the blocks of a ResNet on (C, H, W) images, F wide in stage 1 with depth
    blocks per stage, their units numbered in order (what cnncore.memory estimates from too)."""
    same = {"stride": 1, "pad": 1}
    index = itertools.count(1)
    maps = stage_maps(H, W)
    stem = ConvUnit(next(index), C, F, (3, 3), same, maps[0])
    blocks, width = [], F
    for stage in range(NUM_STAGES):
        out, size = F * 2**stage, maps[stage]
        for j in range(depth):
            if stage > 0 and j == 0:  # downsampling the previous stage's maps
                conv_kernel, projection_kernel = _downsampling_units(*maps[stage - 1])
                a = ConvUnit(next(index), width, out, conv_kernel, {"stride": 2, "pad": 1}, size)
                b = ConvUnit(next(index), out, out, (3, 3), same, size)
                p = ConvUnit(next(index), width, out, projection_kernel, {"stride": 2, "pad": 0}, size)
            else:
                a = ConvUnit(next(index), width, out, (3, 3), same, size)
                b = ConvUnit(next(index), out, out, (3, 3), same, size)
                p = None
            blocks.append(Block(a, b, p))
            width = out
    return stem, blocks


def _downsampling_units(size_h: int, size_w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((kh, kw) of the downsampling conv, (kh, kw) of the projection) for an H x W input:
    4 and 2 along an even side, 3 and 1 along an odd one (see the module's docstring)."""
    conv = tuple(4 if s % 2 == 0 else 3 for s in (size_h, size_w))
    projection = tuple(2 if s % 2 == 0 else 1 for s in (size_h, size_w))
    return conv, projection
