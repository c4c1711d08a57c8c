"""`python -m msd_core generate …`: the same as the `msd-panorama` command."""

import sys

from .cli import main

sys.exit(main())
