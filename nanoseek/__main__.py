"""`python -m nanoseek`: the command line as a module, which is how torchrun starts it."""

import sys

from nanoseek.cli import main

sys.exit(main())
