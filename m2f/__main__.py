"""`python -m m2f ...` runs the command line (see m2f.cli)."""

import sys

from m2f.cli import main

sys.exit(main())
