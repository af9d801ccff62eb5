"""The run directory: where it cannot be, and a run.json that cannot be read (issue 17)."""
import json
import time

import pytest

from hpcjobs import cli
from hpcjobs.rundir import RunDir, RunDirError

from conftest import QUICKSTART


def _exit_2_one_line(capsys, argv) -> str:
    assert cli.main([str(a) for a in argv]) == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    err = out.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hpcjobs: error: "), out.err
    return err


def test_a_run_dir_that_is_a_file_or_lies_under_one_is_one_line(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine\n")
    start = time.monotonic()
    err = _exit_2_one_line(capsys, ["train", QUICKSTART, "--run-dir", f])
    assert f"{f}: cannot be a run directory ({f} is a file)" in err
    err = _exit_2_one_line(capsys, ["train", QUICKSTART, "--run-dir", f / "run"])
    assert f"{f / 'run'}: cannot be a run directory ({f} is a file)" in err
    assert f.read_text() == "mine\n"
    assert time.monotonic() - start < 30  # refused before TensorFlow is even needed
    with pytest.raises(RunDirError, match="is a file"):
        RunDir(str(f / "a" / "b")).lock()


@pytest.mark.parametrize("content, words", [
    (b'{"status": "fini', "unreadable run.json (Unterminated string"),
    (b"[1, 2]", "unreadable run.json (a JSON list, not an object)"),
    (b"\xff\xfe\x00", "unreadable run.json ('utf-8' codec can't decode"),
    (b'{"sessions": [{"start": "yesterday"}]}', "unreadable run.json (unexpected content: TypeError"),
    (b'{"sessions": [{"end_step": 3}]}', "unreadable run.json (unexpected content: KeyError"),
    (b'{"last": [1]}', "unreadable run.json (unexpected content: AttributeError"),
    (None, "unreadable run.json (Is a directory)"),
])
def test_status_of_a_corrupt_run_json_says_unreadable_and_where(tmp_path, capsys, content, words):
    run = tmp_path / "run"
    run.mkdir()
    if content is None:
        (run / "run.json").mkdir()
    else:
        (run / "run.json").write_bytes(content)
    err = _exit_2_one_line(capsys, ["status", run])
    assert f"{run / 'run.json'}: {words}" in err, err
    if "unexpected content" not in words:
        assert RunDir(str(run)).read_status() == {}  # the lenient reader training uses


def test_status_without_run_json_and_with_a_good_one(tmp_path, capsys):
    err = _exit_2_one_line(capsys, ["status", tmp_path])
    assert "no run.json (not a run directory, or not started)" in err
    (tmp_path / "run.json").write_text(json.dumps({
        "name": "r", "status": "finished", "step": 5, "total_steps": 5, "test_accuracy": 0.5,
        "sessions": [{"start": 0, "start_step": 0, "end_step": 5, "stopped_by": "finished"}]}))
    assert cli.main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("run r: finished, step 5/5, 1 session(s)\n") and "test accuracy 0.5000" in out
