"""`python -m gigajax.cli ...`: the `gigajax` command."""

import sys

from gigajax.cli import main

sys.exit(main())
