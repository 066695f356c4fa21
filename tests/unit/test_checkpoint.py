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


def test_flipped_bytes_same_size_are_corrupt_and_skipped(tmp_path):
    """64 flipped bytes inside a tensor record keep the size and unpickle fine; the CRC-32 catches them."""
    m = CheckpointManager(tmp_path, keep=2)
    m.save({"w": torch.zeros(10_000), "step": 1}, 1)
    newest = m.save({"w": torch.ones(10_000), "step": 2}, 2)
    data = bytearray(newest.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    newest.write_bytes(bytes(data))
    assert newest.stat().st_size == len(data)
    torch.load(newest, weights_only=True)  # torch alone would take it
    with pytest.raises(CheckpointError, match="CRC-32"):
        load(newest)
    with pytest.warns(UserWarning, match="falling back"):
        assert m.load_latest()["step"] == 1


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    import os
    import subprocess

    from rift_dist.atomic import host_field as _host, remove_stale_temporaries

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".ckpt-000000004.pt.{_host()}.{dead.pid}.abc123.tmp"
    live = tmp_path / f".ckpt-000000004.pt.{_host()}.{os.getppid()}.def456.tmp"
    other_host = tmp_path / f".ckpt-000000004.pt.elsewhere-node.{dead.pid}.ghi789.tmp"
    for p in (stale, live, other_host):
        p.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other_host.exists()
    (tmp_path / "checkpoints").mkdir()
    stale2 = tmp_path / "checkpoints" / stale.name
    stale2.write_bytes(b"partial")
    CheckpointManager(tmp_path / "checkpoints")
    assert not stale2.exists()


def test_full_disk_is_one_clear_error_and_keeps_the_previous_file(tmp_path):
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        m = CheckpointManager(mnt / "ckpt")
        m.save({"w": torch.zeros(1000), "step": 1}, 1)
        with pytest.raises(CheckpointError) as info:
            m.save({"w": torch.zeros(1_000_000), "step": 2}, 2)  # 4 MB on a 1 MB disk
        msg = str(info.value)
        assert "disk full" in msg and str(mnt / "ckpt") in msg and "3.8 MiB" in msg and "--run-dir" in msg
        assert info.value.__cause__ is None and info.value.__suppress_context__
        assert m.load_latest()["step"] == 1
        assert [p.name for p in (mnt / "ckpt").iterdir()] == ["ckpt-000000001.pt"]  # no temporary left
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_checkpoint_numbers_encode_and_decode_in_one_place():
    from rift_dist.checkpoint_ids import STEPS_PER_EPOCH, checkpoint_id, checkpoint_name, checkpoint_position

    assert checkpoint_id(2, 5) == 2 * STEPS_PER_EPOCH + 5 and checkpoint_position(checkpoint_id(2, 5)) == (2, 5)
    assert checkpoint_name(checkpoint_id(1)) == "ckpt-001000000.pt"
    assert sorted([checkpoint_id(1, 7), checkpoint_id(2, 0), checkpoint_id(1, 0)]) == [
        checkpoint_id(1, 0), checkpoint_id(1, 7), checkpoint_id(2, 0)]  # the newest sorts last
    with pytest.raises(ValueError):
        checkpoint_id(1, STEPS_PER_EPOCH)


def test_a_killed_json_writes_temporary_is_removed_at_the_next_start(tmp_path):
    """atomic_write_bytes' temporaries carry host and PID like the checkpoints'; open_run's sweep of the run
    directory removes a dead writer's anywhere below it (one was left in mrc/modules/ by a SIGKILL in the chaos
    test and never removed) and keeps a live writer's."""
    import os
    import subprocess

    from rift_dist.atomic import atomic_write_text, host_field, remove_stale_temporaries

    dead = subprocess.Popen(["true"])
    dead.wait()
    pieces = tmp_path / "mrc" / "modules"
    atomic_write_text(pieces / "conv1.json", "{}")
    assert [p.name for p in pieces.iterdir()] == ["conv1.json"]  # the temporary was renamed away
    stale = pieces / f".layer3.1.conv1.json.{host_field()}.{dead.pid}.k2j4.tmp"
    live = pieces / f".linear.json.{host_field()}.{os.getppid()}.x9y8.tmp"
    for p in (stale, live):
        p.write_text("{")
    assert remove_stale_temporaries(tmp_path) == []  # not recursive: only the folder itself
    assert remove_stale_temporaries(tmp_path, recursive=True) == [stale]
    assert live.exists()
