"""The feed check at a session's start (issue 26 item 6): the feeder's samples/s against
the train step's, the headroom printed and put into run.json, one warning line naming what
to change when the feed is the bottleneck; the check trains nothing the run keeps.

The warning's decision is plain arithmetic on two figures (``verdict``), tested with given
figures.  The end-to-end runs do not bet on the machine's speed: the quickstart's in-memory
feed of 8x8 images is compared at the default threshold (its headroom is tens of times the
threshold; printed in the test's output), and the input-bound run is made so through a
real knob: a disk feed with a read-ahead of a few rows, held to a headroom no feed reaches
(data.feed_headroom=1e6)."""
from __future__ import annotations

import json
import os

import pytest

from hpcjobs import cli
from hpcjobs.train.feedcheck import advice, verdict

from conftest import QUICKSTART

ONE_EPOCH = ["--set", "training.epochs=1"]


def _train(run, *sets) -> dict:
    assert cli.main(["train", QUICKSTART, "--run-dir", str(run), *ONE_EPOCH, *sets]) == 0
    with open(os.path.join(run, "run.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def unchecked(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("runs") / "unchecked")  # auto, outside a Slurm job: no check


def test_verdict_warns_below_the_headroom_and_names_the_knob():
    assert verdict(3000.0, 1000.0, 1.2, "memory", None, 4) == (3.0, None)
    headroom, line = verdict(1000.0, 2000.0, 1.2, "disk", False, 4)
    assert headroom == 0.5
    assert line.startswith("warning: the input is the bottleneck") and "\n" not in line
    assert "data.feed: hybrid or memory" in line and "data.memory_budget" in line and "data.stage: auto" in line
    assert verdict(1100.0, 1000.0, 1.2, "hybrid", True, 4)[1] is not None  # 1.1x: below the 1.2 asked for
    assert verdict(1200.0, 1000.0, 1.2, "hybrid", True, 4)[1] is None


def test_advice_by_feed():
    assert "data.memory_budget" in advice("hybrid", False, 2) and "data.stage: auto" in advice("hybrid", False, 2)
    assert "data.stage" not in advice("hybrid", True, 2)  # staged already
    assert "data.stage" not in advice("disk", None, 2)  # not a store: nothing to stage
    assert "CPUs per task" in advice("memory", None, 3) and "has 3" in advice("memory", None, 3)


def test_quickstart_is_checked_silently_and_ends_bitwise_equal_to_a_run_without_the_check(unchecked, tmp_path,
                                                                                         capsys):
    rec = _train(tmp_path / "checked", "--set", "data.feed_check=true")  # auto: only in a Slurm job
    out = capsys.readouterr().out
    print(out)
    check = rec["feed_check"]
    assert set(check) == {"feed_samples_per_s", "step_samples_per_s", "headroom"}
    assert check["feed_samples_per_s"] > 0 and check["step_samples_per_s"] > 0
    assert check["headroom"] == pytest.approx(check["feed_samples_per_s"] / check["step_samples_per_s"], rel=1e-3)
    lines = [x for x in out.splitlines() if x.startswith("feed check: memory feed")]
    assert len(lines) == 1 and "headroom" in lines[0]
    assert "warning" not in out
    assert "feed_check" not in unchecked
    assert rec["weights_sha256"] == unchecked["weights_sha256"]  # the check trained nothing that stays
    assert rec["step"] == unchecked["step"]


def test_an_input_bound_run_warns_once_naming_the_feed(unchecked, tmp_path, capsys):
    rec = _train(tmp_path / "bound", "--set", "data.feed_check=true", "--set", "data.feed=disk", "--set", "data.memory_budget=4KiB",
                 "--set", "data.feed_headroom=1e6")
    out = capsys.readouterr().out
    warnings = [x for x in out.splitlines() if x.startswith("warning: the input is the bottleneck")]
    assert len(warnings) == 1, out
    assert "disk feed" in warnings[0] and "data.feed: hybrid or memory" in warnings[0]
    assert rec["feed"] == "disk" and rec["feed_check"]["headroom"] < 1e6


def test_feed_headroom_must_be_positive(tmp_path, capsys):
    assert cli.main(["train", QUICKSTART, "--run-dir", str(tmp_path / "r"), "--set", "data.feed_headroom=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "feed_headroom" in err[0], err
