"""graphc.passes: graph-to-graph transformations, each a named, separately tested unit."""
from .autodiff import autodiff
from .pipeline import Pass, run_pipeline
from .simplify import cse, dce, fold_constants, simplify, transpose_products

SIMPLIFY = Pass("simplify", simplify)
CSE = Pass("cse", cse)
DCE = Pass("dce", dce)
FOLD = Pass("fold_constants", fold_constants)

__all__ = ["Pass", "run_pipeline", "autodiff", "simplify", "cse", "dce", "fold_constants", "transpose_products",
           "SIMPLIFY", "CSE", "DCE", "FOLD"]
