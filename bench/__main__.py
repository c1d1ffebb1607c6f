"""``python -m bench``: see bench/README.md or ``python -m bench --help``."""

import sys

from .harness import main

sys.exit(main())
