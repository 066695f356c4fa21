"""PGD-10 adversarial-training step: rift_dist's ``train_step`` versus a plain float32 NCHW loop.

Both train the full-width CIFAR ResNet-18 of the paper (width 64, CIFAR-10 normalisation as its first
layer) on batches of 128 real CIFAR-10 training images with Madry PGD-AT: PGD-10, epsilon 8/255,
step 2/255, random start, the attack in eval mode; then a train-mode forward/backward and an SGD step
(lr 0.1, momentum 0.9, weight decay 5e-4).

Contenders (run interleaved in one process, each repeated; see ``_util.py``):

* ``plain``: the baseline -- float32, NCHW, an attack loop that takes input gradients with
  ``torch.autograd.grad`` and clips like torchattacks' PGD, ``loss.backward()`` + ``optimizer.step()``.
* ``ours``: ``rift_dist.stages.adversarial_training.train_step`` with the default config, i.e. the
  precision ``precision.autocast=auto`` / ``channels_last=auto`` resolve to on this machine (bf16
  autocast + channels_last on CPUs with AVX512-BF16 or AMX and on CUDA; float32 elsewhere) and
  ``precision.fold_bn`` (the attack runs on a copy with every BatchNorm folded into its convolution,
  rebuilt every step; exact in eval mode up to rounding).
* ``ours-nofold`` (with --all): ``ours`` with ``precision.fold_bn: false``.
* ``ours-fp32`` (with --all): ``ours`` in float32 NCHW, to separate the algorithmic part from the
  precision/layout part.

Prints images/s for each and the speed-up over ``plain`` (goal on this CPU: >= 4x).

Usage:  .venv/bin/python benchmarks/bench_at_step.py [--reps 3] [--threads N] [--device cuda] [--all]
        [--width 64] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import _util  # noqa: F401  (sets sys.path)
from _util import add_common_args, cifar10, cifar_model, interleave, ratio_line, setup

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 10
ROOT_RUN = _util.ROOT / ".cache" / "bench_at_step"  # the StageContext's run directory (nothing is written)


def plain_step(model, optimizer, x, y, noise):
    """One PGD-10 AT step the plain way (float32, NCHW, torch.autograd.grad for the input gradient)."""
    model.eval()
    x_adv = (x + EPS * noise).clamp(0, 1)
    for _ in range(STEPS):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + ALPHA * grad.sign()
        x_adv = torch.clamp(x + torch.clamp(x_adv - x, -EPS, EPS), 0, 1)
    model.train()
    loss = F.cross_entropy(model(x_adv), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def make_ours(args, device, base, precision_cfg):
    """A (step function, description) pair running rift_dist's train_step on a copy of ``base``."""
    from rift_dist.config import RunConfig
    from rift_dist.parallel import parallelize
    from rift_dist.parallel.runtime import Runtime
    from rift_dist.precision import resolve_precision
    from rift_dist.stages.adversarial_training import train_step
    from rift_dist.stages.context import StageContext

    cfg = RunConfig()
    cfg.device = device.type
    cfg.precision = precision_cfg
    cfg.tracking.enabled = False
    precision = resolve_precision(cfg.precision, device)
    runtime = Runtime(cfg)
    ctx = StageContext(cfg, ROOT_RUN, runtime, None, precision, progress=False)
    model = precision.prepare_model(copy.deepcopy(base).to(device))
    t = cfg.train
    engine = parallelize(runtime,
        model, lambda params: torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay))

    def step(x, y, noise):
        return train_step(ctx, engine, x, y, noise)["loss"]

    return step, precision.describe()


def main() -> None:
    """Parse the arguments, run the comparison, print the table and the ratios."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--reps", type=int, default=3, help="timed steps per contender (after one warm-up step)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--all", action="store_true", help="also time ours without BatchNorm folding and ours in float32 NCHW")
    args = p.parse_args()
    device = setup(args)
    from rift_dist.config import PrecisionConfig

    n_batches = args.reps + 1
    x_all, y_all, desc = cifar10(args, args.batch_size * n_batches, "train", seed=1)
    print(f"# data: {desc}; full-width={args.width == 64} ResNet-18 (width {args.width}), batch {args.batch_size}, "
          f"PGD-{STEPS} eps 8/255 step 2/255", flush=True)
    torch.manual_seed(0)
    base = cifar_model(args.width)
    g = torch.Generator().manual_seed(2)
    noise_all = torch.empty_like(x_all).uniform_(-1, 1, generator=g)
    batches = [(x_all[i:i + args.batch_size].to(device), y_all[i:i + args.batch_size].to(device),
                noise_all[i:i + args.batch_size].to(device)) for i in range(0, len(x_all), args.batch_size)]
    cursor = {}

    def cycling(name, fn):
        def run():
            i = cursor.get(name, 0)
            cursor[name] = i + 1
            return fn(*batches[i % len(batches)])
        return run

    plain_model = copy.deepcopy(base).to(device)
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    contenders = {"plain": cycling("plain", lambda x, y, n: plain_step(plain_model, plain_opt, x, y, n))}
    ours, d_ours = make_ours(args, device, base, PrecisionConfig())
    contenders["ours"] = cycling("ours", ours)
    if args.all:
        nofold, _ = make_ours(args, device, base, PrecisionConfig(fold_bn=False))
        contenders["ours-nofold"] = cycling("ours-nofold", nofold)
        f32, _ = make_ours(args, device, base, PrecisionConfig(autocast="none", channels_last="off"))
        contenders["ours-fp32"] = cycling("ours-fp32", f32)
    print(f"# plain: float32 NCHW; ours: train_step with {d_ours}", flush=True)
    times = interleave(contenders, device, args.reps, warmup=1)
    print(f"\n{'contender':<12} {'img/s (min wall)':>17} {'img/s (median)':>15} {'min cpu s':>10}")
    for name, t in times.items():
        print(f"{name:<12} {args.batch_size / t.best():>17.2f} {args.batch_size / t.median():>15.2f} {t.best('cpu'):>10.2f}")
    print()
    for name in list(times)[1:]:
        print(ratio_line(f"speed-up {name} / plain", times["plain"], times[name]))


if __name__ == "__main__":
    main()
