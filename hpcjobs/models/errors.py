"""The models package's one error."""
from ..errors import UserError


class ModelError(UserError, ValueError):
    """A model that cannot be built or loaded as configured (exit code 2)."""
