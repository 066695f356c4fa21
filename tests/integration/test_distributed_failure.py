"""A rank that dies (SIGKILL) or hangs (SIGSTOP) makes the other exit non-zero with a clear error, not hang.

The ranks are started by hand, as srun or a scheduler would (no torchrun agent to tear the group
down): one pair with SLURM's variables, one with torchrun's.  ``distributed.timeout_s`` is 10 s.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from rift_dist.parallel.runtime import free_port
from tests.integration.distributed_helpers import DATA_MISSING, DATA_REASON, ROOT, child_env, dist_config

pytestmark = pytest.mark.skipif(DATA_MISSING, reason=DATA_REASON)

TIMEOUT_S = 10


class Rank:
    """One rank of `rift train`, its output collected by a thread."""

    def __init__(self, cfg, run_dir, env):
        cmd = [sys.executable, "-m", "rift_dist.cli", "train", str(cfg), "--run-dir", str(run_dir), "--no-progress"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.training = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if "[train] epoch 1/" in line:
                self.training.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)


def _start_pair(cfg, run_dir, launcher: str):
    port = str(free_port())
    ranks = []
    for r in (0, 1):
        if launcher == "slurm":
            env = child_env(SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NTASKS="2", SLURM_JOB_ID="1",
                            SLURM_JOB_NODELIST="localhost", MASTER_PORT=port)
        else:
            env = child_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        ranks.append(Rank(cfg, run_dir, env))
    return ranks


@pytest.mark.parametrize("how,launcher", [("kill", "slurm"), ("hang", "torchrun")])
def test_a_lost_rank_makes_the_other_fail_within_the_timeout(tmp_path, how, launcher):
    cfg = dist_config(tmp_path, train={"epochs": 500, "max_steps_per_epoch": 0}, distributed={"timeout_s": TIMEOUT_S})
    rank0, rank1 = _start_pair(cfg, tmp_path / "run", launcher)
    try:
        assert rank0.training.wait(240), f"training never started:\n{rank0.output[-3000:]}\n{rank1.output[-3000:]}"
        os.kill(rank1.proc.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        t0 = time.time()
        try:
            code = rank0.proc.wait(TIMEOUT_S + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still running {TIMEOUT_S + 60}s after rank 1 was {how}ed:\n{rank0.output[-3000:]}")
        waited = time.time() - t0
        print(f"{launcher}-style launch, rank 1 {how}ed: rank 0 exited with {code} after {waited:.1f}s; "
              f"last line: {rank0.lines[-1].strip() if rank0.lines else ''}")
        assert code != 0
        assert "DistributedError" in rank0.output and "another rank probably died or hung" in rank0.output, rank0.output[-3000:]
        if how == "hang":
            assert waited >= TIMEOUT_S * 0.8  # it really waited for the timeout, no earlier
    finally:
        for r in (rank0, rank1):
            if r.proc.poll() is None:
                r.proc.kill()
            r.proc.wait()
