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


def test_base_cycle_missing_base_and_bad_base_are_config_errors(tmp_path):
    """A base: chain that loops (a file naming itself, or a -> b -> a) used to end in a RecursionError
    traceback; a missing base file was reported as if the config itself were missing."""
    me = tmp_path / "self.yaml"
    me.write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match=r"self.yaml: base: chain comes back.*self.yaml -> .*self.yaml"):
        load_config(me)
    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrain: {epochs: 2}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b.yaml: base: chain comes back.*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"c.yaml: base file .*nope.yaml not found.*relative to the file"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [a.yaml, b.yaml]\n")
    with pytest.raises(ConfigError, match=r"d.yaml: base: must be one file name"):
        load_config(tmp_path / "d.yaml")
    # a diamond is not a cycle: two files may share a base
    (tmp_path / "root.yaml").write_text("train: {epochs: 4}\n")
    (tmp_path / "mid.yaml").write_text("base: root.yaml\nmodel: {width: 8}\n")
    (tmp_path / "top.yaml").write_text("base: mid.yaml\n")
    cfg = load_config(tmp_path / "top.yaml")
    assert cfg.train.epochs == 4 and cfg.model.width == 8


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
    from rift_dist.parallel.runtime import Runtime
    from rift_dist.precision import resolve_precision
    from rift_dist.stages import StageError
    from rift_dist.stages.context import StageContext
    from rift_dist.stages.done_markers import read_done, write_done

    cfg = RunConfig()
    cfg.tracking.enabled = False
    for stage in ("finetune", "interpolate", "evaluate"):
        (tmp_path / stage).mkdir()
    ctx = StageContext(cfg, tmp_path, Runtime(cfg), None, resolve_precision(cfg.precision, "cpu"), progress=False)
    write_done(ctx, "finetune", {})
    (tmp_path / "finetune" / "model.pt").write_bytes(b"")  # a done stage has its outputs
    assert read_done(ctx, "finetune") is not None  # same config: reused
    cfg.finetune.lr = 0.01
    with pytest.raises(StageError, match=r"changed: finetune.lr") as info:
        read_done(ctx, "finetune")
    text = str(info.value)
    for stage in ("finetune", "interpolate", "evaluate"):  # the later stages are built on it: delete them too
        assert str(tmp_path / stage) in text
    assert str(tmp_path / "train") not in text


# ------------------------------------------------------------------ values as users write them; range rules

import typing  # noqa: E402

import yaml  # noqa: E402

from rift_dist.config import NONEMPTY, RANGES, RunConfig  # noqa: E402

BAD_VALUES = {  # one out-of-range value per rule of config.RANGES (lists: one bad item)
    "seed": -1,
    "compare.seeds": [0, -1], "compare.confidence": 1.0, "compare.autoattack_examples": -1,
    "train.attack.epsilon": 1.5, "train.attack.step_size": -0.01, "train.attack.num_steps": -1,
    "mrc.attack.epsilon": -8 / 255, "mrc.attack.step_size": 2.0, "mrc.attack.num_steps": -2,
    "eval.attack.epsilon": 8, "eval.attack.step_size": -1, "eval.attack.num_steps": -1,
    "data.train_subset": -5, "data.test_subset": -1, "data.val_size": -10, "data.split_seed": -1,
    "data.batch_size": 0, "data.eval_batch_size": -4, "data.num_workers": -1, "data.ffcv_jpeg_quality": 101,
    "data.severities": [1, 6], "data.corruption_subset": -1, "data.corruption_seed": -3,
    "model.width": 0, "model.widen_factor": 0, "model.mean": [0.5, 1.5, 0.5], "model.std": [0.2, 0.0, 0.2],
    "train.epochs": 0, "train.lr": 0.0, "train.momentum": 1.0, "train.weight_decay": -1e-4, "train.milestones": [-1],
    "train.gamma": 0.0, "train.beta": -1.0, "train.eval_attack_steps": -1, "train.checkpoint_every": -1,
    "train.max_steps_per_epoch": -1,
    "mrc.epsilon_w": -0.1, "mrc.p": 0.5, "mrc.num_iterations": 0, "mrc.lr": -1.0, "mrc.batch_size": 0,
    "mrc.num_examples": 0, "mrc.top_k": 0, "mrc.max_cache_bytes": -1,
    "finetune.epochs": -1, "finetune.lr": -0.001, "finetune.momentum": -0.1, "finetune.weight_decay": -1.0,
    "finetune.milestones": [3, -2], "finetune.gamma": 1.5, "finetune.max_steps_per_epoch": -2,
    "interpolation.alphas": [0.0, 1.1], "interpolation.tolerance": -0.001,
    "eval.restarts": 0, "eval.selection_attack_steps": -1, "eval.selection_restarts": 0, "eval.n_examples": -1,
    "eval.autoattack_steps": 0, "eval.autoattack_queries": 0, "eval.autoattack_seed": -1,
    "eval.extra_pgd_steps": [20, 0], "eval.margin_pgd_steps": -1, "eval.extra_restarts": 0,
    "eval.sanity_epsilons": [4 / 255, 2.0], "eval.sanity_square_margin": 1.5, "eval.sanity_tolerance": -0.1,
    "eval.sanity_examples": 0, "eval.sanity_square_queries": 0,
    "precision.threads": -1,
    "distributed.timeout_s": 0, "distributed.zero_stage": 3, "distributed.gradient_accumulation_steps": 0,
}


def _nested(key: str, value) -> dict:
    out: dict = {}
    node = out
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


def _numeric_fields(cls=RunConfig, prefix=""):
    import dataclasses

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, key + ".")
        elif tp in (int, float) or typing.get_args(tp) in ((int,), (float,)):
            yield key


def test_every_numeric_field_has_a_range_rule_and_a_bad_value_here():
    fields = set(_numeric_fields())
    assert fields - set(RANGES) == set(), "numeric fields without a range rule in config.RANGES"
    assert set(RANGES) - fields == set()
    assert set(BAD_VALUES) == set(RANGES)


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_a_value_out_of_range_is_refused_at_load_naming_key_value_and_file(tmp_path, key):
    bad = BAD_VALUES[key]
    f = tmp_path / "bad_range.yaml"
    f.write_text(yaml.safe_dump(_nested(key, bad)))
    with pytest.raises(ConfigError) as info:
        load_config(f)
    msg = str(info.value)
    shown = next(v for v in (bad if isinstance(bad, list) else [bad]) if not RANGES[key][0](v))
    assert f"'{key}'" in msg and str(f) in msg and repr(float(shown) if isinstance(shown, float) else shown) in msg
    assert "must be" in msg and f"--set {key}=" in msg  # the rule and the fix
    # the same value from --set is refused too, naming the file it was laid over
    text = yaml.safe_dump(bad, default_flow_style=True).strip()
    with pytest.raises(ConfigError, match=rf"configs/default.yaml with --set: '{key}'"):
        load_config(ROOT_CONFIGS / "default.yaml", [f"{key}={text}"])


ROOT_CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("key", NONEMPTY)
def test_an_empty_list_that_needs_an_entry_is_refused(key):
    with pytest.raises(ConfigError, match=rf"'{key}' is \[\]; it needs at least one entry"):
        load_config(None, [f"{key}=[]"])


def test_an_override_may_repair_a_bad_value_of_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: {epochs: 0}\n")
    assert load_config(f, ["train.epochs=2"]).train.epochs == 2


@pytest.mark.parametrize("written, expected", [
    ("off", "off"), ("on", "on"), ("Off", "off"), ("ON", "on"), ("true", "on"), ("false", "off"),
    ("yes", "on"), ("no", "off"), ("'off'", "off"), ("'True'", "on"), ("'FALSE'", "off"),
    ("auto", "auto"), ("'Auto'", "auto"),
])
def test_on_off_switches_accept_yaml_booleans_from_a_file_and_from_set(tmp_path, written, expected):
    f = tmp_path / "switch.yaml"
    f.write_text(f"precision:\n  channels_last: {written}\n")
    assert load_config(f).precision.channels_last == expected
    assert load_config(None, [f"precision.channels_last={written}"]).precision.channels_last == expected


def test_every_auto_on_off_field_takes_booleans():
    from rift_dist.config import CHOICES, SWITCH_KEYS

    switches = {k for k, v in CHOICES.items() if "on" in v and "off" in v}
    assert switches == set(SWITCH_KEYS) and "precision.channels_last" in switches
    for key in switches:
        section, leaf = key.split(".")
        assert getattr(getattr(load_config(None, [f"{key}=false"]), section), leaf) == "off"
    with pytest.raises(ConfigError, match=r"precision.channels_last' is 'sometimes'; write auto, on or off"):
        load_config(None, ["precision.channels_last=sometimes"])
    with pytest.raises(ConfigError, match=r"precision.channels_last' is 1"):
        load_config(None, ["precision.channels_last=1"])


def test_rift_run_with_a_bad_value_fails_before_any_run_directory_or_mlflow_work(tmp_path):
    import subprocess
    import sys

    root = ROOT_CONFIGS.parent
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "rift_dist.cli", "run", str(ROOT_CONFIGS / "default.yaml"), "--run-dir", str(run_dir),
         "--set", "data.train_subset=-5", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "--no-progress"],
        capture_output=True, text=True, cwd=root, timeout=120,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "'data.train_subset' is -5" in proc.stderr and "default.yaml" in proc.stderr
    assert not run_dir.exists() and not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_override_that_is_not_valid_yaml_is_a_config_error():
    with pytest.raises(ConfigError, match=r"override 'train.milestones=\[1, 2' is not valid YAML.*quote it"):
        load_config(None, ["train.milestones=[1, 2"])


def test_autocast_off_as_yaml_writes_it_means_none(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("precision:\n  autocast: off\n")
    assert load_config(path).precision.autocast == "none"
    assert load_config(None, ["precision.autocast=off"]).precision.autocast == "none"
    assert load_config(None, ["precision.autocast=False"]).precision.autocast == "none"


def test_a_boolean_where_a_word_is_expected_names_the_words(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("precision:\n  autocast: on\n")
    with pytest.raises(ConfigError, match=r"'precision.autocast' is True \(YAML reads .*auto, bf16, fp16, none"):
        load_config(path)
