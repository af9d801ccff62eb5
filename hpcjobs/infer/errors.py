"""The user error of ``hpcjobs infer``."""
from __future__ import annotations

from ..config import ConfigError


class InferError(ConfigError):
    """A user error of ``hpcjobs infer`` (exit code 2): one line naming the file and the fix."""

    def __init__(self, message: str):
        ValueError.__init__(self, message)
        self.where, self.key, self.message = "infer", "", message
