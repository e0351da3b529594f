"""The gate between code generation and the interpreter: generated kernel source is checked
here before it is written to disk and imported.

Code generators paste identifiers and literals into source text. graphc makes every one of
them itself (from op names in the registry, attributes validated against their schemas, and
counters), and the loaders refuse anything else; this module checks the result independently,
so that a string that slipped through anyway (a hostile kernel name, a dtype that is not one)
cannot become code. The source is parsed, not pattern-matched, and every part of it must be
of a kind graphc generates:

- statements and expressions from a fixed set (no classes, lambdas, `with`, `try`, `global`,
  comprehensions or f-strings);
- identifiers ASCII, not starting with `_` (no dunder escapes such as `__class__`), at most
  128 characters; every name read is bound in the module or is one of a few builtins;
- imports of NumPy, math, Numba and graphc's own backends only;
- at module level, only imports, constant assignments and decorated functions whose decorators
  are Numba's (nothing else runs when the module is imported);
- literals: numbers, booleans, None, docstrings, and short lowercase words (Numba options).
"""
from __future__ import annotations

import ast
import re

from graphc.ir.errors import GraphcError

_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,127}\Z")
_WORD = re.compile(r"[a-z][a-z_]{0,31}\Z")
_MODULES = re.compile(r"(numpy|math|numba|numba\.cuda|graphc\.backends(\.[a-z][a-z0-9_]*)+)\Z")
_BUILTINS = frozenset({"range", "min", "max", "abs", "len", "int", "float", "bool", "round",
                       "True", "False", "None"})

_NODES = tuple(getattr(ast, name) for name in (
    # structure
    "Module", "FunctionDef", "arguments", "arg", "keyword", "alias", "Import", "ImportFrom",
    "Return", "Assign", "AugAssign", "AnnAssign", "Expr", "For", "While", "If", "Break",
    "Continue", "Pass",
    # expressions
    "BinOp", "UnaryOp", "BoolOp", "Compare", "IfExp", "Call", "Constant", "Name", "Attribute",
    "Subscript", "Slice", "Tuple", "List", "Set", "Load", "Store",
    # operators
    "Add", "Sub", "Mult", "Div", "FloorDiv", "Mod", "Pow", "MatMult", "LShift", "RShift",
    "BitOr", "BitXor", "BitAnd", "USub", "UAdd", "Not", "Invert", "And", "Or", "Eq", "NotEq",
    "Lt", "LtE", "Gt", "GtE", "Is", "IsNot", "In", "NotIn"))


class UnsafeSourceError(GraphcError):
    """Generated source holding something graphc does not generate: refused, never run."""


def identifier(name: str) -> str:
    """`name` if it is an identifier graphc may paste into source; UnsafeSourceError if not."""
    if not isinstance(name, str) or not name.isidentifier() or not _IDENTIFIER.match(name):
        raise UnsafeSourceError(f"refusing to generate source with the identifier {name!r:.80}: "
                                "graphc only pastes ASCII identifiers it made itself")
    return name


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _docstrings(tree: ast.Module) -> set[int]:
    """ids of the Constant nodes that are docstrings (of the module or of a function)."""
    ids = set()
    for scope in [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))]:
        first = scope.body[0] if scope.body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                and isinstance(first.value.value, str):
            ids.add(id(first.value))
    return ids


def _numba_names(tree: ast.Module) -> set[str]:
    """The names the module imports from Numba (its decorators must be among them)."""
    names = set()
    for stmt in tree.body:
        if isinstance(stmt, ast.ImportFrom) and stmt.module.split(".")[0] == "numba":
            names.update(a.asname or a.name for a in stmt.names)
        elif isinstance(stmt, ast.Import):
            names.update(a.asname or a.name for a in stmt.names if a.name.split(".")[0] == "numba")
    return names


_CONSTANT_EXPRESSION = (ast.Constant, ast.Tuple, ast.Set, ast.List, ast.UnaryOp, ast.USub,
                        ast.UAdd, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Load)


def _check_module_level(tree: ast.Module, docstrings: set[int]) -> None:
    """Only what runs harmlessly at import: imports, constants, Numba-decorated functions."""
    numba_names = _numba_names(tree)
    for stmt in tree.body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(stmt, ast.Expr) and id(stmt.value) in docstrings:
            continue
        if isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets) \
                and all(isinstance(n, _CONSTANT_EXPRESSION) for n in ast.walk(stmt.value)):
            continue
        if isinstance(stmt, ast.FunctionDef):
            args = stmt.args
            if args.defaults or args.kw_defaults or stmt.returns is not None:
                raise UnsafeSourceError(f"function {stmt.name}: default values or annotations run "
                                        "at import; graphc generates neither")
            for decorator in stmt.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                path = _dotted(target) or ""
                if path.split(".")[0] not in numba_names or path.split(".")[-1] not in ("jit", "njit"):
                    raise UnsafeSourceError(f"function {stmt.name}: decorator {ast.unparse(target)!r:.60} "
                                            "is not Numba's jit")
            continue
        raise UnsafeSourceError(f"line {stmt.lineno}: a module-level {type(stmt).__name__} "
                                "statement (graphc generates imports, constants and functions only)")


def check_source(source: str) -> None:
    """Raise UnsafeSourceError unless every part of `source` is of a kind graphc generates
    (see the module docstring). Called wherever generated source is written."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as exc:
        raise UnsafeSourceError(f"generated source does not parse ({exc})") from None
    docstrings = _docstrings(tree)
    bound: set[str] = set()
    read: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if not isinstance(node, _NODES):
            raise UnsafeSourceError(f"line {getattr(node, 'lineno', '?')}: {type(node).__name__} "
                                    "is not a construct graphc generates")
        if isinstance(node, ast.Name):
            identifier(node.id)
            if isinstance(node.ctx, ast.Store):
                bound.add(node.id)
            else:
                read.append((node.id, node.lineno))
        elif isinstance(node, ast.FunctionDef):
            bound.add(identifier(node.name))
        elif isinstance(node, ast.arg):
            bound.add(identifier(node.arg))
        elif isinstance(node, ast.Attribute):
            identifier(node.attr)
        elif isinstance(node, ast.keyword):
            identifier(node.arg)  # None (a **mapping) is refused too
        elif isinstance(node, ast.alias):
            bound.add(identifier((node.asname or node.name).split(".")[0]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                _check_module(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level or node.module is None:
                raise UnsafeSourceError("relative imports are not generated by graphc")
            _check_module(node.module)
        elif isinstance(node, ast.Constant):
            _check_literal(node, docstrings)
    _check_module_level(tree, docstrings)
    for name, line in read:
        if name not in bound and name not in _BUILTINS:
            raise UnsafeSourceError(f"line {line}: the name {name!r} is neither defined in the "
                                    "generated module nor a builtin graphc uses")


def _check_module(name: str) -> None:
    if not _MODULES.match(name):
        raise UnsafeSourceError(f"generated source imports {name!r:.80}; graphc's kernels import "
                                "numpy, math, numba and graphc.backends only")


def _check_literal(node: ast.Constant, docstrings: set[int]) -> None:
    value = node.value
    if value is None or value is Ellipsis or isinstance(value, (bool, int, float)):
        return
    if isinstance(value, str) and (id(node) in docstrings or _WORD.match(value)):
        return
    raise UnsafeSourceError(f"line {node.lineno}: the literal {value!r:.80} is not one graphc "
                            "generates (numbers, booleans, docstrings and option words only)")
