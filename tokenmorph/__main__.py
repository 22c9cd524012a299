"""``python -m tokenmorph``: the same CLI as the ``tokenmorph`` command (and what torchrun
launches)."""

import sys

from .cli import main

sys.exit(main())
