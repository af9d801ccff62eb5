"""The user's own code from the config (issue 24): a model file with a custom registered
layer (model.arch: nets.py:build, logits), a hook whose state counts the steps
(training.hooks), a data loader (data.source: file.py:load); the code copied into
RUN/code/ and checked on resume; the bundle that carries it, refused without
--trust-code; and each bad plugin as one line, exit 2, naming the key."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from hpcjobs import cli, config

from conftest import QUICKSTART, REPO

NETS = '''
import keras


@keras.saving.register_keras_serializable(package="test_plugins")
class Gain(keras.layers.Layer):
    """A custom layer: one trainable scalar gain times a fixed factor."""

    def __init__(self, factor=1.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def build(self, input_shape):
        self.gain = self.add_weight(shape=(), initializer="ones", name="gain")

    def call(self, x):
        return x * self.gain * self.factor

    def get_config(self):
        return dict(super().get_config(), factor=self.factor)


def build(input_shape, num_classes, width=8, factor=1.0):
    L = keras.layers
    inputs = keras.Input(shape=input_shape)
    x = L.Conv2D(width, 3, activation="relu", name="conv")(inputs)
    x = Gain(factor, name="gain")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dropout(0.2, name="dropout")(x)
    return keras.Model(inputs, L.Dense(num_classes, name="logits")(x), name="tiny")


def wrong_shape(input_shape, num_classes):
    inputs = keras.Input(shape=input_shape)
    return keras.Model(inputs, keras.layers.Dense(num_classes + 1)(keras.layers.Flatten()(inputs)))


def raises(input_shape, num_classes):
    raise RuntimeError("no GPU named gpu:7")
'''

HOOKS = '''
class CountSteps:
    """Counts the steps trained, in a variable that the checkpoint holds."""

    def __init__(self, start=0):
        self.start = start

    def setup(self, trainer):
        tf = trainer.tf
        self.count = tf.Variable(self.start, dtype=tf.int64, trainable=False, name="count")
        return {"count": self.count}

    def begin(self, loop):
        self.last = loop.step

    def after_steps(self, loop, step, sums, seconds):
        self.count.assign_add(step - self.last)
        self.last = step

    def summary(self, loop):
        return {"count_steps": int(self.count.numpy())}
'''

DATA = '''
import numpy as np
from sklearn.datasets import load_digits


def load():
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return images, d.target, [f"digit{i}" for i in range(10)]


def floats():
    return np.zeros((20, 8, 8), np.float32), np.zeros(20, np.int64), ["a", "b"]


def paths():
    """Image files this loader writes beside itself, 6 per class."""
    import os

    from PIL import Image

    d = load_digits()
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "images")
    os.makedirs(folder, exist_ok=True)
    files, labels = [], []
    for i in range(60):
        path = os.path.join(folder, f"{i}.png")
        Image.fromarray(np.round(d.images[i] * (255 / 16)).astype(np.uint8)).save(path)
        files.append(path)
        labels.append(int(d.target[i]))
    return files, labels, [str(c) for c in range(10)]
'''

# Deterministic, small: 3 epochs of 8 steps of 64 images, with the focal loss (logits in,
# the softmax hpcjobs adds, focal on its probabilities).
CONFIG = {
    "base": QUICKSTART,
    "model": {"arch": "nets.py:build", "options": {"width": 8, "factor": 0.5}, "outputs": "logits"},
    "training": {"epochs": 3, "steps_per_epoch": 8, "steps_per_call": 4, "batch_size": 64,
                 "deterministic": True, "hooks": ["hooks.py:CountSteps"], "loss": "focal"},
    "checkpoint": {"every_minutes": None},
}


def project(folder, config=None, nets=NETS):
    """A user's folder: nets.py, hooks.py, my_data.py and the config naming them (by relative path)."""
    os.makedirs(folder, exist_ok=True)
    for name, text in (("nets.py", nets), ("hooks.py", HOOKS), ("my_data.py", DATA)):
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    path = os.path.join(folder, "plugged.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config or CONFIG, f)
    return path


def train(config_path, run, *args):
    return cli.main(["train", config_path, "--run-dir", str(run), *args])


def record(run):
    return json.loads((run / "run.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run trained whole and cut into sessions by --time-budget (the user's files in
    another folder).  1 s is less than the stop's own margin (1.5 saves, 3 calls and 1 s), and a
    session always trains the call it voted to stop in: so every session stops by its budget
    after exactly one call (of 4 steps), on a machine of any speed."""
    base = tmp_path_factory.mktemp("plugins")
    config_path = project(str(base / "project"))
    whole, parts = base / "whole", base / "parts"
    assert train(config_path, whole) == 0
    codes = [train(config_path, parts, "--time-budget", "1s") for _ in range(6)]
    return dict(base=base, config=config_path, whole=whole, parts=parts, codes=codes)


@pytest.mark.tf214
def test_sessions_end_bitwise_equal_to_the_whole_run_hook_state_included(runs):
    codes, whole, parts = runs["codes"], record(runs["whole"]), record(runs["parts"])
    assert codes == [75] * 5 + [0], codes
    assert [s["stopped_by"] for s in parts["sessions"]] == ["time_budget"] * 5 + ["finished"]
    assert [s["end_step"] for s in parts["sessions"]] == [4, 8, 12, 16, 20, 24]
    assert parts["weights_sha256"] == whole["weights_sha256"]
    assert parts["test_accuracy"] == whole["test_accuracy"]
    # the hook's counter went through every checkpoint: a counter started again at each
    # session would hold only the last session's steps
    assert whole["count_steps"] == whole["total_steps"] == 24
    assert parts["count_steps"] == whole["count_steps"]


def test_the_code_is_copied_into_the_run_with_its_sha256(runs):
    run = runs["parts"]
    entries = {e["key"]: e for e in record(run)["code"]}
    assert set(entries) == {"model.arch", "training.hooks[0]"}
    for key, name in (("model.arch", "nets.py"), ("training.hooks[0]", "hooks.py")):
        e = entries[key]
        assert e["copy"] == f"code/{name}"
        assert e["source"] == os.path.join(os.path.dirname(runs["config"]), name)
        from hpcjobs.digest import file_digest

        assert e["sha256"] == file_digest(str(run / "code" / name)) == file_digest(e["source"])


def test_the_bundle_carries_the_code_and_lists_it(runs):
    """At the end of training, and from ``hpcjobs export RUN`` (the model rebuilt from the run's copy)."""
    again = runs["base"] / "export-again"
    assert cli.main(["export", str(runs["whole"]), "--output", str(again)]) == 0
    for export in (runs["whole"] / "export", again):
        assert (export / "code" / "nets.py").read_text() == NETS
        sums = (export / "SHA256SUMS").read_text()
        assert "  code/nets.py\n" in sums and "  code/code.json\n" in sums
        card = (export / "model_card.md").read_text()
        assert "`code/nets.py`" in card and "--trust-code" in card


def _digit_folder(folder, n=12):
    """Another folder: digits as PNG files, not the run's data."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.round(d.images[-1 - i] * (255 / 16)).astype(np.uint8)).save(os.path.join(folder,
                                                                                                   f"d{i}.png"))
    return folder


@pytest.mark.tf214
def test_infer_on_the_bundle_needs_trust_code(runs, capsys):
    images = _digit_folder(str(runs["base"] / "images"))
    out = runs["base"] / "pred.csv"
    capsys.readouterr()
    code = cli.main(["infer", "--model", str(runs["whole"]), "--input", images, "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert len(err.strip().splitlines()) == 1 and "code/nets.py" in err and "--trust-code" in err, err
    # another process, the user's files gone: the bundle's own code defines the layer
    away = runs["base"] / "project-away"
    os.rename(os.path.dirname(runs["config"]), away)
    try:
        proc = subprocess.run([sys.executable, "-m", "hpcjobs", "infer", "--model", str(runs["whole"]), "--input",
                               images, "--output", str(out), "--trust-code"], cwd=REPO, capture_output=True,
                              text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    finally:
        os.rename(away, os.path.dirname(runs["config"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = out.read_text().splitlines()
    assert len(rows) == 13, rows[:3]


def test_evaluate_on_the_bundle_needs_trust_code(runs, capsys):
    capsys.readouterr()
    code = cli.main(["evaluate", str(runs["whole"] / "export"), "--output", str(runs["base"] / "ev")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--trust-code" in err, err


def test_a_changed_model_file_is_refused_and_a_vanished_one_is_a_warning(tmp_path, capsys):
    config = project(str(tmp_path / "project"), dict(CONFIG, training=dict(CONFIG["training"], epochs=1,
                                                                          steps_per_epoch=2)))
    run = tmp_path / "run"
    assert train(config, run) == 0
    nets = tmp_path / "project" / "nets.py"
    nets.write_text(NETS.replace("width=8", "width=9"))
    capsys.readouterr()
    assert train(config, run) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model.arch" in err and str(nets) in err and "changed" in err, err
    assert (run / "code" / "nets.py").read_text() == NETS  # the run's copy is untouched
    nets.unlink()
    capsys.readouterr()
    assert train(config, run, "--set", "training.epochs=2") == 0  # the run goes on with its copy
    out = capsys.readouterr().out
    assert "has gone; using the run's copy" in out and str(run / "code" / "nets.py") in out


def test_a_data_loader_and_named_layers_train(tmp_path, capsys):
    """data.source: my_data.py:load through prepare and the splits; a stage that names layers."""
    cfg = dict(CONFIG, data={"source": "my_data.py:load"},
               training=dict(CONFIG["training"], hooks=[], epochs=2, steps_per_epoch=3,
                             stages=[{"epochs": 1, "trainable": ["logits"]}, {"epochs": 1, "trainable": "all"}]))
    config = project(str(tmp_path / "project"), cfg)
    run = tmp_path / "run"
    capsys.readouterr()
    assert train(config, run) == 0
    out = capsys.readouterr().out
    assert "training the layers logits (1 layers)" in out, out
    rec = record(run)
    assert rec["class_names"] == [f"digit{i}" for i in range(10)]
    assert {e["key"] for e in rec["code"]} == {"model.arch", "data.source"}
    assert (run / "code" / "my_data.py").exists()


BAD = {
    "missing file": (["model.arch=missing.py:build"], "model.arch", "missing.py: no such file"),
    "missing function": (["model.arch=nets.py:nope"], "model.arch", "has no 'nope'"),
    "wrong output shape": (["model.arch=nets.py:wrong_shape", "model.options={}"], "model.arch",
                           "expected (None, 10)"),
    "function raises": (["model.arch=nets.py:raises", "model.options={}"], "model.arch",
                        "RuntimeError: no GPU named gpu:7"),
    "hook missing": (["training.hooks=[hooks.py:Nope]"], "training.hooks[0]", "has no 'Nope'"),
    "hook options": (["training.hooks=[{hook: hooks.py:CountSteps, options: {every: 2}}]"], "training.hooks[0]",
                     "unexpected keyword argument 'every'"),
    "data missing": (["data.source=gone.py:load"], "data.source", "gone.py: no such file"),
    "data not uint8": (["data.source=my_data.py:floats"], "data.source", "type float32; expected uint8"),
    "top_blocks": (["training.stages=[{epochs: 1, trainable: {top_blocks: 1}}]"], "training.stages[0].trainable",
                   "no blocks"),
}


@pytest.mark.tf214
@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_plugin_is_one_line_naming_the_key(case, tmp_path, capsys):
    overrides, key, words = BAD[case]
    config = project(str(tmp_path / "project"))
    run = tmp_path / "run"
    capsys.readouterr()
    code = train(config, run, *sum((["--set", o] for o in overrides), []))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and words in lines[0], err
    if case != "top_blocks":  # refused when the model is built: the file is named
        assert str(tmp_path / "project") in lines[0] or "gone.py" in lines[0]
    assert not run.exists()  # no half-made run left behind


def test_the_python_api_example_of_the_readme_runs(tmp_path):
    """The README's example: hpcjobs.train.train(cfg, run_dir, hooks=[...]) and what it returns."""
    readme = open(os.path.join(REPO, "README.md")).read()
    start = readme.index("<!-- python-api-example -->")
    block = readme[readme.index("```python", start) + len("```python"):readme.index("```", readme.index("```python",
                                                                                                          start) + 9)]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope = {}
        exec(compile(block, "README.md", "exec"), scope)
    finally:
        os.chdir(cwd)
    assert scope["rc"] == 0
    assert scope["record"]["status"] == "finished" and scope["hook"].epochs == scope["record"]["total_steps"] // \
        scope["record"]["steps_per_epoch"]


def test_a_model_from_an_installed_module_is_recorded_and_needs_no_flag(tmp_path, monkeypatch, capsys):
    """model.arch: package.module:build; run.json and the card name the module and its file's
    sha256; the bundle carries no file, so infer needs no --trust-code; mixed precision
    computes the user's layers in float16 and still outputs float32 probabilities."""
    pkg = tmp_path / "site" / "test_plugins_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(NETS.replace('package="test_plugins"', 'package="test_plugins_pkg"'))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    cfg = dict(CONFIG, model=dict(CONFIG["model"], arch="test_plugins_pkg.nets:build"),
               training=dict(CONFIG["training"], hooks=[], epochs=1, steps_per_epoch=2,
                             precision="mixed_float16"))
    config = project(str(tmp_path / "project"), cfg)
    run = tmp_path / "run"
    assert train(config, run) == 0
    from hpcjobs.digest import file_digest

    (entry,) = record(run)["code"]
    assert entry["module"] == "test_plugins_pkg.nets" and entry["sha256"] == file_digest(str(pkg / "nets.py"))
    assert "module `test_plugins_pkg.nets`" in (run / "export" / "model_card.md").read_text()
    assert not any(p.suffix == ".py" for p in (run / "export" / "code").iterdir())
    from hpcjobs.export.loading import load

    model = load(str(run))[0]
    assert model.get_layer("tiny").get_layer("conv").compute_dtype == "float16"
    assert model.layers[-1].name == "probabilities" and model.output.dtype in ("float32", "<dtype: 'float32'>")
    images = _digit_folder(str(tmp_path / "images"), 4)
    assert cli.main(["infer", "--model", str(run), "--input", images, "--output", str(tmp_path / "p.csv")]) == 0
    with open(pkg / "nets.py", "a") as f:  # the module changes between sessions: said, not refused
        f.write("\n# changed\n")
    capsys.readouterr()
    assert train(config, run, "--set", "training.epochs=2") == 0
    assert "warning: model.arch: module test_plugins_pkg.nets changed since this run started" in capsys.readouterr().out


def test_a_loss_function_resolves_from_a_file_with_the_plugin_loader(tmp_path):
    """The loader item 3's training.loss uses: load_plugin(spec, "loss", key)."""
    from hpcjobs import plugins

    (tmp_path / "my_loss.py").write_text("def per_example(y_true, y_pred):\n    return y_pred[:, 0] * 0 + 1\n"
                                         "NOT_A_FUNCTION = 3\n")
    fn = plugins.load_plugin(plugins.absolute("my_loss.py:per_example", str(tmp_path)), "loss", "training.loss")
    assert list(fn(np.zeros(2), np.zeros((2, 3)))) == [1, 1]
    for spec, words in (("my_loss.py:NOT_A_FUNCTION", "is a int, not a function"), ("nope.py:f", "no such file"),
                        ("my_loss.py:gone", "has no 'gone'")):
        with pytest.raises(plugins.PluginError) as e:
            plugins.load_plugin(plugins.absolute(spec, str(tmp_path)), "loss", "training.loss")
        assert str(e.value).startswith("training.loss: ") and words in str(e.value)


def test_a_data_loader_of_paths_prepares_a_store(tmp_path, capsys):
    """(paths, labels, class_names): the files go through prepare's decoding and splits into a store."""
    config = project(str(tmp_path / "project"), dict(CONFIG, data={"source": "my_data.py:paths",
                                                                     "validation_split": 0.2, "test_split": 0.2}))
    store = tmp_path / "paths.h5"
    assert cli.main(["prepare", config, "--output", str(store)]) == 0
    from hpcjobs.data import open_store

    data = open_store(str(store))
    try:
        assert data.class_names == [str(c) for c in range(10)]
        assert sum(len(data.splits[s]) for s in ("train", "val", "test")) == 60
        assert data.image_shape == (8, 8, 1)
    finally:
        data.close()


@pytest.mark.tf214
def test_head_of_a_user_model_is_its_last_layer_with_weights(tmp_path):
    """``trainable: head`` on the user's model trains its last layer with weights; names pick any layers."""
    from hpcjobs.models import build, freeze

    cfg = config.load(project(str(tmp_path / "project")))
    model = build.build(cfg.model, (8, 8, 1), 10, [0.0], [1.0])
    freeze.set_trainable(model, "head")
    assert sorted(w.name.split("/")[-1].split(":")[0] for w in model.trainable_weights) == ["bias", "kernel"]
    assert all(w is not None for w in model.get_layer("tiny").get_layer("logits").trainable_weights)
    assert len(model.trainable_weights) == len(model.get_layer("tiny").get_layer("logits").weights)
    freeze.set_trainable(model, ("gain", "conv"))
    assert len(model.trainable_weights) == 3  # the gain, the conv's kernel and bias


def test_init_from_a_run_of_the_same_user_model_needs_no_flag(runs, tmp_path, capsys):
    """model.init_from of a bundle carrying the very code this run imports: nothing new runs."""
    run = tmp_path / "second"
    capsys.readouterr()
    assert train(runs["config"], run, "--set", f"model.init_from={runs['whole']}", "--set", "training.epochs=1",
                 "--set", "training.steps_per_epoch=2") == 0
    out = capsys.readouterr().out
    assert f"layers from {runs['whole'] / 'export' / 'model.keras'}" in out and "initialised 0 layers" not in out
