"""graphc.passes: graph-to-graph transformations, each a named, separately tested unit."""
from .autodiff import autodiff
from .fusion import fuse
from .pipeline import Pass, Stages
from .simplify import cse, dce, fold_constants, simplify, transpose_products

SIMPLIFY = Pass("simplify", simplify)
FUSION = Pass("fusion", fuse)

__all__ = ["Pass", "Stages", "autodiff", "simplify", "cse", "dce", "fold_constants",
           "fuse", "transpose_products", "SIMPLIFY", "FUSION"]
