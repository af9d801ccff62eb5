"""Your own hooks from the config (``training.hooks``): each class is built with its
``options`` and runs after the built-in hooks, at the same moments (``base``).  The
state its ``setup`` returns (tf.Variables) is checkpointed under the hook's own names
(``hook<i>_<name>``), so two hooks may both call theirs ``count`` and a resumed run
continues them exactly."""
from __future__ import annotations

from ... import plugins
from .base import Hook

_METHODS = [name for name in vars(Hook) if not name.startswith("_")]


class UserHook(Hook):
    """A hook of the user's class: its methods, where it has them (a class need not derive
    from ``Hook``), and its state's names made its own."""

    def __init__(self, index: int, obj, key: str, where: str):
        self.index, self.obj, self.key, self.where = index, obj, key, where

    def setup(self, trainer) -> dict:
        fn = getattr(self.obj, "setup", None)
        state = plugins.call(fn, self.key, self.where, trainer) if fn else {}
        if state is None:
            return {}
        if not isinstance(state, dict):
            raise plugins.PluginError(f"{self.key}: {self.where}: setup returned a {type(state).__name__}, "
                                      "not a dict of name -> tf.Variable")
        return {f"hook{self.index}_{k}": v for k, v in state.items()}


def _delegate(name):
    def method(self, *args):
        fn = getattr(self.obj, name, None)
        return fn(*args) if fn is not None else getattr(Hook, name)(self, *args)
    method.__name__ = name
    return method


for _name in _METHODS:
    if _name != "setup":
        setattr(UserHook, _name, _delegate(_name))


def user_hooks(cfg) -> list[Hook]:
    """``training.hooks``, each class built with its options."""
    out = []
    for i, h in enumerate(cfg.training.hooks):
        key = f"training.hooks[{i}]"
        cls = plugins.resolve(h.hook, "hook", key)
        obj = plugins.call(cls, key, plugins.where(h.hook), **h.options)
        out.append(UserHook(i, obj, key, plugins.where(h.hook)))
    return out
