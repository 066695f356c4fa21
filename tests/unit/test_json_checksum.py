"""JSON artefacts carry a sha256 written with them (issue 13): a flipped byte that still parses is found, a
resumable piece with one is computed again, a done marker with one makes its stage run again."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from rift_dist.atomic import CHECKSUM_KEY, CorruptFileError, read_json, read_json_piece, write_json


def _flip_digit(path):
    text = path.read_text()
    i = next(i for i, ch in enumerate(text) if ch == "7")
    path.write_text(text[:i] + "8" + text[i + 1:])  # still valid JSON, same size


def test_round_trip_strips_the_checksum_and_keeps_values(tmp_path):
    data = {"alpha": 0.7, "clean_accuracy": 0.1234567, "n": 1000, "path": tmp_path, "rows": [1, 2.5, None]}
    path = write_json(tmp_path / "a.json", data)
    raw = json.loads(path.read_text())
    assert len(raw[CHECKSUM_KEY]) == 64
    assert read_json(path) == {**data, "path": str(tmp_path)}


def test_a_flipped_digit_is_a_corrupt_file_naming_the_path_and_the_fix(tmp_path):
    path = write_json(tmp_path / "alpha-0.7000.json", {"alpha": 0.7, "clean_accuracy": 0.37})
    _flip_digit(path)
    json.loads(path.read_text())  # still parses: only the checksum can tell
    with pytest.raises(CorruptFileError) as info:
        read_json(path)
    assert str(path) in str(info.value) and "checksum" in str(info.value) and "re-run" in str(info.value)


def test_truncated_json_is_corrupt_and_a_piece_is_computed_again(tmp_path, capsys):
    path = write_json(tmp_path / "m.json", {"module": "layer1.0.conv1", "mrc": 0.25})
    path.write_text(path.read_text()[:20])
    with pytest.raises(CorruptFileError):
        read_json(path)
    assert read_json_piece(path) is None
    err = capsys.readouterr().err
    assert f"{path}: corrupt (not valid JSON" in err and "computed again" in err
    assert "Delete it" not in err and "re-run" not in err  # it is being recomputed: no instruction to the user
    assert read_json_piece(tmp_path / "missing.json") is None


def test_files_without_a_checksum_are_read_as_they_are(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps({"alpha": 0.5}))
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    assert read_json(tmp_path / "old.json") == {"alpha": 0.5}
    write_json(tmp_path / "history.json", [{"epoch": 1}])  # lists are written without one
    assert read_json(tmp_path / "history.json") == [{"epoch": 1}]


def test_a_corrupt_done_marker_reruns_its_stage(tmp_path, capsys):
    from rift_dist.config import load_config
    from rift_dist.stages.done_markers import read_done, stage_signature

    cfg = load_config(None, ["model.width=4"])
    write_json(tmp_path / "mrc" / "done.json", {"outputs": {"rows": 21}, "signature": stage_signature(cfg, "mrc")})
    (tmp_path / "mrc.csv").write_text("module,mrc\n")
    (tmp_path / "mrc" / "mrc.json").write_text("{}")
    ctx = SimpleNamespace(cfg=cfg, run_dir=tmp_path)
    assert read_done(ctx, "mrc")["outputs"] == {"rows": 21}
    marker = tmp_path / "mrc" / "done.json"
    marker.write_text(marker.read_text().replace('"rows": 21', '"rows": 27'))
    assert read_done(ctx, "mrc") is None
    assert "is corrupt" in capsys.readouterr().err


def test_a_done_stage_whose_table_was_deleted_is_run_again_and_said_once(tmp_path, capsys):
    """A done marker alone does not make a stage done: its essential outputs (the files later stages read and
    its headline table) must be there; a deleted mrc.csv reruns MRC (which rebuilds it from its module pieces)."""
    from rift_dist.config import load_config
    from rift_dist.stages.done_markers import essential_outputs, read_done, stage_signature

    assert essential_outputs("mrc") == ["mrc.csv", "mrc/mrc.json"]
    assert essential_outputs("evaluate") == ["summary.json", "summary.md"]
    cfg = load_config(None, ["model.width=4"])
    write_json(tmp_path / "mrc" / "done.json", {"outputs": {}, "signature": stage_signature(cfg, "mrc")})
    (tmp_path / "mrc" / "mrc.json").write_text("{}")
    ctx = SimpleNamespace(cfg=cfg, run_dir=tmp_path)
    assert read_done(ctx, "mrc") is None and read_done(ctx, "mrc") is None
    err = capsys.readouterr().err
    assert err.count("is marked done but mrc.csv is missing; stage 'mrc' is run again") == 1, err
    (tmp_path / "mrc.csv").write_text("module,mrc\n")
    assert read_done(ctx, "mrc") is not None
