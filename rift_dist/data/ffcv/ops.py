"""The operation of rift_dist's FFCV pipeline: reflect-pad crop, flip and float conversion in one numba pass.

FFCV's own ``RandomTranslate`` pads with a constant and draws its own randomness, so it can
match neither the torch loader's reflect padding nor its epoch plan.  :func:`crop_flip_convert`
returns an FFCV ``Operation`` class whose per-image crop offsets and flips are written into a
per-batch buffer by the loader's epoch iterator (see :mod:`rift_dist.data.ffcv.loader`), so the
FFCV path produces ``rift_dist.data.loaders.gather_batch``'s pixels, bit for bit.  On the CPU
the same pass also converts to float32 (torch's permuting copy of a 3-channel batch would cost
more than the whole pipeline).

Nothing here imports ``ffcv`` or ``numba`` at import time: the kernels are compiled (a serial and
a parallel variant) and the class is defined the first time a loader needs them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["crop_flip_convert", "kernels"]

# Plain Python here; compiled with numba (a serial and a parallel variant, the latter
# cached on disk) the first time an FFCV loader needs them, so that every loader of a
# process shares one compilation.  ``_prange`` becomes ``numba.prange`` then.
_prange = range
_KERNELS: dict[str, Any] = {}


def _crop_flip_u8(images, params, pad, augment, dst):  # pragma: no cover - runs compiled
    """uint8 [n,H,W,C] -> dst uint8 [>=n,H,W,C]: reflect-pad crop at params[i,:2] - pad, flip if params[i,2]."""
    n, h, w, c = images.shape
    for i in _prange(n):
        oy, ox, flip = 0, 0, False
        if augment:
            oy, ox, flip = params[i, 0] - pad, params[i, 1] - pad, params[i, 2] != 0
        for y in range(h):
            sy = y + oy
            sy = -sy if sy < 0 else (2 * (h - 1) - sy if sy >= h else sy)
            for x in range(w):
                sx = (w - 1 - x if flip else x) + ox
                sx = -sx if sx < 0 else (2 * (w - 1) - sx if sx >= w else sx)
                for ch in range(c):
                    dst[i, y, x, ch] = images[i, sy, sx, ch]
    return dst[:n]


def _crop_flip_f32(images, params, pad, augment, nchw, lut):  # pragma: no cover - runs compiled
    """As :func:`_crop_flip_u8`, into a new float32 array (lut[v] = v / 255), [n,C,H,W] or [n,H,W,C]."""
    n, h, w, c = images.shape
    if nchw:
        out = np.empty((n, c, h, w), dtype=np.float32)
    else:
        out = np.empty((n, h, w, c), dtype=np.float32)
    for i in _prange(n):
        oy, ox, flip = 0, 0, False
        if augment:
            oy, ox, flip = params[i, 0] - pad, params[i, 1] - pad, params[i, 2] != 0
        for y in range(h):
            sy = y + oy
            sy = -sy if sy < 0 else (2 * (h - 1) - sy if sy >= h else sy)
            for x in range(w):
                sx = (w - 1 - x if flip else x) + ox
                sx = -sx if sx < 0 else (2 * (w - 1) - sx if sx >= w else sx)
                if nchw:
                    for ch in range(c):
                        out[i, ch, y, x] = lut[images[i, sy, sx, ch]]
                else:
                    for ch in range(c):
                        out[i, y, x, ch] = lut[images[i, sy, sx, ch]]
    return out


def kernels() -> dict[str, Any]:
    """The compiled kernels: ``u8``/``f32`` (serial) and ``u8_par``/``f32_par`` (numba parallel)."""
    global _prange
    if not _KERNELS:
        import numba

        _prange = numba.prange
        for name, fn in (("u8", _crop_flip_u8), ("f32", _crop_flip_f32)):
            # Only one variant per function may use numba's disk cache (its index does not
            # tell parallel from serial builds); the parallel one is the slow one to compile.
            _KERNELS[name] = numba.njit(nogil=True)(fn)
            _KERNELS[name + "_par"] = numba.njit(nogil=True, cache=True, parallel=True)(fn)
    return _KERNELS


_OPERATION: dict[str, Any] = {}


def crop_flip_convert() -> type:
    """The ``CropFlipConvert`` FFCV operation class (defined once; needs ffcv importable).

    ``CropFlipConvert(padding, augment, to_float, channels_last=False)``: see its docstring.
    """
    if _OPERATION:
        return _OPERATION["CropFlipConvert"]
    from dataclasses import replace

    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

    class CropFlipConvert(Operation):
        """Reflect-pad crop + horizontal flip by the epoch plan, and/or conversion to float, in one numba pass.

        Input: a batch of uint8 [B, H, W, C] images.  Per image it reads int32
        ``(oy, ox, flip)`` from a buffer that the loader's epoch iterator
        (:mod:`rift_dist.data.ffcv.loader`) fills before each batch from the epoch plan; output pixel (y, x) is input pixel
        (reflect(y + oy - p), reflect(x' + ox - p)) with x' = W-1-x when flipped and a
        reflection that does not repeat the edge (numpy/torch ``reflect``, p < H, W) -- the
        result of ``loaders.gather_batch``.  ``augment=False`` copies the image as is.

        Output, ``to_float=False``: uint8 [B, H, W, C] in FFCV's (pinned) buffer, for
        the GPU path, which converts on the device.  ``to_float=True``: a NEW float32
        array per batch, value/255 by table lookup (bit-identical to torch's
        ``float().div(255)``), laid out [B, C, H, W], or [B, H, W, C] for
        ``channels_last`` (the loader returns its NCHW-permuted view).  Converting
        here, in parallel, is ~10x faster than torch's permuting copy of a C=3 batch.
        """

        def __init__(self, padding: int, augment: bool, to_float: bool, channels_last: bool = False):
            super().__init__()
            self.padding = int(padding) if augment else 0
            self.augment = bool(augment)
            self.to_float = bool(to_float)
            self.channels_last = bool(channels_last)

        def generate_code(self):
            compiled = kernels()
            par = "_par" if Compiler.num_threads > 1 else ""
            pad, augment = self.padding, self.augment
            nchw = not self.channels_last
            lut = np.arange(256, dtype=np.float32) / np.float32(255.0)
            if self.to_float:
                kernel = compiled["f32" + par]

                def crop_flip_float(images, params):
                    return kernel(images, params, pad, augment, nchw, lut)

                return crop_flip_float
            kernel = compiled["u8" + par]

            def crop_flip(images, memory):
                return kernel(images, memory[1], pad, augment, memory[0])

            return crop_flip

        def declare_state_and_memory(self, previous_state):
            h, w, c = previous_state.shape
            if not 0 <= self.padding < min(h, w):
                raise ValueError(f"reflect padding {self.padding} must be below the image size {h}x{w}")
            params = AllocationQuery((3,), np.dtype("<i4"))
            if not self.to_float:
                return replace(previous_state, jit_mode=True), (
                    AllocationQuery(previous_state.shape, previous_state.dtype), params)
            shape = (h, w, c) if self.channels_last else (c, h, w)
            return replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<f4")), params

    _OPERATION["CropFlipConvert"] = CropFlipConvert
    return CropFlipConvert
