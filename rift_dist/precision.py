"""Precision and memory-layout switches: bf16/fp16 autocast and channels_last.

The hardware is probed once: on a CPU, bf16 autocast is used only when the
processor has native bf16 arithmetic (AVX512-BF16 or AMX-BF16 in
``/proc/cpuinfo``); on CUDA, bf16 when the device supports it.  Perturbations,
projections and clipping stay in float32; only the model's forward runs under
autocast.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch


@functools.lru_cache(maxsize=None)
def cpu_features() -> frozenset[str]:
    """The CPU flags relevant to bf16 (``avx512_bf16``, ``amx_bf16``, ``amx_tile``, ``avx512f``)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return frozenset(flags & {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f"})
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX-BF16)."""
    return bool(cpu_features() & {"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True)
class Precision:
    """The resolved numerics of a run.

    Attributes:
        device_type: "cpu" or "cuda".
        dtype: autocast dtype (torch.bfloat16 / torch.float16) or None for float32.
        channels_last: whether models and inputs use the channels_last memory format.
    """

    device_type: str
    dtype: torch.dtype | None
    channels_last: bool

    def autocast(self):
        """A context manager running the forward pass under autocast (or nothing for float32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Convert the model to channels_last when asked (weights stay float32)."""
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Make a [B, C, H, W] input channels_last when asked."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def describe(self) -> str:
        """A one-line description for logs: dtype, layout and the CPU flags seen."""
        dt = "float32" if self.dtype is None else str(self.dtype).replace("torch.", "")
        extra = ""
        if self.device_type == "cpu":
            extra = f", cpu flags: {','.join(sorted(cpu_features())) or 'none'}, threads {torch.get_num_threads()}"
        return f"{self.device_type} autocast={dt} channels_last={self.channels_last}{extra}"


def resolve_precision(cfg_precision, device: torch.device | str) -> Precision:
    """Turn ``PrecisionConfig`` switches into a :class:`Precision` for ``device``.

    ``auto`` picks bf16 autocast and channels_last where the hardware runs them
    natively, float32 NCHW otherwise.

    Raises:
        ValueError: fp16 on a CPU, or bf16 asked for on hardware without it.
    """
    device_type = torch.device(device).type
    mode = cfg_precision.autocast
    if mode == "auto":
        if device_type == "cuda":
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            mode = "bf16" if cpu_has_bf16() else "none"
    if mode == "fp16" and device_type != "cuda":
        raise ValueError("precision.autocast=fp16 needs CUDA; use bf16 or none on a CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[mode]
    cl = cfg_precision.channels_last
    channels_last = (dtype is not None or device_type == "cuda") if cl == "auto" else cl == "on"
    return Precision(device_type, dtype, channels_last)
