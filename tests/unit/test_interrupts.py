"""rift_dist.interrupts: the first SIGTERM / SIGINT sets the stop flag; the same signal passed on again by a
launcher (within REPEAT_WINDOW_S) is not a second request; a real second signal exits at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rift_dist import interrupts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def installed():
    assert interrupts.install()
    try:
        yield
    finally:
        interrupts.uninstall()


def test_first_signal_sets_the_flag_and_a_forwarded_repeat_is_the_same_request(installed, capsys):
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # e.g. torchrun forwarding what the process group already delivered
    os.kill(os.getpid(), signal.SIGINT)
    assert interrupts.requested() == signal.SIGTERM  # still running: none of the repeats exited
    assert capsys.readouterr().err.count("received") == 1
    with pytest.raises(interrupts.Interrupted) as info:
        interrupts.check(None, save=lambda: None, where="train epoch 1 step 2")
    assert info.value.exit_code == 143 and "train epoch 1 step 2" in str(info.value)


def test_no_signal_no_stop(installed):
    saved = []
    interrupts.check(None, save=lambda: saved.append(1))
    assert saved == [] and interrupts.stop_requested() is None


def test_a_second_signal_after_the_window_exits_at_once():
    code = textwrap.dedent("""
        import os, signal, time
        from rift_dist import interrupts
        interrupts.REPEAT_WINDOW_S = 0.2
        interrupts.install()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.4)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        print("not reached")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 130, proc.stderr
    assert "not reached" not in proc.stdout and "second SIGINT" in proc.stderr
