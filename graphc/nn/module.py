"""`Module`: parameters, buffers and submodules, as in PyTorch.

Parameters and buffers are NumPy arrays owned by the module. A module's forward only ever runs
while graphc traces it: for that, `bound(module, tensors)` swaps every parameter and buffer for
the traced Tensor that stands for it, so the compiled step reads (and, through donated buffers,
updates) the module's own arrays. A parameter or buffer read in a trace (as an attribute or
through parameters(), state_dict() and the like) without being bound becomes an implicit input
of the trace (tensor.Trace.read_state): compiled functions read it from the module at each
call, never as a constant.

A training step running on a GPU keeps the newest values on the device instead: it *claims*
the module tree (`claim_state`). Whatever hands the module's arrays out (state_dict,
parameters, named_parameters/named_buffers, attribute access, load_state_dict, copying) first
makes that holder release them: copy them back, then re-read the arrays before its next step,
since they may have been written. Nothing claims a module on the CPU, where every check is
one test of an empty set.
"""
from __future__ import annotations

import itertools
import os
import weakref
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NamedTuple, Protocol

import numpy as np

from graphc.ir.errors import GraphcError, user_location
from graphc.ir.types import DTYPES, FLOAT_DTYPES

from ..tensor import (StateRef, Tensor, current_trace, dtype_name, enclosing_traces, is_setting,
                      is_tracing, note_module_attribute_read, note_module_tree_edit, watch_tracing)


class StateHolder(Protocol):
    """Keeps the newest values of a module tree's parameters and buffers elsewhere (a training
    step on a GPU)."""

    def sync_state(self) -> None:
        """Copy the newer values into the module's own arrays."""

    def release_state(self) -> None:
        """sync_state, then let go: the module's arrays are the truth again (they may be
        written; the holder reads them before it next runs) and the claim ends."""


_CLAIMING: weakref.WeakSet = weakref.WeakSet()  # holders with a claim now


def claim_state(module: Module, holder: StateHolder) -> None:
    """`holder` has the newest values of the tree's parameters and buffers from now on; any
    other holder of them releases them first."""
    release_state_holders(module)
    for m in module.modules():
        object.__setattr__(m, "_state_holder", holder)
    _CLAIMING.add(holder)


def unclaim_state(module: Module, holder: StateHolder) -> None:
    for m in module.modules():
        if m.__dict__.get("_state_holder") is holder:
            object.__setattr__(m, "_state_holder", None)
    _CLAIMING.discard(holder)


def state_claimed() -> bool:
    """Whether any holder has a claim now (on the CPU, never)."""
    return bool(_CLAIMING)


def _holders(module: Module) -> list[StateHolder]:
    if not _CLAIMING:
        return []
    found = (m.__dict__.get("_state_holder") for m in module.modules())
    return list(dict.fromkeys(h for h in found if h is not None))


def sync_state_holders(module: Module) -> None:
    """Before the tree's arrays are read (not written): they get the newest values."""
    for holder in _holders(module):
        holder.sync_state()


def release_state_holders(module: Module) -> None:
    """Before the tree's arrays are handed out, or written: newest values copied back, and
    every holder re-reads them before it next runs."""
    for holder in _holders(module):
        holder.release_state()


class Parameter:
    """Marks an array as a trainable parameter when assigned to a Module attribute."""

    __slots__ = ("data",)

    @classmethod
    def holding(cls, array: np.ndarray) -> Parameter:
        """A Parameter of an array that already is one (not a new view of it): given to a
        container or a module, it is the same parameter under another name (tied)."""
        param = cls.__new__(cls)
        param.data = array
        return param

    def __init__(self, data: Any) -> None:
        array = _host_array(data, "Parameter")  # a torch tensor (requiring grad, bfloat16) too
        if array.dtype.name not in ("float16", "float32", "float64", "bool") and array.dtype.kind not in "iu":
            raise GraphcError(f"Parameter: dtype {array.dtype} is not supported; give float32 or "
                              f"float64 values (at {user_location()})")
        # float16 widened to float32, as load_state_dict widens bfloat16; integers and Python
        # numbers made float32
        keep = (isinstance(data, np.ndarray) or _is_torch_tensor(data)) and array.dtype.name in ("float32", "float64")
        # np.require keeps a 0-d array 0-d (a temperature, a logit scale)
        # a view: the memory is the caller's, as a PyTorch Parameter shares its tensor's, but
        # the array given stays itself, not a parameter wherever it is assigned
        self.data = np.require(array, array.dtype if keep else np.float32, requirements="C").view()
        _PARAMETER_ARRAYS[id(self.data)] = self.data


# Every array made a parameter, while it lives: assigned to another module's attribute it is a
# parameter there too (`self.weight_v = helper.weight`, the helper not kept), as a PyTorch
# Parameter is wherever it goes.
_PARAMETER_ARRAYS: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()


def _is_parameter_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) and _PARAMETER_ARRAYS.get(id(value)) is value


def _note_parameter_arrays(module: Module) -> None:
    """Register the arrays of `module`'s parameter table as parameters (copies made by deepcopy,
    pickle or a cast, which no Parameter() made)."""
    for array in module.__dict__["_parameters"].values():
        if array is not None:
            _PARAMETER_ARRAYS[id(array)] = array


def _buffer_array(value: Any, name: str) -> np.ndarray:
    """A buffer's array, C-contiguous (np.require keeps 0-d arrays 0-d): float16 widened to
    float32 as parameters are, a dtype graphc lacks refused by the buffer's name."""
    array = np.require(_host_array(value, name), requirements="C")
    if array.dtype == np.float16:
        return array.astype(np.float32)
    if array.dtype.name not in DTYPES:
        raise GraphcError(f"buffer {name!r}: dtype {array.dtype} is not supported; use float32, "
                          f"float64, int32, int64 or bool (at {user_location()})")
    return array


_PLAIN_CONTAINERS = (list, tuple, dict, set, frozenset)


def _module_inside(value: Any, path: str, registered: set[int]) -> tuple[str, Module] | None:
    """The first Module a plain container holds, at any depth, that is not one of `registered`
    (ids), with its index path ("self.layers[1]['head']"); None if it holds none."""
    if isinstance(value, Module):
        return None if id(value) in registered else (path, value)
    if isinstance(value, dict):
        items: Iterator[tuple[str, Any]] = ((f"{path}[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    elif isinstance(value, (set, frozenset)):
        items = ((f"an element of {path}", v) for v in value)
    else:
        return None
    for where, item in items:
        if isinstance(item, (Module, *_PLAIN_CONTAINERS)):
            found = _module_inside(item, where, registered)
            if found is not None:
                return found
    return None


def _refuse_unregistered_modules(owner: Module, name: str, value: Any) -> None:
    """A plain list/dict/tuple/set holding modules hides them from named_modules(): their
    parameters would silently be neither trained nor saved. One listing modules already
    registered in the owner's tree (`self.stages = [self.conv1, self.conv2]`) hides nothing."""
    if not isinstance(value, _PLAIN_CONTAINERS):
        return
    found = _module_inside(value, f"self.{name}", {id(m) for m in owner.modules()})
    if found is None:
        return
    where, module = found
    fix = "nn.ModuleDict({...})" if isinstance(value, dict) else "nn.ModuleList([...])"
    raise GraphcError(
        f"{type(owner).__name__}.{name}: a plain {type(value).__name__} holding modules "
        f"({where} is a {type(module).__name__}) does not register them, so their parameters "
        f"would be neither trained nor saved; use self.{name} = {fix} (at {user_location()})")


class IncompatibleKeys(NamedTuple):
    """What load_state_dict did not match, as PyTorch's (a `strict=False` load returns it)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class Table(dict):
    """A module's parameters, buffers or child modules by name: a dict whose every change is
    counted (tensor.note_module_tree_edit), whoever makes it (setattr, del, the containers)."""

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, value)
        note_module_tree_edit()

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        note_module_tree_edit()

    def clear(self) -> None:
        super().clear()
        note_module_tree_edit()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        note_module_tree_edit()

    def pop(self, *args: Any) -> Any:
        note_module_tree_edit()
        return super().pop(*args)

    def popitem(self) -> tuple[str, Any]:
        note_module_tree_edit()
        return super().popitem()

    def setdefault(self, name: str, value: Any = None) -> Any:
        note_module_tree_edit()
        return super().setdefault(name, value)


_HOOK_IDS = itertools.count()


class RemovableHandle:
    """What registering a hook returns: `remove()` takes the hook away (a `with` block removes
    it at its end), as PyTorch's handle."""

    def __init__(self, hooks: dict[int, Any], key: int) -> None:
        self._hooks, self.id = hooks, key

    def remove(self) -> None:
        if self._hooks.pop(self.id, None) is not None:
            note_module_tree_edit()

    def __enter__(self) -> RemovableHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class ModuleAssignmentError(GraphcError, TypeError):
    """A value of the wrong kind assigned to a registered name, or registered under a bad name."""


class Module:
    training: bool

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", Table())
        object.__setattr__(self, "_buffers", Table())
        object.__setattr__(self, "_non_persistent_buffers", set())  # left out of state_dict
        object.__setattr__(self, "_modules", Table())
        object.__setattr__(self, "_bound", None)
        object.__setattr__(self, "_state_holder", None)
        object.__setattr__(self, "training", True)
        # plain attributes its forward writes while traced: its own state, not settings that
        # compiled graphs follow (graphc/tensor.py, module_structure)
        object.__setattr__(self, "_written_in_trace", set())

    # -- registration -------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        """Registers as PyTorch does: a Parameter (or, beyond PyTorch, an array put in a
        parameter's place) as a parameter, a Module as a child, an array over a buffer as that
        buffer, whatever the name held before; None over a parameter, buffer or child keeps the
        name registered as absent (`self.bias = None`)."""
        if "_parameters" not in self.__dict__:
            raise GraphcError(f"{type(self).__name__}.__init__ must call super().__init__() "
                              "before assigning attributes")
        params, buffers, modules = self._parameters, self._buffers, self._modules
        # One of the tree's parameters assigned again (`self.head.weight = self.embed.weight`,
        # PyTorch's weight tying) is a parameter: reached under both names, one array, trained
        # as one (named_parameters lists it once).
        shared = isinstance(value, np.ndarray) and (_is_parameter_array(value)
                                                    or _holds_parameter(self, value))
        over_parameter = isinstance(value, np.ndarray) and name in params
        if isinstance(value, Parameter) or shared or over_parameter:
            self._forget(name, keep=params)
            if isinstance(value, Parameter):
                params[name] = value.data
            elif shared:
                params[name] = value  # one array under two names: tied
            else:  # an array put in a parameter's place
                params[name] = Parameter(value).data
        elif name in params:
            self._refuse_unless_none(value, name, "parameter", "an nn.Parameter, an array")
            params[name] = None
        elif isinstance(value, Module):
            self._forget(name, keep=modules)
            modules[name] = value
        elif name in modules:
            self._refuse_unless_none(value, name, "child module", "an nn.Module")
            modules[name] = None
        elif name in buffers:
            if is_tracing() and value is not None and value is getattr(self, name):
                return  # `self.buf += v`: written in place, the same tensor assigned back
            if not isinstance(value, np.ndarray):
                self._refuse_unless_none(value, name, "buffer", "an array")
            buffers[name] = None if value is None else _buffer_array(value, name)
        else:
            _refuse_unregistered_modules(self, name, value)
            old = self.__dict__.get(name, _ABSENT)
            if is_tracing():  # its forward's own state (a call counter), not a setting
                self._written_in_trace.add(name)
            elif (is_setting(value) or is_setting(old)) and not (type(old) is type(value) and old == value):
                note_module_tree_edit()  # a setting a trace baked in (momentum, p): traced again
            object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        for table in (self._parameters, self._buffers, self._modules):
            if name in table:
                del table[name]
                self._non_persistent_buffers.discard(name)
                return
        if name in self.__dict__ and is_setting(self.__dict__[name]):
            note_module_tree_edit()
        object.__delattr__(self, name)

    def _forget(self, name: str, keep: dict[str, Any] | None = None) -> None:
        """Drop `name` from every table but `keep` and from the plain attributes, before
        registering it anew: a value left behind in __dict__ would be what forward reads. In
        `keep`, where the new value goes, it keeps its place, as in PyTorch: a Sequential's
        layer replaced runs where the old one did, a parameter stays where state_dict has it."""
        for table in (self._parameters, self._buffers, self._modules):
            if table is not keep:
                table.pop(name, None)
        self._non_persistent_buffers.discard(name)
        self.__dict__.pop(name, None)

    def _refuse_unless_none(self, value: Any, name: str, kind: str, expected: str) -> None:
        if value is not None:
            raise ModuleAssignmentError(
                f"{type(self).__name__}.{name} is a {kind}: it takes {expected} or None, not a "
                f"{type(value).__name__} (del self.{name} first to make it a plain attribute; "
                f"at {user_location()})")

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Add a parameter (None: the name is registered, absent), as PyTorch's."""
        if param is not None and not isinstance(param, Parameter):
            raise ModuleAssignmentError(
                f"{type(self).__name__}.register_parameter({name!r}): takes an nn.Parameter or "
                f"None, not a {type(param).__name__} (at {user_location()})")
        self._check_new_name(name, "register_parameter", self._parameters)
        self._forget(name, keep=self._parameters)
        self._parameters[name] = None if param is None else param.data

    def register_buffer(self, name: str, array: Any, persistent: bool = True) -> None:
        """Non-trainable state (e.g. running statistics); saved in the state dict unless
        `persistent` is False. None registers the name, absent."""
        self._check_new_name(name, "register_buffer", self._buffers)
        self._forget(name, keep=self._buffers)
        self._buffers[name] = None if array is None else _buffer_array(array, name)
        if not persistent:
            self._non_persistent_buffers.add(name)

    def register_module(self, name: str, module: Module | None) -> None:
        """Add a child module (None: the name is registered, absent), as PyTorch's."""
        if module is not None and not isinstance(module, Module):
            raise ModuleAssignmentError(
                f"{type(self).__name__}.register_module({name!r}): takes an nn.Module or None, "
                f"not a {type(module).__name__} (at {user_location()})")
        self._check_new_name(name, "register_module", self._modules)
        self._forget(name, keep=self._modules)
        self._modules[name] = module

    add_module = register_module

    def _check_new_name(self, name: str, method: str, table: dict[str, Any]) -> None:
        """PyTorch's rules: a non-empty string without dots, not already an attribute of another
        kind (a plain one, a method, or an entry of another table)."""
        if not isinstance(name, str) or not name or "." in name:
            raise ModuleAssignmentError(f"{type(self).__name__}.{method}: the name must be a "
                                        f"non-empty string without '.', got {name!r}")
        taken = name in self.__dict__ or hasattr(type(self), name) or any(
            name in other for other in (self._parameters, self._buffers, self._modules)
            if other is not table)
        if taken:
            raise ModuleAssignmentError(f"{type(self).__name__}.{method}: {name!r} is already "
                                        f"an attribute of another kind (at {user_location()})")

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        for table in ("_parameters", "_buffers"):
            if name in d.get(table, {}):
                if d[table][name] is None:  # registered as absent (`self.bias = None`)
                    return None
                if is_tracing():  # a Tensor of the trace: the array is read at each call
                    return traced_state(StateRef(self, table, name))
                release_state_holders(self)
                return d[table][name]
        bound = d.get("_bound")
        if bound is not None and name in bound[1] and is_tracing() and bound[0] is current_trace():
            return bound[1][name]
        if name in d.get("_modules", {}):
            return d["_modules"][name]
        derived = d.get("_derived_attributes")
        if derived and name in derived:  # computed from parameters at each read (weight_norm)
            return derived[name](self)
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    def _refuse_hidden_modules(self) -> None:
        """Modules put into a plain list or dict after it was assigned (`self.layers = []`, then
        `self.layers.append(...)`) escape __setattr__'s check; asking for the parameters (to
        build an optimizer or compile a step) finds them."""
        for name, value in self.__dict__.items():
            if name not in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers"):
                _refuse_unregistered_modules(self, name, value)

    # -- traversal ----------------------------------------------------------------------
    def named_modules(self, memo: set[Module] | None = None, prefix: str = "",
                      remove_duplicate: bool = True) -> Iterator[tuple[str, Module]]:
        """(dotted name, module) over the tree in PyTorch's order and naming: each module before
        its children, the root named `prefix` ("" by default), a module reached by several names
        once, under the first, unless `remove_duplicate` is False."""
        seen = memo if memo is not None else set()
        for path, module in _prefixed_modules(self, remove_duplicate, seen):
            yield (prefix + ("." if prefix and path else "") + path[:-1]), module

    def modules(self) -> Iterator[Module]:
        return (m for _, m in self.named_modules())

    def get_submodule(self, target: str) -> Module:
        """The module at dotted path `target` ("" is this one), as PyTorch's."""
        module: Module = self
        for i, name in enumerate(target.split(".") if target else ()):
            child = module._modules.get(name)
            if child is None:
                where = ".".join(target.split(".")[:i]) or type(self).__name__
                raise AttributeError(f"{where} has no submodule {name!r} (looking up {target!r})")
            module = child
        return module

    def get_parameter(self, target: str) -> np.ndarray:
        """The parameter at dotted path `target` ("encoder.0.weight"), as PyTorch's."""
        path, _, name = target.rpartition(".")
        module = self.get_submodule(path)
        if name not in module._parameters or module._parameters[name] is None:
            raise AttributeError(f"{path or type(self).__name__} has no parameter {name!r} "
                                 f"(looking up {target!r})")
        return getattr(module, name)

    def named_children(self) -> Iterator[tuple[str, Module]]:
        """(name, child) for the direct children, each once, as PyTorch's."""
        seen: set[int] = set()
        for name, child in self._modules.items():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                yield name, child

    def children(self) -> Iterator[Module]:
        return (child for _, child in self.named_children())

    def apply(self, fn: Callable[[Module], Any]) -> Module:
        """Call `fn` on every child's tree, then on this module, and return this module, as
        PyTorch's (the usual way to initialise weights: `model.apply(init_weights)`)."""
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
                         ) -> Iterator[tuple[str, np.ndarray | Tensor]]:
        """(dotted name, parameter) over the tree (this module's own alone unless `recurse`),
        each name after `prefix`; a parameter reached by several names (tied) once, under the
        first, unless `remove_duplicate` is False, as PyTorch's. While tracing, the parameters
        are Tensors of the trace, as attribute access gives them: bound ones where the tree is
        bound (a model being trained: gradients reach them), else implicit inputs read at each
        call."""
        return _selected(self._named_state("_parameters", remove_duplicate), prefix, recurse)

    def parameters(self, recurse: bool = True) -> Iterator[np.ndarray | Tensor]:
        """The parameters of named_parameters, an iterator as PyTorch's (`next(m.parameters())`)."""
        return (p for _, p in self.named_parameters(recurse=recurse))

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
                      ) -> Iterator[tuple[str, np.ndarray | Tensor]]:
        """(dotted name, buffer) over the tree; Tensors of the trace while tracing (see
        named_parameters)."""
        return _selected(self._named_state("_buffers", remove_duplicate), prefix, recurse)

    def buffers(self, recurse: bool = True) -> Iterator[np.ndarray | Tensor]:
        return (b for _, b in self.named_buffers(recurse=recurse))

    def num_parameters(self) -> int:
        return sum(p.size for _, p in named_arrays(self, "_parameters"))

    def _named_state(self, table: str, remove_duplicate: bool = True
                     ) -> Iterator[tuple[str, np.ndarray | Tensor]]:
        if not is_tracing():
            return named_arrays(self, table, remove_duplicate)
        # Read now, in the trace in progress, however late the caller iterates; implicit inputs
        # are named by their path from this module, as when it is called ("Sequential.0.weight").
        root = current_trace().module_name(self)
        return iter([(name, traced_state(ref, f"{root}.{name}"))
                     for name, ref in named_state_refs(self, (table,), remove_duplicate=remove_duplicate)])

    # -- modes and state ------------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        if not isinstance(mode, (bool, np.bool_)):
            raise ValueError(f"{type(self).__name__}.train: mode must be a bool, got {mode!r}")
        mode = bool(mode)
        object.__setattr__(self, "training", mode)
        for child in self.children():  # through their own train(), which a subclass may override
            child.train(mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def to(self, dtype: Any) -> Module:
        """Cast every floating-point parameter and buffer of the tree to `dtype` (float32 or
        float64), registering the cast arrays in place of the old ones, as PyTorch does; integer
        buffers (counters) keep their dtype. Optimizers and compiled steps hold the arrays they
        were given: build them after casting."""
        if hasattr(dtype, "dtype") and not isinstance(dtype, (np.dtype, type)):
            dtype = dtype.dtype  # model.to(other_tensor): that tensor's dtype, as PyTorch's
        try:
            name = dtype_name(dtype)  # a torch dtype too, as Tensor.to takes it
        except TypeError:
            name = None
        if name not in FLOAT_DTYPES:
            raise GraphcError(f"{type(self).__name__}.to: expects a floating-point dtype "
                              f"({', '.join(FLOAT_DTYPES)}), got {dtype!r} (graphc places "
                              f"models on devices through the backend, not through .to)")
        target = np.dtype(name)
        release_state_holders(self)  # the newest values are the ones to cast
        # A tied array is cast once, so its names stay one array (the source is kept: its id
        # stays its own while the loop runs).
        cast: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for m in self.modules():
            for table in (m._parameters, m._buffers):
                for key, array in table.items():
                    if array is not None and array.dtype.kind == "f" and array.dtype != target:
                        if id(array) not in cast:
                            cast[id(array)] = (array, np.require(array.astype(target),
                                                                 requirements="C"))
                        table[key] = cast[id(array)][1]
            _note_parameter_arrays(m)
        return self

    def double(self) -> Module:
        """Parameters and floating-point buffers to float64 (see `to`)."""
        return self.to(np.float64)

    def float(self) -> Module:
        """Parameters and floating-point buffers to float32 (see `to`)."""
        return self.to(np.float32)

    def state_dict(self, *, prefix: str = "") -> dict[str, np.ndarray | Tensor]:
        """The live arrays by dotted name in PyTorch's order (module by module: its parameters,
        its persistent buffers, then its children's), a tied parameter under each of its names
        (as PyTorch's), each name after `prefix` ("encoder." gives "encoder.0.weight");
        compiled training steps update them in place. While tracing, Tensors of the trace (see
        named_parameters)."""
        if not is_tracing():
            state = state_arrays(self)
        else:
            root = current_trace().module_name(self)
            state = {name: traced_state(ref, f"{root}.{name}")
                     for name, ref in named_state_refs(self, _STATE_TABLES, persistent_only=True)}
        return {prefix + name: value for name, value in state.items()} if prefix else state

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> IncompatibleKeys:
        """Copy arrays into the module's own (so compiled steps keep seeing them), converted to
        their dtypes as PyTorch's copy_ does (a float count into an int64 buffer too). Every
        array is checked before any is written: a bad one leaves the module as it was. Returns
        the missing and unexpected keys (with strict, either is an error)."""
        if not isinstance(state, Mapping):
            hint = (" (a file's path: read its arrays first, e.g. with safetensors.numpy.load_file, "
                    "or load a checkpoint into a training step with graphc.train.load_checkpoint)"
                    if isinstance(state, (str, os.PathLike)) else "")
            raise TypeError(f"load_state_dict: expected a mapping of names to arrays, got "
                            f"{type(state).__name__}{hint}")
        own = state_arrays(self)  # a step keeping them on a GPU has let go: it re-reads them
        # a norm layer's batch count may be missing (a hand-made dict, a checkpoint from before
        # PyTorch kept it): it keeps its value, as PyTorch's norm layers fill it in
        missing = {k for k in set(own) - set(state)
                   if k.rpartition(".")[2] != "num_batches_tracked"}
        keys = IncompatibleKeys(sorted(missing), sorted(set(state) - set(own)))
        if strict and (keys.missing_keys or keys.unexpected_keys):
            raise GraphcError(f"load_state_dict: missing keys {keys.missing_keys}, unexpected keys "
                              f"{keys.unexpected_keys}")
        loaded = {name: _host_array(value, name) for name, value in state.items() if name in own}
        for name, value in loaded.items():
            if value.shape != own[name].shape:
                raise GraphcError(f"load_state_dict: {name!r} has shape {value.shape}, "
                                  f"the module expects {own[name].shape}")
            if value.dtype.kind not in "biuf":
                raise GraphcError(f"load_state_dict: {name!r} holds {value.dtype}, not numbers")
        for name, value in loaded.items():
            np.copyto(own[name], value, casting="unsafe")
        return keys

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles get the newest values, and not the holder of them."""
        release_state_holders(self)
        return {**self.__dict__, "_state_holder": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_non_persistent_buffers", set())  # pickled before it existed
        self.__dict__.setdefault("_written_in_trace", set())
        for name in ("_parameters", "_buffers", "_modules"):  # pickled as plain dicts before
            if type(self.__dict__.get(name)) is dict:
                self.__dict__[name] = Table(self.__dict__[name])
        _note_parameter_arrays(self)  # copied arrays: parameters wherever they are assigned

    # -- calling ----------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not is_tracing():
            return self._forward_with_hooks(args, kwargs)
        with current_trace().calling(self):  # the graph depends on this module's mode
            return self._forward_with_hooks(args, kwargs)

    def _forward_with_hooks(self, args: tuple, kwargs: dict) -> Any:
        """forward, after the pre-hooks (which may replace the arguments) and before the hooks
        (which may replace the output), as PyTorch calls them."""
        pre_hooks = self.__dict__.get("_forward_pre_hooks")
        hooks = self.__dict__.get("_forward_hooks")
        if not pre_hooks and not hooks:
            return self.forward(*args, **kwargs)
        for hook, with_kwargs, _ in list((pre_hooks or {}).values()):
            if with_kwargs:
                result = hook(self, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise GraphcError(f"{type(self).__name__}: a forward pre-hook with "
                                          f"with_kwargs=True must return None or (args, kwargs), "
                                          f"got {type(result).__name__}")
                    args, kwargs = result
            else:
                result = hook(self, args)
                if result is not None:
                    args = result if isinstance(result, tuple) else (result,)
        try:
            output = self.forward(*args, **kwargs)
        except Exception:
            # PyTorch's always_call hooks run even when forward raised, with no output
            for hook, with_kwargs, always in list((hooks or {}).values()):
                if always and with_kwargs:
                    hook(self, args, kwargs, None)
                elif always:
                    hook(self, args, None)
            raise
        for hook, with_kwargs, _ in list((hooks or {}).values()):
            result = hook(self, args, kwargs, output) if with_kwargs else hook(self, args, output)
            if result is not None:
                output = result
        return output

    def register_forward_pre_hook(self, hook: Callable[..., Any], *, prepend: bool = False,
                                  with_kwargs: bool = False) -> RemovableHandle:
        """`hook(module, args)` (with `with_kwargs`, `hook(module, args, kwargs)`) runs before
        each forward; what it returns, unless None, replaces the arguments. Traced code runs
        it as it traces the forward; a compiled function follows its registration and removal."""
        return self._add_hook("_forward_pre_hooks", hook, prepend, with_kwargs, False)

    def register_forward_hook(self, hook: Callable[..., Any], *, prepend: bool = False,
                              with_kwargs: bool = False, always_call: bool = False
                              ) -> RemovableHandle:
        """`hook(module, args, output)` (with `with_kwargs`, `hook(module, args, kwargs,
        output)`) runs after each forward; what it returns, unless None, replaces the output.
        With `always_call` it also runs when forward raises (output None). Inside traced code,
        `output` is a traced Tensor: keep it (`features.append(output)`) only to return it from
        the traced function."""
        return self._add_hook("_forward_hooks", hook, prepend, with_kwargs, always_call)

    def _add_hook(self, table: str, hook: Callable[..., Any], prepend: bool,
                  with_kwargs: bool, always_call: bool) -> RemovableHandle:
        if not callable(hook):
            raise GraphcError(f"{type(self).__name__}: a hook must be callable, got "
                              f"{type(hook).__name__}")
        # made at the first hook: a module holding a dict is checked at every compiled call
        hooks = self.__dict__.setdefault(table, {})
        key = next(_HOOK_IDS)
        entry = (hook, bool(with_kwargs), bool(always_call))
        entries = [(key, entry)] + list(hooks.items()) if prepend else None
        if entries is None:
            hooks[key] = entry
        else:
            hooks.clear()
            hooks.update(entries)
        note_module_tree_edit()
        return RemovableHandle(hooks, key)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def update_buffer(self, name: str, value: Tensor) -> None:
        """Record a new value for a buffer inside a traced training step (e.g. running stats)."""
        trace = current_trace()
        updates, owners = trace.buffer_updates, trace.buffer_owners
        if updates is None and any(t.buffer_updates is not None for t in enclosing_traces()):
            raise GraphcError(f"{type(self).__name__}: buffer {name!r} cannot be updated inside a "
                              f"gc.grad or gc.jit traced within a training step (a gradient "
                              f"penalty through the model in training mode): that is not "
                              f"supported yet; call the model there with its batch-norm layers in "
                              f"eval mode (at {user_location()})")
        if updates is None or owners is not None and (id(self), name) not in owners:
            raise GraphcError(f"{type(self).__name__}: buffer {name!r} can only be updated by a "
                              "compiled training step, as a part of the model it trains; this "
                              "module is in training mode outside one (called by the loss "
                              "function, or traced on its own): call .eval() on it, or make it "
                              "a submodule of the trained model")
        updates[(id(self), name)] = value

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        children = [f"  ({n}): " + repr(m).replace("\n", "\n  ") for n, m in self._modules.items()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        return head + ("\n" + "\n".join(children) + "\n)" if children else ")")


_NUMPY_FLOATS = {"torch.float16", "torch.float32", "torch.float64"}


def _watching_getattribute(self: Module, name: str) -> Any:
    """Module.__getattribute__ while a trace runs: the graph follows the plain attributes the
    traced code reads (tensor.note_module_attribute_read)."""
    value = object.__getattribute__(self, name)
    if is_tracing():  # this thread's: another thread may run eager code meanwhile
        note_module_attribute_read(self, name, value)
    return value


def _watch_attribute_reads(tracing: bool) -> None:
    """Installed only while some trace runs, so attribute reads cost nothing otherwise."""
    if tracing:
        Module.__getattribute__ = _watching_getattribute  # type: ignore[method-assign]
    elif "__getattribute__" in Module.__dict__:
        del Module.__getattribute__


watch_tracing(_watch_attribute_reads)


def _is_torch_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _host_array(value: Any, name: str) -> np.ndarray:
    """A NumPy view of state-dict entry `name`. PyTorch tensors are detached and copied to the
    host first (np.asarray refuses one on a GPU or one that requires grad, a Parameter), those
    of dtypes NumPy lacks (bfloat16, float8) widened to float32 as copy_ into one would."""
    if _is_torch_tensor(value):
        value = value.detach().cpu()
        if value.is_floating_point() and str(value.dtype) not in _NUMPY_FLOATS:
            value = value.float()
        value = value.numpy()
    try:
        return np.asarray(value)
    except ValueError as error:  # a ragged list
        raise GraphcError(f"{name!r} is not an array of one shape ({error})") from None


def _holds_parameter(module: Module, array: np.ndarray) -> bool:
    """Whether `array` is a parameter of a module in `module`'s tree."""
    return any(p is array for m in module.modules() for p in m._parameters.values())


_STATE_TABLES = ("_parameters", "_buffers")
_ABSENT = object()  # an attribute not set before


def _prefixed_modules(module: Module, remove_duplicate: bool = True, seen: set | None = None,
                      prefix: str = "") -> Iterator[tuple[str, Module]]:
    """(dotted path with a trailing dot, "" for the root; module) in pre-order, PyTorch's
    traversal; with `remove_duplicate`, a module reached by several paths only under the
    first. Children registered as None are skipped."""
    if seen is None:
        seen = set()
    if remove_duplicate:
        if module in seen:
            return
        seen.add(module)
    yield prefix, module
    for name, child in module._modules.items():
        if child is not None:
            yield from _prefixed_modules(child, remove_duplicate, seen, f"{prefix}{name}.")


def named_state_refs(module: Module, tables: tuple[str, ...], remove_duplicate: bool = False,
                     persistent_only: bool = False) -> Iterator[tuple[str, StateRef]]:
    """(dotted name, StateRef) for every entry of `tables` ("_parameters", "_buffers") in the
    tree, module by module as PyTorch orders them; entries registered as None are skipped. With
    `remove_duplicate`, a module or array reached under several names (shared, tied) only under
    the first; with `persistent_only`, buffers registered with persistent=False are left out
    (as state_dict does)."""
    seen: set[int] = set()
    for prefix, m in _prefixed_modules(module, remove_duplicate):
        if "_parameters" in tables:
            m._refuse_hidden_modules()
        for table in tables:
            for attr, array in m.__dict__[table].items():
                if array is None or (persistent_only and table == "_buffers"
                                     and attr in m.__dict__["_non_persistent_buffers"]):
                    continue
                if remove_duplicate:
                    if id(array) in seen:
                        continue
                    seen.add(id(array))
                yield prefix + attr, StateRef(m, table, attr)


def _selected(named: Iterator[tuple[str, Any]], prefix: str, recurse: bool) -> Iterator[tuple[str, Any]]:
    """`named` with `prefix` before each name, only the module's own (undotted) unless `recurse`."""
    return ((f"{prefix}.{name}" if prefix else name, value) for name, value in named
            if recurse or "." not in name)


def named_arrays(module: Module, table: str, remove_duplicate: bool = True
                 ) -> Iterator[tuple[str, np.ndarray]]:
    """The tree's own arrays of `table` by dotted name, also while tracing: for graphc's own
    bookkeeping (optimizers, compiled steps, checkpoints, export), which needs the arrays where
    a user's traced code gets Tensors. A tied array comes once, under its first name, unless
    `remove_duplicate` is False. A holder of newer values copies them back first."""
    release_state_holders(module)
    refs = named_state_refs(module, (table,), remove_duplicate)
    return ((name, ref.read()) for name, ref in refs)


def state_arrays(module: Module) -> dict[str, np.ndarray]:
    """state_dict()'s arrays in its order, a tied one under each of its names, also while
    tracing (see named_arrays)."""
    release_state_holders(module)
    refs = named_state_refs(module, _STATE_TABLES, persistent_only=True)
    return {name: ref.read() for name, ref in refs}


@contextmanager
def bound(module: Module, tensors: dict[str, Tensor]) -> Iterator[None]:
    """Within the block, the module tree's parameters/buffers named in `tensors` read as those
    Tensors of the trace in progress (names as in state_dict). Traces nested in it (an inner
    gc.jit or gc.grad) read them as implicit inputs, which inlining maps back to these."""
    trace = current_trace()
    # A tied array reached under a name `tensors` leaves out reads as the Tensor given for it
    # under another: both uses of the one parameter are uses of one input.
    given = {id(ref.read()): tensors[name]
             for name, ref in named_state_refs(module, _STATE_TABLES) if name in tensors}
    # so does the array read through a module outside the tree (another model holding it)
    outer_arrays = getattr(trace, "bound_arrays", {})
    trace.bound_arrays = {**outer_arrays, **given}
    saved = []
    for prefix, m in _prefixed_modules(module):
        own = {name[len(prefix):]: t for name, t in tensors.items()
               if name.startswith(prefix) and "." not in name[len(prefix):]}
        for table in _STATE_TABLES:
            for attr, array in m.__dict__[table].items():
                if attr not in own and array is not None and id(array) in given:
                    own[attr] = given[id(array)]
        saved.append((m, m.__dict__.get("_bound")))
        object.__setattr__(m, "_bound", (trace, own))
    try:
        yield
    finally:
        trace.bound_arrays = outer_arrays
        for m, previous in saved:
            object.__setattr__(m, "_bound", previous)


def traced_state(ref: StateRef, name: str | None = None) -> Tensor:
    """The Tensor standing for a module's parameter or buffer in the trace in progress: the
    value the trace updated a buffer to, else the one `bound` gave it in this trace, else the
    trace's implicit input for it (see Trace.read_state for `name`)."""
    trace = current_trace()
    # a buffer the step updated already (a batch norm called twice): its new value, as PyTorch
    # reads the running statistics its first call wrote
    updated = (getattr(trace, "buffer_updates", None) or {}).get((id(ref.module), ref.attr))
    if ref.table == "_buffers" and updated is not None:
        return updated
    bound = ref.module.__dict__.get("_bound")
    if bound is not None and bound[0] is trace and ref.attr in bound[1]:
        return bound[1][ref.attr]
    shared = getattr(trace, "bound_arrays", {}).get(id(ref.read()))
    if shared is not None:  # a bound array held by a module outside the bound tree too
        return shared
    return trace.read_state(ref, name)


def buffer_owner(module: Module) -> dict[tuple[int, str], str]:
    """Map (id(submodule), buffer name) -> dotted state-dict name, to apply recorded updates."""
    return {(id(m), name): prefix + name
            for prefix, m in _prefixed_modules(module) for name in m._buffers}


def functional_call(module: Module, state: dict[str, Any], *args: Any,
                    return_buffers: bool = False, kwargs: dict[str, Any] | None = None) -> Any:
    """Run `module` inside a trace with its parameters/buffers read from `state` (Tensors or
    arrays, by state-dict name; names left out become implicit inputs of the trace, read from
    the module at each call). The forward's arguments follow `state` (`functional_call(m, p, x,
    y)`), or come as torch.func.functional_call takes them: one tuple of them, then optionally a
    dict of keyword arguments (`functional_call(m, p, (x,), {"mask": m})`; also `kwargs=`).

    With `return_buffers`, returns (output, {buffer name: new value Tensor}) for the buffers the
    forward updated (e.g. batch-norm running statistics in training mode).
    """
    if args and isinstance(args[0], tuple) and (
            len(args) == 1 or (len(args) == 2 and isinstance(args[1], dict))):
        args, kwargs = args[0], {**(args[1] if len(args) == 2 else {}), **(kwargs or {})}
    _refuse_split_ties(module, state)
    return call_bound(module, state, *args, return_buffers=return_buffers, kwargs=kwargs)


def call_bound(module: Module, state: dict[str, Any], *args: Any,
               return_buffers: bool = False, kwargs: dict[str, Any] | None = None) -> Any:
    """functional_call, where each of a tied parameter's names may be given a Tensor of its
    own (graphc's compiled functions give every state-dict name an input)."""
    from ..tensor import as_tensor

    tensors = {name: as_tensor(value) for name, value in state.items()}
    with bound(module, tensors), recording_buffer_updates(module) as updates:
        out = module(*args, **(kwargs or {}))
    return (out, updates) if return_buffers else out


def _refuse_split_ties(module: Module, state: dict[str, Any]) -> None:
    """A tied parameter given different arrays under two of its names has no one value to
    read (PyTorch's functional_call refuses this too); the same array under both is fine. (Traced
    Tensors are left alone: a traced function's argument, such as model.state_dict(), makes
    each name an input of its own, and each use reads its own.)"""
    given: dict[int, list[str]] = {}
    for name, ref in named_state_refs(module, _STATE_TABLES):
        if name in state and not isinstance(state[name], Tensor):
            given.setdefault(id(ref.read()), []).append(name)
    for names in given.values():
        if len({id(state[name]) for name in names}) > 1:
            raise GraphcError(f"functional_call: {names} are one tied parameter but were given "
                              f"different values; give it under one name (or the same value under "
                              f"each) (at {user_location()})")


@contextmanager
def recording_buffer_updates(module: Module) -> Iterator[dict[str, Tensor]]:
    """Within the block, the buffers `module`'s tree updates (update_buffer) read as their new
    values, as PyTorch's modules read what an earlier call wrote; the dict yielded holds the
    last value of each, by state-dict name, once the block ends. A module outside the tree
    updating a buffer is refused (its update would be lost)."""
    trace = current_trace()
    previous = trace.buffer_updates, trace.buffer_owners
    names = buffer_owner(module)
    trace.buffer_updates, trace.buffer_owners = {}, names
    updates: dict[str, Tensor] = {}
    try:
        yield updates
        updates.update({names[key]: value for key, value in trace.buffer_updates.items()})
    finally:
        trace.buffer_updates, trace.buffer_owners = previous
