"""One typed configuration tree for a RiFT experiment.

The tree is a set of nested dataclasses.  YAML files are read into it with
:func:`load_config`; every key is checked against the dataclass fields and
every value against the field's type, so an unknown key or a wrong type is an
error that names the key and the file.  ``--set a.b=value`` overrides use the
same checks.  :func:`flatten` turns the tree into ``{"a.b": value}`` pairs for
MLflow params.

Units: epsilons and step sizes are fractions of the pixel range [0, 1]; YAML
may write them as ``8/255``.  Accuracies are fractions in [0, 1].
Source of defaults: RiFT (Zhu et al., ICCV 2023, arXiv 2308.02533) §5.1 and
Madry et al. PGD adversarial training; see ``../shared/RIFT.md``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import yaml

from rift_dist.data.datasets import DATASETS, LAYOUTS
from rift_dist.errors import RiftError


class ConfigError(RiftError, ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


# --------------------------------------------------------------------------- sections


@dataclass
class AttackConfig:
    """An L-inf PGD attack in pixel space [0, 1] (Madry et al. 2018; RiFT §5.1)."""

    epsilon: float = 8 / 255
    """Radius of the L-inf ball, as a fraction of the pixel range (8/255 in the paper)."""
    step_size: float = 2 / 255
    """Size of one signed-gradient step, fraction of the pixel range (2/255)."""
    num_steps: int = 10
    """Number of PGD steps (10: PGD-10)."""
    random_start: bool = True
    """Start from a uniform random point in the epsilon ball."""


@dataclass
class DataConfig:
    """Where the images come from and how they are batched."""

    dataset: str = "cifar10"
    """Data set name: a key of rift_dist.data.datasets.DATASETS (cifar10, cifar100 or tiny-imagenet)."""
    root: str = ""
    """Directory holding the data (CIFAR pickles, image folders or Tiny-ImageNet layout). Env RIFT_DATA_ROOT fills it when empty."""
    archive: str = ""
    """Optional .tar.gz to unpack into cache_dir on first use; root is then found inside it."""
    cache_dir: str = "~/.cache/rift_dist"
    """Where archives are unpacked and generated sets (corruptions, .beton files) are kept."""
    decode_cache: bool = True
    """Keep decoded image folders as .npy in cache_dir so later runs and other ranks skip JPEG decoding."""
    layout: str = "auto"
    """auto, pickle, folder or tiny-imagenet."""
    train_subset: int = 0
    """Use a seeded, class-balanced subset of this many training images (0 = all)."""
    test_subset: int = 0
    """Use a seeded, class-balanced subset of this many test images (0 = all)."""
    val_size: int = 1000
    """Images carved from the training split (seeded) for model/alpha selection."""
    split_seed: int = 0
    """Seed of the train/validation split and of the subsets."""
    batch_size: int = 128
    """Global training batch size (split evenly across ranks)."""
    eval_batch_size: int = 256
    """Evaluation batch size per rank."""
    num_workers: int = 0
    """Loader worker processes (0 = load in the main process)."""
    loader: str = "auto"
    """auto (FFCV when importable, else torch), ffcv or torch."""
    ffcv_storage: str = "raw"
    """How images are stored in .beton files: raw or jpeg."""
    ffcv_jpeg_quality: int = 90
    """JPEG quality when ffcv_storage is jpeg."""
    os_cache: bool = True
    """FFCV: let the OS page cache hold the file (True) or read it into process memory."""
    order: str = "random"
    """FFCV traversal order: random or quasi_random (quasi_random is rejected with more than one rank)."""
    corruption_root: str = ""
    """Directory of a CIFAR-10-C style set (<corruption>.npy, labels.npy) or Tiny-ImageNet-C; empty = none."""
    corruption_generate: bool = False
    """Build a re-generated CIFAR-10-C style set from the test split when corruption_root has none."""
    corruptions: list[str] = field(default_factory=list)
    """Corruption names to evaluate (empty = the standard 15)."""
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    """Severities to evaluate (1..5)."""
    corruption_subset: int = 0
    """Images per corruption and severity (0 = all)."""
    corruption_seed: int = 0
    """Seed of a re-generated corruption set and of the corruption_subset choice."""


@dataclass
class ModelConfig:
    """Architecture (RIFT.md, Models)."""

    arch: str = "resnet18"
    """resnet18, resnet34 or wrn34_10."""
    width: int = 64
    """Channels of the first stage (64 in the paper; smaller for CPU runs). WRN: 16 x widen_factor."""
    widen_factor: int = 10
    """WRN widen factor (10 for WRN-34-10)."""
    mean: list[float] = field(default_factory=list)
    """Per-channel input mean for the model's first (normalisation) layer; empty = the data set's."""
    std: list[float] = field(default_factory=list)
    """Per-channel input std; empty = the data set's."""
    normalize: bool = True
    """Whether the model normalises its input (False for checkpoints trained on raw pixels)."""


@dataclass
class TrainConfig:
    """Adversarial training (RiFT §5.1; Madry PGD-AT, TRADES, MART)."""

    method: str = "pgd"
    """pgd (Madry), trades or mart."""
    epochs: int = 110
    """Training epochs."""
    lr: float = 0.1
    """Initial SGD learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """SGD weight decay."""
    milestones: list[int] = field(default_factory=lambda: [100, 105])
    """Epochs after which the learning rate is multiplied by gamma."""
    gamma: float = 0.1
    """Learning-rate decay factor at each milestone."""
    beta: float = 6.0
    """TRADES / MART regularisation weight."""
    attack: AttackConfig = field(default_factory=AttackConfig)
    """Attack used to make training examples."""
    select_best: bool = True
    """Keep the epoch with the best robust accuracy on the selection split (robust-overfitting early stop;
    Rice et al. 2020); ties go to the better clean accuracy, then the earlier epoch."""
    eval_attack_steps: int = 10
    """PGD steps of the per-epoch robust-accuracy check."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every this many optimizer steps (and at each epoch end)."""
    max_steps_per_epoch: int = 0
    """Stop each epoch after this many steps (0 = the whole epoch); for quick runs."""


@dataclass
class MRCConfig:
    """Module Robust Criticality search (RiFT §3.2, Eq. 2, Alg. 1)."""

    epsilon_w: float = 0.1
    """Radius of the weight perturbation relative to the weight's norm (||dW|| <= eps_w ||W0||)."""
    p: float = 2.0
    """Norm of the weight ball (2 = Frobenius)."""
    num_iterations: int = 10
    """Passes of gradient ascent over the fixed adversarial set."""
    lr: float = 1.0
    """Ascent step size (plain SGD, no momentum or weight decay)."""
    batch_size: int = 512
    """Mini-batch size of the ascent."""
    num_examples: int = 512
    """Size of the fixed adversarial set, drawn (seeded) from the training split."""
    attack: AttackConfig = field(default_factory=AttackConfig)
    """Attack that builds the fixed adversarial set (PGD-10, 8/255)."""
    early_stop: bool = False
    """Stop at the first projection, as Alg. 1 of the paper does (the code runs all iterations)."""
    exclude: list[str] = field(default_factory=list)
    """Modules never chosen: names, or 'first' / 'last' for the stem and the classifier."""
    top_k: int = 1
    """Number of lowest-MRC modules fine-tuned together (RiFT Table 4 ablation)."""
    modules: list[str] = field(default_factory=list)
    """Compute MRC for these modules only (empty = every Conv2d/Linear)."""
    use_cache: bool = True
    """Cache activations at the input of the unit that holds the module (issue: fast MRC)."""
    cache_dtype: str = "auto"
    """dtype of cached activations: auto (the autocast dtype, else float32), float32, bfloat16 or float16."""
    max_cache_bytes: int = 0
    """Largest activation cache kept on the device (0 = no limit); beyond it: host memory on CUDA, the images on a CPU."""
    fuse_eval: bool = True
    """Reuse the next pass's forward as the full-set evaluation when one mini-batch holds the whole set."""


@dataclass
class FinetuneConfig:
    """Fine-tuning of the non-robust-critical module(s) on clean data (RiFT §3.3, Eq. 8)."""

    epochs: int = 10
    """Fine-tuning epochs."""
    lr: float = 1e-3
    """SGD learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """SGD weight decay."""
    milestones: list[int] = field(default_factory=lambda: [5])
    """Epochs after which the learning rate is multiplied by gamma."""
    gamma: float = 0.1
    """Learning-rate decay factor."""
    freeze_bn: bool = False
    """Keep BatchNorm layers in eval mode (the authors' code lets running statistics move)."""
    modules: list[str] = field(default_factory=list)
    """Fine-tune these modules instead of the MRC choice (e.g. the authors' hand-picked layer2.1.conv2)."""
    max_steps_per_epoch: int = 0
    """Stop each epoch after this many steps (0 = whole epoch)."""


@dataclass
class InterpolationConfig:
    """Weight interpolation theta(alpha) = (1 - alpha) theta_AT + alpha theta_FT (RiFT §3.3, Eq. 9)."""

    alphas: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    """Grid of interpolation factors alpha."""
    tolerance: float = 0.001
    """alpha* = best clean accuracy among alphas whose robust accuracy is at most this far below the AT model's (0.1 pp)."""


@dataclass
class EvalConfig:
    """Final evaluation (RiFT §5.1)."""

    attack: AttackConfig = field(default_factory=AttackConfig)
    """PGD attack of the robust accuracy (PGD-10, 8/255, 2/255)."""
    restarts: int = 3
    """PGD restarts; a sample is robust only if it survives all of them."""
    selection_attack_steps: int = 10
    """PGD steps used on the selection split during the interpolation sweep."""
    selection_restarts: int = 1
    """PGD restarts on the selection split during the sweep."""
    autoattack: bool = False
    """Also run AutoAttack (standard version)."""
    n_examples: int = 0
    """Evaluate only the first N test images (0 = all)."""
    autoattack_attacks: list[str] = field(default_factory=lambda: ["apgd-ce", "apgd-t", "fab-t", "square"])
    """AutoAttack's sequence (standard version: apgd-ce, apgd-t, fab-t, square; Croce & Hein 2020)."""
    autoattack_steps: int = 100
    """Iterations of APGD-CE, APGD-T and FAB-T (100 in standard AutoAttack; torchattacks' AutoAttack class uses 10)."""
    autoattack_queries: int = 5000
    """Queries of the Square attack (5000 in standard AutoAttack)."""
    autoattack_seed: int = 0
    """Seed of AutoAttack's random starts and Square's search (torchattacks seeds from the clock when none is given)."""
    extra_pgd_steps: list[int] = field(default_factory=lambda: [20, 50])
    """Also report PGD with these numbers of steps (same epsilon and step size; empty = none)."""
    margin_pgd_steps: int = 20
    """Steps of a PGD with the CW margin loss, reported beside the cross-entropy PGD (0 = off)."""
    extra_restarts: int = 1
    """Restarts of the extra PGD runs (PGD-20/50, margin) and of the epsilon sweep."""
    corruption_protocol: str = "standard"
    """standard (data.corruptions or the 15, data.severities), authors (their code: 18 corruptions; severity 1 only for Tiny-ImageNet-C) or both."""
    sanity_checks: bool = True
    """Run the checks against false robustness (robust <= clean, falls with epsilon, Square vs gradients, epsilon 0)."""
    sanity_epsilons: list[float] = field(default_factory=lambda: [4 / 255, 16 / 255])
    """Extra epsilons of the monotonicity check (PGD with step epsilon/4)."""
    sanity_square_margin: float = 0.02
    """Flag gradient masking when Square breaks more than this fraction of the samples the gradient attacks left."""
    sanity_tolerance: float = 0.005
    """Slack of the epsilon-monotonicity and AutoAttack-vs-PGD checks (fraction of samples)."""
    sanity_examples: int = 200
    """Images of the gradient-free (Square) check when AutoAttack is off (first N of the evaluated set)."""
    sanity_square_queries: int = 500
    """Square queries of that check when AutoAttack is off."""
    resume: bool = True
    """Resume long evaluations from their per-sample progress files in the run dir (False = start over)."""


@dataclass
class PrecisionConfig:
    """Numerics and layout switches."""

    autocast: str = "auto"
    """auto (bf16 where the hardware has it), bf16, fp16 (CUDA only) or none (off / false also mean none)."""
    channels_last: str = "auto"
    """auto, on or off."""
    compile: bool = False
    """torch.compile the model (eager is the default)."""
    fold_bn: bool = True
    """Fold eval-mode BatchNorm into the preceding convolution where the model is frozen (evaluation attacks, MRC)."""
    threads: int = 0
    """torch intra-op threads (0 = leave as is)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms and no cuDNN benchmark."""


@dataclass
class DistributedConfig:
    """How the processes talk and how the model is wrapped."""

    engine: str = "ddp"
    """ddp (plain in one process) or deepspeed (DeepSpeed also in one process)."""
    backend: str = "auto"
    """auto (nccl with CUDA, else gloo), gloo or nccl."""
    timeout_s: int = 300
    """Collective timeout: a dead rank makes the others fail after this long."""
    sync_bn: bool = False
    """Synchronise BatchNorm statistics over ranks (SyncBatchNorm on CUDA, an all-reduce BatchNorm on gloo/CPU)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0, 1, 2)."""
    gradient_accumulation_steps: int = 1
    """DeepSpeed gradient accumulation: micro-batches (loader batches) per optimizer step."""
    deepspeed_optimizer: bool = False
    """Let DeepSpeed build the optimizer (same type and hyperparameters as ours) instead of passing ours in."""
    deepspeed_config: str = ""
    """Optional DeepSpeed JSON file merged over the generated config (e.g. a scheduler); empty = none."""


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    enabled: bool = True
    """Record runs in MLflow."""
    uri: str = ""
    """Tracking URI; empty = env MLFLOW_TRACKING_URI, else a SQLite store beside the run directory."""
    experiment: str = "rift"
    """MLflow experiment name."""


COMPARE_METHODS = ("rift", "most-critical", "random-module", "top-2", "top-3", "top-5", "all-layers", "logit-mix")
"""The methods of ``rift compare`` (issue 16; RiFT §5 Tables 3-4, WiSE-FT, logit mixing); ``top-<k>`` takes any k >= 2."""


def _is_compare_method(name: Any) -> bool:
    if not isinstance(name, str):
        return False
    if name in COMPARE_METHODS:
        return True
    return name.startswith("top-") and name[4:].isdigit() and int(name[4:]) >= 2


@dataclass
class CompareBase:
    """One AT model a comparison starts from (RiFT Table 2: RiFT on PGD-AT, TRADES and MART models).

    Written as a name (``pgd``: trained here with ``train.method: pgd``) or as a mapping
    ``{name: trades-ckpt, checkpoint: PATH}`` (imported: no AT training; the file is read as ``from_checkpoint``
    reads one, :func:`rift_dist.models.convert.load_external_checkpoint`).
    """

    SHORTHAND: ClassVar[str] = "name"
    """A plain string in a list of bases is this field (``bases: [pgd, trades]``)."""
    name: str = ""
    """pgd, trades or mart (trained here with that train.method), or any folder-safe name with a checkpoint."""
    checkpoint: str = ""
    """An adversarially trained checkpoint used as this base's AT model instead of training one ("" = train)."""


COMPARE_BASE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
"""What a base name may be (it names the folder ``base-<name>/``)."""


@dataclass
class CompareConfig:
    """``rift compare``: RiFT against its alternatives on one AT model (see rift_dist/compare/)."""

    methods: list[str] = field(default_factory=lambda: list(COMPARE_METHODS))
    """Methods to run side by side: rift, most-critical, random-module, top-<k> (k >= 2), all-layers, logit-mix."""
    seeds: list[int] = field(default_factory=list)
    """Seeds of the whole comparison (AT training included), one run directory each; empty = [seed]."""
    confidence: float = 0.95
    """Level of the confidence intervals of the paired differences to rift and to the AT model."""
    bases: list[CompareBase] = field(default_factory=list)
    """AT models to compare on, each in its own folder base-<name>/ (RiFT Table 2); empty = the run's own one (train.method, or from_checkpoint), in the run dir itself."""
    autoattack: bool = False
    """Also evaluate AutoAttack (eval.autoattack_* settings) on the test split for AT and every method's theta(alpha*)."""
    autoattack_examples: int = 0
    """AutoAttack on the first N test images only (0 = the whole test split)."""


@dataclass
class RunConfig:
    """The whole experiment."""

    name: str = "default"
    """A short name for the experiment (used in run names)."""
    seed: int = 0
    """Seed of everything random that is not seeded elsewhere."""
    run_dir: str = "runs/default"
    """Where the run's artefacts live."""
    device: str = "auto"
    """auto, cpu or cuda."""
    selection_split: str = "val"
    """Split used to choose the AT epoch, the module and alpha: val (ours) or test (the authors' code)."""
    from_checkpoint: str = ""
    """Start RiFT from this adversarially trained checkpoint and skip adversarial training."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mrc: MRCConfig = field(default_factory=MRCConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    interpolation: InterpolationConfig = field(default_factory=InterpolationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)


PATH_KEYS = {"root", "archive", "cache_dir", "corruption_root", "run_dir", "from_checkpoint", "uri", "checkpoint"}
"""String fields whose ``$VAR`` / ``${VAR}`` references are expanded from the environment."""

CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": tuple(DATASETS),
    "data.layout": LAYOUTS,
    "data.loader": ("auto", "ffcv", "torch"),
    "data.ffcv_storage": ("raw", "jpeg"),
    "data.order": ("random", "quasi_random"),
    "model.arch": ("resnet18", "resnet34", "wrn34_10"),
    "train.method": ("pgd", "trades", "mart"),
    "mrc.cache_dtype": ("auto", "float32", "bfloat16", "float16"),
    "precision.autocast": ("auto", "bf16", "fp16", "none"),
    "precision.channels_last": ("auto", "on", "off"),
    "distributed.engine": ("ddp", "deepspeed"),
    "distributed.backend": ("auto", "gloo", "nccl"),
    "device": ("auto", "cpu", "cuda"),
    "selection_split": ("val", "test"),
}


SWITCH_KEYS = frozenset(k for k, v in CHOICES.items() if {"on", "off"} <= set(v))
"""Fields that take ``auto|on|off``; YAML's booleans (``on``/``off``/``yes``/``no``/``true``/``false`` unquoted)
and the strings on/off/true/false/yes/no in any case are accepted there and normalised to "on" / "off"."""

_SWITCH_WORDS = {"on": "on", "true": "on", "yes": "on", "off": "off", "false": "off", "no": "off", "auto": "auto"}


# --------------------------------------------------------------------------- parsing


def _coerce_switch(value: Any, key: str, source: str) -> str:
    """An ``auto|on|off`` value: True -> "on", False -> "off", strings matched case-insensitively.

    Raises:
        ConfigError: for anything else, naming the key, the value, the file and the accepted spellings.
    """
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str) and value.strip().lower() in _SWITCH_WORDS:
        return _SWITCH_WORDS[value.strip().lower()]
    raise ConfigError(f"{source}: '{key}' is {value!r}; write auto, on or off (true/false also accepted), "
                      f"e.g. --set {key}=off")


def _parse_number(value: Any, key: str, source: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            pass
    raise ConfigError(f"{source}: '{key}' must be a number (e.g. 0.1 or 8/255), got {value!r}")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"internal: union type for {key}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        return _parse_number(value, key, source)
    if tp is str:
        if key in SWITCH_KEYS:
            return _coerce_switch(value, key, source)
        if key in CHOICES and "none" in CHOICES[key] and (
                value is False or (isinstance(value, str) and value.strip().lower() in ("off", "false", "no"))):
            return "none"  # precision.autocast: off  (YAML's boolean) means no autocast
        if isinstance(value, bool) and key in CHOICES:
            raise ConfigError(f"{source}: '{key}' is {value!r} (YAML reads unquoted on/off/yes/no/true/false as a "
                              f"boolean); write one of {', '.join(CHOICES[key])}, e.g. --set {key}={CHOICES[key][0]}")
        if isinstance(value, str) and key.split(".")[-1] in PATH_KEYS:
            value = os.path.expandvars(value)
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and getattr(tp, "SHORTHAND", None):  # compare.bases: [pgd, trades]
            value = {tp.SHORTHAND: value}
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key, source)
    raise ConfigError(f"internal: unsupported type {tp} for {key}")


def _build(cls: type, data: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    obj = cls()
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = [n for n in names if n.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(
                f"{source}: unknown key '{full}'{hint}; valid keys here: {', '.join(sorted(names))}"
            )
        setattr(obj, key, _coerce(value, hints[key], full, source))
    return obj


# Range rules, one per numeric field (and per list that needs an entry): key -> (test, what the value must be).
# Units: epsilons and step sizes are fractions of the pixel range [0, 1]; alphas and accuracy tolerances are
# fractions too.  ``_validate`` applies them to every list item of list fields.
_GE0 = (lambda v: v >= 0, ">= 0")
_GE1 = (lambda v: v >= 1, ">= 1")
_POS = (lambda v: v > 0, "> 0")
_UNIT = (lambda v: 0.0 <= v <= 1.0, "in [0, 1] (a fraction of the pixel range; 8/255 is written 8/255)")
_FRAC = (lambda v: 0.0 <= v <= 1.0, "in [0, 1] (a fraction)")
_MOMENTUM = (lambda v: 0.0 <= v < 1.0, "in [0, 1)")
_GAMMA = (lambda v: 0.0 < v <= 1.0, "in (0, 1]")

RANGES: dict[str, tuple[Any, str]] = {
    "seed": _GE0,
    **{f"{s}.attack.{k}": r for s in ("train", "mrc", "eval")
       for k, r in (("epsilon", _UNIT), ("step_size", _UNIT), ("num_steps", _GE0))},
    "data.train_subset": (lambda v: v >= 0, ">= 0 (0 = all images)"),
    "data.test_subset": (lambda v: v >= 0, ">= 0 (0 = all images)"),
    "data.val_size": _GE0,
    "data.split_seed": _GE0,
    "data.batch_size": _GE1,
    "data.eval_batch_size": _GE1,
    "data.num_workers": _GE0,
    "data.ffcv_jpeg_quality": (lambda v: 1 <= v <= 100, "in 1..100"),
    "data.severities": (lambda v: v in (1, 2, 3, 4, 5), "in 1..5"),
    "data.corruption_subset": (lambda v: v >= 0, ">= 0 (0 = all images)"),
    "data.corruption_seed": _GE0,
    "model.width": _GE1,
    "model.widen_factor": _GE1,
    "model.mean": (lambda v: 0.0 <= v <= 1.0, "in [0, 1] (a mean of pixels in [0, 1])"),
    "model.std": _POS,
    "train.epochs": _GE1,
    "train.lr": _POS,
    "train.momentum": _MOMENTUM,
    "train.weight_decay": _GE0,
    "train.milestones": _GE0,
    "train.gamma": _GAMMA,
    "train.beta": _GE0,
    "train.eval_attack_steps": _GE0,
    "train.checkpoint_every": (lambda v: v >= 0, ">= 0 (0 = only at epoch ends)"),
    "train.max_steps_per_epoch": (lambda v: v >= 0, ">= 0 (0 = the whole epoch)"),
    "mrc.epsilon_w": (lambda v: v >= 0, ">= 0 (relative to the weight's norm; 0.1 in the paper)"),
    "mrc.p": (lambda v: v >= 1, ">= 1 (a norm; 2 = Frobenius)"),
    "mrc.num_iterations": _GE1,
    "mrc.lr": _POS,
    "mrc.batch_size": _GE1,
    "mrc.num_examples": _GE1,
    "mrc.top_k": _GE1,
    "mrc.max_cache_bytes": (lambda v: v >= 0, ">= 0 (0 = no limit)"),
    "finetune.epochs": _GE1,
    "finetune.lr": _POS,
    "finetune.momentum": _MOMENTUM,
    "finetune.weight_decay": _GE0,
    "finetune.milestones": _GE0,
    "finetune.gamma": _GAMMA,
    "finetune.max_steps_per_epoch": (lambda v: v >= 0, ">= 0 (0 = the whole epoch)"),
    "interpolation.alphas": _FRAC,
    "interpolation.tolerance": _FRAC,
    "eval.restarts": _GE1,
    "eval.selection_attack_steps": _GE0,
    "eval.selection_restarts": _GE1,
    "eval.n_examples": (lambda v: v >= 0, ">= 0 (0 = all)"),
    "eval.autoattack_steps": _GE1,
    "eval.autoattack_queries": _GE1,
    "eval.autoattack_seed": _GE0,
    "eval.extra_pgd_steps": _GE1,
    "eval.margin_pgd_steps": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "eval.extra_restarts": _GE1,
    "eval.sanity_epsilons": _UNIT,
    "eval.sanity_square_margin": _FRAC,
    "eval.sanity_tolerance": _FRAC,
    "eval.sanity_examples": _GE1,
    "eval.sanity_square_queries": _GE1,
    "precision.threads": (lambda v: v >= 0, ">= 0 (0 = leave torch's setting)"),
    "distributed.timeout_s": _GE1,
    "distributed.zero_stage": (lambda v: v in (0, 1, 2), "0, 1 or 2"),
    "distributed.gradient_accumulation_steps": _GE1,
    "compare.seeds": _GE0,
    "compare.confidence": (lambda v: 0.0 < v < 1.0, "in (0, 1), e.g. 0.95"),
    "compare.autoattack_examples": (lambda v: v >= 0, ">= 0 (0 = the whole test split)"),
}
"""The range rule of every numeric field: ``{key: (test, description)}``; list fields are checked per item."""

NONEMPTY = ("interpolation.alphas", "data.severities", "compare.methods")
"""List fields that need at least one entry."""



def _fix(key: str, source: str) -> str:
    where = source.replace(" with --set", "")
    return f"fix it in {where} or with --set {key}=..."


def _validate(cfg: RunConfig, source: str) -> None:
    """Check every choice and range rule (:data:`CHOICES`, :data:`RANGES`, :data:`NONEMPTY`).

    Runs inside :func:`from_dict` / :func:`load_config`, i.e. before any data, MLflow or run-directory work.
    (``eval.corruption_protocol`` and the AutoAttack names are checked by
    ``rift_dist.eval.protocol.validate_eval_config``.)

    Raises:
        ConfigError: ``"<file>: '<key>' is <value>; it must be <rule>; fix it in <file> or with --set <key>=..."``.
    """
    flat = flatten(cfg)
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{source}: '{key}' is {flat[key]!r}; choose one of {', '.join(allowed)}; "
                              f"{_fix(key, source)}")
    for key in NONEMPTY:
        if not flat[key]:
            raise ConfigError(f"{source}: '{key}' is []; it needs at least one entry; {_fix(key, source)}")
    for key, (ok, rule) in RANGES.items():
        value = flat[key]
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not ok(item):
                shown = f"{item!r} (in {value!r})" if isinstance(value, list) else repr(item)
                raise ConfigError(f"{source}: '{key}' is {shown}; it must be {rule}; {_fix(key, source)}")
    if cfg.eval.autoattack and not cfg.eval.autoattack_attacks:
        raise ConfigError(f"{source}: 'eval.autoattack_attacks' is [] while eval.autoattack is true; list at least "
                          f"one attack or set eval.autoattack: false; {_fix('eval.autoattack_attacks', source)}")
    bad = [m for m in cfg.compare.methods if not _is_compare_method(m)]
    if bad:
        raise ConfigError(f"{source}: 'compare.methods' has {bad[0]!r}; each method must be one of "
                          f"{', '.join(COMPARE_METHODS)} (or top-<k>, k >= 2); {_fix('compare.methods', source)}")
    _validate_bases(cfg, source)
    if cfg.model.mean and cfg.model.std and len(cfg.model.mean) != len(cfg.model.std):
        raise ConfigError(f"{source}: 'model.mean' has {len(cfg.model.mean)} entries and 'model.std' "
                          f"{len(cfg.model.std)}; give one per input channel; {_fix('model.std', source)}")


def _validate_bases(cfg: RunConfig, source: str) -> None:
    """``compare.bases``: folder-safe unique names; a base without a checkpoint is an AT method trained here."""
    import re

    seen = set()
    for i, b in enumerate(cfg.compare.bases):
        key = f"compare.bases[{i}]"
        if not re.fullmatch(COMPARE_BASE_NAME, b.name or ""):
            raise ConfigError(f"{source}: '{key}.name' is {b.name!r}; a base name is letters, digits, '-', '_' or '.' "
                              f"(it names the folder base-<name>/), e.g. pgd or trades-imported; "
                              f"{_fix('compare.bases', source)}")
        if b.name in seen:
            raise ConfigError(f"{source}: 'compare.bases' names {b.name!r} twice; give each base its own name; "
                              f"{_fix('compare.bases', source)}")
        seen.add(b.name)
        if not b.checkpoint and b.name not in CHOICES["train.method"]:
            raise ConfigError(f"{source}: '{key}' is {b.name!r} without a checkpoint; a base trained here is named "
                              f"after its AT method ({', '.join(CHOICES['train.method'])}), an imported one is "
                              f"{{name: {b.name}, checkpoint: PATH}}; {_fix('compare.bases', source)}")


def from_dict(data: dict, source: str = "<dict>") -> RunConfig:
    """Build and validate a :class:`RunConfig` from a nested mapping.

    Raises:
        ConfigError: on an unknown key, a wrong type or a value outside its choices;
            the message names the key and ``source``.
    """
    cfg = _build(RunConfig, data or {}, "", source)
    _validate(cfg, source)
    return cfg


def apply_overrides(data: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested mapping.

    Raises:
        ConfigError: when an override has no '=' or its value is not valid YAML.
    """
    data = dict(data or {})
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: the value of override {item!r} is not valid YAML "
                              f"({str(exc).splitlines()[0]}); quote it, e.g. --set '{key.strip()}=\"{raw}\"'") from exc
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def deep_merge(base: dict, top: dict) -> dict:
    """A new dict: ``base`` with ``top`` laid over it, nested dicts merged key by key (``top`` wins).

    Used for YAML ``base:`` files and for a user's DeepSpeed JSON over the generated config.
    """
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a config YAML file, following an optional ``base:`` key (a path relative to the file).

    Raises:
        ConfigError: when the file (or a ``base:`` file) is missing, is not valid YAML, is not a mapping, or
            when the ``base:`` chain comes back to a file already in it (a cycle).
    """
    path = Path(path)
    if _chain and not path.is_file():
        raise ConfigError(f"{_chain[-1]}: base file {path} not found (a base: path is relative to the file that "
                          f"names it); fix the base: line")
    if path.is_file() and path.resolve() in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path.resolve()))
        raise ConfigError(f"{_chain[-1]}: base: chain comes back to a file already in it ({cycle}); remove "
                          f"the base: line that closes the loop")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (give a path to a YAML file, e.g. configs/default.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    base = data.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: base: must be one file name (relative to {path.parent}), got {base!r}")
    if base:
        data = deep_merge(read_yaml(path.parent / base, (*_chain, path.resolve())), data)
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config file (or the built-in defaults when ``path`` is None) and apply overrides.

    Every type, choice and range rule is checked here (:func:`_validate`), so a bad value is refused before
    any data, MLflow or run-directory work.  ``auto|on|off`` fields accept YAML booleans (``off`` unquoted).

    Raises:
        ConfigError: naming the key, the value and the file (``"<file> with --set"`` for overrides) and the fix,
            on any unknown key, wrong type, bad choice or value out of range.
    """
    data = read_yaml(path) if path else {}
    source = str(path) if path else "<defaults>"
    if overrides:  # one check of the merged tree: an override may repair a value of the file
        return from_dict(apply_overrides(data, overrides), f"{source} with --set")
    return from_dict(data, source)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a config dataclass tree into ``{"section.key": value}``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
    return out


def to_dict(cfg: Any) -> dict:
    """The config tree as plain nested dicts (for YAML dumps and pickling)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config tree to ``path`` as YAML (atomically: a reader sees the old file or the new one)."""
    from rift_dist.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
