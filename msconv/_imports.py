"""Objects named by an import path, ``package.module:attribute``: how user models and tasks reach the CLI."""
from __future__ import annotations

import importlib

__all__ = ["is_import_path", "resolve"]


def is_import_path(name) -> bool:
    return isinstance(name, str) and ":" in name


def resolve(path: str, what: str):
    """The object ``package.module:attribute`` names; ValueError naming ``what`` (the option) and the cause."""
    module, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{what} {path!r}: cannot import it ({type(e).__name__}: {e}); give package.module:name of an "
                         "importable object (the module must be on PYTHONPATH)") from None
    return obj
