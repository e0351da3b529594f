"""The layers import downwards only: `ir` at the bottom, `passes` and `backends` side by side
(neither imports the other), the user API (`graphc/`) on top joining them."""
import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = {"ir": "graphc.ir", "passes": "graphc.passes", "backends": "graphc.backends"}
# What each layer may not import: the layers beside and above it.
FORBIDDEN = {
    "ir": ("graphc.passes", "graphc.backends", "graphc.api", "graphc.compile", "graphc.lowering"),
    "passes": ("graphc.backends", "graphc.api", "graphc.compile", "graphc.lowering"),
    "backends": ("graphc.passes", "graphc.api", "graphc.compile", "graphc.lowering"),
}


def imported_modules(path: pathlib.Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    parts = package.split(".") + list(path.relative_to(ROOT / package.split(".", 1)[1]).parent.parts)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = parts[:len(parts) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, module))
            found.extend((node.lineno, f"{module}.{alias.name}") for alias in node.names)
    return found


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layer_imports_nothing_beside_or_above_it(layer):
    offending = [f"{path.relative_to(ROOT)}:{line}: {module}"
                 for path in sorted((ROOT / layer).rglob("*.py"))
                 for line, module in imported_modules(path, LAYERS[layer])
                 if module.startswith(FORBIDDEN[layer]) or module in ("graphc", "graphc.graphc")]
    assert offending == []


def test_relative_imports_resolve_within_their_package():
    """The checker itself: a relative import in passes/ resolves under graphc.passes."""
    modules = {module for _, module in imported_modules(ROOT / "passes" / "memplan.py", "graphc.passes")}
    assert {"graphc.passes.dag", "graphc.passes.fusion.inplace_pairs", "graphc.ir.memory"} <= modules
    nested = {module for _, module in imported_modules(ROOT / "backends" / "numba_cpu" / "executor.py",
                                                     "graphc.backends")}
    assert "graphc.backends.numba_cpu.cache" in nested


def test_numba_backends_share_the_kernel_layer_not_each_other():
    """numba-cuda and numba-cpu both build on backends/kernels; neither imports the other,
    and the kernel layer imports neither."""
    backend = {"numba_cpu": "graphc.backends.numba_cpu", "numba_cuda": "graphc.backends.numba_cuda"}
    others = {"numba_cpu": ("graphc.backends.numba_cuda",), "numba_cuda": ("graphc.backends.numba_cpu",),
              "kernels": tuple(backend.values())}
    offending = [f"{path.relative_to(ROOT)}:{line}: {module}"
                 for folder, forbidden in others.items()
                 for path in sorted((ROOT / "backends" / folder).rglob("*.py"))
                 for line, module in imported_modules(path, "graphc.backends")
                 if module.startswith(forbidden)]
    assert offending == []


def test_loading_numba_cuda_loads_nothing_of_numba_cpu():
    """The CUDA backend's code generator, cache and executor run without the CPU backend (which
    sets BLAS threads and loads its GEMMs on import). scipy is not checked: numba itself
    imports it."""
    pytest.importorskip("numba")
    script = ("import sys\n"
              "import graphc.backends.numba_cuda.codegen, graphc.backends.numba_cuda.cache\n"
              "import graphc.backends.numba_cuda.executor\n"
              "print(sorted(m for m in sys.modules if m.startswith('graphc.backends.numba_cpu')))\n")
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                           timeout=120)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "[]"
