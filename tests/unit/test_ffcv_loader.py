"""FFCV data path: .beton round trips, verification errors, loader semantics (rift_dist.data.ffcv_loader).

Skipped with the reason from ``ffcv_available()`` when FFCV is not installed
(``scripts/install_ffcv.sh``).  Real-data tests read small subsets of the archives in
``../shared/data`` (or env RIFT_SHARED_DATA) and are skipped when those are missing.
FFCV compiles each loader's pipeline with numba (~1-2 s), so loaders are shared through
module fixtures where a test only reads them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tarfile
import threading
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from rift_dist.config import ConfigError, RunConfig
from rift_dist.data.ffcv import ffcv_available
from rift_dist.data.ffcv.loader import FFCVLoader, build_ffcv_loader, check_ffcv_config
from rift_dist.data.ffcv.write import (
    SIDECAR_FORMAT,
    add_convert_arguments,
    add_verify_arguments,
    content_sha256,
    convert_command,
    verify_beton,
    verify_command,
    write_beton,
)
from rift_dist.data.sources import ArrayDataset, DataError, load_split

OK, REASON = ffcv_available()
pytestmark = pytest.mark.skipif(not OK, reason=REASON or "ffcv unavailable")

PROJECT = Path(__file__).resolve().parents[2]


def shared_data() -> Path | None:
    for cand in (os.environ.get("RIFT_SHARED_DATA", ""), str(PROJECT.parent / "shared" / "data")):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


# --------------------------------------------------------------------------- fixtures


def coord_images(n: int, size: int = 32) -> np.ndarray:
    """uint8 [n, size, size, 3]: R = 8*y, G = 8*x (32x32), B = sample id mod 256 -- every pixel says where it is from."""
    y, x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    step = 256 // size
    img = np.empty((n, size, size, 3), dtype=np.uint8)
    img[..., 0] = (y * step)[None]
    img[..., 1] = (x * step)[None]
    img[..., 2] = (np.arange(n) % 256)[:, None, None]
    return img


def smooth_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3] smooth colour gradients (JPEG-friendly, like photos)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, size)
    y, x = np.meshgrid(t, t, indexing="ij")
    a = rng.uniform(0, 255, (n, 1, 1, 3))
    b = rng.uniform(-100, 100, (n, 1, 1, 3))
    c = rng.uniform(-100, 100, (n, 1, 1, 3))
    return np.clip(a + b * y[None, ..., None] + c * x[None, ..., None], 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def small_ds() -> ArrayDataset:
    """256 coordinate-coded 32x32 images, 10 classes."""
    labels = np.arange(256) % 10
    return ArrayDataset(coord_images(256), labels, [f"c{i}" for i in range(10)], "coordinate fixture")


@pytest.fixture(scope="module")
def unique_ds() -> ArrayDataset:
    """200 images whose labels are their own indices (200 classes): labels identify samples."""
    return ArrayDataset(smooth_images(200), np.arange(200), [f"k{i}" for i in range(200)], "unique-label fixture")


@pytest.fixture(scope="module")
def files(tmp_path_factory, small_ds, unique_ds) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("betons")
    smooth = ArrayDataset(smooth_images(128, seed=1), np.arange(128) % 10, [f"c{i}" for i in range(10)], "smooth")
    return {
        "raw": write_beton(small_ds, d / "small-raw.beton", progress=False, num_workers=1),
        "unique": write_beton(unique_ds, d / "unique.beton", progress=False, num_workers=1),
        "jpeg": write_beton(smooth, d / "smooth-jpeg.beton", storage="jpeg", jpeg_quality=90, progress=False,
                               num_workers=1),
        "smooth_ds": smooth,
    }


@pytest.fixture(scope="module")
def eval_loader(files) -> FFCVLoader:
    return FFCVLoader(files["raw"], batch_size=100, train=False)


@pytest.fixture(scope="module")
def train_loader(files) -> FFCVLoader:
    return FFCVLoader(files["raw"], batch_size=64, train=True, seed=5)


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*list(loader))
    return torch.cat(xs), torch.cat(ys)


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


# --------------------------------------------------------------------------- availability, writing


def test_ffcv_available_is_cached_and_keeps_threads():
    before = torch.get_num_threads()
    assert ffcv_available() is ffcv_available()
    assert ffcv_available() == (True, "")
    assert torch.get_num_threads() == before


def test_write_refuses_overwrite_and_writes_sidecar(tmp_path, small_ds):
    path = write_beton(small_ds.subset(range(20)), tmp_path / "a.beton", progress=False, num_workers=1)
    meta = json.loads((tmp_path / "a.beton.json").read_text())
    assert meta["n"] == 20 and meta["shape"] == [32, 32, 3] and meta["storage"] == "raw"
    assert meta["classes"] == small_ds.classes and meta["size_bytes"] == path.stat().st_size
    assert meta["content_sha256"] == content_sha256(small_ds.subset(range(20)))
    with pytest.raises(DataError, match="already exists.*overwrite"):
        write_beton(small_ds, path, progress=False)
    write_beton(small_ds.subset(range(30)), path, overwrite=True, progress=False, num_workers=1)
    assert verify_beton(path)["n"] == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.beton", "a.beton.json"]  # no temp files left


def test_write_rejects_bad_arrays(tmp_path):
    class Bad:
        images = np.zeros((4, 8, 8, 3), dtype=np.float32)
        labels = np.zeros(4, dtype=np.int64)
        classes = ["a"]
        description = "bad"

    with pytest.raises(DataError, match="uint8"):
        write_beton(Bad(), tmp_path / "bad.beton", progress=False)
    assert not any(tmp_path.iterdir())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_writer_failure_raises_and_leaves_nothing(tmp_path, small_ds, monkeypatch):
    from ffcv.fields import RGBImageField

    encode = RGBImageField.encode

    def failing(self, destination, image, malloc):
        if image[0, 0, 2] == 150:  # sample 150
            raise ValueError("simulated encoder failure")
        return encode(self, destination, image, malloc)

    monkeypatch.setattr(RGBImageField, "encode", failing)
    with pytest.raises(DataError, match="writer worker died"):
        write_beton(small_ds, tmp_path / "f.beton", progress=False, worker_threads=True)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- round trips


def test_roundtrip_raw_exact_and_sequential(eval_loader, small_ds):
    assert len(eval_loader) == 3 and eval_loader.num_samples == 256
    x, y = collect(eval_loader)
    assert x.dtype == torch.float32 and x.shape == (256, 3, 32, 32) and x.is_contiguous()
    assert y.dtype == torch.int64 and y.shape == (256,)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert np.array_equal(to_uint8_nhwc(x), small_ds.images)
    assert np.array_equal(y.numpy(), small_ds.labels)


def test_roundtrip_jpeg_within_tolerance(files):
    ds = files["smooth_ds"]
    loader = FFCVLoader(files["jpeg"], batch_size=64, train=False, num_workers=1)
    x, y = collect(loader)
    err = np.abs(to_uint8_nhwc(x).astype(int) - ds.images.astype(int))
    assert err.mean() < 3.0 and np.percentile(err, 99) < 16, (err.mean(), err.max())
    assert np.array_equal(y.numpy(), ds.labels)
    assert files["jpeg"].stat().st_size < files["raw"].stat().st_size


def test_batches_are_fresh_tensors(eval_loader):
    kept = list(eval_loader)  # FFCV reuses its buffers; our batches must not change afterwards
    again = list(eval_loader)
    for (a, la), (b, lb) in zip(kept, again):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_device_path_uint8_then_convert_matches(files, train_loader):
    # The CUDA path (uint8 out of FFCV, converted on the device) exercised on the CPU.
    u8 = FFCVLoader(files["raw"], batch_size=64, train=True, seed=5, convert_in_pipeline=False)
    for epoch in (3,):
        u8.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        for (xa, ya), (xb, yb) in zip(u8, train_loader, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


# --------------------------------------------------------------------------- training augmentation


def test_training_crop_flip_statistics_and_exact_pixels(train_loader, small_ds):
    pad = 4
    assert train_loader.pad == pad and len(train_loader) == 256 // 64 and train_loader.num_samples == 256
    offsets_seen, flips_seen = [], []
    for epoch in range(3):
        train_loader.set_epoch(epoch)
        x, y = collect(train_loader)
        out = to_uint8_nhwc(x).astype(np.int64)
        ids = out[:, 16, 16, 2]  # blue channel = sample id (crop/flip keep it)
        assert np.array_equal(np.sort(ids), np.arange(256))  # a permutation of all samples
        assert np.array_equal(y.numpy(), small_ds.labels[ids])
        # Recover the crop from the centre pixels: R = 8*row, G = 8*col of the source pixel.
        flip = out[:, 16, 17, 1] < out[:, 16, 16, 1]
        oy = out[:, 16, 16, 0] // 8 - 16
        ox = out[:, 16, 16, 1] // 8 - np.where(flip, 15, 16)
        perm, plan_off, plan_flip = train_loader.epoch_plan(epoch)
        assert np.array_equal(ids, perm)
        assert np.array_equal(oy, plan_off[:, 0] - pad) and np.array_equal(ox, plan_off[:, 1] - pad)
        assert np.array_equal(flip, plan_flip)
        # Every pixel equals torchvision-style reflect padding + crop (+ flip).
        for i in range(0, 256, 37):
            padded = np.pad(small_ds.images[ids[i]], ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
            ref = padded[oy[i] + pad: oy[i] + pad + 32, ox[i] + pad: ox[i] + pad + 32]
            assert np.array_equal(out[i], ref[:, ::-1] if flip[i] else ref)
        offsets_seen += [oy, ox]
        flips_seen.append(flip)
    offsets_seen = np.concatenate(offsets_seen)
    assert set(offsets_seen.tolist()) == set(range(-pad, pad + 1))
    counts = np.bincount(offsets_seen + pad)
    assert counts.min() > 0.5 * counts.mean()  # roughly uniform over -4..4
    assert 0.43 < np.concatenate(flips_seen).mean() < 0.57


def test_epoch_order_reproducible(files, train_loader):
    again = FFCVLoader(files["raw"], batch_size=64, train=True, seed=5)
    other = FFCVLoader(files["raw"], batch_size=64, train=True, seed=6)
    for e in range(3):
        assert np.array_equal(train_loader.epoch_indices(e), again.epoch_indices(e))
    assert not np.array_equal(train_loader.epoch_indices(0), train_loader.epoch_indices(1))
    assert not np.array_equal(train_loader.epoch_indices(0), other.epoch_indices(0))


def test_early_break_then_full_epoch(train_loader):
    threads = threading.active_count()
    for i, _ in enumerate(train_loader):
        if i == 1:
            break
    assert threading.active_count() <= threads
    train_loader.set_epoch(7, start_batch=2)
    assert len(list(train_loader)) == len(train_loader) - 2
    assert len(list(train_loader)) == len(train_loader)  # start_batch applies once


# --------------------------------------------------------------------------- sharding


def test_two_rank_training_shards(files, unique_ds):
    B = 40  # global batch; 200 samples -> 5 global batches, per-rank batch 20
    ranks = [FFCVLoader(files["unique"], batch_size=B, train=True, seed=1, rank=r, world_size=2) for r in range(2)]
    one = FFCVLoader(files["unique"], batch_size=B, train=True, seed=1)
    assert [len(r) for r in ranks] == [5, 5] and ranks[0].batch_size == 20 and ranks[0].num_samples == 100
    orders = []
    for e in range(3):
        a, b = (r.epoch_indices(e) for r in ranks)
        assert not set(a) & set(b) and sorted(np.concatenate([a, b])) == list(range(200))
        # global batch k of one rank = rank 0's k-th batch followed by rank 1's
        merged = np.stack([a.reshape(5, 20), b.reshape(5, 20)], axis=1).reshape(-1)
        assert np.array_equal(merged, one.epoch_indices(e))
        orders.append(a)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    # What a rank yields is what it plans (labels = sample ids in this fixture).
    ranks[1].set_epoch(2)
    _, y = collect(ranks[1])
    assert np.array_equal(y.numpy(), unique_ds.labels[ranks[1].epoch_indices(2)])
    # Same arguments, new loaders: same order.
    again = FFCVLoader(files["unique"], batch_size=B, train=True, seed=1, rank=1, world_size=2)
    assert np.array_equal(again.epoch_indices(2), ranks[1].epoch_indices(2))


def test_two_rank_training_drops_incomplete_global_batch(files):
    ranks = [FFCVLoader(files["unique"], batch_size=64, train=True, seed=0, rank=r, world_size=2) for r in range(2)]
    a, b = (r.epoch_indices(0) for r in ranks)
    assert len(a) == len(b) == 96 and not set(a) & set(b)  # 3 global batches of 64; 8 samples dropped
    with pytest.raises(DataError, match="not divisible"):
        FFCVLoader(files["unique"], batch_size=63, train=True, rank=0, world_size=2)
    with pytest.raises(DataError, match="fewer than one global batch"):
        FFCVLoader(files["unique"], batch_size=256, train=True)


def test_two_rank_eval_contiguous_shards(files):
    shards = [FFCVLoader(files["unique"], batch_size=32, train=False, rank=r, world_size=3) for r in range(3)]
    got = [s.epoch_indices() for s in shards]
    assert [len(g) for g in got] == [67, 67, 66]
    assert np.array_equal(np.concatenate(got), np.arange(200))
    assert [len(s) for s in shards] == [3, 3, 3] and shards[2].num_samples == 66


# --------------------------------------------------------------------------- verification


def test_verify_report(files):
    r = verify_beton(files["raw"], expected_len=256, num_classes=10)
    assert r["n"] == 256 and r["shape"] == [32, 32, 3] and r["storage"] == "raw"
    assert sum(r["label_counts"]) == 256 and r["decoded"] == [0, 128, 255]
    with pytest.raises(DataError, match="expected 300"):
        verify_beton(files["raw"], expected_len=300)


def test_truncated_file_fails(tmp_path, files):
    bad = tmp_path / "trunc.beton"
    shutil.copy(files["raw"], bad)
    shutil.copy(str(files["raw"]) + ".json", str(bad) + ".json")
    with open(bad, "r+b") as fh:
        fh.truncate(bad.stat().st_size // 2)
    with pytest.raises(DataError, match=r"trunc\.beton.*truncated"):
        verify_beton(bad)
    with pytest.raises(DataError, match="truncated"):  # the loader checks before it starts
        FFCVLoader(bad, batch_size=8, train=False)
    # Even with a sidecar that agrees on the size, the structure gives it away.
    meta = json.loads(Path(str(bad) + ".json").read_text())
    meta["size_bytes"] = bad.stat().st_size
    Path(str(bad) + ".json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"trunc\.beton"):
        verify_beton(bad)


def _write_foreign(path: Path, fields: dict, samples) -> None:
    """A .beton with arbitrary fields, written by FFCV directly, plus a sidecar claiming it is ours."""
    from ffcv.writer import DatasetWriter

    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(samples)
    meta = {"format": SIDECAR_FORMAT, "n": len(samples), "shape": [8, 8, 3], "storage": "raw",
            "size_bytes": path.stat().st_size, "classes": ["a", "b"], "num_classes": 2}
    Path(str(path) + ".json").write_text(json.dumps(meta))


def test_wrong_fields_fail(tmp_path):
    from ffcv.fields import FloatField, IntField, RGBImageField

    img = np.zeros((8, 8, 3), dtype=np.uint8)
    swapped = tmp_path / "swapped.beton"
    _write_foreign(swapped, {"label": IntField(), "image": RGBImageField()}, [(1, img)] * 4)
    with pytest.raises(DataError, match=r"swapped\.beton: wrong fields"):
        verify_beton(swapped)
    floats = tmp_path / "float-label.beton"
    _write_foreign(floats, {"image": RGBImageField(), "label": FloatField()}, [(img, 0.5)] * 4)
    with pytest.raises(DataError, match=r"float-label\.beton: wrong fields.*FloatField"):
        verify_beton(floats)
    with pytest.raises(DataError, match="wrong fields"):
        FFCVLoader(floats, batch_size=2, train=False)


def test_missing_sidecar_and_label_range(tmp_path, files):
    lonely = tmp_path / "lonely.beton"
    shutil.copy(files["raw"], lonely)
    with pytest.raises(DataError, match=r"lonely\.beton: its sidecar lonely\.beton\.json is missing"):
        verify_beton(lonely)
    with pytest.raises(DataError, match=r"labels span \[0, 9\].*5 classes"):
        verify_beton(files["raw"], num_classes=5)
    with pytest.raises(DataError, match="no such .beton"):
        verify_beton(tmp_path / "absent.beton")
    # a file that is no .beton at all (a config given by mistake) is named as such: no advice to delete it
    config = tmp_path / "config.yaml"
    config.write_text("seed: 0\n")
    with pytest.raises(DataError, match=r"config\.yaml: not a \.beton file") as info:
        verify_beton(config)
    assert "delete" not in str(info.value) and config.read_text() == "seed: 0\n"


def test_verify_and_convert_cli(tmp_path, files, cifar_subset):
    p = argparse.ArgumentParser()
    add_verify_arguments(p)
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert verify_command(p.parse_args([str(files["raw"])])) == 0
    assert "OK" in buf.getvalue() and "256 images 32x32x3" in buf.getvalue()
    lonely = tmp_path / "x.beton"
    shutil.copy(files["raw"], lonely)
    with redirect_stdout(io.StringIO()) as out:
        assert verify_command(p.parse_args([str(files["raw"]), str(lonely)])) == 1
    assert "FAIL" in out.getvalue() and "sidecar" in out.getvalue()

    c = argparse.ArgumentParser()
    add_convert_arguments(c)
    args = c.parse_args(["cifar10", "--root", str(cifar_subset), "--out", str(tmp_path / "out"), "--workers", "1"])
    with redirect_stdout(io.StringIO()) as out:
        assert convert_command(args) == 0
    train = tmp_path / "out" / "cifar10-raw" / "train.beton"
    assert f"train: {train}" in out.getvalue()
    assert verify_beton(train, num_classes=10)["n"] == 200
    with redirect_stdout(io.StringIO()) as out:  # second run keeps (and verifies) the files
        assert convert_command(args) == 0
    assert "kept" in out.getvalue()


def test_convert_refusing_a_split_writes_nothing(tmp_path):
    """A Tiny-ImageNet tree whose val/ lacks val_annotations.txt: refused before train.beton is written."""
    from tests.conftest import write_tiny_imagenet

    base = write_tiny_imagenet(tmp_path / "src", wnids=("n01", "n02"), n_train=2)
    (base / "val" / "val_annotations.txt").unlink()
    c = argparse.ArgumentParser()
    add_convert_arguments(c)
    args = c.parse_args(["tiny-imagenet", "--root", str(base), "--out", str(tmp_path / "out"), "--workers", "1"])
    with redirect_stderr(io.StringIO()) as err:
        assert convert_command(args) == 2
    assert "val_annotations.txt" in err.getvalue()
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()] if (tmp_path / "out").exists() else []
    assert written == []


# --------------------------------------------------------------------------- config checks


def test_check_ffcv_config_rejects_quasi_random_with_ranks():
    cfg = RunConfig()
    cfg.data.order = "quasi_random"
    check_ffcv_config(cfg, world_size=1)
    with pytest.raises(ConfigError, match="quasi_random with 2 processes"):
        check_ffcv_config(cfg, world_size=2)
    with pytest.raises(ConfigError, match="quasi_random"):
        build_ffcv_loader(cfg, "train", 0, 2)
    cfg.data.order = "random"
    cfg.data.ffcv_jpeg_quality = 0
    with pytest.raises(ConfigError, match="ffcv_jpeg_quality"):
        check_ffcv_config(cfg, world_size=1)


def test_quasi_random_single_rank(files):
    loader = FFCVLoader(files["unique"], batch_size=50, train=True, seed=2, quasi_random=True)
    order = loader.epoch_indices(0)
    assert len(order) == 200 and sorted(order) == list(range(200))
    x, y = collect(loader)
    assert np.array_equal(y.numpy(), order)


def test_threads_restored_after_build_and_epoch(files, eval_loader):
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # FFCV would set its worker count (2)
    try:
        FFCVLoader(files["unique"], batch_size=50, train=False, num_workers=2)
        assert torch.get_num_threads() == 3
        list(eval_loader)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- real data


def _extract(archive: Path, dest: Path, want) -> None:
    """Extract the members for which ``want(name)`` is true (one pass over the archive)."""
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar:
            if m.isfile() and want(m.name):
                target = dest / m.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(m).read())


@pytest.fixture(scope="module")
def cifar_subset(tmp_path_factory) -> Path:
    """20 train and 10 test images per class of the real CIFAR-10 JPEG archive (folder layout)."""
    data = shared_data()
    if data is None or not (data / "cifar10-jpeg.tar.gz").is_file():
        pytest.skip("../shared/data/cifar10-jpeg.tar.gz not found (set RIFT_SHARED_DATA)")
    dest = tmp_path_factory.mktemp("cifar")
    counts: dict[tuple[str, str], int] = {}

    def want(name: str) -> bool:
        parts = name.split("/")  # cifar10-jpeg/<split>/<class>/<file>.jpg
        if len(parts) != 4 or parts[1] not in ("train", "test"):
            return False
        key = (parts[1], parts[2])
        if counts.get(key, 0) >= (20 if parts[1] == "train" else 10):
            return False
        counts[key] = counts.get(key, 0) + 1
        return True

    _extract(data / "cifar10-jpeg.tar.gz", dest, want)
    return dest / "cifar10-jpeg"


@pytest.fixture(scope="module")
def tiny_subset(tmp_path_factory) -> Path:
    """2 train images per class (400) and the first 100 val images of the real Tiny-ImageNet archive."""
    data = shared_data()
    if data is None or not (data / "tiny-imagenet-200-sub100.tar.gz").is_file():
        pytest.skip("../shared/data/tiny-imagenet-200-sub100.tar.gz not found (set RIFT_SHARED_DATA)")
    dest = tmp_path_factory.mktemp("tiny")
    counts: dict[str, int] = {}
    val_names = {f"val_{i}.JPEG" for i in range(100)}

    def want(name: str) -> bool:
        parts = name.split("/")
        if name.endswith(("wnids.txt", "val_annotations.txt")):
            return True
        if len(parts) == 4 and parts[1] == "val" and parts[3] in val_names:
            return True
        if len(parts) == 5 and parts[1] == "train" and parts[3] == "images":
            counts[parts[2]] = counts.get(parts[2], 0) + 1
            return counts[parts[2]] <= 2
        return False

    _extract(data / "tiny-imagenet-200-sub100.tar.gz", dest, want)
    base = dest / "tiny-imagenet-200"
    ann = base / "val" / "val_annotations.txt"
    ann.write_text("".join(line + "\n" for line in ann.read_text().splitlines() if line.split("\t")[0] in val_names))
    return base


def test_real_cifar10_roundtrip_jpeg(tmp_path, cifar_subset):
    # (Raw storage of the real images is exact: test_ffcv_matches_torch_loader compares every batch.)
    ds = load_split("cifar10", cifar_subset, "train")
    assert len(ds) == 200 and ds.images.shape[1:] == (32, 32, 3)
    jpg = write_beton(ds, tmp_path / "c-jpg.beton", storage="jpeg", jpeg_quality=90, progress=False, num_workers=1)
    x, y = collect(FFCVLoader(jpg, batch_size=64, train=False))
    err = np.abs(to_uint8_nhwc(x).astype(int) - ds.images.astype(int))
    assert err.mean() < 4.0, err.mean()
    assert np.array_equal(y.numpy(), ds.labels)


def test_real_tiny_imagenet_roundtrip_jpeg(tmp_path, tiny_subset):
    train = load_split("tiny-imagenet", tiny_subset, "train")
    test = load_split("tiny-imagenet", tiny_subset, "test")
    assert len(train) == 400 and train.images.shape[1:] == (64, 64, 3) and len(test) == 100
    path = write_beton(train, tmp_path / "t.beton", storage="jpeg", progress=False, num_workers=1)
    assert verify_beton(path, num_classes=200)["jpeg_quality"] == 90
    loader = FFCVLoader(path, batch_size=100, train=True, seed=0, num_workers=2)
    assert loader.pad == 8
    x, y = collect(loader)
    assert x.shape == (400, 3, 64, 64) and sorted(y.tolist()) == sorted(train.labels.tolist())
    ev = FFCVLoader(path, batch_size=128, train=False)
    x, y = collect(ev)
    err = np.abs(to_uint8_nhwc(x).astype(int) - train.images.astype(int))
    assert err.mean() < 4.0, err.mean()
    assert np.array_equal(y.numpy(), train.labels)


def _cfg(root: Path, cache: Path, loader: str) -> RunConfig:
    cfg = RunConfig()
    cfg.seed = 3
    cfg.data.dataset = "cifar10"
    cfg.data.root = str(root)
    cfg.data.cache_dir = str(cache)
    cfg.data.loader = loader
    cfg.data.val_size = 20
    cfg.data.batch_size = 32
    cfg.data.eval_batch_size = 48
    cfg.data.num_workers = 0
    return cfg


def test_ffcv_matches_torch_loader(tmp_path, cifar_subset):
    loaders = pytest.importorskip("rift_dist.data.loaders", reason="rift_dist.data.loaders not written yet")
    from rift_dist.data import sources

    sources.clear_cache()
    ffcv_cfg, torch_cfg = _cfg(cifar_subset, tmp_path, "ffcv"), _cfg(cifar_subset, tmp_path, "torch")
    for split, train in (("test", False), ("val", False), ("train", True)):
        a = loaders.build_loader(ffcv_cfg, split)
        b = loaders.build_loader(torch_cfg, split)
        assert isinstance(a, FFCVLoader) and not isinstance(b, FFCVLoader)
        assert (len(a), a.num_samples) == (len(b), b.num_samples)
        for epoch in ((0, 1) if train else (0,)):
            a.set_epoch(epoch)
            b.set_epoch(epoch)
            for (xa, ya), (xb, yb) in zip(a, b, strict=True):
                assert torch.equal(ya, yb), split
                assert torch.equal(xa, xb), split  # same order, same pixels (and same crops)
    assert (tmp_path / "ffcv" / "cifar10-raw" / "train.beton").is_file()
    # An ArrayDataset handed in is served from a file keyed by its content; indices select within it.
    ds = loaders.get_dataset(torch_cfg, "val")
    a = loaders.build_loader(ffcv_cfg, "eval", train=False, dataset=ds, indices=[3, 1, 4])
    b = loaders.build_loader(torch_cfg, "eval", train=False, dataset=ds, indices=[3, 1, 4])
    (xa, ya), = list(a)
    (xb, yb), = list(b)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert loaders.build_loader(ffcv_cfg, "eval", train=False, dataset=ds, indices=[3, 1, 4]) is a  # reused


def test_stale_cache_file_is_rewritten(tmp_path, cifar_subset):
    from rift_dist.data import sources, splits

    sources.clear_cache()
    cfg = _cfg(cifar_subset, tmp_path, "ffcv")
    cfg.precision.channels_last = "on"
    loader = build_ffcv_loader(cfg, "test")
    path = tmp_path / "ffcv" / "cifar10-raw" / "test.beton"
    x, _ = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last)
    meta = json.loads(Path(str(path) + ".json").read_text())
    assert meta["content_sha256"] == splits.make_splits(cfg.data).record["full_test_sha256"]
    meta["content_sha256"] = "0" * 64  # pretend the source changed
    Path(str(path) + ".json").write_text(json.dumps(meta))
    build_ffcv_loader(cfg, "test")
    assert json.loads(Path(str(path) + ".json").read_text())["content_sha256"] != "0" * 64
