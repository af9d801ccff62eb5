"""Slurm templates, submission and requeue (being built; see issue 6)."""
from __future__ import annotations


def add_arguments(parser):
    pass


def cmd_submit(args) -> int:
    raise NotImplementedError("hpcjobs submit is not built yet")
