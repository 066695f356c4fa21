"""The command line: `rift --help` imports no heavy library; every subcommand still parses; small defaults."""

from __future__ import annotations

import subprocess
import sys

from rift_dist.cli import build_parser
from tests.conftest import PROJECT_ROOT


def test_help_imports_neither_torch_nor_submitit():
    code = ("import sys, contextlib, io\nfrom rift_dist.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try: main(['--help'])\n    except SystemExit: pass\n"
            "print('torch' in sys.modules, 'submitit' in sys.modules, 'submit' in out.getvalue())")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False", "True"], out.stderr


def test_each_subcommand_parses_with_its_own_arguments():
    assert build_parser(["report"]).parse_args(["report"]).experiment == "rift"  # default as its help says
    args = build_parser(["status", "runs/x"]).parse_args(["status", "runs/x"])
    assert args.run_dir == "runs/x"
    args = build_parser(["run", "c.yaml", "--set", "seed=1"]).parse_args(["run", "c.yaml", "--set", "seed=1"])
    assert args.overrides == ["seed=1"]
    assert build_parser(["data", "verify", "x.beton"]).parse_args(["data", "verify", "x.beton"]).files == ["x.beton"]


def test_nproc_below_one_is_refused(capsys):
    """--nproc 0 / -1 ran one process without a word; the parser now refuses them (before any work)."""
    import pytest

    for bad in ("0", "-1"):
        with pytest.raises(SystemExit) as info:
            build_parser(["run"]).parse_args(["run", "c.yaml", "--nproc", bad])
        assert info.value.code == 2 and "give N >= 1" in capsys.readouterr().err
    assert build_parser(["run"]).parse_args(["run", "c.yaml", "--nproc", "2"]).nproc == 2
    assert build_parser(["run"]).parse_args(["run", "c.yaml"]).nproc == 0  # left out: this process


def test_rift_warnings_are_one_line_without_the_source_line():
    import rift_dist.pipeline as pipeline_module
    from rift_dist.cli import format_warning

    text = format_warning(UserWarning("MLflow tracking is off for this run"), UserWarning, pipeline_module.__file__, 57,
                          "    tracker = Tracker(cfg, run_dir)")
    assert text == "rift: warning: MLflow tracking is off for this run\n"
    other = format_warning(UserWarning("x"), UserWarning, "/elsewhere/lib.py", 3, "warn()")
    assert "/elsewhere/lib.py:3" in other  # other libraries' warnings keep Python's format
    deprecation = format_warning(DeprecationWarning("old"), DeprecationWarning, pipeline_module.__file__, 1, "")
    assert "DeprecationWarning" in deprecation


def test_status_and_cancel_explain_run_dir():
    for cmd in ("status", "cancel"):
        text = build_parser([cmd]).format_help()
        sub = next(a for a in build_parser([cmd])._subparsers._group_actions[0].choices.items() if a[0] == cmd)[1]
        assert "run directory" in sub.format_help(), cmd
        assert text
