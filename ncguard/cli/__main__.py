"""`python -m ncguard.cli ...`: the same as `ncguard ...`."""

import sys

from . import main

sys.exit(main())
