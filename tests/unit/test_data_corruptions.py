"""rift_dist.data.corruptions: loading -C sets, re-generation, the imagecorruptions bridge, the CLI."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest

from rift_dist.config import RunConfig
from rift_dist.data.corruptions import AUTHORS_CORRUPTIONS, AUTHORS_USED_CORRUPTIONS, CIFAR_CORRUPTIONS
from rift_dist.data.corruptions import generate, kernels, upstream
from rift_dist.data.corruptions.generate import generate_corruption_set
from rift_dist.data.corruptions.kernels import corrupt_batch
from rift_dist.data.corruptions.load import load_corruption_set
from rift_dist.data.datasets import CIFAR10_CLASSES
from rift_dist.data.sources import ArrayDataset, DataError, load_split
from tests.conftest import id_images, shared_data_dir, write_c_npy, write_image_folder, write_tiny_c

N_IMAGES = 40


def test_corruption_lists():
    assert len(CIFAR_CORRUPTIONS) == 15 and len(set(CIFAR_CORRUPTIONS)) == 15
    assert len(AUTHORS_CORRUPTIONS) == 19 and AUTHORS_CORRUPTIONS[:15] == CIFAR_CORRUPTIONS
    assert {"speckle_noise", "gaussian_blur", "spatter", "saturate"} <= set(AUTHORS_CORRUPTIONS)
    assert len(AUTHORS_USED_CORRUPTIONS) == 18 and set(AUTHORS_CORRUPTIONS) - set(AUTHORS_USED_CORRUPTIONS) == {"glass_blur"}
    for params in kernels.SEVERITY_PARAMS.values():
        assert all(len(params[c]) == 5 for c in AUTHORS_CORRUPTIONS)


# --------------------------------------------------------------------------- loading


def test_load_npy_layout_slices_severities(tmp_path):
    root, labels = write_c_npy(tmp_path / "CIFAR-10-C", ["fog", "snow"], n=7)
    sets = load_corruption_set(tmp_path, "cifar10", ["snow", "fog"], [2, 5])  # parent dir is found
    assert [(c, s) for c, s, _ in sets] == [("snow", 2), ("snow", 5), ("fog", 2), ("fog", 5)]
    for name, sev, ds in sets:
        assert ds.images.shape == (7, 32, 32, 3) and ds.labels.dtype == np.int64 and ds.classes == CIFAR10_CLASSES
        assert (ds.images[..., 0] == ["fog", "snow"].index(name)).all() and (ds.images[..., 1] == sev).all()
        assert list(ds.images[:, 0, 0, 2]) == list(range(7)) and list(ds.labels) == list(labels)
        assert "official layout" in ds.description


def test_load_subset_same_positions_everywhere(tmp_path):
    write_c_npy(tmp_path, ["fog", "contrast"], n=40)
    sets = load_corruption_set(tmp_path, "cifar10", ["fog", "contrast"], [1, 3], subset=20, seed=1)
    positions = [tuple(ds.images[:, 0, 0, 2]) for _, _, ds in sets]
    assert len(set(positions)) == 1 and len(positions[0]) == 20
    assert list(np.bincount(sets[0][2].labels)) == [2] * 10
    other = load_corruption_set(tmp_path, "cifar10", ["fog"], [1], subset=20, seed=2)[0][2]
    assert tuple(other.images[:, 0, 0, 2]) != positions[0]


def test_missing_files_one_error_listing_all(tmp_path):
    write_c_npy(tmp_path, ["fog"], n=5)
    (tmp_path / "labels.npy").unlink()
    with pytest.raises(DataError) as err:
        load_corruption_set(tmp_path, "cifar10", ["fog", "snow", "frost"], [1])
    msg = str(err.value)
    assert "missing 3 file(s)" in msg and all(f in msg for f in ("labels.npy", "snow.npy", "frost.npy"))
    assert "fog.npy" not in msg.split("missing")[1]


def test_malformed_sets(tmp_path):
    write_c_npy(tmp_path, ["fog"], n=6)
    np.save(tmp_path / "labels.npy", np.zeros(31, np.uint8))
    with pytest.raises(DataError, match="31 labels is not a multiple of the 5"):
        load_corruption_set(tmp_path, "cifar10", ["fog"], [1])
    np.save(tmp_path / "labels.npy", np.zeros(30, np.uint8))
    np.save(tmp_path / "fog.npy", np.zeros((30, 32, 32, 3), np.float32))
    with pytest.raises(DataError, match="fog.npy: expected uint8"):
        load_corruption_set(tmp_path, "cifar10", ["fog"], [1])
    with pytest.raises(DataError, match="unknown corruption"):
        load_corruption_set(tmp_path, "cifar10", ["rain"], [1])
    with pytest.raises(DataError, match="severities"):
        load_corruption_set(tmp_path, "cifar10", ["fog"], [6])
    with pytest.raises(DataError, match="does not exist.*corruption_generate"):
        load_corruption_set(tmp_path / "nope", "cifar10", ["fog"], [1])


def test_tiny_imagenet_c_folders(tmp_path):
    write_tiny_c(tmp_path / "Tiny-ImageNet-C", ["fog", "snow"], [1, 4], wnids=("n02", "n01"), per_class=3)
    sets = load_corruption_set(tmp_path, "tiny-imagenet", ["fog", "snow"], [4, 1])
    assert [(c, s) for c, s, _ in sets] == [("fog", 4), ("fog", 1), ("snow", 4), ("snow", 1)]
    ds = sets[0][2]
    assert ds.classes == ["n01", "n02"] and ds.images.shape == (6, 64, 64, 3)
    assert (ds.images[:, 0, 0, 0] == 4).all()
    # label = index among sorted wnid folders; pixel (0,0,1) holds the writer's index of ("n02", "n01")
    np.testing.assert_array_equal(ds.labels, 1 - ds.images[:, 0, 0, 1])
    with pytest.raises(DataError) as err:
        load_corruption_set(tmp_path, "tiny-imagenet", ["fog", "frost"], [1, 2])
    assert "missing 3 director" in str(err.value) and "frost/1" in str(err.value) and "fog/2" in str(err.value)
    sub = load_corruption_set(tmp_path, "tiny-imagenet", ["fog"], [1], subset=2)[0][2]
    assert sorted(sub.labels.tolist()) == [0, 1]


# --------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def clean() -> ArrayDataset:
    """40 real CIFAR-10 test images (4 per class) when the shared data exist, else smooth synthetic ones."""
    data = shared_data_dir()
    if data is not None and (data / "cifar10-jpeg.tar.gz").is_file():
        import tarfile

        from PIL import Image

        counts, imgs, labels = {}, [], []
        with tarfile.open(data / "cifar10-jpeg.tar.gz") as tf:
            for m in tf:
                parts = m.name.split("/")
                if len(parts) == 4 and parts[1] == "test" and counts.get(parts[2], 0) < 4:
                    counts[parts[2]] = counts.get(parts[2], 0) + 1
                    imgs.append(np.asarray(Image.open(tf.extractfile(m)).convert("RGB")))
                    labels.append(CIFAR10_CLASSES.index(parts[2]))
                    if len(imgs) == N_IMAGES:
                        break
        return ArrayDataset(np.stack(imgs), np.array(labels), CIFAR10_CLASSES, "real CIFAR-10 test sample")
    return ArrayDataset(id_images(range(N_IMAGES)), np.arange(N_IMAGES) % 10, CIFAR10_CLASSES, "synthetic")


@pytest.fixture(scope="module")
def generated(clean, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "CIFAR-10-C"
    generate_corruption_set(clean, out, CIFAR_CORRUPTIONS, seed=3, progress=False)
    return out


def test_generated_layout_and_metadata(generated, clean):
    n = len(clean)
    labels = np.load(generated / "labels.npy")
    assert labels.dtype == np.uint8 and labels.shape == (5 * n,)
    np.testing.assert_array_equal(labels, np.tile(clean.labels, 5))
    for name in CIFAR_CORRUPTIONS:
        arr = np.load(generated / f"{name}.npy")
        assert arr.dtype == np.uint8 and arr.shape == (5 * n, 32, 32, 3), name
    meta = json.loads((generated / "metadata.json").read_text())
    assert meta["regenerated"] is True and "NOT the official" in meta["note"]
    assert (meta["n"], meta["seed"], meta["severities"], meta["params"]) == (n, 3, [1, 2, 3, 4, 5], "cifar")
    assert meta["source"]["description"] == clean.description and len(meta["source"]["sha256"]) == 64
    assert set(meta["implementation"]) == set(CIFAR_CORRUPTIONS)
    assert {"glass_blur", "fog"} <= set(meta["fallback"])  # broken in imagecorruptions 1.1.2 on NumPy 2 / skimage
    assert meta["versions"]["numpy"] == np.__version__ and "imagecorruptions" in meta["versions"]
    assert [f for f in os.listdir(generated.parent) if ".tmp-" in f] == []
    # loads back through the official-layout reader
    sets = load_corruption_set(generated, "cifar10", ["fog", "jpeg_compression"], [1, 5])
    assert "RE-GENERATED" in sets[0][2].description
    np.testing.assert_array_equal(sets[1][2].images, np.load(generated / "fog.npy")[4 * n :])


def test_every_corruption_changes_images_more_at_severity_5(generated, clean):
    n = len(clean)
    x = clean.images.astype(np.float64)
    for name in CIFAR_CORRUPTIONS:
        arr = np.load(generated / f"{name}.npy").astype(np.float64)
        d = [np.abs(arr[k * n : (k + 1) * n] - x).mean() for k in range(5)]
        assert min(d) > 0.5, (name, d)  # every severity changes the images
        if name == "elastic_transform":
            continue  # see test_elastic_transform_local_distortion_grows_with_severity
        assert d[4] > d[0], (name, d)


def test_elastic_transform_local_distortion_grows_with_severity():
    """CIFAR-10-C's elastic constants shrink the random affine part with severity (0.08 -> 0.03 of the
    image size) while the local elastic field grows (alpha 0 -> 0.1), so the raw pixel change is
    LARGER at severity 1. What grows is the non-affine distortion: warp a coordinate image (R = 8y,
    G = 8x) and measure the residual of an affine fit to the recovered source coordinates."""
    n = 20
    yy, xx = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    img = np.zeros((n, 32, 32, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 8 * yy, 8 * xx, 128
    inner = (slice(8, 24), slice(8, 24))
    design = np.stack([yy[inner].ravel(), xx[inner].ravel(), np.ones(256)], 1).astype(float)

    def non_affine_px(out):
        res = []
        for i in range(n):
            for ch in (0, 1):
                target = out[i][inner][..., ch].astype(float).ravel() / 8
                coef, *_ = np.linalg.lstsq(design, target, rcond=None)
                res.append(np.sqrt(np.mean((design @ coef - target) ** 2)))
        return float(np.mean(res))

    r = [non_affine_px(corrupt_batch(img, "elastic_transform", s, s)) for s in range(1, 6)]
    changed = [np.abs(corrupt_batch(img, "elastic_transform", s, s).astype(int) - img).mean() for s in (1, 5)]
    assert r[0] < 0.1 and r[4] > 0.3 and r[4] > 3 * r[0], r  # severity 1 is a pure affine warp
    assert min(changed) > 1.0, changed


def test_generation_is_seeded_and_skips_when_complete(generated, clean, capsys):
    before = os.path.getmtime(generated / "metadata.json")
    assert generate_corruption_set(clean, generated, ["fog"], seed=3, progress=True) == generated
    assert "complete; skipping" in capsys.readouterr().err
    assert os.path.getmtime(generated / "metadata.json") == before
    with pytest.raises(DataError, match="already holds a different corruption set"):
        generate_corruption_set(clean, generated, ["fog"], seed=4, progress=False)
    again = corrupt_batch(clean.images, "fog", 3, np.random.default_rng([3, AUTHORS_CORRUPTIONS.index("fog"), 3]))
    n = len(clean)
    np.testing.assert_array_equal(again, np.load(generated / "fog.npy")[2 * n : 3 * n])
    assert not np.array_equal(corrupt_batch(clean.images, "gaussian_noise", 3, 1), corrupt_batch(clean.images, "gaussian_noise", 3, 2))


def test_partial_severities_and_extra_corruptions(clean, tmp_path):
    out = generate_corruption_set(clean.subset(range(10)), tmp_path / "s", ["saturate", "spatter", "speckle_noise", "gaussian_blur"],
                                  severities=[5, 2], seed=0, progress=False)
    assert np.load(out / "saturate.npy").shape == (20, 32, 32, 3)
    sets = load_corruption_set(out, "cifar10", ["spatter"], [2])
    assert len(sets[0][2]) == 10
    with pytest.raises(DataError, match=r"severities \[1\] are not in this set"):
        load_corruption_set(out, "cifar10", ["spatter"], [1])
    with pytest.raises(DataError, match="not a corruption set made by rift_dist"):
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "x").write_text("x")
        generate_corruption_set(clean, tmp_path / "junk", ["fog"], progress=False)


def test_tiny_imagenet_constants_for_64px():
    imgs = np.repeat(np.repeat(id_images(range(4)), 2, axis=1), 2, axis=2)  # 64x64
    out = corrupt_batch(imgs, "motion_blur", 5, 0)
    assert out.shape == imgs.shape and not np.array_equal(out, imgs)
    with pytest.raises(DataError, match="no corruption constants for 48x48"):
        corrupt_batch(np.zeros((1, 48, 48, 3), np.uint8), "fog", 1)
    assert corrupt_batch(np.zeros((1, 48, 48, 3), np.uint8), "contrast", 1, params="cifar").shape == (1, 48, 48, 3)


# --------------------------------------------------------------------------- imagecorruptions bridge


def test_imagecorruptions_status_reports_breakage():
    status = upstream.imagecorruptions_status()
    if status["version"] is None:
        pytest.skip("imagecorruptions not installed")
    import sys

    assert "import" in status
    if upstream._IC.module is not None:
        assert set(status["working"]) | set(status["broken"]) == set(AUTHORS_CORRUPTIONS)
        if int(np.__version__.split(".")[0]) >= 2 and status["version"] == "1.1.2":
            assert "fog" in status["broken"] and "np.float_" in status["broken"]["fog"]
            assert {"glass_blur", "gaussian_blur"} <= set(status["broken"])
    shim = sys.modules.get("pkg_resources")
    assert shim is None or getattr(shim, "__file__", None)  # the temporary stand-in is gone again
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    upstream._PROBE = None  # probe again: it must leave the global numpy RNG where it was
    upstream.imagecorruptions_status()
    assert np.random.random() == expected


def test_local_helpers_match_imagecorruptions():
    motion, disk = upstream._IC.helper("_motion_blur"), upstream._IC.helper("disk")
    if motion is None or disk is None:
        pytest.skip("imagecorruptions helpers unavailable")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3)).astype(np.float64)
    for radius, sigma, angle in [(6, 1, 30.0), (9, 2.5, -44.0), (14, 12, -100.0)]:
        np.testing.assert_allclose(kernels._motion_blur_local(img, radius, sigma, angle), motion(img, radius, sigma, angle), atol=1e-3)
    for radius, alias in [(0.3, 0.4), (1.5, 0.1), (3, 0.1)]:
        np.testing.assert_allclose(kernels._disk_local(radius, alias), disk(radius, alias), atol=1e-7)


def test_generation_without_imagecorruptions_uses_recorded_fallbacks(monkeypatch, tmp_path):
    missing = upstream._ImageCorruptions()
    missing._loaded, missing.import_note = True, "imagecorruptions is not installed"
    monkeypatch.setattr(upstream, "_IC", missing)
    monkeypatch.setattr(kernels, "_FROST_CACHE", {})
    ds = ArrayDataset(id_images(range(10)), np.arange(10), CIFAR10_CLASSES, "ids")
    names = ["motion_blur", "snow", "frost", "defocus_blur", "fog", "contrast"]
    out = generate_corruption_set(ds, tmp_path / "x", names, severities=[1, 5], progress=False)
    meta = json.loads((out / "metadata.json").read_text())
    assert set(meta["fallback"]) == {"motion_blur", "snow", "frost", "defocus_blur", "fog"}
    assert "synthetic" in meta["implementation"]["frost"] and meta["imagecorruptions"]["import"] == missing.import_note
    for name in names:
        arr = np.load(out / f"{name}.npy")
        assert np.abs(arr[10:].astype(int) - ds.images).mean() > 1.0, name


def test_clipped_zoom_matches_scipy():
    from scipy.ndimage import zoom

    x = np.random.default_rng(1).random((3, 32, 32, 3)).astype(np.float32)
    for f in (1.0, 1.07, 1.25, 1.75, 2.25):
        ch = int(np.ceil(32 / f))
        top = (32 - ch) // 2
        ref = zoom(x[:, top : top + ch, top : top + ch], (1, f, f, 1), order=1)
        trim = (ref.shape[1] - 32) // 2
        np.testing.assert_allclose(kernels._clipped_zoom(x, f), ref[:, trim : trim + 32, trim : trim + 32], atol=1e-5)


# --------------------------------------------------------------------------- config entry + CLI


def test_get_corruption_sets_generates_into_cache(tmp_path, fresh_data_cache):
    root = write_image_folder(tmp_path / "data", CIFAR10_CLASSES, 3, 2)
    cfg = RunConfig()
    cfg.data.root, cfg.data.cache_dir, cfg.data.val_size, cfg.data.decode_cache = str(root), str(tmp_path / "cache"), 0, False
    cfg.data.corruptions, cfg.data.severities = ["contrast", "pixelate"], [1, 5]
    with pytest.raises(DataError, match="no corruption set configured"):
        generate.get_corruption_sets(cfg)
    cfg.data.corruption_generate, cfg.data.corruption_subset = True, 10
    sets = generate.get_corruption_sets(cfg)
    assert [(c, s, len(d)) for c, s, d in sets] == [("contrast", 1, 10), ("contrast", 5, 10), ("pixelate", 1, 10), ("pixelate", 5, 10)]
    assert len(list((tmp_path / "cache" / "corruptions").iterdir())) == 1
    cfg.data.corruption_root = str(tmp_path / "mine")  # empty: generated there
    generate.get_corruption_sets(cfg)
    assert (tmp_path / "mine" / "metadata.json").is_file()


def test_cli(tmp_path, capsys):
    root = write_image_folder(tmp_path / "data", CIFAR10_CLASSES, 1, 3)
    parser = generate.add_corrupt_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--root", str(root), "--out", str(tmp_path / "out"), "--n", "20", "--seed", "2",
                              "--corruptions", "brightness", "contrast", "--severities", "1", "3", "--quiet"])
    assert generate.corrupt_command(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["n"] == 20 and meta["source"]["split"] == "test" and meta["corruptions"] == ["brightness", "contrast"]
    assert np.load(tmp_path / "out" / "contrast.npy").shape == (40, 32, 32, 3)
    bad = parser.parse_args(["--root", str(tmp_path / "none"), "--out", str(tmp_path / "o2"), "--quiet"])
    assert generate.corrupt_command(bad) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_without_a_data_location_names_its_own_options(tmp_path, capsys, monkeypatch):
    """It said 'set data.root in the config (or --set data.root=DIR)', options rift data corrupt does not have."""
    monkeypatch.delenv("RIFT_DATA_ROOT", raising=False)
    parser = generate.add_corrupt_arguments(argparse.ArgumentParser())
    assert generate.corrupt_command(parser.parse_args(["--out", str(tmp_path / "o"), "--quiet"])) == 2
    err = capsys.readouterr().err
    assert "--root DIR" in err and "--archive" in err and "--set" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_generation_speed_1000_real_images(real_cifar_root, tmp_path):
    """15 corruptions x 5 severities for 1000 images: within a couple of minutes on 2 cores."""
    import time

    test = load_split("cifar10", real_cifar_root, "test").subset(range(0, 10000, 10))
    t = time.time()
    generate_corruption_set(test, tmp_path / "c", CIFAR_CORRUPTIONS, progress=False)
    assert time.time() - t < 150
