"""Naive vs fast convolution and max pool on the CPU: time, speedup, GEMM efficiency.

    python benchmarks/bench_layers.py [--quick]

Prints Markdown tables, measured in one run:
1. Convolution, forward + backward, for three layer shapes, in float32 and float64,
   with BLAS pinned to 1 thread and then 2 (threadpoolctl): naive and fast time,
   the speedup (target >= 100x), the fast conv's GFLOP/s next to NumPy's own matmul
   on the same GEMM shape (F, C*HH*WW) @ (C*HH*WW, N*H'*W'), and their ratio
   (target >= 50%). A conv's forward + backward is 3 such GEMMs (out, dw, dx),
   each 2*N*F*C*HH*WW*H'*W' flops.
2. Max pool 2x2 stride 2 on (50, 32, 32, 32), forward + backward, naive vs fast
   (target >= 20x).
3. Where the fast conv's time goes (1 BLAS thread): forward and backward each
   under cProfile, with the own time of the functions of cnncore.fast_conv and
   fast_layers that do the work (im2col, the products, col2im, Winograd's
   transforms), named as they are there, so the table follows whatever kernel
   runs. Which kernel is fastest for which shape: bench_conv_algorithms.py.

The comparisons with PyTorch (layers and training step, against issue 7's
targets) are in bench_train.py, the one place for them.

Every time is the median of several repetitions after one warm-up call; what
is compared (fast conv and matmul, the profile's steps) takes turns within each
repetition, so a ratio compares runs made under the same machine load. The
naive convolution loops over images, so its time is linear in the batch: it is
timed on a few images and scaled to the full batch, and as it calls no BLAS it
is timed once (1 thread) and shown beside both thread counts.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import re
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnncore import fast_conv, fast_layers, layers  # noqa: E402

TARGET_CONV_SPEEDUP = 100.0
TARGET_GEMM_FRACTION = 0.5
TARGET_POOL_SPEEDUP = 20.0
THREADS = (1, 2)
DTYPES = (np.float32, np.float64)


@dataclass(frozen=True)
class ConvCase:
    x_shape: tuple[int, int, int, int]
    w_shape: tuple[int, int, int, int]
    stride: int
    pad: int

    @property
    def conv_param(self) -> dict:
        return {"stride": self.stride, "pad": self.pad}

    @property
    def out_hw(self) -> tuple[int, int]:
        (_, _, H, W), (_, _, HH, WW) = self.x_shape, self.w_shape
        return (H + 2 * self.pad - HH) // self.stride + 1, (W + 2 * self.pad - WW) // self.stride + 1

    def gemm_shape(self) -> tuple[int, int, int]:
        """(F, K, P): the forward GEMM is (F, K) @ (K, P), K = C*HH*WW, P = N*H'*W'."""
        N, (F, C, HH, WW), (Ho, Wo) = self.x_shape[0], self.w_shape, self.out_hw
        return F, C * HH * WW, N * Ho * Wo

    def gemm_flops(self) -> int:
        F, K, P = self.gemm_shape()
        return 2 * F * K * P

    def label(self) -> str:
        shape = lambda s: "x".join(map(str, s))  # noqa: E731
        return f"x {shape(self.x_shape)}, w {shape(self.w_shape)}, pad {self.pad}, stride {self.stride}"


CONV_CASES = (
    ConvCase((50, 3, 32, 32), (32, 3, 7, 7), stride=1, pad=3),
    ConvCase((100, 3, 31, 31), (25, 3, 3, 3), stride=2, pad=1),
    ConvCase((64, 64, 16, 16), (64, 64, 3, 3), stride=1, pad=1),
)
POOL_X_SHAPE = (50, 32, 32, 32)
POOL_PARAM = {"pool_height": 2, "pool_width": 2, "stride": 2}


@dataclass(frozen=True)
class Plan:
    reps: int  # repetitions of each fast timing (median)
    naive_reps: int  # repetitions of each naive timing
    naive_conv_images: int  # images the naive conv is timed on, scaled to the batch
    naive_pool_images: int  # likewise for the naive pool (its forward is vectorised over the batch)


FULL = Plan(reps=7, naive_reps=2, naive_conv_images=2, naive_pool_images=50)
QUICK = Plan(reps=3, naive_reps=1, naive_conv_images=1, naive_pool_images=10)


def median_seconds(fns: dict, reps: int, clock=time.perf_counter) -> dict:
    """Median time of each fn() over reps calls, after one warm-up call each.

    The functions take turns within each repetition, so a ratio of two of them
    compares runs made under the same load on the machine. clock: wall time by
    default; time.process_time measures the CPU time the process used instead,
    which a single-threaded run on a busy machine does not inflate by waiting.
    """
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def forward_backward(forward, backward, x, *args):
    """One forward and one backward pass with an all-ones upstream gradient."""

    def run():
        out, cache = forward(x, *args)
        backward(np.ones_like(out), cache)

    return run


def conv_inputs(case: ConvCase, dtype, images: int | None = None):
    rng = np.random.default_rng(0)
    x_shape = case.x_shape if images is None else (images, *case.x_shape[1:])
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(case.w_shape).astype(dtype)
    return x, w, rng.standard_normal(case.w_shape[0]).astype(dtype)


def time_naive_conv(case: ConvCase, dtype, plan: Plan) -> float:
    """Seconds for the naive forward + backward on the full batch, scaled from a few images."""
    x, w, b = conv_inputs(case, dtype, images=plan.naive_conv_images)
    run = forward_backward(layers.conv_forward_naive, layers.conv_backward_naive, x, w, b, case.conv_param)
    return median_seconds({"naive": run}, plan.naive_reps)["naive"] * case.x_shape[0] / plan.naive_conv_images


def fast_conv_run(case: ConvCase, dtype):
    x, w, b = conv_inputs(case, dtype)
    return forward_backward(fast_layers.conv_forward_fast, fast_layers.conv_backward_fast, x, w, b, case.conv_param)


def matmul_run(case: ConvCase, dtype):
    """NumPy's matmul on the conv's forward GEMM shape."""
    F, K, P = case.gemm_shape()
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((F, K)).astype(dtype), rng.standard_normal((K, P)).astype(dtype)
    return lambda: a @ b


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def conv_table(plan: Plan) -> list[str]:
    naive = {}
    with threadpool_limits(limits=1, user_api="blas"):  # the naive loops call no BLAS: one timing serves both
        for dtype in DTYPES:
            for case in CONV_CASES:
                naive[case, dtype] = time_naive_conv(case, dtype, plan)
    rows = [
        "| BLAS threads | dtype | conv | naive ms | fast ms | speedup (>= 100x) | fast GFLOP/s | matmul GFLOP/s "
        "| fast / matmul (>= 50%) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for threads in THREADS:
        with threadpool_limits(limits=threads, user_api="blas"):
            for dtype in DTYPES:
                for case in CONV_CASES:
                    runs = {"fast": fast_conv_run(case, dtype), "matmul": matmul_run(case, dtype)}
                    fast, matmul = median_seconds(runs, plan.reps).values()
                    speedup = naive[case, dtype] / fast
                    fast_rate, matmul_rate = 3 * case.gemm_flops() / fast / 1e9, case.gemm_flops() / matmul / 1e9
                    fraction = fast_rate / matmul_rate
                    rows.append(
                        f"| {threads} | {np.dtype(dtype).name} | {case.label()} | {naive[case, dtype] * 1e3:,.0f} "
                        f"| {fast * 1e3:.1f} | {speedup:,.0f}x {verdict(speedup >= TARGET_CONV_SPEEDUP)} "
                        f"| {fast_rate:.1f} | {matmul_rate:.1f} "
                        f"| {fraction:.0%} {verdict(fraction >= TARGET_GEMM_FRACTION)} |"
                    )
    return rows


def pool_table(plan: Plan) -> list[str]:
    rows = [
        "| dtype | pool | naive ms | fast ms | speedup (>= 20x) |",
        "|---|---|---:|---:|---:|",
    ]
    rng = np.random.default_rng(2)
    N = POOL_X_SHAPE[0]
    with threadpool_limits(limits=1, user_api="blas"):
        for dtype in DTYPES:
            x = rng.standard_normal(POOL_X_SHAPE).astype(dtype)
            x_naive = x[: plan.naive_pool_images]
            naive_run = forward_backward(layers.max_pool_forward_naive, layers.max_pool_backward_naive, x_naive, POOL_PARAM)
            naive = median_seconds({"naive": naive_run}, plan.naive_reps)["naive"] * N / len(x_naive)
            fast_run = forward_backward(fast_layers.max_pool_forward_fast, fast_layers.max_pool_backward_fast, x, POOL_PARAM)
            fast = median_seconds({"fast": fast_run}, plan.reps)["fast"]
            speedup = naive / fast
            rows.append(
                f"| {np.dtype(dtype).name} | 2x2 stride 2 on {'x'.join(map(str, POOL_X_SHAPE))} | {naive * 1e3:,.0f} "
                f"| {fast * 1e3:.1f} | {speedup:,.0f}x {verdict(speedup >= TARGET_POOL_SPEEDUP)} |"
            )
    return rows


def _qualnames(module) -> dict:
    """{(file, first line): qualified name} of the module's functions and methods, to name profile rows."""
    names = {}
    for obj in vars(module).values():
        for fn in [obj, *vars(obj).values()] if isinstance(obj, type) else [obj]:
            code = getattr(fn, "__code__", None)
            if code is not None:
                names[code.co_filename, code.co_firstlineno] = fn.__qualname__
    return names


def _builtin_label(file: str, func: str) -> str:
    """"<method 'reshape' of 'numpy.ndarray' objects>" -> "ndarray.reshape"; "module.func" otherwise."""
    method = re.fullmatch(r"<method '(\w+)' of '(?:\w+\.)*(\w+)' objects>", func)
    if method:
        return f"{method[2]}.{method[1]}"
    return func if file == "~" else f"{Path(file).stem}.{func}"


def own_time_by_function(fn, reps: int) -> tuple[float, list[tuple[float, str]]]:
    """(seconds per call, [(own seconds per call, function)] largest first) of fn under cProfile.

    Own time (tottime) of a Python function includes the NumPy work it starts
    (a matmul or a copy called from it), so the functions of cnncore.fast_conv
    and fast_layers name the steps of the algorithm, whatever that algorithm is.
    """
    names = {**_qualnames(fast_layers), **_qualnames(fast_conv)}
    fn()
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    for _ in range(reps):
        fn()
    profile.disable()
    elapsed = (time.perf_counter() - start) / reps
    rows = []
    for (file, line, func), (_, _, tottime, _, _) in pstats.Stats(profile).stats.items():
        label = names.get((file, line)) or _builtin_label(file, func)
        rows.append((tottime / reps, label))
    return elapsed, sorted(rows, reverse=True)


def profile_table(plan: Plan, top: int = 4) -> list[str]:
    """Per conv, dtype and pass: the functions that take the fast conv's time (1 BLAS thread)."""
    rows = ["| dtype | conv | pass | ms | own time by function, largest first |", "|---|---|---|---:|---|"]
    with threadpool_limits(limits=1, user_api="blas"):
        for dtype in DTYPES:
            for case in CONV_CASES:
                x, w, b = conv_inputs(case, dtype)
                out, cache = fast_layers.conv_forward_fast(x, w, b, case.conv_param)
                dout = np.ones_like(out)
                passes = {
                    "forward": lambda: fast_layers.conv_forward_fast(x, w, b, case.conv_param),
                    "backward": lambda: fast_layers.conv_backward_fast(dout, cache),
                }
                for name, run in passes.items():
                    elapsed, functions = own_time_by_function(run, plan.reps)
                    listed = [f"`{label}` {t * 1e3:.1f} ({t / elapsed:.0%})" for t, label in functions[:top]]
                    rest = elapsed - sum(t for t, _ in functions[:top])
                    listed.append(f"rest {rest * 1e3:.1f} ({rest / elapsed:.0%})")
                    rows.append(
                        f"| {np.dtype(dtype).name} | {case.label()} | {name} | {elapsed * 1e3:.1f} | {'; '.join(listed)} |"
                    )
    return rows


def environment() -> str:
    blas = [f"{i.get('internal_api')} {i.get('version')} ({i.get('threading_layer', '?')})"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return (
        f"numpy {np.__version__}, BLAS {', '.join(blas) or 'unknown'}, Python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and a smaller naive batch (about 15 s)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    start = time.perf_counter()
    print(f"# cnncore layer benchmark{' (--quick)' if args.quick else ''}\n")
    print(environment() + "\n")
    print(
        f"Medians of {plan.reps} runs (fast, matmul) and {plan.naive_reps} (naive) after a warm-up. The naive conv "
        f"is timed on {plan.naive_conv_images} image(s) and scaled per image to the batch; it calls no BLAS, so it "
        f"is timed once (1 thread). GFLOP/s count 3 GEMMs of 2*N*F*C*HH*WW*H'*W' flops for fast fwd+bwd.\n"
    )
    pool_note = (
        "on the whole batch" if plan.naive_pool_images == POOL_X_SHAPE[0]
        else f"on {plan.naive_pool_images} images and scaled per image to the batch"
    )
    sections = {
        "Convolution, forward + backward": conv_table,
        f"Max pool, forward + backward (no BLAS; naive timed {pool_note})": pool_table,
        "Where the fast conv's time goes (1 BLAS thread)": profile_table,
    }
    for title, table in sections.items():
        print(f"## {title}\n\n" + "\n".join(table(plan)) + "\n")
    print(f"Total {time.perf_counter() - start:.0f} s; load average at the end {os.getloadavg()[0]:.1f}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
