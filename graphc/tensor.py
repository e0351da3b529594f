"""`Tensor`: the proxy users' code sees while graphc traces it.

Every operator on a Tensor appends a node to the graph being traced (through the IR builder)
and returns a new Tensor; nothing is computed. Shapes are static, so errors surface at trace
time and point at the user's line.
"""
from __future__ import annotations

import enum
import functools
import inspect
import logging
import math
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from graphc.ir import Builder, Value
from graphc.ir.errors import (DTypeError, GraphcError, IndexOutOfRangeError, ShapeError,
                              TracedValueError, is_internal_file, user_location)
from graphc.ir.graph import Node, safe_module_path
from graphc.ir.types import SHORT_NAMES, TensorType, canonical_dtype, is_float


class _TraceState(threading.local):
    def __init__(self) -> None:
        self.stack: list[Trace] = []


_STATE = _TraceState()
log = logging.getLogger("graphc")


_MODULE_TREE_EDITS = [0]  # changes of any module's tables or settings so far (nn.module)


def module_tree_edits() -> int:
    """How many times any module's children, parameters or buffers were added, replaced or
    removed (not written in place), or its settings assigned (`bn.momentum = 0.5`): compiled
    graphs check the module trees they were traced on again only after it moved."""
    return _MODULE_TREE_EDITS[0]


def note_module_tree_edit() -> None:
    _MODULE_TREE_EDITS[0] += 1


# a module's attributes that are neither its tables nor its mode, which ModuleReads tracks
_NOT_SETTINGS = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers", "_bound",
                           "_state_holder", "training", "_written_in_trace"})


# a module's hooks by registration id: the same hook registered again is the same setting
_HOOK_TABLES = frozenset({"_forward_hooks", "_forward_pre_hooks"})


def is_setting(value: Any) -> bool:
    """Whether `value`, a module's plain attribute, is a setting a trace bakes in: a number, a
    string, a bool or None, an enum member, a NumPy dtype, a slice, a callable (an activation
    function, a callable object, a jitted function: the object, not what it holds), or a tuple,
    list, set or dict of them (a kernel size, a list of scales, the ids to skip)."""
    if isinstance(value, (tuple, list, set, frozenset, dict)) and len(value) > FOLLOWED_ITEMS:
        return True  # followed by identity and length (see _snapshot), not item by item
    if isinstance(value, (tuple, list, set, frozenset)):
        return all(map(is_setting, value))
    if isinstance(value, dict):
        return all(map(is_setting, value.keys())) and all(map(is_setting, value.values()))
    if isinstance(value, slice):
        return all(map(is_setting, (value.start, value.stop, value.step)))
    return value is None or isinstance(value, (bool, int, float, str, np.number, np.bool_,
                                               enum.Enum, np.dtype)) or (
        callable(value) and not isinstance(value, np.ndarray))


# A list, tuple, set or dict setting of more items (a tokenizer's vocabulary) is followed when
# assigned, not item by item: comparing it at every call would cost more than the call.
FOLLOWED_ITEMS = 1000


def _snapshot(value: Any) -> Any:
    """A setting as it is now, its types included (2 and 2.0 trace differently, though equal):
    lists and dicts copied, so that an in-place edit does not change the snapshot; one of more
    than FOLLOWED_ITEMS items by its identity and length."""
    if isinstance(value, (list, tuple, set, frozenset, dict)) and len(value) > FOLLOWED_ITEMS:
        return f"large {type(value).__name__}", (id(value), len(value))
    if isinstance(value, (list, tuple)):
        return type(value).__name__, tuple(map(_snapshot, value))
    if isinstance(value, (set, frozenset)):
        return type(value).__name__, frozenset(map(_snapshot, value))
    if isinstance(value, dict):
        return "dict", tuple((_snapshot(k), _snapshot(v)) for k, v in value.items())
    if isinstance(value, slice):  # unhashable before Python 3.12
        return "slice", tuple(map(_snapshot, (value.start, value.stop, value.step)))
    return type(value).__name__, value


def _shown(snapshot: Any) -> Any:
    """The value a `_snapshot` was taken of, for messages."""
    kind, value = snapshot
    if kind.startswith("large "):
        return f"<a {kind[6:]} of {value[1]} items>"
    if kind in ("list", "tuple"):
        return (list if kind == "list" else tuple)(map(_shown, value))
    if kind in ("set", "frozenset"):
        return (set if kind == "set" else frozenset)(map(_shown, value))
    if kind == "dict":
        return {_shown(k): _shown(v) for k, v in value}
    if kind == "slice":
        return slice(*map(_shown, value))
    return value


def edited_in_place(snapshot: Any) -> bool:
    """Whether a setting (its `_snapshot`) can change without an assignment to the module: it
    holds a list or a dict."""
    kind, value = snapshot
    if kind in ("list", "dict", "set"):
        return True
    return kind in ("tuple", "frozenset") and any(map(edited_in_place, value))


def module_structure(module: Any) -> tuple:
    """What a trace of `module` baked in besides its arrays and mode: which child modules it
    holds (None for a name registered absent), its settings (momentum, eps, p, ...) and the
    names of its parameters and buffers, with whether each is registered absent (a trace read
    None there, or `getattr(self, "shift", None)` found no such name)."""
    written = module.__dict__.get("_written_in_trace", ())  # the module's own state, not settings
    settings = tuple((name, _snapshot(tuple(value.values()) if name in _HOOK_TABLES else value))
                     for name, value in module.__dict__.items()
                     if name not in _NOT_SETTINGS and name not in written and is_setting(value))
    registered = tuple((name, array is None) for table in (module._parameters, module._buffers)
                       for name, array in table.items())
    return tuple(map(id, module._modules.values())), settings, registered


def _changed_settings(before: tuple, after: tuple) -> list[tuple[tuple[str, Any], tuple[str, Any]]]:
    """((name, old value), (name, new value)) of each setting that differs (absent: _NO_SETTING)."""
    old, new = dict(before), dict(after)
    return [((k, _shown(old[k]) if k in old else _NO_SETTING),
             (k, _shown(new[k]) if k in new else _NO_SETTING))
            for k in {**old, **new} if old.get(k) != new.get(k)]


class _NoSetting:
    """A setting's value where the module has none (it became a child module, or was deleted)."""

    def __repr__(self) -> str:
        return "(no setting)"


_NO_SETTING = _NoSetting()


class StateRef(NamedTuple):
    """A module's parameter or buffer, by owner and attribute: what a compiled graph reads
    afresh at each call (so in-place updates, load_state_dict and reassignment are all seen)."""

    module: Any  # graphc.nn.Module
    table: str  # "_parameters" or "_buffers"
    attr: str

    def read(self) -> np.ndarray | None:
        """The array now held under that name (None if the module no longer has it)."""
        return self.module.__dict__[self.table].get(self.attr)


@dataclass(frozen=True)
class ModuleReads:
    """What a traced graph took from modules besides its arguments: the parameters and buffers
    it reads as implicit inputs (in input order, with the names and types they had when traced)
    and the modules it called, whose train/eval modes it was traced in."""

    refs: tuple[StateRef, ...] = ()
    names: tuple[str, ...] = ()
    types: tuple[TensorType, ...] = ()
    modules: tuple[Any, ...] = ()
    module_names: tuple[str, ...] = ()
    modes: tuple[bool, ...] = ()
    structures: tuple[tuple, ...] = ()  # per module, its module_structure when traced
    # NumPy arrays held as modules' plain attributes (not buffers) that the trace read as
    # constants: (module, its name, attribute, the array, a copy of its values then)
    attribute_arrays: tuple[tuple[Any, str, str, np.ndarray, np.ndarray | None], ...] = ()
    class_settings: tuple[tuple[type, str, Any], ...] = ()  # Trace.class_settings

    def __post_init__(self) -> None:
        # the tree edit count at which the modules last held the children they were traced with
        object.__setattr__(self, "_verified", [module_tree_edits()])
        # Precomputed for the per-call reads and checks: the arrays' owners, the (table, name)
        # each is read from (a module's tables are never replaced), and (shape, dtype) pairs.
        object.__setattr__(self, "_owners", tuple({id(r.module): r.module for r in self.refs}.values()))
        object.__setattr__(self, "_slots", tuple((r.module.__dict__[r.table], r.attr) for r in self.refs))
        object.__setattr__(self, "_expected", tuple((t.shape, t.np_dtype) for t in self.types))
        # modules with a list or dict setting, which changes in place without an assignment:
        # checked at every call
        object.__setattr__(self, "_volatile", tuple(
            i for i, (_, settings, _) in enumerate(self.structures)
            if any(edited_in_place(value) for _, value in settings)))

    def excluding(self, modules: Iterable[Any]) -> ModuleReads:
        """Without the modes of `modules` (a caller that sets their modes itself)."""
        ids = {id(m) for m in modules}
        kept = [i for i, m in enumerate(self.modules) if id(m) not in ids]
        return replace(self, modules=tuple(self.modules[i] for i in kept),
                       module_names=tuple(self.module_names[i] for i in kept),
                       modes=tuple(self.modes[i] for i in kept),
                       structures=tuple(self.structures[i] for i in kept))

    def arrays(self) -> list[np.ndarray | None]:
        """The implicit inputs' arrays now; a training step holding newer values on a device
        copies them back first."""
        if self._owners:
            nn_module = sys.modules["graphc.nn.module"]  # loaded: it made the owners
            if nn_module.state_claimed():
                for module in self._owners:
                    nn_module.sync_state_holders(module)
        return [table.get(name) for table, name in self._slots]

    def matches(self, arrays: list[np.ndarray | None]) -> bool:
        """Whether the graph still computes what the modules would: same modes, same types,
        the same child modules (a layer replaced runs other code)."""
        for module, mode in zip(self.modules, self.modes):
            if module.training != mode:
                return False
        for i in self._volatile:
            if module_structure(self.modules[i]) != self.structures[i]:
                return False
        for module, _, attr, array, values in self.attribute_arrays:
            if module.__dict__.get(attr) is not array or not _same_values(array, values):
                return False
        if self.class_settings and not class_settings_match(self.class_settings):
            return False
        if self._verified[0] != module_tree_edits():
            if any(module_structure(m) != traced for m, traced in zip(self.modules, self.structures)):
                return False
            self._verified[0] = module_tree_edits()
        for array, (shape, dtype) in zip(arrays, self._expected):
            if array is None or array.shape != shape or (array.dtype is not dtype
                                                         and array.dtype != dtype):
                return False
        return True

    def changes(self, arrays: list[np.ndarray | None]) -> list[str]:
        """What differs now from when the graph was traced, in words, for the retrace log."""
        mode = {True: "train", False: "eval"}
        found = [f"mode of {name}: {mode[old]} -> {mode[m.training]}"
                 for m, name, old in zip(self.modules, self.module_names, self.modes)
                 if m.training != old]
        if len(found) > 3:  # model.train() flips every module: name a few
            found[3:] = [f"and of {len(found) - 3} more modules"]
        for m, name, (children, settings, registered) in zip(self.modules, self.module_names,
                                                             self.structures):
            now_children, now_settings, now_registered = module_structure(m)
            if now_children != children:
                found.append(f"child modules of {name} replaced")
            found += [f"{name}.{key}: {value!r} -> {now!r}" for (key, value), (_, now)
                      in _changed_settings(settings, now_settings)]
            was, now = dict(registered), dict(now_registered)
            found += [f"{name}.{key}: None -> an array" for key, absent in was.items()
                      if absent and now.get(key) is False]
            found += [f"{name}.{key}: registered" for key in now.keys() - was.keys()]
            found += [f"{name}.{key}: no longer registered" for key in was.keys() - now.keys()]
        for module, name, attr, array, values in self.attribute_arrays:
            if module.__dict__.get(attr) is not array:
                found.append(f"{name}.{attr}: another array assigned")
            elif not _same_values(array, values):
                found.append(f"{name}.{attr}: its values changed")
        found += [f"{cls.__name__}.{name}: {_shown(value)!r} -> {getattr(cls, name, _NO_SETTING)!r}"
                  for cls, name, value in self.class_settings
                  if not class_settings_match(((cls, name, value),))]
        for name, array, old in zip(self.names, arrays, self.types):
            if array is None:
                found.append(f"{name}: no longer a parameter or buffer")
            elif array.shape != old.shape or array.dtype != old.np_dtype:
                found.append(f"{name}: {old} -> {TensorType.of(array)}")
        return found


# A NumPy array attribute of more bytes read as a constant is followed when assigned, not
# compared at every call (a buffer, register_buffer, is read at each call at no cost).
FOLLOWED_ARRAY_BYTES = 1 << 22


def _same_values(array: np.ndarray, values: np.ndarray | None) -> bool:
    """Whether `array` still holds `values` (None: too large to compare, see
    FOLLOWED_ARRAY_BYTES), compared byte by byte (a NaN equals itself)."""
    if values is None:
        return True
    if array.shape != values.shape or array.dtype != values.dtype:
        return False
    return array.tobytes() == values.tobytes() if not array.flags.c_contiguous else \
        np.array_equal(array.reshape(-1).view(np.uint8), values.reshape(-1).view(np.uint8))


def _followed_values(module: Any, name: str, array: np.ndarray) -> np.ndarray | None:
    """The copy of a module's array attribute a trace compares at each call, or None (and a
    warning) for one too large to compare."""
    if array.nbytes <= FOLLOWED_ARRAY_BYTES:
        return array.copy()
    log.warning("graphc: %s.%s, a NumPy array of %d bytes held as a plain attribute, is read as "
                "a constant: compiled functions follow its reassignment but not writes into it; "
                "register it as a buffer (self.register_buffer(%r, array)) to have it read at "
                "each call", type(module).__name__, name, array.nbytes, name)
    return None


class Trace:
    """One tracing session: the builder, the implicit RNG key input (created on first use) and
    the implicit inputs lifted from modules' parameters and buffers.

    A parameter or buffer a traced function reads, unless `bound` to a Tensor of this trace,
    becomes a graph input of its own (role "param" or "state", named by the module's path), so
    the compiled graph reads the module's current array at each call instead of baking in the
    value it had when traced. Implicit inputs come after all others but the RNG key.
    """

    def __init__(self, name: str) -> None:
        self.builder = Builder(name)
        self.rng_key: Value | None = None
        self.next_stream = 0
        # Set by compiled training steps: buffer updates recorded by modules (running stats),
        # by (id(module), buffer name), for the modules of the tree in buffer_owners
        self.buffer_updates: dict | None = None
        self.buffer_owners: dict[tuple[int, str], str] | None = None
        self.implicit: dict[tuple[int, str], tuple[StateRef, Value, str]] = {}
        self.modules: dict[int, Any] = {}  # modules called: the graph depends on their modes
        self._calling: list[Any] = []  # modules whose forward is running, outermost first
        self._module_names: dict[int, str] = {}
        # gc.scan bodies being traced, innermost last: the index of each one's first node and
        # its carry and slice values (graphc/control.py)
        self.scan_bodies: list[tuple[int, set[Value]]] = []
        self.scan_body_values: set[Value] = set()  # values moved into a traced scan's body
        self._produced: set[Node] = set()  # graph.nodes[:self._seen], for `defines`
        self._seen = 0
        # NumPy arrays that modules hold as plain attributes, read as constants: id -> (module,
        # attribute, array, its values then); and the index of such arrays, by id
        self.attribute_arrays: dict[tuple[int, str],
                                    tuple[Any, str, np.ndarray, np.ndarray | None]] = {}
        self._attribute_index: tuple[int, dict[int, list[tuple[Any, str]]]] = (-1, {})
        # the settings of the modules called, as they were before their first call: what the
        # trace itself changes in them (a counter, a list it appends to) is their own state
        self._settings_before: dict[int, tuple[Any, tuple]] = {}
        # modules whose plain attributes the trace read without calling them (`temp.t`,
        # `model.training`): the graph depends on their settings and modes too
        self.read_modules: dict[int, Any] = {}
        # settings read from modules' classes (`scale = 2.0` in a class body): (class, name,
        # snapshot), checked at every call since assigning `Model.scale` edits no module
        self.class_settings: dict[tuple[int, str], tuple[type, str, Any]] = {}

    def defines(self, value: Value) -> bool:
        """Whether `value` is this trace's (not an enclosing trace's, read as a capture)."""
        nodes = self.builder.graph.nodes
        seen = self._seen
        if len(nodes) < seen or (seen and nodes[seen - 1] not in self._produced):
            self._produced, self._seen = set(), 0  # a scan carved nodes out: count again
        self._produced.update(nodes[self._seen:])
        self._seen = len(nodes)
        if value.producer is not None:
            return value.producer in self._produced
        return value in self.builder.graph.input_values or any(value in inputs for _, inputs in self.scan_bodies)

    def made_before_the_body(self, value: Value) -> bool:
        """Whether `value` comes from outside the gc.scan body being traced (False outside one)."""
        if not self.scan_bodies:
            return False
        first_node, body_inputs = self.scan_bodies[-1]
        return value not in body_inputs and not any(
            value in node.outputs for node in self.builder.graph.nodes[first_node:])

    def random_key(self) -> tuple[Value, int]:
        """The (seed, counter) key input and a fresh stream number for one random op."""
        if self.rng_key is None:
            self.rng_key = self.builder.add_input(TensorType((2,), "int64"), "rng", role="rng")
        stream = self.next_stream
        self.next_stream += 1
        return self.rng_key, stream

    @contextmanager
    def calling(self, module: Any) -> Iterator[None]:
        """Within the block, `module`'s forward runs (names its submodules' inputs)."""
        if id(module) not in self.modules:
            self.modules[id(module)] = module
            self.module_name(module)  # while its callers are known
            if not self._calling:  # an outermost call: its whole tree, before it runs
                self.note_settings(module)
        outer_path = self.builder.module
        self.builder.module = self._module_path(module)  # the nodes it makes are stamped with it
        self._calling.append(module)
        try:
            yield
        finally:
            self._calling.pop()
            self.builder.module = outer_path

    def _module_path(self, module: Any) -> str | None:
        """`module`'s path from the outermost module being called ("encoder.layers.1"), None
        for that module itself: the provenance its nodes carry."""
        if not self._calling:
            return None
        parent, parent_path = self._calling[-1], self.builder.module
        name = next((n for n, m in parent._modules.items() if m is module), None)
        if name is None:  # not the caller's own child: look it up from the outermost module
            outermost = self._calling[0]
            found = next((p for p, m in outermost.named_modules() if m is module), None)
            name, parent_path = (found, None) if found else (type(module).__name__, parent_path)
            if not name:  # the outermost module, called again inside itself
                return None
        return safe_module_path(f"{parent_path}.{name}" if parent_path else name)

    def read_state(self, ref: StateRef, name: str | None = None) -> Tensor:
        """The implicit input standing for a module's parameter or buffer (one per ref), named
        `name` (an inner trace's name for it) or by the module's path."""
        key = (id(ref.module), ref.attr)
        found = self.implicit.get(key)
        if found is None:
            array = ref.read()
            role = "param" if ref.table == "_parameters" else "state"
            name = self._unique_input_name(name or f"{self.module_name(ref.module)}.{ref.attr}")
            value = self.builder.add_input(TensorType.of(array), name, role)
            inputs = self.builder.graph.inputs
            if self.rng_key is not None:  # the RNG key stays last
                lifted = inputs.pop()
                inputs.insert(next(i for i, inp in enumerate(inputs) if inp.value is self.rng_key),
                              lifted)
            found = self.implicit[key] = (ref, value, name)
        return Tensor(found[1])

    def module_name(self, module: Any) -> str:
        """The module's path from the outermost module being called that holds it
        ("Sequential.0"); a module outside them all is named by its type."""
        name = self._module_names.get(id(module))
        if name is None:
            for outer in self._calling:
                path = next((p for p, m in outer.named_modules() if m is module), None)
                if path is not None and outer is not module:
                    name = f"{self.module_name(outer)}.{path}"
                    break
            else:
                name = self._fresh_root_name(type(module).__name__)
            self._module_names[id(module)] = name
        return name

    def _unique_input_name(self, name: str) -> str:
        taken = {i.name for i in self.builder.graph.inputs}
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}_{n}"
        return unique

    def _fresh_root_name(self, base: str) -> str:
        taken = set(self._module_names.values()) | {i.name for i in self.builder.graph.inputs}
        name, n = base, 1
        while name in taken or any(t.startswith(name + ".") for t in taken):
            n += 1
            name = f"{base}_{n}"
        return name

    def watched_modules(self) -> list[Any]:
        """The modules the graph may depend on: those called, those whose arrays it reads, and
        every module below them (a ModuleList is never called, a forward may read a child's
        setting without calling it)."""
        roots = [*self.modules.values(), *self.read_modules.values(),
                 *(ref.module for ref, _, _ in self.implicit.values())]
        found: dict[int, Any] = {}
        for root in roots:
            if id(root) not in found:
                found.update((id(m), m) for m in root.modules())
        return list(found.values())

    def note_settings(self, module: Any) -> None:
        """Keep the settings of `module`'s tree as they are now, before the trace runs it."""
        for m in module.modules():
            self._settings_before.setdefault(id(m), (m, module_structure(m)[1]))

    def note_attribute_read(self, module: Any, name: str, value: Any) -> None:
        """`module.name` (a plain attribute) was read while tracing: the graph follows the
        module's settings and mode, and a NumPy array read there, even where only a value
        computed from it reaches the graph (`1 - self.mask`, `float(self.scale)`)."""
        if id(module) not in self.read_modules and id(module) not in self.modules:
            self.read_modules[id(module)] = module
            self.note_settings(module)
        if type(value) is np.ndarray and (id(module), name) not in self.attribute_arrays:
            self.attribute_arrays[(id(module), name)] = (module, name, value,
                                                         _followed_values(module, name, value))

    def note_array(self, array: np.ndarray) -> None:
        """`array` (or the array it is a view of) becomes a constant of the graph: where modules
        hold it as a plain attribute (not a buffer), the graph is traced again once one of
        those attributes changes."""
        key = len(self.modules) + len(self.implicit)
        if self._attribute_index[0] != key:
            index: dict[int, list[tuple[Any, str]]] = {}
            for module in self.watched_modules():
                for name, value in module.__dict__.items():
                    if isinstance(value, np.ndarray):
                        index.setdefault(id(value), []).append((module, name))
            self._attribute_index = (key, index)
        while array is not None:  # a view (x.T, x[:2]) reads its base
            for module, name in self._attribute_index[1].get(id(array), ()):
                if (id(module), name) not in self.attribute_arrays:
                    self.attribute_arrays[(id(module), name)] = (
                        module, name, array, _followed_values(module, name, array))
            array = array.base if isinstance(array.base, np.ndarray) else None

    def module_reads(self) -> ModuleReads:
        implicit = list(self.implicit.values())
        for module, before in self._settings_before.values():
            was, now = dict(before), dict(module_structure(module)[1])
            changed = [name for name, value in now.items() if was.get(name) != value]
            if changed:  # written by its own forward: not followed (see Module.__setattr__)
                module.__dict__.setdefault("_written_in_trace", set()).update(changed)
        # an array the trace itself wrote or replaced (a cache its forward keeps) is the
        # module's own state, as a setting it changes is
        for key, (module, name, array, values) in list(self.attribute_arrays.items()):
            if module.__dict__.get(name) is not array or not _same_values(array, values):
                del self.attribute_arrays[key]
        modules = self.watched_modules()
        names: dict[int, str] = {}  # a module below a called one by its path from there
        for module in self.modules.values():
            root = self.module_name(module)
            names.update((id(m), f"{root}.{path}" if path else root)
                         for path, m in module.named_modules() if id(m) not in names)
        return ModuleReads(
            refs=tuple(ref for ref, _, _ in implicit), names=tuple(name for _, _, name in implicit),
            types=tuple(value.type for _, value, _ in implicit),
            modules=tuple(modules), module_names=tuple(
                f"{names.get(id(m)) or self.module_name(m)} ({type(m).__name__})" for m in modules),
            modes=tuple(m.training for m in modules), structures=tuple(map(module_structure, modules)),
            attribute_arrays=tuple((m, names.get(id(m)) or self.module_name(m), attr, array, values)
                                   for m, attr, array, values in self.attribute_arrays.values()),
            class_settings=tuple(self.class_settings.values()))


def matching_variant(last: Any, variants: dict[Any, Any], signature: tuple) -> tuple[Any, list]:
    """Of the compiled variants (each with `.signature` and `.reads`), the one for these
    arguments whose module reads match the modules as they are now, with its implicit inputs'
    arrays; (None, []) when none does. The variant used last is tried first: the usual case.
    Another one found moves to the end of `variants`, which keeps them in the order of their
    use (see keep_recent_variants)."""
    if last is not None and last.signature == signature:
        implicit = last.reads.arrays()
        if last.reads.matches(implicit):
            return last, implicit
    for key, variant in variants.items():
        if variant is not last and variant.signature == signature:
            implicit = variant.reads.arrays()
            if variant.reads.matches(implicit):
                variants[key] = variants.pop(key)
                return variant, implicit
    return None, []


def variant_key(signature: tuple, reads: ModuleReads) -> tuple:
    """A compiled variant's key: its arguments' signature and what it read of modules (modes,
    types, settings), so that a flag switched back and forth keeps a variant for each value
    (settings holding an unhashable object are left out: those variants replace each other)."""
    try:
        hash(reads.structures)
        return signature, reads.modes, reads.types, reads.structures
    except TypeError:
        return signature, reads.modes, reads.types


KEPT_VARIANTS = 128  # compiled batch signatures (and modes, settings) a function keeps


def keep_recent_variants(variants: dict[Any, Any], keep: Iterable[Any]) -> None:
    """Forget the least recently used compiled variants past KEPT_VARIANTS, never those in
    `keep` (the one in use, the one an export writes): a model called at ever new batch sizes
    holds a bounded number of memory plans, and compiles a forgotten one again from its kernels
    (no kernel compiles) when that size comes back."""
    kept = {id(v) for v in keep}
    while len(variants) > KEPT_VARIANTS:
        oldest = next((k for k, v in variants.items() if id(v) not in kept), None)
        if oldest is None:
            return
        del variants[oldest]


# Called with True when a first trace starts (in any thread) and False when the last one ends:
# nn.module watches module attribute reads only then, so that code outside traces pays nothing.
_TRACING_WATCHERS: list[Callable[[bool], None]] = []
_ACTIVE_TRACES = [0]
_ACTIVE_TRACES_LOCK = threading.Lock()


def watch_tracing(watcher: Callable[[bool], None]) -> None:
    _TRACING_WATCHERS.append(watcher)


def _count_trace(change: int) -> None:
    with _ACTIVE_TRACES_LOCK:
        before = _ACTIVE_TRACES[0]
        _ACTIVE_TRACES[0] += change
        if (before == 0) != (_ACTIVE_TRACES[0] == 0):
            for watcher in _TRACING_WATCHERS:
                watcher(_ACTIVE_TRACES[0] > 0)


@contextmanager
def tracing(name: str) -> Iterator[Trace]:
    trace = Trace(name)
    _STATE.stack.append(trace)
    _count_trace(+1)
    try:
        yield trace
    finally:
        _STATE.stack.pop()
        _count_trace(-1)


def current_trace() -> Trace:
    if not _STATE.stack:
        raise GraphcError("this operation needs a trace: call it inside a function given to "
                          "gc.jit / gc.trace / gc.grad (or a module's forward); to build an "
                          "array outside one (a buffer such as a causal mask, a parameter's "
                          "initial value), use NumPy: np.tril(np.ones((n, n)))")
    return _STATE.stack[-1]


def enclosing_traces() -> list[Trace]:
    """The traces the current one runs inside (a gc.grad within a training step's loss), innermost
    last."""
    return _STATE.stack[:-1]


def is_tracing() -> bool:
    return bool(_STATE.stack)


# a module's attributes that hold its tables and bookkeeping, never what a forward reads as a
# setting (its mode, `training`, is read as one)
_BOOKKEEPING = _NOT_SETTINGS - {"training"}


def note_module_attribute_read(module: Any, name: str, value: Any) -> None:
    """Called by Module.__getattribute__ while tracing: a plain attribute of `module` (one in its
    __dict__, not a method) read by the traced code, or a setting its class holds
    (`scale = 2.0` in the class body)."""
    if name in _BOOKKEEPING:
        return
    if name in object.__getattribute__(module, "__dict__"):
        _STATE.stack[-1].note_attribute_read(module, name, value)
    elif not callable(value) and is_setting(value) and _class_attribute(type(module), name):
        _STATE.stack[-1].class_settings.setdefault((id(type(module)), name),
                                                   (type(module), name, _snapshot(value)))


def _class_attribute(cls: type, name: str) -> bool:
    """Whether `name` is a plain class attribute of `cls` (not a property or other descriptor)
    set in a class of the user's, not of graphc's own modules."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return (not klass.__module__.startswith("graphc.")
                    and not hasattr(klass.__dict__[name], "__get__"))
    return False


def class_settings_match(settings: tuple[tuple[type, str, Any], ...]) -> bool:
    """Whether the class-level settings a trace read still hold the values it read."""
    return all(_snapshot(getattr(cls, name, _NO_SETTING)) == value for cls, name, value in settings)


def bind(op: str, *inputs: Tensor, **attrs: Any) -> Tensor:
    for name, value in attrs.items():
        if isinstance(value, Tensor) or (isinstance(value, (tuple, list))
                                         and any(isinstance(v, Tensor) for v in value)):
            tensor = value if isinstance(value, Tensor) else next(
                v for v in value if isinstance(v, Tensor))
            raise _no_value(f"{op}: its {name} given as a Tensor (a setting, which must be a "
                            f"Python value)", "pass a number", tensor)
    return Tensor(current_trace().builder.bind(op, *(t.value for t in inputs), **attrs))


# PyTorch's elementwise math computes an integer or bool tensor in the default float dtype
# (torch.exp of int64 is float32); its NN functions (softmax, gelu) refuse one.
FLOAT_MATH = frozenset({"exp", "log", "log1p", "expm1", "sqrt", "rsqrt", "tanh", "sigmoid",
                        "reciprocal", "sin", "cos", "erf"})


def _scaled(x: Any, factor: Any) -> Any:
    """x * factor, or x itself for the number 1 (PyTorch's alpha and value; a tensor factor,
    a traced learning rate, multiplies too)."""
    return x if _is_number(factor) and factor == 1 else x * factor


def _integer_power(x: Tensor, exponent: int) -> Tensor:
    """x ** exponent for an integer tensor and a constant exponent >= 0, by repeated squaring:
    integer results that wrap on overflow, as PyTorch's."""
    if exponent < 0:
        raise DTypeError(f"pow: integers to negative integer powers are not allowed (as in "
                         f"PyTorch); cast to float first, x.double() ** {exponent} "
                         f"(at {user_location()})")
    result, base = None, x
    while exponent:
        if exponent & 1:
            result = base if result is None else result * base
        exponent >>= 1
        if exponent:
            base = base * base
    return result if result is not None else (x * 0 + 1)


def float_math(op: str, x: Any) -> Tensor:
    """`op` (one of FLOAT_MATH) of `x`, an integer or bool `x` taken as float32 first."""
    x = as_tensor(x)
    return bind(op, x if is_float(x.dtype) else x.astype("float32"))


def as_tensor(x: Any, like: Tensor | None = None) -> Tensor:
    """Tensors pass through; Python numbers take `like`'s dtype; arrays become constants."""
    if isinstance(x, Tensor):
        return x
    b = current_trace().builder
    if isinstance(x, (bool, int, float, np.number)) and like is not None:
        if isinstance(x, float) and not float(x).is_integer() and not is_float(like.dtype):
            raise DTypeError(f"cannot combine {x!r} with a {like.dtype} tensor without a cast "
                             f"(at {user_location()})")
        if like.dtype in ("int32", "int64") and not np.iinfo(like.dtype).min <= x <= np.iinfo(like.dtype).max:
            raise DTypeError(f"the number {x} does not fit the {like.dtype} tensor it is written "
                             f"into or combined with (at {user_location()})")
        return Tensor(b.const(x, like.dtype))
    if isinstance(x, np.ndarray):
        current_trace().note_array(x)
    arr = np.asarray(x)
    # Python floats default to float32, as in PyTorch, alone or in lists (torch.tensor([0.5]));
    # np.float64 (a float subclass) keeps its width
    if arr.dtype == np.float64 and _python_numbers(x):
        arr = arr.astype(np.float32)
    try:
        dtype = canonical_dtype(arr.dtype)
    except TypeError as error:
        raise DTypeError(f"a constant of shape {arr.shape}: {error}; cast it first (a.astype("
                         f"np.float32)) (at {user_location()})") from None
    return Tensor(b.const(arr, dtype))


def _operand_kind(x: Any) -> str:
    """How an error names an operand: a tensor's or array's dtype, else its Python type."""
    dtype = getattr(x, "dtype", None)
    return str(dtype) if dtype is not None else type(x).__name__


def _python_numbers(x: Any) -> bool:
    """Whether `x` is a Python number, or a list or tuple of them (nested), with no NumPy
    scalar or array among them."""
    if isinstance(x, (list, tuple)):
        return all(map(_python_numbers, x))
    return isinstance(x, (bool, int, float)) and not isinstance(x, np.generic)


# -- type promotion ------------------------------------------------------------------------------
# PyTorch's rule, so ported arithmetic has the dtypes it had there: bool < integer < floating;
# an operand of a higher kind sets the result's kind, and within a kind the widest operand wins,
# except that 0-d tensors and then Python numbers count only where they raise the kind (a
# float32 tensor times 2.5, or times a 0-d float64 tensor, stays float32). A Python float
# stands for the default float32, a Python int for int64.
_KINDS = {"bool": 0, "int32": 1, "int64": 1, "float32": 2, "float64": 2}


def promote_types(a: str, b: str) -> str:
    """The dtype holding both `a` and `b` (torch.promote_types over graphc's dtypes)."""
    if _KINDS[a] != _KINDS[b]:
        return a if _KINDS[a] > _KINDS[b] else b
    return a if np.dtype(a).itemsize >= np.dtype(b).itemsize else b


def _is_number(x: Any) -> bool:
    return isinstance(x, (bool, int, float, np.bool_, np.integer, np.floating))


def _number_dtype(x: Any) -> str:
    if isinstance(x, (bool, np.bool_)):
        return "bool"
    return "int64" if isinstance(x, (int, np.integer)) else "float32"


def result_dtype(*operands: Tensor | bool | int | float) -> str:
    """The dtype an elementwise op over `operands` (Tensors and Python numbers) computes in."""
    widest: list[str | None] = [None, None, None]  # tensors with axes, 0-d tensors, numbers
    for x in operands:
        group, dtype = (2, _number_dtype(x)) if _is_number(x) else (int(x.ndim == 0), x.dtype)
        widest[group] = dtype if widest[group] is None else promote_types(widest[group], dtype)

    def combine(higher: str | None, lower: str | None) -> str | None:
        if higher is None or lower is None:
            return higher or lower
        if is_float(higher):
            return higher
        return promote_types(higher, lower) if higher == "bool" or is_float(lower) else higher

    return combine(widest[0], combine(widest[1], widest[2]))


def promoted(*operands: Any, true_division: bool = False) -> list[Tensor]:
    """The operands of an elementwise op as Tensors of their `result_dtype` (arrays become
    constants of their own dtype first); with `true_division`, integers and booleans compute in
    float32, as PyTorch's `/` does."""
    tensors = [x if _is_number(x) else as_tensor(x) for x in operands]
    dtype = result_dtype(*tensors)
    if true_division and not is_float(dtype):
        dtype = "float32"
    b = current_trace().builder
    for x in tensors:
        if isinstance(x, int) and not is_float(dtype) and dtype != "bool":
            limits = np.iinfo(dtype)
            if not limits.min <= x <= limits.max:
                fix = ("cast that tensor to int64 first (.astype('int64'))" if dtype != "int64"
                       else "int64, the widest integer, cannot hold it")
                raise DTypeError(f"the Python integer {x} does not fit the {dtype} operand it is "
                                 f"combined with: {fix} (at {user_location()})")
    return [Tensor(b.const(x, dtype)) if _is_number(x) else x.astype(dtype) for x in tensors]


def dtype_name(dtype: Any) -> str:
    """graphc's name of a dtype given as a name ('float32', 'f32'), a NumPy dtype or type, or a
    torch dtype (torch.float32): the spellings ported code uses."""
    if type(dtype).__module__ == "torch":  # torch.float32 prints as 'torch.float32'
        dtype = str(dtype).removeprefix("torch.")
    try:
        return canonical_dtype(dtype)
    except ValueError:  # NumPy's, for a string it cannot read as a dtype
        raise TypeError(f"not a dtype: {dtype!r:.60}") from None


def _is_device(target: Any) -> bool:
    if type(target).__name__ == "device":  # torch.device
        return True
    return isinstance(target, str) and target.split(":")[0] in ("cpu", "cuda")


def reduction_axes(dim: Any, axis: Any, op: str) -> Any:
    """PyTorch's `dim` or NumPy's `axis`, whichever was given. An empty `dim` reduces every
    axis, as PyTorch's does (so `dim=tuple(range(1, x.ndim))` of a vector is its sum); an empty
    `axis` reduces none, as NumPy's does."""
    if axis is None:
        return None if isinstance(dim, (tuple, list)) and not dim else dim
    if dim is not None:
        raise GraphcError(f"{op}: give dim or axis, not both (at {user_location()})")
    return axis


def _no_axes_if_empty(dim: Any, axis: Any) -> tuple[Any, Any]:
    """(dim, axis) with an empty `dim` as NumPy's axis=(): no axis reduced."""
    if axis is None and isinstance(dim, (tuple, list)) and not dim:
        return None, ()
    return dim, axis


def scalar_reduced_as_vector(reduce: Any) -> Any:
    """PyTorch reduces a 0-d tensor over dim 0 or -1 as one of shape (1,) (NumPy refuses it):
    `reduce`, whose parameters start (x, dim) (x by any name: PyTorch's `input`) and may
    include NumPy's `axis`, gets such an x reshaped to (1,), and its result comes back 0-d."""
    signature = inspect.signature(reduce)
    operand = next(iter(signature.parameters))

    @functools.wraps(reduce)
    def reduced(*args: Any, **keywords: Any) -> Any:
        x = args[0] if args else keywords.get(operand)
        if getattr(x, "ndim", None) != 0:  # (most calls: no binding)
            return reduce(*args, **keywords)
        try:
            bound = signature.bind(*args, **keywords)
        except TypeError:
            return reduce(*args, **keywords)  # raises the call's own error
        bound.apply_defaults()
        dims = bound.arguments.get("axis")
        dims = bound.arguments.get("dim") if dims is None else dims
        dims = (dims,) if isinstance(dims, (int, np.integer)) else dims
        dims = tuple(dims) if isinstance(dims, list) else dims
        if not dims or not isinstance(dims, tuple) or any(
                isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d not in (0, -1)
                for d in dims):
            return reduce(*args, **keywords)  # all axes, or refused there
        bound.arguments[operand] = as_tensor(x).reshape(1)
        return reduce(*bound.args, **bound.kwargs).reshape(())
    return reduced


def normalize_axes(axis: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for a in axes:
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)):
            raise TypeError(f"an axis is an int, got {a!r} (at {user_location()})")
        if not -max(ndim, 1) <= a < max(ndim, 1):  # a 0-d tensor takes 0 and -1, as in PyTorch
            raise ShapeError(f"axis {a} is out of range for a tensor of rank {ndim} (at {user_location()})")
        out.append(a % ndim if ndim else 0)
    return tuple(out)


def _dims_argument(dims: tuple) -> tuple[int, ...]:
    """Sizes or axes given PyTorch's two ways: as arguments, f(2, 3), or as one sequence, f((2, 3))."""
    if len(dims) == 1 and not isinstance(dims[0], (int, np.integer)):
        return tuple(int(d) for d in dims[0])
    return tuple(int(d) for d in dims)


def _order_reversed(x: Tensor) -> Tensor:
    """A map reversing the order, its own inverse: -x for floats, -x - 1 for integers (~x in the
    wrap-around arithmetic of every backend, so the smallest integer maps to the largest where
    -x would overflow), not x for booleans. min and argmin are max and argmax of the reversed
    values."""
    if x.dtype == "bool":
        return ~x
    return -x if is_float(x.dtype) else -x - 1


def _require_elements(x: Tensor, dims: Any, op: str) -> None:
    """`op` over `dims` names itself where an axis is empty (min and argmin run as max and
    argmax of the reversed values, whose own error named max)."""
    if x.ndim == 0:  # one element (dim 0 or -1 reads it as a vector, as PyTorch)
        return
    for axis in normalize_axes(dims, x.ndim):
        if x.shape[axis] == 0:
            raise ShapeError(f"{op}: cannot take the minimum over axis {axis} of size 0 (shape "
                             f"{x.shape}) (at {user_location()})")


def _no_value(call: str, instead: str, tensor: Tensor | None = None) -> TracedValueError:
    """The error for asking a traced Tensor for its value (`call`), saying what to do instead;
    where `tensor` is a 0-d input of the function, most likely a number the user passed as an
    argument and means as a size or setting, saying so."""
    argument = ""
    if tensor is not None and not tensor.shape and _from_number_input(tensor.value):
        argument = (" It is, or comes from, a 0-d input of the traced function: a number passed "
                    "as an argument is traced as a tensor; to use it as a size or setting (a dim, "
                    "a count, a probability), close over the number instead (a lambda or "
                    "functools.partial).")
    return TracedValueError(f"{call} on a traced Tensor: it has no value while graphc traces the "
                            f"function, only a shape and dtype; {instead} (at {_caller()}).{argument}")


def _from_number_input(value: Value, depth: int = 2) -> bool:
    """Whether `value` is a 0-d input of the function, or computed from one in a step or two
    (`n == -1` inside an op given the number argument `n`)."""
    if value.type.shape:
        return False
    producer = value.producer
    if producer is None:
        return True
    return depth > 0 and any(_from_number_input(v, depth - 1) for v in producer.inputs)


def _caller() -> str | None:
    """The user's line, past graphc's frames and those of torch (torch.tensor(x) asks for the
    value from its own Python code)."""
    torch = sys.modules.get("torch")
    torch_dir = os.path.dirname(torch.__file__) + os.sep if torch is not None else None
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not (is_internal_file(filename) or filename.startswith("<frozen")
                or (torch_dir and os.path.abspath(filename).startswith(torch_dir))):
            return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


class ValuesIndices(NamedTuple):
    """What x.max(dim), x.min(dim), x.sort() and x.topk(k) return, as PyTorch's
    torch.return_types."""

    values: Tensor
    indices: Tensor


class View(NamedTuple):
    """How a Tensor is what PyTorch makes a view of `base` (a slice, a transpose, a reshape):
    `read(base)` is its value and `write_back(v)` the base's once the view takes the value v in
    place; `seen` is the base's value it was last read from, `strides` PyTorch's (in elements),
    which say whether the view is contiguous and which reshapes of it can be views."""

    base: "Tensor"
    seen: Value
    read: Callable[["Tensor"], "Tensor"]
    write_back: Callable[["Tensor"], "Tensor"]
    strides: tuple[int, ...]


def _scaled_sum(term: Tensor, product: Tensor, beta: float, alpha: float) -> Tensor:
    """beta * term + alpha * product (addmm, baddbmm); beta = 0 ignores term, NaN and inf too,
    as PyTorch's."""
    scaled = product if alpha == 1 else product * alpha
    if beta == 0:
        return scaled
    return scaled + (term if beta == 1 else term * beta)


def c_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides (in elements) of a C-contiguous array of `shape`."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _view_strides(shape: Sequence[int], strides: Sequence[int], new_shape: Sequence[int]
                  ) -> tuple[int, ...] | None:
    """The strides that show a tensor of `shape` and `strides` as `new_shape` (the same
    elements in C order), or None where none do and a reshape must copy (PyTorch's rule).

    Axes whose elements follow on from the next axis's without a gap form runs that behave as
    one axis; the new shape must split each run's elements into whole axes of its own."""
    if math.prod(shape) == 0:
        return tuple(strides) if tuple(shape) == tuple(new_shape) else c_strides(new_shape)
    if not shape:
        return (1,) * len(new_shape)
    new_strides = [0] * len(new_shape)
    view_axis = len(new_shape) - 1
    base_stride, run_elements, view_elements = strides[-1], 1, 1
    for axis in range(len(shape) - 1, -1, -1):
        run_elements *= shape[axis]
        run_ends = axis == 0 or (shape[axis - 1] != 1
                                 and strides[axis - 1] != run_elements * base_stride)
        if not run_ends:
            continue
        while view_axis >= 0 and (view_elements < run_elements or new_shape[view_axis] == 1):
            new_strides[view_axis] = view_elements * base_stride
            view_elements *= new_shape[view_axis]
            view_axis -= 1
        if view_elements != run_elements:
            return None
        if axis > 0:
            base_stride, run_elements, view_elements = strides[axis - 1], 1, 1
    return tuple(new_strides) if view_axis == -1 else None


class Tensor:
    """A traced value: an SSA value of the graph under construction with Python operators.

    A tensor PyTorch would make a view of another (`_view`: basic indexing, transposes,
    reshapes of contiguous tensors, squeeze, unsqueeze, detach) reads its base again once the
    base was written in place, and writing it in place writes the base, as PyTorch's views."""

    __slots__ = ("_value", "_view")
    __array_priority__ = 1000  # numpy scalars/arrays on the left defer to Tensor's operators

    def __init__(self, value: Value) -> None:
        self._value = value
        self._view: View | None = None

    @property
    def value(self) -> Value:
        view = self._view
        if view is not None:
            current = view.base.value
            if current is not view.seen:  # the base was written since: read it again
                self._value = view.read(view.base).value
                self._view = view._replace(seen=current)
        return self._value

    @property
    def strides(self) -> tuple[int, ...]:
        """PyTorch's strides (in elements) of this tensor: a view's own, else C order's."""
        return self._view.strides if self._view is not None else c_strides(self.shape)

    def is_contiguous(self) -> bool:
        """PyTorch's: the elements lie in C order (axes of length 1 aside)."""
        return all(n == 1 or stride == want for n, stride, want
                   in zip(self.shape, self.strides, c_strides(self.shape)))

    def _viewing(self, out: Tensor, read: Callable[[Tensor], Tensor],
                 write_back: Callable[[Tensor], Tensor], strides: tuple[int, ...]) -> Tensor:
        """`out`, marked as PyTorch's view of this tensor (see View)."""
        if out is not self:
            out._view = View(self, self.value, read, write_back, strides)
        return out

    # -- static facts ----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape

    @property
    def dtype(self) -> str:
        return self.value.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None) -> tuple[int, ...] | int:
        """PyTorch's: the shape (a tuple), or the length of axis `dim`. The element count is
        `numel()`."""
        if dim is None:
            return self.shape
        (axis,) = normalize_axes(dim, self.ndim)
        return self.shape[axis]

    def dim(self) -> int:
        return self.ndim

    def numel(self) -> int:
        return self.value.type.size

    def __len__(self) -> int:
        if not self.shape:  # most often a traced number used as a size: gc.zeros(n), x.split(n)
            raise _no_value("len() of a 0-d tensor (a number argument of a traced function is a "
                            "tensor, not a size)", "shapes are static: take sizes from x.shape, "
                            "or close over the number (a lambda or functools.partial)")
        return self.shape[0]

    def __repr__(self) -> str:
        return f"Tensor({SHORT_NAMES[self.dtype]}{list(self.shape)})"

    # -- values: a traced Tensor has none until the compiled graph runs ---------------------
    def __bool__(self) -> bool:
        raise _no_value("bool(x) (if/while/and/or on a tensor)",
                        "Python control flow cannot depend on it: use gc.where(cond, a, b) to "
                        "choose values, or compute the condition outside the traced function", self)

    def __float__(self) -> float:
        raise _no_value("float(x)", "return the tensor from the traced function and convert the "
                        "result; inside it, keep computing with the tensor (x.float() casts it)", self)

    def __int__(self) -> int:
        raise _no_value("int(x)", "return the tensor from the traced function and convert the "
                        "result; inside it, keep computing with the tensor (x.long() casts it)", self)

    def __index__(self) -> int:
        raise _no_value("using it as a Python int (an index into a list or array, range(), a "
                        "size)", "shapes are static: take sizes from x.shape; to pick elements "
                        "by a traced index, index a tensor with it (table[idx], gc.gather)", self)

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise _no_value("np.asarray(x) / np.array(x)", "return the tensor from the traced "
                        "function and convert the result; NumPy math on it traces as graphc "
                        "ops (np.exp(x), x + array)")

    # torch.tensor(x) and torch.as_tensor(x) ask a foreign tensor for DLPack first.
    def __dlpack_device__(self) -> tuple[int, int]:
        raise _no_value("torch.tensor(x) / torch.as_tensor(x)", "graphc cannot run torch "
                        "functions on its tensors: return the tensor from the traced function, "
                        "or keep computing with graphc ops (x.to(dtype), gc.stack)")

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dlpack_device__()

    def item(self) -> Any:
        raise _no_value("x.item()", "return the tensor from the traced function and take the "
                        "number from the result (a logged loss: return it)")

    def numpy(self) -> np.ndarray:
        raise _no_value("x.numpy()", "return the tensor from the traced function: the "
                        "compiled function returns NumPy arrays")

    def tolist(self) -> list:
        raise _no_value("x.tolist()", "return the tensor from the traced function and call "
                        ".tolist() on the array it returns")

    def detach(self) -> Tensor:
        """PyTorch's detach: the same values, through which no gradient flows (a view: a write
        into it writes this tensor, whose gradient passes the write by, as PyTorch's)."""
        return self._viewing(bind("stop_gradient", self), lambda base: bind("stop_gradient", base),
                             lambda view: bind("detached_write", view, self), self.strides)

    @property
    def data(self) -> Tensor:
        """PyTorch's x.data: the values without their gradient, as detach() (a view)."""
        return self.detach()

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    # -- arithmetic ------------------------------------------------------------------------
    def _binary(self, op: str, other: Any, reverse: bool = False) -> Tensor:
        """`self op other` (`other op self` when `reverse`), the operands promoted to one
        dtype as in PyTorch (see result_dtype); `&` and `|` take booleans as they are."""
        if op in ("logical_and", "logical_or", "logical_xor"):
            a, b = self, as_tensor(other, like=self)
            if a.dtype != "bool" or b.dtype != "bool" or not isinstance(other, (Tensor, bool, np.bool_, np.ndarray)):
                symbol = {"logical_and": "&", "logical_or": "|", "logical_xor": "^"}[op]
                raise DTypeError(f"{symbol} takes bool tensors and bools (graphc has no bitwise integer "
                                 f"ops), got {a.dtype} and {_operand_kind(other)} (at {user_location()})")
            if op == "logical_xor":
                return bind("ne", a, b)
        else:
            a, b = promoted(self, other, true_division=op == "div")
        return bind(op, b, a) if reverse else bind(op, a, b)

    def __add__(self, o): return self._binary("add", o)
    def __radd__(self, o): return self._binary("add", o, True)
    def __sub__(self, o): return self._binary("sub", o)
    def __rsub__(self, o): return self._binary("sub", o, True)
    def __mul__(self, o): return self._binary("mul", o)
    def __rmul__(self, o): return self._binary("mul", o, True)
    def __truediv__(self, o): return self._binary("div", o)
    def __rtruediv__(self, o): return self._binary("div", o, True)
    def __pow__(self, o):
        if isinstance(o, (int, float, np.integer)) and not isinstance(o, (bool, np.bool_)):
            if o == 2:
                return bind("square", self.astype(result_dtype(self, o)))
            if o == 0.5:  # sqrt, as PyTorch computes it: NaN at -inf (C's pow gives inf), -0 at -0
                return float_math("sqrt", self)
            if self.dtype in ("int32", "int64") and isinstance(o, (int, np.integer)):
                return _integer_power(self, int(o))
        return self._power(o, reverse=False)
    def __rpow__(self, o): return self._power(o, reverse=True)

    def _power(self, other: Any, reverse: bool) -> Tensor:
        """self ** other (other ** self when `reverse`); integers raised to a tensor of integer
        exponents are refused by name (the pow op computes in floating point)."""
        if not is_float(result_dtype(self, other if _is_number(other) else as_tensor(other))):
            base, exponent = ("a number", "an integer tensor") if reverse else ("an integer tensor", "integers")
            raise DTypeError(f"pow: {base} raised to {exponent} is not supported (graphc's pow "
                             f"computes in floating point; a constant exponent >= 0, x ** 3, stays "
                             f"integer): cast to float first, x.double() ** y (at {user_location()})")
        return self._binary("pow", other, reverse)
    def __floordiv__(self, o): return self._binary("floor_divide", o)
    def __rfloordiv__(self, o): return self._binary("floor_divide", o, True)
    def __mod__(self, o): return self._binary("remainder", o)
    def __rmod__(self, o): return self._binary("remainder", o, True)
    def __matmul__(self, o): return matmul(self, as_tensor(o, like=self))
    def __rmatmul__(self, o): return matmul(as_tensor(o, like=self), self)
    def __neg__(self): return bind("neg", self)
    def __pos__(self): return self
    def __abs__(self): return bind("abs", self)
    def __lt__(self, o): return self._binary("lt", o)
    def __le__(self, o): return self._binary("le", o)
    def __gt__(self, o): return self._binary("gt", o)
    def __ge__(self, o): return self._binary("ge", o)
    def __eq__(self, o): return self._binary("eq", o)  # type: ignore[override]
    def __ne__(self, o): return self._binary("ne", o)  # type: ignore[override]
    def __and__(self, o): return self._binary("logical_and", o)
    def __rand__(self, o): return self._binary("logical_and", o, True)
    def __or__(self, o): return self._binary("logical_or", o)
    def __ror__(self, o): return self._binary("logical_or", o, True)
    def __xor__(self, o): return self._binary("logical_xor", o)
    def __rxor__(self, o): return self._binary("logical_xor", o, True)
    def __invert__(self): return bind("logical_not", self)
    __hash__ = object.__hash__

    # PyTorch's in-place operators: the Tensor object itself changes, so every name for it sees
    # the change (as with x[i] = v); without them Python would bind the name to a new Tensor
    def __iadd__(self, o): return self._in_place(self + o, "x += y", "x = x + y")
    def __isub__(self, o): return self._in_place(self - o, "x -= y", "x = x - y")
    def __imul__(self, o): return self._in_place(self * o, "x *= y", "x = x * y")
    def __itruediv__(self, o): return self._in_place(self / o, "x /= y", "x = x / y")
    def __ipow__(self, o): return self._in_place(self ** o, "x **= y", "x = x ** y")
    def __imatmul__(self, o): return self._in_place(self @ o, "x @= y", "x = x @ y")
    def __ifloordiv__(self, o): return self._in_place(self // o, "x //= y", "x = x // y")
    def __imod__(self, o): return self._in_place(self % o, "x %= y", "x = x % y")
    def __iand__(self, o): return self._in_place(self & o, "x &= y", "x = x & y")
    def __ior__(self, o): return self._in_place(self | o, "x |= y", "x = x | y")

    def _in_place(self, result: Tensor, how: str, instead: str) -> Tensor:
        """This Tensor takes `result` (the write `how`; `instead` makes a new tensor), kept in
        its own shape and dtype as PyTorch's in-place ops keep them (a float result is not
        written into an integer tensor)."""
        if result.shape != self.shape:
            raise ShapeError(f"{how}: the result's shape {result.shape} differs from x's "
                             f"{self.shape}, which an in-place operation keeps; write {instead} "
                             f"for a new tensor (at {user_location()})")
        if result.dtype != self.dtype:
            if not np.can_cast(np.dtype(result.dtype), np.dtype(self.dtype), "same_kind"):
                raise DTypeError(f"{how}: the result is {result.dtype}, which cannot be written "
                                 f"into x ({self.dtype}) in place, as in PyTorch; write "
                                 f"{instead} for a new tensor (at {user_location()})")
            result = result.astype(self.dtype)
        self.take_value(result, how)
        return self

    # -- elementwise methods -------------------------------------------------------------------
    def exp(self) -> Tensor: return float_math("exp", self)
    def log(self) -> Tensor: return float_math("log", self)
    def sqrt(self) -> Tensor: return float_math("sqrt", self)
    def tanh(self) -> Tensor: return float_math("tanh", self)
    def sigmoid(self) -> Tensor: return float_math("sigmoid", self)
    def relu(self) -> Tensor: return bind("relu", self)
    def abs(self) -> Tensor: return bind("abs", self)
    def square(self) -> Tensor: return bind("square", self)

    # -- dtype conversions ---------------------------------------------------------------------
    def astype(self, dtype: Any) -> Tensor:
        dtype = dtype_name(dtype)
        return self if dtype == self.dtype else bind("cast", self, dtype=dtype)

    def float(self) -> Tensor: return self.astype("float32")
    def double(self) -> Tensor: return self.astype("float64")
    def int(self) -> Tensor: return self.astype("int32")
    def long(self) -> Tensor: return self.astype("int64")
    def bool(self) -> Tensor: return self.astype("bool")

    def type_as(self, other: Tensor) -> Tensor:
        return self.astype(other.dtype)

    def to(self, *targets: Any, dtype: Any = None, device: Any = None) -> Tensor:
        """PyTorch's `to`: a dtype (a name, a NumPy or torch dtype) or another tensor's dtype. A
        device ('cpu', 'cuda', torch.device) leaves the tensor as it is: the backend given to
        jit/compile places every tensor of the graph."""
        del device
        for target in targets:
            if isinstance(target, Tensor):
                dtype = target.dtype
            elif not _is_device(target):
                dtype = target
        return self if dtype is None else self.astype(dtype)

    def contiguous(self) -> Tensor:
        """This tensor where PyTorch's is contiguous, else a copy (not a view of it)."""
        return self if self.is_contiguous() else Tensor(self.value)

    # -- reductions ------------------------------------------------------------------------
    # Each takes PyTorch's `dim`/`keepdim` and NumPy's `axis`/`keepdims` alike.
    @scalar_reduced_as_vector
    def sum(self, dim: int | Sequence[int] | None = None, keepdim: bool = False, *,
            axis: int | Sequence[int] | None = None, keepdims: bool = False,
            dtype: Any = None) -> Tensor:
        """The sum over `dim` (all axes by default); booleans and integers add up in int64, as in
        NumPy and PyTorch (an int32 sum would overflow). `dtype`: cast to it first."""
        if dtype is not None:
            return self.astype(dtype).sum(dim, keepdim, axis=axis, keepdims=keepdims)
        axes = normalize_axes(reduction_axes(dim, axis, "sum"), self.ndim)
        x = self if is_float(self.dtype) else self.astype("int64")
        return bind("sum", x, axes=axes, keepdims=keepdim or keepdims)

    @scalar_reduced_as_vector
    def prod(self, dim: int | Sequence[int] | None = None, keepdim: bool = False, *,
             axis: int | Sequence[int] | None = None, keepdims: bool = False,
             dtype: Any = None) -> Tensor:
        """The product over `dim` (all axes by default); booleans and integers multiply in int64
        unless `dtype` says otherwise, as in NumPy and PyTorch. The product of no elements is 1.
        It is the last element of a running product over the reduced axes, so its gradient is
        cumprod's: exact where elements are zero."""
        dims = reduction_axes(dim, axis, "prod")
        axes = normalize_axes(dims, self.ndim)
        if len(set(axes)) != len(axes):
            raise ShapeError(f"prod: dims {dims} name an axis twice (at {user_location()})")
        keep = keepdim or keepdims
        if dtype is not None and dtype_name(dtype) == "bool":  # nonzero all along: True
            return (self != 0).all(axis=axes, keepdims=keep)
        x = self.astype(dtype) if dtype is not None else (
            self if is_float(self.dtype) else self.astype("int64"))
        kept = [a for a in range(x.ndim) if a not in axes]
        count = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
        out_shape = tuple(1 if a in axes else x.shape[a] for a in range(x.ndim)) if keep else \
            tuple(x.shape[a] for a in kept)
        if count == 0:  # an empty product: 1, and nothing to differentiate
            return x.sum(axis=axes, keepdims=keep) * 0 + 1
        if count == 1:  # one factor: itself (its gradient 1, even where it is infinite), a copy
            return bind("reshape", x, shape=out_shape)
        lines = x.permute(*kept, *axes).reshape(*[x.shape[a] for a in kept], count)
        return lines.cumprod(-1, dtype=x.dtype)[..., count - 1].reshape(out_shape)

    @scalar_reduced_as_vector
    def mean(self, dim: int | Sequence[int] | None = None, keepdim: bool = False, *,
             axis: int | Sequence[int] | None = None, keepdims: bool = False,
             dtype: Any = None) -> Tensor:
        if dtype is not None:  # cast first, as PyTorch's
            return self.astype(dtype).mean(dim, keepdim, axis=axis, keepdims=keepdims)
        axes = normalize_axes(reduction_axes(dim, axis, "mean"), self.ndim)
        count = int(np.prod([self.shape[a] for a in axes], dtype=np.int64))
        # The mean of no elements is 0/0: NaN, as in NumPy and PyTorch.
        scale = 1.0 / count if count else float("nan")
        if not is_float(self.dtype):  # summed in float64, as NumPy does: an int64 sum overflows
            return (self.astype("float64").sum(axis=axes, keepdims=keepdim or keepdims) * scale).astype("float32")
        return self.sum(axis=axes, keepdims=keepdim or keepdims) * scale

    @scalar_reduced_as_vector
    def amax(self, dim: int | Sequence[int] | None = None, keepdim: bool = False, *,
             axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        """The maximum over `dim` (one axis, several, or all by default): values only."""
        axes = normalize_axes(reduction_axes(dim, axis, "amax"), self.ndim)
        if self.dtype == "bool":  # True if any: the maximum of 0/1 (the max op takes numbers)
            return bind("max", self.astype("int32"), axes=axes, keepdims=keepdim or keepdims) > 0
        return bind("max", self, axes=axes, keepdims=keepdim or keepdims)

    def any(self, dim: int | Sequence[int] | None = None, keepdim: bool = False, *,
            axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        """Whether any element over `dim` (all axes by default) is nonzero: False over none.
        An empty `dim` reduces nothing, as PyTorch's any (unlike its sum)."""
        nonzero = self if self.dtype == "bool" else self != 0
        dim, axis = _no_axes_if_empty(dim, axis)
        return nonzero.sum(dim, keepdim, axis=axis, keepdims=keepdims) > 0

    def all(self, dim: int | Sequence[int] | None = None, keepdim: bool = False, *,
            axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        """Whether every element over `dim` (all axes by default) is nonzero: True over none.
        An empty `dim` reduces nothing, as PyTorch's all."""
        zero = ~self if self.dtype == "bool" else self == 0
        dim, axis = _no_axes_if_empty(dim, axis)
        return zero.sum(dim, keepdim, axis=axis, keepdims=keepdims) == 0

    def max(self, dim: Any = None, keepdim: bool = False, *, axis: Any = None,
            keepdims: bool = False) -> Tensor | ValuesIndices:
        """PyTorch's max. `x.max()` is the maximum of all elements; `x.max(dim)` with one axis
        is the named tuple (values, indices); over several axes (a tuple), the values only, as
        amax; `x.max(other)` with a tensor is the elementwise maximum. The values' gradient is
        shared by tied maxima, as amax's (PyTorch gives max(dim)'s to the returned index)."""
        dim = reduction_axes(dim, axis, "max")
        if isinstance(dim, Tensor):  # the elementwise maximum, operands promoted as PyTorch's
            from .functions import maximum
            return maximum(self, dim)
        keep = keepdim or keepdims
        if not isinstance(dim, (int, np.integer)):
            return self.amax(axis=dim, keepdims=keep) if axis is not None else self.amax(dim, keep)
        return ValuesIndices(self.amax(dim, keep), self.argmax(dim, keep))

    @scalar_reduced_as_vector
    def argmax(self, dim: int | None = None, keepdim: bool = False, *, axis: int | None = None,
               keepdims: bool = False) -> Tensor:
        dim = reduction_axes(dim, axis, "argmax")
        if not (dim is None or isinstance(dim, (int, np.integer))):
            raise ShapeError(f"argmax/argmin: dim must be one axis or None, got {dim!r} (at "
                             f"{user_location()})")
        if dim is None:  # the flat index; kept dims are all of length 1, as NumPy's and PyTorch's
            flat = self.reshape(-1).argmax(0)
            return flat.reshape((1,) * self.ndim) if keepdim or keepdims else flat
        (dim,) = normalize_axes(dim, self.ndim)
        x = self.astype("int32") if self.dtype == "bool" else self  # the first True
        return bind("argmax", x, axis=dim, keepdims=keepdim or keepdims)

    def logsumexp(self, dim: int | Sequence[int] = -1, keepdim: bool = False, *,
                  axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        from .functions import logsumexp
        return logsumexp(self, dim, keepdim, axis=axis, keepdims=keepdims)

    def softmax(self, dim: int = -1, dtype: Any = None) -> Tensor:
        from .nn.functional import softmax
        return softmax(self, dim, dtype=dtype)

    def log_softmax(self, dim: int = -1, dtype: Any = None) -> Tensor:
        from .nn.functional import log_softmax
        return log_softmax(self, dim, dtype=dtype)

    def amin(self, dim: int | Sequence[int] | None = None, keepdim: bool = False, *,
             axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        """The minimum over `dim` (one axis, several, or all by default): values only."""
        _require_elements(self, reduction_axes(dim, axis, "min"), "min")
        reversed_max = _order_reversed(self).amax(dim, keepdim, axis=axis, keepdims=keepdims)
        return _order_reversed(reversed_max)

    def min(self, dim: Any = None, keepdim: bool = False, *, axis: Any = None,
            keepdims: bool = False) -> Tensor | ValuesIndices:
        """PyTorch's min, as `max`: over one axis the named tuple (values, indices)."""
        dim = reduction_axes(dim, axis, "min")
        if isinstance(dim, Tensor):  # the elementwise minimum, operands promoted as PyTorch's
            from .functions import minimum
            return minimum(self, dim)
        keep = keepdim or keepdims
        if not isinstance(dim, (int, np.integer)):
            return self.amin(axis=dim, keepdims=keep) if axis is not None else self.amin(dim, keep)
        return ValuesIndices(self.amin(dim, keep), self.argmin(dim, keep))

    def argmin(self, dim: int | None = None, keepdim: bool = False, *, axis: int | None = None,
               keepdims: bool = False) -> Tensor:
        """The index of the first minimum (a NaN counts as the minimum, as in PyTorch)."""
        _require_elements(self, reduction_axes(dim, axis, "argmin"), "argmin")
        return _order_reversed(self).argmax(dim, keepdim, axis=axis, keepdims=keepdims)

    def gather(self, dim: int, index: Any) -> Tensor:
        """PyTorch's Tensor.gather: out[i][j] = self[i][index[i][j]] along `dim` (gc.gather is
        NumPy's take; this is gc.take_along_axis, but as in PyTorch a negative index is refused,
        not counted from the end)."""
        (axis,) = normalize_axes(dim, self.ndim)
        index = as_tensor(index)
        if index.ndim != self.ndim or any(i > n for d, (i, n) in enumerate(zip(index.shape, self.shape))
                                          if d != axis):
            raise ShapeError(f"gather: the index {index.shape} must have the tensor's {self.ndim} "
                             f"dims, each but dim {dim} no longer than the tensor's {self.shape} "
                             f"(at {user_location()})")
        # PyTorch reads the leading part of the other axes the index covers (NumPy's
        # take_along_axis would broadcast an index of length 1 instead)
        source = self[tuple(slice(None) if d == axis else slice(0, i) for d, i in enumerate(index.shape))]
        return bind("take_along_axis", source, index, axis=axis, wrap_negative=False)

    def _check_scatter_shapes(self, op: str, axis: int, index: Tensor, src: Tensor) -> None:
        """PyTorch's rule: the index has this tensor's dims and covers the leading part of src
        and of this tensor's axes other than `axis`."""
        if (index.ndim != self.ndim or src.ndim != self.ndim
                or any(i > n for i, n in zip(index.shape, src.shape))
                or any(i > n for d, (i, n) in enumerate(zip(index.shape, self.shape)) if d != axis)):
            raise ShapeError(f"{op}: the index {index.shape} must have the tensor's {self.ndim} "
                             f"dims, fit in its other axes {self.shape} and in src {src.shape} "
                             f"(at {user_location()})")

    def scatter_add(self, dim: int, index: Any, src: Any) -> Tensor:
        """PyTorch's: a copy of this tensor with src[i][j] added at [i][index[i][j]] along
        `dim` (for dim 1; likewise for others), repeated indices adding up; the index covers
        the leading part of src and of this tensor's other axes."""
        (axis,) = normalize_axes(dim, self.ndim)
        index, src = as_tensor(index), as_tensor(src, like=self)
        self._check_scatter_shapes("scatter_add", axis, index, src)
        src = src[tuple(slice(0, i) for i in index.shape)].astype(self.dtype)
        covered = tuple(slice(None) if d == axis else slice(0, i) for d, i in enumerate(index.shape))
        region_shape = tuple(n if d == axis else i for d, (i, n) in enumerate(zip(index.shape, self.shape)))
        added = bind("scatter_add_along_axis", src, index, axis=axis, shape=region_shape,
                     wrap_negative=False)
        if region_shape == self.shape:
            return self + added
        out = self.clone()  # the index covers the leading part of the other axes: add there
        out[covered] = self[covered] + added
        return out

    def scatter(self, dim: int, index: Any, src: Any = None, *, value: Any = None,
                reduce: str | None = None) -> Tensor:
        """PyTorch's: a copy of this tensor with src[i][j] written at [i][index[i][j]] along
        `dim` (for dim 1; likewise for others), or the number `value` (also taken as the third
        argument); the index covers the leading part of src and of this tensor's other axes.
        Where an index repeats, one of the writes is kept (the last, as PyTorch's CPU
        kernels; PyTorch leaves it undefined), and only it gets a gradient (PyTorch's goes to
        every write). A negative index is refused, as PyTorch refuses it (a traced one is named
        in the error as that index minus the axis' size). `reduce` is refused: scatter_add
        adds."""
        if reduce is not None:
            raise GraphcError(f"scatter: reduce={reduce!r} is not supported (PyTorch deprecates "
                              f"it): use scatter_add for sums (at {user_location()})")
        (axis,) = normalize_axes(dim, self.ndim)
        given_index = None if isinstance(index, Tensor) else np.asarray(index)  # checked now
        index = as_tensor(index)
        if value is None and (src is None or _is_number(src)):
            src, value = None, src
        if (src is None) == (value is None):
            raise GraphcError(f"scatter: give src (a tensor) or value (a number), one of them "
                              f"(at {user_location()})")
        if src is None:  # a number is cast to this tensor's dtype, as PyTorch's fills cast it
            src = self._fill_value(value, "scatter").broadcast_to(index.shape)
        else:
            src = as_tensor(src, like=self)
            if src.dtype != self.dtype:
                raise DTypeError(f"scatter: src is {src.dtype} where this tensor is {self.dtype}: "
                                 f"PyTorch takes them equal; cast src (src.to(x.dtype)) "
                                 f"(at {user_location()})")
        self._check_scatter_shapes("scatter", axis, index, src)
        if not index.dtype.startswith("int"):
            raise DTypeError(f"scatter: the index must be int64 or int32, got {index.dtype} "
                             f"(at {user_location()})")
        src = src[tuple(slice(0, i) for i in index.shape)]
        # A negative index is refused, as PyTorch's: a traced one is moved below -size, where
        # the write's own range check refuses it (the index written counts from the end).
        if given_index is not None and (given_index < 0).any():
            position = tuple(int(p[0]) for p in np.nonzero(given_index < 0))
            raise IndexOutOfRangeError("scatter", int(given_index[position]), position, 0,
                                       self.shape[axis], user_location())
        index = bind("where", index < 0, index - self.shape[axis], index)
        # every other axis indexed by its own positions: out[index[i, j], j] = src[i, j]
        positions = tuple(index if d == axis else np.arange(n).reshape(
            (1,) * d + (n,) + (1,) * (index.ndim - d - 1)) for d, n in enumerate(index.shape))
        out = self.clone()
        out[positions] = src
        return out

    def scatter_(self, dim: int, index: Any, src: Any = None, *, value: Any = None,
                 reduce: str | None = None) -> Tensor:
        return self._in_place(self.scatter(dim, index, src, value=value, reduce=reduce),
                              "x.scatter_(dim, index, src)", "x.scatter(dim, index, src)")

    def scatter_add_(self, dim: int, index: Any, src: Any) -> Tensor:
        return self._in_place(self.scatter_add(dim, index, src), "x.scatter_add_(dim, index, src)",
                              "x.scatter_add(dim, index, src)")

    def index_add_(self, dim: int, index: Any, source: Any, *, alpha: Any = 1) -> Tensor:
        return self._in_place(self.index_add(dim, index, source, alpha=alpha),
                              "x.index_add_(dim, index, source)", "x.index_add(dim, index, source)")

    def index_add(self, dim: int, index: Any, source: Any, *, alpha: Any = 1) -> Tensor:
        """PyTorch's: a copy of this tensor with alpha * source's slice i added at index[i]
        along `dim` (a 1-D index; repeated entries add up)."""
        (axis,) = normalize_axes(dim, self.ndim)
        index, source = as_tensor(index), as_tensor(source, like=self)
        expected = self.shape[:axis] + index.shape + self.shape[axis + 1:]
        if index.ndim != 1 or source.shape != expected:
            raise ShapeError(f"index_add: expects a 1-D index and a source of shape {expected} "
                             f"(this tensor's {self.shape} with dim {dim} the index's length), got "
                             f"index {index.shape} and source {source.shape} (at {user_location()})")
        spread = index.reshape((1,) * axis + index.shape + (1,) * (self.ndim - axis - 1))
        return self.scatter_add(axis, spread.broadcast_to(source.shape).clone(),
                                self._times_alpha("index_add", source, alpha))

    def kthvalue(self, k: int, dim: int = -1, keepdim: bool = False) -> ValuesIndices:
        """PyTorch's: the k-th smallest element along `dim` (k from 1) and its position."""
        from .functions import sort
        (axis,) = normalize_axes(dim, self.ndim)
        size = self.shape[axis] if self.ndim else 1
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= size:
            raise ShapeError(f"kthvalue: k={k!r} must be an int in [1, {size}] for dim {dim} of "
                             f"shape {self.shape} (at {user_location()})")
        values, indices = sort(self, axis, stable=True)
        if self.ndim == 0:
            return ValuesIndices(values, indices)
        pick = (slice(None),) * axis + (slice(k - 1, k),)
        values, indices = values[pick], indices[pick]
        return ValuesIndices(values if keepdim else values.squeeze(axis),
                             indices if keepdim else indices.squeeze(axis))

    def swapaxes(self, axis0: int, axis1: int) -> Tensor:
        return self.transpose(axis0, axis1)

    swapdims = swapaxes

    def movedim(self, source: int | Sequence[int], destination: int | Sequence[int]) -> Tensor:
        """PyTorch's: the axes `source` moved to `destination`, the others in their order."""
        sources = normalize_axes(source, self.ndim)
        targets = normalize_axes(destination, self.ndim)
        if len(sources) != len(targets) or len(set(sources)) != len(sources) or len(set(targets)) != len(targets):
            raise ShapeError(f"movedim: source {source} and destination {destination} must name "
                             f"as many distinct axes (at {user_location()})")
        rest = iter(a for a in range(self.ndim) if a not in sources)
        placed = dict(zip(targets, sources))
        return self.permute(tuple(placed[d] if d in placed else next(rest) for d in range(self.ndim)))

    moveaxis = movedim

    def rot90(self, k: int = 1, dims: Sequence[int] = (0, 1)) -> Tensor:
        """PyTorch's: rotated k quarter turns in the plane of `dims`, from the first axis
        toward the second."""
        if len(dims) != 2:
            raise ShapeError(f"rot90: dims must name two axes, got {dims} (at {user_location()})")
        a, b = normalize_axes(tuple(dims), self.ndim)
        if a == b:
            raise ShapeError(f"rot90: dims must be two different axes, got {dims} (at {user_location()})")
        k %= 4
        if k == 1:
            return self.flip(b).transpose(a, b)
        if k == 2:
            return self.flip(a, b)
        return self.flip(a).transpose(a, b) if k == 3 else self.clone()

    def masked_select(self, mask: Any) -> Tensor:
        """PyTorch's: the elements where `mask` (broadcast) holds, as a 1-D tensor; its length
        is data-dependent, which a traced function's static shapes refuse (with the way out), but
        for a NumPy mask, which selects as x[mask] does."""
        if not isinstance(mask, Tensor):
            mask = np.asarray(mask)
            if mask.dtype != np.bool_:  # an integer array would index, not select
                raise DTypeError(f"masked_select: the mask must be boolean, got {mask.dtype} "
                                 f"(at {user_location()})")
        shape = np.broadcast_shapes(self.shape, mask.shape)
        selected = mask.broadcast_to(shape) if isinstance(mask, Tensor) else np.broadcast_to(mask, shape)
        return self.broadcast_to(shape)[selected]

    # -- math: graphc/functions.py defines these ----------------------------------------------
    def sin(self) -> Tensor: return float_math("sin", self)
    def cos(self) -> Tensor: return float_math("cos", self)
    def erf(self) -> Tensor: return float_math("erf", self)

    def expm1(self) -> Tensor: return float_math("expm1", self)

    def floor(self) -> Tensor:
        from .functions import floor
        return floor(self)

    def ceil(self) -> Tensor:
        from .functions import ceil
        return ceil(self)

    def trunc(self) -> Tensor:
        from .functions import trunc
        return trunc(self)

    def round(self, decimals: int = 0) -> Tensor:
        from .functions import round
        return round(self, decimals)

    def fmod(self, other: Any) -> Tensor:
        from .functions import fmod
        return fmod(self, other)

    def remainder(self, other: Any) -> Tensor:
        from .functions import remainder
        return remainder(self, other)

    def clamp(self, min: Any = None, max: Any = None) -> Tensor:
        from .functions import clamp
        return clamp(self, min, max)

    clip = clamp

    def cumsum(self, dim: int | None = None, *, axis: int | None = None, dtype: Any = None) -> Tensor:
        from .functions import cumsum
        return cumsum(self, dim, axis=axis, dtype=dtype)

    def cumprod(self, dim: int | None = None, *, axis: int | None = None, dtype: Any = None) -> Tensor:
        from .functions import cumprod
        return cumprod(self, dim, axis=axis, dtype=dtype)

    def argsort(self, dim: int = -1, descending: bool = False, stable: bool = False) -> Tensor:
        from .functions import argsort
        return argsort(self, dim, descending, stable)

    def sort(self, dim: int = -1, descending: bool = False, stable: bool = False) -> ValuesIndices:
        from .functions import sort
        return sort(self, dim, descending, stable)

    def topk(self, k: int, dim: int = -1, largest: bool = True, sorted: bool = True) -> ValuesIndices:
        from .functions import topk
        return topk(self, k, dim, largest, sorted)

    def var(self, dim: Any = None, unbiased: bool | None = None, keepdim: bool = False,
            **keywords: Any) -> Tensor:
        from .functions import var
        return var(self, dim, unbiased, keepdim, **keywords)

    def std(self, dim: Any = None, unbiased: bool | None = None, keepdim: bool = False,
            **keywords: Any) -> Tensor:
        from .functions import std
        return std(self, dim, unbiased, keepdim, **keywords)

    def norm(self, p: Any = "fro", dim: Any = None, keepdim: bool = False, **keywords: Any) -> Tensor:
        from .functions import norm
        return norm(self, p, dim, keepdim, **keywords)

    def triu(self, diagonal: int = 0) -> Tensor:
        from .functions import triu
        return triu(self, diagonal)

    def tril(self, diagonal: int = 0) -> Tensor:
        from .functions import tril
        return tril(self, diagonal)

    # -- shape -----------------------------------------------------------------------------
    def reshape(self, *shape: int | Sequence[int]) -> Tensor:
        dims = list(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else list(shape)
        if dims.count(-1) > 1:
            raise ShapeError(f"reshape: at most one -1 in {tuple(dims)} (at {user_location()})")
        if -1 in dims:
            known = int(np.prod([d for d in dims if d != -1], dtype=np.int64))
            if known == 0 or self.numel() % known:
                raise ShapeError(f"reshape: cannot reshape {self.shape} into {tuple(dims)} "
                                 f"(at {user_location()})")
            dims[dims.index(-1)] = self.numel() // known
        out = bind("reshape", self, shape=tuple(dims))
        strides = _view_strides(self.shape, self.strides, out.shape)
        if strides is None:  # no strides give these elements in this shape: PyTorch copies
            return out
        shape = out.shape
        return self._viewing(out, lambda base: bind("reshape", base, shape=shape),
                             self._reshaped_back, strides)

    def _reshaped_back(self, view: Tensor) -> Tensor:
        return bind("reshape", view, shape=self.shape)

    def view(self, *shape: int | Sequence[int]) -> Tensor:
        """PyTorch's view: a reshape that is always a view of this tensor, refused (as in
        PyTorch) where its strides cannot give the new shape."""
        out = self.reshape(*shape)
        if out._view is None or out._view.base is not self:
            raise ShapeError(f"view: a tensor of shape {self.shape} and strides {self.strides} "
                             f"cannot be viewed as {out.shape} (an axis of the view would span "
                             f"two of its strided parts); use .reshape(...), which copies "
                             f"(at {user_location()})")
        return out

    def transpose(self, *dims: int) -> Tensor:
        """PyTorch's meaning: swap two axes. With no arguments, reverse all axes (NumPy's)."""
        if not dims:
            return self.permute(tuple(reversed(range(self.ndim))))
        if len(dims) != 2:
            raise GraphcError(f"transpose takes two axes to swap; use permute for a permutation "
                              f"(at {user_location()})")
        a, b = normalize_axes(dims, self.ndim)
        if self.ndim == 0:  # dims 0 and -1 name the one "axis" a 0-d tensor has, as in PyTorch
            return self
        perm = list(range(self.ndim))
        perm[a], perm[b] = perm[b], perm[a]
        return self.permute(perm)

    def permute(self, *dims: int) -> Tensor:
        dims = tuple(dims[0]) if len(dims) == 1 and not isinstance(dims[0], int) else dims
        perm = normalize_axes(dims, self.ndim)
        back = tuple(int(i) for i in np.argsort(perm))
        strides = self.strides
        return self._viewing(bind("transpose", self, perm=perm),
                             lambda base: bind("transpose", base, perm=perm),
                             lambda view: bind("transpose", view, perm=back),
                             tuple(strides[p] for p in perm))

    @property
    def T(self) -> Tensor:
        return self.transpose()

    @property
    def mT(self) -> Tensor:
        """The last two axes swapped (a batch of matrices transposed)."""
        if self.ndim < 2:
            raise ShapeError(f"mT needs at least two dimensions, got shape {self.shape} "
                             f"(at {user_location()})")
        return self.transpose(-2, -1)

    def t(self) -> Tensor:
        """PyTorch's t(): a matrix transposed; a vector or a scalar as it is."""
        if self.ndim > 2:
            raise ShapeError(f"t() expects a tensor of at most 2 dimensions, got shape "
                             f"{self.shape}; use transpose(a, b) or mT (at {user_location()})")
        return self.transpose(0, 1) if self.ndim == 2 else self

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> Tensor:
        """Axes start_dim..end_dim merged into one; a 0-d tensor becomes a vector of one."""
        if self.ndim == 0:
            return self.reshape(1)
        start, end = normalize_axes((start_dim, end_dim), self.ndim)
        if start > end:
            raise ShapeError(f"flatten: start_dim {start_dim} (axis {start}) comes after end_dim "
                             f"{end_dim} (axis {end}) of shape {self.shape} (at {user_location()})")
        merged = int(np.prod(self.shape[start:end + 1], dtype=np.int64))
        return self.reshape(self.shape[:start] + (merged,) + self.shape[end + 1:])

    def unsqueeze(self, dim: int) -> Tensor:
        """A new axis of length 1 at `dim` of the result (negative counts from its end)."""
        if not -self.ndim - 1 <= dim <= self.ndim:
            raise ShapeError(f"unsqueeze: dim {dim} is out of range for a tensor of shape "
                             f"{self.shape}: expected it in [{-self.ndim - 1}, {self.ndim}] "
                             f"(at {user_location()})")
        axis = dim % (self.ndim + 1)
        strides = self.strides
        return self._viewing(bind("expand_dims", self, axes=(axis,)),
                             lambda base: bind("expand_dims", base, axes=(axis,)), self._reshaped_back,
                             strides[:axis] + (1,) + strides[axis:])

    def squeeze(self, dim: int | Sequence[int] | None = None) -> Tensor:
        """PyTorch's squeeze: the axes of length 1 among `dim` (all by default) removed; a named
        axis of another length stays (NumPy's squeeze raises there)."""
        axes = normalize_axes(dim, self.ndim)  # a 0-d tensor takes dim 0 or -1, and stays
        ones = tuple(a for a in axes if self.ndim and self.shape[a] == 1)
        if not ones:
            return self
        strides = tuple(s for a, s in enumerate(self.strides) if a not in ones)
        return self._viewing(bind("squeeze", self, axes=ones), lambda base: bind("squeeze", base, axes=ones),
                             self._reshaped_back, strides)

    def broadcast_to(self, shape: Sequence[int]) -> Tensor:
        """A view, as PyTorch's expand: its broadcast axes have stride 0, and it reads its base's
        later writes. Written in place, it takes fill_/zero_ alone (one value for every copy of
        an element), as PyTorch's."""
        shape = tuple(shape)
        if shape == self.shape:
            return self
        out = bind("broadcast_to", self, shape=shape)
        lead = len(shape) - self.ndim
        spread = tuple(range(lead)) + tuple(lead + a for a, n in enumerate(self.shape) if n != shape[lead + a])
        strides = (0,) * lead + tuple(0 if lead + a in spread else s for a, s in enumerate(self.strides))
        one_copy = (0,) * lead + tuple(slice(0, 1) if lead + a in spread else slice(None)
                                       for a in range(self.ndim))
        return self._viewing(out, lambda base: bind("broadcast_to", base, shape=shape),
                             lambda view: view[one_copy], strides)

    def expand(self, *sizes: int | Sequence[int]) -> Tensor:
        """PyTorch's expand: broadcast to `sizes`, where -1 keeps that axis's size."""
        sizes = _dims_argument(sizes)
        lead = len(sizes) - self.ndim
        if lead < 0:
            raise ShapeError(f"expand: {len(sizes)} sizes for a tensor of {self.ndim} "
                             f"dimensions {self.shape} (at {user_location()})")
        if -1 in sizes[:lead]:
            raise ShapeError(f"expand: -1 cannot size a new leading dimension in {sizes} "
                             f"(at {user_location()})")
        return self.broadcast_to(tuple(self.shape[i - lead] if n == -1 else n
                                       for i, n in enumerate(sizes)))

    def expand_as(self, other: Tensor) -> Tensor:
        return self.broadcast_to(other.shape)

    def repeat(self, *repeats: int | Sequence[int]) -> Tensor:
        """PyTorch's repeat (NumPy's tile): the tensor tiled `repeats[i]` times along axis i;
        extra leading repeats add dimensions."""
        repeats = _dims_argument(repeats)
        lead = len(repeats) - self.ndim
        if lead < 0:
            raise ShapeError(f"repeat: {len(repeats)} repeat counts for a tensor of "
                             f"{self.ndim} dimensions {self.shape} (at {user_location()})")
        shape = (1,) * lead + self.shape
        # A copy axis before each axis, broadcast to the count, then merged into it.
        interleaved = self.reshape(tuple(d for n in shape for d in (1, n)))
        tiled = interleaved.broadcast_to(tuple(d for r, n in zip(repeats, shape) for d in (r, n)))
        # a copy, never a view of this tensor (repeats of 1 would make one), as PyTorch's
        return tiled.reshape(tuple(r * n for r, n in zip(repeats, shape))).clone()

    def flip(self, *dims: int | Sequence[int]) -> Tensor:
        """The elements in reverse order along `dims`."""
        axes = normalize_axes(_dims_argument(dims), self.ndim)
        if len(set(axes)) != len(axes):
            raise ShapeError(f"flip: an axis is named twice in {dims} (at {user_location()})")
        return bind("flip", self, axes=axes) if axes and self.ndim else self

    def split(self, split_size_or_sections: int | Sequence[int], dim: int = 0) -> tuple[Tensor, ...]:
        """PyTorch's split: pieces of `split_size` along `dim` (the last may be shorter), or
        pieces of the listed sizes, which must add up to the axis's length."""
        (axis,) = normalize_axes(dim, self.ndim)
        length = self.shape[axis]
        if isinstance(split_size_or_sections, (int, np.integer)):
            size = int(split_size_or_sections)
            if size <= 0:
                raise ShapeError(f"split: split_size must be positive, got {size} "
                                 f"(at {user_location()})")
            sizes = [min(size, length - start) for start in range(0, length, size)] or [0]
        else:
            sizes = [int(n) for n in split_size_or_sections]
            if sum(sizes) != length or any(n < 0 for n in sizes):
                raise ShapeError(f"split: sizes {sizes} do not add up to {length}, the length of "
                                 f"axis {axis} of {self.shape} (at {user_location()})")
        starts = np.cumsum([0] + sizes[:-1])
        before = (slice(None),) * axis
        return tuple(self[before + (slice(int(start), int(start) + n),)]
                     for start, n in zip(starts, sizes))

    def chunk(self, chunks: int, dim: int = 0) -> tuple[Tensor, ...]:
        """PyTorch's chunk: at most `chunks` pieces of equal size along `dim` (the last may be
        shorter, and there are fewer when the length does not allow that many)."""
        if chunks <= 0:
            raise ShapeError(f"chunk: chunks must be positive, got {chunks} (at {user_location()})")
        (axis,) = normalize_axes(dim, self.ndim)
        return self.split(max(-(-self.shape[axis] // chunks), 1), axis)

    def masked_fill(self, mask: Any, value: Any) -> Tensor:
        """`value` where `mask` (boolean, broadcasting against the tensor) is True."""
        mask = as_tensor(mask)
        if mask.dtype != "bool":
            raise DTypeError(f"masked_fill: the mask must be bool, got {mask.dtype} "
                             f"(at {user_location()})")
        value = self._fill_value(value, "masked_fill")
        filled = bind("where", mask, value, self)
        if filled.shape != self.shape:
            raise ShapeError(f"masked_fill: mask of shape {mask.shape} does not broadcast to the "
                             f"tensor's shape {self.shape} (at {user_location()})")
        return filled

    # -- PyTorch's method forms of operators and gc functions ---------------------------------
    def add(self, other: Any, *, alpha: Any = 1) -> Tensor:
        return self + self._times_alpha("add", other, alpha)

    def sub(self, other: Any, *, alpha: Any = 1) -> Tensor:
        return self - self._times_alpha("sub", other, alpha)

    def _times_alpha(self, op: str, other: Any, alpha: Any) -> Any:
        """other * alpha in the dtype self op other computes in, as PyTorch's (int32 stays
        int32; bools are not made int64 first); a float alpha of integers refused, as a bool
        alpha of numbers."""
        other = other if _is_number(other) else as_tensor(other)
        dtype = result_dtype(self, other)
        if isinstance(alpha, (bool, np.bool_)) and dtype != "bool":
            raise DTypeError(f"{op}: a bool alpha ({alpha}) takes bool operands, got {dtype}, as in "
                             f"PyTorch (at {user_location()})")
        if not is_float(dtype) and isinstance(alpha, (float, np.floating)):
            raise DTypeError(f"{op}: alpha={alpha!r} is a float, but the operands are {dtype}: as "
                             f"PyTorch, integer tensors take int alphas (at {user_location()})")
        if _is_number(alpha) and alpha == 1:
            return other
        if dtype == "bool":  # bool arithmetic is refused by the operator itself, with its reason
            return other
        other = as_tensor(other).astype(dtype) if not _is_number(other) else other
        return other * (int(alpha) if _is_number(alpha) and not is_float(dtype) else alpha)

    def clone(self) -> Tensor:
        """A copy: writing it in place leaves this tensor as it is (and this one's writes it)."""
        return Tensor(self.value)

    def mul(self, other: Any) -> Tensor: return self * other
    def pow(self, exponent: Any) -> Tensor: return self ** exponent
    def neg(self) -> Tensor: return -self
    negative = neg
    def eq(self, other: Any) -> Tensor: return self == other
    def ne(self, other: Any) -> Tensor: return self != other
    def lt(self, other: Any) -> Tensor: return self < other
    def le(self, other: Any) -> Tensor: return self <= other
    def gt(self, other: Any) -> Tensor: return self > other
    def ge(self, other: Any) -> Tensor: return self >= other
    def sign(self) -> Tensor:
        """PyTorch's sign: -1, 0 or 1, and 0 for NaN (gc.sign, NumPy's, keeps NaN)."""
        signs = bind("sign", self)
        if not is_float(self.dtype):
            return signs
        from .functions import where
        return where(self != self, 0.0, signs)
    def rsqrt(self) -> Tensor: return float_math("rsqrt", self)
    def reciprocal(self) -> Tensor: return float_math("reciprocal", self)
    def log1p(self) -> Tensor: return float_math("log1p", self)
    def clamp_min(self, min: Any) -> Tensor: return self.clamp(min=min)
    def clamp_max(self, max: Any) -> Tensor: return self.clamp(max=max)
    def view_as(self, other: Tensor) -> Tensor: return self.view(other.shape)

    def div(self, other: Any, *, rounding_mode: str | None = None) -> Tensor:
        """self / other; rounding_mode 'floor' or 'trunc' rounds the quotient, integers staying
        integers as in PyTorch."""
        if rounding_mode is None:
            return self / other
        if rounding_mode == "floor":
            return self // other
        if rounding_mode == "trunc":
            x, y = promoted(self, other)
            if is_float(x.dtype):
                return (x / y).trunc()
            # the floor quotient, one up where it was rounded down past zero: exact in the
            # integers (a float64 quotient loses the last digits beyond 2**53)
            floor = x // y  # (x // 0 is 0 in graphc, and so is the truncated quotient)
            return floor + ((floor * y != x) & ((x < 0) != (y < 0)) & (y != 0)).astype(x.dtype)
        raise GraphcError(f"div: rounding_mode must be None, 'floor' or 'trunc', not "
                          f"{rounding_mode!r} (at {user_location()})")

    def matmul(self, other: Any) -> Tensor: return self @ other

    def mm(self, mat2: Any) -> Tensor:
        mat2 = as_tensor(mat2, like=self)
        if self.ndim != 2 or mat2.ndim != 2:
            raise ShapeError(f"mm: both operands must be 2-D, got shapes {self.shape} and "
                             f"{mat2.shape} (at {user_location()})")
        return self @ mat2

    def bmm(self, mat2: Any) -> Tensor:
        mat2 = as_tensor(mat2, like=self)
        if self.ndim != 3 or mat2.ndim != 3 or self.shape[0] != mat2.shape[0]:
            raise ShapeError(f"bmm: both operands must be 3-D with the same batch, got shapes "
                             f"{self.shape} and {mat2.shape} (at {user_location()})")
        return self @ mat2

    def addmm(self, mat1: Any, mat2: Any, *, beta: float = 1, alpha: float = 1) -> Tensor:
        """PyTorch's: beta * self + alpha * (mat1 @ mat2), self broadcast to the product."""
        return _scaled_sum(self, as_tensor(mat1, like=self).mm(mat2), beta, alpha)

    def baddbmm(self, batch1: Any, batch2: Any, *, beta: float = 1, alpha: float = 1) -> Tensor:
        """PyTorch's: beta * self + alpha * (batch1 @ batch2), batched products."""
        return _scaled_sum(self, as_tensor(batch1, like=self).bmm(batch2), beta, alpha)

    def where(self, condition: Any, other: Any) -> Tensor:
        """PyTorch's x.where(condition, y): x where condition holds, else y."""
        from .functions import where
        return where(condition, self, other)

    def maximum(self, other: Any) -> Tensor:
        from .functions import maximum
        return maximum(self, other)

    def minimum(self, other: Any) -> Tensor:
        from .functions import minimum
        return minimum(self, other)

    def lerp(self, end: Any, weight: Any) -> Tensor:
        from .functions import lerp
        return lerp(self, end, weight)

    def addcmul(self, tensor1: Any, tensor2: Any, *, value: Any = 1) -> Tensor:
        return self + _scaled(as_tensor(tensor1, like=self) * tensor2, value)

    def addcdiv(self, tensor1: Any, tensor2: Any, *, value: Any = 1) -> Tensor:
        return self + _scaled(as_tensor(tensor1, like=self) / tensor2, value)

    def new_full(self, size: Sequence[int], fill_value: Any, *, dtype: Any = None,
                 device: Any = None) -> Tensor:
        """A tensor of `size` holding `fill_value`, of this tensor's dtype unless `dtype` says."""
        from .functions import zeros
        del device
        like = zeros(tuple(size), dtype=dtype or self.dtype)
        # a tensor of its own (written in place, as a buffer filled row by row), not an expanded view
        return like._fill_value(fill_value, "new_full").broadcast_to(like.shape).clone()

    def new_zeros(self, *size: Any, dtype: Any = None, device: Any = None) -> Tensor:
        from .functions import _shape_argument
        return self.new_full(_shape_argument(size), 0, dtype=dtype, device=device)

    def new_ones(self, *size: Any, dtype: Any = None, device: Any = None) -> Tensor:
        from .functions import _shape_argument
        return self.new_full(_shape_argument(size), 1, dtype=dtype, device=device)

    new_empty = new_zeros  # traced values are never uninitialised

    def new_tensor(self, data: Any, *, dtype: Any = None, device: Any = None) -> Tensor:
        del device
        return as_tensor(np.asarray(data, dtype=dtype_name(dtype or self.dtype)))

    def unflatten(self, dim: int, sizes: Sequence[int]) -> Tensor:
        """The axis `dim` split into `sizes` (one of them may be -1)."""
        from .functions import _axis
        axis = _axis(self, dim, "unflatten")
        if any(isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) for n in sizes):
            raise TypeError(f"unflatten: sizes must be ints, got {tuple(sizes)} (at {user_location()})")
        sizes = [int(n) for n in sizes]
        if sizes.count(-1) == 1:  # worked out from the axis alone: other axes may be empty
            known = math.prod(n for n in sizes if n != -1)
            if known == 0 or self.shape[axis] % known:
                raise ShapeError(f"unflatten: sizes {tuple(sizes)} do not split axis {axis} of "
                                 f"length {self.shape[axis]} (at {user_location()})")
            sizes[sizes.index(-1)] = self.shape[axis] // known
        if math.prod(sizes) != self.shape[axis] or any(n < 0 for n in sizes):
            raise ShapeError(f"unflatten: sizes {tuple(sizes)} do not split axis {axis} of length "
                             f"{self.shape[axis]} (at {user_location()})")
        return self.view(*self.shape[:axis], *sizes, *self.shape[axis + 1:])  # always a view

    def isnan(self) -> Tensor:
        from .functions import isnan
        return isnan(self)

    def isinf(self) -> Tensor:
        from .functions import isinf
        return isinf(self)

    def isfinite(self) -> Tensor:
        from .functions import isfinite
        return isfinite(self)

    def logical_not(self) -> Tensor:
        from .functions import logical_not
        return logical_not(self)

    def logical_and(self, other: Any) -> Tensor:
        from .functions import logical_and
        return logical_and(self, other)

    def logical_or(self, other: Any) -> Tensor:
        from .functions import logical_or
        return logical_or(self, other)

    def logical_xor(self, other: Any) -> Tensor:
        from .functions import logical_xor
        return logical_xor(self, other)

    def index_select(self, dim: int, index: Any) -> Tensor:
        from .functions import index_select
        return index_select(self, dim, index)

    def narrow(self, dim: int, start: int, length: int) -> Tensor:
        from .functions import narrow
        return narrow(self, dim, start, length)

    def select(self, dim: int, index: int) -> Tensor:
        from .functions import select
        return select(self, dim, index)

    def unbind(self, dim: int = 0) -> tuple[Tensor, ...]:
        from .functions import unbind
        return unbind(self, dim)

    def roll(self, shifts: int | Sequence[int], dims: int | Sequence[int] | None = None) -> Tensor:
        from .functions import roll
        return roll(self, shifts, dims)

    def repeat_interleave(self, repeats: int, dim: int | None = None) -> Tensor:
        from .functions import repeat_interleave
        return repeat_interleave(self, repeats, dim)

    def outer(self, vec2: Any) -> Tensor:
        from .functions import outer
        return outer(self, vec2)

    # PyTorch's in-place methods, written as the in-place operators are (see _in_place)
    def add_(self, other: Any, *, alpha: Any = 1) -> Tensor:
        return self._in_place(self.add(other, alpha=alpha), "x.add_(y)", "x.add(y)")

    def sub_(self, other: Any, *, alpha: Any = 1) -> Tensor:
        return self._in_place(self.sub(other, alpha=alpha), "x.sub_(y)", "x.sub(y)")

    def mul_(self, other: Any) -> Tensor:
        return self._in_place(self * other, "x.mul_(y)", "x.mul(y)")

    def div_(self, other: Any, *, rounding_mode: str | None = None) -> Tensor:
        return self._in_place(self.div(other, rounding_mode=rounding_mode), "x.div_(y)", "x.div(y)")

    def clamp_(self, min: Any = None, max: Any = None) -> Tensor:
        return self._in_place(self.clamp(min, max), "x.clamp_(...)", "x.clamp(...)")

    def relu_(self) -> Tensor:
        return self._in_place(self.relu(), "x.relu_()", "x.relu()")

    def masked_fill_(self, mask: Any, value: Any) -> Tensor:
        return self._in_place(self.masked_fill(mask, value), "x.masked_fill_(mask, v)",
                              "x.masked_fill(mask, v)")

    def _fill_value(self, value: Any, op: str) -> Tensor:
        """`value` (a number or 0-d tensor) in this tensor's dtype, cast as PyTorch's fills cast
        it (2.7 into an int tensor is 2)."""
        if isinstance(value, (bool, int, np.bool_, np.integer)):
            value = as_tensor(value, like=self)  # an int that does not fit is refused, as PyTorch
        elif not isinstance(value, Tensor):
            value = as_tensor(np.asarray(value))
        if value.ndim:
            raise ShapeError(f"{op}: the value must be a number or a 0-d tensor, got shape "
                             f"{value.shape} (at {user_location()})")
        return value.astype(self.dtype)

    def fill_(self, value: Any) -> Tensor:
        return self._in_place(self._fill_value(value, "fill_").broadcast_to(self.shape),
                              "x.fill_(v)", "gc.full_like(x, v)")

    def zero_(self) -> Tensor:
        return self.fill_(0)

    def copy_(self, source: Any) -> Tensor:
        """This tensor's entries set to `source`'s (broadcast to its shape, cast to its dtype)."""
        source = as_tensor(source, like=self)
        try:
            copied = source.astype(self.dtype).broadcast_to(self.shape)
        except ShapeError:
            raise ShapeError(f"copy_: a source of shape {source.shape} does not broadcast to "
                             f"{self.shape} (at {user_location()})") from None
        return self._in_place(copied, "x.copy_(y)", "y")

    def __getitem__(self, index: Any) -> Tensor:
        from .indexing import getitem, setitem, view_strides  # they build on Tensor
        out = getitem(self, index)
        strides = view_strides(self, index)
        if strides is None:  # integer arrays and masks copy, in PyTorch too
            return out
        return self._viewing(out, lambda base: getitem(base, index), lambda view: setitem(self, index, view),
                             strides)

    def __setitem__(self, index: Any, value: Any) -> None:
        """`x[index] = value` as a functional update: the Tensor takes a new value that equals
        `value` in the indexed region and the old one elsewhere (gradients flow to both). Where
        PyTorch's x is a view of another tensor (sliced, transposed, reshaped from it), that
        tensor is written too; a tensor sliced from x earlier keeps its value. Where an
        integer-array index names a position twice, the last value written there stays, as in
        NumPy and PyTorch (`x[[1, 1]] += 1` adds 1)."""
        from .indexing import setitem
        self.take_value(setitem(self, index, value), "x[index] = value")

    def take_value(self, new: Tensor, how: str, through_view: bool = False) -> None:
        """Give this Tensor object `new`'s value (an in-place write: `how`), and the tensor it is
        PyTorch's view of its part of it, unless it stands for a module's parameter or buffer:
        the write would change this trace's Tensor and never the module, so it is refused."""
        if is_tracing():
            if not current_trace().defines(self.value):
                raise GraphcError(
                    f"{how} writes a tensor of an enclosing traced function (this one runs inside "
                    f"its gc.jit or gc.grad): a function traced inside another can read its tensors "
                    f"but not write them; return the new value instead (at {user_location()})")
            if current_trace().made_before_the_body(self.value):
                raise GraphcError(
                    f"{how} inside a gc.scan body writes a tensor from outside the body: the loop "
                    f"would compute the write once, not at every step. Carry the tensor through "
                    f"the loop instead (f(carry, x) returns its new value in the carry) "
                    f"(at {user_location()})")
            for inp in current_trace().builder.graph.inputs:
                if inp.value is self.value and inp.role in ("param", "state"):
                    raise GraphcError(
                        f"{how}: {inp.name} is a module's parameter or buffer, which an in-place write "
                        f"in traced code would not change: update a buffer with "
                        f"self.update_buffer(name, value), or compute with a changed copy "
                        f"(w = self.weight * mask) (at {user_location()})")
        view = self._view
        # An expanded view (expand, broadcast_to) shows one element of its base several times:
        # only filling it writes every copy alike (`through_view`: a view of it written instead)
        if view is not None and (how != "x.fill_(v)" or through_view) and any(
                stride == 0 and n > 1 for n, stride in zip(self.shape, view.strides)):
            raise GraphcError(
                f"{how}: the tensor written is, or is part of, an expanded view (expand, expand_as, "
                f"broadcast_to), several of whose elements are one element of the tensor it views: "
                f"graphc refuses the write (PyTorch refuses most such writes too); write into a copy "
                f"(.clone()), or fill_ the expanded view itself (at {user_location()})")
        if view is not None:  # the base first: a refused write changes nothing
            view.base.take_value(view.write_back(new), how, through_view=True)
            self._view = view._replace(seen=view.base.value)
        self._value = new.value

    # -- NumPy and PyTorch functions called on a Tensor (see graphc/interop.py) --------------
    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Tensor:
        from . import interop
        return interop.array_ufunc(ufunc, method, inputs, kwargs)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        from . import interop
        return interop.array_function(func, args, kwargs)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        from . import interop
        return interop.torch_function(func)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """NumPy matmul semantics, 1-D operands included (promoted, then squeezed)."""
    if a.ndim == 0 or b.ndim == 0:
        raise ShapeError(f"matmul: operands must have at least one dimension, got {a.shape} and "
                         f"{b.shape} (at {user_location()})")
    a_vector, b_vector = a.ndim == 1, b.ndim == 1
    out = bind("matmul", a.reshape(1, -1) if a_vector else a, b.reshape(-1, 1) if b_vector else b)
    if b_vector:
        out = out.squeeze(-1)
    if a_vector:
        out = out.squeeze(-1 if b_vector else -2)
    return out
