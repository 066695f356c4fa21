"""Corruption accuracy: the corruption sets a run evaluates and the model's clean accuracy on each
(RiFT §5.1, Table 1 "corruption"; Hendrycks & Dietterich 2019, CIFAR-10-C).

``eval.corruption_protocol`` picks the sets: the standard release's (``data.corruptions`` at
``data.severities``), the 18 corruptions the authors' code averages over, or both.  The sets are read
from ``data.corruption_root`` or re-generated from the test split (:mod:`rift_dist.data.corruptions`);
each is evaluated by :func:`rift_dist.eval.protocol.evaluate_model` (clean accuracy, the run's loader).
``ctx`` arguments are a :class:`rift_dist.stages.context.StageContext` (config, runtime, precision).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rift_dist.atomic import read_json_piece, write_json
from rift_dist.eval.protocol import evaluate_model, state_fingerprint

__all__ = ["corruption_plan", "corruption_sets", "evaluate_corruptions"]


def corruption_plan(cfg) -> dict[str, tuple[list[str], list[int]]]:
    """{protocol: (corruptions, severities)} for ``eval.corruption_protocol``.

    standard: ``data.corruptions`` (empty = the 15 of CIFAR-10-C) at ``data.severities``;
    authors: the 18 corruptions the authors' code averages over (all 19 files but glass_blur) at
    severities 1-5, or severity 1 only for Tiny-ImageNet-C, as their code does; both: the two.
    """
    from rift_dist.data.corruptions import AUTHORS_USED_CORRUPTIONS, CIFAR_CORRUPTIONS
    from rift_dist.data.datasets import dataset_spec

    d = cfg.data
    plans = {}
    if cfg.eval.corruption_protocol in ("standard", "both"):
        plans["standard"] = (list(d.corruptions) or list(CIFAR_CORRUPTIONS), sorted(d.severities))
    if cfg.eval.corruption_protocol in ("authors", "both"):
        plans["authors"] = (list(AUTHORS_USED_CORRUPTIONS), list(dataset_spec(d.dataset).authors_severities))
    return plans


def corruption_sets(ctx):
    """The corruption sets to evaluate as [(corruption, severity, ArrayDataset)] plus a description dict.

    Loads ``data.corruption_root`` or, with ``data.corruption_generate``, re-generates a CIFAR-10-C
    style set from the test split (main process first, then every rank loads it), for the union of
    the corruptions and severities of ``eval.corruption_protocol``.  Returns ([], None) when neither
    is configured.

    Raises:
        DataError: from the loader, e.g. ONE error listing every missing corruption file.
    """
    from rift_dist.data.corruptions.generate import get_corruption_sets

    cfg = ctx.cfg
    d = cfg.data
    if not d.corruption_root and not d.corruption_generate:
        return [], None
    plans = corruption_plan(cfg)
    names: list[str] = []
    sevs: set[int] = set()
    for cs, ss in plans.values():
        names += [c for c in cs if c not in names]
        sevs.update(ss)
    wanted = dataclasses.replace(cfg, data=dataclasses.replace(d, corruptions=names, severities=sorted(sevs)))
    if d.corruption_generate and ctx.is_main:
        sets = get_corruption_sets(wanted)  # generates once, on the main process
    ctx.runtime.barrier()
    if not (d.corruption_generate and ctx.is_main):
        sets = get_corruption_sets(wanted)
    regenerated = any("RE-GENERATED" in ds.description for _, _, ds in sets)
    info = {"root": d.corruption_root or f"{d.cache_dir}/corruptions", "regenerated": regenerated,
            "protocol": cfg.eval.corruption_protocol, "corruptions": names, "severities": sorted(sevs),
            "protocols": {k: {"corruptions": v[0], "severities": v[1]} for k, v in plans.items()},
            "label": "re-generated CIFAR-10-C style set (not the official release)" if regenerated
            else "official corruption set",
            "images_per_set": len(sets[0][2]) if sets else 0}
    return sets, info


def evaluate_corruptions(ctx, model, sets, label: str = "", progress_dir: Path | None = None) -> dict:
    """Clean accuracy on every (corruption, severity); mean as the headline, per-corruption/severity tables,
    and the mean of each protocol of ``eval.corruption_protocol``.

    With ``progress_dir``, finished sets are recorded in ``<progress_dir>/<label>-corruptions.json``
    (keyed by the model's weights) and skipped when the evaluation is resumed.
    """
    table: dict[str, float] = {}
    store = Path(progress_dir) / f"{label}-corruptions.json" if progress_dir is not None else None
    fp = state_fingerprint(model) if store is not None else ""
    saved = read_json_piece(store) if store is not None and ctx.cfg.eval.resume else None
    if saved is not None:
        if saved.get("model") == fp and saved.get("n") == [len(ds) for _, _, ds in sets]:
            table.update(saved["per_set"])
    ctx.runtime.barrier()
    for name, severity, ds in sets:
        key = f"{name}/{severity}"
        if key in table:
            continue
        table[key] = evaluate_model(ctx, model, ds, None, desc=f"{label} {name}-{severity}", in_memory=True)["clean_accuracy"]
        if store is not None and ctx.is_main:
            write_json(store, {"model": fp, "n": [len(d) for _, _, d in sets], "per_set": table})
    table = {f"{n}/{s}": table[f"{n}/{s}"] for n, s, _ in sets}
    per_c: dict[str, list[float]] = {}
    per_s: dict[str, list[float]] = {}
    for key, acc in table.items():
        c, s = key.split("/")
        per_c.setdefault(c, []).append(acc)
        per_s.setdefault(s, []).append(acc)
    protocols = {}
    for pname, (cs, ss) in corruption_plan(ctx.cfg).items():
        vals = [table[f"{c}/{s}"] for c in cs for s in ss if f"{c}/{s}" in table]
        if vals:
            protocols[pname] = {"mean": sum(vals) / len(vals), "corruptions": cs, "severities": ss, "sets": len(vals)}
    mean = sum(table.values()) / max(len(table), 1)
    if protocols:  # the headline is the configured protocol's mean (standard when both)
        mean = protocols.get("standard", next(iter(protocols.values())))["mean"]
    return {"corruption_accuracy": mean,
            "per_corruption": {c: sum(v) / len(v) for c, v in per_c.items()},
            "per_severity": {s: sum(v) / len(v) for s, v in per_s.items()},
            "per_set": table, "protocols": protocols}
