"""Batch inference (being built; see issue 7)."""
from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("config", nargs="?", help="YAML config with an infer: section")


def cmd_infer(args) -> int:
    raise NotImplementedError("hpcjobs infer is not built yet")
