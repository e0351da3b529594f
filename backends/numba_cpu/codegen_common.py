"""Pieces every Numba CPU code generator shares: the kernel record, the module header, the
decorators and loop headers (writing source itself is backends/kernels/source.py).

Generated kernels are whole Python modules (``import numpy as np``, one ``@njit`` entry
function, inlined helpers), so they can live in the on-disk cache as ordinary files. They are
generic over shapes: loop extents are arguments or read from the arrays, never baked in, so one
compiled kernel serves every batch size; so are a slice's offsets. Only the structure (broadcast
pattern, attributes, dtypes) is part of the source and therefore of the cache key, with two
exceptions: whether a loop runs in parallel depends on its size and the thread count
(`runs_parallel`; a smaller batch reuses the parallel variant a larger one compiled, see
`always_parallel`), and axes of extent 1 read alike whether broadcast or not, so they are
collapsed and hoisted: a batch of one compiles some kernels of its own.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numba
import numpy as np
from graphc.ir import TensorType
from graphc.backends.kernels.arrays import KernelArray
from graphc.backends.kernels.pointwise import KernelTarget
from graphc.backends.kernels.source import Writer

# This backend's name in the lowering registry (ir/lowering.py).
TARGET = "numba-cpu"
# fastmath without 'nnan'/'ninf': FMA contraction and reassociation (vectorised reductions),
# but NaN and inf keep their IEEE meaning, as in the reference (log(0) = -inf, relu(nan) = nan).
# Nor 'arcp': it lets LLVM turn 1/sqrt(x) into an rsqrt estimate, NaN at 0 and inf. Nor 'afn':
# it lets LLVM turn pow(x, float(n)) with an int32 n into powi, whose runtime function
# (__powisf2) is not linked: the process aborted. (The kernels' exp and tanh are polynomials of
# their own, kernels/pointwise.py, not libm calls 'afn' could approximate.)
FASTMATH_FLAGS = ("contract", "nsz", "reassoc")
# Kernels that compute fused elementwise bodies (elementwise and reduction kernels) take no
# flags: reassociation would rewrite their expressions as algebra, not IEEE arithmetic, allows:
# (x + y) - y to x where y is inf, x * 1e30 * 1e30 to x * inf (NaN at 0), x + (-x) to 0 where x
# is NaN, (x / s) * y to x * (y / s) (inf at 1e20). Nor 'nsz': 1 / -(y - x) at x = y is -inf, as
# in the reference. Nor 'contract': a * a - b * b fused into fma(a, a, -b * b) keeps a * a
# unrounded, so a = b gave a rounding residual, not 0 (sqrt of it NaN, log of it finite). They
# vectorise across elements without it; a reduction's sum reassociates its one addition
# (intrinsics.reassociable_add). The float32 math helpers contract their own polynomials
# (kernels/pointwise.py).
IEEE_FASTMATH_FLAGS: tuple[str, ...] = ()
# Below this many elements a loop runs serially: a parallel region costs ~10 us to start and a
# parallel kernel compiles ~0.4 s slower.
PARALLEL_MIN_ELEMENTS = 1 << 16
_ALWAYS_PARALLEL: ContextVar[bool] = ContextVar("always_parallel", default=False)
_SERIAL: ContextVar[bool] = ContextVar("serial_kernels", default=False)


def requested_threads() -> int | None:
    """$GRAPHC_NUM_THREADS as an int (None when unset): the executor runs kernels with at most
    that many of Numba's threads."""
    text = os.environ.get("GRAPHC_NUM_THREADS")
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"GRAPHC_NUM_THREADS={text!r} is not an integer") from None


def kernel_threads() -> int:
    """The most threads a kernel compiled now can run with in this process: Numba's pool
    (NUMBA_NUM_THREADS), or fewer where GRAPHC_NUM_THREADS asks; one inside `serial_kernels()`."""
    if _SERIAL.get():
        return 1
    requested = requested_threads()
    pool = numba.config.NUMBA_NUM_THREADS
    return max(1, min(requested, pool)) if requested is not None else pool


def runs_parallel(elements: int) -> bool:
    """Whether a loop over `elements` runs in parallel (the generators' one size-dependent
    choice): from PARALLEL_MIN_ELEMENTS on where kernels can run on several threads (on one, a
    parallel kernel gains nothing and compiles 2-4 times as long as the serial one:
    transformer-m's 36 parallel kernel modules took 20.4 of its 23.1 s cold compile), or always
    inside `always_parallel()`."""
    return _ALWAYS_PARALLEL.get() or (elements >= PARALLEL_MIN_ELEMENTS and kernel_threads() > 1)


@contextmanager
def always_parallel() -> Iterator[None]:
    """Generate every loop that can run in parallel as parallel, whatever its size. A kernel's
    source then no longer depends on its batch extent: the variant a larger batch compiled
    serves a smaller batch of the same model (the executor's choice, `choose_variants`)."""
    token = _ALWAYS_PARALLEL.set(True)
    try:
        yield
    finally:
        _ALWAYS_PARALLEL.reset(token)


@contextmanager
def serial_kernels() -> Iterator[None]:
    """Generate kernels as for one thread: serial loops, scratch for one thread. They stand in
    while the parallel ones compile in the background (executor.compile_plan)."""
    token = _SERIAL.set(True)
    try:
        yield
    finally:
        _SERIAL.reset(token)

HEADER = '''"""Generated by graphc (numba-cpu backend): {name}."""
import numpy as np
from numba import njit, prange
'''


@dataclass
class Call:
    """One compiled function of a kernel and what to pass it: each of `args` is one of the
    kernel's arrays (an input, output or scratch array), an integer or a float scalar. With `flat`, every
    array is passed as a 1-D view; `views` may give, per argument, the shape of the view to
    pass instead of the array (None: as it is)."""

    source: str                   # a complete module
    entry: str                    # the function to call in it
    args: tuple[KernelArray | int | np.floating, ...]
    flat: bool = False
    parallel: bool = False
    views: tuple[tuple[int, ...] | None, ...] = ()

    def view_of(self, position: int, array: TensorType) -> tuple[int, ...] | None:
        """The shape argument `position` (an array of type `array`) is passed as, or None."""
        if self.flat:
            return (array.size,)
        return self.views[position] if self.views else None


@dataclass
class KernelSource:
    """The generated code of one fused kernel: calls run in order, sharing its scratch."""

    name: str                     # the fused kernel's name (kernel node attr)
    pattern: str
    calls: list[Call]
    scratch: tuple[TensorType, ...] = ()
    flops: int = 0
    origin: str = ""              # a comment naming the module paths and lines of its ops
    parallel_calls: tuple[bool, ...] = ()  # the calls taken from the always_parallel() variant

    @property
    def source(self) -> str:
        """The kernel's code for reading: the origin comment, then each call's module. The
        comment stays out of the compiled modules, whose text is the cache key: a kernel shared
        by many layers compiles once."""
        code = "\n\n".join(call.source for call in self.calls)
        return f"{self.origin}\n{code}" if self.origin else code

    @property
    def parallel(self) -> bool:
        return any(call.parallel for call in self.calls)


def module(name: str, body: Writer, helpers: Sequence[str] = (), *, gemm: bool = False,
           fastmath: bool | Sequence[str] = False) -> str:
    """A complete kernel module: header, inlined helper functions, the entry function. Its
    writer declares what the code uses: `gemm`, the GEMM helper (gemm.py), imported;
    `fastmath`, the FASTMATH flag set a decorator names (`decorator`, HELPER_DECORATOR):
    FASTMATH_FLAGS, or the flags given (none: False)."""
    header = HEADER.format(name=name)
    if gemm:
        header += "from graphc.backends.numba_cpu.gemm import gemm\n"
    if fastmath is not False:  # what the decorators' FASTMATH names: a set, or False for none
        flags = FASTMATH_FLAGS if fastmath is True else tuple(fastmath)
        header += f"\nFASTMATH = {{{', '.join(repr(f) for f in flags)}}}\n" if flags else \
            "\nFASTMATH = False\n"
    parts = [header] + [h.rstrip() + "\n" for h in helpers] + [body.text()]
    return "\n\n".join(parts)


# IEEE division (x / 0 is inf, as in NumPy and the reference backend; Numba's default raises
# ZeroDivisionError and tests every divisor); no C-callable wrapper, which graphc never calls
# (~0.02 s of every function's compile). Helpers, called only from kernels, need no Python
# wrapper either.
ENTRY_OPTIONS = "error_model='numpy', no_cfunc_wrapper=True"
HELPER_OPTIONS = f"{ENTRY_OPTIONS}, no_cpython_wrapper=True"
HELPER_DECORATOR = f"@njit(fastmath=FASTMATH, {HELPER_OPTIONS})"
# What the shared emitters (backends/kernels) write for this backend: helpers are njit functions
# without the wrappers that let Python or C call them (a dropout kernel compiles in 0.74-0.97 s
# instead of 1.07-1.23 s).
CPU = KernelTarget(TARGET, f"njit({HELPER_OPTIONS})", scalar_arguments=True)


def decorator(parallel: bool, fastmath: bool = True) -> str:
    """The entry's decorator; `fastmath=False` for functions that only call BLAS (the flags
    cannot speed them up, and cost compile time)."""
    flags = "fastmath=FASTMATH, " if fastmath else ""
    return f"@njit(parallel={parallel}, {flags}{ENTRY_OPTIONS}, cache=True)"


def loop_header(var: str, extent: str, parallel: bool) -> str:
    return f"for {var} in {'prange' if parallel else 'range'}({extent}):"


def library_call(entry: str, params: list[str], args: list[KernelArray | int], parallel: bool,
                 write_body: Callable[[Writer], None], fastmath: bool = True, gemm: bool = False) -> Call:
    """A call of a hand-written library function `entry(*params)` with these `args`; `gemm`:
    its body calls the GEMM helper. Where kernels run on one thread it compiles serially
    whatever `parallel` says (as `runs_parallel`): its prange loops then run as range."""
    parallel = parallel and (kernel_threads() > 1 or _ALWAYS_PARALLEL.get())
    w = Writer()
    w.line(decorator(parallel, fastmath))
    with w.block(f"def {entry}({', '.join(params)}):"):
        write_body(w)
    return Call(module(entry, w, gemm=gemm, fastmath=fastmath), entry, tuple(args), parallel=parallel)
