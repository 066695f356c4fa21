"""Every error rift_dist raises on purpose derives from rift_dist.errors.RiftError (issue 12), keeps its old
built-in base, and the CLI reports any RiftError as one line with exit status 1."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import rift_dist
from rift_dist.errors import RiftError

# Exceptions that are not errors of the run: a stop request, and MLflow's internal retry marker.
NOT_RIFT_ERRORS = {"Interrupted", "_Permanent", "SlurmClusterError"}


def _package_exceptions():
    found = {}
    for info in pkgutil.walk_packages(rift_dist.__path__, "rift_dist."):
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional part (submitit, FFCV, DeepSpeed) missing on this machine
            continue
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = obj
    return found


def test_every_package_error_is_a_rift_error():
    found = _package_exceptions()
    assert "rift_dist.config.ConfigError" in found and "rift_dist.stages.StageError" in found, sorted(found)
    stray = [name for name, cls in found.items()
             if name.rsplit(".", 1)[1] not in NOT_RIFT_ERRORS and not issubclass(cls, RiftError)]
    assert not stray, f"errors not derived from RiftError: {stray}"


def test_old_builtin_bases_are_kept():
    from rift_dist.checkpoint import CheckpointError
    from rift_dist.config import ConfigError

    assert issubclass(ConfigError, ValueError) and issubclass(CheckpointError, RuntimeError)


def test_cli_reports_a_rift_error_in_one_line(monkeypatch, capsys, tmp_path):
    from types import SimpleNamespace

    from rift_dist import cli, interrupts

    class Boom(RiftError):
        pass

    def fail(*args, **kwargs):
        raise Boom("the thing is wrong; fix it like this")

    monkeypatch.setattr(cli, "_config", lambda args: SimpleNamespace(run_dir=tmp_path / "run"))
    monkeypatch.setattr("rift_dist.pipeline.run_pipeline", fail)
    try:
        rc = cli.main(["run", "configs/default.yaml", "--run-dir", str(tmp_path / "run")])
    finally:
        interrupts.uninstall()
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "rift: Boom: the thing is wrong; fix it like this" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("name", ["ConfigError", "StageError"])
def test_error_names_are_importable_from_their_modules(name):
    found = {k.rsplit(".", 1)[1]: v for k, v in _package_exceptions().items()}
    assert issubclass(found[name], RiftError)
