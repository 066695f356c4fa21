"""The parts of the ``imagecorruptions`` package (1.1.2) that work on this stack, found at run time.

The package's own corruption functions are not called to make the images: they hard-code the
ImageNet-C constants for 224 px images, so they would not reproduce CIFAR-10-C's severities (they
are only probed, see :func:`imagecorruptions_status`, and the probe's result is stored in a
generated set's metadata). These parts are used where they work
(:mod:`rift_dist.data.corruptions.kernels`):

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

import contextlib
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Callable

import numpy as np

from rift_dist.data.corruptions import AUTHORS_CORRUPTIONS

__all__ = ["imagecorruptions_status"]


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
