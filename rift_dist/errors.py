"""The one error base of rift_dist: :class:`RiftError`.

Every error the ``rift`` command reports as a one-line message (exit status 1, or 2 for a bad
configuration) derives from it: ``ConfigError`` (and ``PreflightError``), ``StageError`` (and
``RunDirLockedError``), ``CheckpointError``, ``DataError``, ``DistributedError``, ``ClusterError``,
``ReportError`` and ``CompareError``.  Each also keeps the built-in base it had before
(``ValueError`` for ``ConfigError``, ``RuntimeError`` for the others), so ``except ValueError`` in
user code still catches a bad config.

This module imports nothing from the package (a leaf: any module may import it).
"""

from __future__ import annotations


class RiftError(Exception):
    """Base of every error rift_dist raises on purpose: the message names the problem and the fix.

    The CLI prints ``rift: <ClassName>: <message>`` for any ``RiftError`` and exits 1 (2 for a
    :class:`~rift_dist.config.ConfigError`); anything else is a bug and keeps its traceback.
    """
