"""``python -m minillama``: the same command line as ``minillama``."""

import sys

from minillama.cli import main

sys.exit(main())
