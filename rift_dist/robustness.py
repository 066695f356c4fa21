"""Evaluation a reviewer can trust: AutoAttack, the paper's PGD protocol, resumable and sharded, with checks.

What is here
------------
- :func:`run_attack_sequence` — the per-sample core.  A sample is *robust* only if the
  model classifies it correctly on the clean input and after EVERY attack of a
  sequence; each attack runs only on the samples still robust after the ones
  before it (AutoAttack's protocol, Croce & Hein 2020, §4).  The verdict is
  always the model's own prediction on the returned image, after that image is
  projected into the threat model (pixels in [0, 1], L-inf distance <= epsilon);
  an attack that returns a point outside it, or NaN, is counted (and the point
  clamped), never trusted.
- Attacks: :class:`PGDAttack` (RiFT §5.1: PGD-10, 8/255, step 2/255, worst case
  over restarts; also PGD-20/50 and the CW margin loss) and the four attacks of
  standard AutoAttack through torchattacks' own classes (:func:`autoattack_steps`:
  APGD-CE, APGD-T, FAB-T, Square, 100 iterations / 5000 queries, min(9, K - 1)
  target classes, an explicit seed).
- :func:`evaluate_sequence` — runs a sequence over a data set, sharded across
  ranks (``shard_bounds``; counts summed with ``ctx.runtime.all_reduce_sum``),
  writing every sample's outcome to a progress file after each batch, so a
  killed or preempted evaluation resumes where it stopped.
- :func:`sanity_checks` — checks against false robustness (Carlini et al. 2019,
  "On evaluating adversarial robustness", §5; Croce & Hein 2020 §5): robust <=
  clean accuracy; robust accuracy falls as epsilon grows; epsilon 0 gives the
  clean accuracy; the gradient-free Square attack does not beat the gradient
  attacks by a wide margin; every attack stays inside the threat model.
- :func:`robustness_suite` (used by the evaluation stage), :func:`autoattack_accuracy`
  and :func:`evaluate_checkpoint` (``rift evaluate CONFIG --checkpoint PATH``).

Units: pixels in [0, 1]; epsilons and step sizes are fractions of that range;
accuracies are fractions in [0, 1].  Stage code never imports torch.distributed.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
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
from rift_dist.distributed import seed_for, stream_seed
from rift_dist.stages.common import StageContext, fmt_pct, index_noise, shard_bounds

# Per-sample outcome codes in progress files; an outcome k >= 0 means "broken by attack k".
NOT_DONE = -3
"""Outcome code: the sample has not been evaluated yet."""
CLEAN_WRONG = -2
"""Outcome code: misclassified on the clean input (never robust)."""
ROBUST = -1
"""Outcome code: survived every attack of the sequence."""

AUTOATTACK_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
"""The four attacks of standard AutoAttack, in order (Croce & Hein 2020)."""
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


@dataclass
class PGDAttack:
    """L-inf PGD as one attack of a sequence, worst case over ``restarts`` per sample (Madry et al. 2018; RiFT §5.1).

    Random starts are drawn with :func:`rift_dist.stages.common.index_noise` from each sample's
    global index and ``seed_for(noise_seed, restart)``, exactly as ``evaluate_model`` does, so the
    result does not depend on batching, sharding or resuming, and equals ``evaluate_model``'s.

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
            alive[idx[_predict(model, x_adv) != labels[idx]]] = False
        return x_best


class TorchattacksAttack:
    """One torchattacks attack as a step of a sequence, seeded and side-effect free.

    torchattacks re-seeds the GLOBAL torch RNG inside every call and seeds from the
    clock when given no seed; here each call gets an explicit seed derived from the
    run's seed, the attack's position and the batch's first global index, and the
    global RNG state is restored afterwards.  The model's mode (every submodule's),
    parameters' ``requires_grad`` and ``.grad`` are left as they were (the caller
    wraps the call in eval mode with frozen parameters; torchattacks alone would
    call ``model.train()`` afterwards, flattening a mixed mode).

    Args:
        name: label in reports ("apgd-ce", ...).
        build: ``build(model) -> torchattacks.Attack`` for a float32-logit model.
        epsilon: the attack's L-inf radius (used to check its output).
        settings: JSON-able settings recorded with the result.
    """

    def __init__(self, name: str, build: Callable[[nn.Module], Any], epsilon: float, settings: dict):
        self.name = name
        self.build = build
        self.epsilon = epsilon
        self.settings = settings
        self._cache: tuple[nn.Module, Any] | None = None

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                 seed: int) -> torch.Tensor:
        """Adversarial images float32 [B, C, H, W] in [0, 1] (see :func:`run_attack_sequence` for the arguments)."""
        if self._cache is None or self._cache[0] is not model:
            self._cache = (model, self.build(model))
        attack = self._cache[1]
        attack.seed = int(seed)
        devices = [images.device.index or 0] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return attack(images.contiguous(), labels).detach().float()


def autoattack_steps(epsilon: float, num_classes: int, names: Sequence[str] = AUTOATTACK_STANDARD,
                     steps: int = 100, queries: int = 5000) -> tuple[list, list[str]]:
    """The attacks of standard AutoAttack as torchattacks instances (Croce & Hein 2020, §4 and their code).

    APGD-CE (cross-entropy, 1 restart), APGD-T (targeted DLR loss), FAB-T (targeted), each
    ``steps`` iterations (100), and Square (``queries`` queries, 5000; margin loss, p_init 0.8).
    The targeted attacks use min(9, K - 1) target classes, so models with few classes work.
    torchattacks' own ``AutoAttack`` class is not used: it runs 10 iterations, not 100.

    Args:
        epsilon: L-inf radius, fraction of the pixel range (8/255).
        num_classes: K, the number of model outputs.
        names: which of apgd-ce, apgd-t, fab-t, square to run, in order.

    Returns:
        (attacks, notes): the attack objects and notes about skipped ones (APGD-T's DLR loss
        needs K >= 4; it is skipped, with a note, for fewer classes).

    Raises:
        ConfigError: for an unknown attack name.
        ImportError: when torchattacks is not installed (names the package to install).
    """
    try:
        import torchattacks
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ImportError("AutoAttack needs the torchattacks package: pip install 'torchattacks>=3.3'") from exc
    targets = max(1, min(9, num_classes - 1))
    attacks, notes = [], []
    for name in names:
        if name == "apgd-ce":
            s = {"attack": "APGD", "loss": "ce", "steps": steps, "n_restarts": 1, "rho": 0.75, "eot_iter": 1}
            build = lambda m, s=s: torchattacks.APGD(m, norm="Linf", eps=epsilon, steps=s["steps"], n_restarts=1,
                                                     loss="ce", rho=0.75, eot_iter=1)
        elif name == "apgd-t":
            if num_classes < 4:
                notes.append(f"apgd-t skipped: its DLR loss needs at least 4 classes, the model has {num_classes}")
                continue
            s = {"attack": "APGD-T", "loss": "dlr-targeted", "steps": steps, "n_restarts": 1,
                 "n_target_classes": targets, "rho": 0.75}
            build = lambda m, s=s: torchattacks.APGDT(m, norm="Linf", eps=epsilon, steps=s["steps"], n_restarts=1,
                                                      n_classes=targets + 1, rho=0.75, eot_iter=1)
        elif name == "fab-t":
            s = {"attack": "FAB-T", "steps": steps, "n_restarts": 1, "n_target_classes": targets,
                 "alpha_max": 0.1, "eta": 1.05, "beta": 0.9}
            build = lambda m, s=s: torchattacks.FAB(m, norm="Linf", eps=epsilon, steps=s["steps"], n_restarts=1,
                                                    multi_targeted=True, n_classes=targets + 1, alpha_max=0.1,
                                                    eta=1.05, beta=0.9)
        elif name == "square":
            s = {"attack": "Square", "n_queries": queries, "n_restarts": 1, "p_init": 0.8, "loss": "margin"}
            build = lambda m, s=s: torchattacks.Square(m, norm="Linf", eps=epsilon, n_queries=s["n_queries"],
                                                       n_restarts=1, p_init=0.8, loss="margin", resc_schedule=True)
        else:
            raise ConfigError(f"unknown AutoAttack attack {name!r} in eval.autoattack_attacks; "
                              f"choose from {', '.join(AUTOATTACK_STANDARD)}")
        s = {**s, "norm": "Linf", "epsilon": epsilon, "library": f"torchattacks {torchattacks.__version__}"}
        attacks.append(TorchattacksAttack(name, build, epsilon, s))
    return attacks, notes


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


# ============================================================================ progress files


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


def evaluate_sequence(ctx: StageContext, model: nn.Module, dataset, attacks: Sequence, name: str, seed: int = 0,
                      progress_dir: str | Path | None = None, desc: str = "",
                      on_batch: Callable[[int], None] | None = None) -> dict:
    """Robust accuracy of ``model`` on ``dataset`` under a sequence of attacks, sharded, resumable.

    Each rank takes its contiguous shard (``shard_bounds``), skips the samples whose outcome
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
    k = len(attacks)
    counts = torch.zeros(5 + k, dtype=torch.float64)
    counts[0] = len(mine)
    counts[1] = float((mine != CLEAN_WRONG).sum())
    counts[2] = float((mine == ROBUST).sum())
    counts[3] = float(outside[start:stop].sum())
    counts[4] = resumed
    for j in range(k):
        counts[5 + j] = float((mine == j).sum())
    rt.all_reduce_sum(counts)
    total = max(counts[0].item(), 1.0)
    clean = counts[1].item()
    rows, left = [], clean
    for j, a in enumerate(attacks):
        left -= counts[5 + j].item()
        rows.append({"name": a.name, "settings": getattr(a, "settings", {}), "broken": counts[5 + j].item() / total,
                     "robust_after": left / total})
    return {"name": name, "clean_accuracy": clean / total, "robust_accuracy": counts[2].item() / total,
            "num_examples": int(counts[0].item()), "attacks": rows,
            "threat_model_violations": int(counts[3].item()), "resumed_examples": int(counts[4].item()),
            "seconds": time.time() - t0}


# ============================================================================ sanity checks


def _pct(x: float | None) -> str:
    return fmt_pct(x) + ("%" if x is not None else "")


def sanity_checks(figures: dict, tolerance: float = 0.005, square_margin: float = 0.02, loss_gap: float = 0.02) -> dict:
    """Checks against false robustness on already measured figures (Carlini et al. 2019 §5; Croce & Hein 2020 §5).

    Args:
        figures: {"clean_accuracy": float, "robust": {attack name: robust accuracy},
            "epsilon_sweep": [(epsilon, robust accuracy), ...] (PGD, including the main epsilon),
            "epsilon0_accuracy": float or None, "square_gain": float or None (fraction of samples
            that Square broke after the gradient attacks failed on them), "square_source": str,
            "autoattack_accuracy": float or None, "pgd_accuracy": float, "violations": int,
            "margin_accuracy": float or None (PGD with the CW margin loss)}.
        tolerance: slack of the monotonicity and AutoAttack-vs-PGD checks (fraction of samples).
        square_margin: the most Square may add over the gradient attacks before masking is flagged.
        loss_gap: the most the margin-loss PGD may fall below the cross-entropy PGD before the
            cross-entropy attack is flagged as weak (a gap means the CE gradients are uninformative,
            e.g. saturated softmax; Carlini & Wagner 2017 §V, Croce & Hein 2020 §3).

    Returns:
        {"passed": bool, "failed": [names], "checks": [{"name", "passed" (True/False/None = not run),
        "detail"}]}.
    """
    checks = []
    fmt_pct = _pct

    def add(name: str, passed, detail: str):
        checks.append({"name": name, "passed": passed, "detail": detail})

    clean = figures["clean_accuracy"]
    over = {k: v for k, v in figures.get("robust", {}).items() if v > clean + 1e-12}
    add("robust_le_clean", not over,
        "every robust accuracy <= clean accuracy " + fmt_pct(clean) if not over else
        "robust accuracy above clean accuracy " + fmt_pct(clean) + ": " +
        ", ".join(f"{k} {fmt_pct(v)}" for k, v in over.items()))

    sweep = sorted(figures.get("epsilon_sweep", []))
    if len(sweep) >= 2:
        rises = [(e1, a1, e2, a2) for (e1, a1), (e2, a2) in zip(sweep, sweep[1:]) if a2 > a1 + tolerance]
        text = ", ".join(f"{255 * e:g}/255: {fmt_pct(a)}" for e, a in sweep)
        add("falls_with_epsilon", not rises,
            f"PGD robust accuracy by epsilon: {text}" + (" — rises with epsilon" if rises else ""))
        e_max, a_max = sweep[-1]
        broke = a_max < clean or clean == 0
        add("largest_epsilon_breaks", broke,
            f"at {255 * e_max:g}/255 the attack breaks {fmt_pct(clean - a_max)} of the samples"
            + ("" if broke else " — nothing; the attack is not working (gradient masking?)"))
    else:
        add("falls_with_epsilon", None, "not run (eval.sanity_epsilons is empty)")

    e0 = figures.get("epsilon0_accuracy")
    if e0 is None:
        add("epsilon0_equals_clean", None, "not run")
    else:
        add("epsilon0_equals_clean", abs(e0 - clean) < 1e-12,
            f"accuracy at epsilon 0: {fmt_pct(e0)}, clean: {fmt_pct(clean)}"
            + ("" if abs(e0 - clean) < 1e-12 else " — the model is not deterministic, or the attack moves the input"))

    gain = figures.get("square_gain")
    if gain is None:
        add("square_not_better_than_gradients", None, "not run")
    else:
        ok = gain <= square_margin
        add("square_not_better_than_gradients", ok,
            f"Square broke {fmt_pct(gain)} of the samples after the gradient attacks "
            f"({figures.get('square_source', '')}; limit {fmt_pct(square_margin)})"
            + ("" if ok else " — gradient-free beats gradient attacks: gradients are masked or broken"))

    aa, pgd_acc = figures.get("autoattack_accuracy"), figures.get("pgd_accuracy")
    if aa is not None and pgd_acc is not None:
        ok = aa <= pgd_acc + tolerance
        add("autoattack_le_pgd", ok, f"AutoAttack {fmt_pct(aa)} vs PGD {fmt_pct(pgd_acc)}"
            + ("" if ok else " — AutoAttack weaker than PGD: check the attack settings"))

    margin_acc, pgd_acc = figures.get("margin_accuracy"), figures.get("pgd_accuracy")
    if margin_acc is None or pgd_acc is None:
        add("margin_pgd_agrees_with_ce_pgd", None, "not run (eval.margin_pgd_steps is 0)")
    else:
        ok = margin_acc >= pgd_acc - loss_gap
        add("margin_pgd_agrees_with_ce_pgd", ok,
            f"PGD with the margin loss {fmt_pct(margin_acc)} vs cross-entropy PGD {fmt_pct(pgd_acc)} "
            f"(limit {fmt_pct(loss_gap)} below)"
            + ("" if ok else " — the cross-entropy attack is weak here: report the margin-loss figure (or "
                             "AutoAttack) as the robust accuracy"))

    viol = int(figures.get("violations", 0))
    add("attacks_in_threat_model", viol == 0,
        "every attack output inside [0, 1] and the epsilon ball" if viol == 0 else
        f"{viol} attack outputs left the threat model (clamped before scoring)")
    failed = [c["name"] for c in checks if c["passed"] is False]
    return {"passed": not failed, "failed": failed, "checks": checks}


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


def autoattack_accuracy(ctx: StageContext, model: nn.Module, test_dataset, label: str,
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
    progress_dir = progress_dir if progress_dir is not None else ctx.run_dir / "evaluate" / "progress"
    res = evaluate_sequence(ctx, model, test_dataset, attacks, f"{label}-autoattack", cfg.eval.autoattack_seed,
                            progress_dir, desc=f"{label} AutoAttack")
    res["notes"] = notes
    res["seed"] = cfg.eval.autoattack_seed
    return res


def robustness_suite(ctx: StageContext, model: nn.Module, dataset, label: str,
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
    progress_dir = progress_dir if progress_dir is not None else ctx.run_dir / "evaluate" / "progress"

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


# ============================================================================ reports


def robustness_rows(result: dict) -> list[tuple[str, float, str]]:
    """(metric, accuracy, settings) rows of one model's suite result, for tables and CSV."""
    rows = [("clean accuracy", result["clean_accuracy"], "")]
    for name, r in result.get("pgd", {}).items():
        s = r["attacks"][0]["settings"]
        rows.append((f"robust accuracy, {name}", r["robust_accuracy"],
                     f"eps {255 * s['epsilon']:g}/255, step {255 * s['step_size']:g}/255, "
                     f"{s['num_steps']} steps, worst of {s['restarts']}, loss {s['loss']}"))
    aa = result.get("autoattack")
    if aa:
        rows.append(("AutoAttack accuracy", aa["robust_accuracy"],
                     f"standard ({', '.join(x['name'] for x in aa['attacks'])}), seed {aa.get('seed')}"))
        for x in aa["attacks"]:
            rows.append((f"  after {x['name']}", x["robust_after"],
                         ", ".join(f"{k} {v}" for k, v in x["settings"].items() if k not in ("norm", "epsilon", "library", "attack"))))
    for p in result.get("epsilon_sweep", []):
        rows.append((f"PGD at eps {255 * p['epsilon']:g}/255", p["robust_accuracy"], "epsilon sweep"))
    if "corruption_accuracy" in result:
        rows.append(("corruption accuracy", result["corruption_accuracy"], result.get("corruption_label", "")))
    return rows


def sanity_markdown(sanity: dict, title: str = "") -> list[str]:
    """Markdown lines of a sanity-check result (a table; failures in bold)."""
    lines = [f"Sanity checks{(' — ' + title) if title else ''}: "
             + ("**all passed**" if sanity["passed"] else f"**FAILED: {', '.join(sanity['failed'])}**"), "",
             "| check | result | detail |", "| --- | --- | --- |"]
    for c in sanity["checks"]:
        verdict = {True: "pass", False: "**FAIL**", None: "not run"}[c["passed"]]
        lines.append(f"| {c['name']} | {verdict} | {c['detail']} |")
    return lines + [""]


def corruption_markdown(corr: dict, title: str = "") -> list[str]:
    """Markdown per-corruption and per-severity tables (accuracy in %) of ``evaluate_corruptions`` output."""
    lines = [f"Corruption accuracy{(' — ' + title) if title else ''}", ""]
    protocols = corr.get("protocols", {})
    if protocols:
        lines += ["| protocol | mean accuracy (%) | corruptions | severities |", "| --- | --- | --- | --- |"]
        for name, p in protocols.items():
            lines.append(f"| {name} | {fmt_pct(p['mean'])} | {len(p['corruptions'])} | "
                         f"{', '.join(map(str, p['severities']))} |")
        lines.append("")
    lines += ["| corruption | accuracy (%) |", "| --- | --- |"]
    lines += [f"| {c} | {fmt_pct(v)} |" for c, v in corr.get("per_corruption", {}).items()]
    lines += ["", "| severity | accuracy (%) |", "| --- | --- |"]
    lines += [f"| {s} | {fmt_pct(v)} |" for s, v in corr.get("per_severity", {}).items()]
    return lines + [""]


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Write dict rows as CSV atomically (columns from the first row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)
    return path


def result_metrics(prefix: str, result: dict) -> dict[str, float]:
    """MLflow metrics of one model's result: accuracies, per-attack, corruption tables, sanity flags (1 = pass)."""
    m = {f"{prefix}.clean_accuracy": result["clean_accuracy"], f"{prefix}.robust_accuracy": result["robust_accuracy"]}
    for name, r in result.get("pgd", {}).items():
        m[f"{prefix}.{name}_accuracy"] = r["robust_accuracy"]
    aa = result.get("autoattack")
    if aa:
        m[f"{prefix}.autoattack_accuracy"] = aa["robust_accuracy"]
        for x in aa["attacks"]:
            m[f"{prefix}.autoattack.after_{x['name']}"] = x["robust_after"]
    for p in result.get("epsilon_sweep", []):
        m[f"{prefix}.pgd_eps{255 * p['epsilon']:g}"] = p["robust_accuracy"]
    if "corruption_accuracy" in result:
        m[f"{prefix}.corruption_accuracy"] = result["corruption_accuracy"]
        corr = result.get("corruption", {})
        for c, v in corr.get("per_corruption", {}).items():
            m[f"{prefix}.corruption.{c}"] = v
        for s, v in corr.get("per_severity", {}).items():
            m[f"{prefix}.corruption.severity{s}"] = v
        for name, p in corr.get("protocols", {}).items():
            m[f"{prefix}.corruption_accuracy.{name}"] = p["mean"]
    sanity = result.get("sanity")
    if sanity:
        m[f"{prefix}.sanity.passed"] = float(sanity["passed"])
        for c in sanity["checks"]:
            if c["passed"] is not None:
                m[f"{prefix}.sanity.{c['name']}"] = float(c["passed"])
    return m


def result_csv_rows(label: str, result: dict) -> list[dict]:
    """CSV rows (model, metric, accuracy_percent, settings) of one model's result, corruption tables included."""
    rows = [{"model": label, "metric": m.strip(), "accuracy_percent": round(100 * v, 4), "settings": s}
            for m, v, s in robustness_rows(result)]
    corr = result.get("corruption", {})
    for key, v in corr.get("per_set", {}).items():
        rows.append({"model": label, "metric": f"corruption {key}", "accuracy_percent": round(100 * v, 4),
                     "settings": "corruption/severity"})
    return rows


# ============================================================================ rift evaluate --checkpoint


def report_markdown(report: dict) -> str:
    """The markdown report (`report.md`) of a checkpoint evaluation: the result table, the sanity checks, the import notes."""
    r = report["result"]
    lines = [f"# Evaluation of {report['checkpoint']}", "",
             f"{r['num_examples']} test images"
             + (f" (quick look: eval.n_examples = {report['n_examples']})" if report["n_examples"] else "")
             + f"; {report['precision']}.", "",
             "| metric | accuracy (%) | settings |", "| --- | --- | --- |"]
    lines += [f"| {m} | {fmt_pct(v)} | {s} |" for m, v, s in robustness_rows(r)]
    lines.append("")
    if r.get("autoattack", {}) and r["autoattack"].get("notes"):
        lines += [f"Note: {n}" for n in r["autoattack"]["notes"]] + [""]
    if "corruption" in r:
        lines += corruption_markdown(r["corruption"], report.get("corruption_set", {}).get("label", ""))
    if r.get("sanity"):
        lines += sanity_markdown(r["sanity"])
    imp = report.get("import", {})
    if imp:
        lines += ["Checkpoint import: " + imp.get("summary", ""), ""]
    return "\n".join(lines) + "\n"


def print_report(report: dict) -> None:
    """Print one checkpoint's evaluation as a rich table, failed sanity checks in red."""
    from rich.console import Console
    from rich.table import Table

    r = report["result"]
    table = Table(title=f"Evaluation of {report['checkpoint']} ({r['num_examples']} test images)")
    for col in ("metric", "accuracy (%)", "settings"):
        table.add_column(col, justify="right" if col == "accuracy (%)" else "left")
    for m, v, s in robustness_rows(r):
        table.add_row(m, fmt_pct(v), s)
    console = Console()
    console.print(table)
    corr = r.get("corruption")
    if corr:
        ct = Table(title="corruption accuracy (%)")
        ct.add_column("corruption")
        ct.add_column("accuracy", justify="right")
        for c, v in corr.get("per_corruption", {}).items():
            ct.add_row(c, fmt_pct(v))
        for s, v in corr.get("per_severity", {}).items():
            ct.add_row(f"severity {s}", fmt_pct(v))
        console.print(ct)
    sanity = r.get("sanity")
    if sanity:
        for c in sanity["checks"]:
            mark = {True: "[green]pass[/green]", False: "[bold red]FAIL[/bold red]", None: "[dim]not run[/dim]"}
            console.print(f"  sanity {c['name']}: {mark[c['passed']]} — {c['detail']}")
        if not sanity["passed"]:
            console.print(f"[bold red]robustness sanity checks FAILED: {', '.join(sanity['failed'])} — "
                          f"do not trust the robust accuracy above[/bold red]")
