"""The real archives in ../shared/data (CIFAR-10 as JPEGs, Tiny-ImageNet-200 with 100 train images per
class), unpacked once per session through resolve_root. Skipped when the archives are absent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rift_dist.config import RunConfig
from rift_dist.data import archive as archive_mod
from rift_dist.data.loaders import build_loader
from rift_dist.data.datasets import CIFAR10_CLASSES
from rift_dist.data.sources import detect_layout, load_split
from rift_dist.data.splits import make_splits


def _cfg(root, cache, dataset="cifar10", **kw) -> RunConfig:
    cfg = RunConfig()
    cfg.data.dataset, cfg.data.root, cfg.data.cache_dir, cfg.data.loader = dataset, str(root), str(cache), "torch"
    for k, v in kw.items():
        setattr(cfg.data, k, v)
    return cfg


def test_real_cifar10_archive(real_cifar_root, real_cache_dir):
    assert real_cifar_root.name == "cifar10-jpeg" and archive_mod.read_marker(real_cifar_root.parent)["members"] > 60000
    assert detect_layout("cifar10", real_cifar_root.parent)[0] == "folder"
    test = load_split("cifar10", real_cifar_root, "test", cache_dir=real_cache_dir)
    assert test.images.shape == (10000, 32, 32, 3) and test.classes == CIFAR10_CLASSES
    assert list(test.class_counts()) == [1000] * 10
    assert 90 < test.images.mean() < 150 and test.images.std() > 40  # real photos, not blank


def test_real_tiny_imagenet_archive(real_tiny_root, real_cache_dir):
    from rift_dist.data.sources import _list_tiny

    listing = _list_tiny(real_tiny_root, "train")  # the train split without decoding 20k JPEGs
    wnids = (real_tiny_root / "wnids.txt").read_text().split()
    assert listing.classes == sorted(wnids) != wnids and len(listing.classes) == 200
    assert len(listing.files) == 20000 and list(set(np.bincount(listing.labels))) == [100]
    assert all("/images/" in f for f in listing.files[::997])
    test = load_split("tiny-imagenet", real_tiny_root, "test", cache_dir=real_cache_dir)
    assert test.classes == listing.classes
    assert test.images.shape == (10000, 64, 64, 3) and list(set(test.class_counts())) == [50]
    # labels from val_annotations.txt column 2, not from folders
    lines = (real_tiny_root / "val" / "val_annotations.txt").read_text().splitlines()
    by_name = dict(line.split("\t")[:2] for line in lines)
    for j in (0, 1, 4321, 9999):
        assert test.classes[test.labels[j]] == by_name[f"val_{j}.JPEG"]
    # greyscale JPEGs were converted to RGB: some images have three identical channels
    same = (test.images[..., 0] == test.images[..., 1]).all(axis=(1, 2)) & (test.images[..., 1] == test.images[..., 2]).all(axis=(1, 2))
    assert 0 < same.sum() < 1000


@pytest.mark.slow
def test_real_tiny_imagenet_splits_and_two_rank_parity(real_tiny_root, real_cache_dir):
    train = load_split("tiny-imagenet", real_tiny_root, "train", cache_dir=real_cache_dir)
    assert train.images.shape == (20000, 64, 64, 3) and list(set(train.class_counts())) == [100]
    cfg = _cfg(real_tiny_root, real_cache_dir, "tiny-imagenet", val_size=400, test_subset=1000, batch_size=64)
    s = make_splits(cfg.data)
    assert (len(s.train), len(s.val), len(s.test)) == (19600, 400, 1000)
    assert list(set(s.val.class_counts())) == [2] and list(set(s.test.class_counts())) == [5]
    one = build_loader(cfg, "train")
    two = [build_loader(cfg, "train", r, 2) for r in (0, 1)]
    assert one.pad == 8 and len(one) == 19600 // 64
    for epoch in (0, 1):
        for ld in (one, *two):
            ld.set_epoch(epoch)
        (x, y), (xa, ya), (xb, yb) = next(iter(one)), next(iter(two[0])), next(iter(two[1]))
        assert x.shape == (64, 3, 64, 64) and torch.equal(torch.cat([xa, xb]), x) and torch.equal(torch.cat([ya, yb]), y)
    ev = [build_loader(cfg, "selection", r, 3) for r in range(3)]
    assert sum(e.num_samples for e in ev) == 400


@pytest.mark.slow
def test_real_cifar10_full_splits_and_loader(real_cifar_root, real_cache_dir):
    cfg = _cfg(real_cifar_root, real_cache_dir, val_size=1000)
    s = make_splits(cfg.data)
    assert (len(s.train), len(s.val), len(s.test)) == (49000, 1000, 10000)
    assert list(s.val.class_counts()) == [100] * 10
    ld = build_loader(cfg, "train")
    x, y = next(iter(ld))
    assert x.shape == (128, 3, 32, 32) and x.dtype == torch.float32 and len(ld) == 49000 // 128
    two = [build_loader(cfg, "train", r, 2) for r in (0, 1)]
    (xa, ya), (xb, yb) = next(iter(two[0])), next(iter(two[1]))
    assert torch.equal(torch.cat([xa, xb]), x) and torch.equal(torch.cat([ya, yb]), y)
