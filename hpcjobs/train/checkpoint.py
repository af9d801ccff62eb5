"""What is saved, when, where: checkpoints of the whole training state.

One ``tf.train.Checkpoint`` holds the model, the optimizer (its iteration count drives
the learning-rate schedule), the loop's counters and early-stopping state, and the
Keras seed-generator states (Dropout, random layers) that tf.train.Checkpoint does not
reach through the model.  The feeder's position is a function of the step, so the
step counter is the data position.

Saves go through ``tf.train.CheckpointManager`` into ``RUN/checkpoints``; the files
are fsync'ed before the save counts, and restore falls back to the previous
checkpoint when the newest cannot be read.  The decision *when* to save is the
loop's: this module offers ``due()`` for the configured cadence and a clock (the stop
signals live in ``hpcjobs.signals``).

Test only: ``HPCJOBS_TEST_SLOW_SAVE=SECONDS`` makes every checkpoint write sleep that long
after its files are written (inside the measured write, as a slow file system would), so
tests can show the signal margin following the saves (``hpcjobs.cluster.costs``).
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

from .. import compat
from ..cluster import signals
from ..cluster.costs import SLOW_SAVE_ENV
from ..config import CheckpointConfig
from ..errors import RunFailure, UserError, first_line
from ..rundir import atomic_path, fsync_dir, fsync_file

# A checkpoint's variables read without a restore (export --from best, BestMetric's pruning)
STEP_KEY = "step/.ATTRIBUTES/VARIABLE_VALUE"
BEST_KEY = "best/.ATTRIBUTES/VARIABLE_VALUE"  # BestMetric's best value
BEST_EPOCH_KEY = "best_epoch/.ATTRIBUTES/VARIABLE_VALUE"  # and its epoch


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint where one was asked for (exit code 2)."""


class CheckpointWriteError(RunFailure):
    """A checkpoint could not be written: disk full, quota, a bad path (exit code 1)."""


def seed_variables(model) -> list:
    """The seed-generator states of a Keras model's random layers (that the model's own
    checkpoint dependencies do not reach)."""
    return compat.seed_variables(model)


def weights_digest(model) -> str:
    """sha256 over every variable of the model in order (shapes and bytes), to compare runs.

    Variable paths are left out: Keras numbers auto-named objects per process."""
    import hashlib

    h = hashlib.sha256()
    for v in model.variables:
        arr = v.numpy()
        h.update(f"{arr.dtype}:{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _fsync_files(prefix: str):
    """fsync a checkpoint's data and index files and their folder."""
    for path in glob.glob(prefix + ".*"):
        fsync_file(path)
    fsync_dir(os.path.dirname(prefix))


def _fsync_state(folder: str):
    """fsync CheckpointManager's ``checkpoint`` state file (which names the latest)."""
    state = os.path.join(folder, "checkpoint")
    if os.path.exists(state):
        fsync_file(state)
    fsync_dir(folder)


def _remove_partial_writes(folder: str) -> list[str]:
    """Delete what a killed save leaves: TensorFlow's ``<prefix>_temp`` folders and the
    state file's ``checkpoint.tmp*`` twins (nothing in them is ever named as latest)."""
    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith("_temp") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith("checkpoint.tmp"):
            os.remove(path)
        else:
            continue
        removed.append(name)
    return removed


@dataclass
class Saved:
    path: str
    seconds: float  # the time the caller was blocked (the whole write unless asynchronous)


class Checkpoints:
    """The run's checkpoints.  ``writer`` False (a non-chief multi-worker process) saves
    into a temporary directory that is removed, as tf.distribute requires.

    With ``async_write`` a save blocks only while the variables are copied to host
    memory; a TensorFlow thread writes the files.  A checkpoint becomes the latest (in
    the ``checkpoint`` state file) only once its files are written and fsync'ed, in
    both modes, so a process killed mid-write resumes from the previous one."""

    def __init__(self, directory: str, objects: dict, cfg: CheckpointConfig, writer: bool = True,
                 all_save: bool = False, size_bytes: int = 0):
        import tensorflow as tf

        self.tf = tf
        self.cfg = cfg
        self.writer = writer
        self.saves = writer or all_save  # multi-worker: every worker takes part in the save
        self.ckpt = tf.train.Checkpoint(**objects)
        self.shared = directory  # every worker restores from the run's checkpoints
        self.directory = directory if writer else tempfile.mkdtemp(prefix="hpcjobs-ckpt-")
        self.manager = tf.train.CheckpointManager(self.ckpt, self.directory, max_to_keep=cfg.max_to_keep,
                                                  checkpoint_name="ckpt")
        if cfg.async_write:
            compat.fix_keras_async_checkpoint()
        self.last_save_time = time.monotonic()
        self.last_save_step = None
        self.save_seconds: list[float] = []  # blocked time of each save
        self.write_seconds: list[float] = []  # start to files written and fsync'ed
        self.wait_seconds = 0.0  # in wait() for asynchronous writes
        self._pending = None  # the path of a save not yet waited for
        self._written_path = None
        self.first_guess = 0.5 + size_bytes / 50e6  # seconds, until a save has been measured

    @property
    def kept(self) -> list[str]:
        """The prefixes of the checkpoints kept, oldest first (the latest last)."""
        return list(self.manager.checkpoints)

    # -- restore ----------------------------------------------------------------------
    def restore_latest(self, log=print) -> str | None:
        """Restore the newest readable checkpoint; older ones are tried if it is damaged."""
        if self.writer and os.path.isdir(self.shared):
            partial = _remove_partial_writes(self.shared)
            if partial:
                log(f"removed {len(partial)} partial checkpoint write(s) left by a killed session: "
                    f"{', '.join(partial)}")
        candidates = checkpoint_candidates(self.shared, log)
        for path in candidates:
            try:
                self.restore(path)
                return path
            except Exception as e:  # damaged files raise several TF error types
                log(f"warning: checkpoint {path} cannot be read ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:160]}); trying the previous one")
        if candidates:
            raise CheckpointError(f"{self.shared}: no readable checkpoint among {len(candidates)}")
        return None

    def restore(self, path: str):
        status = self.ckpt.restore(path)
        status.assert_existing_objects_matched()
        self.last_save_time = time.monotonic()

    # -- save -------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        c = self.cfg
        if c.every_steps and step % c.every_steps == 0:
            return True
        return bool(c.every_minutes) and time.monotonic() - self.last_save_time >= c.every_minutes * 60

    def save(self, step: int) -> Saved | None:
        """Checkpoint the current state as ``ckpt-<step>``.  An asynchronous write goes
        on in the background: ``wait()`` before relying on it."""
        if not self.saves or step == self.last_save_step:
            return None
        t = time.monotonic()
        slow_save = float(os.environ.get(SLOW_SAVE_ENV) or 0)
        self._wait()  # one write at a time
        start = time.monotonic()

        def written(path):  # runs after the files are written, before the state names them
            if slow_save:  # test only (HPCJOBS_TEST_SLOW_SAVE): a slow file system, inside the measured write
                time.sleep(slow_save)
            if self.writer:
                _fsync_files(path)
            self.write_seconds.append(time.monotonic() - start)
            self._written_path = path

        try:
            with signals.held():  # the writer thread starts inside the first save: no stop signals there
                path = compat.save_checkpoint(self.manager, step, self.cfg.async_write, written)
        except (OSError, self.tf.errors.OpError) as e:
            self._remove_partial()
            raise CheckpointWriteError(f"cannot write checkpoint ckpt-{step} in {self.directory} "
                                       f"({first_line(e)})") from None
        self._pending = path
        if not self.cfg.async_write:
            self._wait()
        seconds = time.monotonic() - t
        self.save_seconds.append(seconds)
        self.last_save_time = time.monotonic()
        self.last_save_step = step
        return Saved(path, seconds)

    def _remove_partial(self):
        """After a failed write (a full disk): its ``ckpt-N_temp`` goes at once, not at the next session."""
        if self.writer and os.path.isdir(self.directory):
            _remove_partial_writes(self.directory)

    def wait(self):
        """Block until the last save is on disk; raise CheckpointWriteError if it failed."""
        t = time.monotonic()
        try:
            self._wait()
        finally:
            self.wait_seconds += time.monotonic() - t

    @property
    def blocked_seconds(self) -> float:
        """The time the loop spent in saves and waits for them."""
        return sum(self.save_seconds) + self.wait_seconds

    def _wait(self):
        if self._pending is None:
            return
        path, self._pending = self._pending, None
        if self.cfg.async_write:
            self.ckpt.sync()
        if self._written_path != path:
            error = compat.take_async_checkpoint_error(self.ckpt) if self.cfg.async_write else None
            why = f" ({first_line(error)})" if error else ""
            self._remove_partial()
            raise CheckpointWriteError(f"cannot write checkpoint {path}{why}")
        if self.writer:
            _fsync_state(self.directory)

    @property
    def expected_save_seconds(self) -> float:
        """How long the final save before a deadline may take (a whole write)."""
        return max(self.write_seconds[-5:]) if self.write_seconds else self.first_guess

    def close(self):
        try:
            self.wait()
        finally:
            if not self.writer:
                shutil.rmtree(self.directory, ignore_errors=True)


def _step_of(prefix: str) -> int:
    tail = prefix.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def checkpoint_candidates(folder: str, log=None) -> list[str]:
    """The checkpoints of ``folder``, newest first: those CheckpointManager's ``checkpoint``
    state file names, or, when that file is missing or unreadable, every complete
    ``ckpt-N`` found by its files (an index and its data), so a lost state file never
    makes a run start again from scratch (``log`` says so)."""
    import tensorflow as tf

    if not os.path.isdir(folder):
        return []
    try:
        state = tf.train.get_checkpoint_state(folder)
    except (tf.errors.OpError, ValueError):  # a damaged state file: as if it were missing
        state = None
    if state is not None and state.all_model_checkpoint_paths:
        return list(reversed(state.all_model_checkpoint_paths))
    found = [p[:-len(".index")] for p in glob.glob(os.path.join(folder, "ckpt-*.index"))]
    found = sorted((p for p in found if glob.glob(p + ".data-*") and _step_of(p) >= 0), key=_step_of, reverse=True)
    if found and log:
        log(f"warning: {folder}/checkpoint (the list of checkpoints) is missing or unreadable; "
            f"found {len(found)} checkpoint(s) by their files, the newest {os.path.basename(found[0])}")
    return found


def save_weights(model, path: str):
    """``model``'s weights into ``path`` atomically.  A full disk (or quota) is a
    CheckpointWriteError, one line: said before writing when the file system has less
    room than the weights (HDF5 crashes the process at exit over a file it could not
    write); should the disk fill meanwhile, the half-written file is let go here, with
    h5py's complaint from its destructor silenced."""
    import contextlib
    import gc
    import io
    import sys

    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    need = sum(int(v.numpy().nbytes) for v in model.weights) + (1 << 20)  # and HDF5's own structure
    st = os.statvfs(folder)
    if st.f_bavail * st.f_frsize < need:
        raise CheckpointWriteError(f"cannot write the best weights {path}: {st.f_bavail * st.f_frsize:,} bytes "
                                   f"free there, about {need:,} needed (No space left on device)")
    try:
        with atomic_path(path) as tmp:
            model.save_weights(tmp)
        return
    except (OSError, RuntimeError) as e:
        reason, failed = first_line(e), e
    hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            del failed  # its frames hold the open file
            gc.collect()
    finally:
        sys.unraisablehook = hook
    raise CheckpointWriteError(f"cannot write the best weights {path} ({reason})")


def find_checkpoint(path: str) -> str:
    """A checkpoint prefix from a run directory, a checkpoints directory or a prefix."""
    import tensorflow as tf

    for folder in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(folder):
            latest = tf.train.latest_checkpoint(folder)
            if latest:
                return latest
    if glob.glob(path + ".index"):
        return path
    raise CheckpointError(f"--from {path}: no checkpoint there (give a run directory or a checkpoint prefix)")


def restore_model_only(tf, model, prefix: str) -> str | None:
    """Only ``model``'s weights from checkpoint ``prefix`` (``train --from`` another run's
    checkpoint, ``export --from latest``): None when they fit, else why not, in one line."""
    try:
        tf.train.Checkpoint(model=model).restore(prefix).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        return first_line(e)[:200]
    return None


# what shapes a checkpoint beyond the model's weights: the optimizers, their slots, the stages
CHECKPOINT_KEYS = ("model.arch", "model.freeze_backbone", "model.init_from", "model.bn_trainable",
                   "optimizer.name", "optimizer.amsgrad", "optimizer.reduce_on_plateau.patience",
                   "training.stages", "training.precision")


def config_differs(path: str, cfg) -> str | None:
    """The keys that make ``--from PATH``'s checkpoint a different training state than
    ``cfg`` would build (None when they agree, or when PATH has no config.yaml)."""
    import os

    import yaml

    from ..config import to_dict

    for candidate in (os.path.join(path, "config.yaml"), os.path.join(os.path.dirname(path), "..", "config.yaml")):
        if os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as f:
                theirs = yaml.safe_load(f) or {}
            break
    else:
        return None
    ours = to_dict(cfg)

    def get(d, key):
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    keys = [k for k in CHECKPOINT_KEYS if get(theirs, k) != get(ours, k)]
    return ", ".join(keys) or None
