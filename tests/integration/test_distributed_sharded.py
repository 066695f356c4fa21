"""Work split over 2 gloo ranks gives exactly the one-process result: the MRC table and sharded evaluation."""

import csv
import json
from pathlib import Path

import pytest
import torch

from tests.integration.distributed_helpers import DATA_MISSING, DATA_REASON, dist_config, spawn

pytestmark = pytest.mark.skipif(DATA_MISSING, reason=DATA_REASON)

N_EVAL = 101  # uneven: shards of 51 and 50, batches of 20 (last ones 11 and 10)


def _worker(rank, world, cfg_path, root):
    """Run the MRC stage (counting every module computed) and a sharded PGD evaluation on ``world`` ranks."""
    from rift_dist.config import AttackConfig, load_config
    from rift_dist.data.loaders import get_dataset
    from rift_dist.parallel import parallelize
    from rift_dist.parallel.runtime import Runtime
    from rift_dist.pipeline import configure_torch, make_context, run_stages
    from rift_dist.stages import criticality
    from rift_dist.eval.protocol import evaluate_model
    from rift_dist.stages.context import new_model

    run_dir = Path(root) / f"world{world}"
    computed = []
    original = criticality.module_criticality

    def counting(model, name, *args, **kwargs):
        computed.append(name)
        return original(model, name, *args, **kwargs)

    criticality.module_criticality = counting
    cfg = load_config(cfg_path, ["data.eval_batch_size=20", "mrc.num_examples=48"])
    cfg.run_dir = str(run_dir)
    configure_torch(cfg)
    with Runtime(cfg) as runtime:
        ctx = make_context(cfg, run_dir, runtime, progress=False)
        run_stages(ctx, ["mrc"])
        (run_dir / f"computed_rank{rank}.json").write_text(json.dumps(computed))
        model = new_model(ctx, torch.load(run_dir / "train" / "model.pt", weights_only=True))
        data = get_dataset(cfg, "val").subset(range(N_EVAL))
        result = evaluate_model(ctx, model, data, AttackConfig(8 / 255, 2 / 255, 2, True), restarts=2, seed=5)
        if runtime.is_main:
            (run_dir / "eval.json").write_text(json.dumps(result))
        _buffer_sync(runtime, cfg, run_dir / f"buffers_rank{rank}.pt")


def _buffer_sync(runtime, cfg, out):
    """Without SyncBN, each rank's BN statistics follow its own batches; Engine.sync_buffers averages them."""
    import torch.nn.functional as F

    from rift_dist.models import build_model
    from rift_dist.parallel import parallelize

    cfg.distributed.sync_bn = False
    torch.manual_seed(0)
    engine = parallelize(runtime, build_model(cfg), lambda p: torch.optim.SGD(p, lr=0.1))
    g = torch.Generator().manual_seed(100 + runtime.rank)
    x, y = torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    engine.train()
    engine.step(F.cross_entropy(engine(x), y))
    before = {k: v.clone() for k, v in engine.module.state_dict().items() if "running" in k}
    engine.sync_buffers()
    after = {k: v.clone() for k, v in engine.module.state_dict().items() if "running" in k}
    torch.save({"before": before, "after": after}, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from rift_dist.config import load_config
    from rift_dist.models import build_model

    tmp = tmp_path_factory.mktemp("sharded")
    cfg_path = dist_config(tmp, data={"val_size": N_EVAL})
    torch.manual_seed(3)
    model = build_model(load_config(str(cfg_path)))
    with torch.no_grad():  # non-trivial BN statistics, so eval-mode outputs depend on them
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    for world in (1, 2):
        (tmp / f"world{world}" / "train").mkdir(parents=True)
        torch.save(model.state_dict(), tmp / f"world{world}" / "train" / "model.pt")
    for world in (1, 2):
        spawn(_worker, world, str(cfg_path), str(tmp))
    return tmp


def test_mrc_table_is_the_one_process_table(runs):
    one, two = (runs / "world1" / "mrc.csv").read_text(), (runs / "world2" / "mrc.csv").read_text()
    assert one == two  # byte for byte: same values, same order
    rows = list(csv.DictReader(one.splitlines()))
    assert len(rows) == 21
    j1, j2 = (json.loads((runs / w / "mrc" / "mrc.json").read_text()) for w in ("world1", "world2"))
    assert j1["chosen"] == j2["chosen"]
    assert [len(g) for g in j2["assignment"]] and all(j2["assignment"])
    a1 = torch.load(runs / "world1" / "mrc" / "adversarial_set.pt", weights_only=True)
    a2 = torch.load(runs / "world2" / "mrc" / "adversarial_set.pt", weights_only=True)
    assert torch.equal(a1["images"], a2["images"]) and torch.equal(a1["labels"], a2["labels"])


def test_every_module_is_computed_exactly_once(runs):
    names = [r["module"] for r in csv.DictReader((runs / "world1" / "mrc.csv").read_text().splitlines())]
    one = json.loads((runs / "world1" / "computed_rank0.json").read_text())
    per_rank = [json.loads((runs / "world2" / f"computed_rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(one) == sorted(names) and len(one) == 21
    assert all(per_rank), "both ranks must get work"
    assert sorted(per_rank[0] + per_rank[1]) == sorted(names)  # each module once, on exactly one rank
    assignment = json.loads((runs / "world2" / "mrc" / "mrc.json").read_text())["assignment"]
    assert per_rank == assignment
    assert len(list((runs / "world2" / "mrc" / "modules").glob("*.json"))) == 21


def test_sharded_evaluation_equals_one_process_exactly(runs):
    one = json.loads((runs / "world1" / "eval.json").read_text())
    two = json.loads((runs / "world2" / "eval.json").read_text())
    print(f"sharded evaluation, {N_EVAL} images: 1 rank {one}, 2 ranks {two}")
    assert one == two
    assert one["num_examples"] == N_EVAL


def test_bn_statistics_are_averaged_over_ranks_without_sync_bn(runs):
    r0, r1 = (torch.load(runs / "world2" / f"buffers_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert any(not torch.equal(r0["before"][k], r1["before"][k]) for k in r0["before"])
    for k in r0["after"]:
        assert torch.equal(r0["after"][k], r1["after"][k])
        assert torch.allclose(r0["after"][k], (r0["before"][k] + r1["before"][k]) / 2)
    one = torch.load(runs / "world1" / "buffers_rank0.pt", weights_only=True)
    assert all(torch.equal(one["before"][k], one["after"][k]) for k in one["before"])  # a no-op in one process
