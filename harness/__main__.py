"""``python -m harness`` runs the command line, like the ``harness`` script."""

import sys

from harness.cli import main

sys.exit(main())
