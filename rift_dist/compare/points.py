"""Evaluated points of ``rift compare``: clean / robust / corruption accuracy with per-image scores, on disk."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from torch import nn

from rift_dist.atomic import read_json_piece
from rift_dist.config import RunConfig


def val_corruption_sets(cfg: RunConfig, val) -> list:
    """The configured corruptions x severities applied to the validation images: [(name, severity, ArrayDataset)].

    The test split has its own corruption set (``data.corruption_root`` or the re-generated one); the
    validation images get the same corruptions here (re-generated, seeded by stream ``compare-val-corruption``
    of ``data.corruption_seed``), so alpha* never sees test images.  [] when no corruption set is configured.
    """
    from rift_dist.data.corruptions import CIFAR_CORRUPTIONS
    from rift_dist.data.corruptions.kernels import corrupt_batch
    from rift_dist.data.sources import ArrayDataset
    from rift_dist.seeding import stream_seed

    d = cfg.data
    if not d.corruption_root and not d.corruption_generate:
        return []
    out = []
    for i, name in enumerate(list(d.corruptions) or list(CIFAR_CORRUPTIONS)):
        for s in sorted(d.severities):
            rng = np.random.default_rng(stream_seed(d.corruption_seed, "compare-val-corruption", i, s))
            images = corrupt_batch(val.images, name, s, rng)
            out.append((name, s, ArrayDataset(images, val.labels, val.classes,
                                              f"validation split, {name} severity {s} (re-generated)")))
    return out


def evaluate_point(ctx, model: nn.Module, dataset, corruption_sets: list, attack, restarts: int, seed: int,
                   desc: str) -> dict:
    """Clean, robust and corruption accuracy of ``model`` with per-image scores.

    Returns:
        {"clean", "robust", "corruption" (None without sets), "n", "scores": {"clean", "robust",
        "corruption"} (numpy [n]: 0/1, and the fraction of corruption sets each image is right on)}.
    """
    from rift_dist.eval.protocol import evaluate_model

    ev = evaluate_model(ctx, model, dataset, attack, restarts, seed=seed, desc=desc, per_sample=True)
    scores = {"clean": ev["clean_correct"].astype(np.float64), "robust": ev["robust_correct"].astype(np.float64)}
    corr = None
    if corruption_sets:
        per = [evaluate_model(ctx, model, ds, None, desc=f"{desc} {n}-{s}", in_memory=True,
                              per_sample=True)["clean_correct"] for n, s, ds in corruption_sets]
        scores["corruption"] = np.mean(np.stack(per).astype(np.float64), axis=0)
        corr = float(scores["corruption"].mean())
    return {"clean": ev["clean_accuracy"], "robust": ev["robust_accuracy"], "corruption": corr,
            "n": ev["num_examples"], "scores": scores}


def autoattack_point(ctx, model: nn.Module, dataset, label: str, progress_dir: Path, desc: str) -> dict:
    """AutoAttack robust accuracy of ``model`` on ``dataset`` (the first ``compare.autoattack_examples`` test
    images): :func:`rift_dist.eval.protocol.autoattack_accuracy` with the ``eval.autoattack_*`` settings
    (standard AutoAttack, Croce & Hein 2020, through torchattacks), resumable from ``progress_dir``.

    Returns:
        {"autoattack": fraction robust, "autoattack_n": images attacked, "autoattack_attacks": [names run]}.
    """
    from rift_dist.eval.protocol import autoattack_accuracy

    res = autoattack_accuracy(ctx, model, dataset, f"compare-{label}", progress_dir)
    ctx.log(f"[compare] {desc}: AutoAttack {100 * res['robust_accuracy']:.2f}% on {res['num_examples']} images"
            + (f" ({'; '.join(res['notes'])})" if res.get("notes") else ""))
    return {"autoattack": res["robust_accuracy"], "autoattack_n": res["num_examples"],
            "autoattack_attacks": [a["name"] for a in res["attacks"]]}


def save_point(path: Path, point: dict, extra: dict | None = None) -> None:
    """Write a point (without its scores) as JSON and its per-image scores as ``.npz`` beside it (atomically)."""
    from rift_dist.atomic import write_json

    scores = point.get("scores", {})
    buf = io.BytesIO()
    np.savez(buf, **scores)
    tmp = path.with_suffix(".npz.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path.with_suffix(".npz"))
    write_json(path, {**{k: v for k, v in point.items() if k != "scores"}, **(extra or {})})


def load_point(path: Path) -> dict | None:
    """A point written by :func:`save_point` (scores included), or None when it is not there."""
    if not path.is_file() or not path.with_suffix(".npz").is_file():
        return None
    point = read_json_piece(path)
    if point is None:  # corrupt (reported): evaluated again
        return None
    with np.load(path.with_suffix(".npz")) as z:
        point["scores"] = {k: z[k] for k in z.files}
    return point

