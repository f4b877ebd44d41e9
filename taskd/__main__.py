"""``python -m taskd``."""

import sys

from taskd.cli import main

sys.exit(main())
