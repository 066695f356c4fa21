"""Progress in log files: a line per 10 % (not a line per tqdm redraw), with rate and ETA; a bar on a terminal."""

import io

from rift_dist.progress import progress


def test_log_file_gets_a_line_per_tenth_and_one_at_the_end():
    out = io.StringIO()
    assert list(progress(range(100), total=100, desc="AT epoch 1", stream=out)) == list(range(100))
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # 10 %, 20 %, ..., 90 %, then "done"
    assert lines[0].startswith("AT epoch 1: 10/100 (10%)") and "ETA" in lines[0]
    assert lines[-1].startswith("AT epoch 1: 100/100 done in")
    assert "\r" not in out.getvalue()


def test_terminal_gets_tqdm():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    bar = progress(range(3), total=3, desc="x", stream=Tty())
    from tqdm import tqdm

    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2]
