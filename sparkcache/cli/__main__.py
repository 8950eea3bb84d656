"""``python -m sparkcache.cli``: the ``sparkcache`` console script without installing it."""

import sys

from sparkcache.cli import main

sys.exit(main())
