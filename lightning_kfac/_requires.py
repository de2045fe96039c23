"""Optional dependencies: is Lightning importable, and a clear error when it is needed but absent.

The K-FAC core (``lightning_kfac.kfac``, ``lightning_kfac.distributed``) and the pure-torch parts
of ``lightning_kfac.mixup`` import without Lightning; the names below are what needs it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable, Iterator
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


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``action()`` once module ``name`` has been imported (a post-import hook): the finder
    only wraps the ``exec_module`` of the loader the other finders return for ``name``, so the
    module, its spec and its loader stay what they would be without it."""

    def __init__(self, name: str, action: Callable[[], None]) -> None:
        self.name = name
        self.action = action

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module
        hook = self

        def exec_module(module: types.ModuleType) -> None:
            try:
                original(module)
            finally:
                vars(loader).pop("exec_module", None)  # this loader is this module's alone
            hook.fire()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec

    def fire(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        try:
            self.action()
        except Exception as error:  # never break the user's own import
            warnings.warn(
                f"lightning_kfac: could not register its strategies after importing {self.name} "
                f"({type(error).__name__}: {error}); import lightning_kfac's module for it "
                "explicitly to see the error",
                RuntimeWarning,
                stacklevel=2,
            )


def after_import(name: str, action: Callable[[], None]) -> None:
    """Run ``action()`` now if module ``name`` is imported already, else right after it is
    (nothing if it is not installed). ``import lightning_kfac`` registers its strategy names in a
    Lightning namespace this way, without importing Lightning itself (seconds) for users who
    do not use it."""
    if name in sys.modules:
        action()
    elif importable(name.partition(".")[0]) and not any(
        isinstance(finder, _AfterImport) and finder.name == name for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _AfterImport(name, action))
