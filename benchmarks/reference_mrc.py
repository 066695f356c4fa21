"""The MRC search written plainly, the way the RiFT authors' code does it: the baseline of ``bench_mrc.py``.

For every module, one after another (RIFT.md, Stages 2; RiFT §3.2, Eq. 2, Alg. 1):

1. copy the whole model, put the copy in eval mode (BatchNorm uses running statistics) and make
   only the module's weight trainable;
2. evaluate the full-set loss with a whole-network forward (float32, NCHW);
3. ``num_iterations`` passes of plain SGD (lr 1, no momentum, no weight decay) on the NEGATED
   cross-entropy -- gradient ascent -- over the fixed adversarial set in mini-batches, each step a
   whole-network forward and a backward;
4. after each pass, project the weight change back onto the ball ``||dW|| <= eps_w ||W0||`` and
   evaluate the full-set loss with a whole-network forward;
5. MRC = the largest of those losses minus the original one.

Nothing is cached, nothing is fused, no BatchNorm is folded, everything is float32 NCHW.  The
only concession to the comparison: the order of the examples in each pass comes from the same
seeded permutation as rift_dist's (``rift_dist.stages.criticality.pass_order``), so that both
compute the same iterates and their values can be compared to float tolerance.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def full_set_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over the whole set, in batches (whole-network forwards)."""
    total, correct = 0.0, 0
    for i in range(0, len(images), batch_size):
        logits = model(images[i:i + batch_size])
        y = labels[i:i + batch_size]
        total += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return total / len(images), correct / len(images)


def reference_mrc(model: nn.Module, name: str, images: torch.Tensor, labels: torch.Tensor, *,
                  epsilon_w: float = 0.1, num_iterations: int = 10, lr: float = 1.0, batch_size: int = 512,
                  order=None) -> dict:
    """MRC of module ``name`` computed the authors' way (see the module docstring).

    Args:
        model: the AT model (float32, NCHW); not modified (a copy is perturbed).
        name: a Conv2d / Linear module name, e.g. ``layer2.1.conv2``.
        images: float32 [N, 3, H, W] adversarial examples in [0, 1]; labels: int64 [N].
        epsilon_w: relative radius (L2 / Frobenius); num_iterations: passes; lr: ascent step; batch_size: mini-batch.
        order: ``order(t) -> LongTensor [N]``, the example order of pass t (default: stored order).

    Returns:
        {"module", "mrc", "robust_accuracy_drop", "loss_before", "loss_after"}.
    """
    m = copy.deepcopy(model)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    weight = dict(m.named_modules())[name].weight
    weight.requires_grad_(True)
    w0 = weight.detach().clone()
    radius = epsilon_w * w0.norm().item()
    optimizer = torch.optim.SGD([weight], lr=lr, momentum=0.0, weight_decay=0.0)
    loss0, acc0 = full_set_loss(m, images, labels, batch_size)
    best_loss, best_acc = loss0, acc0
    n = len(images)
    for t in range(num_iterations):
        idx_all = order(t) if order is not None else torch.arange(n)
        for i in range(0, n, batch_size):
            idx = idx_all[i:i + batch_size]
            loss = -F.cross_entropy(m(images[idx]), labels[idx])  # ascent on the cross-entropy
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            dw = weight - w0
            norm = dw.norm().item()
            if norm > radius:
                weight.copy_(w0 + dw * (radius / norm))
        loss_t, acc_t = full_set_loss(m, images, labels, batch_size)
        if loss_t > best_loss:
            best_loss, best_acc = loss_t, acc_t
    return {"module": name, "mrc": best_loss - loss0, "robust_accuracy_drop": acc0 - best_acc,
            "loss_before": loss0, "loss_after": best_loss}
