"""`ModuleList` and `ModuleDict`: containers that register the modules they hold, as PyTorch's;
`ParameterList` and `ParameterDict` do the same for parameters.

A module kept in a plain Python list or dict is invisible to `named_modules`, so its parameters
would be neither trained nor saved; these containers make each one a submodule named by its
index or key (state-dict names `layers.0.weight`, `heads.policy.bias`, `scales.2`).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

from graphc.ir.errors import GraphcError

from .module import Module, Parameter, _is_parameter_array

__all__ = ["ModuleList", "ModuleDict", "ParameterList", "ParameterDict"]


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


def _as_parameter(value: Any) -> Parameter:
    """A Parameter as it is, an array that is one (another module's weight) as that same
    parameter, anything else (an array, a torch tensor) made one, as PyTorch's parameter
    containers do."""
    if isinstance(value, Parameter):
        return value
    return Parameter.holding(value) if _is_parameter_array(value) else Parameter(value)


def _parameters_repr(container: Module) -> str:
    return ", ".join(f"({key}): shape {tuple(a.shape)} {a.dtype}"
                     for key, a in container._parameters.items() if a is not None)


class ParameterList(Module):
    """A list of parameters registered under their indices "0", "1", ...; indexing inside a
    traced function gives the parameter's traced value, as an attribute would."""

    def __init__(self, values: Iterable[Any] | None = None) -> None:
        super().__init__()
        if values is not None:
            self.extend(values)

    def _index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"ParameterList index {index} is out of range for {len(self)} "
                             f"parameters")
        return index % len(self)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):  # the same parameters, as PyTorch's slice
            return ParameterList(Parameter.holding(self._parameters[str(i)])
                                 for i in range(len(self))[index])
        return getattr(self, str(self._index(index)))

    def __setitem__(self, index: int, value: Any) -> None:
        self.register_parameter(str(self._index(index)), _as_parameter(value))

    def __len__(self) -> int:
        return len(self._parameters)

    def __iter__(self) -> Iterator[Any]:
        return iter([self[i] for i in range(len(self))])

    def __iadd__(self, values: Iterable[Any]) -> ParameterList:
        return self.extend(values)

    def append(self, value: Any) -> ParameterList:
        self.register_parameter(str(len(self)), _as_parameter(value))
        return self

    def extend(self, values: Iterable[Any]) -> ParameterList:
        for value in values:
            self.append(value)
        return self

    def extra_repr(self) -> str:
        return _parameters_repr(self)


class ParameterDict(Module):
    """An ordered dict of parameters registered under their (string) keys."""

    def __init__(self, parameters: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None
                 ) -> None:
        super().__init__()
        if parameters is not None:
            self.update(parameters)

    def __getitem__(self, key: str) -> Any:
        if key not in self._parameters:
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        self.register_parameter(key, _as_parameter(value))

    def __delitem__(self, key: str) -> None:
        del self._parameters[key]

    def __len__(self) -> int:
        return len(self._parameters)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._parameters))

    def __contains__(self, key: object) -> bool:
        return key in self._parameters

    def keys(self) -> Iterable[str]:
        return list(self._parameters)

    def items(self) -> list[tuple[str, Any]]:
        return [(key, self[key]) for key in self._parameters]

    def values(self) -> list[Any]:
        return [self[key] for key in self._parameters]

    def pop(self, key: str) -> Any:
        value = self[key]
        del self[key]
        return value

    def update(self, parameters: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> None:
        pairs = parameters.items() if isinstance(parameters, Mapping) else parameters
        for key, value in pairs:
            self[key] = value

    def extra_repr(self) -> str:
        return _parameters_repr(self)
