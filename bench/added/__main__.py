"""`python -m bench.added`: runs `bench.added.probe.main` with the command line's arguments."""

import sys

from bench.added.probe import main

sys.exit(main())
