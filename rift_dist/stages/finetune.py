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

import copy
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rift_dist.atomic import read_json, write_json
from rift_dist import checkpoint, interrupts
from rift_dist.checkpoint_ids import checkpoint_id
from rift_dist.eval.protocol import evaluate_model
from rift_dist.parallel import parallelize
from rift_dist.models import get_module
from rift_dist.layout import RunLayout
from rift_dist.stages import StageError
from rift_dist.stages.context import StageContext, at_state, new_model
from rift_dist.stages.done_markers import write_done
from rift_dist.stages.lr_schedule import multistep_lr, set_lr

STAGE = "finetune"


def chosen_modules(ctx: StageContext) -> list[str]:
    """``finetune.modules`` when set, else the MRC stage's choice.

    Raises:
        StageError: when neither is available.
    """
    if ctx.cfg.finetune.modules:
        return list(ctx.cfg.finetune.modules)
    path = ctx.layout.mrc_result
    if not path.is_file():
        raise StageError(f"no module to fine-tune: {path} is missing (run the mrc stage, or set finetune.modules)")
    return read_json(path)["chosen"]


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
    engine = parallelize(
        rt, model, lambda params: torch.optim.SGD(params, lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay)
    )
    loader = build_loader(cfg, "train", rt.rank, rt.world_size, device=ctx.device)
    selection = get_dataset(cfg, "selection")
    steps = len(loader) if not f.max_steps_per_epoch else min(len(loader), f.max_steps_per_epoch)
    manager = checkpoint.CheckpointManager(ctx.layout.checkpoints(STAGE))
    state = manager.load_latest()
    epoch, step_in_epoch, history, best = 0, 0, [], {"clean_accuracy": -1.0, "epoch": -1}
    partial = None
    if state is not None:
        engine.resume(state)  # weights (also DeepSpeed's fp32 master partitions) and optimizer
        epoch, history, best = state["epoch"], state["history"], state["best"]
        step_in_epoch = int(state.get("step", 0))  # > 0: a checkpoint written on a signal, mid-epoch
        partial = checkpoint.partial_sums(state, step_in_epoch)
        ctx.log(f"[finetune] resuming at epoch {epoch + 1}" + (f", step {step_in_epoch}" if step_in_epoch else ""))
    best_path = ctx.layout.best_model(STAGE)
    ctx.log(f"[finetune] modules {', '.join(names)}: {f.epochs} epochs x {steps} steps, "
            f"BN {'frozen' if f.freeze_bn else 'in train mode'}")

    def save(ep: int, st: int = 0, sums: torch.Tensor | None = None, seconds: float = 0.0) -> None:
        """Checkpoint epoch ``ep`` at next step ``st`` (0 = its start); mid-epoch with the partial ``sums``
        (float64 [3], summed over ranks here: a collective) and the epoch's seconds so far."""
        extra = {"step": st}
        if sums is not None:
            extra.update(partial_sums=rt.all_reduce_sum(sums.clone()), partial_seconds=float(seconds))
        engine.save(manager, checkpoint_id(ep, st), epoch=ep, history=history, best=best, **extra)

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
                engine.save_weights(best_path)  # collective under DeepSpeed
            epoch += 1
            save(epoch)
            interrupts.check(rt, where=f"finetune epoch {epoch}")
        if ctx.is_main:
            checkpoint.save_atomic(checkpoint.load(best_path), ctx.layout.model(STAGE))
            write_json(ctx.layout.history(STAGE), history)
    outputs = {"model": str(ctx.layout.model(STAGE)), "modules": names, "best": best}
    write_done(ctx, STAGE, outputs)
    rt.barrier()
    return outputs


# ------------------------------------------------------------------------------ fine-tuning candidates (SLURM)
# With ``stages.finetune.candidates: k`` > 1 in a launch profile the MRC gather records the k lowest-MRC
# modules (after ``mrc.exclude``) in ``finetune/candidates.json``; an array fine-tunes candidate j ALONE
# in ``finetune/candidates/<module>/`` (this stage's own code on a sub-run directory); the
# interpolation gather picks the candidate (:func:`rift_dist.stages.interpolation.choose_candidate`).


def needs_not_needed(cfg, candidates: int) -> tuple[str, ...]:
    """The stage's needs the config makes unnecessary: the MRC stage when ``finetune.modules`` names the
    modules (and no candidates are fine-tuned)."""
    return ("mrc",) if cfg.finetune.modules and candidates <= 1 else ()


def read_candidates(run_dir: str | Path) -> list[str]:
    """The candidate modules of a run, lowest MRC first.

    Raises:
        StageError: when ``finetune/candidates.json`` is missing (the MRC gather has not run).
    """
    path = RunLayout(run_dir).candidates
    if not path.is_file():
        raise StageError(f"{path} is missing: the MRC gather writes it (with finetune candidates > 1); run it first")
    return list(read_json(path)["candidates"])


def candidate_modules(cfg, run_dir: str | Path, k: int, write: bool = False) -> list[str]:
    """The k lowest-MRC modules after ``mrc.exclude`` (lowest first), from ``finetune/candidates.json`` when it
    was made for the same k, else from the MRC stage's ``mrc/mrc.json`` (and saved there when ``write``).

    Raises:
        StageError: when the MRC stage has not finished (``mrc/mrc.json`` missing).
    """
    from rift_dist.models import build_model, module_names
    from rift_dist.stages.criticality import choose_modules

    path = RunLayout(run_dir).candidates
    if path.is_file():
        data = read_json(path)
        if data.get("requested") == k:
            return list(data["candidates"])
    info = RunLayout(run_dir).mrc_result
    if not info.is_file():
        raise StageError(f"{info} is missing: the fine-tuning candidates come from the MRC stage; run it first")
    rows = read_json(info)["rows"]
    chosen = choose_modules(rows, module_names(build_model(cfg)), cfg.mrc.exclude, k)
    if write:
        write_json(path, {"candidates": chosen, "requested": k})
    return chosen


def candidate_names(cfg, run_dir: str | Path, k: int) -> dict[int, str]:
    """{candidate index: module} once the MRC stage has finished ({} before, or with k <= 1)."""
    if k <= 1 or not RunLayout(run_dir).mrc_result.is_file():
        return {}
    return dict(enumerate(candidate_modules(cfg, run_dir, k)))


def candidate_config(cfg, run_dir: str | Path, module: str):
    """(config, run dir) of candidate ``module``: ``finetune.modules = [module]`` in its sub-run directory,
    whose ``train/model.pt`` is a link to the run's AT model (a copy where links are not allowed).

    Raises:
        StageError: when the AT model is missing.
    """
    sub = RunLayout(run_dir).candidate_dir(module)
    target = RunLayout(sub).model("train")
    if not target.exists() and not target.is_symlink():
        target.parent.mkdir(parents=True, exist_ok=True)
        source = RunLayout(run_dir).model("train")
        if not source.is_file():
            raise StageError(f"the adversarially trained model {source} is missing; run the train stage first")
        try:
            os.symlink(os.path.relpath(source, target.parent), target)
        except FileExistsError:
            pass  # another rank made it
        except OSError:
            shutil.copyfile(source, target)
    sub_cfg = copy.deepcopy(cfg)
    sub_cfg.finetune.modules = [module]
    sub_cfg.run_dir = str(sub)
    return sub_cfg, sub


def finetune_candidate_done(cfg, run_dir: str | Path, module: str) -> bool:
    """Whether candidate ``module`` has been fine-tuned (its sub-run's ``finetune/done.json`` exists)."""
    return RunLayout(run_dir).candidate(module).done_marker(STAGE).is_file()


def check_candidates(cfg, options: dict, selected: bool, profile_name: str) -> str:
    """Why ``stages.finetune.candidates`` of the launch profile ``profile_name`` cannot work with ``cfg`` (""
    when it can): with ``mrc.top_k`` > 1, or (stage planned) more candidates than MRC modules left after
    ``mrc.exclude``."""
    from rift_dist.models import build_model, module_names
    from rift_dist.stages.criticality import mrc_module_names

    k = int(options["candidates"])
    if k > 1 and cfg.mrc.top_k > 1:
        return (f"stages.finetune.candidates = {k} and mrc.top_k = {cfg.mrc.top_k}: candidates are "
                f"fine-tuned one module each; set one of them to 1")
    if not selected or k <= 1:
        return ""
    names = mrc_module_names(cfg)
    every = module_names(build_model(cfg))
    gone = {e for e in cfg.mrc.exclude if e not in ("first", "last")}
    gone |= {every[0]} if "first" in cfg.mrc.exclude else set()
    gone |= {every[-1]} if "last" in cfg.mrc.exclude else set()
    n_eligible = len([n for n in names if n not in gone])
    if k > max(n_eligible, 1):
        return (f"stages.finetune.candidates = {k}, but the model has {len(names)} MRC module(s)"
                f"{f' ({n_eligible} after mrc.exclude)' if cfg.mrc.exclude else ''}: set "
                f"stages.finetune.candidates between 1 and {max(n_eligible, 1)} in the profile "
                f"{profile_name} (or --profile-set stages.finetune.candidates=N)")
    return ""


def runs_as_array(cfg, options: dict, candidates: int) -> bool:
    """Whether ``rift submit`` makes the stage an array: one task per candidate when k > 1."""
    return candidates > 1


def _matches(names: list[str], index: int, wanted: list[str]) -> bool:
    """Whether ``--only finetune:W,...`` names this task (candidate index or module)."""
    for w in wanted:
        if w in names or (not names and w == str(index)):
            return True
        try:
            if any(float(w) == float(n) for n in names):
                return True
        except ValueError:
            continue
    return False


def array_tasks(cfg, run_dir: Path, options: dict, candidates: int, wanted: list[str] | None):
    """Task j fine-tunes candidate j (its module known once the MRC stage has finished); done candidates are
    left out unless ``--only`` is given.  Returns (tasks, {})."""
    known = candidate_names(cfg, run_dir, candidates)
    tasks = []
    for j in range(candidates):
        module = known.get(j)
        if module and finetune_candidate_done(cfg, run_dir, module) and wanted is None:
            continue
        names = [str(j)] + ([module] if module else [])
        if wanted and not _matches(names, j, wanted):
            continue
        label = f"candidate {j}" + (f" ({module})" if module else "")
        tasks.append({"index": j, "label": label, "names": names, "what": f"fine-tune {label}",
                      "args": {"candidate": j, "candidates": candidates},
                      "run_key": f"finetune@candidate-{j}", "run_name": f"finetune[candidate {j}]"})
    return tasks, {}


def candidate_task(ctx: StageContext, args: dict, run) -> dict:
    """One array task: fine-tune candidate j alone in its sub-run directory (this stage, run by the pipeline's
    :func:`~rift_dist.pipeline.run_stages` there), continuing the MLflow run ``rift submit`` created."""
    from rift_dist.pipeline import make_context, run_stages

    j = int(args["candidate"])
    modules = candidate_modules(ctx.cfg, ctx.run_dir, int(args["candidates"]), write=ctx.is_main)
    if j >= len(modules):
        ctx.log(f"[finetune] candidate {j}: only {len(modules)} candidate module(s) after mrc.exclude; nothing to do")
        return {"candidate": j, "module": None}
    module = modules[j]
    sub_cfg, sub = candidate_config(ctx.cfg, ctx.run_dir, module)
    ctx.runtime.barrier()
    key_file = ctx.tracker.key_file(f"finetune@candidate-{j}") if ctx.tracker.active else None
    if key_file is not None and key_file.is_file():
        target = RunLayout(sub).mlflow_key_file(STAGE)
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(key_file, target)  # the stage code continues the run created by rift submit
    run.set_tags({"mlflow.runName": f"finetune[{module}]", "rift.candidate": module, "rift.candidate_index": j})
    sub_ctx = make_context(sub_cfg, sub, ctx.runtime, False, ctx.tracker.parent.run_id)
    try:
        out = run_stages(sub_ctx, [STAGE])[STAGE]
    finally:
        sub_ctx.tracker.close()
    return {"candidate": j, "module": module, **out}


def candidate_task_done(run_dir: Path, args: dict) -> bool:
    """Whether candidate j has been fine-tuned (or does not exist: fewer candidates than asked)."""
    if not RunLayout(run_dir).candidates.is_file():
        return False
    modules = read_candidates(run_dir)
    j = int(args.get("candidate", 0))
    return j >= len(modules) or finetune_candidate_done(None, run_dir, modules[j])
