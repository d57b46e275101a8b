"""`python -m lmforge ...` and `torchrun -m lmforge train ...`: the same CLI."""

import sys

from lmforge.cli import main

sys.exit(main())
