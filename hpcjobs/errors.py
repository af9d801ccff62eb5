"""Exit codes and the two error families every stage raises.

Library functions raise; only ``hpcjobs.cli`` turns an error into an exit code:

* :class:`UserError` (exit 2): bad config, usage or input, given as one line naming
  the file and the key; never a traceback.
* :class:`RunFailure` (exit 1): the run itself failed for a reason worth one line
  (a diverged loss, a checkpoint that cannot be written); not the user's input.
"""
from __future__ import annotations

EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 2
EX_TEMPFAIL = 75  # stopped cleanly with a checkpoint, more to do: the Slurm template requeues
EX_INTERRUPTED = 130


class UserError(Exception):
    """A user error (exit code 2): the message is one line naming the file and key."""


class RunFailure(RuntimeError):
    """A run that failed with one clear line (exit code 1)."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (TensorFlow's op-location prefix removed). A line
    over ``limit`` loses its middle, not its end: TensorFlow puts the reason ("No space left
    on device") after a path whose length depends on where the run lies."""
    import re

    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", str(e))
    line = (text.splitlines() or [""])[0]
    if len(line) > limit:
        head = limit // 3
        line = f"{line[:head]}...{line[len(line) - (limit - head - 3):]}"
    return f"{type(e).__name__}: {line}"
