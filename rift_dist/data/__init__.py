"""Data for RiFT: the data-set table, sources (CIFAR pickles, image folders, Tiny-ImageNet), splits, loaders, corruption sets.

Public API (imported lazily, so ``import rift_dist.data`` does not import torch):

* :mod:`~rift_dist.data.datasets`: ``DATASETS``, ``DatasetSpec``, ``dataset_spec``, ``CIFAR10_CLASSES``,
  ``CIFAR100_CLASSES`` (every fact of every data set)
* :mod:`~rift_dist.data.sources`: ``ArrayDataset``, ``DataError``, ``load_split``, ``resolve_root``
* :mod:`~rift_dist.data.splits`: ``Splits``, ``make_splits``
* :mod:`~rift_dist.data.loaders`: ``get_dataset``, ``build_loader``, ``Loader``, ``TorchLoader``
* :mod:`~rift_dist.data.corruptions`: ``CIFAR_CORRUPTIONS``, ``AUTHORS_CORRUPTIONS``; ``.load``:
  ``load_corruption_set``; ``.generate``: ``generate_corruption_set``, ``get_corruption_sets``
  (``.kernels``: the corruptions themselves)
* :mod:`~rift_dist.data.ffcv`: the optional FFCV path (``.write``, ``.ops``, ``.loader``)
* :mod:`~rift_dist.data.archive`: ``unpack_archive``
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ArrayDataset": "sources",
    "DataError": "sources",
    "load_split": "sources",
    "resolve_root": "sources",
    "detect_layout": "sources",
    "CIFAR10_CLASSES": "datasets",
    "CIFAR100_CLASSES": "datasets",
    "DATASETS": "datasets",
    "DatasetSpec": "datasets",
    "dataset_spec": "datasets",
    "Splits": "splits",
    "make_splits": "splits",
    "get_dataset": "loaders",
    "build_loader": "loaders",
    "Loader": "loaders",
    "TorchLoader": "loaders",
    "CIFAR_CORRUPTIONS": "corruptions",
    "AUTHORS_CORRUPTIONS": "corruptions",
    "AUTHORS_USED_CORRUPTIONS": "corruptions",
    "load_corruption_set": "corruptions.load",
    "generate_corruption_set": "corruptions.generate",
    "get_corruption_sets": "corruptions.generate",
    "unpack_archive": "archive",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rift_dist.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"rift_dist.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
