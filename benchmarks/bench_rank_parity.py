"""1 rank versus 2 ranks: how far apart the weights are after k steps, and how far apart the final tables are.

Issue 11, "rank count, explained".  Two measurements, both on real CIFAR-10 images, fp32
(``precision.autocast: none``), one thread per process, ``distributed.sync_bn: true`` as in
``configs/default.yaml``, the same GLOBAL batch on every rank count:

0. **Where step 1 parts** (``--where``): one step's forward outputs and gradients of every leaf module and the
   parameter gradients (before the optimizer step) on 1 and 2 ranks, each against a float64 copy of the
   1-rank model (torch's BatchNorm in float64) and against each other; prints the first tensor whose 1-vs-2
   difference exceeds 1e-5 relative and the worst eight.

1. **Weights after k steps** (``--steps 1,2,5,10``).  The default config's model and batch (width-16
   ResNet-18, global batch 128, PGD-5 AT, lr 0.1) with ``--set`` overrides only for fp32.  Each
   contender runs the training stage's own pieces (``new_model``, ``parallelize``,
   ``build_loader``, ``global_noise``, ``adversarial_training.train_step``) for max(k) steps in fresh
   processes (``torch.multiprocessing`` with torchrun-style variables; gloo for 2 ranks) and saves the
   consolidated state dict after each k.  Contenders:

   * ``1 rank``, ``2 ranks`` -- the comparison;
   * ``1 rank NCHW`` -- ``precision.channels_last: off``: the same arithmetic in another memory layout
     (what a change of layout alone does, a yardstick for "rounding");
   * ``1 rank other data`` -- ``data.split_seed: 1`` (other training images, same initial weights): what
     ranks that saw different data would look like.

   Printed per k, of each contender against ``1 rank``: the largest per-tensor relative difference
   max|w_a - w_b| / max|w_a| over all floating-point tensors of the state dict (weights and BatchNorm
   buffers; a BatchNorm bias starts at 0, so its max is one update and this number is large), the
   relative L2 distance of the whole state, and that distance as a share of the 1-rank run's own
   update ||w_k - w_0||.

2. **Final table over rank counts next to seeds** (``--table``; about a minute per run here).  ``rift run``
   of a tiny pipeline (``TABLE_SETS``: overrides of ``configs/default.yaml``) on 1 and 2 ranks for each of
   the seeds 0, 1, 2; prints chosen module, alpha*, AT and RiFT clean / robust test accuracy of each run,
   then the spread (max - min) over the rank counts for each seed next to the spread over the seeds for
   each rank count.

3. **Cost** (``--cost``): CPU time of one AT step and one clean training step in one process, torch's
   BatchNorm (``sync_bn: false``) vs the all-reduce BatchNorm that ``sync_bn: true`` now uses on the CPU.

Usage:  .venv/bin/python benchmarks/bench_rank_parity.py [--where] [--steps 1,2,5,10] [--no-steps] [--table]
        [--cost] [--set key=value] [--keep]
        [--work-dir W] [--data-dir D]
Exit status 0 unless a run fails; 0 with a note when the data are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
# fp32 and the torch loader (bit-identical to FFCV's, without building .beton files); no MLflow
STEP_SETS = ["precision.autocast=none", "precision.threads=1", "data.loader=torch", "tracking.enabled=false",
             "data.val_size=100", "data.test_subset=100", "data.corruption_generate=false"]
CONTENDERS = {  # name: (world size, extra --set overrides)
    "1 rank": (1, []),
    "2 ranks": (2, []),
    "1 rank NCHW": (1, ["precision.channels_last=off"]),
    "1 rank other data": (1, ["data.split_seed=1"]),
}
# the tiny pipeline of the table: a width-8 ResNet-18, 1,024 images, 3 epochs; real stages, small counts
TABLE_SETS = ["model.width=8", "data.train_subset=1024", "data.val_size=200", "data.test_subset=500",
              "data.batch_size=64", "train.epochs=3", "train.milestones=[2]", "finetune.epochs=2",
              "finetune.milestones=[1]", "mrc.num_examples=128", "mrc.batch_size=128", "mrc.num_iterations=3",
              "eval.restarts=1", "eval.extra_pgd_steps=[]", "eval.sanity_checks=false",
              "data.corruption_generate=false", "precision.autocast=none", "precision.threads=1",
              "data.loader=torch", "tracking.enabled=false"]


# ------------------------------------------------------------------------------ 1. weights after k steps


def _spawn_entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    if world == 1:  # a plain single process: no launcher variables
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(k, None)
    torch.set_num_threads(1)
    fn(rank, world, *args)


def train_steps_worker(rank: int, world: int, config: str, overrides: list[str], steps: list[int], out: str) -> None:
    """Run max(steps) AT steps of epoch 0 as the training stage does; rank 0 saves the state after each k in steps.

    Writes ``<out>/state-<k>.pt`` (the engine's consolidated float32 state dict, on the CPU), and
    ``state-0.pt`` (the initial weights).
    """
    from rift_dist.config import load_config
    from rift_dist.data.loaders import build_loader
    from rift_dist.parallel import parallelize
    from rift_dist.parallel.runtime import Runtime
    from rift_dist.pipeline import configure_torch, make_context
    from rift_dist.stages.adversarial_training import global_noise, train_step
    from rift_dist.stages.context import new_model
    from rift_dist.stages.lr_schedule import set_lr

    cfg = load_config(config, overrides)
    configure_torch(cfg)
    t = cfg.train
    with Runtime(cfg) as rt:
        ctx = make_context(cfg, Path(out) / "run", rt, progress=False)
        torch.manual_seed(cfg.seed)
        engine = parallelize(rt, new_model(ctx), lambda params: torch.optim.SGD(
            params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay))
        set_lr(engine.optimizer, t.lr)
        loader = build_loader(cfg, "train", rt.rank, rt.world_size, device=ctx.device)
        if len(loader) < max(steps):
            raise SystemExit(f"{len(loader)} batches per epoch < {max(steps)} steps; use more data.train_subset")
        loader.set_epoch(0)
        state = engine.state_dict()
        if rt.is_main:
            torch.save(state, Path(out) / "state-0.pt")
        for step, (images, labels) in enumerate(loader):
            if step >= max(steps):
                break
            noise = global_noise(cfg.seed, 0, step, cfg.data.batch_size, tuple(images.shape[1:]), rt.rank,
                                 rt.world_size)
            train_step(ctx, engine, images, labels, noise)
            if step + 1 in steps:
                state = engine.state_dict()
                if rt.is_main:
                    torch.save(state, Path(out) / f"state-{step + 1}.pt")
        rt.barrier()


def run_steps(config: Path, overrides: list[str], world: int, steps: list[int], out: Path) -> float:
    """Run :func:`train_steps_worker` on ``world`` fresh processes; returns the wall seconds."""
    from rift_dist.parallel.runtime import free_port

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    torch.multiprocessing.spawn(_spawn_entry, args=(world, free_port(), train_steps_worker,
                                                    (str(config), overrides, steps, str(out))),
                                nprocs=world, join=True)
    return time.time() - t0


def state_distance(a: dict, b: dict) -> tuple[float, str, float]:
    """(largest per-tensor max|a - b| / max|a|, the tensor it is in, relative L2 distance of all tensors).

    Over the floating-point tensors of two state dicts with the same keys; computed in float64.
    """
    worst, where, num, den = 0.0, "", 0.0, 0.0
    for k, va in a.items():
        if not va.is_floating_point():
            continue
        da, db = va.double(), b[k].double()
        rel = ((da - db).abs().max() / da.abs().max().clamp_min(1e-30)).item()
        if rel > worst:
            worst, where = rel, k
        num += (da - db).pow(2).sum().item()
        den += da.pow(2).sum().item()
    return worst, where, (num / max(den, 1e-300)) ** 0.5


def update_fraction(a: dict, b: dict, start: dict) -> float:
    """||a - b|| / ||a - start|| over the floating-point tensors: the distance as a share of a's own update."""
    num = sum((a[k].double() - b[k].double()).pow(2).sum().item() for k in a if a[k].is_floating_point())
    den = sum((a[k].double() - start[k].double()).pow(2).sum().item() for k in a if a[k].is_floating_point())
    return (num / max(den, 1e-300)) ** 0.5


def measure_steps(config: Path, steps: list[int], work: Path, extra: list[str]) -> dict:
    """Run every contender, print the table of distances to ``1 rank``; returns
    {contender: {k: (max per-tensor rel, L2 rel, share of the update, worst tensor)}}."""
    dirs, seconds = {}, {}
    for name, (world, sets) in CONTENDERS.items():
        dirs[name] = work / name.replace(" ", "-")
        seconds[name] = run_steps(config, STEP_SETS + extra + sets, world, steps, dirs[name])
        print(f"# {name}: {world} process(es), {seconds[name]:.0f} s", flush=True)
    load = lambda name, k: torch.load(dirs[name] / f"state-{k}.pt", weights_only=True)  # noqa: E731
    start = load("1 rank", 0)
    base = {k: load("1 rank", k) for k in steps}
    others = [n for n in CONTENDERS if n != "1 rank"]
    result: dict = {}
    print("\nDistance to `1 rank` after k steps: largest per-tensor max|dw| / max|w| (tensor) / relative L2 of the "
          "whole state / L2 as a share of the 1-rank run's own update ||w_k - w_0||")
    print("\n| k | " + " | ".join(others) + " |")
    print("| --- |" + " --- |" * len(others))
    for k in steps:
        cells = []
        for name in others:
            other = load(name, k)
            worst, where, l2 = state_distance(base[k], other)
            share = update_fraction(base[k], other, start)
            result.setdefault(name, {})[k] = (worst, l2, share, where)
            cells.append(f"{worst:.1e} ({where}) / {l2:.1e} / {share:.1e}")
        print(f"| {k} | " + " | ".join(cells) + " |")
    return result


# ------------------------------------------------------------------------------ 2. final table


def rift_run(config: Path, run_dir: Path, sets: list[str], nproc: int) -> dict:
    """``rift run`` one pipeline; returns its summary.json plus the chosen module(s)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "MLFLOW_TRACKING_URI")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    cmd = [sys.executable, "-m", "rift_dist.cli", "run", str(config), "--run-dir", str(run_dir), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["seconds"] = time.time() - t0
    return summary


def measure_table(config: Path, work: Path, extra: list[str], seeds=(0, 1, 2), ranks=(1, 2)) -> list[dict]:
    """The tiny pipeline on every (ranks, seed); prints the rows, the spread over rank counts for each seed and
    the spread over seeds for each rank count (max - min, percentage points; alpha* x 100)."""
    rows = []
    for seed in seeds:
        for world in ranks:
            s = rift_run(config, work / f"table-r{world}-s{seed}", TABLE_SETS + extra + [f"seed={seed}"], world)
            rows.append({"ranks": world, "seed": seed, "module": ",".join(s["modules"]), "alpha": float(s["alpha"]),
                         "at_clean": s["at"]["clean_accuracy"], "at_robust": s["at"]["robust_accuracy"],
                         "rift_clean": s["rift"]["clean_accuracy"], "rift_robust": s["rift"]["robust_accuracy"],
                         "n": s["at"].get("num_examples", 0), "seconds": s["seconds"]})
            print(f"# ranks {world} seed {seed}: {s['seconds']:.0f} s", flush=True)
    keys = ("at_clean", "at_robust", "rift_clean", "rift_robust")
    print("\n| ranks | seed | module | alpha* | AT clean | AT robust | RiFT clean | RiFT robust |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['ranks']} | {r['seed']} | {r['module']} | {r['alpha']:g} | "
              + " | ".join(f"{100 * r[k]:.1f}" for k in keys) + " |")

    def spread_row(name, sel):
        sp = {k: 100 * (max(r[k] for r in sel) - min(r[k] for r in sel)) for k in keys + ("alpha",)}
        same = len({r["module"] for r in sel}) == 1
        print(f"| {name} | " + " | ".join(f"{sp[k]:.1f}" for k in keys) + f" | {sp['alpha']:.0f} | "
              + ("same" if same else "differ") + " |")

    print("\nSpread (max - min, pp) of the test accuracies; alpha* x 100; chosen module")
    print("\n| over | AT clean | AT robust | RiFT clean | RiFT robust | alpha* | module |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for seed in seeds:
        spread_row(f"ranks {{{', '.join(map(str, ranks))}}}, seed {seed}", [r for r in rows if r["seed"] == seed])
    for world in ranks:
        spread_row(f"seeds {{{', '.join(map(str, seeds))}}}, {world} rank(s)", [r for r in rows if r["ranks"] == world])
    n = rows[0]["n"] if rows and rows[0]["n"] else 0
    if n:
        print(f"\n(one test image is {100 / n:.1f} pp; the standard error of a 30 % accuracy on {n} images is "
              f"{100 * (0.3 * 0.7 / n) ** 0.5:.1f} pp)")
    return rows


# ------------------------------------------------------------------------------ 0. where step 1 parts


def where_worker(rank: int, world: int, config: str, overrides: list[str], out: str) -> None:
    """Step 1's forward activations, their gradients and the parameter gradients (before the optimizer step) of
    every leaf module on this rank; on 1 rank also those of a float64 copy (torch's BatchNorm in float64) as the
    reference.  Writes ``<out>/w<world>_r<rank>.pt``."""
    import copy

    import torch.nn.functional as F

    from rift_dist.attacks import pgd
    from rift_dist.config import load_config
    from rift_dist.data.loaders import build_loader
    from rift_dist.parallel.batchnorm import AllReduceBatchNorm
    from rift_dist.parallel import parallelize
    from rift_dist.parallel.runtime import Runtime
    from rift_dist.pipeline import configure_torch, make_context
    from rift_dist.stages.adversarial_training import global_noise
    from rift_dist.stages.context import new_model

    def record(model, store):
        for name, mod in model.named_modules():
            if next(mod.children(), None) is None:
                def hook(mod, inp, outp, name=name):
                    store[name] = outp.detach().clone()
                    if outp.requires_grad:
                        outp.register_hook(lambda g, name=name: store.__setitem__(name + ".grad", g.detach().clone()))
                mod.register_forward_hook(hook)

    cfg = load_config(config, overrides)
    configure_torch(cfg)
    with Runtime(cfg) as rt:
        ctx = make_context(cfg, Path(out) / "run", rt, progress=False)
        torch.manual_seed(cfg.seed)
        engine = parallelize(rt, new_model(ctx), lambda p: torch.optim.SGD(p, lr=cfg.train.lr))
        loader = build_loader(cfg, "train", rt.rank, rt.world_size, device=ctx.device)
        loader.set_epoch(0)
        images, labels = next(iter(loader))
        noise = global_noise(cfg.seed, 0, 0, cfg.data.batch_size, tuple(images.shape[1:]), rt.rank, rt.world_size)
        a = cfg.train.attack
        x_adv = pgd(ctx.precision.frozen_model(engine.module), ctx.precision.prepare_input(images), labels,
                    a.epsilon, a.step_size, a.num_steps, a.random_start, noise=noise)  # as train_step does
        ref: dict = {}
        if world == 1:
            m64 = copy.deepcopy(engine.module).double().train()
            for m in m64.modules():
                if isinstance(m, AllReduceBatchNorm):
                    m.__class__ = torch.nn.BatchNorm2d  # torch's kernel, in float64
            acts64: dict = {}
            record(m64, acts64)
            F.cross_entropy(m64(x_adv.double()), labels).backward()
            ref = {"acts": acts64, "grads": {n: p.grad for n, p in m64.named_parameters()}}
        acts: dict = {}
        record(engine.module, acts)
        engine.train()
        loss = F.cross_entropy(engine(x_adv).float(), labels)
        loss.backward()  # DDP averages the gradients; no optimizer step
        torch.save({"images": images, "x_adv": x_adv, "acts": acts, "ref": ref, "loss": loss.item(),
                    "grads": {n: p.grad for n, p in engine.module.named_parameters()}}, Path(out) / f"w{world}_r{rank}.pt")


def measure_where(config: Path, work: Path, extra: list[str], threshold: float = 1e-5) -> list[tuple]:
    """Where 1 and 2 ranks part in step 1: every leaf module's output, then the gradients in backward order,
    then the parameter gradients, each as max|a - b| / max|b| of 1 rank and 2 ranks against the float64
    reference and against each other.  Prints the first tensor above ``threshold`` and the worst ones."""
    from rift_dist.parallel.runtime import free_port

    out = work / "where"
    out.mkdir(parents=True, exist_ok=True)
    for world in (1, 2):
        torch.multiprocessing.spawn(_spawn_entry, args=(world, free_port(), where_worker,
                                                        (str(config), STEP_SETS + extra, str(out))),
                                    nprocs=world, join=True)
    one = torch.load(out / "w1_r0.pt", weights_only=False)
    two = [torch.load(out / f"w2_r{r}.pt", weights_only=False) for r in (0, 1)]
    rel = lambda x, y: ((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-30)).item()  # noqa: E731
    print(f"step-1 images equal: {torch.equal(one['images'], torch.cat([t['images'] for t in two]))}; "
          f"adversarial examples equal: {torch.equal(one['x_adv'], torch.cat([t['x_adv'] for t in two]))}; "
          f"loss {one['loss']:.7f} vs {(two[0]['loss'] + two[1]['loss']) / 2:.7f}")
    rows = []
    for key in one["acts"]:  # forward order, then the gradients in the order backward produced them
        scale = 2.0 if key.endswith(".grad") else 1.0  # each rank's loss is a mean over half the batch
        a, b = one["acts"][key], torch.cat([t["acts"][key] for t in two]) / scale
        r64 = one["ref"]["acts"][key]
        rows.append((key, rel(a, r64), rel(b, r64), rel(a, b)))
    for key in one["grads"]:
        rows.append((key + " (param grad)", rel(one["grads"][key], one["ref"]["grads"][key]),
                     rel(two[0]["grads"][key], one["ref"]["grads"][key]), rel(one["grads"][key], two[0]["grads"][key])))
    first = next((r for r in rows if r[3] > threshold), None)
    print(f"first tensor where 1 and 2 ranks differ by more than {threshold:g} (relative): "
          + (f"{first[0]} ({first[3]:.1e}; 1 rank vs float64 {first[1]:.1e}, 2 ranks vs float64 {first[2]:.1e})"
             if first else "none"))
    print("\n| tensor (worst 8 by 1 rank vs 2 ranks) | 1 rank vs float64 | 2 ranks vs float64 | 1 vs 2 ranks |")
    print("| --- | --- | --- | --- |")
    for r in sorted(rows, key=lambda r: -r[3])[:8]:
        print(f"| {r[0]} | {r[1]:.1e} | {r[2]:.1e} | {r[3]:.1e} |")
    fwd = [r for r in rows if not r[0].endswith(".grad") and "(param grad)" not in r[0]]
    print(f"\nforward outputs: max 1 vs 2 ranks {max(r[3] for r in fwd):.1e}, 1 rank vs float64 "
          f"{max(r[1] for r in fwd):.1e}, 2 ranks vs float64 {max(r[2] for r in fwd):.1e}")
    return rows


# ------------------------------------------------------------------------------ 3. cost of the BatchNorm


def measure_cost(config: Path, extra: list[str], repeats: int = 5) -> dict:
    """CPU seconds of one AT step (``train_step``) and of one clean training forward+backward in one process,
    with ``sync_bn: true`` (the all-reduce BatchNorm, two-pass sums) vs ``false`` (torch's kernel), interleaved.

    The default config's model and batch in fp32 with the config's layout; min over ``repeats`` of
    ``time.process_time`` (one thread: what an idle core takes).  Returns {(mode, what): seconds}.
    """
    import torch.nn.functional as F

    from rift_dist.config import load_config
    from rift_dist.data.loaders import build_loader
    from rift_dist.parallel import parallelize
    from rift_dist.parallel.runtime import Runtime
    from rift_dist.pipeline import make_context
    from rift_dist.stages.adversarial_training import global_noise, train_step
    from rift_dist.stages.context import new_model

    contenders = {}
    for sync in (False, True):
        cfg = load_config(config, STEP_SETS + extra + [f"distributed.sync_bn={str(sync).lower()}"])
        rt = Runtime(cfg, environ={})
        ctx = make_context(cfg, Path(tempfile.mkdtemp(prefix="bn-cost-")), rt, progress=False)
        torch.manual_seed(cfg.seed)
        engine = parallelize(rt, new_model(ctx), lambda p: torch.optim.SGD(p, lr=0.0))  # lr 0: same weights
        contenders[sync] = (ctx, engine)
    loader = build_loader(cfg, "train", 0, 1)
    loader.set_epoch(0)
    images, labels = next(iter(loader))
    noise = global_noise(cfg.seed, 0, 0, cfg.data.batch_size, tuple(images.shape[1:]), 0, 1)
    times: dict = {}
    for _ in range(repeats):
        for sync, (ctx, engine) in contenders.items():
            t0 = time.process_time()
            train_step(ctx, engine, images, labels, noise)
            t1 = time.process_time()
            engine.train()
            engine.step(F.cross_entropy(engine(ctx.precision.prepare_input(images)), labels))
            t2 = time.process_time()
            for what, sec in (("AT step", t1 - t0), ("clean step", t2 - t1)):
                times[(sync, what)] = min(times.get((sync, what), float("inf")), sec)
    print("\n| one process, " + ctx.precision.describe().split(",")[0] + " | torch BatchNorm (sync_bn off) | "
          "all-reduce BatchNorm (sync_bn on) | ratio |")
    print("| --- | --- | --- | --- |")
    for what in ("AT step", "clean step"):
        a, b = times[(False, what)], times[(True, what)]
        print(f"| {what} (CPU s, min of {repeats}) | {a:.2f} | {b:.2f} | {b / a:.2f} |")
    return times


def main(argv=None) -> int:
    """Parse the arguments, run the measurements, print the tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="base config (default configs/default.yaml)")
    p.add_argument("--steps", default="1,2,5,10", help="k values: compare the weights after these many steps")
    p.add_argument("--set", action="append", default=[], help="extra config override for every run (key=value)")
    p.add_argument("--table", action="store_true", help="also run the tiny pipeline on ranks {1,2} and seeds {0,1,2}")
    p.add_argument("--no-steps", action="store_true", help="skip the weights-after-k-steps measurement")
    p.add_argument("--where", action="store_true", help="also find the first tensor of step 1 where 1 and 2 ranks part")
    p.add_argument("--cost", action="store_true", help="also time an AT step with and without the all-reduce BatchNorm")
    p.add_argument("--work-dir", default="", help="where the runs go (default: a temporary directory)")
    p.add_argument("--data-dir", default="", help="directory holding cifar10-jpeg.tar.gz (default ../shared/data)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    try:
        steps = sorted({int(s) for s in args.steps.split(",") if s.strip()})
    except ValueError:
        p.error(f"--steps must be comma-separated integers, got {args.steps!r}")
    if not steps or steps[0] < 1:
        p.error("--steps must list integers >= 1")
    data = Path(args.data_dir or os.environ.get("RIFT_SHARED_DATA", ROOT.parent / "shared" / "data"))
    if not (data / "cifar10-jpeg.tar.gz").is_file():
        print(f"note: {data / 'cifar10-jpeg.tar.gz'} not found; nothing measured (use --data-dir)")
        return 0
    extra = [f"data.archive={data / 'cifar10-jpeg.tar.gz'}"] + list(args.set)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from rift_dist.precision import hardware_summary

    print(f"# {hardware_summary(torch.device('cpu'))}")
    print(f"# load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at start; torch {torch.__version__}")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="rank-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.where:
            print(f"\n## Where step 1 parts: {args.config} + {' '.join(STEP_SETS + list(args.set))}")
            measure_where(Path(args.config), work, extra)
        if not args.no_steps:
            print(f"\n## Weights after k steps: {args.config} + {' '.join(STEP_SETS + list(args.set))}")
            measure_steps(Path(args.config), steps, work, extra)
        if args.cost:
            print(f"\n## Cost of the all-reduce BatchNorm in one process: {args.config} + {' '.join(STEP_SETS)}")
            measure_cost(Path(args.config), extra)
        if args.table:
            print(f"\n## Final table: {args.config} + {' '.join(TABLE_SETS + list(args.set))}")
            measure_table(Path(args.config), work, extra)
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
