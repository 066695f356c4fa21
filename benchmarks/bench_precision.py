"""Does bf16 + channels_last change what adversarial training learns?  A short AT run in both.

Trains a width-16 CIFAR ResNet-18 (the default config's) with Madry PGD-AT (PGD-10, 8/255, step 2/255, random start; SGD
momentum 0.9, weight decay 5e-4, batch 128, lr 0.1 then 0.01 for the last third of the epochs) on
2,000 real CIFAR-10 training images for a few epochs, once per precision and seed:

* ``fp32``: ``precision.autocast=none``, ``channels_last=off``;
* ``default``: the defaults (``auto``): bf16 autocast + channels_last on CPUs with AVX512-BF16/AMX and on CUDA.

Both runs of a seed start from the same weights and see the same batches and the same random
starts; the step is rift_dist's ``train_step``.  Every trained model is then evaluated on 1,000
CIFAR-10 test images -- clean accuracy and PGD-10 robust accuracy -- twice: with a float32 evaluator
and with the default-precision evaluator, so training precision and evaluation precision are
told apart.  The seed-to-seed spread is the noise the precision difference is compared with.

Usage:  .venv/bin/python benchmarks/bench_precision.py [--epochs 6] [--seeds 2] [--train 2000] [--test 1000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import _util  # noqa: F401
from _util import add_common_args, cifar10, cifar_model, setup

PRECISIONS = {"fp32": {"autocast": "none", "channels_last": "off"}, "default": {}}


def build(device, precision_kw: dict, seed: int, width: int):
    """(ctx, engine, precision) for rift_dist's train_step with the given precision switches."""
    from rift_dist.config import PrecisionConfig, RunConfig
    from rift_dist.parallel import parallelize
    from rift_dist.parallel.runtime import Runtime
    from rift_dist.precision import resolve_precision
    from rift_dist.stages.context import StageContext

    cfg = RunConfig()
    cfg.device = device.type
    cfg.precision = PrecisionConfig(**precision_kw)
    cfg.tracking.enabled = False
    precision = resolve_precision(cfg.precision, device)
    runtime = Runtime(cfg)
    ctx = StageContext(cfg, _util.ROOT / ".cache" / "bench_precision", runtime, None, precision, progress=False)
    torch.manual_seed(seed)
    model = precision.prepare_model(cifar_model(width).to(device))
    t = cfg.train
    engine = parallelize(runtime,
        model, lambda params: torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay))
    return ctx, engine, precision


def evaluate(model, precision, x, y, batch_size: int = 500, seed: int = 7) -> tuple[float, float]:
    """Clean and PGD-10 robust accuracy (fractions) of ``model`` on (x, y), attacks on the folded frozen model."""
    from rift_dist.attacks import pgd, predict

    frozen = precision.frozen_model(model)
    g = torch.Generator().manual_seed(seed)
    clean = robust = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        noise = torch.empty(xb.shape).uniform_(-1, 1, generator=g).to(xb.device)
        ok = predict(frozen, precision.prepare_input(xb), precision.autocast) == yb
        x_adv = pgd(frozen, precision.prepare_input(xb), yb, 8 / 255, 2 / 255, 10, True, noise=noise,
                    autocast=precision.autocast)
        ok_adv = ok & (predict(frozen, precision.prepare_input(x_adv), precision.autocast) == yb)
        clean += ok.sum().item()
        robust += ok_adv.sum().item()
    return clean / len(x), robust / len(x)


def main() -> None:
    """Parse the arguments, run the comparison, print the table and the ratios."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--train", type=int, default=2000, help="training images")
    p.add_argument("--test", type=int, default=1000, help="test images")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    device = setup(args)
    from rift_dist.stages.adversarial_training import train_step
    from rift_dist.stages.lr_schedule import multistep_lr, set_lr

    xtr, ytr, dtr = cifar10(args, args.train, "train", seed=0)
    xte, yte, dte = cifar10(args, args.test, "test", seed=0)
    xtr, ytr, xte, yte = xtr.to(device), ytr.to(device), xte.to(device), yte.to(device)
    print(f"# train: {dtr}; test: {dte}; ResNet-18 width {args.width}, {args.epochs} epochs, batch {args.batch_size}")
    milestone = max(1, (2 * args.epochs) // 3)
    results = {}
    evaluators = {name: build(device, kw, 0, args.width)[2] for name, kw in PRECISIONS.items()}
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    for seed in seeds:
        for name, kw in PRECISIONS.items():
            ctx, engine, precision = build(device, kw, seed, args.width)
            t0 = time.time()
            losses = []
            for epoch in range(args.epochs):
                set_lr(engine.optimizer, multistep_lr(0.1, [milestone], 0.1, epoch))
                order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
                noise_g = torch.Generator().manual_seed(seed * 1000 + epoch + 1)
                for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
                    idx = order[i:i + args.batch_size].to(device)
                    noise = torch.empty(args.batch_size, *xtr.shape[1:]).uniform_(-1, 1, generator=noise_g).to(device)
                    out = train_step(ctx, engine, xtr[idx], ytr[idx], noise)
                losses.append(out["loss"])
            train_s = time.time() - t0
            for ev_name, ev in evaluators.items():
                results[(seed, name, ev_name)] = evaluate(engine.module, ev, xte, yte)
            c, r = results[(seed, name, "fp32")]
            print(f"seed {seed} train {name:<8} ({precision.describe().split(', cpu flags')[0]}): "
                  f"{train_s:6.1f} s, last-batch losses {' '.join(f'{v:.3f}' for v in losses)}; "
                  f"fp32 eval clean {100 * c:.1f}% robust {100 * r:.1f}%", flush=True)

    print(f"\n{'train':<8} {'eval':<8} " + " ".join(f"seed{s} clean/robust %".rjust(22) for s in seeds)
          + "   mean clean   mean robust")
    for name in PRECISIONS:
        for ev_name in PRECISIONS:
            vals = [results[(s, name, ev_name)] for s in seeds]
            cells = " ".join(f"{100 * c:10.1f} / {100 * r:5.1f}".rjust(22) for c, r in vals)
            print(f"{name:<8} {ev_name:<8} {cells}   {100 * statistics.mean(v[0] for v in vals):10.2f}"
                  f"   {100 * statistics.mean(v[1] for v in vals):11.2f}")
    if args.seeds > 1:
        def spread(i, name):
            vals = [results[(s, name, "fp32")][i] for s in seeds]
            return 100 * (max(vals) - min(vals))
        diff_c = [100 * (results[(s, "default", "fp32")][0] - results[(s, "fp32", "fp32")][0]) for s in seeds]
        diff_r = [100 * (results[(s, "default", "fp32")][1] - results[(s, "fp32", "fp32")][1]) for s in seeds]
        print(f"\ndefault - fp32 training (fp32 eval), per seed: clean {', '.join(f'{d:+.1f}' for d in diff_c)} pp, "
              f"robust {', '.join(f'{d:+.1f}' for d in diff_r)} pp; seed-to-seed spread in fp32: clean "
              f"{spread(0, 'fp32'):.1f} pp, robust {spread(1, 'fp32'):.1f} pp")


if __name__ == "__main__":
    main()
