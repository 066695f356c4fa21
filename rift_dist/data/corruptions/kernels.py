"""The 19 common corruptions, batch-vectorised, at the severities of CIFAR-10-C and Tiny-ImageNet-C.

The severity constants (:data:`SEVERITY_PARAMS`) are those of the original generation scripts for
small images -- ``make_cifar_c.py`` (32x32) and ``make_tinyimagenet_c.py`` (64x64) of
hendrycks/robustness -- not the ImageNet-C constants that the ``imagecorruptions`` package
hard-codes for 224 px images. Each corruption is implemented here with a seeded
``numpy.random.Generator`` (reproducible; independent of which other corruptions are requested);
the parts of ``imagecorruptions`` that work on this stack are used through
:mod:`rift_dist.data.corruptions.upstream`, local equivalents otherwise. Reference: Hendrycks &
Dietterich, ICLR 2019.
"""

from __future__ import annotations

import io
import math
from typing import Callable, Sequence

import numpy as np

from rift_dist.data.corruptions import AUTHORS_CORRUPTIONS, upstream
from rift_dist.data.datasets import DATASETS, spec_for_image_size
from rift_dist.data.sources import DataError

__all__ = ["SEVERITY_PARAMS", "corrupt_batch", "pick_params", "corruption_context"]

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

    files = upstream._IC.frost_files()
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

    disk = upstream._IC.helper("disk") or _disk_local
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


def pick_params(image_size: tuple[int, int], params: str) -> str:
    """The severity-constant set for ``params``: itself, or with "auto" the set of the data set whose images are
    ``image_size`` (H, W) pixels (32x32 -> "cifar", 64x64 -> "tiny-imagenet").

    Raises:
        DataError: an unknown set, or "auto" for a size no data set has.
    """
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


def corruption_context(names: Sequence[str], params: str) -> tuple[dict, dict, dict]:
    """Shared helpers for a generation run plus per-corruption implementation notes and fallbacks.

    Returns:
        ``(ctx, implementation, fallback)``: ``ctx`` holds the motion-blur function and the frost
        textures that :func:`corrupt_batch` uses; the two dicts map a corruption name to a note
        (stored in a generated set's ``metadata.json``).
    """
    status = upstream.imagecorruptions_status(probe=True)
    broken = status.get("broken", {})
    ctx: dict = {}
    impl: dict[str, str] = {}
    fallback: dict[str, str] = {}
    ic_ok = upstream._IC.module is not None
    ic_why = status["import"] if not ic_ok else ""
    constants = f"{params} constants of {'make_cifar_c.py' if params == 'cifar' else 'make_tinyimagenet_c.py'}"
    motion = upstream._IC.helper("_motion_blur")
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
            if upstream._IC.helper("disk"):
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
    params = pick_params(images.shape[1:3], params)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    ctx = _ctx if _ctx is not None else corruption_context([corruption], params)[0]
    c = SEVERITY_PARAMS[params][corruption][severity - 1]
    out = _FUNCS[corruption](images.astype(np.float64), c, rng, ctx)
    return np.clip(out, 0, 255).astype(np.uint8)
