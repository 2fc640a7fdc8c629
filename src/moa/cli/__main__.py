"""`python -m moa.cli ...` runs the `moa` command."""

import sys

from moa.cli import main

sys.exit(main())
