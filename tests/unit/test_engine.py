"""The engine protocol in one process (rift_dist.parallel): parallelize picks the engine, and save / resume /
gather_state / save_weights carry the whole resumable state (the multi-rank and DeepSpeed cases are in
tests/integration/test_distributed_*.py and test_resume.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rift_dist import checkpoint
from rift_dist.config import from_dict
from rift_dist.parallel import parallelize
from rift_dist.parallel.engine import Engine
from rift_dist.parallel.runtime import DistributedError, Runtime


def _engine(cfg) -> Engine:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    return parallelize(Runtime(cfg, environ={}), model, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))


def _steps(engine: Engine, n: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.rand(8, 3, 2, 2, generator=g), torch.randint(0, 3, (8,), generator=g)
        engine.step(F.cross_entropy(engine(x), y))


def test_parallelize_in_one_process_is_the_plain_engine_and_refuses_unknown_engines():
    cfg = from_dict({"device": "cpu"})
    engine = _engine(cfg)
    assert type(engine) is Engine and engine.wrapped is engine.module
    cfg.distributed.engine = "horovod"
    with pytest.raises(DistributedError, match="distributed.engine"):
        _engine(cfg)


def test_save_then_resume_continues_bitwise(tmp_path):
    cfg = from_dict({"device": "cpu"})
    reference = _engine(cfg)
    _steps(reference, 4)
    first = _engine(cfg)
    _steps(first, 2)
    manager = checkpoint.CheckpointManager(tmp_path / "checkpoints")
    first.save(manager, 7, epoch=1, history=[{"loss": 1.0}])
    state = manager.load_latest()
    assert list(state)[:4] == ["model", "optimizer", "epoch", "history"] and state["epoch"] == 1
    second = _engine(cfg)
    second.resume(state)
    assert all(torch.equal(a, b) for a, b in zip(second.gather_state()["model"].values(),
                                                 first.gather_state()["model"].values()))
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # the reference's first two batches, already seen before the checkpoint
        torch.rand(8, 3, 2, 2, generator=g), torch.randint(0, 3, (8,), generator=g)
    for _ in range(2):
        x, y = torch.rand(8, 3, 2, 2, generator=g), torch.randint(0, 3, (8,), generator=g)
        second.step(F.cross_entropy(second(x), y))
    assert all(torch.equal(a, b) for a, b in zip(second.state_dict().values(), reference.state_dict().values()))


def test_save_weights_writes_the_consolidated_state_dict(tmp_path):
    engine = _engine(from_dict({"device": "cpu"}))
    engine.save_weights(tmp_path / "best.pt")
    saved = checkpoint.load(tmp_path / "best.pt")
    assert saved.keys() == engine.module.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in engine.module.state_dict().items())
