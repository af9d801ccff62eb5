"""``hpcjobs prepare CONFIG``: the HDF5 sample store with stratified splits."""
from __future__ import annotations

import os
import sys


def add_arguments(p):
    p.add_argument("--output", help="store path (default data.store, else stores/<name>.h5)")
    p.add_argument("--strict", action="store_true", help="fail on unreadable images instead of skipping")
    p.add_argument("--force", action="store_true",
                   help="write the store even over its source or over a file that is not an hpcjobs store; "
                        "start over an unfinished prepare of another source or config")
    p.add_argument("--workers", type=_positive, default=None,
                   help="processes that decode and resize (default: the CPUs this process may use: "
                        "SLURM_CPUS_PER_TASK in a job, else its CPU affinity)")


def _positive(text: str) -> int:
    import argparse

    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of processes, 1 or more")
    return int(text)


def cmd_prepare(args) -> int:
    from .. import config
    from ..cluster.signals import StopFlag
    from ..errors import EX_TEMPFAIL
    from . import PrepareStopped, prepare_store

    cfg = config.load(args.config, args.set)
    out = args.output or cfg.data.store or os.path.join("stores", f"{cfg.name}.h5")
    with StopFlag() as flag:  # SIGUSR1/SIGTERM: stop at a chunk boundary, exit 75 (a Slurm job requeues)
        try:
            data = prepare_store(cfg, out, strict=args.strict, progress=True, force=args.force,
                                 workers=args.workers, stop=lambda: flag.signal is not None)
        except PrepareStopped as e:
            print(f"{e} ({flag.signal})", file=sys.stderr)
            return EX_TEMPFAIL
    print(data.class_table())
    if data.skipped:
        print(f"skipped {len(data.skipped)} unreadable image(s):")
        for path, reason in data.skipped[:50]:
            print(f"  {path}: {reason}")
        if len(data.skipped) > 50:
            print(f"  ... and {len(data.skipped) - 50} more (listed in the store's metadata)")
    print(f"store: {out} ({data.image_shape}, {data.num_classes} classes)")
    if not cfg.data.store:
        print(f"train from it with: --set data.store={out}")
    data.close()
    return 0
