"""Stage 2 — Module Robust Criticality (RiFT §3.2, Eq. 2, Alg. 1; RIFT.md Stages 2).

For module i with weight W0,

    MRC_i = max_{||dW||_p <= eps_w ||W0||_p}  L_adv(W0 + dW) - L_adv(W0),

where L_adv is the mean cross-entropy over a FIXED set of adversarial examples
(PGD against the AT model, made once) and only module i is perturbed.  The
maximisation follows the authors' code: the model in eval mode, only W
trainable, plain SGD gradient ASCENT with lr 1 over the fixed set in
mini-batches; after each pass dW is projected back onto the ball and the
full-set loss evaluated; MRC is the largest of those losses minus the original
one.  ``mrc.early_stop`` stops at the first projection, as Alg. 1 does.

Speed (issue "fast where it counts"): perturbing a module inside unit k (a
residual block, the stem or the head) leaves the input of unit k unchanged, so
that input is computed once for the fixed set and cached; the ascent and the
evaluations run only units k..end.  The mini-batch order of every pass is
drawn from a generator seeded by (seed, module name, pass), so the values do
not depend on the rank, the cache or the order modules are processed in.

Distributed: modules are independent; :func:`assign_modules` gives each rank a
contiguous run of modules balanced by estimated cost, results are written per
module (``mrc/modules/<name>.json``) and gathered.  A killed stage resumes with
the modules not yet done.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rift_dist import checkpoint
from rift_dist.attacks import eval_mode, pgd
from rift_dist.distributed import seed_for
from rift_dist.models import list_modules, unwrap
from rift_dist.stages.common import (
    StageContext, StageError, at_state, index_noise, new_model, shard_bounds, write_done, write_json,
)

STAGE = "mrc"
CSV_FIELDS = ("module", "num_params", "mrc", "robust_accuracy_drop")


def name_seed(name: str) -> int:
    """A stable integer from a module name (for per-module seeds)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "little")


def unit_index(model: nn.Module, name: str) -> int:
    """Index of the unit (``model.units()``) that owns module ``name``.

    Raises:
        StageError: when no unit owns it (names the module).
    """
    for i, (_, prefixes, _) in enumerate(unwrap(model).units()):
        if any((name + ".").startswith(p) for p in prefixes):
            return i
    raise StageError(f"module {name!r} belongs to no unit of {type(unwrap(model)).__name__}")


def forward_from(model: nn.Module, k: int, h: torch.Tensor) -> torch.Tensor:
    """Run units k..end of ``model`` on ``h`` (the input of unit k); k = 0 takes images."""
    for _, _, fn in unwrap(model).units()[k:]:
        h = fn(h)
    return h


@torch.no_grad()
def unit_inputs(model: nn.Module, k: int, images: torch.Tensor, batch_size: int, autocast, dtype: torch.dtype) -> torch.Tensor:
    """The input of unit k for every image [N, ...], computed in chunks of ``batch_size`` and stored in ``dtype``."""
    if k == 0:
        return images
    units = unwrap(model).units()[:k]
    out = []
    for i in range(0, len(images), batch_size):
        h = images[i:i + batch_size]
        with autocast():
            for _, _, fn in units:
                h = fn(h)
        out.append(h.to(dtype))
    return torch.cat(out)


def _full_loss(model, k, inputs, labels, batch_size, autocast) -> tuple[float, float]:
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(inputs), batch_size):
            with autocast():
                logits = forward_from(model, k, inputs[i:i + batch_size]).float()
            y = labels[i:i + batch_size]
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    n = len(inputs)
    return total_loss / n, correct / n


def module_criticality(
    model: nn.Module,
    name: str,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: int,
    epsilon_w: float = 0.1,
    p: float = 2.0,
    num_iterations: int = 10,
    lr: float = 1.0,
    batch_size: int = 512,
    early_stop: bool = False,
    seed: int = 0,
    autocast=None,
    on_pass=None,
) -> dict:
    """MRC of one module (RiFT Eq. 2) by projected gradient ascent on its weight only.

    Args:
        model: the AT model (unwrapped); put in eval mode for the call, its weights restored exactly after.
        name: the module (Conv2d/Linear) name, e.g. ``layer2.1.conv2``.
        inputs: the input of unit ``k`` for the fixed adversarial set (images [N, 3, H, W] in [0, 1] when k = 0).
        labels: int64 [N].
        k: index of the unit owning the module (:func:`unit_index`); pass 0 to run the whole network.
        epsilon_w: relative radius: ||dW||_p <= epsilon_w * ||W0||_p.
        p: 2 (Frobenius; projection by rescaling) or inf (element-wise clamp).
        num_iterations: passes over the fixed set; lr: ascent step; batch_size: mini-batch.
        early_stop: stop after the first pass that needed a projection (Alg. 1).
        seed: the run's seed; the batch order of pass t is drawn from (seed, name, t).
        on_pass: optional callback ``on_pass(t, dW)`` after each projection (tests).

    Returns:
        {"module", "num_params", "mrc", "robust_accuracy_drop", "loss_before", "loss_after",
         "accuracy_before", "accuracy_after", "passes"}.
    """
    import contextlib

    autocast = autocast or contextlib.nullcontext
    layer = dict(list_modules(model))[name]
    weight = layer.weight
    w0 = weight.detach().clone()
    flags = [(q, q.requires_grad) for q in model.parameters()]
    for q, _ in flags:
        q.requires_grad_(False)
    weight.requires_grad_(True)
    if p == 2:
        radius = epsilon_w * w0.norm().item()
    elif math.isinf(p):
        radius = epsilon_w * w0.abs().max().item()
    else:
        raise ValueError(f"mrc.p must be 2 or inf, got {p}")
    n = len(inputs)
    try:
        with eval_mode(model):
            loss0, acc0 = _full_loss(model, k, inputs, labels, batch_size, autocast)
            best_loss, best_acc, passes = loss0, acc0, 0
            for t in range(num_iterations):
                g = torch.Generator().manual_seed(seed_for(seed, name_seed(name), t))
                order = torch.randperm(n, generator=g).to(labels.device)
                for i in range(0, n, batch_size):
                    idx = order[i:i + batch_size]
                    with autocast():
                        logits = forward_from(model, k, inputs[idx]).float()
                    loss = F.cross_entropy(logits, labels[idx])
                    (grad,) = torch.autograd.grad(loss, weight)
                    with torch.no_grad():
                        weight.add_(grad, alpha=lr)  # ascent
                projected = False
                with torch.no_grad():
                    dw = weight - w0
                    if p == 2:
                        norm = dw.norm().item()
                        if norm > radius:
                            weight.copy_(w0 + dw * (radius / norm))
                            projected = True
                    else:
                        if dw.abs().max().item() > radius:
                            weight.copy_(w0 + dw.clamp(-radius, radius))
                            projected = True
                if on_pass is not None:
                    on_pass(t, (weight - w0).detach().clone(), radius)
                loss_t, acc_t = _full_loss(model, k, inputs, labels, batch_size, autocast)
                passes = t + 1
                if loss_t > best_loss:
                    best_loss, best_acc = loss_t, acc_t
                if early_stop and projected:
                    break
    finally:
        with torch.no_grad():
            weight.copy_(w0)
        for q, flag in flags:
            q.requires_grad_(flag)
    return {"module": name, "num_params": int(w0.numel()), "mrc": best_loss - loss0,
            "robust_accuracy_drop": acc0 - best_acc, "loss_before": loss0, "loss_after": best_loss,
            "accuracy_before": acc0, "accuracy_after": best_acc, "passes": passes}


def module_costs(model: nn.Module, names: list[str], image_shape: tuple[int, ...]) -> dict[str, float]:
    """Estimated relative cost of each module's MRC: the multiply-adds of units k..end (k = the module's unit)."""
    m = unwrap(model)
    macs: dict[int, float] = {}
    units = m.units()
    hooks = []
    current = {"k": 0}

    def hook(layer, inp, out):
        kernel = layer.weight[0].numel() if isinstance(layer, nn.Conv2d) else layer.in_features
        macs[current["k"]] = macs.get(current["k"], 0.0) + out.numel() * kernel

    for _, layer in list_modules(m):
        hooks.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad(), eval_mode(m):
            p = next(m.parameters())
            h = torch.zeros((1, *image_shape), device=p.device, dtype=p.dtype)
            for i, (_, _, fn) in enumerate(units):
                current["k"] = i
                h = fn(h)
    finally:
        for hk in hooks:
            hk.remove()
    tail = [sum(macs.get(j, 0.0) for j in range(i, len(units))) for i in range(len(units))]
    return {n: tail[unit_index(m, n)] for n in names}


def assign_modules(names: list[str], costs: dict[str, float], world_size: int) -> list[list[str]]:
    """Split ``names`` (in network order) into ``world_size`` contiguous groups of balanced total cost.

    Contiguity keeps the modules of one unit on one rank (its activation cache is shared).
    Every module is assigned exactly once; with more ranks than modules, some groups are empty.
    """
    groups: list[list[str]] = [[] for _ in range(world_size)]
    total = sum(costs[n] for n in names)
    acc, r = 0.0, 0
    for i, n in enumerate(names):
        remaining_ranks = world_size - r
        remaining_items = len(names) - i
        target = (r + 1) * total / world_size
        if groups[r] and r < world_size - 1 and (acc + costs[n] / 2 > target or remaining_items < remaining_ranks):
            r += 1
        groups[r].append(n)
        acc += costs[n]
    return groups


def build_adversarial_set(ctx: StageContext, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed adversarial set: ``mrc.num_examples`` training images (seeded choice), PGD against the AT model.

    Generated once, sharded across ranks and gathered (every rank gets the same set);
    saved to ``mrc/adversarial_set.pt`` and reused on a re-run.
    Returns (x_adv float32 [N, 3, H, W] in [0, 1], labels int64 [N]) on the run's device.
    """
    from rift_dist.data.loaders import get_dataset

    path = ctx.run_dir / STAGE / "adversarial_set.pt"
    cfg = ctx.cfg
    if path.is_file():
        data = checkpoint.load(path)
        return data["images"].to(ctx.device), data["labels"].to(ctx.device)
    train = get_dataset(cfg, "train")
    n = min(cfg.mrc.num_examples, len(train))
    g = torch.Generator().manual_seed(seed_for(cfg.seed, 2))
    chosen = torch.randperm(len(train), generator=g)[:n].sort().values.numpy()
    subset = train.subset(chosen)
    start, stop = shard_bounds(n, ctx.runtime.rank, ctx.runtime.world_size)
    a = cfg.mrc.attack
    chunks = []
    for i in range(start, stop, cfg.data.eval_batch_size):
        j = min(stop, i + cfg.data.eval_batch_size)
        x = torch.from_numpy(subset.images[i:j]).permute(0, 3, 1, 2).float().div(255).to(ctx.device)
        y = torch.from_numpy(subset.labels[i:j]).long().to(ctx.device)
        noise = index_noise(torch.arange(i, j), tuple(x.shape[1:]), seed_for(cfg.seed, 3)).to(ctx.device)
        x_adv = pgd(model, ctx.precision.prepare_input(x), y, a.epsilon, a.step_size, a.num_steps,
                    a.random_start, noise=noise, autocast=ctx.precision.autocast)
        chunks.append((x_adv.cpu(), y.cpu()))
    parts = ctx.runtime.all_gather_object(chunks)
    xs = [c[0] for part in parts for c in part]
    ys = [c[1] for part in parts for c in part]
    images, labels = torch.cat(xs), torch.cat(ys)
    if ctx.is_main:
        checkpoint.save_atomic({"images": images, "labels": labels, "indices": torch.from_numpy(chosen)}, path)
    return images.to(ctx.device), labels.to(ctx.device)


def choose_modules(rows: list[dict], names_in_order: list[str], exclude: list[str], top_k: int) -> list[str]:
    """The ``top_k`` lowest-MRC modules after exclusions ('first', 'last', or names).

    Raises:
        StageError: when an excluded name is not a module, or nothing is left to choose.
    """
    banned = set()
    for e in exclude:
        if e == "first":
            banned.add(names_in_order[0])
        elif e == "last":
            banned.add(names_in_order[-1])
        elif e in names_in_order:
            banned.add(e)
        else:
            raise StageError(f"mrc.exclude names {e!r}, which is not a module; valid: first, last, {', '.join(names_in_order)}")
    candidates = sorted((r for r in rows if r["module"] not in banned), key=lambda r: r["mrc"])
    if not candidates:
        raise StageError("mrc.exclude leaves no module to fine-tune")
    return [r["module"] for r in candidates[:top_k]]


def write_table(path: Path, rows: list[dict]) -> None:
    """Write the MRC table (module, num_params, mrc, robust_accuracy_drop), sorted by MRC ascending."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in sorted(rows, key=lambda r: r["mrc"]):
            w.writerow(r)
    tmp.replace(path)


def read_table(path: Path) -> list[dict]:
    """Read ``mrc.csv`` back (numbers parsed)."""
    with Path(path).open() as fh:
        return [{"module": r["module"], "num_params": int(r["num_params"]), "mrc": float(r["mrc"]),
                 "robust_accuracy_drop": float(r["robust_accuracy_drop"])} for r in csv.DictReader(fh)]


def plot_table(path: Path, rows: list[dict], names_in_order: list[str], chosen: list[str]) -> None:
    """Bar chart of MRC per module, in network order, chosen modules highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["module"]: r for r in rows}
    names = [n for n in names_in_order if n in by]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4))
    ax.bar(range(len(names)), [by[n]["mrc"] for n in names],
           color=["tab:orange" if n in chosen else "tab:blue" for n in names])
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("MRC (increase of adversarial loss)")
    ax.set_title("Module robust criticality (orange: fine-tuned)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compute_modules(ctx: StageContext, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    names: list[str], progress_desc: str = "MRC") -> list[dict]:
    """MRC of ``names`` on this process, reusing each unit's cached input; results written per module.

    Modules with a result file in ``mrc/modules/`` are read back instead of recomputed.
    """
    cfg = ctx.cfg.mrc
    out_dir = ctx.run_dir / STAGE / "modules"
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if cfg.cache_dtype == "bfloat16" else torch.float32
    cache_k, cache = None, None
    rows = []
    for name in ctx.bar(names, total=len(names), desc=progress_desc) if ctx.runtime.world_size == 1 else names:
        result_path = out_dir / f"{name}.json"
        if result_path.is_file():
            rows.append(json.loads(result_path.read_text()))
            continue
        k = unit_index(model, name) if cfg.use_cache else 0
        if k != cache_k:
            cache = unit_inputs(model, k, images, cfg.batch_size, ctx.precision.autocast, dtype)
            cache_k = k
        t0 = time.time()
        row = module_criticality(
            model, name, cache, labels, k=k, epsilon_w=cfg.epsilon_w, p=cfg.p, num_iterations=cfg.num_iterations,
            lr=cfg.lr, batch_size=cfg.batch_size, early_stop=cfg.early_stop, seed=ctx.cfg.seed,
            autocast=ctx.precision.autocast,
        )
        row["seconds"] = time.time() - t0
        write_json(result_path, row)
        rows.append(row)
    return rows


def run(ctx: StageContext) -> dict:
    """Compute the MRC table of every module (this rank's share), gather it and choose the module(s).

    Writes ``mrc.csv`` (module, num_params, mrc, robust_accuracy_drop; sorted by MRC),
    ``mrc/mrc.json`` (full rows, chosen modules) and ``mrc/mrc.png``.
    """
    cfg = ctx.cfg
    model = new_model(ctx, at_state(ctx))
    model.eval()
    all_names = [n for n, _ in list_modules(model)]
    names = list(cfg.mrc.modules) or all_names
    unknown = [n for n in names if n not in all_names]
    if unknown:
        raise StageError(f"mrc.modules names unknown module(s) {unknown}; valid modules: {', '.join(all_names)}")
    images, labels = build_adversarial_set(ctx, model)
    costs = module_costs(model, names, tuple(images.shape[1:]))
    groups = assign_modules(names, costs, ctx.runtime.world_size)
    mine = groups[ctx.runtime.rank]
    ctx.log(f"[mrc] {len(names)} modules, fixed adversarial set of {len(images)} images, "
            f"{ctx.runtime.world_size} rank(s) ({', '.join(str(len(g)) for g in groups)} modules each), "
            f"cache={'on' if cfg.mrc.use_cache else 'off'}, {ctx.precision.describe()}")
    t0 = time.time()
    with ctx.tracker.stage("mrc") as run_log:
        rows_mine = compute_modules(ctx, model, images, labels, mine)
        seconds = time.time() - t0
        gathered = ctx.runtime.all_gather_object((rows_mine, seconds))
        rows = [r for part, _ in gathered for r in part]
        per_rank = [s for _, s in gathered]
        chosen = choose_modules(rows, all_names, cfg.mrc.exclude, cfg.mrc.top_k)
        if ctx.is_main:
            write_table(ctx.run_dir / "mrc.csv", rows)
            write_json(ctx.run_dir / STAGE / "mrc.json", {"rows": rows, "chosen": chosen, "assignment": groups,
                                                          "rank_seconds": per_rank})
            plot_table(ctx.run_dir / STAGE / "mrc.png", rows, all_names, chosen)
            for r in rows:
                run_log.log_metrics({f"mrc.{r['module']}": r["mrc"],
                                     f"robust_accuracy_drop.{r['module']}": r["robust_accuracy_drop"]})
            run_log.log_metrics({"mrc_seconds": seconds})
            run_log.set_tags({"rift.chosen_modules": ",".join(chosen)})
            run_log.log_artifact(ctx.run_dir / "mrc.csv")
            run_log.log_artifact(ctx.run_dir / STAGE / "mrc.png")
    lowest = ", ".join("%s (%+.3f)" % (r["module"], r["mrc"]) for r in sorted(rows, key=lambda r: r["mrc"])[:3])
    ctx.log(f"[mrc] lowest MRC: {lowest}; chosen: {', '.join(chosen)} ({time.time() - t0:.0f}s)")
    outputs = {"table": str(ctx.run_dir / "mrc.csv"), "chosen": chosen}
    write_done(ctx, STAGE, outputs)
    ctx.runtime.barrier()
    return outputs
