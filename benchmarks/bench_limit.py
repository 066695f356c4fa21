"""How close the PGD-10 AT step gets to the machine: achieved FLOP/s over the best kernel's FLOP/s.

Counts one forward of the model with ``torch.utils.flop_counter.FlopCounterMode`` (F FLOPs for a
batch; convolutions and the linear layer, 2 FLOPs per multiply-add) and charges a PGD-AT step with
``num_steps * 2F`` for the attack (a forward and an input-gradient backward per iteration) plus
``3F`` for the training forward and backward: 23F for PGD-10.  Achieved FLOP/s = 23F / step time.

The ceiling is measured in the same run, with the same dtype and thread count: the best FLOP/s of
a square matmul (2048, 4096; 8192 on CUDA) and of every 3x3 convolution shape of the network at the
step's batch size (forward, NCHW and channels_last).  The share achieved / best is printed for our
step with the default settings (``ours``: train_step, bf16 + channels_last + BatchNorm folding in the
attack where available), and with --all for the plain float32 NCHW step against the float32 ceiling.

Usage:  .venv/bin/python benchmarks/bench_limit.py [--reps 3] [--threads N] [--device cuda] [--all]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

import _util  # noqa: F401
from _util import Timings, add_common_args, cifar10, cifar_model, interleave, setup, timed
from bench_at_step import STEPS, make_ours, plain_step


def forward_flops(model, x) -> int:
    """FLOPs of one forward of ``model`` on ``x`` (FlopCounterMode: conv/linear/matmul, 2 per MAC)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return int(counter.get_total_flops())


def kernel_ceiling(device, dtype, batch: int, width: int, reps: int) -> dict[str, tuple[float, str]]:
    """Best FLOP/s and which kernel, among square matmuls and the net's 3x3 conv shapes in ``dtype``.

    Returns {"wall": (flop/s, kernel), "cpu": (flop/s, kernel)} (per-kernel minimum over ``reps``).
    """
    results = []
    sizes = (2048, 4096, 8192) if device.type == "cuda" else (2048, 4096)
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = Timings()
        a @ b
        for _ in range(reps):
            timed(lambda: a @ b, device, t)
        results.append((2 * n ** 3, t, f"matmul {n}^2"))
        del a, b
    for c, hw in ((width, 32), (2 * width, 16), (4 * width, 8), (8 * width, 4)):
        conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(device=device, dtype=dtype)
        x = torch.randn(batch, c, hw, hw, device=device, dtype=dtype)
        flops = 2 * c * c * 9 * batch * hw * hw
        for cl in (False, True):
            cv = conv.to(memory_format=torch.channels_last) if cl else conv
            xx = x.contiguous(memory_format=torch.channels_last) if cl else x
            t = Timings()
            with torch.no_grad():
                cv(xx)
                for _ in range(reps):
                    timed(lambda: cv(xx), device, t)
            results.append((flops, t, f"conv3x3 {c}ch {hw}x{hw} {'channels_last' if cl else 'NCHW'}"))
    return {kind: max((f / t.best(kind), name) for f, t, name in results) for kind in ("wall", "cpu")}


def main() -> None:
    """Parse the arguments, run the comparison, print the table and the ratios."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--all", action="store_true", help="also the plain float32 NCHW step against the float32 ceiling")
    args = p.parse_args()
    device = setup(args)
    from rift_dist.config import PrecisionConfig
    from rift_dist.precision import resolve_precision

    precision = resolve_precision(PrecisionConfig(), device)
    dtype = precision.dtype or torch.float32
    x, y, desc = cifar10(args, args.batch_size, "train", seed=1)
    x, y = x.to(device), y.to(device)
    noise = torch.empty(x.shape).uniform_(-1, 1, generator=torch.Generator().manual_seed(2)).to(device)
    torch.manual_seed(0)
    base = cifar_model(args.width)
    fwd = forward_flops(copy.deepcopy(base).to(device), x)
    step_flops = STEPS * 2 * fwd + 3 * fwd
    print(f"# data: {desc}; ResNet-18 width {args.width}, batch {args.batch_size}; our precision: {precision.describe()}")
    print(f"# one forward: {fwd / 1e9:.1f} GFLOP ({fwd / args.batch_size / 1e9:.3f} GFLOP/image); "
          f"PGD-{STEPS} AT step charged {step_flops / 1e9:.0f} GFLOP (= {2 * STEPS + 3} forwards)", flush=True)

    ours, _ = make_ours(args, device, base, PrecisionConfig())
    contenders = {"ours": lambda: ours(x, y, noise)}
    if args.all:
        pm = copy.deepcopy(base).to(device)
        opt = torch.optim.SGD(pm.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        contenders["plain"] = lambda: plain_step(pm, opt, x, y, noise)
    times = interleave(contenders, device, args.reps, warmup=1)
    ceiling = {dtype: kernel_ceiling(device, dtype, args.batch_size, args.width, args.reps)}
    if args.all and dtype != torch.float32:
        ceiling[torch.float32] = kernel_ceiling(device, torch.float32, args.batch_size, args.width, args.reps)
    kinds = ("wall", "cpu") if device.type == "cpu" else ("wall",)
    for dt, by_kind in ceiling.items():
        for kind in kinds:
            flops, what = by_kind[kind]
            print(f"ceiling {str(dt).replace('torch.', '')} ({kind} time): {flops / 1e9:.0f} GFLOP/s ({what}, best of {args.reps})")
    print()
    for name, t in times.items():
        dt = torch.float32 if name == "plain" else dtype
        for kind in kinds:
            best = ceiling[dt][kind][0]
            achieved = step_flops / t.best(kind)
            print(f"{name:<10} {kind:<4}: step {t.best(kind):6.2f} s (min of {args.reps}), {achieved / 1e9:6.0f} GFLOP/s = "
                  f"{100 * achieved / best:5.1f}% of the best {str(dt).replace('torch.', '')} kernel "
                  f"({best / 1e9:.0f} GFLOP/s)")
    if device.type == "cpu":
        print("# cpu seconds count all threads of this process; with 1 thread they are the clean figure.")


if __name__ == "__main__":
    main()
