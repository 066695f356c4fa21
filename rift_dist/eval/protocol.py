"""One evaluator: the attack protocol behind every accuracy a run reports (RiFT §5.1; Croce & Hein 2020, §4).

Training's best-epoch selection, fine-tuning's selection, the interpolation sweep, the corruption sets,
``rift compare`` and the final numbers all go through the same per-batch core and the same accounting:

- :func:`run_attack_sequence` — the per-sample core.  A sample is *robust* only if the
  model classifies it correctly on the clean input and after EVERY attack of a
  sequence; each attack runs only on the samples still robust after the ones
  before it (AutoAttack's protocol).  The verdict is always the model's own
  prediction on the returned image, after that image is projected into the threat
  model (pixels in [0, 1], L-inf distance <= epsilon); an attack that returns a
  point outside it, or NaN, is counted (and the point clamped), never trusted.
- :class:`PGDAttack` (RiFT §5.1: PGD-10, 8/255, step 2/255, worst case over restarts; also PGD-20/50 and
  the CW margin loss), random starts keyed on each sample's global index (:func:`index_noise`), so a result
  does not depend on batching, sharding or resuming.  AutoAttack's attacks: :mod:`rift_dist.eval.autoattack`.
- Two drivers over a data set, sharded across ranks (``shard_bounds``; counts summed with
  ``runtime.all_reduce_sum``, so the result equals a one-process run), sharing :func:`_account`:
  :func:`evaluate_model` (the run's data loader; clean accuracy and PGD robust accuracy, optionally per
  sample) and :func:`evaluate_sequence` (any attack sequence on the arrays, writing every sample's outcome
  to a progress file after each batch, so a killed or preempted evaluation resumes where it stopped).
- :func:`robustness_suite` — every figure of one model for the final table (the paper's PGD, PGD-20/50, the
  margin PGD, AutoAttack, the sanity attacks), judged by :func:`rift_dist.eval.sanity.sanity_checks`.

Units: pixels in [0, 1]; epsilons and step sizes are fractions of that range; accuracies are fractions in
[0, 1].  ``ctx`` arguments are a :class:`rift_dist.stages.context.StageContext` (config, runtime, precision,
progress bars); nothing here imports torch.distributed or the stages.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from rift_dist.attacks import eval_mode, pgd
from rift_dist.config import ConfigError
from rift_dist.parallel.runtime import shard_bounds
from rift_dist.eval.autoattack import AUTOATTACK_STANDARD, autoattack_steps
from rift_dist.eval.sanity import sanity_checks
from rift_dist.seeding import seed_for, stream_seed
from rift_dist.layout import RunLayout

# Per-sample outcome codes in progress files; an outcome k >= 0 means "broken by attack k".
NOT_DONE = -3
"""Outcome code: the sample has not been evaluated yet."""
CLEAN_WRONG = -2
"""Outcome code: misclassified on the clean input (never robust)."""
ROBUST = -1
"""Outcome code: survived every attack of the sequence."""

CORRUPTION_PROTOCOLS = ("standard", "authors", "both")
"""Values of ``eval.corruption_protocol``."""

_VIOLATION_TOL = 1e-5  # float32 rounding of x + epsilon; anything larger is an attack leaving the threat model


# ============================================================================ attacks


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward returns a contiguous gradient (torchattacks' FAB calls ``.view`` on input
    gradients, which fails when channels_last or a permuted input makes them non-contiguous)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _PreparedModel(nn.Module):
    """The model as attacks see it: input layout (channels_last) and autocast applied, float32 logits out.

    Shapes: input float [B, C, H, W], pixels in [0, 1]; output float32 logits [B, K].
    """

    def __init__(self, model: nn.Module, prepare: Callable | None = None, autocast: Callable | None = None):
        super().__init__()
        self.model = model
        self._prepare = prepare or (lambda t: t)
        self._autocast = autocast or contextlib.nullcontext

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            x = _ContiguousGrad.apply(x)
        with self._autocast():
            return self.model(self._prepare(x)).float()


@contextlib.contextmanager
def _frozen_parameters(model: nn.Module):
    """Parameters do not require grad inside the block (attacks differentiate w.r.t. the input only;
    torchattacks' FAB calls ``backward`` and would otherwise fill parameter ``.grad`` fields)."""
    params = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in params:
            p.requires_grad_(flag)


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


def index_noise(indices: torch.Tensor, shape: tuple[int, ...], seed: int, block: int = 256) -> torch.Tensor:
    """Uniform [-1, 1] noise for samples identified by global index, the same whatever the batching.

    Noise of global index i is row ``i % block`` of a tensor drawn from a generator
    seeded by ``(seed, i // block)``, so sharded and single-process evaluations
    use identical random starts.  Returns float32 [len(indices), *shape].
    """
    out = torch.empty((len(indices), *shape))
    idx = indices.cpu().numpy()
    for b in np.unique(idx // block):
        g = torch.Generator().manual_seed(seed_for(seed, int(b)))
        rows = torch.empty((block, *shape)).uniform_(-1, 1, generator=g)
        sel = np.nonzero(idx // block == b)[0]
        out[torch.from_numpy(sel)] = rows[torch.from_numpy(idx[sel] % block)]
    return out


@dataclass
class PGDAttack:
    """L-inf PGD as one attack of a sequence, worst case over ``restarts`` per sample (Madry et al. 2018; RiFT §5.1).

    Random starts are drawn with :func:`index_noise` from each sample's global index and
    ``seed_for(noise_seed, restart)``, so the result does not depend on batching, sharding or resuming;
    :func:`evaluate_model` and :func:`evaluate_sequence` both run this class.

    Attributes:
        epsilon: L-inf radius, fraction of the pixel range (8/255).
        step_size: signed-gradient step (2/255).
        num_steps: PGD steps (10).
        restarts: random restarts; a sample counts as broken if any restart breaks it.
        loss: "ce" (cross-entropy) or "margin" (CW-style, max_{j != y} z_j - z_y).
        noise_seed: seed of the random starts.
        name: label in reports (default e.g. "pgd-10" / "pgd-20-margin").
    """

    epsilon: float = 8 / 255
    step_size: float = 2 / 255
    num_steps: int = 10
    restarts: int = 1
    loss: str = "ce"
    noise_seed: int = 0
    random_start: bool = True
    name: str = ""

    def __post_init__(self):
        if self.restarts < 1:
            raise ValueError(f"PGD restarts must be >= 1, got {self.restarts}")
        if not self.name:
            self.name = f"pgd-{self.num_steps}" + ("" if self.loss == "ce" else f"-{self.loss}")

    @property
    def settings(self) -> dict:
        """The attack's settings as a JSON-able dict (recorded with every result)."""
        return {"attack": "pgd", "norm": "Linf", "epsilon": self.epsilon, "step_size": self.step_size,
                "num_steps": self.num_steps, "restarts": self.restarts, "loss": self.loss,
                "random_start": self.random_start, "seed": self.noise_seed}

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                 seed: int) -> torch.Tensor:
        """Adversarial images float32 [B, C, H, W] for images [B, C, H, W] in [0, 1], int64 labels [B] and
        global sample indices int64 [B] (``seed`` is unused: noise is keyed on the indices)."""
        x_best = images.clone()
        alive = torch.ones(len(labels), dtype=torch.bool, device=labels.device)
        shape = tuple(images.shape[1:])
        for r in range(self.restarts):
            idx = alive.nonzero().flatten()
            if idx.numel() == 0:
                break
            noise = index_noise(indices[idx.cpu()].cpu(), shape, seed_for(self.noise_seed, r)).to(images.device)
            x_adv = pgd(model, images[idx], labels[idx], self.epsilon, self.step_size, self.num_steps,
                        self.random_start, loss=self.loss, noise=noise)
            x_best[idx] = x_adv
            if r + 1 < self.restarts:  # after the last restart the caller's verdict on x_best is the only one needed
                alive[idx[_predict(model, x_adv) != labels[idx]]] = False
        return x_best

# ============================================================================ the per-sample core


def _project(x_adv: torch.Tensor, x: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp ``x_adv`` into [0, 1] and the L-inf ball of radius epsilon around x; NaN/inf -> x.

    Returns (projected float32 [B, C, H, W], bool [B] "was outside the threat model").
    """
    x_adv = x_adv.to(x.dtype)
    finite = torch.isfinite(x_adv)
    x_adv = torch.where(finite, x_adv, x)
    outside = (x_adv - x).flatten(1).abs().amax(1) > epsilon + _VIOLATION_TOL
    outside |= (x_adv.flatten(1).amin(1) < -_VIOLATION_TOL) | (x_adv.flatten(1).amax(1) > 1 + _VIOLATION_TOL)
    outside |= ~finite.flatten(1).all(1)
    x_adv = torch.min(torch.max(x_adv, (x - epsilon).clamp(0, 1)), (x + epsilon).clamp(0, 1))
    return x_adv, outside


def run_attack_sequence(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attacks: Sequence,
                        indices: torch.Tensor | None = None, seed: int = 0, prepare: Callable | None = None,
                        autocast: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample outcome of a sequence of attacks (AutoAttack's worst-case-per-sample protocol).

    Attack k runs only on the samples still robust after attacks 0..k-1; a sample
    is robust only if it survives all of them.  The verdict is the model's
    prediction on the attack's output after projection into the threat model.

    Args:
        model: the classifier (unwrapped); its mode, ``requires_grad`` flags, ``.grad``
            fields and BatchNorm statistics are left as they were.
        images: float [B, C, H, W], pixels in [0, 1]; labels: int64 [B].
        attacks: objects with ``name``, ``epsilon`` and ``__call__(model, images, labels, indices, seed)
            -> adversarial images`` (:class:`PGDAttack`, :class:`TorchattacksAttack`, or any callable
            with those attributes).
        indices: int64 [B] global sample indices (default 0..B-1); seed random starts.
        seed: base seed; attack k on a batch starting at global index i gets ``seed_for(seed, k, i)``.
        prepare, autocast: input layout function and autocast factory of the run's precision.

    Returns:
        (outcome, outside): int8 [B] codes (CLEAN_WRONG, ROBUST, or k = broken by attack k) and
        int64 [B] number of attack outputs that left the threat model (and were clamped).
    """
    if indices is None:
        indices = torch.arange(len(labels))
    net = _PreparedModel(model, prepare, autocast)
    outcome = torch.full((len(labels),), ROBUST, dtype=torch.int8, device=labels.device)
    outside = torch.zeros(len(labels), dtype=torch.int64, device=labels.device)
    first = int(indices.min()) if len(indices) else 0
    with eval_mode(net), _frozen_parameters(model):
        outcome[_predict(net, images) != labels] = CLEAN_WRONG
        for k, attack in enumerate(attacks):
            idx = (outcome == ROBUST).nonzero().flatten()
            if idx.numel() == 0:
                break
            x = images[idx]
            x_adv = attack(net, x, labels[idx], indices[idx.cpu()], seed_for(seed, k, first))
            x_adv, bad = _project(x_adv, x, attack.epsilon)
            outside[idx] += bad.to(torch.int64)
            outcome[idx[_predict(net, x_adv) != labels[idx]]] = k
    return outcome, outside


# ============================================================================ accounting


def _account(runtime, outcome: np.ndarray, outside: np.ndarray, resumed: int, attacks: Sequence) -> dict:
    """Counts of this rank's outcomes summed over ranks, as fractions: the one accounting of both drivers.

    Args:
        runtime: the run's runtime (``all_reduce_sum``; a collective: every rank calls it).
        outcome: int8 [n] outcome codes of this rank's samples (CLEAN_WRONG, ROBUST or k = broken by attack k).
        outside: int64 [n] threat-model violations of those samples; resumed: how many came from progress files.
        attacks: the sequence (names and settings label the per-attack rows).

    Returns:
        {"clean_accuracy", "robust_accuracy", "num_examples", "attacks": [{"name", "settings", "broken",
        "robust_after"}], "threat_model_violations", "resumed_examples"}; fractions of every rank's samples.
    """
    k = len(attacks)
    counts = torch.zeros(5 + k, dtype=torch.float64)
    counts[0] = len(outcome)
    counts[1] = float((outcome != CLEAN_WRONG).sum())
    counts[2] = float((outcome == ROBUST).sum())
    counts[3] = float(outside.sum())
    counts[4] = resumed
    for j in range(k):
        counts[5 + j] = float((outcome == j).sum())
    runtime.all_reduce_sum(counts)
    total = max(counts[0].item(), 1.0)
    clean = counts[1].item()
    rows, left = [], clean
    for j, a in enumerate(attacks):
        left -= counts[5 + j].item()
        rows.append({"name": a.name, "settings": getattr(a, "settings", {}), "broken": counts[5 + j].item() / total,
                     "robust_after": left / total})
    return {"clean_accuracy": clean / total, "robust_accuracy": counts[2].item() / total,
            "num_examples": int(counts[0].item()), "attacks": rows,
            "threat_model_violations": int(counts[3].item()), "resumed_examples": int(counts[4].item())}


# ============================================================================ driver 1: the run's data loader


def evaluate_model(
    ctx,
    model: nn.Module,
    dataset,
    attack,
    restarts: int = 1,
    seed: int = 0,
    desc: str = "eval",
    loss: str = "ce",
    in_memory: bool = False,
    per_sample: bool = False,
) -> dict[str, float]:
    """Clean (and PGD robust) accuracy of ``model`` on ``dataset`` (an ArrayDataset), sharded across ranks.

    The selection of training and fine-tuning, the interpolation sweep, the corruption sets and
    ``rift compare`` use it.  Each rank reads its contiguous shard through the run's eval loader, in a fixed
    order; every batch goes through :func:`run_attack_sequence` with one :class:`PGDAttack` (or none, for
    clean accuracy only) and the counts through :func:`_account`, the code path of the final numbers, so
    the result equals a one-process evaluation and :func:`evaluate_sequence` with the same attack exactly.
    Random starts come from :func:`index_noise` keyed on each sample's global index and
    ``seed_for(seed, restart)``.  A sample is robust only if it survives every restart.

    Args:
        ctx: the stage context.
        model: the classifier (unwrapped) on ``ctx.device``; evaluated as ``ctx.precision.frozen_model(model)``.
        dataset: an ArrayDataset (uint8 [N, H, W, 3], int64 labels).
        attack: an ``AttackConfig`` (epsilon, step_size, num_steps, random_start) or None for clean accuracy.
        restarts: PGD restarts (worst case per sample); seed: base seed of the random starts.
        loss: "ce" or "margin".
        in_memory: read the arrays directly (torch loader) instead of through FFCV, which would first
            write a .beton file: right for one-off sets such as the 75 corruption sets.
        per_sample: also return which samples were right, in dataset order, gathered from every rank
            (for paired statistics: ``rift compare``'s per-image paired differences).

    Returns:
        {"clean_accuracy", "robust_accuracy" (when attack is given), "num_examples"}; fractions in [0, 1].
        With ``per_sample``: also "clean_correct" (and "robust_correct"), bool numpy arrays [len(dataset)].
    """
    from rift_dist.data.loaders import build_loader, build_torch_loader

    make = build_torch_loader if in_memory else build_loader
    loader = make(ctx.cfg, "eval", ctx.runtime.rank, ctx.runtime.world_size, train=False,
                  dataset=dataset, device=ctx.device)
    attacks = [] if attack is None else [PGDAttack(attack.epsilon, attack.step_size, attack.num_steps, restarts,
                                                   loss, seed, attack.random_start)]
    start, _ = shard_bounds(len(dataset), ctx.runtime.rank, ctx.runtime.world_size)
    offset = start
    outcomes, violations = [], []
    prep, ac = ctx.precision.prepare_input, ctx.precision.autocast
    model = ctx.precision.frozen_model(model)  # eval mode; BatchNorm folded when precision.fold_bn (a copy)
    for images, labels in ctx.bar(loader, total=len(loader), desc=desc):
        images, labels = images.to(ctx.device), labels.to(ctx.device)
        n = labels.numel()
        out, bad = run_attack_sequence(model, images, labels, attacks, torch.arange(offset, offset + n), seed,
                                       prep, ac)
        outcomes.append(out.cpu().numpy())
        violations.append(bad.cpu().numpy())
        offset += n
    outcome = np.concatenate(outcomes) if outcomes else np.zeros(0, dtype=np.int8)
    outside = np.concatenate(violations) if violations else np.zeros(0, dtype=np.int64)
    res = _account(ctx.runtime, outcome, outside, 0, attacks)
    out = {"clean_accuracy": res["clean_accuracy"], "num_examples": res["num_examples"]}
    if attack is not None:
        out["robust_accuracy"] = res["robust_accuracy"]
    if per_sample:
        correct = torch.zeros((2, len(dataset)), dtype=torch.float64)
        correct[0, start:offset] = torch.from_numpy(outcome != CLEAN_WRONG).double()
        correct[1, start:offset] = torch.from_numpy(outcome == ROBUST).double()
        ctx.runtime.all_reduce_sum(correct)  # each rank filled its own shard; the sum is the whole set
        out["clean_correct"] = correct[0].numpy() > 0.5
        if attack is not None:
            out["robust_correct"] = correct[1].numpy() > 0.5
    return out


# ============================================================================ driver 2: resumable, any sequence


def state_fingerprint(model: nn.Module) -> str:
    """SHA-1 of a model's state dict (names, dtypes, shapes, bytes): identifies the weights a progress file belongs to."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dataset_fingerprint(dataset) -> str:
    """SHA-1 of an ArrayDataset's images and labels."""
    h = hashlib.sha1()
    h.update(np.ascontiguousarray(dataset.labels).tobytes())
    h.update(np.ascontiguousarray(dataset.images).tobytes())
    return h.hexdigest()


class ProgressFile:
    """Per-sample outcomes of one evaluation, saved by every rank after every batch (atomic rename).

    Each rank writes ``<directory>/<name>.rank<r>.npz`` holding the outcome of EVERY sample it
    knows about (int8 [N], ``NOT_DONE`` for the rest), the threat-model violations (int64 [N]) and
    the evaluation's signature (model and data fingerprints, attack settings).  Loading merges all
    rank files with the same signature, so a resumed run may use a different number of ranks;
    files with another signature (other weights, data or settings) are ignored and overwritten.
    """

    def __init__(self, directory: str | Path, name: str, signature: dict, n: int, rank: int = 0):
        self.directory = Path(directory)
        self.name = name
        self.signature = json.dumps(signature, sort_keys=True, default=str)
        self.n = n
        self.path = self.directory / f"{name}.rank{rank}.npz"

    def load(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(outcome int8 [N], outside int64 [N], notes): merged progress of every matching rank file."""
        outcome = np.full(self.n, NOT_DONE, dtype=np.int8)
        outside = np.zeros(self.n, dtype=np.int64)
        notes = []
        if not self.directory.is_dir():
            return outcome, outside, notes
        for path in sorted(self.directory.glob(f"{self.name}.rank*.npz")):
            try:
                with np.load(path, allow_pickle=False) as data:
                    if str(data["signature"]) != self.signature or data["outcome"].shape != (self.n,):
                        notes.append(f"ignored {path.name}: made for other weights, data or settings")
                        continue
                    got, viol = data["outcome"], data["outside"]
            except Exception as exc:  # a file cut by a kill between write and rename cannot exist; be safe
                notes.append(f"ignored unreadable {path.name}: {type(exc).__name__}")
                continue
            done = got != NOT_DONE
            outcome[done] = got[done]
            outside[done] = viol[done]
        return outcome, outside, notes

    def save(self, outcome: np.ndarray, outside: np.ndarray) -> None:
        """Write this rank's file atomically (temporary file in the same directory, then rename)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, outcome=outcome, outside=outside, signature=np.array(self.signature))
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _batch_tensors(dataset, idx: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [b, 3, H, W] images in [0, 1] (uint8 / 255, as the loaders do) and int64 labels of ``idx``."""
    images = torch.from_numpy(np.ascontiguousarray(dataset.images[idx])).to(device)
    labels = torch.from_numpy(np.asarray(dataset.labels[idx], dtype=np.int64)).to(device)
    return images.permute(0, 3, 1, 2).float().div_(255.0).contiguous(), labels


def evaluate_sequence(ctx, model: nn.Module, dataset, attacks: Sequence, name: str, seed: int = 0,
                      progress_dir: str | Path | None = None, desc: str = "",
                      on_batch: Callable[[int], None] | None = None) -> dict:
    """Robust accuracy of ``model`` on ``dataset`` under a sequence of attacks, sharded, resumable.

    Each rank takes its contiguous shard (:func:`rift_dist.parallel.runtime.shard_bounds`), skips the samples whose outcome
    the progress files already hold, attacks the rest in batches of ``data.eval_batch_size``
    with :func:`run_attack_sequence`, and saves its progress after every batch.  Counts are
    summed over ranks with ``ctx.runtime.all_reduce_sum``, so the result equals a one-process run.

    Args:
        ctx: the stage context (runtime, precision, config, progress bars).
        model: the unwrapped classifier on ``ctx.device``.
        dataset: an ArrayDataset (uint8 [N, H, W, 3], int64 labels).
        attacks: the sequence (see :func:`run_attack_sequence`).
        name: the evaluation's name; names the progress files.
        seed: base seed of the attacks.
        progress_dir: where progress files go (None = no progress files, nothing resumes).
        on_batch: called with the number of batches done after each saved batch (tests simulate kills with it).

    Returns:
        {"name", "clean_accuracy", "robust_accuracy", "num_examples", "attacks": [{"name", "settings",
        "broken", "robust_after"}], "threat_model_violations", "resumed_examples", "seconds"}; fractions of
        the evaluated samples.
    """
    t0 = time.time()
    rt = ctx.runtime
    n = len(dataset)
    start, stop = shard_bounds(n, rt.rank, rt.world_size)
    store = None
    outcome = np.full(n, NOT_DONE, dtype=np.int8)
    outside = np.zeros(n, dtype=np.int64)
    if progress_dir is not None:
        signature = {"name": name, "n": n, "seed": seed, "model": state_fingerprint(model),
                     "data": dataset_fingerprint(dataset),
                     "attacks": [{"name": a.name, **getattr(a, "settings", {})} for a in attacks]}
        store = ProgressFile(progress_dir, name, signature, n, rt.rank)
        if ctx.cfg.eval.resume:
            outcome, outside, notes = store.load()
            for note in notes:
                ctx.log(f"[evaluate] {note}")
        rt.barrier()  # every rank has read the old files before any rank rewrites its own
    resumed = int((outcome[start:stop] != NOT_DONE).sum())
    todo = np.arange(start, stop)[outcome[start:stop] == NOT_DONE]
    bs = max(1, ctx.cfg.data.eval_batch_size)
    batches = [todo[i:i + bs] for i in range(0, len(todo), bs)]
    prep, ac = ctx.precision.prepare_input, ctx.precision.autocast
    attacked = ctx.precision.frozen_model(model) if batches else model  # BatchNorm folded when precision.fold_bn
    for b, idx in enumerate(ctx.bar(batches, total=len(batches), desc=desc or name)):
        images, labels = _batch_tensors(dataset, idx, ctx.device)
        out, bad = run_attack_sequence(attacked, images, labels, attacks, torch.from_numpy(idx), seed, prep, ac)
        outcome[idx] = out.cpu().numpy()
        outside[idx] = bad.cpu().numpy()
        if store is not None:
            store.save(outcome, outside)
        if on_batch is not None:
            on_batch(b + 1)
    mine = outcome[start:stop]
    res = _account(rt, mine, outside[start:stop], resumed, attacks)
    return {"name": name, **res, "seconds": time.time() - t0}


# ============================================================================ the suite


def validate_eval_config(cfg) -> None:
    """Check the ``eval`` fields that the config module does not constrain.

    Raises:
        ConfigError: naming the key, the bad value and the valid choices.
    """
    e = cfg.eval
    if e.corruption_protocol not in CORRUPTION_PROTOCOLS:
        raise ConfigError(f"'eval.corruption_protocol' is {e.corruption_protocol!r}; choose one of "
                          f"{', '.join(CORRUPTION_PROTOCOLS)}")
    bad = [a for a in e.autoattack_attacks if a not in AUTOATTACK_STANDARD]
    if bad:
        raise ConfigError(f"'eval.autoattack_attacks' has unknown attack(s) {bad}; choose from "
                          f"{', '.join(AUTOATTACK_STANDARD)}")
    for key in ("autoattack_steps", "autoattack_queries", "extra_restarts", "restarts"):
        if getattr(e, key) < 1:
            raise ConfigError(f"'eval.{key}' must be >= 1, got {getattr(e, key)}")
    if any(s < 1 for s in e.extra_pgd_steps) or e.margin_pgd_steps < 0 or e.n_examples < 0:
        raise ConfigError("'eval.extra_pgd_steps' must be >= 1 each, 'eval.margin_pgd_steps' and "
                          "'eval.n_examples' >= 0")
    if any(x < 0 for x in e.sanity_epsilons):
        raise ConfigError(f"'eval.sanity_epsilons' must be >= 0, got {e.sanity_epsilons}")


def _num_classes(model: nn.Module, dataset) -> int:
    classes = getattr(dataset, "classes", None)
    out = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            out = m.out_features
    return out or len(classes)


def main_pgd(cfg) -> PGDAttack:
    """The paper's PGD (RiFT §5.1): ``eval.attack`` with ``eval.restarts`` restarts, noise seed ``stream_seed(cfg.seed, "eval-pgd")``
    (the same random starts as the evaluation stage's ``evaluate_model``)."""
    a = cfg.eval.attack
    return PGDAttack(a.epsilon, a.step_size, a.num_steps, cfg.eval.restarts, "ce", stream_seed(cfg.seed, "eval-pgd"), a.random_start,
                     name=f"pgd-{a.num_steps}")


def autoattack_accuracy(ctx, model: nn.Module, test_dataset, label: str,
                        progress_dir: str | Path | None = None) -> dict:
    """Standard AutoAttack robust accuracy (Croce & Hein 2020) of ``model`` on ``test_dataset``, resumable.

    Epsilon is ``eval.attack.epsilon`` (8/255).  Progress goes to ``<run_dir>/evaluate/progress``
    unless ``progress_dir`` says otherwise.

    Returns:
        :func:`evaluate_sequence`'s dict ("robust_accuracy", "attacks" with the accuracy after each
        attack, ...) plus "notes" (attacks skipped) and "seed".
    """
    cfg = ctx.cfg
    attacks, notes = autoattack_steps(cfg.eval.attack.epsilon, _num_classes(model, test_dataset),
                                      cfg.eval.autoattack_attacks, cfg.eval.autoattack_steps,
                                      cfg.eval.autoattack_queries)
    progress_dir = progress_dir if progress_dir is not None else RunLayout(ctx.run_dir).evaluation_progress
    res = evaluate_sequence(ctx, model, test_dataset, attacks, f"{label}-autoattack", cfg.eval.autoattack_seed,
                            progress_dir, desc=f"{label} AutoAttack")
    res["notes"] = notes
    res["seed"] = cfg.eval.autoattack_seed
    return res


def robustness_suite(ctx, model: nn.Module, dataset, label: str,
                     progress_dir: str | Path | None = None) -> dict:
    """Every robustness figure of one model, with settings and sanity checks (RiFT §5.1; Croce & Hein 2020).

    Runs, each resumable: the paper's PGD (``eval.attack``, worst of ``eval.restarts``); PGD with
    ``eval.extra_pgd_steps`` and the margin-loss PGD; AutoAttack when ``eval.autoattack``; and with
    ``eval.sanity_checks`` PGD at epsilon 0 and at ``eval.sanity_epsilons``, plus a Square check
    when AutoAttack is off.  Then :func:`sanity_checks`.

    Returns:
        {"clean_accuracy", "robust_accuracy" (the paper's PGD), "num_examples", "pgd": {name: result},
        "autoattack": result or None, "autoattack_accuracy" (when run), "epsilon_sweep", "sanity"}.
    """
    cfg = ctx.cfg
    e = cfg.eval
    a = e.attack
    progress_dir = progress_dir if progress_dir is not None else RunLayout(ctx.run_dir).evaluation_progress

    def run(attacks, key, seed, data=dataset):
        return evaluate_sequence(ctx, model, data, attacks, f"{label}-{key}", seed, progress_dir,
                                 desc=f"{label} {key}")

    main = run([main_pgd(cfg)], "pgd-main", stream_seed(cfg.seed, "eval-pgd"))
    out: dict[str, Any] = {"clean_accuracy": main["clean_accuracy"], "robust_accuracy": main["robust_accuracy"],
                           "num_examples": main["num_examples"], "pgd": {main_pgd(cfg).name: main}}
    extra = [PGDAttack(a.epsilon, a.step_size, s, e.extra_restarts, "ce", stream_seed(cfg.seed, "eval-pgd-extra", s))
             for s in dict.fromkeys(e.extra_pgd_steps) if s != a.num_steps]  # the paper's PGD is already there
    if e.margin_pgd_steps:
        extra.append(PGDAttack(a.epsilon, a.step_size, e.margin_pgd_steps, e.extra_restarts, "margin",
                               stream_seed(cfg.seed, "eval-margin")))
    for atk in extra:
        out["pgd"][atk.name] = run([atk], atk.name, atk.noise_seed)
    aa = None
    if e.autoattack:
        aa = autoattack_accuracy(ctx, model, dataset, label, progress_dir)
        out["autoattack"] = aa
        out["autoattack_accuracy"] = aa["robust_accuracy"]
    if not e.sanity_checks:
        return out
    sweep = [(a.epsilon, main["robust_accuracy"])]
    for eps in e.sanity_epsilons:
        atk = PGDAttack(eps, eps / 4, a.num_steps, e.extra_restarts, "ce", stream_seed(cfg.seed, "sanity-epsilon-sweep"),
                        name=f"pgd-{a.num_steps}-eps{255 * eps:g}")
        sweep.append((eps, run([atk], f"sweep-{255 * eps:g}", stream_seed(cfg.seed, "sanity-epsilon-sweep"))["robust_accuracy"]))
    zero = run([PGDAttack(0.0, 0.0, 1, 1, "ce", stream_seed(cfg.seed, "sanity-eps0"), name="pgd-eps0")], "eps0",
               stream_seed(cfg.seed, "sanity-eps0"))
    out["epsilon_sweep"] = [{"epsilon": eps, "robust_accuracy": acc} for eps, acc in sorted(sweep)]
    square_gain, source = None, ""
    if aa is not None and aa["attacks"] and aa["attacks"][-1]["name"] == "square" and len(aa["attacks"]) > 1:
        square_gain = aa["attacks"][-1]["broken"]
        source = "AutoAttack's Square after APGD/FAB"
    elif e.sanity_examples:
        n = min(e.sanity_examples, len(dataset))
        sub = dataset if n == len(dataset) else dataset.subset(np.arange(n))
        sq, _ = autoattack_steps(a.epsilon, _num_classes(model, dataset), ["square"], queries=e.sanity_square_queries)
        res = run([PGDAttack(a.epsilon, a.step_size, a.num_steps, 1, "ce", stream_seed(cfg.seed, "sanity-square")), *sq], "square-check",
                  stream_seed(cfg.seed, "sanity-square"), data=sub)
        out["square_check"] = res
        square_gain = res["attacks"][-1]["broken"]
        source = f"Square ({e.sanity_square_queries} queries) after PGD-{a.num_steps}, first {n} images"
    robust = {name: r["robust_accuracy"] for name, r in out["pgd"].items()}
    if aa is not None:
        robust["autoattack"] = aa["robust_accuracy"]
    violations = sum(r["threat_model_violations"] for r in out["pgd"].values()) + (
        aa["threat_model_violations"] if aa else 0) + zero["threat_model_violations"]
    figures = {"clean_accuracy": main["clean_accuracy"], "robust": robust, "epsilon_sweep": sweep,
               "epsilon0_accuracy": zero["robust_accuracy"], "square_gain": square_gain, "square_source": source,
               "autoattack_accuracy": aa["robust_accuracy"] if aa else None,
               "pgd_accuracy": main["robust_accuracy"], "violations": violations,
               "margin_accuracy": next((r["robust_accuracy"] for name, r in out["pgd"].items()
                                        if name.endswith("-margin")), None)}
    out["sanity"] = sanity_checks(figures, e.sanity_tolerance, e.sanity_square_margin)
    return out

