"""Strict config loading: every bad input is one line naming the file and key, exit 2."""
import os
import subprocess
import sys

import pytest

from hpcjobs import cli, config, units
from hpcjobs.config import loader as config_load
from hpcjobs.config import ConfigError

from conftest import QUICKSTART

pytestmark = pytest.mark.tf214  # also run on TensorFlow 2.14 + Keras 2 (tests/tf214.sh)


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


# --------------------------------------------------------------------------- hostile configs (issue 17)
def _one_line_exit_2(capsys, argv):
    assert cli.main(argv) == 2
    out = capsys.readouterr()
    err = out.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hpcjobs: error: "), out
    assert "Traceback" not in out.err + out.out
    return err


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path, capsys):
    path = write(tmp_path, "training:\n  batch_size: 16\nmodel:\n  dropout: 0.1\ntraining:\n  epochs: 2\n")
    err = _one_line_exit_2(capsys, ["prepare", path])
    assert f"{path}: training: duplicate key (line 1 and again line 5)" in err
    nested = write(tmp_path, "training:\n  epochs: 2\n  seed: 1\n  epochs: 3\n", "nested.yaml")
    with pytest.raises(ConfigError, match=r"training.epochs: duplicate key \(line 2 and again line 4\)"):
        config.load(nested)
    # a YAML merge key is not a duplicate, and safe_load's meaning is kept
    assert config_load.parse_yaml("a: &x {b: 1, c: 2}\nd: {<<: *x, c: 3}\n") == {"a": {"b": 1, "c": 2},
                                                                              "d": {"b": 1, "c": 3}}


def test_deep_nesting_is_one_line_not_a_recursion_error(tmp_path, capsys):
    path = write(tmp_path, "training:\n  batch_size: " + "[" * 20000 + "]" * 20000 + "\n")
    err = _one_line_exit_2(capsys, ["prepare", path])
    assert "nested deeper than" in err
    err = _one_line_exit_2(capsys, ["prepare", QUICKSTART, "--set", "data.image_size=" + "[" * 5000])
    assert "--set: data.image_size: line 1: nested deeper than" in err


def _bomb(levels=9, width=9):
    lines = ["a0: &a0 {k: x}"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} {{" + ", ".join(f"k{j}: *a{i - 1}" for j in range(width)) + "}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("through_base", [False, True])
def test_alias_bomb_hits_the_same_limit_with_and_without_base(tmp_path, capsys, through_base):
    import time

    write(tmp_path, _bomb(), "bomb.yaml")
    path = write(tmp_path, ("base: bomb.yaml\n" if through_base else "") + _bomb(), "child.yaml")
    start = time.monotonic()
    err = _one_line_exit_2(capsys, ["prepare", path])
    assert time.monotonic() - start < 5
    assert f"{path}: more than 100,000 values once aliases are expanded" in err
    # a base that is the bomb is refused naming the base
    child = write(tmp_path, "base: bomb.yaml\ntraining: {epochs: 1}\n", "small.yaml")
    with pytest.raises(ConfigError, match=r"bomb.yaml: more than 100,000 values"):
        config.load(child)


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="an alias refers to its own anchor"):
        config.load(write(tmp_path, "slurm:\n  modules: &m [a, *m]\n"))


def _float_keys(cls=None, prefix=""):
    """Every float field of the schema, as a key path (tuples of floats have none)."""
    import dataclasses
    import typing

    keys = []
    for f in dataclasses.fields(cls or config.Config):
        tp = typing.get_type_hints(cls or config.Config)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _float_keys(tp, f"{prefix}{f.name}.")
        elif tp is float or (typing.get_origin(tp) in (typing.Union, __import__("types").UnionType)
                             and float in typing.get_args(tp)):
            keys.append(prefix + f.name)
    return keys


def test_every_float_field_is_found():
    keys = _float_keys()
    assert "optimizer.learning_rate" in keys and "checkpoint.every_minutes" in keys and len(keys) >= 14


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999", "1" + "0" * 400])
def test_non_finite_floats_are_refused_at_load(tmp_path, key, value):
    section, _, name = key.rpartition(".")
    text = "".join(f"{'  ' * i}{part}:\n" for i, part in enumerate(section.split("."))) if section else ""
    text += f"{'  ' * (section.count('.') + 1 if section else 0)}{name}: {value}\n"
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, text))
    assert f": {key}: must be a finite number" in str(e.value)


@pytest.mark.parametrize("override, words", [
    ("data.seed=-5", "data.seed: must be from 0 to 4294967295"),
    ("training.seed=4294967296", "training.seed: must be from 0 to 4294967295"),
    ("training.epochs=100000000000000000000", "training.epochs: 100000000000000000000 is out of range"),
    ("model.arch=__class__", "model.arch: unknown architecture '__class__'"),
    ("model.arch=os.system", "model.arch: unknown architecture 'os.system'"),
    ("model.arch=resnet50", "model.arch: unknown architecture 'resnet50'"),
    ("model.arch=ResNet5O", "did you mean 'ResNet50'"),
    ("model.arch=simple_cnm", "did you mean 'simple_cnn'"),
    ("model.weights=w.h5", "model.weights: a keras.applications weights file, but simple_cnn is built in"),
    ("model.freeze_backbone=true", "model.freeze_backbone: simple_cnn has no pretrained backbone"),
    ("data.augment.zoom=1", "data.augment.zoom: must be in [0, 0.99]"),
    ("data.image_size=[100000, 100000]", "data.image_size: must be [height, width], each from 1 to 8192"),
    ("optimizer.momentum=0.9", "optimizer.momentum: adam has no momentum"),
    ("optimizer.schedule.decay_rate=0", "optimizer.schedule.decay_rate: must be > 0"),
    ("distribute.logical_cpu_devices=-1", "distribute.logical_cpu_devices: must be from 0 to 64"),
    ("training.early_stopping.min_delta=-1", "training.early_stopping.min_delta: must be >= 0"),
])
def test_impossible_values_are_refused(capsys, override, words):
    err = _one_line_exit_2(capsys, ["prepare", QUICKSTART, "--set", override])
    assert words in err, err


@pytest.mark.parametrize("sets, words", [
    (["data.validation_split=0", "training.early_stopping.patience=3"],
     "training.early_stopping.monitor: val_loss needs a validation split, but data.validation_split is 0"),
    (["model.arch=MobileNetV2", "model.freeze_backbone=true"],
     "model.freeze_backbone: MobileNetV2's backbone would stay random"),
    (["data.source=x.npz", "data.store=./x.npz"], "data.store: the same path as data.source"),
])
def test_settings_that_other_sections_make_impossible(capsys, sets, words):
    argv = ["prepare", QUICKSTART]
    for s in sets:
        argv += ["--set", s]
    err = _one_line_exit_2(capsys, argv)
    assert words in err, err


def test_what_the_cross_checks_still_allow():
    # early stopping off, or on a training metric, needs no validation split
    config.load(QUICKSTART, ["data.validation_split=0"])
    config.load(QUICKSTART, ["data.validation_split=0", "training.early_stopping.patience=2",
                             "training.early_stopping.monitor=loss"])
    config.load(QUICKSTART, ["model.arch=ResNet50", "model.weights=w.h5", "model.freeze_backbone=true"])
    config.load(QUICKSTART, ["model.arch=small_resnet", "model.init_from=runs/x", "model.freeze_backbone=true"])
    config.load(QUICKSTART, ["optimizer.name=sgd", "optimizer.momentum=0.9", "optimizer.nesterov=true"])


def test_model_names_are_checked_without_importing_tensorflow(tmp_path):
    code = ("import sys; from hpcjobs import config\n"
            "config.load(sys.argv[1], ['model.arch=MobileNetV2'])\n"
            "try:\n    config.load(sys.argv[1], ['model.arch=MobileNetV9'])\nexcept config.ConfigError as e:\n"
            "    print(e)\n"
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code, QUICKSTART], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert "model.arch: unknown architecture 'MobileNetV9'; did you mean 'MobileNetV2'?" in r.stdout
    assert r.stdout.strip().endswith("False False")
