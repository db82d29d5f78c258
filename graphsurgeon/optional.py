"""Optional dependencies, checked in one place.

Heavy or deployment-only libraries (ONNX, ONNX Runtime, TensorBoard, timm, transformers) are
extras: the core library never imports them at import time. A feature that needs one calls
`require`, which either returns the module or raises `MissingDependencyError` saying which
extra to install.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from graphsurgeon.errors import MissingDependencyError

__all__ = ["EXTRAS", "available", "require"]

EXTRAS: dict[str, str] = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "tensorboard": "tensorboard",
    "timm": "timm",
    "transformers": "transformers",
}
"""The pip extra of graphsurgeon that installs each optional module."""


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it twice when it can)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` for ``purpose`` (e.g. ``"gs.to_onnx"``), or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = EXTRAS.get(module)
        how = f"pip install 'graphsurgeon[{extra}]'" if extra else f"pip install {module}"
        if _installed(module):  # present, but it (or something it imports) fails to import
            raise MissingDependencyError(
                f"{purpose} needs the optional package {module!r}, which is installed but fails to import ({exc}). "
                f"Fix: install what it is missing, or reinstall it ({how})."
            ) from exc
        raise MissingDependencyError(f"{purpose} needs the optional package {module!r}, which is not installed. Fix: {how}.") from exc


def _installed(module: str) -> bool:
    """Whether ``module`` can be found, without importing it (a broken install is found)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
