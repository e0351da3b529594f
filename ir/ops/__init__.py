"""Primitive definitions, one module per op family. Importing this package registers them all."""
from . import elementwise  # noqa: F401
from . import shape  # noqa: F401
from . import reductions  # noqa: F401
from . import indexing  # noqa: F401
from . import random  # noqa: F401
from . import nn  # noqa: F401
from . import cumulative  # noqa: F401
from . import norm  # noqa: F401
from . import comm  # noqa: F401
from . import softmax  # noqa: F401
