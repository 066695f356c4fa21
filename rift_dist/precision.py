"""Precision, memory layout and inference-only graph rewrites: bf16/fp16 autocast, channels_last,
BatchNorm folding and ``torch.compile``.

The hardware is probed once.  On a CPU, bf16 autocast is used only when the
processor has native bf16 arithmetic: AMX-BF16 (Intel Sapphire Rapids and
later) or AVX512-BF16 (Intel Cooper Lake, AMD Zen 4 and later), read from the
``flags`` line of ``/proc/cpuinfo``, with oneDNN's own check
(``torch.ops.mkldnn._is_mkldnn_bf16_supported``) as the fallback where that
file does not exist.  On CUDA, bf16 when the device supports it, else fp16.
Everything else falls back to float32.

What stays float32 (checked by ``tests/unit/test_precision.py``): the
parameters and optimizer state, the loss (logits are cast up before it), and
everything the attacks do to the input -- the random start, the signed step,
the projection onto the epsilon ball and the clipping to [0, 1] -- because
only the model's forward runs under :meth:`Precision.autocast`.

BatchNorm folding (:func:`fold_batchnorm`): in eval mode a BatchNorm layer is
the affine map ``y = (x - mean) * gamma / sqrt(var + eps) + beta``; when it
directly follows a convolution whose output has no other use, it can be folded
into that convolution's weight and bias.  The folded copy computes the same
function (to float rounding) with one memory-bound pass fewer per layer in the
forward and in the input-gradient backward; it is used where the model is
frozen and in eval mode: the PGD attack of evaluation, and MRC (RiFT Eq. 2).
Source: the standard conv-BN fusion used for inference (e.g. Jacob et al.
2018, §3.2); written here from the formula.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from rift_dist.hardware import (  # noqa: E402,F401  (re-exported: the hardware probes live in rift_dist.hardware)
    cpu_bf16_engine,
    cpu_features,
    cpu_has_bf16,
    hardware_summary,
)


# ------------------------------------------------------------------------------ BatchNorm folding

from rift_dist.models import unwrap  # noqa: E402  (wrapper-free model, one definition)

_PAIRS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[str, str], ...]]" = weakref.WeakKeyDictionary()




def conv_bn_pairs(model: nn.Module) -> tuple[tuple[str, str], ...]:
    """The ``(conv name, batchnorm name)`` pairs of ``model`` that can be folded.

    A pair is a BatchNorm layer (``nn.BatchNorm2d``, torch's ``SyncBatchNorm``, the gloo
    all-reduce BatchNorm of :mod:`rift_dist.parallel.batchnorm`; with running statistics) whose only input is the
    output of a ``Conv2d`` that nothing else uses, found by tracing ``forward``
    with ``torch.fx``.  The result is memoised per model object.  A model that
    cannot be traced has no pairs (nothing is folded); that is never an error.
    """
    model = unwrap(model)
    if model in _PAIRS:
        return _PAIRS[model]
    pairs: list[tuple[str, str]] = []
    try:
        from torch import fx

        class _Tracer(fx.Tracer):
            # BatchNorm subclasses defined outside torch.nn (the all-reduce BatchNorm) stay leaves too
            def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
                # so do Conv2d subclasses (the conv guard's GuardedConv2d), whose forward branches on the device
                return isinstance(m, (_BatchNorm, nn.Conv2d)) or super().is_leaf_module(m, qualname)

        graph = _Tracer().trace(model)
        mods = dict(model.named_modules())
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(mods.get(node.target), _BatchNorm):
                continue
            if not mods[node.target].track_running_stats or len(node.args) != 1:
                continue
            src = node.args[0]
            if (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(mods.get(src.target), nn.Conv2d)
                    and len(src.users) == 1):
                pairs.append((src.target, node.target))
    except Exception:  # noqa: BLE001  (untraceable model: fold nothing)
        pairs = []
    _PAIRS[model] = tuple(pairs)
    return _PAIRS[model]


@torch.no_grad()
def fold_batchnorm(model: nn.Module, keep: tuple[str, ...] | list[str] = ()) -> nn.Module:
    """An eval-mode copy of ``model`` with every foldable BatchNorm merged into its convolution.

    For each pair of :func:`conv_bn_pairs` whose convolution is not named in ``keep``,
    the copy's convolution gets weight ``W * s`` and bias ``b * s + beta - mean * s``
    with ``s = gamma / sqrt(running_var + eps)`` (per output channel), and the
    BatchNorm becomes ``nn.Identity``.  Convolutions in ``keep`` (e.g. the module MRC
    perturbs, whose weight must stay in its own units) keep their BatchNorm.

    The copy is in eval mode, its parameters do not require gradients, folded
    weights keep the original's memory format (channels_last stays), and an in-place
    ``torch.compile`` of the original is not carried over (the copy runs eagerly).
    Folding is exact up to float rounding (~1e-7 relative in float32).

    Args:
        model: any module (DDP / compile wrappers are stripped); it is not modified.
        keep: names of convolutions whose BatchNorm must not be folded.

    Returns:
        the folded copy (``nn.Module``, same class and parameter names as ``model``).
    """
    bare = unwrap(model)
    pairs = [p for p in conv_bn_pairs(bare) if p[0] not in set(keep)]
    out = copy.deepcopy(bare)
    out.eval()
    for m in out.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None  # the compiled callable is bound to the original module
    for p in out.parameters():
        p.requires_grad_(False)
    for conv_name, bn_name in pairs:
        conv = out.get_submodule(conv_name)
        bn = out.get_submodule(bn_name)
        scale = bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps) if bn.affine else \
            1.0 / torch.sqrt(bn.running_var.float() + bn.eps)
        shift = (bn.bias.float() if bn.affine else torch.zeros_like(scale)) - bn.running_mean.float() * scale
        w = conv.weight.detach().clone()  # clone keeps the memory format
        w.mul_(scale.to(w.dtype).view(-1, *([1] * (w.dim() - 1))))
        bias = shift if conv.bias is None else conv.bias.float() * scale + shift
        conv.weight = nn.Parameter(w, requires_grad=False)
        conv.bias = nn.Parameter(bias.to(w.dtype), requires_grad=False)
        parent, _, leaf = bn_name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, leaf, nn.Identity())
    return out


# ------------------------------------------------------------------------------ the resolved numerics


@dataclass(frozen=True)
class Precision:
    """The resolved numerics of a run.

    Attributes:
        device_type: "cpu" or "cuda".
        dtype: autocast dtype (torch.bfloat16 / torch.float16) or None for float32.
        channels_last: whether models and inputs use the channels_last memory format.
        compile: ``torch.compile`` the model in place when it is built (eager otherwise).
        fold_bn: fold eval-mode BatchNorm into convolutions where the model is frozen
            (evaluation attacks, MRC); see :func:`fold_batchnorm`.
    """

    device_type: str
    dtype: torch.dtype | None
    channels_last: bool
    compile: bool = False
    fold_bn: bool = False

    def autocast(self):
        """A context manager running the forward pass under autocast (or nothing for float32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Convert the model to channels_last when asked and compile it in place when asked.

        Weights stay float32.  Under ``distributed.engine: deepspeed`` the engine turns the weights back
        to the contiguous (NCHW) format when it wraps the model (DeepSpeed views parameters as flat byte
        buffers; :func:`rift_dist.parallel.deepspeed.contiguous_parameters`); the inputs stay channels_last
        (:meth:`prepare_input`) and the convolutions still run their NHWC kernels.  ``nn.Module.compile`` keeps the module object and its
        state-dict keys, so checkpoints, DDP and the attacks see the same model.
        """
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.compile:
            model.compile()
        return model

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Make a [B, C, H, W] input channels_last when asked."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def frozen_model(self, model: nn.Module, keep: tuple[str, ...] | list[str] = ()) -> nn.Module:
        """The model to use where it is frozen and in eval mode (attacks in evaluation, MRC).

        With ``fold_bn``: :func:`fold_batchnorm` (a copy; ``keep`` as there).  Without:
        ``model`` itself (unwrapped), unchanged.
        """
        return fold_batchnorm(model, keep) if self.fold_bn else unwrap(model)

    def describe(self) -> str:
        """A one-line description for logs: dtype, layout, compile, BN folding and the hardware seen."""
        dt = "float32" if self.dtype is None else str(self.dtype).replace("torch.", "")
        extra = ""
        if self.device_type == "cpu":
            extra = (f", cpu flags: {','.join(sorted(cpu_features())) or 'none'}, bf16 unit {cpu_bf16_engine()}, "
                     f"threads {torch.get_num_threads()}")
        return (f"{self.device_type} autocast={dt} channels_last={self.channels_last} compile={self.compile} "
                f"fold_bn={self.fold_bn}{extra}")


def resolve_precision(cfg_precision, device: torch.device | str) -> Precision:
    """Turn ``PrecisionConfig`` switches into a :class:`Precision` for ``device``.

    ``autocast=auto`` picks bf16 where the hardware runs it natively (CUDA with bf16,
    else fp16; CPUs with AMX-BF16 or AVX512-BF16) and float32 elsewhere.
    ``channels_last=auto`` is on everywhere: oneDNN's and cuDNN's convolutions are faster
    in NHWC in float32 too (measured on an AVX512-BF16 CPU, one thread, 3x3 convolutions
    of ResNet-18 at batch 128: 64 channels 66 -> 92 GFLOP/s, 128 channels 86 -> 120; equal
    from 256 channels on; ``benchmarks/README.md``).

    ``channels_last`` is ``"auto"``, ``"on"`` or ``"off"`` (the config loader has already turned YAML's
    booleans ``on``/``off``/``true``/``false`` into those words).  Under DeepSpeed, auto and on mean
    channels_last inputs and activations with NCHW weights (DeepSpeed cannot hold channels_last weights;
    :func:`rift_dist.parallel.deepspeed.contiguous_parameters`); every combination of engine, autocast and
    layout runs (``tests/integration/test_engine_matrix.py``).

    An explicit ``bf16`` on a CPU without native bf16 is honoured (it runs, slowly, in
    emulation; :meth:`Precision.describe` then says ``bf16 unit none``).

    Raises:
        ValueError: fp16 on a CPU, or an unknown mode.
    """
    device_type = torch.device(device).type
    mode = cfg_precision.autocast
    if mode not in ("auto", "bf16", "fp16", "none"):
        raise ValueError(f"precision.autocast must be auto, bf16, fp16 or none, got {mode!r}")
    if mode == "auto":
        if device_type == "cuda":
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            mode = "bf16" if cpu_has_bf16() else "none"
    if mode == "fp16" and device_type != "cuda":
        raise ValueError("precision.autocast=fp16 needs CUDA; use bf16 or none on a CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[mode]
    cl = cfg_precision.channels_last
    if isinstance(cl, bool):  # a PrecisionConfig built in code with True / False
        cl = "on" if cl else "off"
    if cl not in ("auto", "on", "off"):
        raise ValueError(f"precision.channels_last must be auto, on or off, got {cl!r}")
    channels_last = True if cl == "auto" else cl == "on"
    fold = getattr(cfg_precision, "fold_bn", True)
    return Precision(device_type, dtype, channels_last, bool(getattr(cfg_precision, "compile", False)), bool(fold))
