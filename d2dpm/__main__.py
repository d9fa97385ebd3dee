"""`python -m d2dpm` runs the command line."""

import sys

from .cli import main

sys.exit(main())
