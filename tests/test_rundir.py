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
        assert RunDir(str(run)).read_record().is_empty()  # the lenient reader training uses


def test_status_without_run_json_and_with_a_good_one(tmp_path, capsys):
    err = _exit_2_one_line(capsys, ["status", tmp_path])
    assert "no run.json (not a run directory, or not started)" in err
    (tmp_path / "run.json").write_text(json.dumps({
        "name": "r", "status": "finished", "step": 5, "total_steps": 5, "test_accuracy": 0.5,
        "sessions": [{"start": 0, "start_step": 0, "end_step": 5, "stopped_by": "finished"}]}))
    assert cli.main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("run r: finished, step 5/5, 1 session(s)\n") and "test accuracy 0.5000" in out


def _old_run_json():
    """A run.json as the code before issue 23 wrote it: no format_version."""
    return {"sessions": [{"start": 1.5, "start_step": 0, "end": 2.5, "end_step": 10, "stopped_by": "time_budget",
                          "job_id": None, "host": "vm"}],
            "status": "stopped", "name": "quickstart", "total_steps": 48, "step": 10, "best": None,
            "diagnosis": {}, "updated": 2.6}


def test_an_old_run_json_reads_as_version_1_and_keeps_every_field(tmp_path):
    from hpcjobs.record import RECORD_VERSION, RunRecord

    (tmp_path / "run.json").write_text(json.dumps(_old_run_json()))
    rec = RunDir(str(tmp_path)).read_record(strict=True)
    assert rec.version == 1 and rec.status == "stopped" and rec.step == 10 and rec.best is None
    assert rec.sessions[0].stopped_by == "time_budget" and rec.sessions[0].end_step == 10
    assert rec.get("diagnosis") == {} and rec.get("not there", 3) == 3
    again = rec.to_dict()
    assert again.pop("format_version") == RECORD_VERSION
    assert again == _old_run_json()  # nothing lost, nothing added (null stays null, absent stays absent)
    assert RunRecord.from_dict(dict(_old_run_json(), format_version=2, later_field=[1])).get("later_field") == [1]


def test_every_write_takes_the_runs_lock(tmp_path, monkeypatch):
    import fcntl

    rd = RunDir(str(tmp_path))
    (tmp_path / "run.json").write_text(json.dumps(_old_run_json()))
    taken = []
    real = fcntl.flock
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (taken.append(op), real(fd, op)))
    rec = rd.update_record(status="finished", transfer_check={"behind": False})
    assert taken == [fcntl.LOCK_EX, fcntl.LOCK_UN]  # one lock around the read and the write
    assert rec.finished and rd.read_record().get("transfer_check") == {"behind": False}
    assert rd.read_record().version == 2 and rd.read_record().sessions[0].host == "vm"
    taken.clear()
    rd.lock()  # a training session holds it: its writes take it no second time
    rd.write_record(rec)
    rd.unlock()
    assert taken == [fcntl.LOCK_EX | fcntl.LOCK_NB, fcntl.LOCK_UN]


def test_a_long_error_line_keeps_its_reason():
    """The reason TensorFlow puts after a long path survives the one-line limit, wherever the run lies."""
    from hpcjobs.errors import first_line

    for depth in (10, 300):
        e = OSError(f"/tmp/{'d' * depth}/ckpt-10_temp/part-00000; No space left on device")
        line = first_line(e)
        assert line.startswith("OSError: /tmp/") and line.endswith("; No space left on device")
        assert len(line) <= len("OSError: ") + 200
