"""Slurm templates, hpcjobs submit, requeue and job states.

The fast tests render and run scripts without Slurm (stub srun/scontrol on PATH).
Tests marked ``slurm`` run against the real local cluster of slurm/local-cluster.sh,
started once per session (skipped when it cannot start, except with CI=true).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from hpcjobs import cli, config, slurm, units
from hpcjobs.config import ConfigError

import forked
from conftest import LEAN_ARGS
from slurm_cluster import job_done, last_job, logs, squeue_states, status, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
DATA = os.path.join(REPO, "tests", "data")
PY = "/opt/venv/bin/python"  # a fixed interpreter path keeps the reference output deterministic
NASTY = ["a'; touch CANARY; echo '", "$(touch CANARY)", "`touch CANARY`", "x\"; touch CANARY; \"", "${HOME:?}",
         "a b & touch CANARY", "100%j"]


def submit(argv: list[str]) -> int:
    return cli.main(["submit", *argv])


# --------------------------------------------------------------------------- reference files
REFERENCES = {
    "sbatch_bede_train.txt": ["configs/bede.yaml", "--run-dir", "/scratch/runs/bede"],
    "sbatch_bede_infer.txt": ["configs/bede.yaml", "--infer", "--run-dir", "/scratch/runs/bede"],
    "sbatch_jade_train.txt": ["configs/jade.yaml", "--nodes", "2", "--run-dir", "/scratch/runs/jade"],
    "sbatch_jade_horovod.txt": ["configs/jade.yaml", "--nodes", "2", "--set", "distribute.strategy=horovod",
                                "--srun-arg=--mpi=pmix", "--run-dir", "/scratch/runs/jade-hvd"],
    "sbatch_bede_horovod_mpirun.txt": ["configs/bede.yaml", "--nodes", "2", "--set", "distribute.strategy=horovod",
                                       "--launcher", "mpirun", "--run-dir", "/scratch/runs/bede-hvd"],
    "sbatch_jade_search.txt": ["configs/jade.yaml", "--search", "optimizer.learning_rate=0.0003,0.001,0.01",
                               "--search", "model.dropout=0.2,0.3,0.5", "--trials-per-node", "8", "--parallel", "2",
                               "--run-dir", "/scratch/runs/jade-search"],
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_dry_run_matches_reference(name, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert submit([*REFERENCES[name], "--python", PY, "--dry-run"]) == 0
    out = capsys.readouterr().out
    path = os.path.join(DATA, name)
    if os.environ.get("HPCJOBS_UPDATE_REFERENCE"):
        with open(path, "w", encoding="utf-8") as f:
            f.write(out)
    with open(path, encoding="utf-8") as f:
        assert out == f.read(), f"rendered output differs from {path} (HPCJOBS_UPDATE_REFERENCE=1 rewrites it)"


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A fresh venv whose packages come first, then those of the environment running the
    tests (a virtualenv's, the system's, the user's), with their .pth files processed; made
    without pip of its own (this environment's pip installs into it with --python).

    ``--system-site-packages`` would not do: from inside a virtualenv it reaches the *base*
    interpreter's site-packages, which need not hold the project's dependencies (submitit)."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)]
    with open(os.path.join(own, "zz-outer-environment.pth"), "w", encoding="utf-8") as f:
        f.write("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in ours) + "\n")
    return venv


def test_a_fresh_venv_sees_this_environment_after_its_own(fresh_venv, tmp_path):
    python = str(fresh_venv / "bin" / "python")
    code = "import sys, submitit, yaml; print(sys.prefix); print(submitit.__file__)"
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=""))
    prefix, where = r.stdout.split()
    import submitit

    assert prefix == str(fresh_venv) and where == submitit.__file__


def test_a_wheel_install_renders_the_same_scripts(fresh_venv, tmp_path):
    """A non-editable install (a wheel in a fresh venv, run outside the repository)
    finds the templates it carries and renders exactly the pinned script."""
    # built from a copy: pip builds in the tree it is given (build/, hpcjobs.egg-info), and the checkout
    # may be in use by another build at the same time (.ci/run's fresh virtualenv installs from it)
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".slurm-local", ".pytest_cache", ".benchmarks", "build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel")], check=True, cwd=tmp_path)
    venv = fresh_venv
    wheel, = (tmp_path / "wheel").glob("hpcjobs-*.whl")
    # --ignore-installed: the hpcjobs the running environment has (editable, or an egg-info on
    # PYTHONPATH) is visible in the venv too, and must not stop the wheel's own install
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--ignore-installed", str(wheel)], check=True)
    name = "sbatch_bede_train.txt"
    argv = [a if not a.startswith("configs/") else os.path.join(REPO, a) for a in REFERENCES[name]]
    r = subprocess.run([str(venv / "bin" / "hpcjobs"), "submit", *argv, "--python", PY, "--dry-run"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env=dict(os.environ, PYTHONPATH=""))
    assert r.returncode == 0, r.stderr
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import hpcjobs.slurm as s; print(s.TEMPLATE_DIR)"],
                           capture_output=True, text=True, cwd=tmp_path,
                           env=dict(os.environ, PYTHONPATH="")).stdout.strip()
    assert where == str(venv / "share" / "hpcjobs" / "slurm")
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        assert r.stdout == f.read()


def test_dry_run_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert submit([QUICKSTART, "--run-dir", str(run), "--dry-run"]) == 0
    assert not run.exists()
    assert capsys.readouterr().out.startswith("#!/bin/bash\n")


# --------------------------------------------------------------------------- render
def _params(**kw):
    p = dict(python=PY, run_dir="/r/run", config="/r/run/config.yaml", job_name="t", time="01:00:00")
    p.update(kw)
    return p


def _search_params(**kw):
    p = _params(**kw)
    del p["config"]
    return p


def test_unknown_parameter_lists_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        slurm.render("train", **_params(gpus=4))
    msg = str(e.value)
    assert "gpus" in msg and "gpus_per_node" in msg and "signal_margin" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="valid: train, infer, search"):
        slurm.render("predict", **_params())
    with pytest.raises(ConfigError, match="array"):
        slurm.render("search", **_search_params())  # required: array


def test_every_placeholder_is_filled_and_scripts_parse(tmp_path):
    scripts = [slurm.render("train", **_params(modules=("cuda/11.8",), activate="/v/bin/activate")),
               slurm.render("infer", **_params(array=3)),
               slurm.render("search", **_search_params(array=4, array_parallel=2))]
    for text in scripts:
        assert "{{" not in text and "}}" not in text
        path = tmp_path / "s.sh"
        path.write_text(text)
        subprocess.run(["bash", "-n", str(path)], check=True)
    assert "#SBATCH --array=0-3%2" in scripts[2] and "%x-%A_%a.out" in scripts[2]
    assert "#SBATCH --array=0-2" in scripts[1]


def test_a_placeholder_the_renderer_does_not_know_is_an_error(monkeypatch):
    real = slurm.read_template
    monkeypatch.setattr(slurm, "read_template", lambda name: real(name) + "{{partiton}}\n")
    with pytest.raises(ConfigError, match="partiton"):
        slurm.render("train", **_params())


@pytest.mark.parametrize("text,expected", [("1", "00:01:00"), ("90", "01:30:00"), ("90m", "01:30:00"),
                                           ("2d", "2-00:00:00"), ("2-00:00:00", "2-00:00:00"),
                                           ("04:00:00", "04:00:00"), ("1-12", "1-12:00:00")])
def test_slurm_time_formats(text, expected):
    assert units.format_slurm_time(text) == expected


@pytest.mark.parametrize("text,expected", [("64G", "64G"), ("500m", "500M"), ("64GiB", "65536M"), ("2GB", "1908M")])
def test_mem_formats(text, expected):
    assert units.format_slurm_mem(text) == expected


@pytest.mark.parametrize("kw,match", [
    (dict(job_name="a\nb"), "line break"),
    (dict(job_name="a/b"), "'/'"),
    (dict(partition="gpu; rm -rf ~"), "not a Slurm name"),
    (dict(time="30s"), "minimum"),
    (dict(time="1", signal_margin=120), "signal_margin"),
    (dict(mem="lots"), "mem"),
    (dict(modules=("cuda 11",)), "one module"),
    (dict(extra_sbatch=("rm -rf ~",)), "extra_sbatch"),
    (dict(srun_args=("$(id)",)), "srun_args"),
    (dict(nodes=0), "nodes"),
])
def test_invalid_values_are_one_line_errors(kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        slurm.render("train", **_params(**kw))
    assert "\n" not in str(e.value).replace("\\n", "")


@pytest.mark.parametrize("bad", ["/r/run\n", "relative/run", ""])
def test_bad_paths_are_refused(bad):
    with pytest.raises(ConfigError):
        slurm.render("train", **_params(run_dir=bad))


# --------------------------------------------------------------------------- injection
def _settings_and_setup(script: str) -> str:
    """The part of a rendered script that assigns settings and loads the environment."""
    return script.split("# ---- run ----")[0]


@pytest.mark.parametrize("nasty", NASTY)
def test_injection_strings_render_inert(nasty, tmp_path):
    run_dir = str(tmp_path / nasty)
    module = nasty.replace(" ", "_")
    text = slurm.render("train", **_params(run_dir=run_dir, config=run_dir + "/config.yaml", job_name=nasty,
                                           python=run_dir + "/bin/python", modules=(module,),
                                           activate=run_dir + "/bin/activate",
                                           extra_sbatch=(f"--comment={nasty}",), srun_args=(f"--comment={nasty}",)))
    # 1. #SBATCH lines: sbatch reads them with shell quoting rules; each must stay one option
    sbatch = [line[len("#SBATCH "):] for line in text.splitlines() if line.startswith("#SBATCH ")]
    words = [shlex.split(line) for line in sbatch]
    assert all(len(w) == 1 for w in words), words
    opts = dict(w[0].split("=", 1) for w in words if "=" in w[0])
    assert opts["--job-name"] == nasty
    assert opts["--comment"] == nasty
    assert opts["--output"] == os.path.join(run_dir.replace("%", "%%"), "slurm", "%x-%j.out")
    # 2. the settings and environment lines, run by bash with module/source stubbed out
    probe = tmp_path / "probe.sh"
    probe.write_text("module() { printf 'module=%s\\n' \"$@\"; }\nsource() { printf 'source=%s\\n' \"$@\"; }\n"
                     + _settings_and_setup(text)
                     + 'printf "%s\\n" "PYTHON=$PYTHON" "CONFIG=$CONFIG" "RUN_DIR=$RUN_DIR"\n'
                     + 'printf "launch=%s\\n" "${LAUNCH[@]}"\n')
    out = subprocess.run(["bash", str(probe)], capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    lines = out.split("\n")
    assert f"PYTHON={run_dir}/bin/python" in lines
    assert f"CONFIG={run_dir}/config.yaml" in lines
    assert f"RUN_DIR={run_dir}" in lines
    assert f"module={module}" in lines
    assert f"source={run_dir}/bin/activate" in lines
    assert "launch=srun" in lines and f"launch=--comment={nasty}" in lines
    assert not (tmp_path / "CANARY").exists()


@pytest.mark.parametrize("field,value", [("job_name", "a\nrm -rf ~"), ("partition", "gpu\n#SBATCH --x"),
                                         ("activate", "/v/bin/activate\nrm -rf ~"), ("modules", ("a\nb",))])
def test_line_breaks_never_reach_a_script(field, value):
    with pytest.raises(ConfigError, match="line break"):
        slurm.render("train", **_params(**{field: value}))


# --------------------------------------------------------------------------- Slurm's own #SBATCH parser
# sbatch reads #SBATCH lines with its own rules, not bash's: a backslash escapes even inside
# single quotes, so shlex quoting alone let this name add --hold and --mail-user (issue 17).
INJECTING = "x\\'\" --hold --mail-user=evil@example.com --comment=\\"
REFUSED = [INJECTING, "a\\b", "x\\", "it\\'s", "\\'", "my hetjob", "PackJob"]
# values that reach an #SBATCH line intact: quotes of either kind (odd counts too), '#', spaces,
# option-like text, '%', non-ASCII
ACCEPTED = NASTY + ["a'b", 'a"b', "'", '"', "x' --hold '", "a # b", "--hold --mail-user=evil@example.com",
                    "%x-%j", "é ü", "a:b", "-x"]


@pytest.mark.parametrize("route", ["--set", "--job-name", "--sbatch"])
@pytest.mark.parametrize("value", REFUSED)
def test_values_slurm_would_misread_are_refused_in_one_line(value, route, tmp_path, capsys):
    run = tmp_path / "run"
    argv = {"--set": ["--set", f"slurm.job_name={value}"], "--job-name": ["--job-name", value],
            "--sbatch": [f"--sbatch=--comment={value}"]}[route]
    assert submit([QUICKSTART, "--run-dir", str(run), "--dry-run", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert ("slurm.extra_sbatch" if route == "--sbatch" else "slurm.job_name") in err
    assert submit([QUICKSTART, "--run-dir", str(run), *argv]) == 2  # and without --dry-run: nothing written
    assert not run.exists()


def test_the_python_api_refuses_them_too(tmp_path):
    cfg = config.load(QUICKSTART)
    with pytest.raises(ConfigError, match="slurm.job_name.*backslash"):
        slurm.submit(cfg, str(tmp_path / "run"), job_name=INJECTING)
    assert not (tmp_path / "run").exists()


def test_the_parser_model_reads_what_sbatch_reads():
    # what sbatch 22.05 --test-only reported for these lines (see test_sbatch_reads_what_the_model_reads)
    assert slurm.slurm_arguments("--job-name=" + shlex.quote(INJECTING)) == [
        "--job-name=x'\"'", "--hold", "--mail-user=evil@example.com", "--comment='"]
    assert slurm.slurm_arguments("--job-name='a\\\\b' # note") == ["--job-name=a\\b"]
    assert slurm.slurm_arguments("-C het'job'") == ["-C", "hetjob"]
    for bad in ["-C :x", "-C hetjob", "--comment='a", "--comment=\"a\\\""]:
        with pytest.raises(ValueError):
            slurm.slurm_arguments(bad)


@pytest.mark.parametrize("value", ACCEPTED)
def test_accepted_values_are_one_option_per_sbatch_line(value):
    text = slurm.render("train", **_params(job_name=value, extra_sbatch=(f"--comment={value}", f"-C {value}")))
    lines = [line[len("#SBATCH "):] for line in text.splitlines() if line.startswith("#SBATCH ")]
    words = [slurm.slurm_arguments(line) for line in lines]
    assert all(len(w) == 1 for w in words[:-1]) and words[-1] == ["-C", value], words
    assert f"--job-name={value}" in [w[0] for w in words] and f"--comment={value}" in [w[0] for w in words]



# --------------------------------------------------------------------------- flags and config
def test_flags_override_the_config(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("base: %s\nslurm:\n  partition: gpu\n  nodes: 4\n  time: '02:00:00'\n  modules: [a/1]\n"
                   % QUICKSTART)
    assert submit([str(cfg), "--run-dir", str(tmp_path / "r"), "--dry-run", "--nodes", "2", "--gpus-per-node", "4",
                   "--time", "04:00:00", "--partition", "big", "--module", "b/2", "--qos", "high",
                   "--account", "proj1", "--cpus-per-task", "8", "--mem", "64G", "--job-name", "jn",
                   "--sbatch=--constraint=v100", "--max-requeues", "3", "--signal-margin", "60"]) == 0
    out = capsys.readouterr().out
    for line in ["#SBATCH --partition=big", "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --time=04:00:00",
                 "#SBATCH --qos=high", "#SBATCH --account=proj1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64G",
                 "#SBATCH --job-name=jn", "#SBATCH --constraint=v100", "#SBATCH --signal=B:USR1@60",
                 "MAX_REQUEUES=3", "module load b/2"]:
        assert line in out.splitlines(), line
    assert "module load a/1" not in out


def test_horovod_runs_one_task_per_gpu(tmp_path, capsys):
    assert submit([QUICKSTART, "--run-dir", str(tmp_path), "--dry-run", "--gpus-per-node", "4",
                   "--set", "distribute.strategy=horovod"]) == 0
    assert "#SBATCH --ntasks-per-node=4" in capsys.readouterr().out


def test_flag_errors_name_the_flag(tmp_path, capsys):
    assert submit([QUICKSTART, "--run-dir", str(tmp_path), "--dry-run", "--time", "1"]) == 2
    err = capsys.readouterr().err
    assert "--signal-margin" in err or "signal_margin" in err
    assert len(err.strip().splitlines()) == 1


def test_search_flags_become_a_grid_of_search_workers(tmp_path, capsys, monkeypatch):
    # --search KEY=V1,V2: the search: section's grid, pulled by the same workers as a bare --search
    monkeypatch.setattr(slurm, "_sbatch", lambda script, extra=(): "4242")
    run = tmp_path / "search"
    assert submit([QUICKSTART, "--run-dir", str(run), "--search", "optimizer.learning_rate=0.001,0.01",
                   "--search", "model.dropout=0.3,0.5,0.7"]) == 0
    script = (run / "slurm" / "trials.sbatch").read_text()
    assert "#SBATCH --array=0-5" in script  # one task per grid point (--trials-per-node 1)
    cfg = config.load(str(run / "config.yaml"))
    assert cfg.search.method == "grid" and cfg.search.trials is None and cfg.slurm.search == ()
    assert {k: v.choice for k, v in cfg.search.space.items()} == {"optimizer.learning_rate": (0.001, 0.01),
                                                                   "model.dropout": (0.3, 0.5, 0.7)}
    assert "submitted trials job 4242" in capsys.readouterr().out
    assert slurm.read_jobs(str(run))[0]["job_id"] == "4242"
    # a value that does not fit the config is caught at submission, in one line
    assert submit([QUICKSTART, "--run-dir", str(tmp_path / "bad"), "--search", "model.dropout=0.3,2"]) == 2
    err = capsys.readouterr().err
    assert "search.space.model.dropout" in err and len(err.strip().splitlines()) == 1
    assert submit([QUICKSTART, "--run-dir", str(tmp_path / "both"), "--search", "--search", "model.dropout=0.3"]) == 2
    assert "not both" in capsys.readouterr().err


def test_folds_become_an_array_of_fold_runs(tmp_path, capsys):
    run = tmp_path / "cv"
    assert submit([QUICKSTART, "--run-dir", str(run), "--set", "data.folds=3", "--folds", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-2\n" in out and "TASK_DIR=folds/fold-%d" in out
    assert [line for line in out.splitlines() if line.startswith("# folds/")] == \
        [f"# folds/fold-{i}: --set data.fold={i}" for i in range(3)]
    assert not run.exists()


@pytest.mark.parametrize("sets, extra, words", [
    ([], [], "data.folds"),
    (["data.folds=3", "data.fold=1"], [], "data.fold is 1"),
    (["data.folds=3"], ["--array", "2"], "not with --infer, --array or --search"),
])
def test_folds_that_cannot_be_an_array_are_one_line(tmp_path, capsys, sets, extra, words):
    argv = [QUICKSTART, "--run-dir", str(tmp_path / "cv"), "--folds", *extra, *sum((["--set", x] for x in sets), [])]
    assert submit(argv + ["--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--folds" in err and words in err and len(err.strip().splitlines()) == 1


def test_array_repeats_with_consecutive_seeds(tmp_path, monkeypatch):
    monkeypatch.setattr(slurm, "_sbatch", lambda script, extra=(): "7")
    assert submit([QUICKSTART, "--run-dir", str(tmp_path), "--array", "3", "--set", "training.seed=5"]) == 0
    seeds = [config.load(str(tmp_path / f"trial-{i:03d}" / "config.yaml")).training.seed for i in range(3)]
    assert seeds == [5, 6, 7]


def test_slot_chain(tmp_path, monkeypatch, capsys):
    import datetime as dt

    calls = []

    def fake_sbatch(script, extra=()):
        calls.append(list(extra))
        return str(100 + len(calls))

    monkeypatch.setattr(slurm, "_sbatch", fake_sbatch)
    s = config.SlurmConfig(slot="01:00:00", slot_at="22:00", slot_count=3)
    begins = slurm.slot_begins(s, now=dt.datetime(2026, 1, 5, 23, 0, 0))
    assert [b.isoformat() for b in begins] == ["2026-01-06T22:00:00", "2026-01-07T22:00:00", "2026-01-08T22:00:00"]
    assert slurm.slot_begins(config.SlurmConfig(slot="2h", slot_at="06:30", slot_every="12h", slot_count=2),
                             now=dt.datetime(2026, 1, 5, 1, 0))[1].isoformat() == "2026-01-05T18:30:00"
    run = tmp_path / "slots"
    assert submit([QUICKSTART, "--run-dir", str(run), "--slot", "01:00:00", "--at", "22:00", "--count", "3",
                   "--signal-margin", "300"]) == 0
    assert [c[0].startswith("--begin=") for c in calls] == [True] * 3
    assert [c[1:] for c in calls] == [[], ["--dependency=afterany:101"], ["--dependency=afterany:102"]]
    script = (run / "slurm" / "train.sbatch").read_text()
    assert "#SBATCH --time=01:00:00" in script and "ON_STOP=next-slot" in script and "--no-requeue" in script
    assert [j["job_id"] for j in slurm.read_jobs(str(run))] == ["101", "102", "103"]
    assert submit([QUICKSTART, "--run-dir", str(run), "--slot", "01:00:00", "--dry-run"]) == 2  # no --at
    assert "--at" in capsys.readouterr().err


def test_missing_sbatch_is_a_user_error_naming_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert submit([QUICKSTART, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "sbatch" in err and "local-cluster.sh" in err and len(err.strip().splitlines()) == 1


def test_job_states_without_slurm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    os.makedirs(tmp_path / "slurm")
    (tmp_path / "slurm" / "jobs.json").write_text(json.dumps([{"job_id": "12", "kind": "train"}]))
    assert slurm.job_states(str(tmp_path)) == ["job 12 (train): unknown (no Slurm commands here)"]
    assert slurm.job_states(str(tmp_path / "nothing")) == []


# --------------------------------------------------------------------------- the script's logic, stubbed
FAKE_BIN = {
    # srun: drop its options, run the command
    "srun": 'while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n',
    "scontrol": 'echo "scontrol $*" >>"$CALLS"\n',
    # mpirun: record its options, run the command (the job body's `bash -c ...`)
    "mpirun": 'echo "mpirun $*" >>"$CALLS"\nwhile [ "$1" != bash ]; do shift; done\nexec "$@"\n',
}
FAKE_PYTHON = textwrap.dedent("""\
    import os, signal, sys, time
    # a stand-in for python: the real one for -c and for the run-record check; else a training that does what $FAKE says
    if sys.argv[1] == "-c" or sys.argv[1:3] == ["-m", "hpcjobs.rundir"]:
        os.execv(sys.executable, [sys.executable] + sys.argv[1:])
    calls = open(os.environ["CALLS"], "a", buffering=1)
    calls.write("train " + " ".join(sys.argv[1:]) + "\\n")
    mode = os.environ["FAKE"]
    if mode == "signal":
        def stop(signum, frame):
            calls.write("task got USR1\\n")
            sys.exit(75)
        signal.signal(signal.SIGUSR1, stop)  # like the training loop: over the inherited SIG_IGN
        calls.write("ready\\n")
        time.sleep(30)
        sys.exit(1)
    sys.exit({"exit75": 75, "exit0": 0}[mode])
""")


@pytest.fixture
def stubbed(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE_BIN.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    py = bin_dir / "python"
    py.write_text(f"#!{sys.executable}\n" + FAKE_PYTHON)
    py.chmod(0o755)
    run = tmp_path / "run"
    run.mkdir()
    calls = tmp_path / "calls"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(calls), REAL_PYTHON=sys.executable,
               SLURM_JOB_ID="77", SLURM_JOB_NODELIST="node1")

    def run_script(template="train", restarts=0, extra_env=None, **params):
        p = _params(python=str(py), run_dir=str(run), config=str(run / "config.yaml"), max_requeues=2)
        if template == "search":
            del p["config"]
            p.update(array=2)
        p.update(params)
        script = tmp_path / f"{template}.sh"
        script.write_text(slurm.render(template, **p))
        e = dict(env, SLURM_RESTART_COUNT=str(restarts), **(extra_env or {}))
        return subprocess.Popen(["bash", str(script)], env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def calls_text():
        return calls.read_text() if calls.exists() else ""

    return run_script, calls_text, run


def test_script_requeues_on_75_and_exits_0(stubbed):
    run_script, calls, run = stubbed
    p = run_script(extra_env={"FAKE": "exit75"})
    out = p.communicate(timeout=30)[0]
    assert p.returncode == 0, out
    assert f"train -m hpcjobs train {run}/config.yaml --run-dir {run}" in calls()
    assert "scontrol requeue 77" in calls()


def test_script_requeues_an_array_task_by_its_array_id(stubbed):
    run_script, calls, run = stubbed
    p = run_script(extra_env={"FAKE": "exit75", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3"})
    assert p.wait(timeout=30) == 0
    assert "scontrol requeue 70_3" in calls()
    p = run_script("search", extra_env={"FAKE": "exit75", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "1"})
    assert p.wait(timeout=30) == 0
    assert f"--run-dir {run}/trial-001" in calls() and "scontrol requeue 70_1" in calls()


def test_script_stops_requeueing_after_max_requeues(stubbed):
    run_script, calls, run = stubbed
    p = run_script(restarts=2, extra_env={"FAKE": "exit75"})
    out = p.communicate(timeout=30)[0]
    assert p.returncode == 75 and "requeues used" in out
    assert "scontrol" not in calls()


def test_script_in_a_slot_chain_leaves_the_rest_to_the_next_slot(stubbed):
    run_script, calls, run = stubbed
    p = run_script(on_stop="next-slot", extra_env={"FAKE": "exit75"})
    assert p.wait(timeout=30) == 0
    assert "scontrol" not in calls()


def test_script_exits_early_when_the_run_is_finished(stubbed):
    run_script, calls, run = stubbed
    (run / "run.json").write_text(json.dumps({"status": "finished"}))
    p = run_script(extra_env={"FAKE": "exit75"})
    out = p.communicate(timeout=30)[0]
    assert p.returncode == 0 and "finished already" in out
    assert calls() == ""


def test_script_passes_usr1_on_to_the_training(stubbed):
    run_script, calls, run = stubbed
    p = run_script(extra_env={"FAKE": "signal"})
    deadline = time.monotonic() + 20
    while "ready" not in calls() and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)
    out = p.communicate(timeout=30)[0]
    assert "task got USR1" in calls(), out
    assert "scontrol requeue 77" in calls() and p.returncode == 0


def test_mpirun_launcher_starts_the_step_and_turns_term_into_usr1(stubbed):
    # under mpirun a TERM (preemption, scancel) would kill the ranks: they are sent USR1 instead
    run_script, calls, run = stubbed
    p = run_script(launcher="mpirun", mpirun_args=("--mca btl self,tcp",), extra_env={"FAKE": "signal"})
    deadline = time.monotonic() + 20
    while "ready" not in calls() and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=30)[0]
    launched = next(line for line in calls().splitlines() if line.startswith("mpirun "))
    assert launched.startswith("mpirun --bind-to none --mca btl self,tcp") and "--cpus-per-task" not in launched
    assert ("--allow-run-as-root" in launched) == (os.geteuid() == 0)
    assert "passing SIGUSR1 to the step" in out and "task got USR1" in calls(), out
    assert "scontrol requeue 77" in calls() and p.returncode == 0


def test_launcher_is_srun_or_mpirun(tmp_path, capsys):
    assert submit([QUICKSTART, "--run-dir", str(tmp_path / "r"), "--launcher", "pdsh", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--launcher" in err and "srun or mpirun" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="slurm.launcher"):
        slurm.submit(QUICKSTART, str(tmp_path / "s"), launcher="mpirun")


def test_every_template_runs_the_one_shared_job_body():
    with open(os.path.join(REPO, "slurm", "_job_body.sh"), encoding="utf-8") as f:
        body = f.read()
    scripts = {"train": slurm.render("train", **_params()), "infer": slurm.render("infer", **_params(array=2)),
               "search": slurm.render("search", **_search_params(array=2))}
    for name, text in scripts.items():
        assert text.count(body) == 1, name
        assert text.count("trap 'forward USR1' USR1") == 1 and text.count('scontrol requeue "$job"') == 1, name


def test_a_partial_the_renderer_does_not_know_is_an_error(monkeypatch):
    real = slurm.read_template
    monkeypatch.setattr(slurm, "read_template", lambda name: real(name) + "{{> job_bdy}}\n")
    with pytest.raises(ConfigError, match="job_bdy.*valid: job_body"):
        slurm.render("train", **_params())


def test_inference_script_requeues_on_75_and_passes_usr1_on(stubbed):
    run_script, calls, run = stubbed
    p = run_script("infer", extra_env={"FAKE": "exit75", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "1"},
                   array=2)
    out = p.communicate(timeout=30)[0]
    assert p.returncode == 0, out
    assert f"-m hpcjobs infer {run}/config.yaml --run-dir {run}" in calls() and "scontrol requeue 70_1" in calls()
    p = run_script("infer", extra_env={"FAKE": "signal"})
    deadline = time.monotonic() + 20
    while "ready" not in calls().split("scontrol requeue 70_1")[-1] and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)
    out = p.communicate(timeout=30)[0]
    assert "task got USR1" in calls(), out
    assert "scontrol requeue 77" in calls() and p.returncode == 0


# --------------------------------------------------------------------------- the local cluster
def sbatch_sees(script: str, tmp_path) -> dict | None:
    """The options ``sbatch -vv --test-only`` reads from a script (its "defined options", without
    test-only and verbose); None when sbatch refuses the script outright."""
    path = tmp_path / "probe.sbatch"
    path.write_text(script)
    p = subprocess.run(["sbatch", "-vv", "--test-only", str(path)], capture_output=True, text=True, timeout=60)
    block = re.search(r"defined options\n[^\n]*\n(.*?)sbatch: -+ -+\nsbatch: end of defined options", p.stderr, re.S)
    if block is None:
        assert "fatal" in p.stderr, p.stderr[-2000:]
        return None
    opts = dict(re.findall(r"^sbatch: (\S+)\s+: (.*)$", block.group(1), re.M))
    return {k: v for k, v in opts.items() if k not in ("test-only", "verbose")}


@pytest.mark.slurm
@pytest.mark.parametrize("value", ACCEPTED)
def test_sbatch_sees_one_option_per_line_for_every_accepted_value(value, cluster, tmp_path):
    run_dir = str(tmp_path / "run")
    text = slurm.render("train", **_params(run_dir=run_dir, config=run_dir + "/config.yaml", job_name=value,
                                           extra_sbatch=(f"--comment={value}",)))
    options = [line.split()[1].split("=")[0][2:] for line in text.splitlines() if line.startswith("#SBATCH ")]
    seen = sbatch_sees(text, tmp_path)
    assert seen is not None and sorted(seen) == sorted(options), seen
    assert seen["job-name"] == value and seen["comment"] == value
    assert seen["output"] == os.path.join(run_dir, "slurm", "%x-%j.out")


@pytest.mark.slurm
@pytest.mark.parametrize("value", REFUSED + ["a'b", 'a"b', "a # b", "x' --hold '", "a'b\\"])
def test_sbatch_reads_what_the_parser_model_reads(value, cluster, tmp_path):
    """slurm_arguments against the real sbatch, on lines quoted by shlex alone (no check):
    the refused values do inject options, or make sbatch refuse the script."""
    line = "--job-name=" + shlex.quote(value)
    try:
        model = slurm.slurm_arguments(line)
    except ValueError:
        model = None
    seen = sbatch_sees(f"#!/bin/bash\n#SBATCH {line}\n#SBATCH --time=1\ntrue\n", tmp_path)
    if model is None:
        assert seen is None
        return
    expected = {"time": "00:01:00"}
    for arg in model:
        name, eq, v = arg[2:].partition("=")
        expected[name] = v if eq else "set"
    assert seen == expected


@pytest.mark.slurm
def test_folds_run_as_an_array_and_the_parent_sums_them_up(on_cluster, tmp_path, capsys):
    run = tmp_path / "cv"
    assert submit([QUICKSTART, "--run-dir", str(run), "--folds", "--time", "5", "--set", "data.folds=3",
                   "--set", "training.epochs=1", "--set", "training.steps_per_epoch=8", *LEAN_ARGS]) == 0
    assert status(run)["fold_status"] == ["not started"] * 3  # written at submission
    job = last_job(run)
    wait_for(lambda: job_done(job, 3), 300, "the three fold tasks", job, run)
    st = status(run)
    assert st["status"] == "finished" and st["fold_status"] == ["finished"] * 3, logs(run)[-3000:]
    accs = [status(run / "folds" / f"fold-{i}")["test_accuracy"] for i in range(3)]
    summary = st["fold_summary"]["test_accuracy"]
    assert summary["n"] == 3 and summary["mean"] == pytest.approx(sum(accs) / 3)
    capsys.readouterr()
    assert cli.main(["status", str(run)]) == 0
    assert "test_accuracy: mean" in capsys.readouterr().out


@pytest.mark.slurm
def test_job_array_of_four_with_hostile_names(on_cluster, tmp_path):
    """A job array of 4 trainings; the job name and run directory are injection strings."""
    hostile = "x'; touch CANARY; $(touch CANARY) `touch CANARY` \"%j"
    run = tmp_path / hostile
    assert submit([QUICKSTART, "--run-dir", str(run), "--array", "4", "--job-name", hostile, "--time", "5",
                   "--set", "training.epochs=1", *LEAN_ARGS]) == 0
    job = last_job(run)
    wait_for(lambda: job_done(job, 4), 240, "the 4 array tasks", job, run)
    assert squeue_states(job) == ["COMPLETED"] * 4
    for i in range(4):
        st = status(run / f"trial-{i:03d}")
        assert st["status"] == "finished", logs(run)[-3000:]
    out_files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(str(run)), "slurm", "*.out")))
    assert out_files == [f"{hostile}-{job}_{i}.out" for i in range(4)]
    assert not glob.glob(str(tmp_path / "CANARY")) and not os.path.exists(os.path.join(REPO, "CANARY"))
    states = slurm.job_states(str(run))
    assert len(states) == 1 and states[0].count("COMPLETED") == 4, states
    shown = subprocess.run(["scontrol", "show", "job", f"{job}_0"], capture_output=True, text=True).stdout
    assert f"JobName={hostile}" in shown


@pytest.mark.slurm
def test_slot_chain_is_queued_with_begin_times_and_dependencies(on_cluster, tmp_path):
    import datetime as dt

    at = (dt.datetime.now() + dt.timedelta(hours=2)).strftime("%H:%M")
    run = tmp_path / "slots"
    assert submit([QUICKSTART, "--run-dir", str(run), "--slot", "00:10:00", "--at", at, "--count", "3",
                   "--signal-margin", "60"]) == 0
    jobs = [j["job_id"] for j in slurm.read_jobs(str(run))]
    try:
        shown = {}
        for job in jobs:
            out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
            shown[job] = dict(re.findall(r"(\w+)=(\S+)", out))
        assert [shown[j]["JobState"] for j in jobs] == ["PENDING"] * 3
        assert [shown[j]["TimeLimit"] for j in jobs] == ["00:10:00"] * 3
        assert shown[jobs[0]]["Reason"] == "BeginTime" and shown[jobs[0]]["StartTime"].endswith(f"T{at}:00")
        assert shown[jobs[1]]["Dependency"].startswith(f"afterany:{jobs[0]}")
        assert shown[jobs[2]]["Dependency"].startswith(f"afterany:{jobs[1]}")
        states = slurm.job_states(str(run))
        assert [s.split(": ")[1].split()[0] for s in states] == ["PENDING"] * 3, states
    finally:
        subprocess.run(["scancel", *jobs], capture_output=True)


def test_infer_array_dry_run_shows_the_merge_job(tmp_path, capsys):
    assert submit([QUICKSTART, "--infer", "--array", "3", "--run-dir", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    first, merge = out.split("# then, after the array (sbatch --dependency=afterok:<array job>):\n")
    assert "#SBATCH --array=0-2" in first and "INFER_ARGS=()" in first
    assert "#SBATCH --array" not in merge and "INFER_ARGS=(--merge)" in merge
    assert "#SBATCH --job-name=quickstart-infer-merge" in merge


@pytest.mark.slurm
def test_inference_array_then_merge(on_cluster, tmp_path):
    from sklearn.datasets import load_digits
    import numpy as np

    run = tmp_path / "trained"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    assert forked.run(["train", QUICKSTART, "--run-dir", run, "--set", "training.epochs=1", *LEAN_ARGS], env=env).returncode == 0
    images = (load_digits().images[:200] * 16).astype("uint8")[..., None]
    np.savez(tmp_path / "in.npz", images=images)
    out = tmp_path / "preds.csv"
    assert submit([QUICKSTART, "--infer", "--array", "2", "--run-dir", str(run), "--time", "5",
                   "--set", f"infer.input={tmp_path / 'in.npz'}", "--set", f"infer.output={out}"]) == 0
    jobs = slurm.read_jobs(str(run))
    assert [j["kind"] for j in jobs] == ["infer", "infer-merge"]
    wait_for(lambda: job_done(jobs[1]["job_id"]), 180, "the inference array and its merge", jobs[1]["job_id"], run)
    assert squeue_states(jobs[0]["job_id"]) == ["COMPLETED"] * 2 and squeue_states(jobs[1]["job_id"]) == ["COMPLETED"]
    with open(out) as f:
        assert len(f.read().strip().splitlines()) == 201  # a header and one row per image
