"""L-inf attacks in pixel space: PGD with random start, FGSM, and robust accuracy over restarts.

Source: Madry et al. 2018 (PGD), Goodfellow et al. 2015 (FGSM), Zhang et al. 2019
(TRADES' KL attack), Carlini & Wagner 2017 (margin loss); RiFT §5.1 for the
settings (epsilon 8/255, step size 2/255, 10 steps, random start).

Every attack here
- takes gradients with respect to the input only (``torch.autograd.grad``), so
  parameter ``.grad`` fields are untouched;
- runs the model in eval mode (BatchNorm uses, and does not update, its running
  statistics) and restores the mode the model had;
- keeps every iterate inside [0, 1] and inside the epsilon ball around the input;
- with epsilon 0 returns the input unchanged, so predictions equal the clean ones.

Pass the *unwrapped* module (not a DDP or DeepSpeed engine): the attack's extra
forwards must not trigger buffer broadcasts or gradient hooks.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode for the block and restore every submodule's own mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def margin_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CW-style margin ``max_{j != y} z_j - z_y`` per sample: float [B] from logits [B, K] and int64 labels [B]."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, labels[:, None], float("-inf"))
    return other.amax(1) - true


def _loss(kind: str, logits: torch.Tensor, labels: torch.Tensor, target_probs: torch.Tensor | None) -> torch.Tensor:
    logits = logits.float()
    if kind == "ce":
        return F.cross_entropy(logits, labels, reduction="sum")
    if kind == "margin":
        return margin_loss(logits, labels).sum()
    if kind == "kl":
        if target_probs is None:
            raise ValueError("loss='kl' (TRADES) needs target_probs, the clean softmax outputs")
        return F.kl_div(F.log_softmax(logits, 1), target_probs, reduction="sum")
    raise ValueError(f"unknown attack loss {kind!r}; use ce, margin or kl")


def pgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epsilon: float = 8 / 255,
    step_size: float = 2 / 255,
    num_steps: int = 10,
    random_start: bool = True,
    *,
    loss: str = "ce",
    target_probs: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """L-inf projected gradient ascent on the loss (Madry et al. 2018).

    Args:
        model: the classifier (unwrapped); its mode is restored on return.
        images: float [B, C, H, W], pixels in [0, 1].
        labels: int64 [B].
        epsilon: ball radius, fraction of the pixel range (8/255).
        step_size: signed-gradient step (2/255).
        num_steps: PGD steps.
        random_start: start uniformly in the ball.
        loss: "ce" (cross-entropy), "margin" (CW) or "kl" (TRADES; needs ``target_probs`` [B, K]).
        noise: optional start offset [B, C, H, W] in [-1, 1] (scaled by epsilon); lets a
            distributed caller draw the start for the global batch and pass its slice.
        generator: torch.Generator for the random start when ``noise`` is None.
        autocast: a zero-argument context-manager factory for the forward pass (bf16).
        callback: called as ``callback(step, x_adv)`` after every iterate (for tests).

    Returns:
        float32 [B, C, H, W] adversarial images, detached, in [0, 1] and within epsilon of ``images``.

    Raises:
        ValueError: for negative epsilon/step size or an unknown loss.
    """
    if epsilon < 0 or step_size < 0 or num_steps < 0:
        raise ValueError(f"PGD needs epsilon, step_size, num_steps >= 0 (got {epsilon}, {step_size}, {num_steps})")
    autocast = autocast or contextlib.nullcontext
    x0 = images.detach().float()
    lower = (x0 - epsilon).clamp_(0, 1)
    upper = (x0 + epsilon).clamp_(0, 1)
    x = x0.clone()
    if random_start and epsilon > 0:
        if noise is None:
            noise = torch.empty_like(x0).uniform_(-1, 1, generator=generator) if generator is not None else torch.rand_like(x0) * 2 - 1
        x = torch.min(torch.max(x0 + epsilon * noise.to(x0), lower), upper)
    if callback is not None:
        callback(0, x)
    with eval_mode(model):
        for step in range(1, num_steps + 1):
            x.requires_grad_(True)
            with autocast():
                logits = model(x)
            objective = _loss(loss, logits, labels, target_probs)
            (grad,) = torch.autograd.grad(objective, x)
            x = x.detach() + step_size * grad.sign()
            x = torch.min(torch.max(x, lower), upper)
            if callback is not None:
                callback(step, x)
    return x.detach()


def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epsilon: float = 8 / 255, **kwargs) -> torch.Tensor:
    """Fast gradient sign method: one step of size epsilon, no random start (Goodfellow et al. 2015).

    Shapes as :func:`pgd`; returns float32 [B, C, H, W] in [0, 1].
    """
    return pgd(model, images, labels, epsilon, epsilon, 1, False, **kwargs)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, autocast=None) -> torch.Tensor:
    """Predicted classes int64 [B] of ``model`` in eval mode (mode restored), without autograd."""
    autocast = autocast or contextlib.nullcontext
    with eval_mode(model), autocast():
        return model(images).argmax(1)


def robust_correct(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epsilon: float = 8 / 255,
    step_size: float = 2 / 255,
    num_steps: int = 10,
    restarts: int = 1,
    *,
    loss: str = "ce",
    generator: torch.Generator | None = None,
    autocast=None,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample clean and robust correctness under PGD with restarts.

    A sample counts as robust only if it is classified correctly on the clean
    input and after every restart (worst case per sample, RiFT §5.1 reports the
    worst of 3).  Restarts run only on samples that are still unbroken.

    Args:
        images: float [B, C, H, W] in [0, 1]; labels: int64 [B].
        restarts: number of random restarts (>= 1).
        prepare: optional function applied to every input before the model (e.g. channels_last).

    Returns:
        (clean, robust): two bool tensors [B].
    """
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    prepare = prepare or (lambda t: t)
    clean = predict(model, prepare(images), autocast) == labels
    robust = clean.clone()
    for _ in range(restarts):
        idx = robust.nonzero().flatten()
        if idx.numel() == 0:
            break
        x_adv = pgd(
            model, prepare(images[idx]), labels[idx], epsilon, step_size, num_steps, True,
            loss=loss, generator=generator, autocast=autocast,
        )
        robust[idx] &= predict(model, prepare(x_adv), autocast) == labels[idx]
    return clean, robust
