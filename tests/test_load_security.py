"""Files graphc did not make, read as an attacker would write them: code injection through
export files, bombs, special files, corruption of exports and checkpoints, and the source
guard that stands between code generation and the interpreter."""
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib

import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
import graphc.nn.functional as F
from graphc import optim
from graphc.backends.kernel_files import KernelFiles
from graphc.backends.source_guard import UnsafeSourceError, check_source, identifier
from graphc.ir import Builder, TensorType
from graphc.ir.errors import GraphcError, LoadError
from graphc.passes.fusion import fuse

REF = "reference"
rng = np.random.default_rng(0)
X = rng.standard_normal((4, 3)).astype(np.float32)
Y = rng.integers(0, 2, 4)


def payload(marker) -> str:
    """Python that creates `marker` if it is ever pasted into source and run."""
    return f"x():\n    import os; open({str(marker)!r}, 'w').write('pwned')\ndef y"


def small_fused_graph():
    b = Builder("g")
    x = b.add_input(TensorType((4,), "float32"), "x", "data")
    b.add_output("y", b.bind("exp", b.bind("neg", x)))
    return fuse(b.graph)


# -- the source guard ---------------------------------------------------------------------------
def test_source_guard_passes_what_graphc_generates():
    from graphc.backends.numba_cpu.codegen import generate

    kernel = small_fused_graph().nodes[0]
    for call in generate(kernel).calls:
        check_source(call.source)


def test_hostile_kernel_name_never_reaches_disk_or_interpreter(tmp_path):
    from graphc.backends.numba_cpu.codegen import generate

    marker = tmp_path / "pwned"
    fused = small_fused_graph()
    fused.nodes[0].attrs["name"] = payload(marker)
    (call,) = generate(fused.nodes[0]).calls
    compile(call.source, "<generated>", "exec")  # the pasted name made valid, hostile Python
    files = KernelFiles(str(tmp_path / "cache"))
    with pytest.raises(UnsafeSourceError, match="imports 'os'"):
        files._write_source("k", call.source)
    assert not os.path.exists(files.path("k"))
    with pytest.raises(UnsafeSourceError):
        gc.backends.compile_graph(fused, "numba-cpu")
    assert not marker.exists()


@pytest.mark.parametrize("source, fragment", [
    ("import os\n", "imports 'os'"),
    ("from . import x\n", "relative imports"),
    ("def f(a):\n    return __import__('os')\n", "identifier '__import__'"),
    ("def f(a):\n    return a.__class__\n", "identifier '__class__'"),
    ("def f(a):\n    return open(a)\n", "the name 'open'"),
    ("def f(a):\n    return eval(a)\n", "the name 'eval'"),
    ("import numpy as np\nnp.save('x', 1)\n", "module-level Expr"),
    ("import numpy as np\nX = np.load\n", "module-level Assign"),
    ("def g(f):\n    return f\n@g\ndef f(a):\n    return a\n", "not Numba's jit"),
    ("from numba import njit\ndef f(a=print('x')):\n    return a\n", "default values"),
    ("f = lambda a: a\n", "Lambda"),
    ("def f(a):\n    return f'{a}'\n", "JoinedStr"),
    ("class C:\n    pass\n", "ClassDef"),
    ("def f(a):\n    return 'rm -rf /'\n", "literal 'rm -rf /'"),
    ("def f(a):\n    return a(**a)\n", "identifier None"),
    ("def f(\n", "does not parse"),
])
def test_source_guard_refuses_what_graphc_does_not_generate(source, fragment):
    with pytest.raises(UnsafeSourceError, match=fragment.replace("(", r"\(")):
        check_source(source)


@pytest.mark.parametrize("name", ["", "1x", "x y", "x\n", "_private", "__import__", "é", "a" * 200,
                                  "x():\n import os"])
def test_identifier_refuses_what_graphc_does_not_make(name):
    with pytest.raises(UnsafeSourceError):
        identifier(name)
    assert identifier("kernel_add_relu_3") == "kernel_add_relu_3"
