"""rift_dist.data.loaders: order, sharding, distributed parity, augmentation, dispatch."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from rift_dist.config import RunConfig
from rift_dist.data import loaders
from rift_dist.data.loaders import TorchLoader, build_loader, crop_padding, gather_batch, get_dataset
from rift_dist.data.datasets import CIFAR10_CLASSES
from rift_dist.data.sources import ArrayDataset, DataError
from tests.conftest import id_images, image_ids, write_image_folder


def coord_dataset(n: int, size: int = 32) -> ArrayDataset:
    """Pixel (y, x) of image i holds (y, x, i % 256): every output pixel says where it came from."""
    y, x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    img = np.empty((n, size, size, 3), dtype=np.uint8)
    img[..., 0], img[..., 1] = y, x
    img[..., 2] = (np.arange(n) % 256)[:, None, None]
    return ArrayDataset(img, np.arange(n) % 10, [str(i) for i in range(10)], "coordinates")


def loader(ds, train, batch, rank=0, world=1, seed=0, **kw):
    return TorchLoader(ds, train=train, batch_size=batch, rank=rank, world_size=world, seed=seed, **kw)


def collect(ld):
    xs, ys = zip(*list(ld))
    return torch.cat(xs), torch.cat(ys)


# --------------------------------------------------------------------------- eval mode


def test_eval_fixed_order_values_and_dtypes():
    ds = ArrayDataset(id_images(range(70)), np.arange(70) % 10, CIFAR10_CLASSES, "ids")
    ld = loader(ds, train=False, batch=32)
    assert len(ld) == 3 and ld.num_samples == 70
    x, y = collect(ld)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (70, 3, 32, 32)
    assert x.is_contiguous() and 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy() * 255, ds.images, atol=1e-3)
    np.testing.assert_array_equal(y.numpy(), ds.labels)
    ld.set_epoch(5)  # eval order does not depend on the epoch
    x2, _ = collect(ld)
    assert torch.equal(x, x2)


@pytest.mark.parametrize("n,world", [(70, 2), (70, 3), (2, 4)])
def test_eval_shards_disjoint_and_cover(n, world):
    ds = ArrayDataset(id_images(range(n)), np.zeros(n, dtype=np.int64), ["a"], "ids")
    seen, counts = [], []
    for r in range(world):
        ld = loader(ds, train=False, batch=16, rank=r, world=world)
        ids = image_ids((collect(ld)[0].permute(0, 2, 3, 1) * 255).round().byte().numpy()) if len(ld) else []
        assert list(ids) == sorted(ids)  # contiguous, in order
        seen += list(ids)
        counts.append(ld.num_samples)
    assert seen == list(range(n)) and sum(counts) == n
    assert counts == [len(a) for a in np.array_split(np.arange(n), world)]


# --------------------------------------------------------------------------- training mode


def test_two_ranks_equal_one_rank_global_batch():
    ds = coord_dataset(100)
    one = loader(ds, train=True, batch=16, seed=7)
    two = [loader(ds, train=True, batch=16, rank=r, world=2, seed=7) for r in (0, 1)]
    assert len(one) == 6 and one.num_samples == 96 and all(len(t) == 6 and t.num_samples == 48 for t in two)
    for epoch in (0, 3):
        for ld in (one, *two):
            ld.set_epoch(epoch)
        for (x1, y1), (xa, ya), (xb, yb) in zip(one, *two, strict=True):
            assert x1.shape[0] == 16 and xa.shape[0] == 8
            assert torch.equal(x1, torch.cat([xa, xb])) and torch.equal(y1, torch.cat([ya, yb]))


def test_epoch_order_seeded_and_drop_last():
    ds = coord_dataset(50)
    ld = loader(ds, train=True, batch=16, seed=1)
    ids = lambda: (collect(ld)[0][:, 2, 16, 16] * 255).round().long().tolist()  # noqa: E731
    e0 = ids()
    assert len(e0) == 48 and len(set(e0)) == 48  # drop_last: 3 full batches, no repeats
    assert ids() == e0  # same epoch -> same order
    ld.set_epoch(1)
    assert ids() != e0
    assert loader(ds, train=True, batch=16, seed=2).epoch_plan(0)[0].tolist() != ld.epoch_plan(0)[0].tolist()
    ld.set_epoch(1, start_batch=2)  # exact mid-epoch resume
    x_tail, _ = collect(ld)
    ld.set_epoch(1)
    assert torch.equal(x_tail, collect(ld)[0][32:])


def test_crops_inside_reflect_padding_and_flips_about_half():
    n = 2000
    ds = coord_dataset(n)
    ld = loader(ds, train=True, batch=n, seed=3)
    perm, offsets, flips = ld.epoch_plan(0)
    pad = crop_padding(32)
    assert pad == 4 and crop_padding(64) == 8
    assert offsets.min() == 0 and offsets.max() == 2 * pad  # both extremes occur, never beyond
    assert 0.45 < flips.mean() < 0.55
    (x, _), = list(ld)
    got = (x.permute(0, 2, 3, 1) * 255).round().byte().numpy()
    # every output equals np.pad(reflect) + crop (+ mirror), sample by sample
    for i in range(0, n, 97):
        ref = np.pad(ds.images[perm[i]], ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
        ref = ref[offsets[i, 0] : offsets[i, 0] + 32, offsets[i, 1] : offsets[i, 1] + 32]
        if flips[i]:
            ref = ref[:, ::-1]
        np.testing.assert_array_equal(got[i], ref)
    # source rows/cols stay within pad pixels of their destination (reflection included)
    rows = got[..., 0].astype(int)
    assert np.abs(rows - np.arange(32)[None, :, None]).max() <= 2 * pad
    # flipped samples run right-to-left in the x channel
    dx = np.diff(got[:, 16, 10:20, 1].astype(int), axis=1)
    assert ((dx < 0).all(axis=1) == flips[: n]).mean() > 0.99


def test_gather_batch_non_contiguous_path_matches():
    ds = coord_dataset(10)
    idx, offsets, flips = np.arange(10), np.random.default_rng(0).integers(0, 9, (10, 2)), np.arange(10) % 2 == 0
    strided = np.asfortranarray(ds.images)
    np.testing.assert_array_equal(gather_batch(ds.images, idx, 4, offsets, flips), gather_batch(strided, idx, 4, offsets, flips))


def test_training_errors():
    ds = coord_dataset(20)
    with pytest.raises(DataError, match="global batch size 10 is not divisible by world_size 3"):
        loader(ds, train=True, batch=10, world=3)
    with pytest.raises(DataError, match="fewer than one global batch of 32"):
        loader(ds, train=True, batch=32)
    with pytest.raises(DataError, match="rank 2 is not in"):
        loader(ds, train=False, batch=4, rank=2, world=2)
    with pytest.raises(DataError, match="indices must lie"):
        loader(ds, train=False, batch=4, indices=[0, 20])


def test_indices_channels_last_and_workers():
    ds = coord_dataset(40)
    ld = loader(ds, train=False, batch=8, indices=[5, 3, 9], channels_last=True)
    (x, y), = list(ld)
    assert x.is_contiguous(memory_format=torch.channels_last) and y.tolist() == [5, 3, 9]
    a = collect(loader(ds, train=True, batch=8, seed=4))
    b = collect(loader(ds, train=True, batch=8, seed=4, num_workers=2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------- config entry points


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("ld"), CIFAR10_CLASSES, 6, 3)
    c = RunConfig()
    c.seed = 11
    c.data.root = str(root)
    c.data.decode_cache = False
    c.data.val_size = 10
    c.data.batch_size = 8
    c.data.eval_batch_size = 7
    c.data.loader = "torch"
    return c


def test_get_dataset_and_build_loader(cfg, fresh_data_cache):
    assert len(get_dataset(cfg, "train")) == 50 and len(get_dataset(cfg, "test")) == 30
    assert get_dataset(cfg, "selection") is get_dataset(cfg, "val")
    cfg.selection_split = "test"
    try:
        assert get_dataset(cfg, "selection") is get_dataset(cfg, "test")
    finally:
        cfg.selection_split = "val"
    tr = build_loader(cfg, "train")
    assert isinstance(tr, TorchLoader) and tr.train and len(tr) == 6 and tr.seed == 11
    ev = build_loader(cfg, "val", rank=1, world_size=2)
    assert not ev.train and ev.num_samples == 5 and len(ev) == 1
    assert build_loader(cfg, "train", train=False).train is False
    assert build_loader(cfg, "test", batch_size=30).batch_size == 30
    with pytest.raises(DataError, match="unknown split"):
        get_dataset(cfg, "holdout")


def test_empty_val_selection_error(cfg, fresh_data_cache):
    cfg.data.val_size = 0
    try:
        with pytest.raises(DataError, match="val_size is 0.*selection_split: test"):
            get_dataset(cfg, "selection")
    finally:
        cfg.data.val_size = 10


def _fake_ffcv(monkeypatch, available, reason="no ffcv here"):
    mod = types.ModuleType("rift_dist.data.ffcv.loader")
    mod.ffcv_available = lambda: (available, reason)
    mod.build_ffcv_loader = lambda cfg, split, rank=0, world_size=1, **kw: ("ffcv", split, rank, world_size, kw["train"])
    monkeypatch.setitem(sys.modules, "rift_dist.data.ffcv.loader", mod)


def test_dispatch(cfg, monkeypatch, fresh_data_cache):
    _fake_ffcv(monkeypatch, False)
    cfg.data.loader = "auto"
    try:
        assert isinstance(build_loader(cfg, "test"), TorchLoader)
        cfg.data.loader = "ffcv"
        with pytest.raises(DataError, match="'ffcv' but FFCV cannot be used: no ffcv here.*data.loader: torch"):
            build_loader(cfg, "test")
        _fake_ffcv(monkeypatch, True)
        assert build_loader(cfg, "test", 1, 2) == ("ffcv", "test", 1, 2, None)
        cfg.data.loader = "auto"
        assert build_loader(cfg, "train")[0] == "ffcv"
        monkeypatch.setitem(sys.modules, "rift_dist.data.ffcv.loader", None)  # import fails
        assert isinstance(build_loader(cfg, "test"), TorchLoader)
        assert loaders._ffcv_builder()[0] is False
    finally:
        cfg.data.loader = "torch"


def test_torch_loader_is_fast():
    """An augmented epoch costs a small multiple of the bare minimum (gather rows + convert to float);
    a per-sample Python path would be ~20-50x slower. CPU time, so other jobs on the machine matter less."""
    import time

    rng = np.random.default_rng(0)
    ds = ArrayDataset(rng.integers(0, 256, (20000, 32, 32, 3), dtype=np.uint8), np.zeros(20000, np.int64), ["a"], "noise")
    ld = loader(ds, train=True, batch=256)
    t = time.process_time()
    for _ in ld:
        pass
    ours = time.process_time() - t
    perm = rng.permutation(20000)
    t = time.process_time()
    for k in range(len(ld)):
        torch.from_numpy(ds.images[perm[k * 256 : (k + 1) * 256]]).permute(0, 3, 1, 2).float().div_(255).contiguous()
    bare = time.process_time() - t
    assert ours < 6 * bare + 0.3, (ours, bare)
