"""BatchNorm with the statistics of the global batch over all ranks, on any backend (``distributed.sync_bn``).

Reproducibility across world sizes: with ``distributed.sync_bn`` the
BatchNorm layers normalise with the statistics of the GLOBAL batch, so a run on
W ranks with per-rank batch b computes what one process computes with batch
W*b, up to the order of floating-point sums.  NCCL/CUDA uses
``torch.nn.SyncBatchNorm``; gloo/CPU (which ``torch.nn.SyncBatchNorm`` rejects)
uses :class:`AllReduceBatchNorm`, in one CPU process too (same arithmetic).  What
remains between rank counts is measured in ``benchmarks/bench_rank_parity.py`` and
stated in the README ("Rank count and reproducibility").
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

def _all_reduce_in_place(tensor: torch.Tensor) -> None:
    """all_reduce(SUM) of ``tensor`` in place over the default group."""
    dist.all_reduce(tensor)


def _no_reduce(tensor: torch.Tensor) -> None:
    """One process: the local sums are the global ones."""


def _channel_dims(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """Reduction dims (all but the channel dim 1) and the broadcast shape [1, C, 1, ...] of a [B, C, *] tensor."""
    return [0] + list(range(2, x.dim())), [1, x.shape[1]] + [1] * (x.dim() - 2)


class _GlobalBatchNormFn(torch.autograd.Function):
    """Training-mode batch normalisation with statistics over all ranks, in float32, two-pass (centred) sums.

    forward(x [B, C, *], weight [C], bias [C], eps, reduce) -> (out like x, mean [C], unbiased var [C]) (the
    statistics for the running averages; float32);
    ``reduce(t)`` sums ``t`` over ranks in place (a no-op in one process).  The per-channel sum and count are
    reduced first, then the centred sum of squares (never E[x^2] - E[x]^2).  The backward is torch's
    SyncBatchNorm formula: with N the global count, xhat = (x - mean) * invstd and the GLOBAL sums
    a = sum(dy) / N, b = sum(dy * xhat) / N, dx = weight * invstd * (dy - a - xhat * b); the weight and bias
    gradients are this rank's own sums (DDP averages them over ranks), so W ranks with batch b compute
    the gradient of one process with batch W * b.  Source: Ioffe & Szegedy 2015 (the formulas), torch's
    ``SyncBatchNorm`` (the split into local and global sums).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, reduce):  # noqa: D102 - autograd protocol
        dims, shape = _channel_dims(x)
        c = x.shape[1]
        ctx.in_dtype = x.dtype
        x = x.float()
        sums = torch.cat([x.sum(dims), x.new_tensor([x.numel() / c])])
        reduce(sums)
        n = float(sums[c].item())
        if n <= 1:
            raise ValueError(f"BatchNorm in training mode needs more than 1 value per channel over all ranks "
                             f"(got {int(n)}); use a larger batch")
        mean = sums[:c] / n
        centred = x - mean.view(shape)
        sq = (centred * centred).sum(dims)
        reduce(sq)
        var = sq / n
        invstd = torch.rsqrt(var + eps)
        scale = invstd * weight.float()
        out = torch.addcmul(bias.float().view(shape), centred, scale.view(shape))
        ctx.save_for_backward(x, mean, invstd, weight)
        ctx.n, ctx.reduce = n, reduce
        unbiased = var * (n / (n - 1))
        ctx.mark_non_differentiable(mean, unbiased)
        return out, mean, unbiased

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):  # noqa: D102 - autograd protocol
        x, mean, invstd, weight = ctx.saved_tensors
        dims, shape = _channel_dims(x)
        c = x.shape[1]
        g = grad_out.float()
        centred = x - mean.view(shape)
        local = torch.cat([g.sum(dims), (g * centred).sum(dims)])  # sum(dy), sum(dy * (x - mean))
        total = local.clone()
        ctx.reduce(total)
        scale = invstd * weight.float()
        a = total[:c] / ctx.n
        coef = total[c:] / ctx.n * invstd * invstd * scale  # b * invstd * scale, with b over xhat
        dx = torch.addcmul((-a * scale).view(shape), centred, (-coef).view(shape)).addcmul_(g, scale.view(shape))
        return dx.to(ctx.in_dtype), (local[c:] * invstd).to(weight.dtype), local[:c].to(weight.dtype), None, None


class AllReduceBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the global batch over all ranks, on any backend.

    What ``torch.nn.SyncBatchNorm`` does on CUDA/NCCL, for gloo and CPU tensors too (torch's
    refuses them).  In training mode the per-channel sum and count, then the centred sum of squares,
    are summed over the ranks of the default process group (none to sum in one process), so every rank
    normalises with the global mean and biased variance and updates its running statistics with the
    global mean and unbiased variance -- identical on every rank; the backward sums the statistics'
    gradients over ranks (:class:`_GlobalBatchNormFn`).  In eval mode it is a plain BatchNorm.

    One process uses the same arithmetic (two-pass float32 sums), which is why ``distributed.sync_bn``
    converts BatchNorm on the CPU in one process too: torch 2.14's CPU BatchNorm kernel for channels_last
    inputs accumulates each channel's statistics with an error that grows with B*H*W (relative error of
    the stem's output 5e-6 at batch 64, 50x its NCHW kernel's; ``benchmarks/bench_rank_parity.py``), and
    it was what made a 1-rank run part from a 2-rank one at the first BatchNorm of the first step.

    Every rank must run every training-mode forward and backward (a forward on one rank only would wait
    for the others).  Input: float [B, C, *] (any number of trailing dims); the statistics are computed in
    float32 and the output has the input's dtype.

    Raises (forward): ValueError for an input with fewer than 2 dims, or 1 value per channel over all ranks.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input [B, C, ...] (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102 - nn.Module protocol
        self._check_input_dim(input)
        if not self.training:
            return super().forward(input)
        sync = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        c = input.shape[1]
        weight = self.weight if self.affine else torch.ones(c, device=input.device)
        bias = self.bias if self.affine else torch.zeros(c, device=input.device)
        out, mean, unbiased = _GlobalBatchNormFn.apply(input, weight, bias, self.eps,
                                                       _all_reduce_in_place if sync else _no_reduce)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return out.to(input.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm layer of ``model`` by a synchronised one, in place (root returned).

    CUDA: ``torch.nn.SyncBatchNorm``; otherwise :class:`AllReduceBatchNorm`.  The same Parameter
    objects (and their ``requires_grad`` flags) and buffers are kept, so optimizers built
    afterwards, frozen layers and state-dict keys are unchanged.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def convert(module: nn.Module) -> nn.Module:
        if isinstance(module, _BatchNorm) and not isinstance(module, (AllReduceBatchNorm, nn.SyncBatchNorm)):
            new = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats)
            if module.affine:
                new.weight, new.bias = module.weight, module.bias
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
            new.train(module.training)
            return new
        for name, child in module.named_children():
            module.add_module(name, convert(child))
        return module

    return convert(model)
