"""`ModuleList` and `ModuleDict`: containers that register the modules they hold, as PyTorch's.

A module kept in a plain Python list or dict is invisible to `named_modules`, so its parameters
would be neither trained nor saved; these containers make each one a submodule named by its
index or key (state-dict names `layers.0.weight`, `heads.policy.bias`).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

from graphc.ir.errors import GraphcError

from .module import Module

__all__ = ["ModuleList", "ModuleDict"]


def _checked(owner: str, module: Any) -> Module:
    if not isinstance(module, Module):
        raise GraphcError(f"{owner} holds graphc.nn.Module instances only, got "
                          f"{type(module).__name__}")
    return module


class ModuleList(Module):
    """A list of submodules registered under their indices "0", "1", ...; it has no forward:
    the owning module iterates over it."""

    def __init__(self, modules: Iterable[Module] | None = None) -> None:
        super().__init__()
        if modules is not None:
            self.extend(modules)

    def _index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"ModuleList index {index} is out of range for {len(self)} modules")
        return index % len(self)

    def _renumber(self, modules: list[Module]) -> None:
        self._modules.clear()
        self._modules.update((str(i), m) for i, m in enumerate(modules))

    def __getitem__(self, index: int | slice) -> Any:
        modules = list(self._modules.values())
        if isinstance(index, slice):
            return ModuleList(modules[index])
        return modules[self._index(index)]

    def __setitem__(self, index: int, module: Module) -> None:
        self._modules[str(self._index(index))] = _checked("ModuleList", module)

    def __delitem__(self, index: int | slice) -> None:
        modules = list(self._modules.values())
        del modules[index if isinstance(index, slice) else self._index(index)]
        self._renumber(modules)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(list(self._modules.values()))

    def __iadd__(self, modules: Iterable[Module]) -> ModuleList:
        return self.extend(modules)

    def __add__(self, other: Iterable[Module]) -> ModuleList:
        """A new ModuleList of this one's modules, then other's (the modules themselves)."""
        return ModuleList([*self, *other])

    def append(self, module: Module) -> ModuleList:
        self._modules[str(len(self))] = _checked("ModuleList", module)
        return self

    def extend(self, modules: Iterable[Module]) -> ModuleList:
        for module in modules:
            self.append(module)
        return self

    def insert(self, index: int, module: Module) -> None:
        modules = list(self._modules.values())
        modules.insert(index, _checked("ModuleList", module))
        self._renumber(modules)

    def pop(self, index: int | slice = -1) -> Any:
        """The module at `index` (the last by default), removed; those after it are renumbered."""
        module = self[index]
        del self[index]
        return module


class ModuleDict(Module):
    """An ordered dict of submodules registered under their (string) keys; it has no forward."""

    def __init__(self, modules: Mapping[str, Module] | Iterable[tuple[str, Module]] | None = None
                 ) -> None:
        super().__init__()
        if modules is not None:
            self.update(modules)

    def __getitem__(self, key: str) -> Module:
        return self._modules[key]

    def __setitem__(self, key: str, module: Module) -> None:
        if not isinstance(key, str) or not key or "." in key:
            raise GraphcError(f"ModuleDict keys must be non-empty strings without '.' (they "
                              f"become state-dict names), got {key!r}")
        self._modules[key] = _checked("ModuleDict", module)

    def __delitem__(self, key: str) -> None:
        del self._modules[key]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._modules))

    def __contains__(self, key: object) -> bool:
        return key in self._modules

    def keys(self) -> Iterable[str]:
        return self._modules.keys()

    def items(self) -> Iterable[tuple[str, Module]]:
        return self._modules.items()

    def values(self) -> Iterable[Module]:
        return self._modules.values()

    def pop(self, key: str) -> Module:
        return self._modules.pop(key)

    def clear(self) -> None:
        self._modules.clear()

    def update(self, modules: Mapping[str, Module] | Iterable[tuple[str, Module]]) -> None:
        pairs = modules.items() if isinstance(modules, Mapping) else modules
        for key, module in pairs:
            self[key] = module
