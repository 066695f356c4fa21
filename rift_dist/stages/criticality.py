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

Speed (issue "fast where it counts"); every item keeps the values of the plain
whole-network computation to float tolerance (``tests/unit/test_mrc.py``):

* Activation cache: perturbing a module inside unit k (a residual block, the
  stem or the head) leaves the input of unit k unchanged, so that input is
  computed once for the fixed set and cached (on the device, in
  ``mrc.cache_dtype``); the ascent and the evaluations run only units k..end.
  Modules run in network order, so a unit's cache serves all its modules and
  the next unit's cache is one unit further from it.
* Reverse mode only where needed: every parameter but the perturbed weight has
  ``requires_grad`` off, so the backward stops at that weight and computes no
  other weight gradient.
* Fused evaluation: with the whole set in one mini-batch (the default, 512 of
  512), the forward that starts pass t+1 is the evaluation pass t asks for,
  so a module costs T forward+backward passes and ONE extra no-grad forward,
  not T forward+backward passes and T+1 evaluations (``mrc.fuse_eval``).
* BatchNorm folding: in eval mode every BatchNorm except the perturbed
  module's own is folded into its convolution (``precision.fold_bn``).
* Precision and layout: bf16 autocast and channels_last per ``precision.*``.

The mini-batch order of every pass (when a pass has several mini-batches) is
drawn from a generator seeded by (seed, module name, pass), so the values do
not depend on the rank, the cache or the order modules are processed in.

Distributed: modules are independent; :func:`assign_modules` gives each rank a
contiguous run of modules balanced by estimated cost, results are written per
module (``mrc/modules/<name>.json``) and gathered.  A killed stage resumes with
the modules not yet done.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rift_dist.plotting import save_figure
from rift_dist import checkpoint, interrupts
from rift_dist.atomic import read_json_piece, write_json
from rift_dist.attacks import eval_mode, pgd
from rift_dist.seeding import seed_for, stream_seed
from rift_dist.eval.protocol import index_noise
from rift_dist.models import list_modules, module_names, unwrap
from rift_dist.stages import StageError
from rift_dist.stages.context import StageContext, at_state, new_model
from rift_dist.stages.done_markers import write_done

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


def cache_dtype(name: str, autocast_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of cached activations for ``mrc.cache_dtype``.

    ``auto`` = the autocast dtype when autocast is on (the units then produce it anyway),
    else float32; ``float32``, ``bfloat16`` and ``float16`` as named.

    Raises:
        ValueError: for any other name.
    """
    if name == "auto":
        return autocast_dtype or torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"mrc.cache_dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return table[name]


@torch.no_grad()
def advance_inputs(model: nn.Module, j: int, h: torch.Tensor, k: int, batch_size: int, autocast,
                   dtype: torch.dtype, out_device: torch.device | None = None, info: dict | None = None) -> torch.Tensor:
    """Run units j..k-1 of ``model`` over ``h`` (the input of unit j for every example) in chunks.

    Args:
        h: [N, ...], the input of unit j (images [N, 3, H, W] in [0, 1] for j = 0).
        batch_size: chunk size; autocast: a context-manager factory (or None).
        dtype: dtype of the result; out_device: where to keep it (default: ``h``'s device).
        info: optional dict that receives ``lossless``: whether the units' outputs already had
            ``dtype`` (storing them lost nothing, so advancing this cache further gives bitwise
            what a computation from the images would).

    Returns:
        the input of unit k, [N, ...] in ``dtype`` (channels_last when the units produce it),
        written chunk by chunk into one preallocated tensor (no second copy from a concatenation).
    """
    if k == j:
        return h.to(device=out_device or h.device, dtype=dtype)
    autocast = autocast or contextlib.nullcontext
    units = unwrap(model).units()[j:k]
    out = None
    n = len(h)
    for i in range(0, n, batch_size):
        x = h[i:i + batch_size]
        if x.dtype != torch.float32 and autocast is contextlib.nullcontext:
            x = x.float()
        with autocast():
            for _, _, fn in units:
                x = fn(x)
        if info is not None:
            info["lossless"] = info.get("lossless", True) and x.dtype == dtype
        if out is None:
            fmt = torch.channels_last if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                                          and not x.is_contiguous()) else torch.contiguous_format
            dev = out_device or x.device
            out = torch.empty((n, *x.shape[1:]), dtype=dtype, device=dev, memory_format=fmt,
                              pin_memory=dev.type == "cpu" and x.device.type == "cuda")
        out[i:i + len(x)].copy_(x, non_blocking=True)
    return out


def unit_inputs(model: nn.Module, k: int, images: torch.Tensor, batch_size: int, autocast, dtype: torch.dtype) -> torch.Tensor:
    """The input of unit k for every image [N, ...], computed in chunks of ``batch_size`` and stored in ``dtype``.

    k = 0 returns ``images`` themselves (the fixed set, not a copy).
    """
    if k == 0:
        return images
    return advance_inputs(model, 0, images, k, batch_size, autocast, dtype)


def pass_order(seed: int, name: str, t: int, n: int) -> torch.Tensor:
    """The example order of pass t for module ``name``: a permutation of n drawn from (seed, name, t)."""
    g = torch.Generator().manual_seed(seed_for(seed, name_seed(name), t))
    return torch.randperm(n, generator=g)


def _batch(inputs: torch.Tensor, idx, device: torch.device, upcast: bool) -> torch.Tensor:
    """Rows ``idx`` (a slice or an index tensor) of the cache, on ``device``; float32 when ``upcast``."""
    x = inputs[idx]
    if x.device != device:
        x = x.to(device, non_blocking=True)
    if upcast and x.is_floating_point() and x.dtype != torch.float32:
        x = x.float()
    return x


def _full_loss(model, k, inputs, labels, batch_size, autocast, upcast=False) -> tuple[float, float]:
    total_loss, correct = 0.0, 0
    device = labels.device
    with torch.no_grad():
        for i in range(0, len(inputs), batch_size):
            with autocast():
                logits = forward_from(model, k, _batch(inputs, slice(i, i + batch_size), device, upcast)).float()
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
    fuse_eval: bool = True,
    on_pass=None,
) -> dict:
    """MRC of one module (RiFT Eq. 2) by projected gradient ascent on its weight only.

    Args:
        model: the AT model (unwrapped, or a :func:`rift_dist.precision.fold_batchnorm` copy that keeps
            this module's BatchNorm); put in eval mode for the call, its weights restored exactly after.
        name: the module (Conv2d/Linear) name, e.g. ``layer2.1.conv2``.
        inputs: the input of unit ``k`` for the fixed adversarial set (images [N, 3, H, W] in [0, 1] when
            k = 0), float32 / bf16 / fp16, on the labels' device or (host-offloaded cache) on the CPU.
            A low-precision cache is cast up to float32 per batch when ``autocast`` is None.
        labels: int64 [N].
        k: index of the unit owning the module (:func:`unit_index`); pass 0 to run the whole network.
        epsilon_w: relative radius: ||dW||_p <= epsilon_w * ||W0||_p.
        p: 2 (Frobenius; projection by rescaling) or inf (element-wise clamp).
        num_iterations: passes over the fixed set; lr: ascent step; batch_size: mini-batch.
        early_stop: stop after the first pass that needed a projection (Alg. 1).
        seed: the run's seed; the batch order of pass t is drawn from (seed, name, t).
        autocast: zero-argument context-manager factory for the forwards (None = float32).
        fuse_eval: when one mini-batch holds the whole set (N <= batch_size), the forward that starts
            pass t+1 runs at exactly the weights pass t's evaluation needs, so its loss and accuracy
            ARE that evaluation (and pass 1's forward gives the original loss): T passes then cost
            T forward+backward and one extra forward instead of T forward+backward and T+1 full
            evaluations.  The ascent sees exactly the batches (same seeded order) of the unfused
            loop, so its iterates are bitwise those of the plain computation; only the reported
            losses are summed in another order (float rounding, never fed back).
        on_pass: optional callback ``on_pass(t, dW, radius)`` after each projection (tests).

    Returns:
        {"module", "num_params", "mrc", "robust_accuracy_drop", "loss_before", "loss_after",
         "accuracy_before", "accuracy_after", "passes"}.

    Raises:
        ValueError: p other than 2 or inf.
    """
    autocast = autocast or contextlib.nullcontext
    upcast = autocast is contextlib.nullcontext
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
    device = labels.device

    def project() -> bool:
        with torch.no_grad():
            dw = weight - w0
            if p == 2:
                norm = dw.norm().item()
                if norm > radius:
                    weight.copy_(w0 + dw * (radius / norm))
                    return True
            elif dw.abs().max().item() > radius:
                weight.copy_(w0 + dw.clamp(-radius, radius))
                return True
        return False

    try:
        with eval_mode(model):
            if radius == 0:  # the ball is a point (eps_w = 0 or W0 = 0): nothing to maximise
                loss0, acc0 = _full_loss(model, k, inputs, labels, batch_size, autocast, upcast)
                best_loss, best_acc, passes = loss0, acc0, 0
            elif fuse_eval and n <= batch_size:
                loss0 = acc0 = None
                passes, projected = 0, False
                for t in range(num_iterations + 1):
                    last = t == num_iterations
                    if last:
                        x, y = _batch(inputs, slice(None), device, upcast), labels
                    else:
                        idx = pass_order(seed, name, t, n)
                        x, y = _batch(inputs, idx.to(inputs.device), device, upcast), labels[idx.to(device)]
                    with torch.set_grad_enabled(not last), autocast():
                        logits = forward_from(model, k, x).float()
                    per_example = F.cross_entropy(logits.detach(), y, reduction="none")
                    if not last:  # report in stored order, whatever the pass's permutation
                        per_example = torch.empty_like(per_example).index_copy_(0, idx.to(device), per_example)
                    loss_t = per_example.sum().item() / n
                    acc_t = (logits.argmax(1) == y).sum().item() / n
                    if t == 0:
                        loss0, acc0 = loss_t, acc_t
                        best_loss, best_acc = loss0, acc0
                    else:  # this forward is the evaluation of pass t-1
                        passes = t
                        if loss_t > best_loss:
                            best_loss, best_acc = loss_t, acc_t
                        if early_stop and projected:
                            break
                    if last:
                        break
                    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), weight)  # the unfused ascent's loss
                    del logits, x
                    with torch.no_grad():
                        weight.add_(grad, alpha=lr)  # ascent
                    projected = project()
                    if on_pass is not None:
                        on_pass(t, (weight - w0).detach().clone(), radius)
            else:
                loss0, acc0 = _full_loss(model, k, inputs, labels, batch_size, autocast, upcast)
                best_loss, best_acc, passes = loss0, acc0, 0
                for t in range(num_iterations):
                    order = pass_order(seed, name, t, n)
                    for i in range(0, n, batch_size):
                        idx = order[i:i + batch_size]
                        with autocast():
                            logits = forward_from(model, k, _batch(inputs, idx.to(inputs.device), device, upcast)).float()
                        loss = F.cross_entropy(logits, labels[idx.to(device)])
                        (grad,) = torch.autograd.grad(loss, weight)
                        with torch.no_grad():
                            weight.add_(grad, alpha=lr)  # ascent
                    projected = project()
                    if on_pass is not None:
                        on_pass(t, (weight - w0).detach().clone(), radius)
                    loss_t, acc_t = _full_loss(model, k, inputs, labels, batch_size, autocast, upcast)
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


def iter_criticality(
    model: nn.Module,
    names: list[str],
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg,
    precision,
    seed: int = 0,
    log=None,
):
    """Compute the MRC of ``names``, yielding ``(name, row)`` as each module finishes.

    The engine of the stage, without file I/O (the stage, the benchmarks and the tests share it):

    * modules run in network order (by owning unit), so every unit's cached input is computed
      once and reused by all its modules; the cache of the next unit is computed from the
      current one by running one more unit (never from the images again);
    * the cache lives on the model's device in ``mrc.cache_dtype`` (``auto`` = the autocast
      dtype); when it would exceed ``mrc.max_cache_bytes``, it is kept in host memory and
      streamed per batch on CUDA, and on a CPU the module runs from the images instead;
    * with ``precision.fold_bn`` every BatchNorm except the perturbed module's own is folded
      into its convolution (a per-module copy; the model is never modified);
    * the forwards run under the precision's autocast and memory format.

    Args:
        model: the AT model (unwrapped, eval mode), on its device.
        names: module names (any order); images: the fixed adversarial set float [N, 3, H, W] in [0, 1];
        labels: int64 [N] on the same device.
        cfg: an ``MRCConfig``; precision: a :class:`rift_dist.precision.Precision`.
        seed: the run's seed (batch orders); log: optional ``log(str)`` for fallbacks.

    Yields:
        (name, row) with :func:`module_criticality`'s row plus "unit" (k), "cache_bytes" (bytes of the
        cached unit input used; 0 when the module ran from the images) and "seconds" (wall time).
    """
    m = unwrap(model)
    position = {n: i for i, n in enumerate(module_names(m))}
    order = sorted(names, key=lambda n: (unit_index(m, n), position[n]))
    ac = precision.autocast if precision.dtype is not None else None
    dtype = cache_dtype(getattr(cfg, "cache_dtype", "float32"), precision.dtype)
    limit = int(getattr(cfg, "max_cache_bytes", 0) or 0)
    images = precision.prepare_input(images)
    feeder = precision.frozen_model(m)  # computes the caches (every BatchNorm folded when asked)
    cache_k, cache, chainable = 0, images, True
    for name in order:
        t0 = time.time()
        k = unit_index(m, name) if cfg.use_cache else 0
        if k > 0 and k != cache_k:
            shape = unit_input_shape(m, k, images)
            nbytes = math.prod(shape) * len(images) * torch.empty((), dtype=dtype).element_size()
            host = bool(limit) and nbytes > limit
            if host and images.device.type != "cuda":
                if log:
                    log(f"[mrc] {name}: the cache of unit {k} ({nbytes / 2**20:.0f} MiB) exceeds mrc.max_cache_bytes; "
                        f"running the whole network from the images")
                k = 0
            else:
                # advance the current cache when that is exact (upstream, on the device, stored without
                # rounding), else start from the images: either way the values do not depend on which
                # modules this process computed before (ranks agree bitwise with one process)
                advance = cache_k < k and chainable and cache.device == images.device
                start_k, start = (cache_k, cache) if advance else (0, images)
                info = {}
                cache = advance_inputs(feeder, start_k, start, k, cfg.batch_size, ac, dtype,
                                       out_device=torch.device("cpu") if host else None, info=info)
                cache_k, chainable = k, info.get("lossless", False)
        inputs = cache if k > 0 else images
        frozen = precision.frozen_model(m, keep=(name,))
        row = module_criticality(
            frozen, name, inputs, labels, k=k, epsilon_w=cfg.epsilon_w, p=cfg.p,
            num_iterations=cfg.num_iterations, lr=cfg.lr, batch_size=cfg.batch_size, early_stop=cfg.early_stop,
            seed=seed, autocast=ac, fuse_eval=getattr(cfg, "fuse_eval", True),
        )
        row["unit"] = k
        row["cache_bytes"] = int(inputs.numel() * inputs.element_size()) if k else 0
        row["seconds"] = time.time() - t0
        del frozen
        yield name, row


def unit_input_shape(model: nn.Module, k: int, images: torch.Tensor) -> tuple[int, ...]:
    """Per-example shape of the input of unit k, from a one-example forward of units 0..k-1."""
    if k == 0:
        return tuple(images.shape[1:])
    m = unwrap(model)
    with torch.no_grad():
        h = torch.zeros((1, *images.shape[1:]), device=images.device)
        with eval_mode(m):
            for _, _, fn in m.units()[:k]:
                h = fn(h)
    return tuple(h.shape[1:])


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

    path = ctx.layout.adversarial_set
    cfg = ctx.cfg
    if path.is_file():
        data = checkpoint.load(path)
        return data["images"].to(ctx.device), data["labels"].to(ctx.device)
    train = get_dataset(cfg, "train")
    n = min(cfg.mrc.num_examples, len(train))
    g = torch.Generator().manual_seed(stream_seed(cfg.seed, "mrc-examples"))
    chosen = torch.randperm(len(train), generator=g)[:n].sort().values.numpy()
    subset = train.subset(chosen)
    start, stop = ctx.runtime.shard(n)
    a = cfg.mrc.attack
    attack_model = ctx.precision.frozen_model(model)  # eval mode, BatchNorm folded when precision.fold_bn
    chunks = []
    for i in range(start, stop, cfg.data.eval_batch_size):
        j = min(stop, i + cfg.data.eval_batch_size)
        x = torch.from_numpy(subset.images[i:j]).permute(0, 3, 1, 2).float().div(255).to(ctx.device)
        y = torch.from_numpy(subset.labels[i:j]).long().to(ctx.device)
        noise = index_noise(torch.arange(i, j), tuple(x.shape[1:]), stream_seed(cfg.seed, "mrc-noise")).to(ctx.device)
        x_adv = pgd(attack_model, ctx.precision.prepare_input(x), y, a.epsilon, a.step_size, a.num_steps,
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


def plot_table(path: Path, rows: list[dict], names_in_order: list[str], chosen: list[str], caption: str = "") -> dict:
    """Bar chart of MRC per module (RiFT Eq. 2), in network order, the fine-tuned module(s) highlighted.

    Args:
        path: PNG to write.
        rows: the MRC table ({"module", "mrc", ...}).
        names_in_order: module names in network order (x axis).
        chosen: the module(s) RiFT fine-tunes (drawn in orange, named in the legend).
        caption: the settings line under the axes (eps_w, images, data set, model).

    Returns:
        the texts drawn: {"title", "xlabel", "ylabel", "legend": [labels], "caption"} (for tests).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    by = {r["module"]: r for r in rows}
    names = [n for n in names_in_order if n in by]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.42 * len(names)), 5.2))
    ax.bar(range(len(names)), [by[n]["mrc"] for n in names],
           color=["tab:orange" if n in chosen else "tab:blue" for n in names])
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=9)
    top = max([by[n]["mrc"] for n in names] + [1e-12])
    for i, name in enumerate(names):  # a near-zero bar is invisible: mark the chosen module(s) and their labels
        if name in chosen:
            ax.get_xticklabels()[i].set_color("tab:orange")
            ax.get_xticklabels()[i].set_fontweight("bold")
            ax.plot(i, by[name]["mrc"] + 0.03 * top, marker="v", color="tab:orange", markersize=9)
    ax.tick_params(axis="y", labelsize=10)
    ax.set_xlabel("module (network order)", fontsize=11)
    ax.set_ylabel("MRC: increase of the mean\nadversarial cross-entropy (nats)", fontsize=11)
    ax.set_title("Module robust criticality (RiFT Eq. 2)", fontsize=12)
    ax.legend(handles=[Patch(color="tab:orange", label=f"fine-tuned: {', '.join(chosen)} (lowest MRC)"),
                       Patch(color="tab:blue", label="other modules")], fontsize=9, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    if caption:
        fig.text(0.01, 0.01, caption, fontsize=9, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.035 if caption else 0, 1, 1))
    return save_figure(fig, ax, path)


def mrc_caption(cfg, num_images: int) -> str:
    """The settings line of the MRC figure: eps_w, the number of images, the data set and the model."""
    a = cfg.train.attack
    width = f"width {cfg.model.width}" if cfg.model.arch.startswith("resnet") else f"widen {cfg.model.widen_factor}"
    return (f"eps_w = {cfg.mrc.epsilon_w:g} (relative), {cfg.mrc.num_iterations} ascent steps; {num_images} fixed "
            f"adversarial training images (PGD-{a.num_steps}, eps {255 * a.epsilon:g}/255); {cfg.data.dataset}, "
            f"{cfg.model.arch} ({width})")


def check_modules(names: list[str], valid: list[str]) -> None:
    """Refuse module names the model lacks (``mrc.modules``, or an array task's group).

    Raises:
        StageError: naming the unknown modules and listing the valid ones.
    """
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise StageError(f"mrc.modules names unknown module(s) {unknown}; valid modules: {', '.join(valid)}")


def mrc_module_names(cfg) -> list[str]:
    """The modules the MRC stage covers, in network order: ``mrc.modules`` or every Conv2d/Linear.

    Raises:
        StageError: when ``mrc.modules`` names an unknown module (lists the valid ones).
    """
    from rift_dist.models import build_model

    every = module_names(build_model(cfg))
    if not cfg.mrc.modules:
        return every
    check_modules(list(cfg.mrc.modules), every)
    return [n for n in every if n in set(cfg.mrc.modules)]


def log_rows(run_log, rows: list[dict]) -> None:
    """Log each module's ``mrc.<module>`` and ``robust_accuracy_drop.<module>`` to an MLflow run."""
    for r in rows:
        run_log.log_metrics({f"mrc.{r['module']}": r["mrc"],
                             f"robust_accuracy_drop.{r['module']}": r["robust_accuracy_drop"]})


def compute_modules(ctx: StageContext, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    names: list[str], progress_desc: str = "MRC") -> list[dict]:
    """MRC of ``names`` on this process (see :func:`iter_criticality`); results written per module.

    Modules with a result file in ``mrc/modules/`` are read back instead of recomputed, so a
    killed stage resumes with the modules not yet done.  Rows come back in the order of ``names``.
    """
    cfg = ctx.cfg.mrc
    ctx.layout.mrc_modules.mkdir(parents=True, exist_ok=True)
    done = {}
    for name in names:
        result = read_json_piece(ctx.layout.mrc_module(name))
        if result is not None:
            done[name] = result
    todo = [n for n in names if n not in done]
    rows = iter_criticality(model, todo, images, labels, cfg, ctx.precision, seed=ctx.cfg.seed, log=ctx.log)
    if ctx.runtime.world_size == 1:
        rows = ctx.bar(rows, total=len(todo), desc=progress_desc)
    for name, row in rows:
        write_json(ctx.layout.mrc_module(name), row)
        done[name] = row
        # per rank (ranks hold different numbers of modules): a signalled rank stops after this module
        interrupts.check(None, where=f"MRC of module {name} (saved; {len(done)} of {len(names)} on this rank)")
    return [done[n] for n in names]


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
    check_modules(names, all_names)
    images, labels = build_adversarial_set(ctx, model)
    costs = module_costs(model, names, tuple(images.shape[1:]))
    groups = assign_modules(names, costs, ctx.runtime.world_size)
    mine = groups[ctx.runtime.rank]
    ctx.log(f"[mrc] {len(names)} modules, fixed adversarial set of {len(images)} images, "
            f"{ctx.runtime.world_size} rank(s) ({', '.join(str(len(g)) for g in groups)} modules each), "
            f"cache={'on' if cfg.mrc.use_cache else 'off'} ({cfg.mrc.cache_dtype}), "
            f"fused evaluation={'on' if cfg.mrc.fuse_eval else 'off'}, {ctx.precision.describe()}")
    t0 = time.time()
    with ctx.tracker.stage("mrc") as run_log:
        rows_mine = compute_modules(ctx, model, images, labels, mine)
        seconds = time.time() - t0
        gathered = ctx.runtime.all_gather_object((rows_mine, seconds))
        rows = [r for part, _ in gathered for r in part]
        per_rank = [s for _, s in gathered]
        chosen = choose_modules(rows, all_names, cfg.mrc.exclude, cfg.mrc.top_k)
        if ctx.is_main:
            write_table(ctx.layout.mrc_table, rows)
            write_json(ctx.layout.mrc_result, {"rows": rows, "chosen": chosen, "assignment": groups,
                                               "rank_seconds": per_rank})
            plot_table(ctx.layout.mrc_plot, rows, all_names, chosen, mrc_caption(cfg, len(images)))
            log_rows(run_log, rows)
            run_log.log_metrics({"mrc_seconds": seconds})
            run_log.set_tags({"rift.chosen_modules": ",".join(chosen)})
            run_log.log_artifact(ctx.layout.mrc_table)
            run_log.log_artifact(ctx.layout.mrc_plot)
    lowest = ", ".join("%s (%+.3g)" % (r["module"], r["mrc"]) for r in sorted(rows, key=lambda r: r["mrc"])[:3])
    ctx.log(f"[mrc] lowest MRC: {lowest}; chosen: {', '.join(chosen)} ({time.time() - t0:.0f}s)")
    outputs = {"table": str(ctx.layout.mrc_table), "chosen": chosen}
    write_done(ctx, STAGE, outputs)
    ctx.runtime.barrier()
    return outputs

