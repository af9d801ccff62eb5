"""Strict config loading: every bad input is one line naming the file and key, exit 2."""
import os
import subprocess
import sys

import pytest

from hpcjobs import cli, config, units
from hpcjobs.config import ConfigError

from conftest import QUICKSTART


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_and_quickstart_load():
    cfg = config.load(QUICKSTART)
    assert cfg.name == "quickstart"
    assert cfg.data.source == "digits"
    assert cfg.training.batch_size == 32
    # defaults come from the dataclasses
    assert cfg.checkpoint.max_to_keep == config.CheckpointConfig().max_to_keep


def test_config_is_frozen():
    cfg = config.load(QUICKSTART)
    with pytest.raises(Exception):
        cfg.training.epochs = 3


@pytest.mark.parametrize("text, key, words", [
    ("trainng:\n  epochs: 3\n", "trainng", "did you mean 'training'"),
    ("training:\n  epoch: 3\n", "training.epoch", "did you mean 'epochs'"),
    ("training:\n  bogus_key: 3\n", "training.bogus_key", "unknown key"),
    ("training:\n  epochs: three\n", "training.epochs", "expected an integer"),
    ("training:\n  batch_size: -4\n", "training.batch_size", "must be >= 1"),
    ("data:\n  validation_split: 0.6\n  test_split: 0.5\n", "data.validation_split", "below 1"),
    ("optimizer:\n  name: adamw2\n", "optimizer.name", "must be one of"),
    ("training:\n  deterministic: 'yes'\n", "training.deterministic", "true or false"),
    ("training:\n  time_budget: soon\n", "training.time_budget", "not a duration"),
])
def test_bad_values_name_file_and_key(tmp_path, text, key, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    msg = str(e.value)
    assert msg.startswith(path + ": " + key + ":"), msg
    assert words in msg
    assert "\n" not in msg


def test_malformed_yaml_and_missing_file(tmp_path):
    path = write(tmp_path, "training:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="malformed YAML: line"):
        config.load(path)
    with pytest.raises(ConfigError, match="no such file"):
        config.load(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        config.load(write(tmp_path, "- a\n- b\n", "list.yaml"))


def test_safe_load_refuses_python_tags(tmp_path):
    path = write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        config.load(path)


def test_overrides_apply_and_are_checked():
    cfg = config.load(QUICKSTART, ["training.epochs=3", "data.image_size=[16, 16]", "model.weights=null"])
    assert cfg.training.epochs == 3
    assert cfg.data.image_size == (16, 16)
    with pytest.raises(ConfigError, match=r"training.epohcs: unknown key; did you mean 'epochs'"):
        config.load(QUICKSTART, ["training.epohcs=3"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        config.load(QUICKSTART, ["training.epochs"])


def test_base_config_is_overridden(tmp_path):
    base = write(tmp_path, "training:\n  epochs: 7\n  batch_size: 64\n", "base.yaml")
    child = write(tmp_path, f"base: {os.path.basename(base)}\ntraining:\n  epochs: 2\n", "child.yaml")
    cfg = config.load(child)
    assert (cfg.name, cfg.training.epochs, cfg.training.batch_size) == ("child", 2, 64)


def test_durations_and_sizes():
    assert units.parse_duration("90s") == 90
    assert units.parse_duration("15m") == 900
    assert units.parse_duration("1h") == 3600
    assert units.parse_duration("01:30:00") == 5400
    assert units.parse_duration("2-00:00:00") == 2 * 86400
    assert units.parse_bytes("512MiB") == 512 * 2**20
    assert units.parse_bytes("2GB") == 2 * 10**9
    with pytest.raises(ValueError):
        units.parse_duration("tomorrow")


def test_resolved_config_round_trips(tmp_path):
    cfg = config.load(QUICKSTART, ["training.epochs=4"])
    path = write(tmp_path, config.dump(cfg), "resolved.yaml")
    assert config.load(path) == cfg


@pytest.mark.parametrize("args", [["train", "{bad}"], ["train", "{missing}"], ["prepare", "{bad}"]])
def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, args):
    bad = write(tmp_path, "training:\n  epocs: 3\n", "bad.yaml")
    argv = [a.format(bad=bad, missing=str(tmp_path / "missing.yaml")) for a in args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hpcjobs: error: ")
    assert "Traceback" not in err


def test_cli_subprocess_no_traceback(tmp_path):
    bad = write(tmp_path, "model:\n  dropout: 2\n")
    r = subprocess.run([sys.executable, "-m", "hpcjobs", "train", bad], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == f"hpcjobs: error: {bad}: model.dropout: must be in [0, 1)"
