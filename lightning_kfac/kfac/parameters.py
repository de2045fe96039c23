"""The parameters K-FAC tracks: trainable, not matched by ``skip_modules``, in model order."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

from lightning_kfac.kfac.options import SkipSpec


def matches(name: str, module: nn.Module, specs: Iterable[SkipSpec]) -> bool:
    """Whether module ``name`` matches a ``skip_modules`` entry (a name or class-name
    ``fnmatch`` pattern, or a module class)."""
    for spec in specs:
        if isinstance(spec, str):
            if fnmatch.fnmatchcase(name, spec) or fnmatch.fnmatchcase(type(module).__name__, spec):
                return True
        elif isinstance(module, spec):
            return True
    return False


class TrackedParameters:
    """Trainable parameters of ``model`` not in ``skip_modules``; rescanned when the set of
    trainable parameters changes (a backbone unfrozen during training).

    Args:
        model: The model.
        skip_modules: Its modules whose parameters are left to the optimizer.
    """

    def __init__(self, model: nn.Module, skip_modules: Iterable[SkipSpec]) -> None:
        self.model = model
        self.skip_modules = tuple(skip_modules)
        #: Parameter name -> its position in ``model.named_parameters()``.
        self.order: dict[str, int] = {}
        #: Tracked parameters by name.
        self.tracked: dict[str, nn.Parameter] = {}
        #: Trainable parameters K-FAC leaves alone by configuration, with the reason.
        self.skipped: dict[str, str] = {}
        #: Every parameter of the model (walking the module tree each step costs ~1 ms).
        self.all: list[nn.Parameter] = []
        self._trainable_ids: set[int] = set()
        self._new_names: list[str] = []
        self.scan()

    def scan(self) -> list[tuple[str, nn.Parameter]]:
        """Track trainable parameters not in ``skip_modules``; return the newly tracked ones."""
        owners: dict[int, list[tuple[str, nn.Module]]] = {}
        for module_name, module in self.model.named_modules(remove_duplicate=False):
            for param in module.parameters(recurse=False):
                owners.setdefault(id(param), []).append((module_name, module))
        new = []
        for index, (name, param) in enumerate(self.model.named_parameters()):
            self.order.setdefault(name, index)
            if not param.requires_grad or name in self.tracked:
                continue
            if any(
                matches(module_name, module, self.skip_modules)
                for module_name, module in owners.get(id(param), [])
            ):
                self.skipped[name] = "matched skip_modules"
                continue
            self.tracked[name] = param
            new.append((name, param))
        self.all = list(self.model.parameters())
        self._trainable_ids = {id(p) for p in self.all if p.requires_grad}
        self._new_names += [name for name, _ in new]
        return new

    def refresh(self) -> list[tuple[str, nn.Parameter]]:
        """Rescan if the set of trainable parameters changed; the newly tracked ones."""
        if {id(p) for p in self.all if p.requires_grad} == self._trainable_ids:
            return []
        return self.scan()

    def take_new_names(self) -> list[str]:
        """Names tracked since the last call (all of them at the first)."""
        names, self._new_names = self._new_names, []
        return names

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter name of the model -> its shape."""
        return {name: tuple(p.shape) for name, p in self.model.named_parameters()}

    def name_of(self, parameter: nn.Parameter) -> str:
        return next(n for n, p in self.tracked.items() if p is parameter)

    def unseen_owners(self, seen: set[str]) -> list[str]:
        """Modules owning tracked parameters that no use in ``seen`` touched: they stay traced,
        so that a use first made later (a branch) is seen and picked up."""
        owners = []
        for module_name, module in self.model.named_modules():
            for param_name, _ in module.named_parameters(recurse=False):
                full = f"{module_name}.{param_name}" if module_name else param_name
                if module_name and full in self.tracked and full not in seen:
                    owners.append(module_name)
                    break
        return owners
