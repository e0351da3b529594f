"""Checking call arguments against a compiled graph's input signature, before any kernel runs."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from graphc.ir import Graph, InputError, TensorType


class InputSignature:
    """A compiled graph's inputs: `prepare` checks a call's arguments against them, converting
    only where it is lossless, before any kernel runs. Built once per executable, so that the
    common case (every argument already right) costs a few comparisons per input.

    Donated inputs are updated in place, so they must already be exactly right: the caller's
    own array, of the right dtype, C-contiguous and writeable.
    """

    def __init__(self, graph: Graph, donated: Sequence[int] = ()) -> None:
        self.graph = graph
        self.donated = frozenset(donated)
        self._expected = [(inp.value.type.np_dtype, inp.value.type.shape, index in self.donated)
                          for index, inp in enumerate(graph.inputs)]
        self._donated_order = sorted(self.donated)
        self._kept_order = [i for i in range(len(graph.inputs)) if i not in self.donated]
        # (the donated arrays of the last call, the ids of the objects owning their memory)
        self._donated_owners: tuple[list[np.ndarray], set[int]] | None = None

    def prepare(self, args: Sequence[Any]) -> list[np.ndarray]:
        """One C-contiguous array per graph input."""
        if len(args) != len(self._expected):
            names = ", ".join(i.name for i in self.graph.inputs)
            raise InputError(f"{self.graph.name}: expected {len(self._expected)} inputs ({names}), "
                             f"got {len(args)}")
        arrays = []
        for index, ((dtype, shape, donated), arg) in enumerate(zip(self._expected, args)):
            if (type(arg) is np.ndarray and arg.dtype == dtype and arg.shape == shape
                    and arg.flags.c_contiguous and (not donated or arg.flags.writeable)):
                arrays.append(arg)  # already right: the common case, checked first as it is cheap
            else:
                arrays.append(self._converted(index, arg))
        if self.donated:
            self._copy_inputs_over_donated(arrays)
        return arrays

    def _copy_inputs_over_donated(self, arrays: list[np.ndarray]) -> None:
        """Copy each input over a donated array's memory (a batch that is a weight, or a view of
        one): the kernels may write the new weight over it before their last read of it. The
        donated arrays' owners are looked up again only when other arrays are donated (a
        training step donates the same ones every call). An input whose memory NumPy does not
        own (as_strided, a torch tensor's, ctypes') has no owner to compare: its bounds are."""
        donated = [arrays[k] for k in self._donated_order]
        seen = self._donated_owners
        if seen is None or any(a is not b for a, b in zip(seen[0], donated)):
            seen = self._donated_owners = (donated, {id(_owner(a)) for a in donated})
        for index in self._kept_order:
            owner = _owner(arrays[index])
            if id(owner) in seen[1] or (not isinstance(owner, np.ndarray) and any(
                    np.may_share_memory(arrays[index], d) for d in donated)):
                arrays[index] = arrays[index].copy()

    def spared(self, args: Sequence[Any]) -> list[Any]:
        """`args` with copies of the donated ones: calls on them leave the caller's arrays as
        they are (a profile of a training step must not train it)."""
        return [np.array(arg, copy=True) if index in self.donated else arg
                for index, arg in enumerate(args)]

    def _converted(self, index: int, arg: Any) -> np.ndarray:
        inp = self.graph.inputs[index]
        return as_input(f"{self.graph.name}: input {inp.name!r}", inp.value.type, arg,
                        index in self.donated)


def _owner(array: np.ndarray) -> Any:
    """The object whose memory `array` views: the array owning it, or the buffer (bytes, an
    mmap) NumPy views."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array if array.base is None else array.base


def host_array(value: Any) -> np.ndarray:
    """np.asarray(value), a torch tensor detached first (NumPy cannot read one that requires
    grad)."""
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def as_input(where: str, expected: TensorType, arg: Any, donated: bool = False) -> np.ndarray:
    """`arg` as a C-contiguous array of type `expected`, converted only where that is lossless;
    else an InputError beginning with `where` (the graph and input) that says what to fix."""
    try:
        arr = arg if isinstance(arg, np.ndarray) else host_array(arg)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{where}: cannot be read as an array ({exc})") from None
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{where}: expected {expected}, got an array of dtype {arr.dtype} "
                         "(graphc takes numeric or bool arrays only)")
    if arr.shape != expected.shape:
        raise InputError(f"{where}: expected shape {expected.shape} ({expected}), got {arr.shape}")
    if arr.dtype != expected.np_dtype:
        lossless = np.can_cast(arr.dtype, expected.np_dtype, "safe") or (
            not isinstance(arg, np.ndarray) and np.array_equal(arr.astype(expected.np_dtype), arr))
        if not lossless or donated:
            raise InputError(f"{where}: expected dtype {expected.dtype}, got {arr.dtype}; "
                             f"convert it with .astype(np.{expected.dtype})")
        arr = arr.astype(expected.np_dtype)
    if donated:
        if not (arr.flags.c_contiguous and arr.flags.writeable):
            raise InputError(f"{where}: a donated (updated in place) input must be a "
                             "C-contiguous, writeable array")
    elif not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return arr


def prepare_inputs(graph: Graph, args: Sequence[Any], donated: Sequence[int] = ()) -> list[np.ndarray]:
    """`InputSignature(graph, donated).prepare(args)`, for a single call."""
    return InputSignature(graph, donated).prepare(args)


def store_donated(arrays: list[np.ndarray], results: list[np.ndarray], donate: dict[int, int]) -> None:
    """Write results[o] into the buffer of each donated input arrays[i] (donate: i -> o), which
    then stands for that result. A result in another donated input's memory (outputs that swap
    two inputs) is copied first: that buffer may be written before the result is read."""
    def owner(array: np.ndarray) -> int:
        return id(array if array.base is None else array.base)
    buffers = {owner(arrays[i]): i for i in donate}
    for i, o in donate.items():
        if buffers.get(owner(results[o]), i) != i:
            results[o] = results[o].copy()
    for i, o in donate.items():
        if results[o] is not arrays[i]:  # else written in place already
            np.copyto(arrays[i], results[o])
        results[o] = arrays[i]


def unaliased(results: list[np.ndarray], inputs: list[np.ndarray], donated: set[int]) -> list[np.ndarray]:
    """`results` made arrays of their own (copied where needed), as every backend returns them:
    none in an input's memory (an input returned as it is, a view of one, a module's weight),
    none in an earlier result's (one value returned twice). Donated results (positions in
    `donated`) are their inputs' buffers by design and stay so."""
    held = list(inputs)
    for j, out in enumerate(results):
        if j not in donated and any(np.may_share_memory(out, a) for a in held):
            results[j] = out = np.array(out)
        held.append(out)
    return results
