"""Checkpoints: atomic writes, weights_only loading, fallback past a corrupt newest file."""

import pickle

import pytest
import torch

from rift_dist.checkpoint import CheckpointError, CheckpointManager, load, save_atomic


def test_atomic_save_and_load(tmp_path):
    p = save_atomic({"w": torch.ones(3), "epoch": 2}, tmp_path / "a" / "x.pt")
    assert load(p)["epoch"] == 2
    assert [f.name for f in p.parent.iterdir()] == ["x.pt"]  # no temporary left behind


def test_truncated_file_is_a_clear_error(tmp_path):
    p = save_atomic({"w": torch.ones(1000)}, tmp_path / "x.pt")
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load(p)
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "missing.pt")


def test_random_bytes_are_corrupt_not_code(tmp_path):
    """Random bytes fail inside torch's weights-only unpickler too; they must not be sold as 'needs code'."""
    p = tmp_path / "noise.pt"
    p.write_bytes(torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load(p)
    assert "weights_only=False" not in str(info.value)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"obj": Evil()}, p)
    with pytest.raises(CheckpointError, match="arbitrary Python code"):
        load(p)


def test_manager_falls_back_to_previous_good(tmp_path):
    m = CheckpointManager(tmp_path, keep=2)
    m.save({"step": 1}, 1)
    m.save({"step": 2}, 2)
    m.save({"step": 3}, 3)
    assert [p.name for p in m.paths()] == ["ckpt-000000003.pt", "ckpt-000000002.pt"]
    m.paths()[0].write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="falling back"):
        assert m.load_latest()["step"] == 2
    for p in m.paths():
        p.write_bytes(b"garbage")
    with pytest.warns(UserWarning):
        with pytest.raises(CheckpointError, match="every checkpoint"):
            m.load_latest()
    assert CheckpointManager(tmp_path / "none").load_latest() is None
