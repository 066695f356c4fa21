"""Models: CIFAR ResNet-18/34, WRN-34-10, input normalisation, module enumeration.

``build_model(cfg)`` builds the network a config names; ``list_modules(model)``
enumerates RiFT's *modules* — the weight of every Conv2d and Linear layer
(RIFT.md §Stages 2: BatchNorm layers are never modules, biases are not
perturbed) — under stable names free of wrapper prefixes.
"""

from __future__ import annotations

from torch import nn

from rift_dist.data.datasets import dataset_spec
from rift_dist.models.normalize import Normalize
from rift_dist.models.resnet import ResNet, resnet18, resnet34
from rift_dist.models.wide_resnet import WideResNet, wrn34_10

__all__ = [
    "Normalize", "ResNet", "WideResNet", "build_model", "build_model_from", "list_modules",
    "module_names", "unwrap", "get_module",
]


def build_model_from(arch: str, num_classes: int, width: int = 64, widen_factor: int = 10, mean=None, std=None,
                     input_size: int = 32) -> nn.Module:
    """Build an architecture by name.

    Every Conv2d whose CPU kernel crashes on this machine (torch 2.14.1 on AVX2-only CPUs, issue 11)
    is routed around it by :func:`rift_dist.models.conv_guard.guard_model` (env ``RIFT_CONV_GUARD``
    = auto | off | force; the probe is cached per machine).

    Args:
        arch: resnet18, resnet34 or wrn34_10.
        num_classes: output size.
        width: ResNet first-stage width (64 in the paper).
        widen_factor: WRN widen factor (10).
        mean, std: normalisation of the first layer (None = identity).
        input_size: input H = W in pixels (32 CIFAR, 64 Tiny-ImageNet): the shapes the conv guard probes.

    Raises:
        ValueError: for an unknown ``arch`` or a bad ``RIFT_CONV_GUARD``.
    """
    if arch == "resnet18":
        model = resnet18(num_classes, width, mean, std)
    elif arch == "resnet34":
        model = resnet34(num_classes, width, mean, std)
    elif arch == "wrn34_10":
        model = wrn34_10(num_classes, widen_factor, mean, std)
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose resnet18, resnet34 or wrn34_10")
    from rift_dist.models.conv_guard import guard_model

    guard_model(model, input_size)
    return model


def build_model(cfg) -> nn.Module:
    """Build the model a :class:`rift_dist.config.RunConfig` describes (float32, on the CPU).

    Output size, input size and normalisation come from the data set's
    :class:`~rift_dist.data.datasets.DatasetSpec` unless ``model.mean`` / ``model.std`` override them.

    Raises:
        DataError: for an unknown ``data.dataset``; ValueError for an unknown ``model.arch``.
    """
    spec = dataset_spec(cfg.data.dataset)
    mean, std = spec.mean, spec.std
    if cfg.model.mean:
        mean = tuple(cfg.model.mean)
    if cfg.model.std:
        std = tuple(cfg.model.std)
    if not cfg.model.normalize:
        mean = std = None
    return build_model_from(
        cfg.model.arch, spec.num_classes, cfg.model.width, cfg.model.widen_factor, mean, std,
        input_size=spec.image_size,
    )


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / DeepSpeed / torch.compile wrappers (``.module``, ``._orig_mod``)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def list_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv2d and Linear layer as ``(name, layer)`` in definition order.

    Names are those of the bare architecture (``layer2.1.conv2``), independent of
    DDP's ``module.`` prefix or compile wrappers.  Source: RIFT.md §Stages 2
    (ResNet-18: 21 modules, ResNet-34: 37, WRN-34-10: 35).
    """
    return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def module_names(model: nn.Module) -> list[str]:
    """The names of :func:`list_modules`."""
    return [n for n, _ in list_modules(model)]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The Conv2d/Linear layer called ``name``.

    Raises:
        KeyError: naming the missing module and listing the valid names.
    """
    table = dict(list_modules(model))
    if name not in table:
        raise KeyError(
            f"no module named {name!r} in {type(unwrap(model)).__name__}; "
            f"valid modules: {', '.join(table)}"
        )
    return table[name]
