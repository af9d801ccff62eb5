"""Hashes of files, read in blocks: the one loop for the export's SHA256SUMS, a model's
fingerprint in infer's part files, and the check of fetched weights."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable


def file_digest(paths: Iterable[str] | str, algorithm: str = "sha256") -> str:
    """The hex digest of the files' bytes, one after another (one path: that file's)."""
    h = hashlib.new(algorithm)
    for path in [paths] if isinstance(paths, str) else paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
