"""Read the adversarially trained checkpoints people already have into this project's models.

``load_external_checkpoint(path, model)`` accepts (RIFT.md, "Bring your own AT model"):

- a raw state dict, or one stored under ``state_dict`` / ``model_state_dict`` / ``net`` /
  ``model`` / ``network`` / ``module`` / ``state`` (nested up to three levels; other entries such as
  ``epoch`` or ``optimizer`` are ignored and reported);
- wrapper prefixes shared by every key — ``module.`` (DataParallel / DDP), ``_orig_mod.``
  (torch.compile), ``model.``, ``net.`` or the ``1.`` of a ``Sequential(Normalize, net)`` — stripped
  while the model has no top-level child of that name;
- a stored input normaliser (``normalize.mean``/``std``, ``norm.mean``/``std``, ``0.mean``/``std``,
  ``mu``/``sigma``; 3 values each): removed from the weights and compared with the configured
  normalisation (``model.mean`` / ``model.std`` / ``model.normalize``) — a mismatch is an error
  that says what to set, since a wrong normalisation silently ruins accuracy;
- the parameter names of the common public CIFAR ResNet (``layerN.M.shortcut.0``, ``linear``: the
  names our ResNet uses) and of torchvision-style ResNets (``downsample.0`` -> ``shortcut.0``,
  ``fc`` -> ``linear``); the TRADES / Bag-of-Tricks WRN-34-10 (``block1.layer.0.conv1``,
  ``convShortcut``, ``fc``: our names), whose unused ``sub_block1`` is dropped;
- missing ``num_batches_tracked`` buffers (old PyTorch) are filled with 0.

Everything that was mapped is listed in the returned report; anything that cannot be mapped
raises :class:`CheckpointConversionError` naming the missing and unexpected keys, every shape
mismatch with both shapes, and a hint (architecture, width / widen factor, number of classes).
Files are read with ``torch.load(weights_only=True)`` (:func:`rift_dist.checkpoint.load`), which
refuses checkpoints that need arbitrary code to unpickle and explains how to re-save them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rift_dist.checkpoint import CheckpointError, load
from rift_dist.models import unwrap
from rift_dist.models.normalize import Normalize

CONTAINER_KEYS = ("state_dict", "model_state_dict", "net", "model", "network", "module", "state")
"""Keys under which training scripts commonly store the state dict, tried in this order."""
_MEAN_NAMES = ("mean", "mu")
_STD_NAMES = ("std", "sigma")


class CheckpointConversionError(CheckpointError):
    """An external checkpoint cannot be mapped onto the configured model (the message says why and what to set)."""


# ---------------------------------------------------------------------------- finding the weights


def _tensor_share(d: dict) -> float:
    return sum(isinstance(v, torch.Tensor) for v in d.values()) / max(len(d), 1)


def find_state_dict(obj: Any, where: str = "") -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """The tensor dict inside a loaded checkpoint.

    Returns:
        (state dict, where it was found e.g. "['state_dict']" or "top level", ignored non-tensor entries).

    Raises:
        CheckpointConversionError: when no dict of tensors is found (lists the top-level keys).
    """
    if isinstance(obj, dict) and obj:
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj), where or "top level", []
        for key in CONTAINER_KEYS:
            if isinstance(obj.get(key), dict) and where.count("[") < 3:
                try:
                    sd, at, ignored = find_state_dict(obj[key], f"{where}[{key!r}]")
                    return sd, at, ignored + [f"{where}[{k!r}]" for k in obj if k != key]
                except CheckpointConversionError:
                    continue
        if _tensor_share(obj) >= 0.9:  # a state dict with a few extra entries (e.g. 'epoch')
            sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            return sd, where or "top level", [f"{where}[{k!r}]" for k in obj if k not in sd]
    keys = list(obj)[:20] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointConversionError(
        f"no state dict found: the checkpoint holds {keys}; expected a dict of tensors, or one under "
        f"{', '.join(repr(k) for k in CONTAINER_KEYS)}. Re-save it with torch.save(model.state_dict(), path)"
    )


# ---------------------------------------------------------------------------- normaliser and wrappers


def extract_normalizer(sd: dict[str, torch.Tensor]) -> tuple[dict, dict | None]:
    """Remove a stored input normaliser (mean/std or mu/sigma pair of 3 values under one prefix).

    Returns:
        (state dict without it, {"prefix", "keys", "mean": [3 floats], "std": [3 floats]} or None).
    """
    groups: dict[str, dict[str, str]] = {}
    for key, t in sd.items():
        prefix, _, last = key.rpartition(".")
        if t.numel() == 3 and t.is_floating_point() and last in _MEAN_NAMES + _STD_NAMES:
            groups.setdefault(prefix, {})["mean" if last in _MEAN_NAMES else "std"] = key
    for prefix, pair in groups.items():
        if set(pair) == {"mean", "std"}:
            mean = sd[pair["mean"]].flatten().float().tolist()
            std = sd[pair["std"]].flatten().float().tolist()
            rest = {k: v for k, v in sd.items() if k not in pair.values()}
            return rest, {"prefix": prefix, "keys": sorted(pair.values()), "mean": mean, "std": std}
    return sd, None


def strip_wrappers(sd: dict[str, torch.Tensor], target_top: set[str]) -> tuple[dict, list[str]]:
    """Strip leading key components shared by every key while the model has no child of that name.

    ``module.1.linear.weight`` -> ``linear.weight`` for a ResNet (strips ``module.`` then ``1.``).
    Returns (state dict, stripped prefixes in order).
    """
    stripped = []
    while sd:
        firsts = {k.split(".", 1)[0] for k in sd}
        if len(firsts) != 1 or any("." not in k for k in sd):
            break
        (first,) = firsts
        if first in target_top:
            break
        sd = {k.split(".", 1)[1]: v for k, v in sd.items()}
        stripped.append(first + ".")
    return sd, stripped


def _rename(sd: dict, pattern: str, repl: str, renamed: dict) -> dict:
    out = {}
    for k, v in sd.items():
        new = re.sub(pattern, repl, k)
        if new != k:
            renamed[f"{pattern} -> {repl}"] = renamed.get(f"{pattern} -> {repl}", 0) + 1
        out[new] = v
    return out


def map_names(sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> tuple[dict, dict, list, list]:
    """Rename known public naming schemes to ours; drop unused blocks; fill missing BN counters.

    Returns:
        (state dict, {"pattern -> replacement": count}, dropped keys, filled keys).
    """
    renamed: dict[str, int] = {}
    dropped: list[str] = []
    filled: list[str] = []
    resnet = "linear.weight" in target
    wrn = "fc.weight" in target and any(k.startswith("block1.layer.") for k in target)
    if resnet:
        if any(".downsample." in k for k in sd):
            sd = _rename(sd, r"\.downsample\.", ".shortcut.", renamed)
        if "fc.weight" in sd and "linear.weight" not in sd:
            sd = _rename(sd, r"^fc\.", "linear.", renamed)
    if wrn:
        if "linear.weight" in sd and "fc.weight" not in sd:
            sd = _rename(sd, r"^linear\.", "fc.", renamed)
        extra = [k for k in sd if k.startswith("sub_block1.")]
        dropped += extra
        sd = {k: v for k, v in sd.items() if k not in extra}
    for k in target:
        if k.endswith("num_batches_tracked") and k not in sd and k.rsplit(".", 1)[0] + ".running_mean" in sd:
            sd[k] = torch.zeros_like(target[k])
            filled.append(k)
    extra = [k for k in sd if k.endswith("num_batches_tracked") and k not in target]
    dropped += extra
    sd = {k: v for k, v in sd.items() if k not in extra}
    return sd, renamed, dropped, filled


# ---------------------------------------------------------------------------- diagnosis


def _blocks(keys, group: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(rf"^{re.escape(group)}\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def _hints(sd: dict, target: dict) -> list[str]:
    hints = []
    src, tgt = set(sd), set(target)
    src_wrn = any(k.startswith("block1.layer.") for k in src)
    src_res = any(k.startswith("layer1.") for k in src)
    tgt_wrn = any(k.startswith("block1.layer.") for k in tgt)
    if src_wrn and not tgt_wrn:
        n = _blocks(src, "block1.layer")
        hints.append(f"the checkpoint is a WideResNet (depth {6 * n + 4}); set model.arch: wrn34_10")
    elif src_res and tgt_wrn:
        n3 = _blocks(src, "layer3")
        arch = {2: "resnet18", 6: "resnet34"}.get(n3, f"a ResNet with {n3} blocks in layer3")
        hints.append(f"the checkpoint is a CIFAR ResNet ({arch}); set model.arch accordingly")
    elif src_res and not tgt_wrn:
        n_src, n_tgt = _blocks(src, "layer3"), _blocks(tgt, "layer3")
        if n_src != n_tgt:
            arch = {2: "resnet18", 6: "resnet34"}.get(n_src, f"{n_src} blocks in layer3")
            hints.append(f"the checkpoint has {n_src} blocks in layer3, the model {n_tgt}: set model.arch: {arch}")
    elif src_wrn and tgt_wrn:
        n_src, n_tgt = _blocks(src, "block1.layer"), _blocks(tgt, "block1.layer")
        if n_src != n_tgt:
            hints.append(f"the checkpoint is a WRN-{6 * n_src + 4}, the model a WRN-{6 * n_tgt + 4}; only depth 34 is built")
    if "conv1.weight" in sd and "conv1.weight" in target and sd["conv1.weight"].shape != target["conv1.weight"].shape \
            and src_res and not tgt_wrn:
        hints.append(f"first-stage width differs: set model.width: {sd['conv1.weight'].shape[0]}")
    key = "block1.layer.0.conv1.weight"
    if key in sd and key in target and sd[key].shape != target[key].shape:
        w = sd[key].shape[0]
        hints.append(f"widen factor differs: set model.widen_factor: {w // 16}" if w % 16 == 0 else
                     f"block1 has {w} channels, not a multiple of 16")
    for head in ("linear.weight", "fc.weight"):
        if head in sd and head in target and sd[head].shape[0] != target[head].shape[0]:
            hints.append(f"the checkpoint has {sd[head].shape[0]} classes, the model {target[head].shape[0]}: "
                         f"set data.dataset to the data set it was trained on")
    return hints


def _check(sd: dict, target: dict, source: str) -> None:
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [(k, tuple(sd[k].shape), tuple(target[k].shape)) for k in target if k in sd
              and sd[k].shape != target[k].shape]
    if not (missing or unexpected or shapes):
        return
    parts = [f"{source} does not fit the configured model:"]
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(
            f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in shapes[:12])
            + (" ..." if len(shapes) > 12 else ""))
    if missing:
        parts.append(f"{len(missing)} key(s) missing from the checkpoint: {', '.join(missing[:10])}"
                     + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:10])}"
                     + (" ..." if len(unexpected) > 10 else ""))
    hints = _hints(sd, target)
    parts.append("hint: " + "; ".join(hints) if hints else
                 "hint: check model.arch, model.width / model.widen_factor and data.dataset against the checkpoint")
    raise CheckpointConversionError("\n  ".join(parts))


def _model_normalizer(model: nn.Module) -> Normalize | None:
    for m in unwrap(model).modules():
        if isinstance(m, Normalize):
            return m
    return None


def _check_normalization(stats: dict | None, model: nn.Module, source: str) -> str:
    norm = _model_normalizer(model)
    enabled = norm is not None and norm.enabled
    ours = (norm.mean.flatten().tolist(), norm.std.flatten().tolist()) if enabled else None
    fmt = lambda v: "[" + ", ".join(f"{x:.4f}" for x in v) + "]"
    if stats is None:
        if enabled:
            return (f"the checkpoint stores no input normalisation; the model normalises with the config's mean "
                    f"{fmt(ours[0])} std {fmt(ours[1])} (set model.mean/model.std, or model.normalize: false for a "
                    f"network trained on raw [0, 1] pixels)")
        return "the checkpoint stores no input normalisation and model.normalize is false: raw [0, 1] pixels"
    fix = f"model.normalize: true, model.mean: {fmt(stats['mean'])}, model.std: {fmt(stats['std'])}"
    if not enabled:
        raise CheckpointConversionError(
            f"{source} normalises its input (keys {', '.join(stats['keys'])}: mean {fmt(stats['mean'])}, "
            f"std {fmt(stats['std'])}) but model.normalize is false; set {fix}")
    close = all(abs(a - b) <= 1e-4 for a, b in zip(stats["mean"] + stats["std"], ours[0] + ours[1]))
    if not close:
        raise CheckpointConversionError(
            f"{source} normalises its input with mean {fmt(stats['mean'])} std {fmt(stats['std'])}, but the model is "
            f"configured with mean {fmt(ours[0])} std {fmt(ours[1])}; set {fix}")
    return f"the checkpoint's normaliser ({', '.join(stats['keys'])}) matches the configured mean/std"


# ---------------------------------------------------------------------------- entry points


def convert_state_dict(obj: Any, model: nn.Module, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict]:
    """Map a loaded checkpoint object onto ``model``'s parameter names and load it (strict).

    Args:
        obj: what ``torch.load`` returned (a state dict or a dict holding one).
        model: the configured model (wrappers such as DDP are looked through); loaded in place.
        source: how to name the checkpoint in messages.

    Returns:
        (state dict with exactly the model's keys, float tensors in the model's dtypes, on the CPU;
        report dict: "source_format", "stripped_prefixes", "renamed", "dropped", "filled",
        "ignored_entries", "normalization", "num_tensors", "summary").

    Raises:
        CheckpointConversionError: no state dict inside; keys or shapes that cannot be mapped (with
            hints); a stored normaliser that disagrees with the configured one.
    """
    target_model = unwrap(model)
    target = target_model.state_dict()
    sd, where, ignored = find_state_dict(obj)
    sd, stats = extract_normalizer(sd)
    top = {k.split(".", 1)[0] for k in target}
    sd, stripped = strip_wrappers(sd, top)
    sd, renamed, dropped, filled = map_names(sd, target)
    _check(sd, target, source)
    normalization = _check_normalization(stats, model, source)
    state = {k: sd[k].detach().to("cpu", target[k].dtype).clone() for k in target}
    target_model.load_state_dict(state, strict=True)
    bits = [f"{len(state)} tensors from {where}"]
    if stripped:
        bits.append(f"stripped {''.join(stripped)}")
    if stats:
        bits.append(f"normaliser {stats['prefix'] or '(top level)'} removed")
    if renamed:
        bits.append("renamed " + ", ".join(f"{k} ({n})" for k, n in renamed.items()))
    if dropped:
        bits.append(f"dropped {len(dropped)} unused ({dropped[0].split('.')[0]}...)")
    if filled:
        bits.append(f"filled {len(filled)} num_batches_tracked")
    report = {"source_format": where, "stripped_prefixes": stripped, "renamed": renamed, "dropped": dropped,
              "filled": filled, "ignored_entries": ignored, "normalizer": stats, "normalization": normalization,
              "num_tensors": len(state), "summary": "; ".join(bits)}
    return state, report


def load_external_checkpoint(path: str | Path, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an adversarially trained checkpoint from ``path`` into ``model`` (see the module docstring).

    Returns:
        (state dict of ``model``'s keys, report) as :func:`convert_state_dict`; the report also
        holds "path".

    Raises:
        CheckpointError: missing / corrupt file, or one needing arbitrary code to unpickle
            (``weights_only=True``; the message says how to re-save it).
        CheckpointConversionError: the weights do not fit the model (keys, shapes, hints).
    """
    obj = load(path)
    state, report = convert_state_dict(obj, model, source=str(path))
    report["path"] = str(path)
    return state, report
