"""The user error of ``hpcjobs infer``."""
from __future__ import annotations

from ..errors import UserError


class InferError(UserError, ValueError):
    """A user error of ``hpcjobs infer`` (exit code 2): one line naming the file and the fix."""
