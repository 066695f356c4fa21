"""Stage 3 — fine-tune the non-robust-critical module(s) on clean data (RiFT §3.3, Eq. 8; §5.1).

Only the chosen modules' weights are trained (SGD momentum 0.9, lr 1e-3,
weight decay 5e-4, 10 epochs, lr x0.1 after epoch 5, batch 128, crop + flip),
with cross-entropy on clean images.  The model is in train mode, so every
BatchNorm layer's running statistics move to clean-data statistics (the
authors' code); ``finetune.freeze_bn`` keeps BN in eval mode instead.
The epoch with the best clean accuracy on the selection split is kept.

Interruption: after SIGTERM / SIGINT the step in flight is finished, a checkpoint of that step
boundary (with the epoch's partial sums, as in adversarial training) is written and
:class:`rift_dist.interrupts.Interrupted` is raised; the re-run resumes at that step.

Artefacts: ``finetune/model.pt``, ``finetune/history.json``, checkpoints.
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from rift_dist import checkpoint, interrupts
from rift_dist.models import get_module
from rift_dist.stages.common import (
    StageContext, StageError, at_state, evaluate_model, multistep_lr, new_model, set_lr, write_done, write_json,
)

STAGE = "finetune"


def chosen_modules(ctx: StageContext) -> list[str]:
    """``finetune.modules`` when set, else the MRC stage's choice.

    Raises:
        StageError: when neither is available.
    """
    if ctx.cfg.finetune.modules:
        return list(ctx.cfg.finetune.modules)
    path = ctx.run_dir / "mrc" / "mrc.json"
    if not path.is_file():
        raise StageError(f"no module to fine-tune: {path} is missing (run the mrc stage, or set finetune.modules)")
    return json.loads(path.read_text())["chosen"]


def freeze_all_but(model: torch.nn.Module, names: list[str]) -> list[torch.nn.Parameter]:
    """Make only the weights of modules ``names`` trainable; return them.

    Raises:
        KeyError: naming a module that does not exist (with the valid names).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for n in names:
        w = get_module(model, n).weight
        w.requires_grad_(True)
        params.append(w)
    return params


ALL_PARAMETERS = "<all parameters>"
"""The module list recorded for a fine-tuning of every parameter (``rift compare``'s all-layers method)."""


def trainable_parameters(model: torch.nn.Module, names: list[str], all_parameters: bool = False
                         ) -> list[torch.nn.Parameter]:
    """Choose what fine-tuning trains: the weights of modules ``names`` (RiFT §3.3), or with
    ``all_parameters`` every parameter (weights, biases, BatchNorm affine: the paper's "all layers"
    ablation, Table 3, and WiSE-FT's fine-tuning).  Everything else gets ``requires_grad = False``.

    Raises:
        KeyError: naming a module that does not exist (with the valid names).
    """
    if all_parameters:
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        return params
    return freeze_all_but(model, names)


def run(ctx: StageContext, modules: list[str] | None = None, all_parameters: bool = False) -> dict:
    """Fine-tune the chosen module(s) of the AT model; returns the outputs (model path, modules, best epoch).

    Args:
        modules: the modules whose weights are trained (default :func:`chosen_modules`: ``finetune.modules``
            or the MRC stage's choice).
        all_parameters: train every parameter instead (recorded as ``[ALL_PARAMETERS]``).
    """
    from rift_dist.data.loaders import build_loader, get_dataset

    cfg = ctx.cfg
    f = cfg.finetune
    rt = ctx.runtime
    names = [ALL_PARAMETERS] if all_parameters else (list(modules) if modules else chosen_modules(ctx))
    model = new_model(ctx, at_state(ctx))
    try:
        trainable_parameters(model, names, all_parameters)
    except KeyError as exc:
        raise StageError(str(exc.args[0])) from exc
    engine = rt.parallelize_with(
        model, lambda params: torch.optim.SGD(params, lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay)
    )
    loader = build_loader(cfg, "train", rt.rank, rt.world_size, device=ctx.device)
    selection = get_dataset(cfg, "selection")
    steps = len(loader) if not f.max_steps_per_epoch else min(len(loader), f.max_steps_per_epoch)
    manager = checkpoint.CheckpointManager(ctx.run_dir / STAGE / "checkpoints")
    state = manager.load_latest()
    epoch, step_in_epoch, history, best = 0, 0, [], {"clean_accuracy": -1.0, "epoch": -1}
    partial = None
    if state is not None:
        engine.load_state_dict(state["model"])  # also DeepSpeed's fp32 master partitions
        engine.load_optimizer_state(state["optimizer"])
        epoch, history, best = state["epoch"], state["history"], state["best"]
        step_in_epoch = int(state.get("step", 0))  # > 0: a checkpoint written on a signal, mid-epoch
        partial = checkpoint.partial_sums(state, step_in_epoch)
        ctx.log(f"[finetune] resuming at epoch {epoch + 1}" + (f", step {step_in_epoch}" if step_in_epoch else ""))
    best_path = ctx.run_dir / STAGE / "best.pt"
    ctx.log(f"[finetune] modules {', '.join(names)}: {f.epochs} epochs x {steps} steps, "
            f"BN {'frozen' if f.freeze_bn else 'in train mode'}")

    def save(ep: int, st: int = 0, sums: torch.Tensor | None = None, seconds: float = 0.0) -> None:
        """Checkpoint epoch ``ep`` at next step ``st`` (0 = its start); mid-epoch with the partial ``sums``
        (float64 [3], summed over ranks here: a collective) and the epoch's seconds so far."""
        model_state, optimizer_state = engine.state_dict(), engine.optimizer_state()  # collective under DeepSpeed
        extra = {"step": st}
        if sums is not None:
            extra.update(partial_sums=rt.all_reduce_sum(sums.clone()), partial_seconds=float(seconds))
        if ctx.is_main:
            manager.save({"model": model_state, "optimizer": optimizer_state, "epoch": ep,
                          "history": history, "best": best, **extra}, ep * 1_000_000 + st)
        rt.barrier()

    with ctx.tracker.stage("finetune") as run_log:
        run_log.set_tags({"rift.modules": ",".join(names)})
        while epoch < f.epochs:
            lr = multistep_lr(f.lr, f.milestones, f.gamma, epoch)
            set_lr(engine.optimizer, lr)
            loader.set_epoch(epoch, start_batch=step_in_epoch)
            sums, t0 = checkpoint.start_sums(partial, rt.is_main)
            partial = None
            batches = ctx.bar(loader, total=steps - step_in_epoch, desc=f"FT epoch {epoch + 1}")
            for step, (images, labels) in enumerate(batches, start=step_in_epoch):
                if step >= steps:
                    break
                images = ctx.precision.prepare_input(images.to(ctx.device))
                labels = labels.to(ctx.device)
                engine.train()
                if f.freeze_bn:
                    engine.module.apply(lambda m: m.eval() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) else None)
                with ctx.precision.autocast():
                    logits = engine(images)
                loss = F.cross_entropy(logits.float(), labels)
                engine.step(loss)
                sums += torch.tensor([loss.item() * len(labels), (logits.argmax(1) == labels).sum().item(), len(labels)],
                                     dtype=torch.float64)
                signum = interrupts.stop_requested(rt)  # every rank, every step (one tiny all-reduce)
                if signum is not None:
                    save(epoch, step + 1, sums, time.time() - t0)
                    raise interrupts.Interrupted(signum, f"finetune epoch {epoch + 1} step {step + 1}")
            rt.all_reduce_sum(sums)
            step_in_epoch = 0
            engine.sync_buffers()  # equal BN statistics on every rank before the sharded evaluation
            ev = evaluate_model(ctx, engine.module, selection, None, desc="selection eval")
            n = max(sums[2].item(), 1)
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": sums[0].item() / n,
                   "train_clean_accuracy": sums[1].item() / n, "val_clean_accuracy": ev["clean_accuracy"],
                   "epoch_seconds": time.time() - t0}
            history.append(row)
            run_log.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            ctx.log(f"[finetune] epoch {epoch + 1}/{f.epochs} loss {row['train_loss']:.3f} "
                    f"val clean {100 * ev['clean_accuracy']:.1f}% ({row['epoch_seconds']:.0f}s)")
            if ev["clean_accuracy"] > best["clean_accuracy"]:
                best = {"clean_accuracy": ev["clean_accuracy"], "epoch": epoch + 1}
                best_state = engine.state_dict()  # collective under DeepSpeed
                if ctx.is_main:
                    checkpoint.save_atomic(best_state, best_path)
            epoch += 1
            save(epoch)
            interrupts.check(rt, where=f"finetune epoch {epoch}")
        if ctx.is_main:
            checkpoint.save_atomic(checkpoint.load(best_path), ctx.run_dir / STAGE / "model.pt")
            write_json(ctx.run_dir / STAGE / "history.json", history)
    outputs = {"model": str(ctx.run_dir / STAGE / "model.pt"), "modules": names, "best": best}
    write_done(ctx, STAGE, outputs)
    rt.barrier()
    return outputs
