"""Standard AutoAttack through torchattacks' own attack classes, seeded and side-effect free.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks", ICML 2020, §4: APGD-CE, APGD-T, FAB-T and Square, each run only on the samples the ones before it
left robust (the sequence protocol of :func:`rift_dist.eval.protocol.run_attack_sequence`).

Units: pixels in [0, 1]; epsilon is a fraction of that range.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from rift_dist.config import ConfigError

AUTOATTACK_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
"""The four attacks of standard AutoAttack, in order (Croce & Hein 2020)."""


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
        """Adversarial images float32 [B, C, H, W] in [0, 1] (see :func:`rift_dist.eval.protocol.run_attack_sequence` for the arguments)."""
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

