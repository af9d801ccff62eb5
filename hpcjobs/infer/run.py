"""Run this process's shard: rows, chunks committed as they are done, then the results.

SIGUSR1/SIGTERM or the time budget (``--time-budget``, or the Slurm job's end) stop the
job after the current chunk with exit code 75; the same command continues it.  When a
shard of several is complete its chunks are joined into its part file; under mpirun, rank
0 merges the parts once every rank is done.  An unsharded run writes the outputs directly.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..config import InferConfig
from ..errors import EX_TEMPFAIL
from ..cluster.signals import StopFlag
from ..units import parse_duration
from .chunks import ChunkDir
from .errors import InferError
from .inputs import Inputs, open_inputs, printable
from .predictor import Predictor
from .results import FORMAT, Outputs, Piece, check_outputs, finish, merge, outputs_for, part_attrs, str_array, \
    write_results
from .shards import Shard, choose_shard


@dataclass
class _Job:
    cfg: InferConfig
    outputs: Outputs
    shard: Shard
    deadline: Optional[float]  # time.monotonic() value
    workers: int
    log: Callable[[str], None]


class _Pending:
    """Model outputs (probabilities, top-k probabilities, top-k indices) not yet in a chunk."""

    def __init__(self):
        self.buf: list[tuple[np.ndarray, ...]] = []
        self.count = 0

    def add(self, out: tuple[np.ndarray, ...]):
        self.buf.append(out)
        self.count += len(out[0])

    def take(self, m: int) -> list[np.ndarray]:
        """The first m rows of every column."""
        joined = [np.concatenate(col) if len(self.buf) > 1 else col[0] for col in zip(*self.buf)]
        self.buf = [tuple(a[m:] for a in joined)] if self.count > m else []
        self.count -= m
        return [a[:m] for a in joined]


def _piece(inputs: Inputs, errors: dict, lo: int, hi: int, probs, top_p, top_i) -> Piece:
    """Rows lo..hi as a chunk: the predicted rows, and the unreadable ones (taken out of ``errors``)."""
    rows = np.arange(lo, hi)
    bad = np.array([r in errors for r in rows], bool)
    reasons = [errors.pop(int(r)) for r in rows[bad]]
    names = inputs.names
    return Piece(rows[~bad], str_array([names[r] for r in rows[~bad]]), probs[~bad],
                 top_k_indices=top_i[~bad].astype(np.int32), top_k_probabilities=top_p[~bad],
                 error_row=rows[bad], error_path=str_array([names[r] for r in rows[bad]]),
                 error_reason=str_array(reasons))


def _stop_reason(job: _Job, stop: StopFlag, now: float, took: float) -> Optional[str]:
    """Why to stop after this chunk: a signal, or the next chunk would cross the deadline."""
    if stop.signal:
        return stop.signal
    if job.deadline is not None and now + 1.5 * took + 2.0 >= job.deadline:
        return "time budget"
    return None


def _predict(job: _Job, predictor: Predictor, inputs: Inputs, chunks: ChunkDir, pos: int, k: int,
             stop: StopFlag) -> tuple[int, Optional[str]]:
    """Predict rows pos.. of the shard chunk by chunk, committing each one.
    (The first row not done, the reason it stopped early or None.)"""
    cfg, shard, log, lo, hi = job.cfg, job.shard, job.log, chunks.lo, chunks.hi
    errors: dict[int, str] = {}
    pending = _Pending()
    t0 = t_chunk = t_log = time.monotonic()
    done_here, reason = 0, None
    batches = predictor.batches(inputs, pos, hi, batch_size=cfg.batch_size, top_k=k, workers=job.workers,
                                errors=errors)
    end = min(pos + cfg.chunk_size, hi)
    for out in batches:
        pending.add(out)
        while pos < hi and pending.count >= end - pos:
            chunks.commit(pos, end, _piece(inputs, errors, pos, end, *pending.take(end - pos)))
            done_here += end - pos
            pos, end = end, min(end + cfg.chunk_size, hi)
            now = time.monotonic()
            took, t_chunk = now - t_chunk, now
            if now - t_log >= 10 or pos >= hi:
                log(f"shard {shard}: {pos - lo}/{hi - lo} rows, {done_here / (now - t0):.0f} img/s")
                t_log = now
            if pos < hi:
                reason = _stop_reason(job, stop, now, took)
            if reason:
                break
        if reason:
            break
    batches.close()
    if pos < hi and not reason:
        raise RuntimeError(f"shard {shard}: the input pipeline ended at row {pos}, before row {hi}")
    return pos, reason


def _part_done(job: _Job, identity: dict) -> bool:
    """Whether this shard's part file is already there (and of this very run)."""
    part = job.outputs.part(job.shard)
    if not os.path.exists(part):
        return False
    old = part_attrs(part)
    if any(old.get(key) != value for key, value in identity.items()):
        raise InferError(f"{part}: the results of a different run (input, model or top_k); delete it "
                         "or choose another --output")
    job.log(f"shard {job.shard}: already done ({part})")
    shutil.rmtree(job.outputs.chunks(job.shard), ignore_errors=True)
    return True


def _run_shard(job: _Job, predictor: Predictor, inputs: Inputs, stop: StopFlag) -> str:
    """Run (or resume) this process's shard.  'done', or the reason it stopped early."""
    cfg, outs, shard, log = job.cfg, job.outputs, job.shard, job.log
    n = len(inputs)
    lo, hi = shard.rows(n)
    k = min(cfg.top_k, len(predictor.class_names))
    identity = {"format": FORMAT, "input": inputs.fingerprint, "rows_total": n, "model": predictor.fingerprint,
                "top_k": k, "shard": shard.index, "num_shards": shard.count, "rows_lo": lo, "rows_hi": hi}
    attrs = dict(identity, input_path=printable(inputs.origin), model_path=predictor.folder)
    if inputs.origin.lower().endswith((".h5", ".hdf5")):
        attrs["split"] = cfg.split
    if shard.count > 1 and _part_done(job, identity):
        return "done"

    chunks = ChunkDir(outs.chunks(shard), identity, lo, hi)
    pos = chunks.resume()
    if pos > lo:
        log(f"shard {shard}: resuming at row {pos} ({pos - lo} of {hi - lo} rows done)")
    reason = None
    if pos < hi:
        pos, reason = _predict(job, predictor, inputs, chunks, pos, k, stop)
    if reason:
        log(f"shard {shard}: stopped by {reason} after row {pos} ({pos - lo} of {hi - lo} done); "
            "run the same command again to continue")
        return reason

    if shard.count == 1:
        rows, skipped = finish(outs, chunks.pieces(), predictor.class_names, k, attrs, log)
        if not rows:  # nothing predicted is no success
            chunks.remove()
            raise InferError(f"{cfg.input}: no input was usable: {skipped} skipped as unreadable (listed in "
                             f"{outs.errors})")
    else:
        rows, skipped = write_results(chunks.pieces(), predictor.class_names, k, attrs, h5=outs.part(shard))
        log(f"shard {shard}: done, {rows} rows, {skipped} skipped: {outs.part(shard)}")
    chunks.remove()
    return "done"


# --------------------------------------------------------------------------- the job
def _mpi_comm(info):
    """MPI_COMM_WORLD when mpirun started several ranks (mpi4py is how ranks talk here)."""
    if info.launcher != "mpi" or info.world_size <= 1:
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise InferError("launched by mpirun with several ranks, but mpi4py is not installed "
                         "(pip install mpi4py)") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != info.world_size:
        raise InferError(f"mpi4py sees {comm.Get_size()} ranks, the launcher {info.world_size}: "
                         "mpi4py is built against another MPI than mpirun's")
    return comm


def _deadline(cfg: InferConfig, info, t0: float) -> Optional[float]:
    """When to stop (a time.monotonic() value): the time budget or the Slurm job's end."""
    deadline = t0 + parse_duration(cfg.time_budget) if cfg.time_budget else None
    if info.job_end_time:
        job_deadline = t0 + (info.job_end_time - time.time()) - 10.0
        deadline = job_deadline if deadline is None else min(deadline, job_deadline)
    return deadline


def _say(text: str):
    print(text, flush=True)


def _after_ranks(comm, info, status: str, error: Optional[BaseException], outs: Outputs, log) -> int:
    """Every rank's status (also the barrier before rank 0 merges) into this rank's exit code."""
    statuses = comm.allgather(status)
    if error is not None:
        raise error
    if "failed" in statuses:
        log(f"rank {info.rank}: rank(s) {[r for r, s in enumerate(statuses) if s == 'failed']} failed; "
            "not merging")
        return 1
    if any(s != "done" for s in statuses):
        return EX_TEMPFAIL  # every rank says "more to do", so the job is requeued
    if info.rank == 0:
        return merge(outs, log)
    return 0


def infer(cfg: InferConfig, *, info=None, predictor: Optional[Predictor] = None, log=_say, unsafe=False,
          trust_code=False) -> int:
    """Run this process's shard of an inference job: 0 when done, 75 when stopped early.
    ``unsafe`` loads a model.keras that holds code (``--unsafe``); ``trust_code`` imports
    the code an export carries (``--trust-code``)."""
    if not cfg.output:
        raise InferError("infer.output: required (--output FILE.h5 or FILE.csv)")
    outs = outputs_for(cfg.output, cfg.format, cfg.submission)
    if not cfg.input:
        raise InferError("infer.input: required (--input FOLDER, LISTING.csv/.json, STORE.h5 or FILE.npz)")
    if not cfg.model and predictor is None:
        raise InferError("infer.model: required (--model RUN_DIR or EXPORT_DIR)")
    t0 = time.monotonic()
    if info is None:
        from ..cluster.info import detect

        info = detect()
    shard, why = choose_shard(cfg.shard, info)
    check_outputs(outs, cfg.input, shard)
    comm = _mpi_comm(info)
    job = _Job(cfg, outs, shard, _deadline(cfg, info, t0), cfg.workers or os.cpu_count() or 1, log)

    status, error = "failed", None
    with StopFlag() as stop:
        try:
            inputs = open_inputs(cfg.input, cfg.split)
            try:
                predictor = predictor or Predictor(cfg.model, info, unsafe=unsafe, trust_code=trust_code)
                lo, hi = shard.rows(len(inputs))
                log(f"infer: {len(inputs)} inputs from {cfg.input}; shard {shard} ({why}): rows {lo}..{hi}; "
                    f"model {predictor.folder} {predictor.shape}, {predictor.replicas} replica(s)")
                status = _run_shard(job, predictor, inputs, stop)
            finally:
                inputs.close()
        except BaseException as e:
            if comm is None:
                raise
            error = e  # every rank must reach the allgather, or the others hang
    if comm is not None:
        return _after_ranks(comm, info, status, error, outs, log)
    if status == "done" and shard.count > 1:
        log(f"when every shard is done: hpcjobs infer --merge --output {cfg.output}")
    return 0 if status == "done" else EX_TEMPFAIL
