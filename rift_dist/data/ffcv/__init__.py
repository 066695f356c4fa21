"""The FFCV data path: ``.beton`` files and a loader with the torch loader's semantics.

FFCV (Leclerc et al., CVPR 2023) stores a data set as one ``.beton`` file and decodes
and augments whole batches in JIT-compiled (numba) code on a thread pool, instead of
per-item Python transforms in worker processes.  This package is the project's only
contact with FFCV; everything else sees the same loader interface as the torch path
(``rift_dist.data.loaders.build_loader`` picks it).

* :mod:`~rift_dist.data.ffcv.write`: the file format -- write, verify and convert
  ``.beton`` files (+ the ``rift data convert`` / ``rift data verify`` commands);
* :mod:`~rift_dist.data.ffcv.ops`: the pipeline's operation (reflect-pad crop, flip and
  float conversion in one numba pass) and its compiled kernels;
* :mod:`~rift_dist.data.ffcv.loader`: :class:`~rift_dist.data.ffcv.loader.FFCVLoader`
  (FFCV's Loader with an epoch iterator that feeds each batch its augmentation
  parameters from the epoch plan), ``build_ffcv_loader`` and the config checks.

FFCV stays optional: this module imports torch only, never ``ffcv``;
:func:`ffcv_available` says whether FFCV can be used here.

Threads: ``import ffcv`` sets torch's intra-op thread count to 1 and every FFCV Loader
sets it to its worker count; :func:`keep_threads` restores the caller's count after each
import, loader construction and epoch start.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

import torch

from rift_dist.data.archive import DataError

__all__ = ["INSTALL_HINT", "ffcv_available", "keep_threads", "require_ffcv"]

INSTALL_HINT = "run scripts/install_ffcv.sh .venv/bin/python, or set data.loader=torch"
"""How to get FFCV (or do without it), appended to every "FFCV is missing" message."""

_AVAILABLE: tuple[bool, str] | None = None
_AVAILABLE_LOCK = threading.Lock()


@contextlib.contextmanager
def keep_threads() -> Iterator[None]:
    """Restore torch's (and numba's, if loaded) thread count of the calling thread on exit."""
    torch_threads = torch.get_num_threads()
    numba_mod = sys.modules.get("numba")
    numba_threads = numba_mod.get_num_threads() if numba_mod is not None else None
    try:
        yield
    finally:
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
        numba_mod = sys.modules.get("numba")
        if numba_mod is not None:
            want = numba_threads if numba_threads is not None else numba_mod.config.NUMBA_NUM_THREADS
            if numba_mod.get_num_threads() != want:
                numba_mod.set_num_threads(want)


def ffcv_available() -> tuple[bool, str]:
    """Whether FFCV can be used here.

    Imports ``ffcv`` (and its compiled extension) once; the result is cached.  Never
    raises.  Restores torch's thread count, which ``import ffcv`` sets to 1.

    Returns:
        ``(True, "")`` when FFCV imports, else ``(False, reason)`` where ``reason`` names
        the import error and the fix.
    """
    global _AVAILABLE
    if _AVAILABLE is not None:
        return _AVAILABLE
    with _AVAILABLE_LOCK:
        if _AVAILABLE is None:
            try:
                with keep_threads():
                    import ffcv  # noqa: F401
                    import ffcv.libffcv  # noqa: F401
                    from ffcv.loader import Loader  # noqa: F401
                _AVAILABLE = (True, "")
            except BaseException as exc:  # noqa: BLE001 - an ImportError, OSError of a missing .so, ...
                if isinstance(exc, KeyboardInterrupt):
                    raise
                _AVAILABLE = (False, f"ffcv is not importable ({type(exc).__name__}: {exc}); {INSTALL_HINT}")
    return _AVAILABLE


def require_ffcv() -> None:
    """Raise :class:`DataError` (with the reason and :data:`INSTALL_HINT`) unless FFCV is usable."""
    ok, reason = ffcv_available()
    if not ok:
        raise DataError(reason)
