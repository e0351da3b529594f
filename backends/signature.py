"""Checking call arguments against a compiled graph's input signature, before any kernel runs."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from graphc.ir import Graph, InputError


def prepare_inputs(graph: Graph, args: Sequence[Any], donated: Sequence[int] = ()) -> list[np.ndarray]:
    """Return one C-contiguous array per graph input, converting only where it is lossless.

    Donated inputs are updated in place, so they must already be exactly right: the caller's
    own array, of the right dtype, C-contiguous and writeable.
    """
    if len(args) != len(graph.inputs):
        names = ", ".join(i.name for i in graph.inputs)
        raise InputError(f"{graph.name}: expected {len(graph.inputs)} inputs ({names}), got {len(args)}")
    arrays = []
    for index, (inp, arg) in enumerate(zip(graph.inputs, args)):
        expected = inp.value.type
        if (type(arg) is np.ndarray and arg.dtype == expected.np_dtype and arg.shape == expected.shape
                and arg.flags.c_contiguous and (arg.flags.writeable or index not in donated)):
            arrays.append(arg)  # already right: the common case, checked first as it is cheap
            continue
        where = f"{graph.name}: input {inp.name!r}"
        try:
            arr = arg if isinstance(arg, np.ndarray) else np.asarray(arg)
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
            if not lossless or index in donated:
                raise InputError(f"{where}: expected dtype {expected.dtype}, got {arr.dtype}; "
                                 f"convert it with .astype(np.{expected.dtype})")
            arr = arr.astype(expected.np_dtype)
        if index in donated:
            if not (arr.flags.c_contiguous and arr.flags.writeable):
                raise InputError(f"{where}: a donated (updated in place) input must be a "
                                 "C-contiguous, writeable array")
        elif not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        arrays.append(arr)
    return arrays
