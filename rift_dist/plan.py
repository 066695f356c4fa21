"""``rift plan CONFIG``: what a run of a config costs, before any data or run directory is touched.

For the config's model at its real size this reports the parameter count, the number of RiFT modules
(every Conv2d/Linear weight, RIFT.md §Stages 2), the checkpoint size (bytes of ``torch.save(state_dict)``),
the forward FLOPs of one image at the data set's input size (counted by
:class:`torch.utils.flop_counter.FlopCounterMode`, not by hand), and per stage a predicted GPU time:

    seconds = FLOPs / (0.4 x 989e12)

i.e. 40 % of an NVIDIA H200 SXM's dense BF16 tensor-core peak of 989 TFLOP/s (NVIDIA H200 datasheet; the
1,979 TFLOP/s figure there is with 2:4 sparsity).  A forward+backward pass is counted as 3 forwards.  The
counts come from the config (``data.train_subset`` etc.) or, where it says "all", from the data set's entry in
:data:`rift_dist.data.datasets.DATASETS` (full split sizes, input side, class count).

Per-stage FLOPs (F = forward FLOPs of one image):

* training: ``epochs x train images x (PGD steps + 1) x 3F`` plus, per epoch, the selection check
  ``val images x (train.eval_attack_steps + 1) x 3F`` (RiFT §5.1; PGD-AT of Madry et al.).
* MRC: ``modules x mrc.num_iterations x MRC images x 3F`` plus the fixed adversarial set's PGD
  ``MRC images x mrc.attack.num_steps x 3F`` (RiFT §3.2, Alg. 1).  An upper bound: the activation cache
  (``mrc.use_cache``) skips the layers before each module.
* fine-tuning: ``epochs x train images x 3F`` (RiFT §3.3, Eq. 8).
* interpolation: ``alphas x val images x (selection PGD steps x restarts + 1) x 3F`` (RiFT §3.3, Eq. 9).
* evaluation, for the AT and the RiFT model each: clean + PGD with restarts, the extra PGD runs, the margin
  PGD, the sanity checks, AutoAttack when on (upper bound: every image survives every attack) and one forward
  per corrupted image.

What is left out: data loading, BatchNorm and element-wise FLOPs (FlopCounterMode counts matrix products and
convolutions), communication between ranks, checkpoint writes.  Real runs on an H200 are slower than this
where the batch is small or the GPU waits for data; the number is a floor for queueing decisions.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field

from rift_dist.data.datasets import dataset_spec

H200_BF16_DENSE_FLOPS = 989e12
"""Dense BF16 tensor-core peak of an NVIDIA H200 SXM, FLOP/s (NVIDIA H200 datasheet)."""

UTILISATION = 0.4
"""Fraction of the peak assumed to be reached (40 %)."""

FWD_BWD = 3.0
"""A forward+backward pass costs about three forwards."""


@dataclass
class StageCost:
    """Predicted cost of one stage.

    Attributes:
        name: training, MRC, fine-tuning, interpolation or evaluation.
        flops: floating-point operations of the stage (float).
        seconds: predicted H200 seconds, ``flops / (UTILISATION * H200_BF16_DENSE_FLOPS)``.
        work: a short description of the counts used.
    """

    name: str
    flops: float
    work: str
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.seconds = predicted_seconds(self.flops)


@dataclass
class Plan:
    """The cost table of a config (see the module docstring for every formula).

    Attributes:
        config: where the config came from; arch, width, dataset: as in the config.
        input_size: image side in pixels (32 for CIFAR, 64 for Tiny-ImageNet).
        num_classes: classifier outputs.
        parameters: ``sum(p.numel() for p in model.parameters())``.
        modules: number of RiFT modules (Conv2d/Linear layers).
        checkpoint_bytes: ``len`` of ``torch.save(model.state_dict())`` (float32 weights and buffers).
        forward_flops: FLOPs of a one-image forward at ``input_size`` (FlopCounterMode).
        stages: per-stage :class:`StageCost`.
    """

    config: str
    arch: str
    width: int
    dataset: str
    input_size: int
    num_classes: int
    parameters: int
    modules: int
    checkpoint_bytes: int
    forward_flops: float
    stages: list[StageCost] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        """Sum of the stages' predicted seconds."""
        return sum(s.seconds for s in self.stages)


def predicted_seconds(flops: float) -> float:
    """Predicted H200 seconds for ``flops`` FLOPs at 40 % of the 989 TFLOP/s dense BF16 peak."""
    return float(flops) / (UTILISATION * H200_BF16_DENSE_FLOPS)


def forward_flops(model, input_size: int) -> float:
    """FLOPs of one forward of ``model`` on a ``[1, 3, input_size, input_size]`` float32 image.

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode` on a copy of the model on the ``meta``
    device (no arithmetic is done, no memory for activations is taken).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).to("meta").eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        meta(torch.empty(1, 3, input_size, input_size, device="meta"))
    return float(counter.get_total_flops())


def state_dict_bytes(model) -> int:
    """Bytes of ``torch.save(model.state_dict())`` written to memory (what a weights-only checkpoint takes)."""
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def _counts(cfg) -> dict[str, int]:
    """Images per split the stages see: train, val (selection split), test, MRC."""
    spec = dataset_spec(cfg.data.dataset)
    d = cfg.data
    train = d.train_subset or max(spec.train_size - d.val_size, 0)
    test = d.test_subset or spec.test_size
    if cfg.eval.n_examples:
        test = min(test, cfg.eval.n_examples)
    val = d.val_size if cfg.selection_split == "val" else test
    return {"train": train, "val": val, "test": test, "mrc": min(cfg.mrc.num_examples, train)}


def _per_epoch(images: int, batch: int, max_steps: int) -> int:
    return min(images, max_steps * batch) if max_steps else images


def stage_costs(cfg, fwd: float, modules: int) -> list[StageCost]:
    """Per-stage :class:`StageCost` of ``cfg`` for forward FLOPs ``fwd`` per image and ``modules`` modules."""
    from rift_dist.eval.corruption import corruption_plan

    n = _counts(cfg)
    t, m, ft, ev = cfg.train, cfg.mrc, cfg.finetune, cfg.eval
    fb = FWD_BWD * fwd
    stages = []

    per_epoch = _per_epoch(n["train"], cfg.data.batch_size, t.max_steps_per_epoch)
    train_flops = t.epochs * (per_epoch * (t.attack.num_steps + 1) * fb + n["val"] * (t.eval_attack_steps + 1) * fb)
    stages.append(StageCost("training", train_flops,
                            f"{t.epochs} ep x {per_epoch:,} img x (PGD-{t.attack.num_steps} + 1) fwd+bwd"
                            f" + {n['val']:,} val x (PGD-{t.eval_attack_steps} + 1) per epoch"))

    mrc_flops = modules * m.num_iterations * n["mrc"] * fb + n["mrc"] * m.attack.num_steps * fb
    stages.append(StageCost("MRC", mrc_flops, f"{modules} modules x {m.num_iterations} passes x {n['mrc']:,} img"
                                              f" fwd+bwd + PGD-{m.attack.num_steps} on {n['mrc']:,} img"))

    ft_epoch = _per_epoch(n["train"], cfg.data.batch_size, ft.max_steps_per_epoch)
    stages.append(StageCost("fine-tuning", ft.epochs * ft_epoch * fb, f"{ft.epochs} ep x {ft_epoch:,} img fwd+bwd"))

    alphas = len(cfg.interpolation.alphas)
    sel = ev.selection_attack_steps * ev.selection_restarts
    stages.append(StageCost("interpolation", alphas * n["val"] * (sel + 1) * fb,
                            f"{alphas} alphas x {n['val']:,} val x (PGD-{ev.selection_attack_steps}"
                            f" x {ev.selection_restarts} + 1) fwd+bwd"))

    test = n["test"]
    steps = ev.restarts * ev.attack.num_steps + sum(ev.extra_pgd_steps) * ev.extra_restarts + ev.margin_pgd_steps
    per_model = test * fwd + test * steps * fb
    parts = [f"{test:,} test x (1 fwd + {steps} PGD steps)"]
    if ev.sanity_checks:
        sanity = len(ev.sanity_epsilons) * test * ev.attack.num_steps * ev.extra_restarts * fb + test * fwd
        sanity += min(ev.sanity_examples, test) * (0 if ev.autoattack else ev.sanity_square_queries) * fwd
        per_model += sanity
        parts.append("sanity checks")
    if ev.autoattack:
        others = dataset_spec(cfg.data.dataset).num_classes - 1
        targets = min(9, others)  # standard AutoAttack: 9 target classes for APGD-T and FAB-T
        grad_steps = sum({"apgd-ce": ev.autoattack_steps, "apgd-t": targets * ev.autoattack_steps,
                          "fab-t": targets * ev.autoattack_steps}.get(a, 0) for a in ev.autoattack_attacks)
        queries = ev.autoattack_queries if "square" in ev.autoattack_attacks else 0
        per_model += test * (grad_steps * fb + queries * fwd)
        parts.append(f"AutoAttack {'+'.join(ev.autoattack_attacks)} (upper bound)")
    corrupted = 0
    if cfg.data.corruption_root or cfg.data.corruption_generate:
        names, sevs = set(), set()
        for cs, ss in corruption_plan(cfg).values():
            names.update(cs)
            sevs.update(ss)
        per_set = cfg.data.corruption_subset or test
        corrupted = len(names) * len(sevs) * per_set
        per_model += corrupted * fwd
        parts.append(f"{len(names)} corruptions x {len(sevs)} severities x {per_set:,} img fwd")
    stages.append(StageCost("evaluation", 2 * per_model, "2 models x (" + "; ".join(parts) + ")"))
    return stages


def plan_config(cfg, source: str = "") -> Plan:
    """The :class:`Plan` of a loaded :class:`rift_dist.config.RunConfig`; reads no data, writes nothing.

    The model is built at the config's size on the CPU (float32) to count parameters and save its state dict
    to memory; FLOPs are counted on a meta-device copy.
    """
    from rift_dist.models import build_model, module_names

    model = build_model(cfg)
    spec = dataset_spec(cfg.data.dataset)
    size = spec.image_size
    fwd = forward_flops(model, size)
    modules = len(module_names(model))
    width = cfg.model.widen_factor if cfg.model.arch == "wrn34_10" else cfg.model.width
    return Plan(config=source, arch=cfg.model.arch, width=width, dataset=cfg.data.dataset, input_size=size,
                num_classes=spec.num_classes, parameters=sum(p.numel() for p in model.parameters()),
                modules=modules, checkpoint_bytes=state_dict_bytes(model), forward_flops=fwd,
                stages=stage_costs(cfg, fwd, modules))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(plan: Plan) -> str:
    """The plan as two markdown tables (model facts; per-stage FLOPs and predicted H200 time)."""
    width = f"widen factor {plan.width}" if plan.arch == "wrn34_10" else f"width {plan.width}"
    lines = [
        f"rift plan {plan.config}".rstrip(),
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {plan.arch} ({width}) |",
        f"| data set | {plan.dataset}, {plan.input_size}x{plan.input_size}, {plan.num_classes} classes |",
        f"| parameters | {plan.parameters:,} |",
        f"| MRC modules | {plan.modules} |",
        f"| checkpoint size | {plan.checkpoint_bytes / 2**20:.1f} MiB ({plan.checkpoint_bytes:,} bytes) |",
        f"| forward FLOPs / image | {plan.forward_flops / 1e9:.3f} GFLOP |",
        "",
        f"Predicted GPU time: FLOPs / ({UTILISATION:.0%} x {H200_BF16_DENSE_FLOPS / 1e12:.0f} TFLOP/s, "
        "H200 dense bf16); a floor, without data loading or communication.",
        "",
        "| stage | work | PFLOP | predicted H200 time |",
        "|---|---|---:|---:|",
    ]
    for s in plan.stages:
        lines.append(f"| {s.name} | {s.work} | {s.flops / 1e15:.3f} | {_duration(s.seconds)} |")
    total = sum(s.flops for s in plan.stages)
    lines.append(f"| total | | {total / 1e15:.3f} | {_duration(plan.total_seconds)} |")
    return "\n".join(lines)


def add_arguments(p) -> None:
    """Arguments of ``rift plan``: CONFIG and ``--set KEY=VALUE`` (repeatable)."""
    p.add_argument("config", help="experiment YAML (e.g. configs/cifar10_resnet18.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set data.train_subset=1000 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="accepted for symmetry; plan prints no progress")


def plan_command(args) -> int:
    """``rift plan``: load the config (all checks of :func:`rift_dist.config.load_config`), print the table.

    Touches no data, run directory or MLflow store.

    Raises:
        ConfigError: from loading the config (the CLI prints it and exits 2).
    """
    from rift_dist.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    print(format_plan(plan_config(cfg, str(args.config))))
    return 0
