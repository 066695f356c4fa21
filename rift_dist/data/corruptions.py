"""Common-corruption test sets: load CIFAR-10-C / CIFAR-100-C / Tiny-ImageNet-C, or re-generate them.

Reference: Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019 (https://github.com/hendrycks/robustness; CIFAR-10-C on Zenodo 2535967).

Layouts read by :func:`load_corruption_set`:

* CIFAR-10-C / CIFAR-100-C: ``<corruption>.npy`` uint8 ``[5n, 32, 32, 3]`` = severities 1..5 stacked
  in order (n = 10000 in the release), ``labels.npy`` ``[5n]`` (the test labels tiled 5 times).
  Smaller re-generated sets (any n) are accepted: n = len(labels) / number of severities stored.
* Tiny-ImageNet-C: ``<corruption>/<severity>/<wnid>/*.JPEG`` (labels = index of the wnid among the
  sorted wnid folders, as torchvision's ImageFolder and the RiFT authors' code do).

:func:`generate_corruption_set` writes the CIFAR layout plus ``metadata.json`` that states the set is
a RE-GENERATION, not the official release. The severity constants are those of the original
generation scripts for small images -- ``make_cifar_c.py`` (32x32) and ``make_tinyimagenet_c.py``
(64x64) -- not the ImageNet-C constants that the ``imagecorruptions`` package hard-codes for 224 px
images. Each corruption is implemented here, batch-vectorised, with a seeded
``numpy.random.Generator`` (reproducible; independent of which other corruptions are requested).
The package's own corruption functions are not called to make the images: they hard-code the
ImageNet-C constants, so they would not reproduce CIFAR-10-C's severities (they are only probed, see
:func:`imagecorruptions_status`, and the probe's result is stored in the metadata). Parts of the
``imagecorruptions`` package (1.1.2) are used where they work on the current stack:

* its frost texture images (package data) for ``frost``;
* ``imagecorruptions.corruptions.disk`` (defocus kernel) for ``defocus_blur``;
* ``imagecorruptions.corruptions._motion_blur`` (its numpy port of ImageMagick's MotionBlurImage,
  which the original scripts called through Wand) for ``motion_blur`` and ``snow``.

What breaks in imagecorruptions 1.1.2 on NumPy 2 / scikit-image >= 0.19 / setuptools >= 81, and what
is done instead (recorded per corruption in ``metadata.json`` under ``implementation`` and
``fallback``):

* ``import imagecorruptions`` fails: it imports ``pkg_resources`` (removed from setuptools 81+) to
  locate the frost images. Fix: the import is retried with a minimal ``pkg_resources`` stand-in that
  lives in ``sys.modules`` only during that import.
* ``glass_blur``, ``gaussian_blur``: ``skimage.filters.gaussian(..., multichannel=True)`` -- the
  keyword was removed in scikit-image 0.19. Local: ``scipy.ndimage.gaussian_filter`` with the same
  boundary mode ("nearest") and truncation (4 sigma); glass blur's pixel shuffle is vectorised across
  the batch (the sequential swap order within an image is kept).
* ``fog``: ``plasma_fractal`` uses ``np.float_`` (removed in NumPy 2.0). Local: a batch-vectorised
  diamond-square fractal with the same recursion.
If the package is missing altogether, local equivalents of ``disk`` and ``_motion_blur`` are used
and ``frost`` uses a synthetic ice texture; all of this is recorded as a fallback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import importlib
import importlib.util
import io
import json
import math
import os
import platform
import shutil
import sys
import time
import types
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from rift_dist.data.datasets import DATASETS, LAYOUTS, dataset_spec, spec_for_image_size
from rift_dist.data.sources import (
    ArrayDataset,
    DataError,
    decode_image,
    load_split,
    resolve_root,
)

if TYPE_CHECKING:  # pragma: no cover
    from rift_dist.config import RunConfig

__all__ = [
    "CIFAR_CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "AUTHORS_CORRUPTIONS",
    "AUTHORS_USED_CORRUPTIONS",
    "SEVERITY_PARAMS",
    "corrupt_batch",
    "load_corruption_set",
    "generate_corruption_set",
    "get_corruption_sets",
    "imagecorruptions_status",
    "add_corrupt_arguments",
    "corrupt_command",
]

CIFAR_CORRUPTIONS: list[str] = [
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
]
"""The standard 15 corruptions of CIFAR-10-C / ImageNet-C (noise, blur, weather, digital), in the order
of Hendrycks & Dietterich 2019."""

EXTRA_CORRUPTIONS: list[str] = ["speckle_noise", "gaussian_blur", "spatter", "saturate"]
"""The 4 held-out ("validation") corruptions that CIFAR-10-C also ships as .npy files."""

AUTHORS_CORRUPTIONS: list[str] = CIFAR_CORRUPTIONS + EXTRA_CORRUPTIONS
"""All 19 corruption files of the CIFAR-10-C / CIFAR-100-C release (15 standard + 4 extra).
The RiFT authors' code (microsoft/robustlearn, RiFT/dataloader.py) evaluates 18 of them: all but
``glass_blur`` -- see :data:`AUTHORS_USED_CORRUPTIONS`."""

AUTHORS_USED_CORRUPTIONS: list[str] = [c for c in AUTHORS_CORRUPTIONS if c != "glass_blur"]
"""The 18 corruptions the RiFT authors' OOD evaluation averages over (the 19 files minus glass_blur)."""

# Severity constants (severity 1..5) of the original generation scripts, hendrycks/robustness
# ImageNet-C/create_c/make_cifar_c.py (32x32) and make_tinyimagenet_c.py (64x64). Tuple meanings are
# given in the implementations below. elastic_transform's entries are fractions of the image size.
_ZOOMS = [(1.0, 1.06, 0.01), (1.0, 1.11, 0.01), (1.0, 1.16, 0.01), (1.0, 1.21, 0.01), (1.0, 1.26, 0.01)]
SEVERITY_PARAMS: dict[str, dict[str, list]] = {
    "cifar": {
        "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
        "shot_noise": [500, 250, 100, 75, 50],
        "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
        "speckle_noise": [0.06, 0.1, 0.12, 0.16, 0.2],
        "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1.0],
        "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
        "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
        "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
        "zoom_blur": _ZOOMS,
        "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
        "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
        "snow": [
            (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
        ],
        "spatter": [
            (0.62, 0.1, 0.7, 0.7, 0.5, 0),
            (0.65, 0.1, 0.8, 0.7, 0.5, 0),
            (0.65, 0.3, 1, 0.69, 0.5, 0),
            (0.65, 0.1, 0.7, 0.69, 0.6, 1),
            (0.65, 0.1, 0.5, 0.68, 0.6, 1),
        ],
        "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],
        "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],
        "saturate": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
        "jpeg_compression": [80, 65, 58, 50, 40],
        "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
        "elastic_transform": [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)],
        "frost_scale": [0.2],
    },
    "tiny-imagenet": {
        "gaussian_noise": [0.04, 0.08, 0.12, 0.15, 0.18],
        "shot_noise": [250, 100, 50, 30, 15],
        "impulse_noise": [0.01, 0.02, 0.05, 0.08, 0.14],
        "speckle_noise": [0.15, 0.2, 0.25, 0.3, 0.35],
        "gaussian_blur": [0.5, 0.75, 1.0, 1.25, 1.5],
        "glass_blur": [(0.1, 1, 1), (0.5, 1, 1), (0.6, 1, 2), (0.7, 2, 1), (0.9, 2, 2)],
        "defocus_blur": [(0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1)],
        "motion_blur": [(10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)],
        "zoom_blur": _ZOOMS,
        "fog": [(0.4, 3), (0.7, 3), (1, 2.5), (1.5, 2), (2, 1.75)],
        "frost": [(1, 0.3), (0.9, 0.4), (0.8, 0.45), (0.75, 0.5), (0.7, 0.55)],
        "snow": [
            (0.1, 0.2, 1, 0.6, 8, 3, 0.8),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.8),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.7),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.65),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.6),
        ],
        "spatter": [
            (0.62, 0.1, 0.7, 0.7, 0.6, 0),
            (0.65, 0.1, 0.8, 0.7, 0.6, 0),
            (0.65, 0.3, 1, 0.69, 0.6, 0),
            (0.65, 0.1, 0.7, 0.68, 0.6, 1),
            (0.65, 0.1, 0.5, 0.67, 0.6, 1),
        ],
        "contrast": [0.4, 0.3, 0.2, 0.1, 0.05],
        "brightness": [0.1, 0.2, 0.3, 0.4, 0.5],
        "saturate": [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (30, 0.2)],
        "jpeg_compression": [65, 58, 50, 40, 25],
        "pixelate": [0.9, 0.8, 0.7, 0.6, 0.5],
        "elastic_transform": [(0, 0, 0.08), (0.05, 0.3, 0.06), (0.1, 0.08, 0.06), (0.1, 0.03, 0.03), (0.16, 0.03, 0.02)],
        "frost_scale": [0.3],
    },
}
"""Severity constants per parameter set ("cifar" for 32x32, "tiny-imagenet" for 64x64), from the
original CIFAR-10-C / Tiny-ImageNet-C generation scripts (Hendrycks & Dietterich 2019)."""

_METADATA = "metadata.json"
_FORMAT = "rift_dist corruption set v1"


# =========================================================================== imagecorruptions bridge


class _ImageCorruptions:
    """Lazy access to the parts of the ``imagecorruptions`` package that work on this stack."""

    def __init__(self) -> None:
        self._loaded = False
        self.module = None
        self.version = None
        self.package_dir: Path | None = None
        self.import_note = ""

    def load(self) -> "_ImageCorruptions":
        if self._loaded:
            return self
        self._loaded = True
        try:
            from importlib.metadata import version

            self.version = version("imagecorruptions")
        except Exception:  # noqa: BLE001 - not installed
            self.version = None
        spec = importlib.util.find_spec("imagecorruptions")
        if spec is None or not spec.submodule_search_locations:
            self.import_note = "imagecorruptions is not installed (pip install imagecorruptions==1.1.2)"
            return self
        self.package_dir = Path(list(spec.submodule_search_locations)[0])
        try:
            import warnings

            with warnings.catch_warnings():  # it imports scipy.ndimage.interpolation (deprecated)
                warnings.simplefilter("ignore", DeprecationWarning)
                self.module = importlib.import_module("imagecorruptions.corruptions")
            self.import_note = "imported"
        except ModuleNotFoundError as exc:
            if exc.name != "pkg_resources":
                self.import_note = f"import failed: {exc}"
                return self
            self.module = self._import_with_pkg_resources_shim()
        except Exception as exc:  # noqa: BLE001 - any import-time breakage means: do not use it
            self.import_note = f"import failed: {type(exc).__name__}: {exc}"
        return self

    def _import_with_pkg_resources_shim(self):
        """Import imagecorruptions with a temporary ``pkg_resources`` stand-in (setuptools >= 81 has none)."""
        pkg_dir = self.package_dir
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda _pkg, rel: str(pkg_dir / rel)  # the only function it uses
        for name in ("imagecorruptions", "imagecorruptions.corruptions"):
            sys.modules.pop(name, None)
        sys.modules["pkg_resources"] = shim
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                module = importlib.import_module("imagecorruptions.corruptions")
            self.import_note = (
                "imported with a temporary pkg_resources stand-in (imagecorruptions 1.1.2 imports "
                "pkg_resources, which setuptools >= 81 no longer provides)"
            )
            return module
        except Exception as exc:  # noqa: BLE001
            self.import_note = f"import failed even with a pkg_resources stand-in: {type(exc).__name__}: {exc}"
            return None
        finally:
            if sys.modules.get("pkg_resources") is shim:
                del sys.modules["pkg_resources"]

    def helper(self, name: str) -> Callable | None:
        """A working helper function of ``imagecorruptions.corruptions`` or None."""
        self.load()
        fn = getattr(self.module, name, None) if self.module is not None else None
        return fn if callable(fn) else None

    def frost_files(self) -> list[Path]:
        """The package's frost texture files frost1..frost6, or [] when unavailable."""
        self.load()
        if self.package_dir is None:
            return []
        names = ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg"]
        files = [self.package_dir / "frost" / n for n in names]
        return files if all(f.is_file() for f in files) else []


_IC = _ImageCorruptions()


def imagecorruptions_status(probe: bool = True) -> dict:
    """What works of the ``imagecorruptions`` package on this stack.

    Args:
        probe: also call each of its 19 corruptions once (severity 1, a 32x32 test image, ~0.2 s;
            the global ``np.random`` state is saved and restored).

    Returns:
        ``{"version", "import", "broken": {name: "ErrorType: message"}, "working": [names]}``
        (broken/working only when probing and the import worked).
    """
    _IC.load()
    status: dict = {"version": _IC.version, "import": _IC.import_note}
    if not probe or _IC.module is None:
        return status
    status.update(_probe_cache())
    return status


_PROBE: dict | None = None


def _probe_cache() -> dict:
    global _PROBE
    if _PROBE is not None:
        return _PROBE
    import warnings

    from PIL import Image

    img = (np.arange(32 * 32 * 3).reshape(32, 32, 3) % 251).astype(np.uint8)
    broken, working = {}, []
    state = np.random.get_state()
    try:
        np.random.seed(0)
        for name in AUTHORS_CORRUPTIONS:
            fn = getattr(_IC.module, name, None)
            try:
                with warnings.catch_warnings(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                    warnings.simplefilter("ignore")
                    np.asarray(fn(Image.fromarray(img), 1))
                working.append(name)
            except Exception as exc:  # noqa: BLE001 - that is what we are probing for
                broken[name] = f"{type(exc).__name__}: {str(exc)[:160]}"
    finally:
        np.random.set_state(state)
    _PROBE = {"broken": broken, "working": working}
    return _PROBE


# =========================================================================== local building blocks


def _gaussian(x: np.ndarray, sigma: float, spatial_axes=(1, 2), mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """Gaussian blur over the spatial axes only (skimage.filters.gaussian's defaults: nearest, 4 sigma)."""
    from scipy.ndimage import gaussian_filter

    if sigma <= 0:
        return x.astype(np.float64, copy=True)
    sig = [0.0] * x.ndim
    for a in spatial_axes:
        sig[a] = sigma
    return gaussian_filter(x.astype(np.float64, copy=False), sigma=sig, mode=mode, truncate=truncate)


def _disk_local(radius: float, alias_blur: float = 0.1) -> np.ndarray:
    """Anti-aliased disk kernel (float32 ``[k, k]``, sums to ~1): a 17x17 grid for radius <= 8."""
    import cv2

    half = 8 if radius <= 8 else int(radius)
    grid = np.arange(-half, half + 1)
    yy, xx = np.meshgrid(grid, grid)
    kernel = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
    kernel /= kernel.sum()
    ksize = (3, 3) if radius <= 8 else (5, 5)
    return cv2.GaussianBlur(kernel, ksize=ksize, sigmaX=alias_blur)


def _motion_offsets(radius: int, sigma: float, angle: float, h: int, w: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Tap weights and integer (dy, dx) offsets of a one-sided Gaussian motion-blur kernel along ``angle``."""
    width = 2 * int(radius) + 1
    taps = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2))
    taps /= taps.sum()
    py, px = width * math.sin(math.radians(angle)), width * math.cos(math.radians(angle))
    norm = math.hypot(py, px)
    offsets = []
    for i in range(width):
        dy = -math.ceil(i * py / norm - 0.5)
        dx = -math.ceil(i * px / norm - 0.5)
        if abs(dy) >= h or abs(dx) >= w:
            break
        offsets.append((dy, dx))
    return taps, offsets


def _motion_blur_local(x: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    """Motion blur of one ``[H, W(, C)]`` image: weighted sum of copies shifted by (dy, dx) with edge
    replication (the behaviour of ImageMagick's MotionBlurImage as ported by imagecorruptions)."""
    h, w = x.shape[:2]
    taps, offsets = _motion_offsets(radius, sigma, angle, h, w)
    rows, cols = np.arange(h), np.arange(w)
    out = np.zeros(x.shape, dtype=np.float64)
    for weight, (dy, dx) in zip(taps, offsets):
        out += weight * x[np.clip(rows - dy, 0, h - 1)][:, np.clip(cols - dx, 0, w - 1)]
    return out


def _linear_zoom_matrix(n_in: int, factor: float) -> np.ndarray:
    """``[n_out, n_in]`` weights of 1-D linear interpolation that zooms ``n_in`` samples by ``factor``,
    with ``scipy.ndimage.zoom``'s geometry (order 1, grid_mode False: ends aligned,
    ``n_out = round(n_in * factor)``)."""
    n_out = int(round(n_in * factor))
    pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def _clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom the centre of a batch ``[n, H, W(, C)]`` of square images by ``factor`` (bilinear) and crop
    back to H x W around the centre (the CIFAR-10-C variant of ``clipped_zoom``).

    Equal to ``scipy.ndimage.zoom(crop, (1, f, f, 1), order=1)`` then the centre crop, computed as two
    small matrix products (linear interpolation is separable), which is ~50x faster on a batch."""
    h = x.shape[1]
    ch = int(np.ceil(h / factor))
    top = (h - ch) // 2
    m = _linear_zoom_matrix(ch, factor)
    trim = (m.shape[0] - h) // 2
    m = m[trim : trim + h].astype(x.dtype, copy=False)
    crop = x[:, top : top + ch, top : top + ch]
    out = np.einsum("yi,ni...->ny...", m, crop, optimize=True)
    return np.einsum("xj,nyj...->nyx...", m, out, optimize=True)


def _plasma_fractal(n: int, mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` diamond-square height maps ``[n, mapsize, mapsize]`` scaled to [0, 1] (mapsize a power of 2)."""
    assert mapsize & (mapsize - 1) == 0, "mapsize must be a power of two"
    grid = np.zeros((n, mapsize, mapsize), dtype=np.float64)
    step, wibble = mapsize, 100.0
    while step >= 2:
        half = step // 2

        def jitter(a: np.ndarray) -> np.ndarray:
            return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

        corners = grid[:, 0::step, 0::step]
        square = corners + np.roll(corners, -1, axis=1)
        square = square + np.roll(square, -1, axis=2)
        grid[:, half::step, half::step] = jitter(square)
        centres = grid[:, half::step, half::step]
        corners = grid[:, 0::step, 0::step]
        left = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        grid[:, 0::step, half::step] = jitter(left)
        top = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        grid[:, half::step, 0::step] = jitter(top)
        step //= 2
        wibble /= wibbledecay
    grid -= grid.min(axis=(1, 2), keepdims=True)
    return grid / grid.max(axis=(1, 2), keepdims=True)


def _rgb_to_gray(x: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of ``[..., 3]`` RGB (OpenCV's RGB2GRAY weights)."""
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


_FROST_CACHE: dict[tuple, list[np.ndarray]] = {}


def _synthetic_frost(rng: np.random.Generator, size: int = 160) -> np.ndarray:
    """A stand-in ice texture (uint8 ``[size, size, 3]``, RGB) for when the package's images are missing."""
    base = _plasma_fractal(1, 256, 1.6, rng)[0, :size, :size]
    streaks = np.zeros((size, size))
    pts = rng.integers(0, size, size=(400, 2))
    streaks[pts[:, 0], pts[:, 1]] = 1.0
    streaks = _motion_blur_local(streaks, 6, 3, float(rng.uniform(0, 180)))
    ice = np.clip(0.55 * base + 4.0 * streaks, 0, 1)
    return (np.stack([ice * 0.85, ice * 0.95, ice], axis=-1) * 255).astype(np.uint8)


def _frost_textures(scale: float) -> tuple[list[np.ndarray], str]:
    """The 5 textures the original scripts draw from (frost1..frost5; the 6th is never drawn),
    resized by ``scale`` (bilinear), RGB uint8; plus a note on their source."""
    import cv2

    files = _IC.frost_files()
    key = (scale, bool(files))
    if key not in _FROST_CACHE:
        if files:
            textures = []
            for f in files[:5]:
                bgr = cv2.imread(str(f))
                textures.append(cv2.resize(bgr, (0, 0), fx=scale, fy=scale)[..., ::-1].copy())
        else:
            rng = np.random.default_rng(12345)
            textures = [_synthetic_frost(rng) for _ in range(5)]
        _FROST_CACHE[key] = textures
    note = "imagecorruptions frost textures" if files else "synthetic frost texture (imagecorruptions package data missing)"
    return _FROST_CACHE[key], note


# =========================================================================== corruptions (batched)
# Every function: x float64 [n, H, W, 3] in [0, 255]; returns float in [0, 255] (clipped), shape kept.


def _c_gaussian_noise(x, c, rng, ctx):
    x = x / 255.0
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1) * 255


def _c_shot_noise(x, c, rng, ctx):
    x = x / 255.0
    return np.clip(rng.poisson(x * c) / c, 0, 1) * 255


def _c_impulse_noise(x, c, rng, ctx):
    from skimage.util import random_noise

    return np.clip(random_noise(x / 255.0, mode="s&p", amount=c, rng=rng), 0, 1) * 255


def _c_speckle_noise(x, c, rng, ctx):
    x = x / 255.0
    return np.clip(x + x * rng.normal(size=x.shape, scale=c), 0, 1) * 255


def _c_gaussian_blur(x, c, rng, ctx):
    return np.clip(_gaussian(x / 255.0, c), 0, 1) * 255


def _c_glass_blur(x, c, rng, ctx):
    sigma, delta, iterations = c
    n, h, w, _ = x.shape
    img = (_gaussian(x / 255.0, sigma) * 255).astype(np.uint8)  # truncation as np.uint8() does
    ar = np.arange(n)
    positions = [(hh, ww) for hh in range(h - delta, delta, -1) for ww in range(w - delta, delta, -1)]
    for _ in range(iterations):
        # randint(-delta, delta) draws from [-delta, delta - 1], as the original scripts do
        shifts = rng.integers(-delta, delta, size=(len(positions), n, 2))
        for (hh, ww), d in zip(positions, shifts):  # d: [n, 2] = (dx, dy) per image
            h2, w2 = hh + d[:, 1], ww + d[:, 0]
            a = img[ar, hh, ww].copy()
            img[ar, hh, ww] = img[ar, h2, w2]
            img[ar, h2, w2] = a
    return np.clip(_gaussian(img / 255.0, sigma), 0, 1) * 255


def _c_defocus_blur(x, c, rng, ctx):
    import cv2

    disk = _IC.helper("disk") or _disk_local
    kernel = disk(radius=c[0], alias_blur=c[1])
    x = x / 255.0
    out = np.empty_like(x)
    for i in range(len(x)):
        for ch in range(3):
            out[i, :, :, ch] = cv2.filter2D(x[i, :, :, ch], -1, kernel)
    return np.clip(out, 0, 1) * 255


def _c_motion_blur(x, c, rng, ctx):
    blur = ctx["motion_blur_fn"]
    angles = rng.uniform(-45, 45, size=len(x))
    out = np.empty_like(x)
    for i in range(len(x)):
        out[i] = blur(x[i], radius=c[0], sigma=c[1], angle=angles[i])
    return np.clip(np.round(out), 0, 255)  # ImageMagick returns rounded 8-bit pixels


def _c_zoom_blur(x, c, rng, ctx):
    x = (x / 255.0).astype(np.float32)
    out = np.zeros_like(x)
    factors = np.arange(*c)
    for z in factors:
        out += _clipped_zoom(x, z)
    return np.clip((x + out) / (len(factors) + 1), 0, 1) * 255


def _c_snow(x, c, rng, ctx):
    loc, scale, zoom_f, thresh, radius, sigma, mix = c
    blur = ctx["motion_blur_fn"]
    n, h, w, _ = x.shape
    x = x.astype(np.float32) / 255.0
    layer = rng.normal(size=(n, h, w), loc=loc, scale=scale)
    layer = _clipped_zoom(layer, zoom_f)
    layer[layer < thresh] = 0
    layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8)  # the original stores the layer as an 8-bit PNG
    angles = rng.uniform(-135, -45, size=n)
    snow = np.empty((n, h, w), dtype=np.float64)
    for i in range(n):
        snow[i] = np.clip(np.round(blur(layer[i], radius=radius, sigma=sigma, angle=angles[i])), 0, 255)
    snow = (snow / 255.0)[..., None]
    gray = _rgb_to_gray(x)[..., None]
    x = mix * x + (1 - mix) * np.maximum(x, gray * 1.5 + 0.5)
    return np.clip(x + snow + np.rot90(snow, k=2, axes=(1, 2)), 0, 1) * 255


def _c_frost(x, c, rng, ctx):
    textures = ctx["frost_textures"]
    n, h, w, _ = x.shape
    out = np.empty_like(x)
    picks = rng.integers(0, 5, size=n)  # the original draws randint(5): frost1..frost5
    for i in range(n):
        tex = textures[picks[i]]
        y0 = rng.integers(0, tex.shape[0] - h)
        x0 = rng.integers(0, tex.shape[1] - w)
        out[i] = c[0] * x[i] + c[1] * tex[y0 : y0 + h, x0 : x0 + w]
    return np.clip(out, 0, 255)


def _c_fog(x, c, rng, ctx):
    n, h, w, _ = x.shape
    size = max(h, w)
    mapsize = size if size & (size - 1) == 0 else 1 << (size - 1).bit_length()  # next power of two
    x = x / 255.0
    max_val = x.max(axis=(1, 2, 3), keepdims=True)
    x = x + c[0] * _plasma_fractal(n, mapsize, c[1], rng)[:, :h, :w, None]
    return np.clip(x * max_val / (max_val + c[0]), 0, 1) * 255


def _c_brightness(x, c, rng, ctx):
    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(x / 255.0)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return np.clip(hsv2rgb(hsv), 0, 1) * 255


def _c_saturate(x, c, rng, ctx):
    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(x / 255.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * c[0] + c[1], 0, 1)
    return np.clip(hsv2rgb(hsv), 0, 1) * 255


def _c_contrast(x, c, rng, ctx):
    x = x / 255.0
    means = x.mean(axis=(1, 2), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def _c_elastic_transform(x, c, rng, ctx):
    import cv2
    from scipy.ndimage import map_coordinates

    n, h, w, _ = x.shape
    alpha, sigma, affine = c[0] * h, c[1] * h, c[2] * h
    x = x.astype(np.float32) / 255.0
    centre = np.float32([h, w]) // 2
    side = min(h, w) // 3
    pts1 = np.float32([centre + side, [centre[0] + side, centre[1] - side], centre - side])
    jitter = rng.uniform(-affine, affine, size=(n, 3, 2)).astype(np.float32)
    dx = (_gaussian(rng.uniform(-1, 1, size=(n, h, w)), sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    dy = (_gaussian(rng.uniform(-1, 1, size=(n, h, w)), sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    yy, xx, zz = np.meshgrid(np.arange(h), np.arange(w), np.arange(3), indexing="ij")
    out = np.empty_like(x)
    for i in range(n):
        m = cv2.getAffineTransform(pts1, pts1 + jitter[i])
        img = cv2.warpAffine(x[i], m, (w, h), borderMode=cv2.BORDER_REFLECT_101)
        coords = [(yy + dy[i][..., None]).ravel(), (xx + dx[i][..., None]).ravel(), zz.ravel()]
        out[i] = map_coordinates(img, coords, order=1, mode="reflect").reshape(h, w, 3)
    return np.clip(out, 0, 1) * 255


def _c_pixelate(x, c, rng, ctx):
    from PIL import Image

    n, h, w, _ = x.shape
    small = (int(w * c), int(h * c))
    out = np.empty_like(x)
    for i in range(n):
        im = Image.fromarray(x[i].astype(np.uint8))
        out[i] = np.asarray(im.resize(small, Image.BOX).resize((w, h), Image.BOX))
    return out


def _c_jpeg_compression(x, c, rng, ctx):
    from PIL import Image

    out = np.empty_like(x)
    for i in range(len(x)):
        buf = io.BytesIO()
        Image.fromarray(x[i].astype(np.uint8)).save(buf, "JPEG", quality=int(c))
        buf.seek(0)
        with Image.open(buf) as im:
            out[i] = np.asarray(im.convert("RGB"))
    return out


def _c_spatter(x, c, rng, ctx):
    import cv2

    loc, scale, sigma, thresh, intensity, mud = c
    n, h, w, _ = x.shape
    x = x.astype(np.float32) / 255.0
    liquid = _gaussian(rng.normal(size=(n, h, w), loc=loc, scale=scale), sigma)
    liquid[liquid < thresh] = 0
    out = np.empty_like(x)
    if mud == 0:  # water drops: pale turquoise, shaded by an embossed distance map of the drop edges
        water = np.float32([175, 238, 238]) / 255.0
        ker = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
        for i in range(n):
            layer = (liquid[i] * 255).astype(np.uint8)
            dist = 255 - cv2.Canny(layer, 50, 150)
            dist = cv2.distanceTransform(dist, cv2.DIST_L2, 5)
            _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
            dist = cv2.blur(dist, (3, 3)).astype(np.uint8)
            dist = cv2.equalizeHist(dist)
            dist = cv2.filter2D(dist, cv2.CV_8U, ker)
            dist = cv2.blur(dist, (3, 3)).astype(np.float32)
            m = layer.astype(np.float32) * dist
            peak = m.max()
            m = (m / peak if peak > 0 else m) * intensity
            out[i] = np.clip(x[i] + m[..., None] * water, 0, 1)
    else:  # mud: brown blobs replace the image where the smoothed mask is >= 0.8
        mud_colour = np.float32([63, 42, 20]) / 255.0
        mask = _gaussian((liquid > thresh).astype(np.float32), intensity)
        mask[mask < 0.8] = 0
        mask = mask[..., None].astype(np.float32)
        out = np.clip(x * (1 - mask) + mud_colour * mask, 0, 1)
    return out * 255


_FUNCS: dict[str, Callable] = {name: globals()[f"_c_{name}"] for name in AUTHORS_CORRUPTIONS}


def _pick_params(image_size: tuple[int, int], params: str) -> str:
    if params != "auto":
        if params not in SEVERITY_PARAMS:
            raise DataError(f"unknown corruption parameter set {params!r}; choose auto, {', '.join(SEVERITY_PARAMS)}")
        return params
    h, w = image_size
    spec = spec_for_image_size(h, w)
    if spec is not None:
        return spec.corruption_params
    first: dict[str, object] = {}
    for s in DATASETS.values():
        first.setdefault(s.corruption_params, s)  # the first data set of each parameter set
    known = ", ".join(f"{s.corruption_set}'s are for {s.image_size}x{s.image_size}" for s in first.values())
    raise DataError(
        f"no corruption constants for {h}x{w} images ({known}); "
        f"pass params={' or '.join(repr(p) for p in SEVERITY_PARAMS)} explicitly to use one of them anyway"
    )


def _context(names: Sequence[str], params: str) -> tuple[dict, dict, dict]:
    """Shared helpers for a generation run plus per-corruption implementation notes and fallbacks."""
    status = imagecorruptions_status(probe=True)
    broken = status.get("broken", {})
    ctx: dict = {}
    impl: dict[str, str] = {}
    fallback: dict[str, str] = {}
    ic_ok = _IC.module is not None
    ic_why = status["import"] if not ic_ok else ""
    constants = f"{params} constants of {'make_cifar_c.py' if params == 'cifar' else 'make_tinyimagenet_c.py'}"
    motion = _IC.helper("_motion_blur")
    ctx["motion_blur_fn"] = motion or _motion_blur_local
    for name in names:
        base = f"rift_dist.data.corruptions ({constants}, seeded numpy Generator)"
        if name in ("motion_blur", "snow"):
            if motion:
                impl[name] = f"{base} + imagecorruptions.corruptions._motion_blur (numpy port of ImageMagick MotionBlurImage)"
            else:
                impl[name] = f"{base} + local motion-blur port (edge-replicated shifted copies)"
                fallback[name] = f"imagecorruptions._motion_blur unavailable: {ic_why}"
        elif name == "defocus_blur":
            if _IC.helper("disk"):
                impl[name] = f"{base} + imagecorruptions.corruptions.disk kernel + cv2.filter2D"
            else:
                impl[name] = f"{base} + local disk kernel + cv2.filter2D"
                fallback[name] = f"imagecorruptions.disk unavailable: {ic_why}"
        elif name == "frost":
            textures, note = _frost_textures(SEVERITY_PARAMS[params]["frost_scale"][0])
            ctx["frost_textures"] = textures
            impl[name] = f"{base} + {note}"
            if "synthetic" in note:
                fallback[name] = note
        elif name in ("glass_blur", "gaussian_blur"):
            impl[name] = f"{base}; gaussian via scipy.ndimage.gaussian_filter (mode nearest, truncate 4)"
        elif name == "fog":
            impl[name] = f"{base}; local batch diamond-square plasma fractal"
        elif name == "impulse_noise":
            impl[name] = f"{base}; skimage.util.random_noise(mode='s&p')"
        else:
            impl[name] = base
        # the library's own version of this corruption is broken here: say so
        if name in broken and name not in fallback:
            fallback[name] = f"imagecorruptions.{name} fails here ({broken[name]}); local fix used"
        elif not ic_ok and name in ("glass_blur", "gaussian_blur", "fog") and name not in fallback:
            fallback[name] = f"imagecorruptions unusable ({ic_why}); local implementation used"
    return ctx, impl, fallback


def corrupt_batch(
    images: np.ndarray,
    corruption: str,
    severity: int,
    rng: np.random.Generator | int = 0,
    params: str = "auto",
    _ctx: dict | None = None,
) -> np.ndarray:
    """Apply one corruption at one severity to a batch of images.

    Args:
        images: uint8 ``[n, H, W, 3]``, RGB 0..255.
        corruption: one of :data:`AUTHORS_CORRUPTIONS`.
        severity: 1..5.
        rng: numpy Generator or an int seed.
        params: "auto" (by image size: 32x32 -> "cifar", 64x64 -> "tiny-imagenet"), "cifar" or
            "tiny-imagenet" (see :data:`SEVERITY_PARAMS`).

    Returns:
        uint8 ``[n, H, W, 3]`` corrupted images (float results truncated to integers, as the original
        scripts' ``np.uint8(...)`` does).

    Raises:
        DataError: unknown corruption, severity outside 1..5, wrong image array, no constants for
            the image size.
    """
    if corruption not in _FUNCS:
        raise DataError(f"unknown corruption {corruption!r}; choose from {', '.join(AUTHORS_CORRUPTIONS)}")
    if severity not in (1, 2, 3, 4, 5):
        raise DataError(f"severity must be 1..5, got {severity}")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError("corrupt_batch expects uint8 images of shape [n, H, W, 3]")
    if len(images) == 0:
        return images.copy()
    params = _pick_params(images.shape[1:3], params)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    ctx = _ctx if _ctx is not None else _context([corruption], params)[0]
    c = SEVERITY_PARAMS[params][corruption][severity - 1]
    out = _FUNCS[corruption](images.astype(np.float64), c, rng, ctx)
    return np.clip(out, 0, 255).astype(np.uint8)


# =========================================================================== loading


def _classes_for(dataset: str, meta: dict | None) -> list[str] | None:
    if meta and meta.get("classes"):
        return list(meta["classes"])
    spec = DATASETS.get(dataset)
    return list(spec.classes) if spec is not None and spec.classes is not None else None


def _find_npy_root(root: Path, dataset: str) -> Path | None:
    if (root / "labels.npy").is_file():
        return root
    preferred = DATASETS[dataset].corruption_set if dataset in DATASETS else ""
    children = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: (p.name != preferred, p.name))
    for child in children:
        if (child / "labels.npy").is_file():
            return child
    return None


def _find_tiny_root(root: Path, dataset: str, corruptions: Sequence[str]) -> Path | None:
    if any((root / c).is_dir() for c in corruptions):
        return root
    spec = dataset_spec(dataset)
    for name in (spec.corruption_set, *spec.corruption_dirs):
        if (root / name).is_dir():
            return root / name
    return None


def _read_meta(d: Path) -> dict | None:
    try:
        return json.loads((d / _METADATA).read_text())
    except (OSError, ValueError):
        return None


def _subset_positions(labels: np.ndarray, subset: int, seed: int) -> np.ndarray:
    from rift_dist.data.splits import balanced_indices

    if not subset or subset >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    return balanced_indices(labels, subset, np.random.default_rng([seed, 4]), what="data.corruption_subset")


def load_corruption_set(
    root: str | Path,
    dataset: str,
    corruptions: Sequence[str],
    severities: Sequence[int],
    subset: int = 0,
    *,
    seed: int = 0,
) -> list[tuple[str, int, ArrayDataset]]:
    """Load a common-corruption test set.

    Args:
        root: the directory holding the files (``<c>.npy`` + ``labels.npy``, or Tiny-ImageNet-C's
            ``<c>/<s>/<wnid>/``), or its parent (a ``CIFAR-10-C``/``CIFAR-100-C``/``Tiny-ImageNet-C``
            sub-directory is found).
        dataset: cifar10, cifar100 or tiny-imagenet (names the classes; tiny-imagenet also accepts
            the .npy layout written by :func:`generate_corruption_set`).
        corruptions: names from :data:`AUTHORS_CORRUPTIONS` (empty = :data:`CIFAR_CORRUPTIONS`).
        severities: subset of 1..5.
        subset: images per corruption and severity (0 = all): a class-balanced choice seeded by
            ``seed``, the same positions for every corruption and severity.

    Returns:
        ``[(corruption, severity, ArrayDataset)]`` in the order corruptions x severities; images
        uint8 ``[n, H, W, 3]`` (memory-mapped, read-only, when no subset is taken), labels int64.

    Raises:
        DataError: root missing; unknown corruption or severity; ONE error listing every missing
            file or directory; arrays with the wrong dtype/shape or a length not divisible by the
            number of stored severities.
    """
    corruptions = list(corruptions) or list(CIFAR_CORRUPTIONS)
    unknown = [c for c in corruptions if c not in AUTHORS_CORRUPTIONS]
    if unknown:
        raise DataError(f"unknown corruption(s) {', '.join(unknown)}; choose from {', '.join(AUTHORS_CORRUPTIONS)}")
    bad = [s for s in severities if s not in (1, 2, 3, 4, 5)]
    if bad or not severities:
        raise DataError(f"severities must be a non-empty subset of 1..5, got {list(severities)}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"corruption set directory {root} does not exist; set data.corruption_root to a CIFAR-10-C style "
            f"directory (<corruption>.npy + labels.npy) or Tiny-ImageNet-C, or set data.corruption_generate: true"
        )
    npy_root = _find_npy_root(root, dataset)
    if npy_root is None and "tiny-imagenet" in dataset_spec(dataset).layouts:
        tiny = _find_tiny_root(root, dataset, corruptions)
        if tiny is not None:
            return _load_tiny_c(tiny, corruptions, severities, subset, seed)
    base = npy_root or root
    meta = _read_meta(base)
    missing = [str(base / f"{c}.npy") for c in corruptions if not (base / f"{c}.npy").is_file()]
    if not (base / "labels.npy").is_file():
        missing.insert(0, str(base / "labels.npy"))
    if missing:
        raise DataError(
            f"corruption set at {base} is incomplete: missing {len(missing)} file(s): {', '.join(missing)}. "
            f"Download the official set (CIFAR-10-C: https://zenodo.org/records/2535967) or generate one with "
            f"`rift data corrupt --out {base}`"
        )
    stored = list(meta.get("severities", [1, 2, 3, 4, 5])) if meta else [1, 2, 3, 4, 5]
    absent = [s for s in severities if s not in stored]
    if absent:
        raise DataError(f"{base}: severities {absent} are not in this set (it stores {stored}); regenerate with them")
    labels_all = np.load(base / "labels.npy").astype(np.int64)
    if len(labels_all) % len(stored):
        raise DataError(
            f"{base / 'labels.npy'}: {len(labels_all)} labels is not a multiple of the {len(stored)} stored severities"
        )
    n = len(labels_all) // len(stored)
    classes = _classes_for(dataset, meta)
    if classes is None:
        classes = [str(i) for i in range(int(labels_all.max()) + 1)]
    if labels_all.size and labels_all.max() >= len(classes):
        raise DataError(f"{base / 'labels.npy'}: label {labels_all.max()} but {dataset} has {len(classes)} classes")
    pick = _subset_positions(labels_all[:n], subset, seed)
    kind = "RE-GENERATED (not the official release)" if meta and meta.get("regenerated") else "official layout"
    out = []
    for name in corruptions:
        path = base / f"{name}.npy"
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable .npy file ({exc})") from exc
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] != len(labels_all):
            raise DataError(
                f"{path}: expected uint8 [{len(labels_all)}, H, W, 3] (severities x {n} images, matching labels.npy), "
                f"got {arr.dtype} {list(arr.shape)}"
            )
        for s in severities:
            lo = stored.index(s) * n
            block = arr[lo : lo + n]
            images = block if len(pick) == n else np.ascontiguousarray(block[pick])
            labels = labels_all[lo : lo + n][pick]
            desc = f"{name} severity {s} from {path} ({kind}, {len(pick)} of {n} images)"
            out.append((name, s, ArrayDataset(images=images, labels=labels, classes=classes, description=desc)))
    return out


def _load_tiny_c(base: Path, corruptions, severities, subset: int, seed: int) -> list[tuple[str, int, ArrayDataset]]:
    missing = [str(base / c / str(s)) for c in corruptions for s in severities if not (base / c / str(s)).is_dir()]
    if missing:
        raise DataError(
            f"Tiny-ImageNet-C at {base} is incomplete: missing {len(missing)} director(ies): {', '.join(missing)}; "
            f"expected <corruption>/<severity>/<wnid>/*.JPEG"
        )
    from rift_dist.data.sources import _images_under  # shared listing helper

    out = []
    classes_ref: list[str] | None = None
    for c in corruptions:
        for s in severities:
            d = base / c / str(s)
            classes = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
            if classes_ref is None:
                classes_ref = classes
            elif classes != classes_ref:
                raise DataError(f"{d}: class folders differ from {base / corruptions[0] / str(severities[0])}")
            files, labels = [], []
            for i, w in enumerate(classes):
                found = _images_under(d / w)
                files += found
                labels += [i] * len(found)
            if not files:
                raise DataError(f"{d}: no images found (expected {d}/<wnid>/*.JPEG)")
            labels = np.asarray(labels, dtype=np.int64)
            pick = _subset_positions(labels, subset, seed)
            images = np.stack([decode_image(files[i]) for i in pick])
            desc = f"{c} severity {s} from {d} (Tiny-ImageNet-C folders, {len(pick)} of {len(files)} images)"
            out.append((c, s, ArrayDataset(images=images, labels=labels[pick], classes=classes, description=desc)))
    return out


# =========================================================================== generation


def _versions() -> dict:
    vers = {"python": platform.python_version(), "numpy": np.__version__}
    for mod, key in (("scipy", "scipy"), ("skimage", "scikit-image"), ("cv2", "opencv"), ("PIL", "pillow")):
        try:
            vers[key] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001
            vers[key] = None
    vers["imagecorruptions"] = _IC.load().version
    try:
        from importlib.metadata import version

        vers["rift_dist"] = version("rift_dist")
    except Exception:  # noqa: BLE001
        vers["rift_dist"] = None
    return vers


def _dataset_sha256(ds: ArrayDataset) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(ds.images).data)
    h.update(np.asarray(ds.labels, dtype="<i8").tobytes())
    return h.hexdigest()


def generate_corruption_set(
    test: ArrayDataset,
    out_dir: str | Path,
    corruptions: Sequence[str] = CIFAR_CORRUPTIONS,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    seed: int = 0,
    progress: bool = True,
    *,
    params: str = "auto",
    source: dict | None = None,
) -> Path:
    """Write a re-generated CIFAR-10-C style set built from ``test``.

    Output (``out_dir``): ``<c>.npy`` uint8 ``[len(severities) * n, H, W, 3]`` (severities stacked in
    the given order), ``labels.npy`` (test labels tiled once per severity; uint8 when there are at
    most 256 classes, as in the release) and ``metadata.json``: ``regenerated: true`` and a note
    that this is NOT the official release, the source split and its sha256, n, seed, severities,
    parameter set, per-corruption implementation, which corruptions used a fallback (and why),
    library versions, the imagecorruptions probe, and timings.

    The directory is written atomically (temporary sibling, then rename). When ``out_dir`` already
    holds a complete set from the same source, seed, severities and parameters that includes the
    requested corruptions, nothing is done.

    Args:
        test: the clean images (uint8 ``[n, H, W, 3]``) and labels.
        out_dir: where the set goes.
        corruptions: names from :data:`AUTHORS_CORRUPTIONS`.
        severities: subset of 1..5.
        seed: seed; corruption ``c`` at severity ``s`` uses ``default_rng([seed, index of c in
            AUTHORS_CORRUPTIONS, s])``.
        progress: print one line per corruption and severity to stderr.
        params: severity constants: auto (by image size), cifar or tiny-imagenet.
        source: extra provenance merged into metadata["source"] (e.g. data set, root, indices sha256).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        DataError: empty input, unknown corruption/severity, ``out_dir`` holding something else.
    """
    out_dir = Path(out_dir).expanduser()
    corruptions = list(corruptions) or list(CIFAR_CORRUPTIONS)
    severities = [int(s) for s in severities]
    unknown = [c for c in corruptions if c not in AUTHORS_CORRUPTIONS]
    if unknown:
        raise DataError(f"unknown corruption(s) {', '.join(unknown)}; choose from {', '.join(AUTHORS_CORRUPTIONS)}")
    if not severities or any(s not in (1, 2, 3, 4, 5) for s in severities) or len(set(severities)) != len(severities):
        raise DataError(f"severities must be distinct values in 1..5, got {severities}")
    if len(test) == 0:
        raise DataError("cannot generate a corruption set from an empty test split")
    params = _pick_params(test.image_size, params)
    fingerprint = _dataset_sha256(test)
    existing = _read_meta(out_dir)
    if existing is not None:
        same = (
            existing.get("complete")
            and existing.get("source", {}).get("sha256") == fingerprint
            and existing.get("seed") == seed
            and existing.get("severities") == severities
            and existing.get("params") == params
        )
        if same and set(corruptions) <= set(existing.get("corruptions", [])):
            if progress:
                print(f"[corrupt] {out_dir} is complete; skipping", file=sys.stderr, flush=True)
            return out_dir
        raise DataError(
            f"{out_dir} already holds a different corruption set (seed {existing.get('seed')}, severities "
            f"{existing.get('severities')}, corruptions {len(existing.get('corruptions', []))}, source "
            f"{str(existing.get('source', {}).get('sha256'))[:12]}); choose another output directory or delete it"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir} exists and is not a corruption set made by rift_dist; choose an empty or new directory")

    started = time.time()
    ctx, impl, fallback = _context(corruptions, params)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    timings: dict[str, float] = {}
    try:
        n = len(test)
        label_dtype = np.uint8 if test.num_classes <= 256 else np.int64
        np.save(tmp / "labels.npy", np.tile(test.labels, len(severities)).astype(label_dtype))
        for name in corruptions:
            t0 = time.time()
            arr = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=np.uint8,
                                            shape=(len(severities) * n,) + test.images.shape[1:])
            for k, s in enumerate(severities):
                rng = np.random.default_rng([seed, AUTHORS_CORRUPTIONS.index(name), s])
                for lo in range(0, n, 1000):  # bounded memory for large sets
                    batch = np.asarray(test.images[lo : lo + 1000])
                    arr[k * n + lo : k * n + lo + len(batch)] = corrupt_batch(batch, name, s, rng, params, _ctx=ctx)
                if progress:
                    print(f"[corrupt] {name} severity {s}: {n} images, {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
            arr.flush()
            del arr
            timings[name] = round(time.time() - t0, 3)
        status = imagecorruptions_status(probe=True)
        meta = {
            "format": _FORMAT,
            "regenerated": True,
            "note": (
                "RE-GENERATION with rift_dist.data.corruptions -- NOT the official CIFAR-10-C/CIFAR-100-C/"
                "Tiny-ImageNet-C release (Hendrycks & Dietterich 2019). Same corruption types and severity "
                "constants, but different random draws, a different source copy of the test images and "
                "re-implemented operations; accuracies are not directly comparable with published numbers."
            ),
            "complete": True,
            "source": {"description": test.description, "n": n, "sha256": fingerprint, **(source or {})},
            "n": n,
            "seed": seed,
            "severities": severities,
            "corruptions": corruptions,
            "params": params,
            "constants_source": "hendrycks/robustness ImageNet-C/create_c/"
            + ("make_cifar_c.py" if params == "cifar" else "make_tinyimagenet_c.py"),
            "image_size": list(test.image_size),
            "classes": list(test.classes),
            "layout": "<corruption>.npy = severities stacked in the order of 'severities', n images each; labels.npy tiled",
            "implementation": impl,
            "fallback": fallback,
            "imagecorruptions": status,
            "versions": _versions(),
            "seconds": timings,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / _METADATA).write_text(json.dumps(meta, indent=1))
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"[corrupt] wrote {out_dir} in {time.time() - started:.1f}s", file=sys.stderr, flush=True)
    return out_dir


# =========================================================================== config-driven entry


def get_corruption_sets(cfg: "RunConfig") -> list[tuple[str, int, ArrayDataset]]:
    """The corruption sets a run evaluates, from ``cfg.data``.

    ``data.corruption_root`` is loaded when it holds a set; otherwise, with
    ``data.corruption_generate``, a set is re-generated from the run's test split (class-balanced
    ``data.corruption_subset`` images, 0 = all; seed ``data.corruption_seed``) into
    ``data.corruption_root`` (when set) or ``<data.cache_dir>/corruptions/<name>``, then loaded.
    Corruptions: ``data.corruptions`` (empty = the standard 15); severities: ``data.severities``.

    Raises:
        DataError: no set and generation off (says which settings to change); anything
            :func:`load_corruption_set` or :func:`generate_corruption_set` raises.
    """
    from rift_dist.data.splits import indices_sha256, make_splits

    d = cfg.data
    names = list(d.corruptions) or list(CIFAR_CORRUPTIONS)
    if d.corruption_root:
        root = Path(d.corruption_root).expanduser()
        try:
            return load_corruption_set(root, d.dataset, names, d.severities, d.corruption_subset, seed=d.corruption_seed)
        except DataError:
            if not d.corruption_generate or (root.is_dir() and any(root.iterdir())):
                raise
    elif not d.corruption_generate:
        raise DataError(
            "no corruption set configured: set data.corruption_root to a CIFAR-10-C style directory, or "
            "data.corruption_generate: true to re-generate one from the test split"
        )
    test = make_splits(d).test
    pick = _subset_positions(test.labels, d.corruption_subset, d.corruption_seed)
    sub = test if len(pick) == len(test) else test.subset(pick)
    key = hashlib.sha256(
        json.dumps([_dataset_sha256(sub), d.corruption_seed, sorted(d.severities), sorted(names)]).encode()
    ).hexdigest()[:12]
    out = Path(d.corruption_root).expanduser() if d.corruption_root else Path(d.cache_dir).expanduser() / "corruptions" / f"{d.dataset}-{key}"
    generate_corruption_set(
        sub, out, names, sorted(d.severities), seed=d.corruption_seed, progress=True,
        source={"dataset": d.dataset, "test_positions_sha256": indices_sha256(pick)},
    )
    return load_corruption_set(out, d.dataset, names, d.severities, 0, seed=d.corruption_seed)


# =========================================================================== CLI


def add_corrupt_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``rift data corrupt`` to ``parser`` (returns it)."""
    parser.add_argument("--dataset", default="cifar10", choices=list(DATASETS),
                        help="data set of the clean images")
    parser.add_argument("--root", default="", help="data directory (else env RIFT_DATA_ROOT)")
    parser.add_argument("--archive", default="", help="a .tar.gz of the data, unpacked into --cache-dir")
    parser.add_argument("--cache-dir", default="~/.cache/rift_dist", help="where --archive is unpacked")
    parser.add_argument("--layout", default="auto", choices=list(LAYOUTS))
    parser.add_argument("--split", default="test", choices=["train", "test"], help="split to corrupt (test)")
    parser.add_argument("--out", required=True, help="output directory (created atomically)")
    parser.add_argument("--n", type=int, default=0, help="class-balanced subset of N images (0 = the whole split)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset and of the corruptions")
    parser.add_argument("--corruptions", nargs="+", default=None,
                        help="corruption names, 'all' for the 19 files, 'authors' for the RiFT code's 18 "
                             "(default: the standard 15)")
    parser.add_argument("--severities", nargs="+", type=int, default=[1, 2, 3, 4, 5], help="severities (1..5)")
    parser.add_argument("--params", default="auto", choices=["auto", *SEVERITY_PARAMS],
                        help="severity constants (auto: by image size)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def corrupt_command(args: argparse.Namespace) -> int:
    """Run ``rift data corrupt``: load the split, take the subset, generate the set; returns the exit code
    (0 done, 2 data error, with the message on stderr)."""
    from rift_dist.config import DataConfig
    from rift_dist.data.splits import indices_sha256

    names = args.corruptions or list(CIFAR_CORRUPTIONS)
    if names == ["all"]:
        names = list(AUTHORS_CORRUPTIONS)
    elif names == ["authors"]:
        names = list(AUTHORS_USED_CORRUPTIONS)
    try:
        dcfg = DataConfig(dataset=args.dataset, root=args.root, archive=args.archive,
                          cache_dir=args.cache_dir, layout=args.layout)
        root = resolve_root(dcfg)
        split = load_split(args.dataset, root, args.split, args.layout)
        pick = _subset_positions(split.labels, args.n, args.seed)
        data = split if len(pick) == len(split) else split.subset(pick)
        out = generate_corruption_set(
            data, args.out, names, args.severities, seed=args.seed, progress=not args.quiet, params=args.params,
            source={"dataset": args.dataset, "root": str(root), "split": args.split,
                    "positions_sha256": indices_sha256(pick)},
        )
    except DataError as exc:
        print(f"rift data corrupt: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0
