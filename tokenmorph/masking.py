"""``tokenmorph.masking``: the public name of :mod:`tokenmorph.ops.masking` (re-exported, so that
``from tokenmorph.masking import ...`` keeps working)."""

from .ops.masking import *  # noqa: F401,F403
from .ops.masking import __all__  # noqa: F401
