"""Old import paths of the applications, kept working after they moved under ``apps/``.

A module that moved is replaced by a stub whose module-level ``__getattr__`` finds the
name in its new home and warns once per name, so existing code keeps running while it
is told where to import from. The targets are imported only when a name is asked for:
the stubs cost nothing to the core's import.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Sequence


def forward_to(old: str, targets: Sequence[str]) -> tuple[Callable, Callable]:
    """``__getattr__`` and ``__dir__`` for the stub ``old``: names are looked up in
    ``targets`` in order (the package's public face first, then its private modules,
    for the rare caller that reached into the old module's internals)."""

    def __getattr__(name: str):
        # dunders are the import system probing the module, not a user's name
        if name.startswith("__"):
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        for target in targets:
            module = importlib.import_module(target)
            if name in vars(module):
                value = vars(module)[name]
                # a private module may hold the name only as an import: point the
                # caller at the module that defines it
                home = getattr(value, "__module__", None)
                where = home if target != targets[0] and home in targets else target
                warnings.warn(
                    f"{old}.{name} has moved: import it from {where} ({old} will be "
                    "removed)",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return value
        raise AttributeError(
            f"module {old!r} has no attribute {name!r} (it moved to {targets[0]})"
        )

    def __dir__() -> list[str]:
        names: set[str] = set()
        for target in targets:
            names.update(n for n in vars(importlib.import_module(target))
                         if not n.startswith("__"))
        return sorted(names)

    return __getattr__, __dir__
