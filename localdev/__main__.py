"""`python -m localdev ...`: the CLI (localdev.cli)."""

import sys

from localdev.cli import main

sys.exit(main())
