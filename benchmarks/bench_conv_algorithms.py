"""The crossovers of cnncore.fast_conv's choice of kernel, measured: every kernel on every pass.

    python benchmarks/bench_conv_algorithms.py [--quick] [--dtypes float32,float64]

For each convolution of the nets this project trains (the 3-block MNIST convnet at
batch 2, 8 and 32, the residual net's units, the benchmarks' own shapes) and each
pass (the forward; dw; dx, itself a convolution at stride 1), every kernel that
applies is forced in turn and timed: direct im2col + GEMM on the exact output grid,
direct on pitched rows (stride 1), Winograd F(2x2, 3x3) (3x3, stride 1), space to
depth (strided convolutions as stride-1 ones). Prints a
Markdown table with each kernel's time, the fastest, the one fast_conv chooses by
shape, and how much slower the chosen is than the fastest (1.00: the rule picked
the fastest); then the whole backward by each way of computing dx: at stride 1 a
convolution of dout against col2im, at larger strides col2im on the exact grid
against space to depth. The thresholds (conv_geometry's PITCHED_MIN_TAPS_PER_FILTER, fast_conv's
WINOGRAD_MIN_CHANNELS[_DW], WINOGRAD_MIN_TILE_USE, WINOGRAD_MIN_OUTPUTS,
DX_CONVOLUTION_MAX_FILTERS_PER_CHANNEL) come from these figures; rerun this after
changing a kernel.

Times are process CPU time with BLAS pinned to 1 thread, the best of several runs,
the kernels of one pass taking turns within each run, so their ratio compares runs
under the same load; the load average is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_layers import environment  # noqa: E402
from study_nets import best_interleaved  # noqa: E402

from cnncore import backend, fast_conv  # noqa: E402

KERNELS = ("direct, exact grid", "direct, pitched rows", "winograd", "space to depth")
# (label, x shape, w shape, stride, pad)
CASES = [
    *((f"convnet conv1, batch {n}", (n, 1, 28, 28), (32, 1, 3, 3), 1, 1) for n in (2, 8, 32)),
    *((f"convnet conv2, batch {n}", (n, 32, 14, 14), (32, 32, 3, 3), 1, 1) for n in (2, 4, 8, 32)),
    *((f"convnet conv3, batch {n}", (n, 32, 7, 7), (32, 32, 3, 3), 1, 1) for n in (2, 8, 32)),
    ("ResNet stage 1, batch 32", (32, 8, 28, 28), (8, 8, 3, 3), 1, 1),
    ("ResNet downsampling 4x4/2, batch 32", (32, 8, 28, 28), (16, 8, 4, 4), 2, 1),
    ("ResNet projection 2x2/2, batch 32", (32, 8, 28, 28), (16, 8, 2, 2), 2, 0),
    ("3x3/2 on 3 channels, batch 100", (100, 3, 31, 31), (25, 3, 3, 3), 2, 1),
    ("ResNet stage 2, batch 32", (32, 16, 14, 14), (16, 16, 3, 3), 1, 1),
    ("ResNet stage 3, batch 32", (32, 32, 7, 7), (32, 32, 3, 3), 1, 1),
    ("64 channels on 8x8, batch 2", (2, 64, 8, 8), (64, 64, 3, 3), 1, 1),
    ("64 channels on 8x8, batch 8", (8, 64, 8, 8), (64, 64, 3, 3), 1, 1),
    ("bench_layers 64 channels, batch 64", (64, 64, 16, 16), (64, 64, 3, 3), 1, 1),
    ("three-layer net 7x7 on 3 channels, batch 50", (50, 3, 32, 32), (32, 3, 7, 7), 1, 3),
]
PASSES = ("forward", "dw", "dx")


def applies(kernel: str, g: fast_conv.Geometry) -> bool:
    """Whether forcing kernel changes anything for g (else it is the direct exact grid again)."""
    if kernel == "winograd":
        return fast_conv.winograd_applies(g)
    if kernel == "space to depth":
        return g.stride > 1
    return kernel == "direct, exact grid" or g.stride == 1


def pass_runs(case, dtype):
    """{pass: (geometry whose choice counts, callable of the pass)} for a case."""
    _, x_shape, w_shape, stride, pad = case
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape).astype(dtype), rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    g = fast_conv.Geometry(x_shape, w_shape, stride, pad)
    out = np.empty((g.N, g.F, g.Ho, g.Wo), dtype=dtype)
    dout = rng.standard_normal(out.shape).astype(dtype)
    runs = {"forward": (g, lambda: fast_conv.convolve(x, w, b, stride, pad, out)),
            "dw": (g, lambda: fast_conv.gradients(x, w, stride, pad, need_dx=False, dout=dout))}
    if stride == 1 and pad <= min(w_shape[2:]) - 1:
        flipped = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
        dx_pad_h, dx_pad_w = w_shape[2] - 1 - pad, w_shape[3] - 1 - pad
        dx = np.empty(x_shape, dtype=dtype)
        runs["dx"] = (fast_conv.Geometry(dout.shape, flipped.shape, 1, dx_pad_h, dx_pad_w),
                      lambda: fast_conv.convolve(dout, flipped, None, 1, dx_pad_h, dx, pad_w=dx_pad_w))
    return runs


def chosen_kernel(g: fast_conv.Geometry, pass_: str) -> str:
    if fast_conv.space_to_depth_wins(g, "gradients" if pass_ == "dw" else "forward"):
        return "space to depth"
    if fast_conv.algorithm(g, "filter gradient" if pass_ == "dw" else "forward") == "winograd":
        return "winograd"
    return "direct, pitched rows" if g.pitched else "direct, exact grid"


def table(dtype: str, reps: int, seconds: float) -> list[str]:
    names = KERNELS
    rows = [f"| conv ({dtype}) | pass | " + " | ".join(f"{k} ms" for k in names)
            + " | fastest | chosen | chosen / fastest |",
            "|---|---|" + "---:|" * len(names) + "---|---|---:|"]
    for case in CASES:
        for pass_, (g, run) in pass_runs(case, dtype).items():
            kernels = [k for k in names if applies(k, g)]

            def under(kernel, run=run):
                def timed():
                    with fast_conv.forced(kernel):
                        run()
                return timed

            times = best_interleaved({k: under(k) for k in kernels}, reps, seconds)
            fastest = min(times, key=times.get)
            chosen = chosen_kernel(g, pass_)
            cells = " | ".join(f"{times[k] * 1e3:.2f}" if k in times else "—" for k in names)
            rows.append(f"| {case[0]} | {pass_} | {cells} | {fastest} | {chosen} "
                        f"| {times[chosen] / times[fastest]:.2f} |")
    return rows


def dx_table(dtype: str, reps: int, seconds: float) -> list[str]:
    """The whole backward (dw and dx) by each way of computing dx: at stride 1 a convolution of
    dout against col2im; at larger strides col2im on the exact grid against space to depth."""
    rows = [f"| conv ({dtype}) | backward, dx one way ms | backward, dx the other way ms | faster | chosen "
            "| chosen / faster |", "|---|---|---|---|---|---:|"]
    for label, x_shape, w_shape, stride, pad in CASES:
        rng = np.random.default_rng(0)
        x, w = rng.standard_normal(x_shape).astype(dtype), rng.standard_normal(w_shape).astype(dtype)
        g = fast_conv.Geometry(x_shape, w_shape, stride, pad)
        dout = rng.standard_normal((g.N, g.F, g.Ho, g.Wo)).astype(dtype)
        if stride == 1:
            ways = {"convolution": ("dx by convolution",), "col2im": ("dx by col2im",)}
            chosen = "convolution" if fast_conv.dx_by_convolution(g) else "col2im"
        else:
            ways = {"col2im on the grid": ("no space to depth",), "space to depth": ("space to depth",)}
            chosen = "space to depth" if fast_conv.space_to_depth_wins(g, "gradients") else "col2im on the grid"

        def backward(kernels):
            def run():
                with fast_conv.forced(*kernels):
                    fast_conv.gradients(x, w, stride, pad, dout=dout)
            return run

        times = best_interleaved({name: backward(kernels) for name, kernels in ways.items()}, reps, seconds)
        faster = min(times, key=times.get)
        first, second = times
        rows.append(f"| {label} | {first} {times[first] * 1e3:.2f} | {second} {times[second] * 1e3:.2f} | {faster} "
                    f"| {chosen} | {times[chosen] / times[faster]:.2f} |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter runs (about a minute)")
    parser.add_argument("--dtypes", default="float32", help="comma-separated: float32, float64 (default float32)")
    args = parser.parse_args(argv)
    reps, seconds = (3, 0.02) if args.quick else (7, 0.05)
    backend.retain_freed_memory()
    start = time.perf_counter()
    print(f"# fast_conv's kernels on each pass{' (--quick)' if args.quick else ''}\n")
    print(environment() + "\n")
    print(f"Process CPU time at 1 BLAS thread, the best of {reps} runs, the kernels of a pass taking turns.\n")
    with threadpool_limits(limits=1, user_api="blas"):
        for dtype in args.dtypes.split(","):
            print("\n".join(table(dtype, reps, seconds)) + "\n")
            print("\n".join(dx_table(dtype, reps, seconds)) + "\n")
    print(f"Total {time.perf_counter() - start:.0f} s; load average at the end {os.getloadavg()[0]:.1f}.")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
