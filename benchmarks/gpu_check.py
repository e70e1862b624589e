"""GPU check: the unchanged cnncore code on CuPy arrays, against the CPU path and PyTorch CUDA.

    python benchmarks/gpu_check.py [--quick] [--json PATH]

1. Equality: for each normalisation, a float32 net built with the same seed on the
   CPU (NumPy) and on the GPU (CuPy) gives the same test-time scores and the same
   one-step loss and gradients, within float32 tolerance.
2. Benchmark: a training step of the three-layer net (conv 32x7x7 pad 3 - relu -
   2x2 pool - affine 100 - relu - affine 10, softmax loss, SGD update) on CIFAR-sized
   input, ours on CuPy against the same step in PyTorch CUDA, batch 128 and 1024,
   float32 and float64, with the targets (ours >= 0.9x torch's images/s at batch 128,
   >= 0.6x at 1024, float32).

Needs the 'gpu' extra (cupy) and an NVIDIA GPU; PyTorch with CUDA is optional (without
it the torch column is left out). Exits non-zero when an equality check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnncore.backend import require_device, to_numpy  # noqa: E402
from cnncore.cnn import ThreeLayerConvNet  # noqa: E402
from cnncore.optim import sgd  # noqa: E402

NET = dict(input_dim=(3, 32, 32), num_filters=32, filter_size=7, hidden_dim=100, num_classes=10,
           weight_scale=1e-2, reg=1e-3)
LEARNING_RATE = 1e-3


def check_equality(cp) -> list[str]:
    """Scores and one step's loss/gradients on CPU vs GPU; returns the failures."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    failures = []
    for norm in ("none", "batchnorm", "groupnorm"):
        cpu = ThreeLayerConvNet(**NET, dtype=np.float32, normalization=norm, seed=0)
        gpu = ThreeLayerConvNet(**NET, dtype=np.float32, normalization=norm, seed=0, device="cuda")
        loss_c, grads_c = cpu.loss(X, y)
        loss_g, grads_g = gpu.loss(cp.asarray(X), cp.asarray(y))
        pairs = {"scores": (cpu.loss(X), gpu.loss(cp.asarray(X))), "loss": (loss_c, loss_g)}
        pairs.update({f"d{k}": (grads_c[k], grads_g[k]) for k in grads_c})
        for name, (a, b) in pairs.items():
            a, b = np.asarray(to_numpy(a), np.float64), np.asarray(to_numpy(b), np.float64)
            # float32 tolerance relative to the array's scale: summation order differs on the GPU.
            err = float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-12))
            status = "ok" if err < 1e-4 else "FAIL"
            print(f"  {norm:10s} {name:8s} max|cpu-gpu|/max|cpu| = {err:.2e}  {status}")
            if status == "FAIL":
                failures.append(f"{norm}/{name}: {err:.2e}")
    return failures


def time_steps(step, sync, repeats: int) -> float:
    """Median seconds per step over `repeats` timed steps, after a warm-up."""
    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def ours_step_time(cp, batch: int, dtype, repeats: int) -> float:
    model = ThreeLayerConvNet(**NET, dtype=dtype, seed=0, device="cuda")
    X = cp.asarray(np.random.default_rng(0).standard_normal((batch, 3, 32, 32)), dtype=dtype)
    y = cp.asarray(np.random.default_rng(1).integers(0, 10, batch))
    config = {k: {"learning_rate": LEARNING_RATE} for k in model.params}

    def step():
        _, grads = model.loss(X, y)
        for k, w in model.params.items():
            model.params[k], config[k] = sgd(w, grads[k], config[k])

    return time_steps(step, cp.cuda.Device().synchronize, repeats)


def torch_step_time(torch, batch: int, dtype, repeats: int) -> float:
    tdtype = {np.float32: torch.float32, np.float64: torch.float64}[dtype]
    dev = torch.device("cuda")
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 7, padding=3), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(32 * 16 * 16, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10),
    ).to(dev, tdtype)
    opt = torch.optim.SGD(net.parameters(), lr=LEARNING_RATE, weight_decay=NET["reg"])
    X = torch.randn(batch, 3, 32, 32, device=dev, dtype=tdtype)
    y = torch.randint(0, 10, (batch,), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(X), y).backward()
        opt.step()

    return time_steps(step, torch.cuda.synchronize, repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    cp = require_device("cuda")
    print(f"GPU: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}  cupy {cp.__version__}")
    try:
        import torch

        torch_ok = torch.cuda.is_available()
    except ImportError:
        torch, torch_ok = None, False
    print(f"torch CUDA: {'yes, ' + torch.__version__ if torch_ok else 'not available (ours only)'}")

    print("\n1. CPU vs GPU, float32, same seed and data")
    failures = check_equality(cp)

    print("\n2. Training step, images/s (median)")
    repeats = 10 if args.quick else 30
    rows = []
    targets = {128: 0.9, 1024: 0.6}
    print(f"  {'dtype':8s} {'batch':>5s} {'ours':>10s} {'torch':>10s} {'ours/torch':>10s}  target")
    for dtype in (np.float32, np.float64):
        for batch in (128, 1024):
            ours = batch / ours_step_time(cp, batch, dtype, repeats)
            theirs = batch / torch_step_time(torch, batch, dtype, repeats) if torch_ok else float("nan")
            ratio = ours / theirs
            target = targets[batch] if dtype is np.float32 else None
            verdict = "" if target is None or not torch_ok else (
                f">= {target}: {'PASS' if ratio >= target else 'FAIL'}")
            print(f"  {np.dtype(dtype).name:8s} {batch:5d} {ours:10.0f} {theirs:10.0f} {ratio:10.2f}  {verdict}")
            rows.append(dict(dtype=np.dtype(dtype).name, batch=batch, ours_images_per_s=ours,
                             torch_images_per_s=theirs, ratio=ratio, target=target))
    if args.json:
        args.json.write_text(json.dumps({"equality_failures": failures, "steps": rows}, indent=2))
    if failures:
        print("\nequality FAILED: " + "; ".join(failures))
        return 1
    print("\nequality: all within float32 tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
