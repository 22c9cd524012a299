"""``tokenmorph.morph``: the public name of :mod:`tokenmorph.ops.morph` (re-exported, so that
``from tokenmorph.morph import ...`` keeps working)."""

from .ops.morph import *  # noqa: F401,F403
from .ops.morph import __all__  # noqa: F401
