"""Batch inference with an exported model: shards, resumable chunks, merge.

    hpcjobs infer CONFIG                                   # the config's infer: section
    hpcjobs infer --model RUN_OR_EXPORT --input PATH --output preds.h5 [--shard i/n]
    hpcjobs infer --merge --output preds.h5                # join the shards' part files

The path of the data, one module a step:

1. ``inputs``: the input becomes a fixed, ordered list of rows (a folder tree, a
   ``.csv``/``.json`` listing, an hpcjobs ``.h5`` store or an ``.npz``), read with
   ``hpcjobs.data.sources``' readers.
2. ``shards``: shard i of n takes the contiguous rows ``[i*N//n, (i+1)*N//n)``, from
   ``--shard``, the Slurm array or the MPI rank.
3. ``predictor``: decode and preprocess on a pool of threads (the training store's own
   preprocessing), then the model's compiled step on the replicas ``hpcjobs.distribute``
   gives.
4. ``chunks``: every ``infer.chunk_size`` rows are committed atomically; a restarted
   shard continues after the last whole chunk.  A signal or the time budget stops the
   job after the current chunk with exit code 75.
5. ``results``: the outputs (``STEM.h5``, ``STEM.csv``, ``STEM.errors.csv``), the
   shards' part files and their merge.  Which of the first two: by the output's
   extension (``.h5``/``.hdf5``, ``.csv``), or ``infer.format: h5 | csv | both``.  Results
   never replace their input, nor an existing file that infer did not write.

``run`` runs one process's shard; ``command`` is the command (the CLI's table imports it).
"""
from __future__ import annotations

from ..data.images import model_image, to_model_image
from ..errors import EX_TEMPFAIL
from .chunks import ChunkDir
from .errors import InferError
from .inputs import Inputs, open_inputs
from .predictor import Predictor
from .results import FORMAT, Outputs, Piece, check_outputs, merge, outputs_for, read_part, write_results
from .run import infer
from .shards import Shard, choose_shard, parse_shard

__all__ = ["EX_TEMPFAIL", "FORMAT", "ChunkDir", "InferError", "Inputs", "Outputs", "Piece", "Predictor", "Shard",
           "check_outputs", "choose_shard", "infer", "merge", "open_inputs",
           "outputs_for", "parse_shard", "read_part", "to_model_image", "model_image", "write_results"]
