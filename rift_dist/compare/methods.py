"""The methods of ``rift compare``: what each fine-tunes, and the logit mixing of logit-mix (issue 16)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rift_dist.errors import RiftError

AT = "at"
METRICS = (("clean", "clean_accuracy"), ("robust", "robust_accuracy"), ("corruption", "corruption_accuracy"))
"""(key in a point, metric name in MLflow and the sweep rows) of the three accuracies."""


class CompareError(RiftError, RuntimeError):
    """``rift compare`` cannot run: a method without what it needs, or a stale comparison folder."""


def method_modules(method: str, mrc_rows: list[dict], names_in_order: list[str], exclude: list[str],
                   seed: int, rift_modules: list[str] | None = None) -> list[str] | None:
    """The modules whose weights ``method`` fine-tunes; None for every parameter (all-layers, logit-mix).

    Args:
        mrc_rows: the MRC table ([{"module", "mrc", ...}], RiFT Eq. 2).
        names_in_order: module names in network order (for ``first`` / ``last`` in ``exclude``).
        exclude: ``mrc.exclude``, applied to every choice.
        seed: the comparison seed (random-module's draw: stream ``compare-random-module``).
        rift_modules: ``finetune.modules`` when set (rift then fine-tunes that hand-picked module).

    Raises:
        CompareError: an unknown method, or top-k with k above the number of candidate modules.
    """
    from rift_dist.seeding import stream_seed
    from rift_dist.stages.criticality import choose_modules

    if method in ("all-layers", "logit-mix"):
        return None
    ranked = choose_modules(mrc_rows, names_in_order, exclude, len(mrc_rows))  # ascending MRC, exclusions out
    if method == "rift":
        return list(rift_modules) if rift_modules else ranked[:1]
    if method == "most-critical":
        return ranked[-1:]
    if method == "random-module":
        rng = np.random.default_rng(stream_seed(seed, "compare-random-module"))
        return [ranked[int(rng.integers(len(ranked)))]]
    if method.startswith("top-") and method[4:].isdigit():
        k = int(method[4:])
        if k > len(ranked):
            raise CompareError(f"method {method}: only {len(ranked)} modules can be chosen (after mrc.exclude); "
                               f"use top-<k> with k <= {len(ranked)}")
        return ranked[:k]
    raise CompareError(f"unknown method {method!r}; see compare.methods in rift_dist/config.py")


def finetuned_method(method: str) -> str:
    """The method whose fine-tuned model ``method`` uses (logit-mix mixes with the all-layers model)."""
    return "all-layers" if method == "logit-mix" else method


class LogitMix(nn.Module):
    """Logits (1 - alpha) z_AT(x) + alpha z_FT(x) of two models (MixedNUTS-style mixing; no weight interpolation).

    Input: images [B, 3, H, W] in [0, 1]; output: logits [B, classes] in the models' dtype.  alpha 0 and 1
    return the AT / FT model's logits themselves (exactly, not ``1 * z + 0 * z'``).

    Raises:
        ValueError: alpha outside [0, 1].
    """

    def __init__(self, at_model: nn.Module, ft_model: nn.Module, alpha: float):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.at_model, self.ft_model, self.alpha = at_model, ft_model, float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - see the class docstring
        if self.alpha == 0.0:
            return self.at_model(x)
        if self.alpha == 1.0:
            return self.ft_model(x)
        return (1.0 - self.alpha) * self.at_model(x) + self.alpha * self.ft_model(x)

