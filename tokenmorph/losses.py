"""``tokenmorph.losses``: the public name of :mod:`tokenmorph.ops.losses` (re-exported, so that
``from tokenmorph.losses import ...`` keeps working)."""

from .ops.losses import *  # noqa: F401,F403
from .ops.losses import __all__  # noqa: F401
