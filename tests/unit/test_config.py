"""The config tree: defaults, YAML, overrides, and clear errors."""

import pytest

from rift_dist.config import ConfigError, flatten, load_config


def test_defaults_are_the_papers():
    cfg = load_config(None)
    assert cfg.train.attack.epsilon == pytest.approx(8 / 255)
    assert cfg.train.milestones == [100, 105] and cfg.train.epochs == 110
    assert cfg.mrc.epsilon_w == 0.1 and cfg.finetune.lr == 1e-3
    assert cfg.interpolation.alphas[0] == 0.0 and cfg.interpolation.alphas[-1] == 1.0
    assert len(cfg.interpolation.alphas) == 11


def test_yaml_fractions_overrides_and_base(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 3\n  attack: {epsilon: 4/255}\n")
    f = tmp_path / "c.yaml"
    f.write_text("base: base.yaml\nmodel: {width: 8}\n")
    cfg = load_config(f, ["train.lr=0.05", "mrc.exclude=[first, last]"])
    assert cfg.train.epochs == 3 and cfg.train.attack.epsilon == pytest.approx(4 / 255)
    assert cfg.model.width == 8 and cfg.train.lr == 0.05 and cfg.mrc.exclude == ["first", "last"]
    assert flatten(cfg)["train.attack.epsilon"] == pytest.approx(4 / 255)


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*train.epoch.*epochs"):
        load_config(f)


def test_wrong_type_and_choice(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  epochs: three\n")
    with pytest.raises(ConfigError, match="train.epochs.*integer"):
        load_config(f)
    with pytest.raises(ConfigError, match="model.arch"):
        load_config(None, ["model.arch=vgg"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_all_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert len(names) >= 11
    for p in root.glob("*.yaml"):
        load_config(p)


def test_a_finished_stage_with_changed_config_names_the_keys_and_what_to_delete(tmp_path):
    from rift_dist.config import RunConfig
    from rift_dist.distributed import Runtime
    from rift_dist.precision import resolve_precision
    from rift_dist.stages.common import StageContext, StageError, read_done, write_done

    cfg = RunConfig()
    cfg.tracking.enabled = False
    for stage in ("finetune", "interpolate", "evaluate"):
        (tmp_path / stage).mkdir()
    ctx = StageContext(cfg, tmp_path, Runtime(cfg), None, resolve_precision(cfg.precision, "cpu"), progress=False)
    write_done(ctx, "finetune", {})
    assert read_done(ctx, "finetune") is not None  # same config: reused
    cfg.finetune.lr = 0.01
    with pytest.raises(StageError, match=r"changed: finetune.lr") as info:
        read_done(ctx, "finetune")
    text = str(info.value)
    for stage in ("finetune", "interpolate", "evaluate"):  # the later stages are built on it: delete them too
        assert str(tmp_path / stage) in text
    assert str(tmp_path / "train") not in text
