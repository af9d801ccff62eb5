"""The hostile-input corpus (tests/data/hostile/, written by its make_corpus.py) through
the public CLI: every config is exit 2 with one line naming the file and the key, no
traceback; every hostile image is skipped and listed by prepare, and fails it with
--strict; and a read-only file system is one line for prepare and for a run dir (issue 17)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from hpcjobs import cli

import forked
from conftest import QUICKSTART, REPO

CORPUS = pytest.mark.tf214  # the committed corpus also runs on TensorFlow 2.14 + Keras 2 (tests/tf214.sh)

HOSTILE = os.path.join(REPO, "tests", "data", "hostile")
_spec = importlib.util.spec_from_file_location("make_corpus", os.path.join(HOSTILE, "make_corpus.py"))
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)

# file -> (the key the message names, words it holds); "" for a message about the whole file
EXPECT = {
    "dup_section.yaml": ("training", "duplicate key (line 1 and again line 5)"),
    "dup_key.yaml": ("training.epochs", "duplicate key (line 2 and again line 4)"),
    "dup_flow.yaml": ("data.seed", "duplicate key"),
    "deep_list.yaml": ("", "nested deeper than 64 levels"),
    "deep_map.yaml": ("", "nested deeper than 64 levels"),
    "alias_bomb.yaml": ("", "more than 100,000 values once aliases are expanded"),
    "alias_bomb_via_base.yaml": ("", "more than 100,000 values once aliases are expanded"),
    "alias_bomb_in_base.yaml": ("", "more than 100,000 values once aliases are expanded"),
    "alias_cycle.yaml": ("slurm.modules", "an alias refers to its own anchor"),
    "nan_learning_rate.yaml": ("optimizer.learning_rate", "must be a finite number"),
    "inf_every_minutes.yaml": ("checkpoint.every_minutes", "must be a finite number"),
    "minus_inf_dropout.yaml": ("model.dropout", "must be a finite number"),
    "float_overflow.yaml": ("data.validation_split", "must be a finite number"),
    "int_as_huge_float.yaml": ("optimizer.learning_rate", "must be a finite number"),
    "int_overflow.yaml": ("training.epochs", "out of range"),
    "seed_negative.yaml": ("data.seed", "must be from 0 to 4294967295"),
    "seed_too_big.yaml": ("training.seed", "must be from 0 to 4294967295"),
    "image_size_huge.yaml": ("data.image_size", "each from 1 to 8192"),
    "zoom_one.yaml": ("data.augment.zoom", "must be in [0, 0.99]"),
    "arch_dunder.yaml": ("model.arch", "unknown architecture '__class__'"),
    "arch_dotted.yaml": ("model.arch", "unknown architecture 'os.system'"),
    "arch_submodule.yaml": ("model.arch", "did you mean 'ResNet50'?"),
    "arch_typo.yaml": ("model.arch", "did you mean 'ResNet50'?"),
    "val_monitor_without_split.yaml": ("training.early_stopping.monitor", "needs a validation split"),
    "weights_for_builtin.yaml": ("model.weights", "simple_cnn is built in"),
    "freeze_random_backbone.yaml": ("model.freeze_backbone", "backbone would stay random"),
    "momentum_for_adam.yaml": ("optimizer.momentum", "adam has no momentum"),
    "store_is_source.yaml": ("data.store", "the same path as data.source"),
    "python_tag.yaml": ("", "malformed YAML: line 1"),
    "top_level_list.yaml": ("", "the top level must be a mapping"),
    "tab_indent.yaml": ("", "malformed YAML: line 2"),
    "unknown_section.yaml": ("trainig", "did you mean 'training'?"),
    "section_as_list.yaml": ("training", "expected a mapping"),
    "name_with_slash.yaml": ("name", "letters, digits"),
    "base_missing.yaml": ("base", "nowhere.yaml: no such file"),
    "base_circular.yaml": ("base", "circular base"),
    "base_not_a_name.yaml": ("base", "expected a file name"),
    "not_utf8.yaml": ("", "cannot read"),
}
# a file that is only read through another one's base: names itself
NAMED_FILE = {"alias_bomb_in_base.yaml": "alias_bomb.yaml"}
SLOW_IF_BROKEN = {"deep_list.yaml", "deep_map.yaml", "alias_bomb.yaml", "alias_bomb_via_base.yaml",
                  "alias_bomb_in_base.yaml", "alias_cycle.yaml"}
IMAGES = sorted(n for n in corpus.IMAGES)


@CORPUS
def test_the_committed_corpus_is_what_the_generator_writes(tmp_path):
    corpus.write(str(tmp_path))
    for name, data in corpus.corpus().items():
        with open(os.path.join(HOSTILE, name), "rb") as f:
            assert f.read() == data, f"{name} differs: run python tests/data/hostile/make_corpus.py"
    configs = sorted(n for n in os.listdir(HOSTILE) if n.endswith(".yaml"))
    assert configs == sorted(EXPECT), "every corpus config needs an expectation here, and only those"
    images = sorted(f"images/{n}" for n in os.listdir(os.path.join(HOSTILE, "images")))
    assert images == IMAGES, "images/ holds exactly the generator's images"


def _check_one_line(code, out, err, name):
    key, words = EXPECT[name]
    assert code == 2, (name, code, err)
    assert "Traceback" not in out + err, err
    line = err.strip()
    assert len(line.splitlines()) == 1 and line.startswith("hpcjobs: error: "), err
    where = os.path.join(HOSTILE, NAMED_FILE.get(name, name))
    assert line.startswith(f"hpcjobs: error: {where}: " + (f"{key}: " if key else "")), line
    assert words in line, line
    assert len(line) < 400, line


@CORPUS
@pytest.mark.parametrize("name", sorted(set(EXPECT) - SLOW_IF_BROKEN))
def test_a_hostile_config_is_exit_2_in_one_line(tmp_path, capsys, name):
    code = cli.main(["prepare", os.path.join(HOSTILE, name), "--output", str(tmp_path / "s.h5")])
    out = capsys.readouterr()
    _check_one_line(code, out.out, out.err, name)
    assert not os.listdir(tmp_path)


@CORPUS
@pytest.mark.parametrize("name", sorted(SLOW_IF_BROKEN))
def test_deep_and_alias_bomb_configs_are_refused_at_once(tmp_path, name):
    """In a subprocess with a time limit: a regression would hang or eat the memory."""
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "hpcjobs", "prepare", os.path.join(HOSTILE, name),
                        "--output", str(tmp_path / "s.h5")], capture_output=True, text=True, timeout=240)
    assert time.monotonic() - start < 20
    _check_one_line(r.returncode, r.stdout, r.stderr, name)


def _folder_with(tmp_path, hostile: list[str]):
    from PIL import Image

    root = tmp_path / "imgs"
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for k in range(5):
            Image.fromarray(np.full((8, 8), 20 * k + 100 * c, np.uint8)).save(root / name / f"{k}.png")
    for n in hostile:
        shutil.copy(os.path.join(HOSTILE, n), root / "a" / os.path.basename(n))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  source: {root}\n  validation_split: 0\n  test_split: 0.2\n")
    return cfg


@CORPUS
def test_hostile_images_are_skipped_and_listed(tmp_path, capsys):
    cfg = _folder_with(tmp_path, IMAGES)
    assert cli.main(["prepare", str(cfg), "--output", str(tmp_path / "s.h5")]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    assert f"skipped {len(IMAGES)} unreadable image(s)" in out.out
    for name in IMAGES:
        assert any(os.path.basename(name) + ":" in line for line in out.out.splitlines()), (name, out.out)


@CORPUS
@pytest.mark.parametrize("name", IMAGES)
def test_a_hostile_image_fails_strict_prepare_in_one_line(tmp_path, capsys, name):
    cfg = _folder_with(tmp_path, [name])
    assert cli.main(["prepare", str(cfg), "--output", str(tmp_path / "s.h5"), "--strict"]) == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    errors = [line for line in out.err.splitlines() if line.startswith("hpcjobs:")]
    assert len(errors) == 1 and os.path.basename(name) in errors[0], out.err
    assert not (tmp_path / "s.h5").exists()


# --------------------------------------------------------------------------- read-only file systems
def _readonly_mount_works() -> bool:
    try:
        r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o ro tmpfs /mnt"],
                           capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _under_readonly(tmp_path, *argv):
    """``python -m hpcjobs ARGV`` with tmp_path/ro a read-only tmpfs (a private mount namespace)."""
    if not _readonly_mount_works():
        pytest.skip("cannot mount a read-only tmpfs here (needs unshare -m as root)")
    ro = tmp_path / "ro"
    ro.mkdir()
    script = 'mount -t tmpfs -o ro,size=1m tmpfs "$0" && exec "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, str(ro), sys.executable, "-m", "hpcjobs", *argv],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def _one_line(r, code, words):
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("hpcjobs:")]
    assert len(errors) == 1 and words in errors[0], r.stderr


def test_prepare_onto_a_readonly_file_system_is_one_line(tmp_path):
    r = _under_readonly(tmp_path, "prepare", QUICKSTART, "--output", "ro/sub/s.h5")
    _one_line(r, 2, "ro/sub/s.h5: cannot write the store there (Read-only file system)")


def test_a_run_dir_on_a_readonly_file_system_is_one_line(tmp_path):
    r = _under_readonly(tmp_path, "train", QUICKSTART, "--run-dir", "ro/run")
    _one_line(r, 2, "cannot be a run directory (Read-only file system)")


# =========================================================================== issue 28
# Every case through the CLI: the exit code, one line, no traceback; for the cases that
# once overwrote a user's files (items 1-6), every file that was there keeps its hash.
def _hashes(folder) -> dict:
    import hashlib

    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            if n in (".lock", ".claim"):  # hpcjobs' own lock files, rewritten with the holder's pid by every lock
                continue
            p = os.path.join(root, n)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    out[os.path.relpath(p, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _refused(capsys, argv, code=2, words=()) -> str:
    """``hpcjobs ARGV`` in this process: exit ``code``, one ``hpcjobs:`` line holding ``words``."""
    assert cli.main([str(a) for a in argv]) == code
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err, out.err
    err = out.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hpcjobs: "), out.err
    for w in words:
        assert str(w) in err, err
    return err


USER_CONFIG = "# my experiment: keep these comments\ndata:\n  source: digits\ntraining:\n  epochs: 1\n"


def test_train_into_the_folder_of_its_own_config_is_refused(tmp_path, capsys, monkeypatch):
    """Item 1: ``cd d && hpcjobs train config.yaml --run-dir .``."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "config.yaml").write_text(USER_CONFIG)
    before = _hashes(d)
    monkeypatch.chdir(d)
    _refused(capsys, ["train", "config.yaml", "--run-dir", "."], words=[d, "not an hpcjobs run directory",
                                                                          "config.yaml"])
    assert _hashes(d) == before and sorted(os.listdir(d)) == ["config.yaml"]


def test_train_from_a_runs_own_config_yaml_never_rewrites_it(tmp_path, capsys):
    """Item 1: the input config is the run's config.yaml (a run hpcjobs made): another
    resolved config would replace the user's text, so it is refused."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("")
    (run / "config.yaml").write_text(USER_CONFIG)
    before = _hashes(run)
    _refused(capsys, ["train", run / "config.yaml", "--run-dir", run], words=[run / "config.yaml", "copy it"])
    assert _hashes(run) == before


@pytest.mark.parametrize("theirs", ["config.yaml", "run.json", "notes.txt"])
def test_a_run_dir_holding_someone_elses_files_is_refused(tmp_path, capsys, theirs):
    """Item 2: a folder that is neither empty nor an hpcjobs run."""
    d = tmp_path / "theirs"
    d.mkdir()
    (d / theirs).write_text('{"status": "finished", "mine": true}\n' if theirs == "run.json" else "mine\n")
    before = _hashes(d)
    for argv in (["train", QUICKSTART, "--run-dir", d], ["lr-find", QUICKSTART, "--run-dir", d],
                 ["submit", QUICKSTART, "--run-dir", d]):
        _refused(capsys, argv, words=[d, theirs, "not an hpcjobs run directory"])
    assert _hashes(d) == before and os.listdir(d) == [theirs]  # no .lock left behind either


def test_a_run_copied_without_its_hidden_files_is_still_a_run(one_epoch_run, tmp_path, capsys):
    """Its run.json (a status and sessions) marks it as hpcjobs' when .lock was not copied."""
    copy = tmp_path / "copy"
    shutil.copytree(one_epoch_run, copy, ignore=shutil.ignore_patterns(".lock"))
    assert cli.main(["export", str(copy), "--output", str(tmp_path / "exp")]) == 0
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("name", ["..", ".", ".hidden"])
def test_a_config_name_of_dots_is_refused(tmp_path, capsys, monkeypatch, name):
    """Item 3: ``--set name=..`` made the current folder (or its parent) the run dir."""
    (tmp_path / "metrics.csv").write_text("a,b\n1,2\n")
    (tmp_path / "config.yaml").write_text(USER_CONFIG)
    before = _hashes(tmp_path)
    monkeypatch.chdir(tmp_path)
    _refused(capsys, ["train", "config.yaml", "--set", f"name={name}"], words=["name", "starts with '.'"])
    assert _hashes(tmp_path) == before


def test_a_refused_train_leaves_no_empty_run_dir(tmp_path, capsys):
    """Surprising successes: a config refused once TensorFlow builds it left an empty run
    dir holding .lock."""
    run = tmp_path / "run"
    _refused(capsys, ["train", QUICKSTART, "--run-dir", run, "--set", "model.arch=ResNet50",
                      "--set", "model.weights=/nowhere.h5"], words=["nowhere.h5"])
    assert not run.exists()


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    """The quickstart for one epoch (checkpoints every 10 steps): export and evaluate read it."""
    run = tmp_path_factory.mktemp("hostile") / "run"
    assert cli.main(["train", QUICKSTART, "--run-dir", str(run), "--set", "training.epochs=1",
                     "--set", "checkpoint.every_steps=10", "--set", "checkpoint.max_to_keep=10"]) == 0
    return run


def _users_folder(path, names=("labels.txt", "model_card.md", "SHA256SUMS", "metrics.json")):
    path.mkdir(parents=True, exist_ok=True)
    for n in names:
        (path / n).write_text(f"my own {n}\n")
    return path


def test_export_and_evaluate_never_write_over_a_users_folder(one_epoch_run, tmp_path, capsys):
    """Items 4 and 5: --output onto a folder of the user's own files, onto the run itself,
    onto its checkpoints/ or onto a file is one line, and nothing there changes."""
    mine = _users_folder(tmp_path / "mine")
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine\n")
    run_before = _hashes(one_epoch_run)
    for out in (mine, one_epoch_run, one_epoch_run / "checkpoints"):
        before = _hashes(out)
        _refused(capsys, ["export", one_epoch_run, "--output", out], words=[out, "not empty"])
        _refused(capsys, ["evaluate", one_epoch_run, "--output", out], words=[out, "not empty"])
        assert _hashes(out) == before
    for cmd in ("export", "evaluate"):
        _refused(capsys, [cmd, one_epoch_run, "--output", a_file], words=[a_file, "is a file"])
    assert a_file.read_text() == "mine\n"
    assert _hashes(one_epoch_run) == run_before


def test_export_and_evaluate_write_again_into_their_own_output(one_epoch_run, tmp_path, capsys):
    """The rule's other side: a new folder, then the same folder again, is accepted."""
    for cmd in ("export", "evaluate"):
        out = tmp_path / cmd
        for _ in range(2):
            assert cli.main([cmd, str(one_epoch_run), "--output", str(out)]) == 0
        assert "Traceback" not in capsys.readouterr().err
    assert (tmp_path / "export" / "preprocessing.json").is_file()
    assert (tmp_path / "evaluate" / "metrics.json").is_file()


def _copy_run(run, dest):
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("export", "evaluation", "tensorboard"))
    return dest


def test_a_lost_checkpoint_state_file_resumes_from_the_checkpoint_files(one_epoch_run, tmp_path, capsys):
    """Item 6: without checkpoints/checkpoint, the next session resumes from the newest
    ckpt-N found by its files, says so, and leaves every earlier checkpoint as it was."""
    run = _copy_run(one_epoch_run, tmp_path / "run")
    os.remove(run / "checkpoints" / "checkpoint")
    step = json.loads((run / "run.json").read_text())["step"]
    ckpts = {k: v for k, v in _hashes(run / "checkpoints").items() if k.startswith("ckpt-")}
    assert len(ckpts) >= 4
    assert cli.main(["train", QUICKSTART, "--run-dir", str(run), "--set", "training.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "found" in out and f"resuming from {run / 'checkpoints' / f'ckpt-{step}'} (step {step})" in out, out
    after = _hashes(run / "checkpoints")
    assert all(after.get(k) == v for k, v in ckpts.items())


def test_a_run_without_its_checkpoints_is_not_restarted_from_scratch(one_epoch_run, tmp_path, capsys):
    """Item 6: run.json says step N, no checkpoint is left: one line, nothing rewritten."""
    run = _copy_run(one_epoch_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints")
    os.mkdir(run / "checkpoints")
    before = _hashes(run)
    _refused(capsys, ["train", QUICKSTART, "--run-dir", run, "--set", "training.epochs=2"],
             words=["no checkpoint", "says the run reached step", "--restart"])
    assert _hashes(run) == before


# --------------------------------------------------------------------------- items 7-12: bounded, never hung
LIMIT_GIB = 4  # TensorFlow maps about 1.2 GiB of address space to import; 4 GiB leaves room for a run


def _limited(argv, cwd, timeout=240):
    """``hpcjobs ARGV`` under RLIMIT_AS = LIMIT_GIB and a timeout: a read without end or a decode
    too large dies of MemoryError (a traceback) or is killed, and a hang times out.  The commands
    that import TensorFlow are forked from a process that has (forked.py); the others start anew."""
    if argv[0] in ("train", "evaluate", "infer", "search"):
        return forked.run(argv, cwd=cwd, timeout=timeout, limit_as=LIMIT_GIB << 30)
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT_GIB << 30, LIMIT_GIB << 30))

    return subprocess.run([sys.executable, "-m", "hpcjobs", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit, cwd=cwd)


def _bad_files(tmp_path) -> dict:
    """Made at run time, never committed: a FIFO, symlinks to devices."""
    os.mkfifo(tmp_path / "fifo")
    for dev in ("zero", "urandom"):
        os.symlink(f"/dev/{dev}", tmp_path / dev)
    return {"fifo": "a FIFO", "zero": "a character device", "urandom": "a character device"}


def test_status_of_a_run_json_that_is_a_device_or_a_fifo_is_one_line(tmp_path):
    """Items 7 and 8: run.json a symlink to /dev/zero (24 GB read) or a FIFO (a hang)."""
    kinds = _bad_files(tmp_path)
    for name, kind in kinds.items():
        run = tmp_path / f"run-{name}"
        run.mkdir()
        os.symlink(tmp_path / name, run / "run.json")
        _one_line(_limited(["status", run], tmp_path), 2, f"{run / 'run.json'}: {kind}, not a regular file")


def test_a_config_or_base_that_is_a_device_or_a_fifo_is_one_line(tmp_path):
    """Items 7 and 8: a config, or its base:, is /dev/zero, /dev/urandom or a FIFO."""
    kinds = _bad_files(tmp_path)
    for name, kind in kinds.items():
        r = _limited(["prepare", tmp_path / name, "--output", tmp_path / "s.h5"], tmp_path)
        _one_line(r, 2, f"{tmp_path / name}: {kind}, not a regular file")
        (tmp_path / f"c-{name}.yaml").write_text(f"base: {name}\n")
        r = _limited(["prepare", tmp_path / f"c-{name}.yaml", "--output", tmp_path / "s.h5"], tmp_path)
        _one_line(r, 2, f"{tmp_path / name}: {kind}, not a regular file")
    assert not (tmp_path / "s.h5").exists()


def test_evaluate_data_that_is_a_device_or_a_fifo_is_one_line(one_epoch_run, tmp_path):
    """Item 7: ``evaluate --data`` a listing, a config or an .npz that is a device or a FIFO."""
    kinds = _bad_files(tmp_path)
    for name, ext in (("fifo", ".csv"), ("fifo", ".yaml"), ("fifo", ".npz"), ("zero", ".csv"), ("urandom", ".yaml")):
        link = tmp_path / f"{name}{ext}"
        os.symlink(tmp_path / name, link)
        r = _limited(["evaluate", one_epoch_run, "--data", link, "--output", tmp_path / "ev"], tmp_path)
        _one_line(r, 2, f"{kinds[name]}, not a regular file")


def _write_npz(path, images_shape, labels, chunk=64 << 20):
    """An .npz written member by member: an images array of ``images_shape`` (zeros, deflated
    as they are written, so a 3 GB array is a 13 MB file) and ``labels``."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("images.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                     "shape": tuple(images_shape)})
            left, zeros = int(np.prod(images_shape)), bytes(chunk)
            while left > 0:
                f.write(zeros[:min(left, chunk)])
                left -= chunk
        with zf.open("labels.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(labels))
    return path


@pytest.fixture(scope="module")
def npz_bomb(tmp_path_factory):
    """13 MB that declares 3 GB of images: more than the limit leaves once Python is running."""
    return _write_npz(tmp_path_factory.mktemp("bomb") / "bomb.npz", (3000, 1000, 1000), np.zeros(3000, np.int64))


def test_an_npz_bomb_is_refused_by_prepare_and_infer(npz_bomb, one_epoch_run, tmp_path):
    """Item 9: the declared shapes are checked before anything is decompressed."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  source: {npz_bomb}\n")
    _one_line(_limited(["prepare", cfg, "--output", tmp_path / "s.h5"], tmp_path), 2,
              "declares 2.8 GiB of arrays (images (3000, 1000, 1000)")
    r = _limited(["infer", "--model", one_epoch_run, "--input", npz_bomb, "--output", tmp_path / "p.csv"], tmp_path)
    _one_line(r, 2, "declares 2.8 GiB of arrays (images (3000, 1000, 1000))")


def test_an_npz_label_of_2_to_the_40_is_refused(tmp_path):
    """Item 9: one class name per integer up to the largest label (24 GB) is never built."""
    images = np.zeros((4, 8, 8), np.uint8)
    np.savez(tmp_path / "big.npz", images=images, labels=np.array([0, 1, 2, 2**40]))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  source: {tmp_path / 'big.npz'}\n")
    _one_line(_limited(["prepare", cfg, "--output", tmp_path / "s.h5"], tmp_path), 2,
              f"label {2**40}: labels without class_names must be 0 to 99,999")


def test_a_batch_larger_than_the_training_split_is_one_line(tmp_path):
    """Item 10: batch_size 10**9 on the quickstart's training split grew without end."""
    r = _limited(["train", QUICKSTART, "--run-dir", tmp_path / "run", "--set", "training.batch_size=1000000000"],
                 tmp_path)
    _one_line(r, 2, "training.batch_size: 1,000,000,000 is larger than the training split (")
    assert not (tmp_path / "run").exists()


def _search_config(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"base: {QUICKSTART}\ntraining: {{epochs: 1, steps_per_epoch: 2}}\n"
                   "search: {method: random, trials: 1, epochs: 1, metric: val_accuracy,\n"
                   "         space: {model.dropout: {uniform: [0.1, 0.2]}}}\n")
    return cfg


@pytest.fixture(scope="module")
def small_search(tmp_path_factory):
    """Item 11: ``search --workers 99999`` forked a process per worker; capped, it runs the
    one trial here.  Returns (config, run, the command's output)."""
    tmp_path = tmp_path_factory.mktemp("search")
    cfg, run = _search_config(tmp_path), tmp_path / "run"
    r = _limited(["search", cfg, "--workers", "99999", "--run-dir", run], tmp_path)
    return cfg, run, r


def test_search_workers_are_capped_at_the_trials_and_cpus(small_search):
    _, run, r = small_search
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert "--workers 99999: capped at 1 (1 trial(s) left of search.trials 1," in r.stdout
    assert os.listdir(run / "trials") == ["000"]


def test_a_garbage_line_in_the_search_journal_is_one_line(small_search, tmp_path):
    """One line, not a traceback: a line in the middle of the journal that is no record."""
    cfg, run, _ = small_search
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    journal = copy / "search" / "journal.log"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:2] + ["garbage {\n"] + lines[2:]))
    before = _hashes(copy / "trials")
    r = _limited(["search", cfg, "--run-dir", copy], tmp_path)
    _one_line(r, 2, f"{journal}: the search journal is damaged (line 3 is no journal record)")
    assert _hashes(copy / "trials") == before


def test_a_journal_deleted_or_cut_while_in_use_is_named(tmp_path):
    """One line, not a traceback: the journal deleted (or cut) under a running search; here
    through the journal backend the workers share, which notices at its next read or append."""
    from hpcjobs.search import journal as jmod

    path = str(tmp_path / "journal.log")
    backend = jmod.LockedJournal(path)
    backend.append_logs([{"op_code": 0, "worker_id": "w"}, {"op_code": 1, "worker_id": "w"}])
    assert len(backend.read_logs(0)) == 2
    with open(path, "r+b") as f:
        f.truncate(10)
    with pytest.raises(jmod.JournalDamaged, match="cut while the search used it: 10 bytes, "):
        backend.read_logs(2)
    os.remove(path)
    with pytest.raises(jmod.JournalDamaged, match="deleted, replaced or cut while the search used it"):
        backend.append_logs([{"op_code": 2, "worker_id": "w"}])


def test_a_huge_png_does_not_kill_infer(one_epoch_run, tmp_path):
    """Item 12: a valid 12000x12000 PNG (a few hundred KB) cost about 2.8 GB per decode
    worker: with 4 workers under the limit it is skipped and named, the rest predicted."""
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (12000, 12000), (200, 30, 30)).save(folder / "huge.png")
    for k in range(3):
        Image.fromarray(np.full((8, 8), 60 * k, np.uint8)).save(folder / f"small{k}.png")
    out = tmp_path / "p.csv"
    r = _limited(["infer", "--model", one_epoch_run, "--input", folder, "--output", out,
                  "--set", "infer.workers=4"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    predicted = out.read_text()
    assert all(f"small{k}.png" in predicted for k in range(3))
    errors = (tmp_path / "p.errors.csv").read_text() if (tmp_path / "p.errors.csv").exists() else ""
    assert "huge.png" in predicted or "huge.png" in errors, (predicted, errors)


# --------------------------------------------------------------------------- one line, not a traceback
def _in_namespace(tmp_path, mount: str, target, *argv, after: str = "", timeout=240):
    """``python -m hpcjobs ARGV`` with ``mount`` (a shell command on "$0" = target) done first
    in a private mount namespace (unshare -m, as root); ``after``: shell commands run there
    after it (its exit code kept)."""
    if not _readonly_mount_works():
        pytest.skip("cannot mount here (needs unshare -m as root)")
    then = f'"$@"; rc=$?; {after}; exit $rc' if after else 'exec "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", f"{mount} && {then}", str(target), sys.executable,
                           "-m", "hpcjobs", *map(str, argv)], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path)


@pytest.mark.parametrize("first", ["checkpoint", "best_weights"])
def test_a_full_disk_during_training_is_one_line_and_marks_the_run(tmp_path, first):
    """A 96 KiB file system fills at the first checkpoint (every 10 steps) or at the best
    epoch's weights: exit 1, one line, no traceback (before: two, then h5py crashed the
    interpreter at exit), run.json says failed (it still fits) and no ckpt-N_temp is left.
    The file system lives only in the namespace: what is left is listed there."""
    full = tmp_path / "full"
    full.mkdir()
    sets = ["--set", "checkpoint.every_steps=10"] if first == "checkpoint" else []
    r = _in_namespace(tmp_path, 'mount -t tmpfs -o size=96k tmpfs "$0"', full, "train", QUICKSTART, "--run-dir",
                      "full/run", "--set", "training.epochs=1", *sets,
                      after='echo LEFT $(ls "$0/run/checkpoints"); grep \'"status"\' "$0/run/run.json"')
    words = "cannot write checkpoint" if first == "checkpoint" else "cannot write the best weights"
    _one_line(r, 1, f"hpcjobs: training failed: {words}")
    assert "No space left on device" in r.stderr
    assert '"status": "failed"' in r.stdout
    left = next(line for line in r.stdout.splitlines() if line.startswith("LEFT"))
    assert "_temp" not in left, left


def test_evaluate_on_a_readonly_run_is_one_line(one_epoch_run, tmp_path):
    """`evaluate RUN` where RUN is mounted read-only: OSError 30 was a traceback."""
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    r = _in_namespace(tmp_path, 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0"', run, "evaluate", run)
    _one_line(r, 2, f"{run / 'evaluation'}: cannot write the evaluation there (Read-only file system)")


def test_restart_of_a_run_whose_name_is_near_the_limit(tmp_path, capsys):
    """`--restart` moved the run aside to a name 20 characters longer: ENAMETOOLONG. Here
    the new config is refused once built, so the run is moved aside and put back."""
    run = tmp_path / ("r" * 250)
    run.mkdir()
    (run / ".lock").write_text("")
    (run / "run.json").write_text('{"status": "stopped", "step": 0}\n')
    before = _hashes(run)
    _refused(capsys, ["train", QUICKSTART, "--run-dir", run, "--restart", "--set", "model.arch=ResNet50",
                      "--set", "model.weights=/nowhere.h5"], words=["nowhere.h5"])
    assert _hashes(run) == before and sorted(os.listdir(tmp_path)) == [run.name]


def test_a_damaged_init_from_json_is_said_and_planned_again(one_epoch_run, tmp_path, capsys):
    """RUN/init_from.json without 'layers' was a KeyError traceback."""
    run = tmp_path / "b"
    argv = ["train", QUICKSTART, "--run-dir", str(run), "--init-weights", str(one_epoch_run),
            "--set", "checkpoint.every_steps=10"]
    assert cli.main(argv + ["--set", "training.epochs=1", "--set", "training.steps_per_epoch=10"]) == 0
    saved = json.loads((run / "init_from.json").read_text())
    del saved["layers"]
    (run / "init_from.json").write_text(json.dumps(saved))
    capsys.readouterr()
    assert cli.main(argv + ["--set", "training.epochs=2", "--set", "training.steps_per_epoch=10"]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    assert f"warning: {run / 'init_from.json'} is damaged (no 'path' and 'layers' list)" in out.out
    assert "resuming from" in out.out


# --------------------------------------------------------------------------- misleading or leaking lines
def test_a_config_that_is_a_password_file_is_not_echoed(tmp_path, capsys):
    """A config symlinked to a file like /etc/shadow printed its first line as a key."""
    secret = tmp_path / "shadow"
    secret.write_text("root:$y$j9T$s3cr3tHash:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n")
    os.symlink(secret, tmp_path / "c.yaml")
    err = _refused(capsys, ["prepare", tmp_path / "c.yaml", "--output", tmp_path / "s.h5"],
                   words=[tmp_path / "c.yaml", "a key that is no config key name (not shown"])
    assert "s3cr3t" not in err and "19000" not in err


def test_a_look_alike_letter_in_a_key_is_pointed_at(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tr\u0430ining:\n  epochs: 1\n", encoding="utf-8")
    err = _refused(capsys, ["prepare", cfg, "--output", tmp_path / "s.h5"],
                   words=["character 3 is CYRILLIC SMALL LETTER A (U+0430), not ASCII"])
    assert "did you mean" not in err


def test_a_stage_of_zero_top_blocks_names_the_rule(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  stages:\n    - {epochs: 1, trainable: {top_blocks: 0}}\n")
    err = _refused(capsys, ["prepare", cfg, "--output", tmp_path / "s.h5"],
                   words=["training.stages[0].trainable.top_blocks: must be >= 1"])
    assert "TopBlocks" not in err


def test_init_weights_that_are_no_usable_model_say_what_is_accepted(one_epoch_run, tmp_path, capsys):
    """A truncated model.keras ("File not found" for a file that exists) and a model with a
    Lambda (which suggested --unsafe, a flag train does not have).  (A .weights.h5, once
    Keras' "No model config found", is accepted since issue 24: tests/test_init_weights.py.)"""
    import keras

    truncated = tmp_path / "cut" / "model.keras"
    truncated.parent.mkdir()
    data = (one_epoch_run / "export" / "model.keras").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    lam = tmp_path / "lam" / "model.keras"
    lam.parent.mkdir()
    inp = keras.Input((8, 8, 1))
    keras.Model(inp, keras.layers.Lambda(lambda x: x * 2)(inp)).save(lam)
    for source, words in ((truncated, "not a readable .keras model (truncated or damaged)"),
                          (lam, "model.init_from never runs a model's code")):
        err = _refused(capsys, ["train", QUICKSTART, "--run-dir", tmp_path / "run", "--init-weights", source],
                       words=[source, words])
        assert "--unsafe" not in err and "File not found" not in err
        assert not (tmp_path / "run").exists()


def test_weights_fetch_onto_a_cache_that_is_a_file_blames_the_cache(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.write_text("mine\n")
    _refused(capsys, ["weights", "fetch", "ResNet50", "--cache", cache, "--base-url", "http://127.0.0.1:9"],
             words=[f"--cache {cache}: cannot be the cache folder", "is a file"])
    assert cache.read_text() == "mine\n"


def test_weights_fetch_from_an_endless_mirror_stops_at_the_cap(tmp_path, capsys, monkeypatch):
    """A mirror that never stops sending (and gives no Content-Length) filled the disk."""
    import http.server
    import threading

    from hpcjobs.models import weights

    class Endless(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            try:
                while True:
                    self.wfile.write(bytes(1 << 16))
            except OSError:
                pass

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(weights, "MAX_BYTES", 4 << 20)  # the real cap is 2 GiB
    try:
        _refused(capsys, ["weights", "fetch", "ResNet50", "--cache", tmp_path / "cache", "--base-url",
                          f"http://127.0.0.1:{server.server_address[1]}"],
                 words=["sends more than 4,194,304 bytes (no weights file is that large); nothing was written"])
    finally:
        server.shutdown()
    assert os.listdir(tmp_path / "cache") == []


def test_run_json_follows_a_running_session_at_each_checkpoint(tmp_path):
    """`status` during a session showed step 0: run.json was written only at its start and end."""
    from hpcjobs import config
    from hpcjobs.train import Hook, train

    seen = []

    class Peek(Hook):  # what `hpcjobs status` would read, after each call of steps
        def after_steps(self, loop, step, sums, seconds):
            seen.append((step, json.loads((tmp_path / "run" / "run.json").read_text())["step"]))

    cfg = config.load(QUICKSTART, ["training.epochs=1", "training.steps_per_epoch=30", "checkpoint.every_steps=10"])
    assert train(cfg, str(tmp_path / "run"), hooks=[Peek()], verbose=False) == 0
    assert seen == [(10, 0), (20, 10), (30, 20)]
    assert subprocess.run([sys.executable, "-m", "hpcjobs", "status", str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=240).stdout.startswith("run quickstart: finished, step 30/30")


# --------------------------------------------------------------------------- surprising successes
@pytest.mark.parametrize("argv, words", [
    (["train", QUICKSTART, "--time-budget", "0"], "--time-budget: '0': must be more than 0"),
    (["train", QUICKSTART, "--set", "training.time_budget=0s"], "training.time_budget: '0s': must be more than 0"),
    (["train", QUICKSTART, "--set", "data.classes=['1', '1']"], "data.classes: '1' is listed twice"),
    (["submit", QUICKSTART, "--dry-run", "--search", "training.batch_size=32,32"],
     "search.space.training.batch_size.choice: 32 is given twice"),
])
def test_settings_that_did_nothing_or_one_thing_twice_are_refused(tmp_path, capsys, argv, words):
    _refused(capsys, [*argv, "--run-dir", tmp_path / "run"], words=[words])
    assert not (tmp_path / "run").exists()


def test_more_folds_than_samples_is_refused_and_than_a_class_is_warned(tmp_path, capsys):
    """500 folds over 1,618 digits is fine for the total but not for any class (about 160
    each): a warning; 5,000 folds leave folds with nothing to validate on: exit 2."""
    run = tmp_path / "run"
    _refused(capsys, ["train", QUICKSTART, "--run-dir", run, "--set", "data.folds=5000", "--set", "data.fold=0"],
             words=["data.folds: 5000 folds over 1618 train + validation samples"])
    assert not run.exists()
    assert cli.main(["train", QUICKSTART, "--run-dir", str(run), "--set", "data.folds=500", "--set", "data.fold=0",
                     "--set", "training.epochs=1", "--set", "training.steps_per_epoch=1"]) == 0
    assert "warning: data.folds 500 is more than the samples of class(es) 0 (" in capsys.readouterr().out


def test_infer_with_a_missing_format_file_or_an_unusable_listing_is_one_line(one_epoch_run, tmp_path, capsys):
    """`--model EXPORT/model.onnx` that is not there ran model.keras; a listing whose first
    column is no path (foo,bar) ran with nothing predicted and exit 0."""
    listing = tmp_path / "l.csv"
    listing.write_text("foo,bar\nbaz,qux\n")
    good = tmp_path / "good.csv"
    good.write_text(f"{one_epoch_run / 'plots' / 'training.png'}\n")
    onnx = one_epoch_run / "export" / "model.onnx"
    _refused(capsys, ["infer", "--model", onnx, "--input", good, "--output", tmp_path / "p.csv"],
             words=[f"{onnx}: no such file or folder"])
    _refused(capsys, ["infer", "--model", one_epoch_run, "--input", listing, "--output", tmp_path / "p.csv"],
             words=[f"{listing}: none of its 2 entries is an existing file", "'foo'"])
    assert not (tmp_path / "p.csv").exists()


def test_a_class_folder_added_between_sessions_is_said_to_be_a_data_change(tmp_path, capsys):
    """It said "no readable checkpoint among 2"; now it names the class that came."""
    cfg = _folder_with(tmp_path, [])
    run = tmp_path / "run"
    argv = ["train", str(cfg), "--run-dir", str(run), "--set", "training.batch_size=4",
            "--set", "training.steps_per_epoch=2"]
    assert cli.main(argv + ["--set", "training.epochs=1"]) == 0
    shutil.copytree(tmp_path / "imgs" / "b", tmp_path / "imgs" / "c")
    before = _hashes(run)
    _refused(capsys, argv + ["--set", "training.epochs=2"],
             words=[run / "run.json", "the data's classes changed since this run was trained (added c)", "--restart"])
    assert _hashes(run) == before


def test_an_export_that_no_longer_matches_its_sums_is_warned(one_epoch_run, tmp_path, capsys):
    export = tmp_path / "export"
    shutil.copytree(one_epoch_run / "export", export)
    listing = tmp_path / "l.csv"
    listing.write_text(f"{one_epoch_run / 'plots' / 'training.png'}\n")
    assert cli.main(["infer", "--model", str(export), "--input", str(listing), "--output", str(tmp_path / "a.csv")]) == 0
    assert "SHA256SUMS" not in capsys.readouterr().out
    with open(export / "preprocessing.json", "a") as f:
        f.write("\n")  # still the same JSON, no longer the same bytes
    assert cli.main(["infer", "--model", str(export), "--input", str(listing), "--output", str(tmp_path / "b.csv")]) == 0
    assert f"warning: {export}: preprocessing.json no longer match SHA256SUMS" in capsys.readouterr().out


def test_evaluate_on_a_subset_of_the_classes_averages_over_those_present(one_epoch_run, tmp_path, capsys):
    """macro-F1 was averaged over all 10 classes with zeros for the 8 absent (0.29 at accuracy 0.95)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in ("0", "1"):
        (tmp_path / "two" / c).mkdir(parents=True)
        for i in np.flatnonzero(d.target == int(c))[:15]:
            Image.fromarray(np.round(d.images[i] * 255 / 16).astype(np.uint8)).save(tmp_path / "two" / c / f"{i}.png")
    out = tmp_path / "ev"
    assert cli.main(["evaluate", str(one_epoch_run), "--data", str(tmp_path / "two"), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "macro averages over the 2 classes present; absent from the data: 2, 3, 4, 5, 6, 7, 8, 9" in text
    m = json.loads((out / "metrics.json").read_text())
    assert m["absent_classes"] == [str(i) for i in range(2, 10)]
    present = [row["f1"] for row in m["per_class"] if row["support"] > 0]
    assert len(present) == 2 and m["macro_f1"] == pytest.approx(sum(present) / 2)


def test_a_head_only_first_stage_from_scratch_is_warned(tmp_path, capsys):
    """It trained frozen random features without a word."""
    assert cli.main(["train", QUICKSTART, "--run-dir", str(tmp_path / "run"), "--set", "training.steps_per_epoch=2",
                     "--set", "training.stages=[{epochs: 1, trainable: head}]"]) == 0
    assert "warning: training.stages[0] trains only the head over a backbone that starts random" \
        in capsys.readouterr().out


def test_a_deleted_trial_dir_is_said_in_the_results(small_search, tmp_path):
    """A deleted trial dir showed a 'complete' trial with a blank value and no word."""
    cfg, run, _ = small_search
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "trials" / "000")
    r = _limited(["search", cfg, "--run-dir", copy], tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr, r.stderr
    import csv

    (row,) = list(csv.DictReader(open(copy / "search" / "results.csv")))
    assert row["status"] == "complete" and row["value"] != ""
    assert f"{copy / 'trials' / '000'} is missing (deleted?)" in row["error"]


def test_a_cut_journal_tail_is_said_to_be_a_lost_record(small_search, tmp_path):
    """The journal cut before trial 0's records: the new trial 0 met a trained folder and
    was marked failed with a config-mismatch message; now the message says the journal lost it."""
    cfg, run, _ = small_search
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    journal = copy / "search" / "journal.log"
    lines = journal.read_text().splitlines(keepends=True)
    first_trial = next(i for i, line in enumerate(lines) if json.loads(line)["op_code"] == 4)
    journal.write_text("".join(lines[:first_trial]))
    before = _hashes(copy / "trials")
    r = _limited(["search", cfg, "--run-dir", copy], tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr, r.stderr
    assert "the journal lost records (cut or damaged?)" in r.stdout
    assert "trained with another config" not in r.stdout
    assert _hashes(copy / "trials") == before


def test_infer_where_no_input_is_usable_is_exit_2(one_epoch_run, tmp_path, capsys):
    """A folder of nothing but broken images exited 0 with nothing predicted."""
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in IMAGES:
        shutil.copy(os.path.join(HOSTILE, name), folder / os.path.basename(name))
    out = tmp_path / "p.csv"
    _refused(capsys, ["infer", "--model", one_epoch_run, "--input", folder, "--output", out],
             words=[f"{folder}: no input was usable: {len(IMAGES)} skipped as unreadable", "p.errors.csv"])
    assert len((tmp_path / "p.errors.csv").read_text().splitlines()) == len(IMAGES) + 1


def test_an_idx_folder_with_a_fifo_or_a_header_bomb_is_one_line(tmp_path):
    """Item 7-9's MNIST-style source: a FIFO hung the whole read, a header declaring 4 TB was read to its end."""
    import struct

    for kind in ("fifo", "bomb"):
        folder = tmp_path / kind
        folder.mkdir()
        labels = folder / "train-labels-idx1-ubyte"
        labels.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 2) + bytes([0, 1]))
        images = folder / "train-images-idx3-ubyte"
        if kind == "fifo":
            os.mkfifo(images)
        else:
            images.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 4_000_000, 1000, 1000) + bytes(1 << 20))
        cfg = tmp_path / f"{kind}.yaml"
        cfg.write_text(f"data:\n  source: {folder}\n")
        r = _limited(["prepare", cfg, "--output", tmp_path / "s.h5"], tmp_path)
        words = "a FIFO, not a regular file" if kind == "fifo" else "declares 4,000,000,000,000 bytes"
        _one_line(r, 2, f"{images}: {words}")
