"""`python -m lime ...` is the `lime` command line."""

import sys

from .cli import main

sys.exit(main())
