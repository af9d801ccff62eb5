"""One training session: run.json's state machine around the loop, and the work at
the end of training (final save, test evaluation, export, plot).

run.json's ``status`` goes ``running`` -> ``stopped`` (more to do, exit 75) |
``finished`` (exit 0) | ``failed`` (the error's first line); every session is
appended to ``sessions``.
"""
from __future__ import annotations

import os
import time

from .. import export as bundle
from ..cluster import costs
from ..cluster.signals import StopFlag
from ..config import ConfigError, dump
from ..errors import EX_OK, EX_TEMPFAIL
from ..evaluation import files as report
from ..evaluation import metrics
from ..record import RunRecord, SessionEntry
from ..rundir import RunDir, atomic_write
from . import environment, feedcheck
from .checkpoint import CheckpointError, checkpoint_candidates, weights_digest
from .hooks import Hook, is_final
from .loop import Loop


class SessionLog:
    """This session in the run's record (run.json): the earlier sessions are kept, this one
    is appended, and each write goes through ``RunDir.write_record`` (only the chief writes)."""

    def __init__(self, rd: RunDir, job_id: str | None):
        self.rd = rd
        self.record = rd.read_record() if rd.writer else RunRecord()
        self.earlier = len(self.record.sessions)
        self.session = SessionEntry.begin(job_id)
        self.record.sessions.append(self.session)

    def write(self, **fields):
        self.record.update(**fields)
        self.rd.write_record(self.record)

    def start(self, step: int, **fields):
        self.session.start_step = step
        self.record.drop("error")
        self.write(status="running", step=step, **fields)

    def end(self, step: int, reason: str, state: str, **fields):
        self.session.end, self.session.end_step, self.session.stopped_by = time.time(), step, reason
        self.write(status=state, step=step, **fields)

    def fail(self, e: BaseException):
        self.session.end, self.session.stopped_by = time.time(), f"error: {type(e).__name__}"
        try:
            self.write(status="failed", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
        except OSError:  # a full disk: the error that failed the run is the one to tell
            pass


class _Progress(Hook):
    """run.json's step (and last epoch) brought up to date, atomically, at every checkpoint,
    so ``hpcjobs status`` shows how far a running session is (it holds no state)."""

    def __init__(self, record: SessionLog):
        self.record = record

    def saved(self, loop, saved, stopping: bool):
        self.record.write(step=loop.step, **({"last": loop.history[-1]} if loop.history else {}))


_LAST_SESSION_END = [0.0]  # when this process's last session ended (Unix time)


class _Costs(Hook):
    """What this session costs, into its entry of run.json (``costs``; read by
    ``hpcjobs.cluster.costs``): start-up to the first call done, the first call (its
    compile), the longest call after it, and each checkpoint write as ``Checkpoints``
    measured it for ``StopSignals`` (not measured again).  Brought up to date before each
    progress write and at the session's end."""

    def __init__(self, record: SessionLog):
        self.record = record
        # this process's start, or the end of its last session (a search worker trains trial after trial)
        self.started = max(costs.process_start_time() or record.session.start, _LAST_SESSION_END[0])
        self.startup = self.first = None
        self.longest = 0.0

    def after_steps(self, loop, step, sums, seconds):
        if self.first is None:
            self.startup, self.first = time.time() - self.started, seconds
        else:
            self.longest = max(self.longest, seconds)

    def figures(self, loop) -> dict:
        out = {"save_seconds": [round(x, 3) for x in loop.trainer.checkpoints.write_seconds[-100:]]}
        if self.first is not None:
            out.update(startup_seconds=round(self.startup, 3), first_call_seconds=round(self.first, 3),
                       longest_call_seconds=round(self.longest, 3))
        return out

    def saved(self, loop, saved, stopping: bool):
        self.record.session.update(costs=self.figures(loop))

    def end(self, loop, reason):
        self.record.session.update(costs=self.figures(loop))


def run_session(trainer, from_checkpoint: str | None = None) -> int:
    """Restore, train, and finish; 0 when the run is finished, 75 when stopped with more to do."""
    cfg, rd = trainer.cfg, trainer.run_dir
    stack = environment.check(rd, trainer.say)  # another Keras major's checkpoints: refused
    if rd.writer:
        _refuse_lost_progress(rd)
        _refuse_changed_classes(rd, trainer.data.class_names)
        os.makedirs(rd.path, exist_ok=True)
        atomic_write(rd.config_yaml, dump(cfg))
        environment.write(rd, stack)
    record = SessionLog(rd, trainer.info.job_id)
    before = costs.measured(record.record.to_dict())
    if before is not None:  # until this session has saved, StopSignals expects the slowest save recorded
        trainer.checkpoints.first_guess = max(trainer.checkpoints.first_guess, before.slowest_save)
    stop = StopFlag()
    stop.install()
    try:
        origin = trainer.restore(from_checkpoint)
        spent = _Costs(record)
        loop = Loop(trainer, [*trainer.hooks, spent, _Progress(record)], stop)
        record.start(loop.step, name=cfg.name, total_steps=trainer.total_steps,
                     steps_per_epoch=trainer.steps_per_epoch, feed=trainer.feeder.feed,
                     strategy=trainer.rt.kind, replicas=trainer.rt.replicas, stack=stack,
                     class_names=[str(c) for c in trainer.data.class_names],
                     test_images=len(trainer.data.splits["test"]),
                     test_source=trainer.data.test_origin or "split from the source", **_stage_field(trainer),
                     **({"code": trainer.code.entries} if trainer.code else {}))
        _announce(trainer, origin, loop.step)
        if feedcheck.wanted(cfg.data.feed_check, trainer.info) and loop.step < trainer.total_steps:
            record.write(feed_check=feedcheck.feed_check(trainer))  # its own pipeline; the state put back
        reason = loop.run()
        return _finish(trainer, loop, reason, record, spent)
    except BaseException as e:
        record.fail(e)
        raise
    finally:
        stop.uninstall()
        trainer.checkpoints.close()
        _LAST_SESSION_END[0] = time.time()


def _stage_field(trainer) -> dict:
    """run.json's ``stage``: this node's (the chief's) staged copy and the copy's time, or why
    the store is read in place; nothing when data.stage is off."""
    staged = getattr(trainer.data, "staged", None)
    return {"stage": staged.record()} if staged is not None else {}


def _refuse_lost_progress(rd: RunDir):
    """A run whose run.json says it got somewhere but whose checkpoints are gone must not
    start again from step 0 (and overwrite what is left): refuse, before anything is written."""
    step = rd.read_record().step
    if isinstance(step, int) and step > 0 and not checkpoint_candidates(rd.checkpoints):
        raise CheckpointError(f"{rd.checkpoints}: no checkpoint, but {rd.run_json} says the run reached step "
                              f"{step}; put the checkpoints back, or pass --restart to move the run aside and "
                              "start over")


def _refuse_changed_classes(rd: RunDir, class_names):
    """A run whose data now has other classes than it was trained on (a class folder added
    or removed) cannot continue from its checkpoints: said as such, not as unreadable ones."""
    before = rd.read_record().get("class_names")
    now = [str(c) for c in class_names]
    if not isinstance(before, list) or before == now or not checkpoint_candidates(rd.checkpoints):
        return
    added, gone = [c for c in now if c not in before], [c for c in before if c not in now]
    what = "; ".join(x for x in (f"added {', '.join(added[:5])}" if added else "",
                                 f"gone {', '.join(map(str, gone[:5]))}" if gone else "") if x) or "reordered"
    raise ConfigError(rd.run_json, "class_names", f"the data's classes changed since this run was trained "
                      f"({what}); start a new run (--run-dir) or pass --restart to move this one aside")


def _announce(trainer, origin: str, step: int):
    if not trainer.verbose:
        return
    d, cfg = trainer.data, trainer.cfg
    stages = cfg.training.stages
    if origin == "scratch" and stages and stages[0].trainable == "head" and cfg.model.weights is None:
        trainer.say("warning: training.stages[0] trains only the head over a backbone that starts random "
                    "(no model.weights, model.init_from or --from): its features stay random for that stage")
    trainer.say(f"training {cfg.name}: {len(d.splits['train'])} train / {len(d.splits['val'])} val / "
                f"{len(d.splits['test'])} test images"
                + (f" (the source's own: {d.test_origin})" if d.test_origin else "")
                + f" {d.image_shape}, {d.num_classes} classes, feed "
                f"{trainer.feeder.feed}, strategy {trainer.rt.kind} x{trainer.rt.replicas}, start {origin} "
                f"at step {step}/{trainer.total_steps}")


def _finish(trainer, loop: Loop, reason: str, record: SessionLog, spent: _Costs) -> int:
    rd, step = trainer.run_dir, loop.step
    # the final state (no-op if just saved); an asynchronous write overlaps the test
    # evaluation and the export, and is waited for before run.json says it is done
    trainer.checkpoints.save(step)
    finished = is_final(reason)
    loop.each("end", reason)
    fields = {}
    for summary in loop.each("summary"):
        fields.update(summary)
    if finished:
        fields.update(_test_and_export(trainer, loop, dict(fields, sessions=record.earlier + 1)))
    trainer.checkpoints.wait()
    spent.end(loop, reason)  # the last write's figure, now that it is on disk
    digest = weights_digest(trainer.model)
    print(f"worker {trainer.rt.worker}/{trainer.rt.workers} step {step} weights sha256 {digest} on {trainer.info.node}",
          flush=True)
    if loop.history:
        fields["last"] = loop.history[-1]
    record.end(step, reason, "finished" if finished else "stopped", epoch=step / trainer.steps_per_epoch,
               weights_sha256=digest, **fields)
    if not finished:
        trainer.say(f"stopped ({reason}) at step {step}/{trainer.total_steps} with a checkpoint; "
                    f"run the same command again to continue")
        return EX_TEMPFAIL
    if "test_accuracy" in fields:
        trainer.say(f"test accuracy {fields['test_accuracy']:.4f}, test loss {fields['test_loss']:.4f}")
    plots = f"  plots: {rd.plots}/training.png" if trainer.cfg.export.plots else ""
    trainer.say(f"model: {rd.export}/model.keras{plots}  run: {rd.path}")
    return EX_OK


def _test_and_export(trainer, loop: Loop, summary: dict) -> dict:
    """run.json's test metrics (every worker evaluates), and on the chief RUN/evaluation/,
    the export bundle (its parity figures into run.json too) and the training plot."""
    rd, test = trainer.run_dir, trainer.evaluate_report("test")
    fields = {}
    if test is not None:
        fields = {"test_loss": test.loss, "test_accuracy": test.accuracy, "test_f1": test.macro_f1,
                  "test_metrics": test.to_dict(confusion=test.num_classes <= 100)}
    if not rd.writer:
        return fields
    plots = trainer.cfg.export.plots
    if test is not None:
        metrics.write(test, rd.sub("evaluation"), {"model": rd.export, "data": "the run's test split"}, plot=plots)
    training = dict(summary, step=loop.step, total_steps=trainer.total_steps,
                    epochs=loop.step // trainer.steps_per_epoch, weights=summary.get("final_weights"))
    fields["export_parity"] = bundle.write(trainer.model, rd.export, cfg=trainer.cfg, data=trainer.data,
                                           report=test, training=training)
    if loop.history and plots:
        report.plot_training(loop.history, os.path.join(rd.plots, "training.png"))
    return fields
