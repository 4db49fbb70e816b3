"""`python -m hpcpipe` is the `hpcpipe` command."""

import sys

from .cli import main

sys.exit(main())
