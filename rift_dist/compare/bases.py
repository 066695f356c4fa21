"""The AT bases of ``rift compare``: the same comparison on PGD-AT, TRADES and MART models (RiFT Table 2).

``compare.bases`` lists them: ``pgd`` / ``trades`` / ``mart`` are trained here (the train stage with that
``train.method``), ``{name: N, checkpoint: PATH}`` is imported (the train stage's ``from_checkpoint`` path:
:func:`rift_dist.models.convert.load_external_checkpoint`, the reader of ``rift evaluate --checkpoint``) and
trains nothing.  Empty (the default) is the run's own base -- ``train.method``, or ``from_checkpoint`` when set --
and keeps the one-base layout ``<run_dir>/seed-<s>/``; otherwise every base has its folder
``<run_dir>/base-<name>/seed-<s>/``.
"""

from __future__ import annotations

import copy
from pathlib import Path

from rift_dist.compare.methods import CompareError
from rift_dist.config import CompareBase, RunConfig

IMPORTED = "imported"
"""The name of the default base when the run imports its AT model (``from_checkpoint``)."""


def default_base(cfg: RunConfig) -> CompareBase:
    """The base of a comparison without ``compare.bases``: ``train.method``, or the imported ``from_checkpoint``."""
    if cfg.from_checkpoint:
        return CompareBase(name=IMPORTED, checkpoint=cfg.from_checkpoint)
    return CompareBase(name=cfg.train.method)


def compare_bases(cfg: RunConfig) -> list[CompareBase]:
    """The comparison's bases in order: ``compare.bases``, or :func:`default_base` when that list is empty."""
    return [copy.copy(b) for b in cfg.compare.bases] or [default_base(cfg)]


def is_flat(cfg: RunConfig) -> bool:
    """True when the one base is the run's own (``seed-<s>/`` directly in the run dir, as before bases existed)."""
    return compare_bases(cfg) == [default_base(cfg)]


def base_dir(cfg: RunConfig, run_dir: Path, base: str) -> Path:
    """Where ``base``'s seeds live: ``run_dir`` itself for the flat layout, else ``run_dir/base-<base>``."""
    return Path(run_dir) if is_flat(cfg) else Path(run_dir) / f"base-{base}"


def base_config(cfg: RunConfig, base: CompareBase) -> RunConfig:
    """``cfg`` for one base: trained ones set ``train.method`` (and clear ``from_checkpoint``), imported ones set
    ``from_checkpoint`` (the train stage then imports instead of training)."""
    out = copy.deepcopy(cfg)
    out.from_checkpoint = base.checkpoint
    if not base.checkpoint:
        out.train.method = base.name
    return out


def describe(cfg: RunConfig, base: CompareBase) -> str:
    """One line for plans and reports: how this base's AT model is made."""
    if base.checkpoint:
        return f"imported from {base.checkpoint} (no AT training)"
    method = {"pgd": "PGD-AT (Madry et al.)", "trades": f"TRADES (beta {cfg.train.beta:g})", "mart": "MART"}
    return f"trained here: {method.get(base.name, base.name)}, {cfg.train.epochs} epochs"


def check_base_checkpoints(cfg: RunConfig) -> None:
    """Every imported base's checkpoint exists, loads and fits the configured model (read now, before any write).

    Raises:
        CompareError: naming the base, the file and the fix (a missing file; an unreadable one; one whose keys or
            shapes do not fit ``model.*``, with the converter's report of what does not fit).
    """
    from rift_dist.checkpoint import CheckpointError
    from rift_dist.models import build_model
    from rift_dist.models.convert import load_external_checkpoint

    model = None
    for i, b in enumerate(cfg.compare.bases):
        if not b.checkpoint:
            continue
        path = Path(b.checkpoint).expanduser()
        where = f"compare.bases[{i}] ({b.name}): checkpoint {b.checkpoint}"
        if not path.is_file():
            raise CompareError(f"{where}: no such file; give the path of an adversarially trained checkpoint (a "
                               f"state dict, as `rift evaluate --checkpoint` reads) or drop the base from "
                               f"compare.bases (nothing was written)")
        model = model or build_model(cfg)
        try:
            load_external_checkpoint(path, model)
        except CheckpointError as exc:
            size = (f"widen factor {cfg.model.widen_factor}" if cfg.model.arch.startswith("wrn")
                    else f"width {cfg.model.width}")
            raise CompareError(f"{where} cannot be used as the AT model of {cfg.model.arch} ({size}, "
                               f"{cfg.data.dataset}): "
                               f"{exc}. Set model.* (and data.dataset) to the checkpoint's architecture, or give a "
                               f"checkpoint of this model (nothing was written)") from exc
