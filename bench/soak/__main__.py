"""`python -m bench.soak`: runs `bench.soak.run.main` with the command line's arguments."""

import sys

from bench.soak.run import main

sys.exit(main())
