"""Optional dependencies: is Lightning importable, and a clear error when it is needed but absent.

The K-FAC core (``lightning_kfac.kfac``, ``lightning_kfac.distributed``) and the pure-torch parts
of ``lightning_kfac.mixup`` import without Lightning; the names below are what needs it.
"""

from __future__ import annotations

import importlib.util
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: Top-level packages of Lightning: a missing one means "Lightning is not installed".
LIGHTNING_PACKAGES = ("pytorch_lightning", "lightning", "lightning_fabric", "lightning_utilities")


def importable(name: str) -> bool:
    """Whether the top-level module ``name`` can be found, without importing it.

    A finder that refuses the name (``ImportError``) counts as "not importable".
    """
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@contextmanager
def lightning_requirement(what: str, alternative: str = "") -> Iterator[None]:
    """Turn a missing Lightning package inside the block into an ``ImportError`` that says
    ``what`` needs ``pytorch_lightning`` (``alternative``: another way, e.g. the unified package).

    Other import errors pass through unchanged.
    """
    try:
        yield
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] not in LIGHTNING_PACKAGES:
            raise
        raise ImportError(
            f"{what} needs pytorch_lightning, which could not be imported ({error}): "
            f"`pip install pytorch-lightning`{alternative}. Without Lightning, use the K-FAC core "
            "(`from lightning_kfac import KFACPreconditioner`, `lightning_kfac.kfac`) and "
            "`lightning_kfac.mixup`'s sampling, inputs and labels."
        ) from error


def package_dir(namespace: dict[str, Any], public: list[str]) -> list[str]:
    """``dir()`` of a package with lazy names: its public names (also those not imported yet),
    its loaded public submodules and its dunder attributes — not the helpers it imports."""
    package = namespace["__name__"]
    names = set(public)
    for name, value in namespace.items():
        submodule = isinstance(value, types.ModuleType) and value.__name__.startswith(f"{package}.")
        if name.startswith("__") or (submodule and not name.startswith("_")):
            names.add(name)
    return sorted(names)
