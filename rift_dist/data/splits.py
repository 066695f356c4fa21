"""Train / validation / test splits: seeded, class-balanced, recorded.

The validation split is carved from the training split (the RiFT authors select the module, the
fine-tuning checkpoint and alpha on the test set; this project selects on held-out training data,
see ``../shared/RIFT.md``, "Selection on held-out data"). ``train_subset`` and ``test_subset`` then
shrink the remaining training data and the test data for quick runs.

Every selection is class-balanced: ``n // C`` images of every class plus one more for
``n % C`` classes drawn at random (seeded). Within a class the images are drawn at random (seeded).
Selected index lists are kept in the original order of the split (sorted), so they do not depend
on anything but the seed, the sizes and the labels.

Random streams: ``numpy.random.default_rng([split_seed, stream])`` with stream 0 for the
validation carve-out, 1 for ``train_subset`` and 2 for ``test_subset``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from rift_dist.data.sources import ArrayDataset, DataError, load_split, register_derived_cache, resolve_root

if TYPE_CHECKING:  # pragma: no cover
    from rift_dist.config import DataConfig

__all__ = ["Splits", "make_splits", "split_dataset", "split_record", "balanced_indices", "indices_sha256"]

_STREAM_VAL, _STREAM_TRAIN, _STREAM_TEST = 0, 1, 2


@dataclass
class Splits:
    """The three splits of one experiment.

    Attributes:
        train: training images (the training split minus ``val``, optionally subset).
        val: validation images carved from the training split (may be empty when ``val_size`` is 0).
        test: test images (CIFAR test batch / Tiny-ImageNet official val), optionally subset.
        record: JSON-able provenance for MLflow: data set, root, layout, seeds, sizes, per-split
            sha256 of the selected index lists (int64 little-endian bytes, positions in the full
            train/test split) and of the full splits' pixels and labels.
    """

    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    record: dict = field(default_factory=dict)


def indices_sha256(indices: np.ndarray) -> str:
    """Hex sha256 of an index list as little-endian int64 bytes (how ``Splits.record`` hashes them)."""
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def _content_sha256(ds: ArrayDataset) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(ds.images).data)
    h.update(np.asarray(ds.labels, dtype="<i8").tobytes())
    return h.hexdigest()


def balanced_indices(labels: np.ndarray, n: int, rng: np.random.Generator, *, what: str = "subset") -> np.ndarray:
    """Choose ``n`` positions, class-balanced, at random.

    Args:
        labels: int ``[N]`` class labels of the candidates.
        n: how many to choose (0 <= n <= N).
        rng: numpy Generator (seeded by the caller).
        what: name used in error messages (e.g. "data.val_size").

    Returns:
        int64 ``[n]`` sorted positions into ``labels``: ``n // C`` per class plus one for ``n % C``
        randomly chosen classes (C = number of distinct labels present).

    Raises:
        DataError: when n is negative, larger than N, or a class has too few images for its share.
    """
    labels = np.asarray(labels)
    if n < 0 or n > len(labels):
        raise DataError(f"{what} = {n} must lie in [0, {len(labels)}] (the number of images available)")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    classes = np.unique(labels)
    per_class = np.full(len(classes), n // len(classes), dtype=np.int64)
    extra = rng.choice(len(classes), size=n % len(classes), replace=False)
    per_class[extra] += 1
    chosen = []
    for c, k in zip(classes, per_class):
        pool = np.flatnonzero(labels == c)
        if k > len(pool):
            raise DataError(
                f"{what} = {n} needs {k} images of class {c} but only {len(pool)} are available; lower {what}"
            )
        chosen.append(rng.choice(pool, size=int(k), replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


_TRAINING_CACHE: dict[tuple, tuple] = register_derived_cache({})  # emptied by sources.clear_cache
_TEST_CACHE: dict[tuple, tuple] = register_derived_cache({})
_SPLITS_CACHE: dict[tuple, Splits] = register_derived_cache({})
_RECORD_CACHE: dict[tuple, dict] = register_derived_cache({})


def _full_splits(cfg: "DataConfig"):
    """(root, full train split, full test split), checked to hold the same classes.  Reads the data set's
    location only (``dataset``, ``root`` / ``archive``, ``layout``, caches), no split size."""
    root = resolve_root(cfg)
    cache_dir = cfg.cache_dir if getattr(cfg, "decode_cache", True) and cfg.cache_dir else None
    full_train = load_split(cfg.dataset, root, "train", cfg.layout, cache_dir=cache_dir)
    full_test = load_split(cfg.dataset, root, "test", cfg.layout, cache_dir=cache_dir)
    if full_train.classes != full_test.classes:
        raise DataError(
            f"train and test splits under {root} have different classes ({len(full_train.classes)} vs "
            f"{len(full_test.classes)}; first difference: "
            f"{next((a, b) for a, b in zip(full_train.classes + [''], full_test.classes + ['']) if a != b)}); "
            f"both must hold the same class folders"
        )
    return root, full_train, full_test


def _training_part(cfg: "DataConfig") -> tuple:
    """(root, full train split, train, val, train indices, val indices): the parts cut from the training split.

    Reads ``val_size``, ``train_subset`` and ``split_seed`` -- never ``test_subset``, so the stages that use
    only these splits (training, MRC, fine-tuning with ``selection_split: val``) do not depend on it.
    """
    root, full_train, _ = _full_splits(cfg)
    key = (cfg.dataset, str(root), cfg.layout, cfg.val_size, cfg.train_subset, cfg.split_seed)
    if key in _TRAINING_CACHE:
        return _TRAINING_CACHE[key]
    if cfg.val_size < 0 or cfg.train_subset < 0:
        raise DataError("data.val_size and data.train_subset must be >= 0")
    if cfg.val_size >= len(full_train):
        raise DataError(
            f"data.val_size = {cfg.val_size} leaves no training images (the training split has {len(full_train)}); "
            f"lower data.val_size"
        )
    val_idx = balanced_indices(
        full_train.labels, cfg.val_size, np.random.default_rng([cfg.split_seed, _STREAM_VAL]), what="data.val_size"
    )
    rest = np.setdiff1d(np.arange(len(full_train), dtype=np.int64), val_idx, assume_unique=True)
    if cfg.train_subset:
        pick = balanced_indices(
            full_train.labels[rest], cfg.train_subset, np.random.default_rng([cfg.split_seed, _STREAM_TRAIN]),
            what="data.train_subset",
        )
        train_idx = rest[pick]
    else:
        train_idx = rest
    train = full_train.subset(train_idx)
    val = full_train.subset(val_idx)
    train.description = f"{full_train.description}; train part ({len(train)} images, split_seed {cfg.split_seed})"
    val.description = f"{full_train.description}; validation part ({len(val)} images, split_seed {cfg.split_seed})"
    for ds in (train, val):
        ds.images.flags.writeable = False
        ds.labels.flags.writeable = False
    part = (root, full_train, train, val, train_idx, val_idx)
    _TRAINING_CACHE[key] = part
    return part


def _test_part(cfg: "DataConfig") -> tuple:
    """(root, full test split, test, test indices).  Reads ``test_subset`` and ``split_seed``, not the
    training split's sizes."""
    root, _, full_test = _full_splits(cfg)
    key = (cfg.dataset, str(root), cfg.layout, cfg.test_subset, cfg.split_seed)
    if key in _TEST_CACHE:
        return _TEST_CACHE[key]
    if cfg.test_subset < 0:
        raise DataError("data.test_subset must be >= 0")
    if cfg.test_subset:
        test_idx = balanced_indices(
            full_test.labels, cfg.test_subset, np.random.default_rng([cfg.split_seed, _STREAM_TEST]),
            what="data.test_subset",
        )
    else:
        test_idx = np.arange(len(full_test), dtype=np.int64)
    test = full_test.subset(test_idx)
    test.description = f"{full_test.description}; {'subset of ' if cfg.test_subset else ''}{len(test)} images"
    test.images.flags.writeable = False
    test.labels.flags.writeable = False
    part = (root, full_test, test, test_idx)
    _TEST_CACHE[key] = part
    return part


def split_dataset(cfg: "DataConfig", name: str) -> ArrayDataset:
    """One split (``train``, ``val`` or ``test``) -- the same arrays as ``make_splits(cfg).<name>`` -- built
    from only the settings it depends on: ``train`` / ``val`` never read ``test_subset``, ``test`` never reads
    ``val_size`` / ``train_subset`` (the stage table's keys can then say exactly what a stage depends on).

    Raises:
        DataError: an unknown split name; anything :func:`make_splits` raises for that split.
    """
    if name in ("train", "val"):
        _, _, train, val, _, _ = _training_part(cfg)
        return train if name == "train" else val
    if name == "test":
        return _test_part(cfg)[2]
    raise DataError(f"unknown split {name!r}; choose train, val or test")


def split_record(cfg: "DataConfig", name: str) -> dict:
    """The provenance of split ``name`` alone: its full split's sha256 and its index list's sha256
    (``full_<train|test>_sha256``, ``<name>_indices_sha256``), the root, the sizes -- the keys
    :attr:`Splits.record` has for it, without reading the other splits' settings."""
    if name in ("train", "val"):
        root, full, train, val, train_idx, val_idx = _training_part(cfg)
        idx = train_idx if name == "train" else val_idx
        full_name = "train"
    elif name == "test":
        root, full, _, idx = _test_part(cfg)
        full_name = "test"
    else:
        raise DataError(f"unknown split {name!r}; choose train, val or test")
    key = (name, id(full), id(idx))  # both held by the part caches, cleared together with this one
    if key not in _RECORD_CACHE:
        _RECORD_CACHE[key] = {"root": str(root), f"full_{full_name}_size": len(full), f"{name}_size": len(idx),
                              f"{name}_indices_sha256": indices_sha256(idx),
                              f"full_{full_name}_sha256": _content_sha256(full)}
    return dict(_RECORD_CACHE[key])


def make_splits(cfg: "DataConfig") -> Splits:
    """Load the data set named by ``cfg`` and cut it into train / val / test.

    Steps: :func:`~rift_dist.data.sources.resolve_root`, :func:`~rift_dist.data.sources.load_split`
    for train and test; a class-balanced validation set of ``cfg.val_size`` images is carved from
    train (seed ``cfg.split_seed``); ``cfg.train_subset`` (0 = all) images of the rest form the
    training set; ``cfg.test_subset`` (0 = all) images of the test split form the test set.  The
    training and the test parts are built apart (:func:`split_dataset` builds one of them).

    Memoised per process on (data set, resolved root, layout, sizes, seed): every stage of one
    process sees the same arrays. Treat them as read-only.

    Returns:
        :class:`Splits` whose datasets hold uint8 ``[N, H, W, 3]`` images and int64 labels.

    Raises:
        DataError: data missing or malformed (see ``load_split``); train and test disagree on the
            classes; a size is negative, too large for the data, or not class-balanceable.
    """
    root, full_train, train, val, train_idx, val_idx = _training_part(cfg)
    _, full_test, test, test_idx = _test_part(cfg)
    key = (cfg.dataset, str(root), cfg.layout, cfg.val_size, cfg.train_subset, cfg.test_subset, cfg.split_seed)
    if key in _SPLITS_CACHE:
        return _SPLITS_CACHE[key]
    record = {
        "dataset": cfg.dataset,
        "root": str(root),
        "layout": cfg.layout,
        "source_train": full_train.description,
        "source_test": full_test.description,
        "num_classes": full_train.num_classes,
        "image_size": list(full_train.image_size),
        "split_seed": cfg.split_seed,
        "full_train_size": len(full_train),
        "full_test_size": len(full_test),
        "train_size": len(train),
        "val_size": len(val),
        "test_size": len(test),
        "train_indices_sha256": indices_sha256(train_idx),
        "val_indices_sha256": indices_sha256(val_idx),
        "test_indices_sha256": indices_sha256(test_idx),
        "full_train_sha256": _content_sha256(full_train),
        "full_test_sha256": _content_sha256(full_test),
    }
    splits = Splits(train=train, val=val, test=test, record=record)
    _SPLITS_CACHE[key] = splits
    return splits
