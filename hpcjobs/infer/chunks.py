"""A shard's committed chunks: the unit of resume.

Every ``infer.chunk_size`` rows of a shard are committed as one file,
``STEM.part-IIIII-of-NNNNN.chunks/FIRSTROW-ENDROW.npz``, written under a temporary name,
fsync'ed and renamed into place.  A restarted shard checks the folder's
``manifest.json`` (same input rows, model, top_k), then continues after the last whole
chunk: no row is lost or repeated.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Iterator, Optional

from ..rundir import atomic_path, atomic_write
from .errors import InferError
from .results import Piece

_CHUNK = re.compile(r"^(\d{12})-(\d{12})\.npz$")
MANIFEST = "manifest.json"


class ChunkDir:
    """The committed chunks of one shard, one ``.npz`` per chunk, renamed into place when
    complete, and a manifest naming what they are results of."""

    def __init__(self, path: str, identity: dict, lo: int, hi: int):
        self.path, self.identity, self.lo, self.hi = path, identity, lo, hi
        self.files: list[str] = []

    @property
    def manifest(self) -> str:
        return os.path.join(self.path, MANIFEST)

    def _old_manifest(self) -> Optional[dict]:
        try:
            with open(self.manifest, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _check_existing(self):
        """Refuse a folder of other results, or one that is not ours at all (its files would be removed)."""
        if not os.path.isdir(self.path):
            if os.path.lexists(self.path):
                raise InferError(f"{self.path}: exists and is not a folder of chunks; delete it or choose "
                                 "another --output")
            return
        old = self._old_manifest()
        if old is None:
            foreign = [n for n in os.listdir(self.path) if not n.startswith(".tmp-")]
            if foreign:
                raise InferError(f"{self.path}: not a folder of infer chunks (no readable {MANIFEST}, but "
                                 f"{foreign[0]}); delete it or choose another --output")
        elif old != self.identity:
            diff = sorted(k for k in set(old) | set(self.identity) if old.get(k) != self.identity.get(k))
            raise InferError(f"{self.path}: unfinished results of a different run (differs in "
                             f"{', '.join(diff)}); delete it or choose another --output")

    def resume(self) -> int:
        """Check the manifest, drop partial files; the first row not yet committed."""
        self._check_existing()
        os.makedirs(self.path, exist_ok=True)
        if not os.path.exists(self.manifest):
            atomic_write(self.manifest, json.dumps(self.identity, indent=1) + "\n")
        spans = {}
        for name in os.listdir(self.path):
            m = _CHUNK.match(name)
            if m:
                spans[int(m.group(1))] = (int(m.group(2)), name)
            elif name != MANIFEST:  # a temporary file of a killed commit
                os.remove(os.path.join(self.path, name))
        pos = self.lo
        while pos in spans and pos < self.hi:
            end, name = spans.pop(pos)
            self.files.append(name)
            pos = end
        for _, name in spans.values():  # not contiguous with the committed rows
            os.remove(os.path.join(self.path, name))
        return pos

    def commit(self, lo: int, hi: int, piece: Piece):
        name = f"{lo:012d}-{hi:012d}.npz"
        with atomic_path(os.path.join(self.path, name)) as tmp:
            with open(tmp, "wb") as f:
                piece.save(f)
        self.files.append(name)

    def pieces(self) -> Iterator[Piece]:
        for name in self.files:
            yield Piece.load(os.path.join(self.path, name))

    def remove(self):
        shutil.rmtree(self.path, ignore_errors=True)
