"""The engine matrix (issue 11): every engine x precision x layout x rank count through EVERY stage.

``distributed.engine`` ddp and deepspeed (ZeRO 0, 1, 2) x ``precision.autocast`` the default (auto: bf16 where
the CPU has native bf16, else float32) and none (float32) x ``precision.channels_last`` auto / on / off x 1 and
2 ranks (gloo), each a tiny ``rift run`` (train, mrc, finetune, interpolate, evaluate) that must choose the
same module as the 1-rank DDP run with the default precision.  Every combination runs (none is refused at
config time): under DeepSpeed the weights are kept NCHW while the inputs stay channels_last
(``rift_dist.parallel.deepspeed.contiguous_parameters``).  Frozen parameters (everything but the fine-tuned
module) must come out of fine-tuning bit-identical, under every engine.

The tiny run: a width-4 ResNet-18 on 512 real CIFAR-10 images, 1 AT epoch of 8 steps with PGD-1, MRC of three
clearly separated modules (:data:`MRC_MODULES`) on 128 images with 3 ascent passes, 1 fine-tuning step, alphas {0, 1}, PGD-1 evaluation of 50
images, no corruptions, no sanity checks, no MLflow.  ``sync_bn: true`` as in ``configs/default.yaml`` so
that 1 and 2 ranks train the same model to rounding.  The default (not-slow) run holds the defaults
(ddp 1 and 2 ranks, DeepSpeed ZeRO-0 on 1 rank and ZeRO-2 on 2 ranks, all with the default precision and
layout); every other combination is ``@pytest.mark.slow``.  Each test prints its wall time and the MRC gap
between the chosen module and the runner-up (``-s`` shows it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from rift_dist.parallel.deepspeed import available
from tests.integration.distributed_helpers import DATA_MISSING, DATA_REASON, rift_cli
from tests.integration.pipeline_helpers import tiny_config

DS_OK, DS_WHY = available()
NEEDS_DATA = pytest.mark.skipif(DATA_MISSING, reason=DATA_REASON)

ENGINES = {
    "ddp": [],
    "zero0": ["distributed.engine=deepspeed", "distributed.zero_stage=0"],
    "zero1": ["distributed.engine=deepspeed", "distributed.zero_stage=1"],
    "zero2": ["distributed.engine=deepspeed", "distributed.zero_stage=2"],
}
PRECISIONS = {"default": [], "fp32": ["precision.autocast=none"]}
LAYOUTS = ("auto", "on", "off")
DEFAULT_RUN = {("ddp", "default", "auto", 1), ("ddp", "default", "auto", 2),
               ("zero0", "default", "auto", 1), ("zero2", "default", "auto", 2)}


MRC_MODULES = ["layer1.0.conv1", "layer4.0.conv2", "linear"]
"""The MRC candidates of the tiny run.  Over all 21 modules the tiny model (near chance after 8 steps) has a
near-tie at the bottom of the table: measured on this CPU, the lowest and second-lowest MRC differ by 2e-7 to
1e-3 and the choice flips between bf16 and float32, between channels_last on and off, and between 1 and 2 ranks
(four different modules in four runs), which is rounding, not a bug.  These three are separated clearly in every
combination measured (lowest layer1.0.conv1 at 0 to 0.007, the others at 0.019 to 0.06), so the assertion
stays exact.  ``mrc.lr`` 1000 makes the ascent reach the eps_w ball (at lr 1 it never does on this model)."""


def matrix_config(tmp: Path) -> Path:
    """The tiny every-stage config of this matrix (precision left at its defaults)."""
    return tiny_config(
        tmp,
        data={"loader": "torch", "train_subset": 512, "val_size": 50, "test_subset": 50, "batch_size": 64,
              "eval_batch_size": 64, "corruption_generate": False, "corruptions": [], "severities": [1]},
        train={"epochs": 1, "max_steps_per_epoch": 8, "milestones": [10], "attack": {"num_steps": 1},
               "eval_attack_steps": 1, "select_best": False},
        mrc={"num_examples": 128, "batch_size": 128, "num_iterations": 3, "lr": 1000.0, "modules": MRC_MODULES,
             "attack": {"num_steps": 1}},
        finetune={"epochs": 1, "max_steps_per_epoch": 1, "milestones": [10]},
        interpolation={"alphas": [0.0, 1.0]},
        eval={"restarts": 1, "attack": {"num_steps": 1}, "selection_attack_steps": 1, "extra_pgd_steps": [],
              "margin_pgd_steps": 0, "sanity_checks": False},
        distributed={"sync_bn": True, "timeout_s": 120},
        tracking={"enabled": False},
    )


def run_combination(tmp: Path, engine: str, precision: str, layout: str, ranks: int) -> dict:
    """``rift run`` of the tiny config under one combination; returns the MRC table, chosen module and time."""
    cfg = matrix_config(tmp)
    run_dir = tmp / f"{engine}-{precision}-{layout}-{ranks}"
    overrides = ENGINES[engine] + PRECISIONS[precision] + ([f"precision.channels_last={layout}"] if layout != "auto" else [])
    args = ["run", str(cfg), "--run-dir", str(run_dir)]
    for o in overrides:
        args += ["--set", o]
    t0 = time.time()
    proc = rift_cli(*args, nproc=ranks if ranks > 1 else 0, timeout=900)
    seconds = time.time() - t0
    mrc = json.loads((run_dir / "mrc" / "mrc.json").read_text())
    rows = sorted(mrc["rows"], key=lambda r: r["mrc"])
    return {"run_dir": run_dir, "chosen": mrc["chosen"], "rows": rows, "seconds": seconds, "stdout": proc.stdout}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 1-rank DDP run with the default precision and layout: the module every combination must choose."""
    return run_combination(tmp_path_factory.mktemp("matrix-ref"), "ddp", "default", "auto", 1)


def _frozen_parameters_unchanged(run_dir: Path, chosen: list[str]) -> float:
    """Max |change| of the parameters outside the fine-tuned module(s) between the AT and fine-tuned models."""
    at = torch.load(run_dir / "train" / "model.pt", weights_only=True)
    ft = torch.load(run_dir / "finetune" / "model.pt", weights_only=True)
    from rift_dist.config import load_config
    from rift_dist.models import build_model

    names = {n for n, _ in build_model(load_config(run_dir / "config.yaml")).named_parameters()}
    frozen = [n for n in names if not any(n == c or n.startswith(c + ".") for c in chosen)]
    assert frozen and len(frozen) < len(names)
    worst = max((at[n].double() - ft[n].double()).abs().max().item() for n in frozen)
    trained = max((at[n].double() - ft[n].double()).abs().max().item() for n in names if n not in frozen)
    assert trained > 0, "the fine-tuned module did not move"
    return worst


def _combinations():
    for engine in ENGINES:
        for precision in PRECISIONS:
            for layout in LAYOUTS:
                for ranks in (1, 2):
                    combo = (engine, precision, layout, ranks)
                    marks = [NEEDS_DATA] + ([] if combo in DEFAULT_RUN else [pytest.mark.slow])
                    if engine != "ddp":
                        marks.append(pytest.mark.skipif(not DS_OK, reason=f"DeepSpeed unavailable: {DS_WHY}"))
                    yield pytest.param(*combo, marks=marks, id=f"{engine}-{precision}-cl_{layout}-{ranks}rank")


@pytest.mark.parametrize("engine, precision, layout, ranks", list(_combinations()))
def test_every_stage_chooses_the_reference_module(reference, tmp_path, engine, precision, layout, ranks):
    if (engine, precision, layout, ranks) == ("ddp", "default", "auto", 1):
        got = reference
    else:
        got = run_combination(tmp_path, engine, precision, layout, ranks)
    ref_rows = reference["rows"]
    gap = ref_rows[1]["mrc"] - ref_rows[0]["mrc"]
    print(f"\n[matrix] {engine} precision={precision} channels_last={layout} ranks={ranks}: "
          f"{got['seconds']:.1f}s wall, chosen {got['chosen']} (reference {reference['chosen']}, "
          f"reference MRC gap to the runner-up {gap:.3g}; this run: "
          f"{', '.join('%s %.4g' % (r['module'], r['mrc']) for r in got['rows'][:3])})")
    assert got["chosen"] == reference["chosen"]
    for stage in ("train", "mrc", "finetune", "interpolate", "evaluate"):
        assert (got["run_dir"] / stage / "done.json").is_file(), f"stage {stage} did not finish"
    worst = _frozen_parameters_unchanged(got["run_dir"], got["chosen"])
    assert worst == 0.0, f"frozen parameters moved by {worst:.3g} in fine-tuning"


def test_deepspeed_layout_nchw_weights_with_channels_last_inputs_equal_the_all_nhwc_model():
    """What ``contiguous_parameters`` relies on: NCHW weights + channels_last input still run NHWC, same values."""
    from rift_dist.config import load_config
    from rift_dist.parallel.deepspeed import contiguous_parameters
    from rift_dist.models import build_model

    torch.manual_seed(0)
    nhwc = build_model(load_config(None, ["model.width=4"])).to(memory_format=torch.channels_last).eval()
    mixed = build_model(load_config(None, ["model.width=4"])).eval()
    mixed.load_state_dict(nhwc.state_dict())
    mixed.to(memory_format=torch.channels_last)
    params_before = [id(p) for p in mixed.parameters()]
    frozen = next(mixed.parameters())
    frozen.requires_grad_(False)
    n = contiguous_parameters(mixed)
    assert n > 0 and [id(p) for p in mixed.parameters()] == params_before and not frozen.requires_grad
    for p in mixed.parameters():  # what DeepSpeed's byte view needs, including the [O, I, 1, 1] shortcut weights
        assert p.stride(-1) == 1 and p.is_contiguous()
        p.data.view(torch.uint8)
    assert torch.equal(torch.cat([p.flatten() for p in mixed.parameters()]),
                       torch.cat([p.flatten() for p in nhwc.parameters()]))
    x = torch.rand(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    conv = mixed.get_submodule("conv1") if hasattr(mixed, "conv1") else next(
        m for m in mixed.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv(x).is_contiguous(memory_format=torch.channels_last)  # the NHWC kernel was chosen
    with torch.no_grad():
        diff = (mixed(x) - nhwc(x)).abs().max().item()
    print(f"NCHW weights + channels_last input vs all-NHWC: max |d logits| {diff:.2e}")
    assert diff <= 1e-5
