"""``hpcjobs weights fetch NAME ...``: pretrained keras.applications weights into the
Keras cache, on a login node (compute nodes never download).

For each architecture the file is the one Keras itself would download for
``weights="imagenet"`` (name, origin and published hash, asked of Keras without
downloading: ``backbones.weights_request``).  It is fetched from ``--base-url``
(a site mirror: ``BASE_URL/FILE``) or Keras' own origin, checked against the hash
where Keras publishes one (md5 or sha256), written to a temporary file and renamed
into ``--cache`` (default: ``$KERAS_HOME/models``, else ``~/.keras/models``), where
``model.weights: imagenet`` finds it.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request

from . import backbones
from ..digest import file_digest
from ..errors import UserError
from ..rundir import atomic_path, os_reason


class WeightsError(UserError):
    """A weights file that cannot be fetched or does not match its hash (exit code 2)."""


MAX_BYTES = 2 << 30  # the largest keras.applications file (ConvNeXtXLarge with its top) is about 1.4 GB


def _copy_capped(response, out, url: str):
    """The response into ``out``, never more than its Content-Length (when it gives one) or
    MAX_BYTES: a mirror serving an endless file does not fill the cache's disk."""
    length = response.headers.get("Content-Length")
    cap = min(int(length), MAX_BYTES) if length and length.isdigit() else MAX_BYTES
    size = 0
    for block in iter(lambda: response.read(1 << 20), b""):
        size += len(block)
        if size > cap:
            raise WeightsError(f"{url}: sends more than {cap:,} bytes "
                               f"({'its Content-Length' if cap < MAX_BYTES else 'no weights file is that large'}); "
                               "nothing was written")
        out.write(block)


def fetch(arch: str, cache: str | None = None, base_url: str | None = None, include_top: bool = False,
          image_size: int = 224, log=print) -> str:
    """Download ``arch``'s imagenet weights into the cache; returns the file's path."""
    from ..config import check_arch

    try:
        check_arch(arch)
    except ValueError as e:
        raise WeightsError(str(e)) from None
    if arch in ("simple_cnn", "small_resnet"):
        raise WeightsError(f"{arch} is built in: it has no pretrained weights to fetch")
    req = backbones.weights_request(arch, (image_size, image_size, 3), include_top)
    folder = backbones.cache_dir(cache)
    path = os.path.join(folder, req["fname"])
    url = f"{base_url.rstrip('/')}/{req['fname']}" if base_url else req["origin"]
    expected = req["file_hash"]
    algorithm = "sha256" if expected and len(expected) == 64 else "md5"
    if os.path.isfile(path) and (not expected or file_digest(path, algorithm) == expected):
        log(f"{arch}: {path} is there already")
        return path
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise WeightsError(f"--cache {folder}: cannot be the cache folder ({os_reason(e, folder)})") from None
    try:
        with atomic_path(path) as tmp:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                _copy_capped(response, out, url)
            if expected and file_digest(tmp, algorithm) != expected:
                raise WeightsError(f"{url}: {algorithm} {file_digest(tmp, algorithm)} is not the {expected} Keras "
                                   "publishes for it; nothing was written")
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise WeightsError(f"{arch}: cannot fetch {url} ({type(e).__name__}: {str(e).splitlines()[0][:160]})") \
            from None
    log(f"{arch}: {path}" + (f" ({algorithm} checked)" if expected else " (Keras publishes no hash for it)"))
    return path
