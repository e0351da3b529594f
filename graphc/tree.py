"""Pytrees: nested tuples (namedtuples keep their class), lists and dicts of leaves, flattened
in a stable order."""
from __future__ import annotations

from collections import OrderedDict, namedtuple
from typing import Any, Callable


class TreeDef:
    """The structure of a pytree with its leaves taken out. Hashable and comparable."""

    __slots__ = ("kind", "meta", "children")

    def __init__(self, kind: str, meta: Any = None, children: tuple[TreeDef, ...] = ()) -> None:
        self.kind, self.meta, self.children = kind, meta, children

    def _key(self) -> tuple:
        return (self.kind, self.meta, self.children)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TreeDef) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @property
    def num_leaves(self) -> int:
        return 1 if self.kind == "leaf" else sum(c.num_leaves for c in self.children)

    def __repr__(self) -> str:
        return f"TreeDef({self.kind}, {self.meta!r}, {list(self.children)})"


LEAF = TreeDef("leaf")


def _is_number_list(tree: Any) -> bool:
    """A (possibly nested, possibly ragged) list of plain numbers: array data, not a pytree."""
    return isinstance(tree, list) and bool(tree) and all(
        isinstance(x, (bool, int, float, complex)) or _is_number_list(x) for x in tree)


def flatten(tree: Any, path: str = "", is_leaf: Callable[[Any], bool] | None = None
            ) -> tuple[list[Any], list[str], TreeDef]:
    """Return (leaves, their paths like "x[0]['w']", structure). A dict's leaves come in the
    order of its sorted keys; the structure keeps the keys' own order and an OrderedDict's class,
    so `unflatten` gives back the dict the function returned (`a, b = out.values()` reads them
    in the order written).

    Tuples, dicts and lists of arrays are containers; a list of plain numbers is one leaf
    (array data), so a ragged one is reported as a bad array rather than silently split."""
    if (is_leaf is not None and is_leaf(tree)) or _is_number_list(tree):
        return [tree], [path], LEAF
    if isinstance(tree, (tuple, list)):
        named = _is_namedtuple(tree)
        leaves, paths, children = [], [], []
        for i, child in enumerate(tree):
            l, p, c = flatten(child, f"{path}.{tree._fields[i]}" if named else f"{path}[{i}]", is_leaf)
            leaves += l
            paths += p
            children.append(c)
        if named:  # rebuilt as its own class: the function reads its fields by name
            return leaves, paths, TreeDef("namedtuple", type(tree), tuple(children))
        return leaves, paths, TreeDef("tuple" if isinstance(tree, tuple) else "list", len(tree),
                                      tuple(children))
    if isinstance(tree, dict):
        try:
            keys = sorted(tree)
        except TypeError:  # keys of several types ({1: x, "a": y}): by type, then as written
            keys = sorted(tree, key=lambda k: (type(k).__qualname__, repr(k)))
        leaves, paths, children = [], [], []
        for k in keys:
            l, p, c = flatten(tree[k], f"{path}[{k!r}]", is_leaf)
            leaves += l
            paths += p
            children.append(c)
        kind = type(tree) if type(tree) is OrderedDict else dict
        # the keys' types too: {1: x} and {1.0: x} (equal keys) are other structures
        types = tuple(type(k) for k in keys)
        return leaves, paths, TreeDef("dict", (tuple(keys), tuple(tree), kind, types), tuple(children))
    if tree is None:
        return [], [], TreeDef("none")
    return [tree], [path], LEAF


def _is_namedtuple(tree: Any) -> bool:
    return isinstance(tree, tuple) and hasattr(type(tree), "_fields") and hasattr(type(tree), "_make")


def unflatten(treedef: TreeDef, leaves: list[Any]) -> Any:
    it = iter(leaves)

    def build(d: TreeDef) -> Any:
        if d.kind == "leaf":
            return next(it)
        if d.kind == "none":
            return None
        items = [build(c) for c in d.children]
        if d.kind == "dict":
            sorted_keys, written_order, kind, _ = d.meta
            by_key = dict(zip(sorted_keys, items))
            return kind((k, by_key[k]) for k in written_order)
        if d.kind == "namedtuple":
            return d.meta._make(items)
        return tuple(items) if d.kind == "tuple" else list(items)

    result = build(treedef)
    return result


def treedef_to_json(treedef: TreeDef) -> Any:
    """`treedef` as JSON: 0 a leaf, null None, {"tuple": [...]}, {"list": [...]},
    {"dict": {key: ...}} or {"namedtuple": {"name": ..., "fields": [...], "items": [...]}} (its
    class's name and fields, rebuilt as a namedtuple of those on load); None where a dict has
    a key JSON cannot keep (not a str)."""
    if treedef.kind == "leaf":
        return 0
    if treedef.kind == "none":
        return None
    children = [treedef_to_json(c) for c in treedef.children]
    if any(c is None and d.kind != "none" for c, d in zip(children, treedef.children)):
        return None
    if treedef.kind == "namedtuple":
        return {"namedtuple": {"name": treedef.meta.__name__, "fields": list(treedef.meta._fields),
                               "items": children}}
    if treedef.kind == "dict":
        sorted_keys, written_order, kind, _ = treedef.meta
        if not all(isinstance(k, str) for k in sorted_keys):
            return None
        # the keys' order apart: a file's JSON may be written with its keys sorted
        return {"dict": dict(zip(sorted_keys, children)), "order": list(written_order),
                **({"ordered": True} if kind is OrderedDict else {})}
    return {treedef.kind: children}


def treedef_from_json(data: Any, depth: int = 32) -> TreeDef:
    """The TreeDef `treedef_to_json` wrote; ValueError for anything else (a file is untrusted)."""
    if depth == 0:
        raise ValueError("nested too deeply")
    if data == 0 and type(data) is int:
        return LEAF
    if data is None:
        return TreeDef("none")
    if isinstance(data, dict) and "dict" in data and set(data) <= {"dict", "order", "ordered"}:
        return _dict_from_json(data, depth)
    if not isinstance(data, dict) or len(data) != 1:
        raise ValueError(f"not a tree: {data!r:.60}")
    ((kind, children),) = data.items()
    if kind in ("tuple", "list") and isinstance(children, list):
        nodes = tuple(treedef_from_json(c, depth - 1) for c in children)
        return TreeDef(kind, len(nodes), nodes)
    if kind == "namedtuple" and isinstance(children, dict):
        cls = _namedtuple_class(children)
        items = children.get("items")
        if not isinstance(items, list) or len(items) != len(cls._fields):
            raise ValueError(f"not a tree: {data!r:.60}")
        return TreeDef("namedtuple", cls, tuple(treedef_from_json(c, depth - 1) for c in items))
    raise ValueError(f"not a tree: {data!r:.60}")


def _dict_from_json(data: dict, depth: int) -> TreeDef:
    """A dict's TreeDef from {"dict": {key: ...}, "order": [keys], "ordered": true}; files
    written before the order was kept have the keys alone (sorted)."""
    children = data["dict"]
    if not isinstance(children, dict):
        raise ValueError(f"not a tree: {data!r:.60}")
    keys = tuple(sorted(children))
    order = data.get("order", list(keys))
    if (not isinstance(order, list) or not all(isinstance(k, str) for k in order)
            or sorted(order) != list(keys)):
        raise ValueError(f"a dict's key order {order!r:.60} does not hold its keys {list(keys)!r:.60}")
    kind = OrderedDict if data.get("ordered") is True else dict
    return TreeDef("dict", (keys, tuple(order), kind, (str,) * len(keys)),
                   tuple(treedef_from_json(children[k], depth - 1) for k in keys))


def _namedtuple_class(data: dict) -> type:
    """A namedtuple class of the name and fields a file gives, which must be identifiers
    (namedtuple checks them too: no code can hide in them)."""
    name, fields = data.get("name"), data.get("fields")
    valid = (isinstance(name, str) and name.isidentifier() and len(name) <= 100
             and isinstance(fields, list) and len(fields) <= 1000
             and all(isinstance(f, str) and f.isidentifier() and len(f) <= 100 for f in fields))
    if not valid:
        raise ValueError(f"not a namedtuple's name and fields: {data!r:.60}")
    try:  # rename: fields PyTorch-style code renamed (`_1`) come back as they were written
        return namedtuple(name, fields, rename=True)
    except ValueError as error:  # a keyword as the name (fields are renamed instead)
        raise ValueError(f"not a namedtuple's name and fields: {error}") from None
