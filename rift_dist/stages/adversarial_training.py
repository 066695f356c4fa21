"""Stage 1 — adversarial training: PGD-AT, TRADES and MART (RiFT §5.1; RIFT.md Stages 1).

Madry PGD-AT minimises the cross-entropy on PGD examples; TRADES (Zhang et al.
2019) adds beta * KL(f(x) || f(x')) to the clean cross-entropy, with x' found
by maximising that KL; MART (Wang et al. 2020) weighs a boosted cross-entropy
on x' with beta * KL * (1 - p_y(x)).  Clean and adversarial inputs go through
ONE forward of the engine and one backward per step (what ZeRO-2 requires).

Reproducibility across world sizes: the attack's random start for global
batch ``step`` of ``epoch`` is drawn for the whole global batch from a
generator seeded by (seed, epoch, step) and each rank takes its slice; the
data order and augmentation are likewise functions of (seed, epoch) (see
``rift_dist.data.loaders``).  So the run's result does not depend on its
number of ranks (with SyncBatchNorm).

Interruption: every step ends with :func:`rift_dist.interrupts.stop_requested` (all ranks agree);
after SIGTERM / SIGINT the step in flight is finished, a checkpoint of that step boundary is written
and :class:`rift_dist.interrupts.Interrupted` is raised (the CLI exits 143 / 130).  A mid-epoch
checkpoint (periodic, ``train.checkpoint_every``, or on a signal) carries the epoch's partial sums
(loss x samples, robust-correct count, sample count; summed over ranks, float64 [3]) and elapsed
seconds, so a resumed epoch's ``train_loss`` / ``train_robust_accuracy`` cover all its steps.

Artefacts: ``train/checkpoints/ckpt-*.pt`` (resumable: model, optimizer,
epoch, step, best, history, partial sums), ``train/model.pt`` (the selected epoch's state dict),
``train/history.json``.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from rift_dist import checkpoint, interrupts
from rift_dist.attacks import pgd
from rift_dist.checkpoint_ids import checkpoint_id
from rift_dist.seeding import seed_for, stream_seed
from rift_dist.eval.protocol import evaluate_model
from rift_dist.parallel import parallelize
from rift_dist.atomic import write_json
from rift_dist.stages.context import StageContext, new_model
from rift_dist.stages.done_markers import write_done
from rift_dist.stages.lr_schedule import multistep_lr, set_lr

STAGE = "train"


def at_loss(method: str, logits_clean: torch.Tensor | None, logits_adv: torch.Tensor, labels: torch.Tensor,
            beta: float) -> torch.Tensor:
    """The training loss of ``method`` from logits [B, K] (float) and int64 labels [B].

    pgd: CE(x'); trades: CE(x) + beta * KL(p(x) || p(x')) (batch mean);
    mart: BCE-boosted CE(x') + beta * mean(KL_i * (1 - p_y(x)_i)).

    Raises:
        ValueError: for an unknown method, or trades/mart without clean logits.
    """
    logits_adv = logits_adv.float()
    if method == "pgd":
        return F.cross_entropy(logits_adv, labels)
    if logits_clean is None:
        raise ValueError(f"{method} needs the clean logits")
    logits_clean = logits_clean.float()
    if method == "trades":
        # log-probabilities on both sides (log_target): exactly 0 when the adversarial logits equal the clean ones
        kl = F.kl_div(F.log_softmax(logits_adv, 1), F.log_softmax(logits_clean, 1), reduction="batchmean",
                      log_target=True)
        return F.cross_entropy(logits_clean, labels) + beta * kl
    if method == "mart":
        probs_adv = F.softmax(logits_adv, 1)
        top2 = torch.argsort(probs_adv, 1)[:, -2:]
        wrong = torch.where(top2[:, -1] == labels, top2[:, -2], top2[:, -1])
        boosted = F.cross_entropy(logits_adv, labels) + F.nll_loss(
            torch.log(1.0001 - probs_adv + 1e-12), wrong)
        probs_clean = F.softmax(logits_clean, 1)
        true_probs = probs_clean.gather(1, labels[:, None]).squeeze(1)
        kl = (F.kl_div(torch.log(probs_adv + 1e-12), probs_clean, reduction="none").sum(1) * (1.0000001 - true_probs))
        return boosted + beta * kl.mean()
    raise ValueError(f"unknown adversarial training method {method!r}; use pgd, trades or mart")


def global_noise(seed: int, epoch: int, step: int, global_batch: int, shape, rank: int, world_size: int) -> torch.Tensor:
    """Uniform [-1, 1] random-start noise of this rank's slice of the global batch.

    Drawn for the whole global batch [global_batch, *shape] from a generator seeded by
    (seed, epoch, step), then sliced, so it is independent of the number of ranks.
    """
    g = torch.Generator().manual_seed(seed_for(seed, 1, epoch, step))
    full = torch.empty((global_batch, *shape)).uniform_(-1, 1, generator=g)
    b = global_batch // world_size
    return full[rank * b:(rank + 1) * b]


def improves(candidate: dict, best: dict) -> bool:
    """Whether an epoch's selection-split accuracies beat the best so far (robust-overfitting early stop).

    Higher robust accuracy wins (Rice et al. 2020; RiFT §5.1); a tie -- common on a small split,
    where one image is 0.2 pp -- goes to the higher clean accuracy, and a full tie to the earlier epoch.
    Both dicts hold ``robust_accuracy`` and ``clean_accuracy`` as fractions (``best`` may lack the clean one).
    """
    return (candidate["robust_accuracy"], candidate["clean_accuracy"]) > \
        (best["robust_accuracy"], best.get("clean_accuracy", -1.0))


def train_step(ctx: StageContext, engine, images: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor) -> dict:
    """One adversarial training step on this rank's batch; returns loss and accuracies on the batch.

    images float [b, 3, H, W] in [0, 1], labels int64 [b], noise float [b, 3, H, W] in [-1, 1].
    """
    cfg = ctx.cfg.train
    prec = ctx.precision
    a = cfg.attack
    # the attack runs on the unwrapped module (no DDP hooks, no buffer broadcasts), in eval mode; with
    # precision.fold_bn on a copy with every BatchNorm folded into its convolution (same function, fewer passes)
    model = prec.frozen_model(engine.module)
    images = prec.prepare_input(images)
    if cfg.method == "trades":
        with torch.no_grad(), prec.autocast():
            was = model.training
            model.eval()
            target = F.softmax(model(images).float(), 1)
            model.train(was)
        start = 0.001 / max(a.epsilon, 1e-12) * noise  # TRADES starts at x + 0.001 * N(0, 1)-scale noise
        x_adv = pgd(model, images, labels, a.epsilon, a.step_size, a.num_steps, a.random_start,
                    loss="kl", target_probs=target, noise=start, autocast=prec.autocast)
    else:
        x_adv = pgd(model, images, labels, a.epsilon, a.step_size, a.num_steps, a.random_start,
                    noise=noise, autocast=prec.autocast)
    x_adv = prec.prepare_input(x_adv)
    engine.train()
    b = labels.numel()
    with prec.autocast():
        if cfg.method == "pgd":
            logits_adv, logits_clean = engine(x_adv), None
        else:
            logits = engine(torch.cat([images, x_adv]))
            logits_clean, logits_adv = logits[:b], logits[b:]
    loss = at_loss(cfg.method, logits_clean, logits_adv, labels, cfg.beta)
    engine.step(loss)
    return {"loss": loss.detach().float().item(), "robust_correct": (logits_adv.argmax(1) == labels).sum().item(), "n": b}


def run(ctx: StageContext) -> dict:
    """Adversarially train the configured model; keep the epoch with the best selection-split robust accuracy.

    Resumes from ``train/checkpoints`` after a kill (same epoch and step).
    Returns the stage outputs (path of ``train/model.pt``, best epoch and accuracies).
    """
    from rift_dist.data.loaders import build_loader, get_dataset

    cfg = ctx.cfg
    t = cfg.train
    rt = ctx.runtime
    torch.manual_seed(cfg.seed)
    model = new_model(ctx)
    engine = parallelize(
        rt, model, lambda params: torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    )
    loader = build_loader(cfg, "train", rt.rank, rt.world_size, device=ctx.device)
    selection = get_dataset(cfg, "selection")
    steps_per_epoch = len(loader) if not t.max_steps_per_epoch else min(len(loader), t.max_steps_per_epoch)
    manager = checkpoint.CheckpointManager(ctx.layout.checkpoints(STAGE))
    state = manager.load_latest()
    epoch, step_in_epoch, best, history = 0, 0, {"robust_accuracy": -1.0, "epoch": -1}, []
    partial = None  # the resumed epoch's sums over its first step_in_epoch steps (all ranks) and seconds
    if state is not None:
        engine.resume(state)  # weights (also DeepSpeed's fp32 master partitions) and optimizer
        epoch, step_in_epoch, best, history = state["epoch"], state["step"], state["best"], state["history"]
        partial = checkpoint.partial_sums(state, step_in_epoch)
        ctx.log(f"[train] resuming at epoch {epoch + 1}, step {step_in_epoch} (from checkpoint)")
    best_path = ctx.layout.best_model(STAGE)
    global_batch = cfg.data.batch_size
    ctx.log(f"[train] {t.method} AT: {t.epochs} epochs x {steps_per_epoch} steps, global batch {global_batch}, "
            f"{rt.world_size} rank(s), {ctx.precision.describe()}")

    def save(ep: int, st: int, sums: torch.Tensor | None = None, seconds: float = 0.0) -> None:
        """Checkpoint the position (epoch ``ep``, next step ``st``); mid-epoch with this rank's partial
        ``sums`` (float64 [3], summed over ranks here: a collective) and the epoch's seconds so far."""
        extra = {}
        if sums is not None:
            extra = {"partial_sums": rt.all_reduce_sum(sums.clone()), "partial_seconds": float(seconds)}
        engine.save(manager, checkpoint_id(ep, st), epoch=ep, step=st, best=best, history=history, **extra)

    with ctx.tracker.stage("adversarial_training") as run_log:
        run_log.set_tags({"rift.precision": ctx.precision.describe(), "rift.world_size": rt.world_size})
        while epoch < t.epochs:
            lr = multistep_lr(t.lr, t.milestones, t.gamma, epoch)
            set_lr(engine.optimizer, lr)
            # after a resume, start at the saved step: the data order is a function of (seed, epoch)
            loader.set_epoch(epoch, start_batch=step_in_epoch)
            # the epoch's sums so far: the resumed steps' global sums on rank 0 (added once by the all-reduce)
            sums, t0 = checkpoint.start_sums(partial, rt.is_main)
            partial = None
            batches = ctx.bar(loader, total=steps_per_epoch - step_in_epoch, desc=f"AT epoch {epoch + 1}")
            for step, (images, labels) in enumerate(batches, start=step_in_epoch):
                if step >= steps_per_epoch:
                    break
                images, labels = images.to(ctx.device), labels.to(ctx.device)
                noise = global_noise(cfg.seed, epoch, step, global_batch, tuple(images.shape[1:]), rt.rank,
                                     rt.world_size).to(ctx.device)
                out = train_step(ctx, engine, images, labels, noise)
                sums += torch.tensor([out["loss"] * out["n"], out["robust_correct"], out["n"]], dtype=torch.float64)
                signum = interrupts.stop_requested(rt)  # every rank, every step (one tiny all-reduce)
                periodic = bool(t.checkpoint_every) and (step + 1) % t.checkpoint_every == 0
                if (periodic and step + 1 < steps_per_epoch) or signum is not None:
                    save(epoch, step + 1, sums, time.time() - t0)
                if signum is not None:
                    raise interrupts.Interrupted(signum, f"train epoch {epoch + 1} step {step + 1}")
            rt.all_reduce_sum(sums)
            step_in_epoch = 0
            engine.sync_buffers()  # equal BN statistics on every rank before the sharded evaluation
            ev = evaluate_model(ctx, engine.module, selection, _eval_attack(cfg), 1, seed=stream_seed(cfg.seed, "train-selection"),
                                desc="selection eval")
            n = max(sums[2].item(), 1)
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": sums[0].item() / n,
                   "train_robust_accuracy": sums[1].item() / n, "val_clean_accuracy": ev["clean_accuracy"],
                   "val_robust_accuracy": ev["robust_accuracy"], "epoch_seconds": time.time() - t0}
            history.append(row)
            run_log.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            ctx.log(f"[train] epoch {epoch + 1}/{t.epochs} loss {row['train_loss']:.3f} "
                    f"train-robust {100 * row['train_robust_accuracy']:.1f}% val clean {100 * ev['clean_accuracy']:.1f}% "
                    f"robust {100 * ev['robust_accuracy']:.1f}% ({row['epoch_seconds']:.0f}s)")
            if not t.select_best or improves(ev, best):
                best = {"robust_accuracy": ev["robust_accuracy"], "clean_accuracy": ev["clean_accuracy"], "epoch": epoch + 1}
                engine.save_weights(best_path)  # collective under DeepSpeed
            epoch += 1
            save(epoch, 0)
            # a signal during the epoch's evaluation: the epoch-end checkpoint above is the resumable state
            interrupts.check(rt, where=f"train epoch {epoch}")
        final = checkpoint.load(best_path) if best_path.is_file() else engine.state_dict()
        if ctx.is_main:
            checkpoint.save_atomic(final, ctx.layout.model(STAGE))
            write_json(ctx.layout.history(STAGE), history)
            run_log.log_metrics({"best_epoch": best["epoch"], "best_val_robust_accuracy": best["robust_accuracy"]})
            run_log.log_artifact(ctx.layout.history(STAGE))
    outputs = {"model": str(ctx.layout.model(STAGE)), "best": best}
    write_done(ctx, STAGE, outputs)
    rt.barrier()
    return outputs


def run_or_import(ctx: StageContext) -> dict:
    """The train stage of the table: :func:`run`, or :func:`import_checkpoint` when ``from_checkpoint`` is set."""
    if ctx.cfg.from_checkpoint:
        return import_checkpoint(ctx, ctx.cfg.from_checkpoint)
    return run(ctx)


def _eval_attack(cfg):
    from rift_dist.config import AttackConfig

    a = cfg.eval.attack
    return AttackConfig(a.epsilon, a.step_size, cfg.train.eval_attack_steps, True)


def import_checkpoint(ctx: StageContext, path: str) -> dict:
    """Use an existing adversarially trained checkpoint as the train stage's output (``--from-checkpoint``).

    Reads the layouts people have (see ``rift_dist.models.convert``); writes ``train/model.pt``.
    """
    from rift_dist.models.convert import load_external_checkpoint

    model = new_model(ctx)
    state, report = load_external_checkpoint(path, model)
    if ctx.is_main:
        checkpoint.save_atomic(state, ctx.layout.model(STAGE))
        write_json(ctx.layout.import_report, report)
    ctx.log(f"[train] skipped: using {path} ({report.get('summary', '')})")
    outputs = {"model": str(ctx.layout.model(STAGE)), "imported_from": str(path), "report": report}
    write_done(ctx, STAGE, outputs)
    ctx.runtime.barrier()
    return outputs
