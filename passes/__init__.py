"""graphc.passes: graph-to-graph transformations, each a named, separately tested unit."""
from .autodiff import autodiff
from .fusion import fuse
from .pipeline import Pass, Stages, run_pipeline
from .simplify import cse, dce, fold_constants, simplify, transpose_products

SIMPLIFY = Pass("simplify", simplify)
CSE = Pass("cse", cse)
DCE = Pass("dce", dce)
FOLD = Pass("fold_constants", fold_constants)
FUSION = Pass("fusion", fuse)

__all__ = ["Pass", "Stages", "run_pipeline", "autodiff", "simplify", "cse", "dce", "fold_constants",
           "fuse", "transpose_products", "SIMPLIFY", "CSE", "DCE", "FOLD", "FUSION"]
