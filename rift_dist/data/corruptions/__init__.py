"""Common-corruption test sets: load CIFAR-10-C / CIFAR-100-C / Tiny-ImageNet-C, or re-generate them.

Reference: Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019 (https://github.com/hendrycks/robustness; CIFAR-10-C on Zenodo 2535967).

* :mod:`~rift_dist.data.corruptions.kernels`: the 19 corruptions, batch-vectorised, with the severity
  constants of the original generation scripts for small images (:func:`~.kernels.corrupt_batch`);
* :mod:`~rift_dist.data.corruptions.upstream`: what works of the ``imagecorruptions`` package on this
  stack, and what is done instead where it breaks;
* :mod:`~rift_dist.data.corruptions.load`: reading a set in the release layouts
  (:func:`~.load.load_corruption_set`);
* :mod:`~rift_dist.data.corruptions.generate`: writing a re-generated set with its provenance
  (:func:`~.generate.generate_corruption_set`), the sets a run evaluates
  (:func:`~.generate.get_corruption_sets`: load, or generate then load) and ``rift data corrupt``.

This module holds the corruption names every part shares; it imports nothing.
"""

from __future__ import annotations

__all__ = ["CIFAR_CORRUPTIONS", "EXTRA_CORRUPTIONS", "AUTHORS_CORRUPTIONS", "AUTHORS_USED_CORRUPTIONS"]

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
