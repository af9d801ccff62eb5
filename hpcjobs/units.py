"""Units: one parser each for durations, sizes, Slurm times and Slurm memory."""
from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i)?)?B?\s*$", re.I)
SLURM_MEM = re.compile(r"(?i)\d+(?:\.\d+)?\s*(?:[KMGT](?:i?B)?)?")


def check_time_budget(value, name: str = "time_budget"):
    """The one check of a time budget (training.time_budget, infer.time_budget,
    --time-budget): None or a duration, else a ValueError naming ``name``."""
    if value is not None:
        try:
            if parse_duration(value) <= 0:  # stopped at once, a job would requeue itself for ever
                raise ValueError(f"{value!r}: must be more than 0")
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None


def parse_duration(text: str | int | float) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``1h``, ``2d`` or Slurm's ``[D-]HH:MM:SS``."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    s = str(text).strip()
    m = _DURATION.match(s)
    if m:
        return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2) or "s"]
    m = _SLURM_TIME.match(s)
    if m and (":" in s or "-" in s):
        days = int(m.group(1) or 0)
        parts = [int(p) for p in m.group(2, 3, 4) if p is not None]
        if len(parts) == 3:
            h, mi, sec = parts
        elif len(parts) == 2:
            # Slurm: "MM:SS", but "D-HH:MM"
            h, mi, sec = (parts[0], parts[1], 0) if m.group(1) else (0, parts[0], parts[1])
        else:
            h, mi, sec = (parts[0], 0, 0) if m.group(1) else (0, parts[0], 0)
        return float(days * 86400 + h * 3600 + mi * 60 + sec)
    raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 1h or 01:30:00)")


def parse_bytes(text: str | int) -> int:
    """Bytes from ``512MiB``, ``512M`` (both binary), ``2GB`` (decimal) or a plain integer."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 512MiB or 2GiB)")
    number, unit, binary = m.groups()
    if not unit:
        return int(float(number))
    decimal = str(text).strip().upper().endswith("B") and not binary
    power = "KMGT".index(unit.upper()) + 1
    return int(float(number) * (1000 if decimal else 1024) ** power)


def slurm_seconds(text: str) -> float:
    """Seconds of a Slurm time: a bare number is minutes (as in sbatch), else parse_duration."""
    t = str(text).strip()
    return float(t) * 60 if re.fullmatch(r"\d+", t) else parse_duration(t)


def format_slurm_time(text: str) -> str:
    """Slurm's ``[D-]HH:MM:SS`` from any duration the config accepts."""
    seconds = int(round(slurm_seconds(text)))
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{days}-{h:02d}:{m:02d}:{s:02d}" if days else f"{h:02d}:{m:02d}:{s:02d}"


def format_slurm_mem(text: str) -> str:
    """Slurm's ``--mem`` (binary units, K/M/G/T suffix) from 64G, 500M, 64GiB or 64GB."""
    m = re.fullmatch(r"(?i)\s*(\d+)\s*([KMGT])?\s*", text)
    if m:
        return m.group(1) + (m.group(2) or "M").upper()
    mib = -(-parse_bytes(text) // (1024 * 1024))
    return f"{mib}M"


def parse_shard(text: str) -> tuple[int, int]:
    """(i, n) from ``"i/n"`` with 0 <= i < n."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ValueError(f"expected i/n with 0 <= i < n, got {text!r}")
    return int(m.group(1)), int(m.group(2))
