"""`python -m bench.accounts`: runs `bench.accounts.scale.main` with the command line's arguments."""

import sys

from bench.accounts.scale import main

sys.exit(main())
