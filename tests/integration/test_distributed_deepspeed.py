"""DeepSpeed ZeRO 0/1/2 == DDP (2 gloo ranks, and one process without a launcher); consolidated state dicts.

DeepSpeed and DDP do the same fp32 arithmetic here (gradients summed over two ranks and halved),
so the tolerances are tight: the runs agree to ~1e-7 or better.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from rift_dist.parallel.deepspeed import available
from tests.integration.distributed_helpers import (
    DATA_MISSING, DATA_REASON, dist_config, latest_checkpoint, optimizer_diff, spawn, state_diff,
)

DS_OK, DS_WHY = available()
pytestmark = [pytest.mark.skipif(DATA_MISSING, reason=DATA_REASON),
              pytest.mark.skipif(not DS_OK, reason=f"DeepSpeed unavailable: {DS_WHY}")]

ATOL = 1e-6

SCENARIOS = {
    "ddp": [],
    "zero0": ["distributed.engine=deepspeed", "distributed.zero_stage=0"],
    "zero1": ["distributed.engine=deepspeed", "distributed.zero_stage=1", "distributed.deepspeed_optimizer=true"],
    "zero2": ["distributed.engine=deepspeed", "distributed.zero_stage=2"],
}


def _run_train(runtime, cfg_path: str, run_dir: Path, overrides: list[str]) -> None:
    """The train stage on an existing runtime (one process group serves several runs)."""
    from rift_dist.config import load_config
    from rift_dist.pipeline import configure_torch, make_context, run_stages

    cfg = load_config(cfg_path, overrides)
    cfg.run_dir = str(run_dir)
    configure_torch(cfg)
    runtime.cfg = cfg
    ctx = make_context(cfg, run_dir, runtime, progress=False)
    try:
        run_stages(ctx, ["train"])
    finally:
        ctx.tracker.finish("FINISHED")


def _accumulation_check(runtime, cfg_path: str, out: Path) -> None:
    """ZeRO-2 with 2 accumulation steps of b images == DDP with one step of 2b (BN in eval mode: batch-independent)."""
    import torch.nn.functional as F

    from rift_dist.config import load_config
    from rift_dist.models import build_model
    from rift_dist.parallel import parallelize

    results = {}
    g = torch.Generator().manual_seed(7 + runtime.rank)
    x = torch.rand(16, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    for name, overrides in (("ddp", []), ("ga2", ["distributed.engine=deepspeed", "distributed.zero_stage=2",
                                                  "distributed.gradient_accumulation_steps=2"])):
        runtime.cfg = load_config(cfg_path, overrides)
        torch.manual_seed(0)
        engine = parallelize(runtime, build_model(runtime.cfg), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
        engine.eval()
        for _ in range(2):  # two optimizer updates
            if name == "ddp":
                engine.step(F.cross_entropy(engine(x), y))
            else:
                for half in (slice(0, 8), slice(8, 16)):
                    engine.step(F.cross_entropy(engine(x[half]), y[half]))
        results[name] = engine.state_dict()
    if runtime.is_main:
        torch.save(results, out)


def _worker_two_ranks(rank, world, cfg_path, root):
    from rift_dist.parallel import parallelize
    from rift_dist.parallel.runtime import Runtime

    root = Path(root)
    runtime = Runtime()
    try:
        for name, overrides in SCENARIOS.items():
            _run_train(runtime, cfg_path, root / name, overrides)
        # resume ZeRO-2's checkpoint under ZeRO-1 and under DDP, for a second epoch
        if runtime.is_main:
            for name in ("resume_zero1", "resume_ddp"):
                shutil.copytree(root / "zero2" / "train" / "checkpoints", root / name / "train" / "checkpoints")
        runtime.barrier()
        _run_train(runtime, cfg_path, root / "resume_zero1", SCENARIOS["zero1"] + ["train.epochs=2"])
        _run_train(runtime, cfg_path, root / "resume_ddp", ["train.epochs=2"])
        _accumulation_check(runtime, cfg_path, root / "accumulation.pt")
    finally:
        runtime.close()


def _worker_one_process(rank, world, cfg_path, root):
    import os

    from rift_dist.parallel import parallelize

    from rift_dist.parallel.runtime import Runtime

    root = Path(root)
    runtime = Runtime()
    try:
        _run_train(runtime, cfg_path, root / "plain", [])
        _run_train(runtime, cfg_path, root / "zero2", SCENARIOS["zero2"])
    finally:
        runtime.close()
    leaked = [k for k in ("RANK", "WORLD_SIZE", "MASTER_PORT") if k in os.environ]
    (root / "leaked_env.json").write_text(json.dumps(leaked))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds2")
    spawn(_worker_two_ranks, 2, str(dist_config(tmp)), str(tmp))
    return tmp


def _history(run_dir):
    return json.loads((run_dir / "train" / "history.json").read_text())


@pytest.mark.parametrize("stage", ["zero0", "zero1", "zero2"])
def test_zero_stage_matches_ddp(two_ranks, stage):
    ref, got = latest_checkpoint(two_ranks / "ddp"), latest_checkpoint(two_ranks / stage)
    w, m = state_diff(ref["model"], got["model"]), optimizer_diff(ref["optimizer"], got["optimizer"])
    l_ref, l_got = _history(two_ranks / "ddp")[0]["train_loss"], _history(two_ranks / stage)[0]["train_loss"]
    print(f"DeepSpeed {stage} vs DDP after 2 steps: max|dW| {w:.2e}, max|d momentum| {m:.2e}, loss diff {abs(l_ref - l_got):.2e}")
    assert w <= ATOL and m <= ATOL and abs(l_ref - l_got) <= ATOL
    assert ref["optimizer"]["param_groups"][0]["lr"] == got["optimizer"]["param_groups"][0]["lr"]


def test_consolidated_state_dict_loads_strictly_into_the_plain_model(two_ranks):
    from rift_dist.config import load_config
    from rift_dist.models import build_model

    cfg = load_config(str(two_ranks / "tiny.yaml"))
    for stage in ("zero1", "zero2"):
        state = torch.load(two_ranks / stage / "train" / "model.pt", weights_only=True)
        model = build_model(cfg)
        assert list(state) == list(model.state_dict())  # same keys, same order, no "module." prefix
        assert all(v.dtype == model.state_dict()[k].dtype for k, v in state.items())
        model.load_state_dict(state, strict=True)


def test_zero_checkpoint_resumes_under_another_stage_and_ddp(two_ranks):
    a, b = latest_checkpoint(two_ranks / "resume_zero1"), latest_checkpoint(two_ranks / "resume_ddp")
    assert a["epoch"] == b["epoch"] == 2
    w, m = state_diff(a["model"], b["model"]), optimizer_diff(a["optimizer"], b["optimizer"])
    print(f"ZeRO-2 checkpoint resumed under ZeRO-1 vs DDP: max|dW| {w:.2e}, max|d momentum| {m:.2e}")
    assert w <= ATOL and m <= ATOL
    # and the second epoch really continued from the first (not from scratch)
    assert state_diff(a["model"], latest_checkpoint(two_ranks / "zero2")["model"]) > 1e-4


def test_gradient_accumulation_matches_the_larger_batch(two_ranks):
    res = torch.load(two_ranks / "accumulation.pt", weights_only=True)
    w = state_diff(res["ddp"], res["ga2"])
    print(f"ZeRO-2 with 2 accumulation steps vs DDP with the doubled batch: max|dW| {w:.2e}")
    assert w <= 1e-5


def test_deepspeed_in_one_process_without_launcher(tmp_path):
    spawn(_worker_one_process, 1, str(dist_config(tmp_path)), str(tmp_path))
    w = state_diff(latest_checkpoint(tmp_path / "plain")["model"], latest_checkpoint(tmp_path / "zero2")["model"])
    print(f"DeepSpeed ZeRO-2 in one process vs plain: max|dW| {w:.2e}")
    assert w <= ATOL
    assert json.loads((tmp_path / "leaked_env.json").read_text()) == []
