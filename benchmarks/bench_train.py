"""cnncore (pure NumPy) against PyTorch on the CPU: the study nets, the three-layer net's
step against torch and against its FLOP limit, ghost batch norm, layers, peak memory; sweep speed-up.

    python benchmarks/bench_train.py [--quick] [--sections study,ghost,flops,step,layers,memory,sweep]

Prints Markdown tables, measured in one run, each with the targets of issues 7
and 20 (ratios are ours / torch time; lower is better):

0. study: one training step of each net the BN-vs-GN studies train, as their presets
   build it (benchmarks/study_nets.py: the 3-block MNIST convnet with BN and with
   GN, the FullyConnectedNet with BN, the residual net with BN and GN), through the
   Solver (minibatch sampling, loss, backward, SGD-with-momentum update), at batch
   2, 8 and 32, in float32 and float64, against torch with the same architecture,
   interleaved, process CPU time at 1 thread, best of several runs. Target (issue 20):
   float32 <= 0.7 at every batch size; float64 rows show it did not regress.
   ghost: ghost batch norm at g = 2 inside batch 32 against plain batch norm at 32
   (the convnet and the ResNet), ours alone. Target: <= 1.2.
   preset: the mnist-convnet preset's training time extrapolated from each cell's step
   time (normalization x batch size) and the steps of a trial, on 2 cores. Target:
   the whole preset in <= 12 minutes (training alone is printed).
   flops: the three-layer net's step at batch 128 (see 1) against its FLOP limit,
   its arithmetic (3.10 GFLOP: the conv's forward and dw, each affine layer's
   forward, dw and dx) at NumPy's square-GEMM rate measured in the same run, and
   at the rate of the step's own GEMM shapes, each timed alone. Target: <= 1.5
   (float32, against the square-GEMM rate).

1. step: one training step (forward, softmax loss, backward, SGD update) of
   the three-layer net, conv 32 filters 7x7 pad 3 - relu - 2x2 max pool -
   affine 100 - relu - affine 10, on a batch of 128 random 3x32x32 images.
   Ours: ThreeLayerConvNet.loss + cnncore.optim.sgd on every parameter. Torch:
   the same net as torch.nn.Sequential, F.cross_entropy, loss.backward(),
   torch.optim.SGD.step(). Neither computes the input images' gradient (the
   torch input does not require grad). Targets: float32 <= 1.3 at 1 thread,
   <= 1.6 at 2; float64 <= 0.6 at 1 thread.
2. layers: forward + backward of the conv on x (50,3,32,32), w (32,3,7,7),
   pad 3 and on x (64,64,16,16), w (64,64,3,3), pad 1 (with dx: the torch
   input requires grad); 2x2 max pool, spatial batch norm (train mode) and
   spatial group norm (G=4) on (50,32,32,32). Targets, 1 thread: conv float32
   <= 1.3, float64 <= 0.7; pool <= 0.6; batch norm <= 1.0; group norm <= 2.0.
   This is the one place where the layers are compared with torch;
   bench_layers.py compares the fast layers with the naive ones and with matmul.
3. memory: peak memory of one training step at batch 128, each side in a fresh
   subprocess, by the same method: the growth of the resident set's high-water
   mark (VmHWM, reset through /proc/self/clear_refs after the imports, the
   model and the data exist; ru_maxrss where that reset is unavailable) over
   the first two steps. Target: ours <= torch's.
4. sweep: 8 digits trials of the bn-vs-gn study's kind (ThreeLayerConvNet with
   32 filters and batch norm, SGD with momentum, batch 8, float32, 3 epochs; seeds
   0-7; 4 trials with --quick), one after another with BLAS at 2
   threads, against 2 at a time with BLAS at 1 thread each: in 2 threads of one
   process, and in 2 worker processes (forked, started before the clock).
   Target: a speed-up >= 1.7. The trials one after another at 1 BLAS thread
   are shown too: the speed-up against them is what the second core adds.

Steps 1 and 2 run with BLAS pinned to 1 thread and then 2 (threadpoolctl), and
torch.set_num_threads to the same count. Every time is the median of several
repetitions after a warm-up; ours and torch take turns within each repetition,
so a ratio compares runs made under the same load on the machine. At 1 thread
the time is the process's CPU time (see clock_for): on a 2-core machine that
other jobs share, wall times swing by 1.5-3x with their load, CPU times far
less. At 2 threads it is wall time, and those rows swing. torch is the optional `bench` extra: without it only our
own figures are printed. For a fair BLAS, leave OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE unset in the benchmark's command (the header names the
kernel OpenBLAS runs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import study_nets  # noqa: E402
from bench_layers import environment, median_seconds, verdict  # noqa: E402

from cnncore import backend, fast_layers, optim  # noqa: E402
from cnncore.cnn import ThreeLayerConvNet  # noqa: E402

torch = TF = None  # loaded by main(), except in the sweep's child process


def load_torch() -> None:
    """Import torch if the optional `bench` extra is installed."""
    global torch, TF
    try:
        import torch as torch_module
        import torch.nn.functional as functional
    except ImportError:
        return
    torch, TF = torch_module, functional

THREADS = (1, 2)
DTYPES = ("float32", "float64")
BATCH = 128
LEARNING_RATE = 1e-3
SECTIONS = ("study", "ghost", "preset", "flops", "step", "layers", "memory", "sweep")


@dataclass(frozen=True)
class Plan:
    step_reps: int
    layer_reps: int
    sweep_trials: int
    study_reps: int


FULL = Plan(step_reps=15, layer_reps=15, sweep_trials=8, study_reps=7)
QUICK = Plan(step_reps=5, layer_reps=3, sweep_trials=4, study_reps=3)


def torch_dtype(dtype: str):
    return {"float32": torch.float32, "float64": torch.float64}[dtype]


# ---------------------------------------------------------------------------
# 1. Training step
# ---------------------------------------------------------------------------


def step_data(dtype: str, batch: int = BATCH):
    rng = np.random.default_rng(0)
    return rng.standard_normal((batch, 3, 32, 32)).astype(dtype), rng.integers(0, 10, batch)


def our_step(dtype: str, batch: int = BATCH):
    """One training step of ThreeLayerConvNet with SGD, as a callable."""
    X, y = step_data(dtype, batch)
    model = ThreeLayerConvNet(input_dim=(3, 32, 32), num_filters=32, filter_size=7, hidden_dim=100,
                              num_classes=10, weight_scale=1e-2, dtype=dtype, seed=0)
    configs = {name: {"learning_rate": LEARNING_RATE} for name in model.params}

    def step():
        _, grads = model.loss(X, y)
        for name, w in model.params.items():
            model.params[name], configs[name] = optim.sgd(w, grads[name], configs[name])

    return step


def torch_step(dtype: str, batch: int = BATCH):
    """The same step in PyTorch, as a callable."""
    X, y = step_data(dtype, batch)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 7, padding=3), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(32 * 16 * 16, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10),
    ).to(torch_dtype(dtype))
    opt = torch.optim.SGD(net.parameters(), lr=LEARNING_RATE)
    X, y = torch.from_numpy(X), torch.from_numpy(y)

    def step():
        opt.zero_grad()
        TF.cross_entropy(net(X), y).backward()
        opt.step()

    return step


def set_threads(threads: int):
    """BLAS (threadpoolctl) and torch limited to `threads`; use as a context manager."""
    if torch is not None:
        torch.set_num_threads(threads)
    return threadpool_limits(limits=threads, user_api="blas")


def ratio_cells(ours: float, theirs: float | None, target: float | None) -> str:
    """'| ratio | verdict (<= target) |' cells; '—' where torch is missing, 'info' where there is no target."""
    if theirs is None:
        return "| — | — |"
    ratio = ours / theirs
    return f"| {ratio:.2f} | {'info' if target is None else f'{verdict(ratio <= target)} (<= {target})'} |"


def clock_for(threads: int):
    """Process CPU time for single-threaded runs, wall time for multi-threaded ones.

    At 1 thread both sides do all their work on one core, so CPU time is the
    wall time they would take on an idle core, without the waits that other
    jobs on a shared machine add; with 2 threads CPU time would add the threads
    up, so wall time it is.
    """
    return time.process_time if threads == 1 else time.perf_counter


def comparisons(reps: int, cases):
    """Yield (threads, dtype, label, median seconds by side, target) for every case, both thread counts.

    cases(dtype, threads) -> {label: (target or None, ours callable, torch callable or None)}.
    """
    for threads in THREADS:
        with set_threads(threads):
            for dtype in DTYPES:
                for label, (target, ours, theirs) in cases(dtype, threads).items():
                    runs = {"ours": ours} if theirs is None else {"ours": ours, "torch": theirs}
                    yield threads, dtype, label, median_seconds(runs, reps, clock_for(threads)), target


def step_target(dtype: str, threads: int) -> float | None:
    return {("float32", 1): 1.3, ("float32", 2): 1.6, ("float64", 1): 0.6}.get((dtype, threads))


def step_table(plan: Plan) -> list[str]:
    rows = ["| BLAS threads | dtype | ours ms | torch ms | ours img/s | torch img/s | ours / torch | target |",
            "|---|---|---:|---:|---:|---:|---:|---|"]

    def cases(dtype, threads):
        return {"step": (step_target(dtype, threads), our_step(dtype), torch_step(dtype) if torch else None)}

    for threads, dtype, _, times, target in comparisons(plan.step_reps, cases):
        ours, theirs = times["ours"], times.get("torch")
        rows.append(f"| {threads} | {dtype} | {_ms(ours)} | {_ms(theirs)} | {BATCH / ours:,.0f} "
                    f"| {'—' if theirs is None else f'{BATCH / theirs:,.0f}'} {ratio_cells(ours, theirs, target)}")
    return rows


def step_gemms(batch: int = BATCH) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The three-layer net's step as GEMMs, (M, K) @ (K, N) each: the conv's forward and dw as
    im2col products (32 filters x 147 taps x 32*32 positions per image), and each affine layer's
    forward, dw and dx (the conv's dx is not needed)."""
    P = batch * 32 * 32
    gemms = [((32, 147), (147, P)), ((32, P), (P, 147))]
    for D, M in ((32 * 16 * 16, 100), (100, 10)):
        gemms += [((batch, D), (D, M)), ((D, batch), (batch, M)), ((batch, M), (M, D))]
    return gemms


def step_flops(batch: int = BATCH) -> int:
    """Multiply-adds x 2 of the three-layer net's training step (see step_gemms)."""
    return sum(2 * m * k * n for (m, k), (_, n) in step_gemms(batch))


def gemm_seconds(dtype: str, shapes) -> float:
    """Process CPU seconds of NumPy's matmul on each (M, K) @ (K, N), summed: the best of 5 each."""
    rng = np.random.default_rng(2)
    total = 0.0
    for a_shape, b_shape in shapes:
        a, b = rng.standard_normal(a_shape).astype(dtype), rng.standard_normal(b_shape).astype(dtype)
        a @ b
        best = float("inf")
        for _ in range(5):
            start = time.process_time()
            a @ b
            best = min(best, time.process_time() - start)
        total += best
    return total


def gemm_rate(dtype: str, n: int = 1024) -> float:
    """FLOP/s of NumPy's own square matmul (n x n) at the current BLAS threads: the machine's GEMM rate."""
    return 2 * n**3 / gemm_seconds(dtype, [((n, n), (n, n))])


def flop_table(plan: Plan) -> list[str]:
    """The three-layer net's step at batch 128 against the time its arithmetic takes at the GEMM rate
    (NumPy's square matmul; the target's measure) and at the rate of its own GEMMs' shapes."""
    rows = ["| dtype | step GFLOP | square GEMM GFLOP/s | FLOP limit ms | its GEMMs alone ms | ours ms "
            "| ours / FLOP limit | ours / its GEMMs | target |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    flops = step_flops()
    with set_threads(1):
        for dtype in DTYPES:
            rate = gemm_rate(dtype)
            ours = median_seconds({"ours": our_step(dtype)}, plan.step_reps, time.process_time)["ours"]
            rate = max(rate, gemm_rate(dtype))  # measured before and after: the better of the two
            own = gemm_seconds(dtype, step_gemms())
            limit = flops / rate
            result = f"{verdict(ours / limit <= 1.5)} (<= 1.5)" if dtype == "float32" else "info"
            rows.append(f"| {dtype} | {flops / 1e9:.2f} | {rate / 1e9:.1f} | {limit * 1e3:.1f} | {own * 1e3:.1f} "
                        f"| {ours * 1e3:.1f} | {ours / limit:.2f} | {ours / own:.2f} | {result} |")
    return rows


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.1f}"


# ---------------------------------------------------------------------------
# 2. Layers
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCase:
    name: str
    targets: dict  # dtype -> target ratio at 1 thread


CONV_SHAPES = (((50, 3, 32, 32), (32, 3, 7, 7), 3), ((64, 64, 16, 16), (64, 64, 3, 3), 1))
ACTIVATION = (50, 32, 32, 32)
POOL_2X2 = {"pool_height": 2, "pool_width": 2, "stride": 2}
GROUPS = 4


def _arrays(dtype: str, *shapes, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def layer_runs(dtype: str):
    """{label: (target per dtype, ours callable, torch callable or None)} for every layer compared."""
    cases = {}
    for x_shape, w_shape, pad in CONV_SHAPES:
        N, _, H, W = x_shape
        x, w, b, dout = _arrays(dtype, x_shape, w_shape, w_shape[:1], (N, w_shape[0], H, W))
        conv_param = {"stride": 1, "pad": pad}

        def ours(x=x, w=w, b=b, dout=dout, conv_param=conv_param):
            _, cache = fast_layers.conv_forward_fast(x, w, b, conv_param)
            fast_layers.conv_backward_fast(dout, cache)

        label = f"conv x {'x'.join(map(str, x_shape))}, w {'x'.join(map(str, w_shape))}, pad {pad}"
        cases[label] = ({"float32": 1.3, "float64": 0.7}, ours, _torch_conv(x, w, b, dout, pad))

    x, dpooled, gamma, beta = _arrays(dtype, ACTIVATION, (50, 32, 16, 16), (32,), (32,))
    dout = _arrays(dtype, ACTIVATION, seed=1)[0]

    def pool():
        _, cache = fast_layers.max_pool_forward_fast(x, POOL_2X2)
        fast_layers.max_pool_backward_fast(dpooled, cache)

    def batchnorm():
        _, cache = fast_layers.spatial_batchnorm_forward_fast(x, gamma, beta, {"mode": "train"})
        fast_layers.spatial_batchnorm_backward_fast(dout, cache)

    def groupnorm():
        _, cache = fast_layers.spatial_groupnorm_forward_fast(x, gamma, beta, GROUPS, {})
        fast_layers.spatial_groupnorm_backward_fast(dout, cache)

    shape = "x".join(map(str, ACTIVATION))
    cases[f"max pool 2x2 on {shape}"] = ({"float32": 0.6, "float64": 0.6}, pool,
                                         _torch_unary(x, dpooled, lambda t: TF.max_pool2d(t, 2)))
    cases[f"spatial batch norm (train) on {shape}"] = (
        {"float32": 1.0, "float64": 1.0}, batchnorm,
        _torch_unary(x, dout, lambda t, g=gamma, b=beta: TF.batch_norm(
            t, torch.zeros(32, dtype=t.dtype), torch.ones(32, dtype=t.dtype), _param(g), _param(b), training=True)))
    cases[f"spatial group norm (G={GROUPS}) on {shape}"] = (
        {"float32": 2.0, "float64": 2.0}, groupnorm,
        _torch_unary(x, dout, lambda t, g=gamma, b=beta: TF.group_norm(t, GROUPS, _param(g), _param(b))))
    return cases


def _param(a):
    return torch.from_numpy(a).requires_grad_()


def _torch_conv(x, w, b, dout, pad):
    if torch is None:
        return None
    tx, tw, tb, tdout = _param(x), _param(w), _param(b), torch.from_numpy(dout)
    return lambda: TF.conv2d(tx, tw, tb, padding=pad).backward(tdout)


def _torch_unary(x, dout, layer):
    if torch is None:
        return None
    tx, tdout = _param(x), torch.from_numpy(dout)
    return lambda: layer(tx).backward(tdout)


def layer_table(plan: Plan) -> list[str]:
    rows = ["| BLAS threads | dtype | layer, forward + backward | ours ms | torch ms | ours / torch | target |",
            "|---|---|---|---:|---:|---:|---|"]

    def cases(dtype, threads):
        return {label: (targets[dtype] if threads == 1 else None, ours, theirs)
                for label, (targets, ours, theirs) in layer_runs(dtype).items()}

    for threads, dtype, label, times, target in comparisons(plan.layer_reps, cases):
        rows.append(f"| {threads} | {dtype} | {label} | {_ms(times['ours'])} | {_ms(times.get('torch'))} "
                    f"{ratio_cells(times['ours'], times.get('torch'), target)}")
    return rows


# ---------------------------------------------------------------------------
# 3. Peak memory, each measurement in a fresh subprocess
# ---------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux 4.0+); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def measure_peak(side: str, dtype: str) -> dict:
    """Run in a fresh process: peak resident-set growth (MiB) over two training steps."""
    with set_threads(1):
        step = our_step(dtype) if side == "ours" else torch_step(dtype)
        if _reset_peak_rss():
            method = "VmHWM growth after clear_refs"
            baseline = _status_kib("VmRSS")
            step()
            step()
            peak = _status_kib("VmHWM")
        else:  # ru_maxrss counts from the process start, so the baseline is the peak so far
            method = "ru_maxrss growth"
            baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            step()
            step()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": (peak - baseline) / 1024, "method": method}


def memory_table() -> list[str]:
    rows = ["| dtype | ours MiB | torch MiB | ours / torch | target | method |", "|---|---:|---:|---:|---|---|"]
    for dtype in DTYPES:
        sides = ("ours", "torch") if torch is not None else ("ours",)
        result = {}
        for side in sides:
            out = subprocess.run([sys.executable, __file__, "--peak-memory", side, dtype],
                                 capture_output=True, text=True, check=True).stdout
            result[side] = json.loads(out.strip().splitlines()[-1])
        ours, theirs = result["ours"]["peak_mib"], result.get("torch", {}).get("peak_mib")
        rows.append(f"| {dtype} | {ours:.1f} | {'—' if theirs is None else f'{theirs:.1f}'} "
                    f"{ratio_cells(ours, theirs, 1.0)} {result['ours']['method']} |")
    return rows


# ---------------------------------------------------------------------------
# 4. Sweep: trials one after another against two at a time
# ---------------------------------------------------------------------------


def digits_trial(seed: int) -> float:
    """One training run on digits like a bn-vs-gn study trial (a second or two); returns its val accuracy."""
    from cnncore.data import load_dataset
    from cnncore.solver import Solver

    data = load_dataset("digits", dtype="float32", seed=0)
    model = ThreeLayerConvNet(input_dim=data["X_train"].shape[1:], num_filters=32, filter_size=3, hidden_dim=64,
                              num_classes=len(data["class_names"]), weight_scale=1e-2, normalization="batchnorm",
                              dtype="float32", seed=seed)
    solver = Solver(model, data, update_rule="sgd_momentum", optim_config={"learning_rate": 5e-3}, batch_size=8,
                    num_epochs=3, verbose=False, seed=seed)
    solver.train()
    return solver.best_val_acc


def _one_blas_thread():
    threadpool_limits(limits=1, user_api="blas")  # kept for the worker's lifetime


def _ready(_):
    return os.getpid()


def measure_sweep(trials: int) -> dict:
    """Run in a fresh process (no torch, so forking is safe): for each way of
    running the trials, its wall seconds and the cores it kept busy (CPU time
    of this process and its finished children over wall time)."""
    import multiprocessing

    seeds = list(range(trials))
    digits_trial(0)  # warm-up: imports, data cache

    def timed(name, run):
        before, start = os.times(), time.perf_counter()
        run()
        after, wall = os.times(), time.perf_counter() - start
        cpu = sum(after[:4]) - sum(before[:4])  # user + system, self + children
        result[name] = {"seconds": wall, "cores": cpu / wall}

    result = {}
    for threads in (2, 1):
        with threadpool_limits(limits=threads, user_api="blas"):
            timed(f"one after another, BLAS {threads} thread{'s' * (threads > 1)}",
                  lambda: [digits_trial(seed) for seed in seeds])
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(2) as pool:
        timed("threads", lambda: list(pool.map(digits_trial, seeds)))
    start_pool = time.perf_counter()
    pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork"), initializer=_one_blas_thread)
    list(pool.map(_ready, range(2)))
    result["process pool start"] = {"seconds": time.perf_counter() - start_pool}

    def processes():  # the workers' CPU time is counted once they have exited
        list(pool.map(digits_trial, seeds))
        pool.shutdown()

    timed("processes", processes)
    return result


def sweep_table(plan: Plan) -> list[str]:
    load = os.getloadavg()[0]
    out = subprocess.run([sys.executable, __file__, "--sweep-child", str(plan.sweep_trials)],
                         capture_output=True, text=True, check=True).stdout
    runs = json.loads(out.strip().splitlines()[-1])
    sequential, sequential_1 = (runs[name]["seconds"] for name in list(runs)[:2])
    rows = [f"{plan.sweep_trials} trials one after another: {sequential:.2f} s with BLAS at 2 threads, "
            f"{sequential_1:.2f} s at 1 thread (tiny matrices: a second BLAS thread only costs); worker "
            f"processes started (forked) in {runs['process pool start']['seconds']:.2f} s, not counted. "
            f"Load average before the sweep {load:.1f}: the share of the 2 cores that other jobs take is "
            "not available to the trials ('cores busy' shows what they got).\n",
            "| trials run | seconds | cores busy | speed-up vs one after another at BLAS 2 threads "
            "(target >= 1.7) | speed-up vs one after another at BLAS 1 thread |",
            "|---|---:|---:|---:|---:|"]
    for name, run in runs.items():
        if name == "process pool start":
            continue
        one_by_one = name.startswith("one after another")
        way = name if one_by_one else f"2 at a time in {name}, BLAS 1 thread each"
        speedup = sequential / run["seconds"]
        verdict_cell = "" if one_by_one else f" {verdict(speedup >= 1.7)}"
        rows.append(f"| {way} | {run['seconds']:.2f} | {run['cores']:.2f} | {speedup:.2f}{verdict_cell} "
                    f"| {sequential_1 / run['seconds']:.2f} |")
    return rows


# ---------------------------------------------------------------------------


def header() -> str:
    blas = [f"{i.get('internal_api')} kernel {i.get('architecture', '?')}" for i in threadpool_info()
            if i.get("user_api") == "blas"]
    overrides = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    torch_line = f"torch {torch.__version__}" if torch is not None else "torch not installed: our figures only"
    lines = [environment(), f"{torch_line}; OpenBLAS: {', '.join(blas) or 'unknown'}; "
             f"OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE: {overrides or 'unset'}"]
    if overrides:
        lines.append("WARNING: these variables slow a current numpy; unset both in the benchmark's command.")
    return "\n\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (about a minute)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--peak-memory", nargs=2, metavar=("SIDE", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--sweep-child", type=int, metavar="TRIALS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sweep_child:
        print(json.dumps(measure_sweep(args.sweep_child)))
        return 0
    load_torch()
    # Freed memory kept for reuse, as Solver.train() sets it, on both sides of every comparison.
    getattr(backend, "retain_freed_memory", lambda: False)()
    if args.peak_memory:
        print(json.dumps(measure_peak(*args.peak_memory)))
        return 0
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    plan = QUICK if args.quick else FULL
    start = time.perf_counter()
    print(f"# cnncore vs PyTorch on the CPU{' (--quick)' if args.quick else ''}\n")
    print(header() + "\n")
    print(f"Medians of {plan.step_reps} (step) and {plan.layer_reps} (layers) repetitions after a warm-up, ours "
          "and torch taking turns: process CPU time at 1 thread, wall time at 2. Targets apply at 1 thread unless "
          "shown; 'info' rows have none.\n")
    if "study" in sections:
        print("## The study nets, one training step (1 thread, process CPU time, best of "
              f"{plan.study_reps} interleaved runs)\n")
        with set_threads(1):
            print("\n".join(study_nets.study_table(plan.study_reps, with_torch=torch is not None)) + "\n")
    if "ghost" in sections:
        print(f"## Ghost batch norm (g = 2) against plain batch norm, batch {study_nets.GHOST_BATCH}, float32 "
              f"(1 thread, process CPU time, best of {plan.study_reps} interleaved runs)\n")
        with set_threads(1):
            print("\n".join(study_nets.ghost_table(plan.study_reps)) + "\n")
    if "preset" in sections:
        print(f"## The {study_nets.PRESET} preset's training time, from its cells' steps (float32, 1 thread, "
              f"process CPU time, best of {plan.study_reps} runs)\n")
        with set_threads(1):
            print("\n".join(study_nets.preset_table(plan.study_reps)) + "\n")
    if "flops" in sections:
        print(f"## Three-layer net, batch {BATCH}: step against its FLOP limit (1 thread)\n")
        print("\n".join(flop_table(plan)) + "\n")
    if "step" in sections:
        print(f"## Training step, batch {BATCH}\n")
        print("\n".join(step_table(plan)) + "\n")
    if "layers" in sections:
        print("## Layers, forward + backward\n")
        print("\n".join(layer_table(plan)) + "\n")
    if "memory" in sections:
        print(f"## Peak memory of a training step, batch {BATCH} (1 thread, fresh process per figure)\n")
        print("\n".join(memory_table()) + "\n")
    if "sweep" in sections:
        print("## Sweep on 2 cores\n")
        print("\n".join(sweep_table(plan)) + "\n")
    print(f"Total {time.perf_counter() - start:.0f} s; load average at the end {os.getloadavg()[0]:.1f}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
