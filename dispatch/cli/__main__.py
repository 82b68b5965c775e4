"""``python -m dispatch.cli``: the command line."""

import sys

from dispatch.cli.main import main

sys.exit(main())
