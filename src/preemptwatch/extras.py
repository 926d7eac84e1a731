"""Optional dependencies: import them with an error that says which extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ConfigError


def import_extra(module: str, extra: str, feature: str) -> ModuleType:
    """``import module``, or `ConfigError` telling how to install the ``extra`` that
    ``feature`` needs."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"{feature} needs the {extra!r} extra: pip install 'preemptwatch[{extra}]' ({exc})"
        ) from None
