"""`python -m ckpt.cli` runs the ckpt command."""

import sys

from . import main

sys.exit(main())
