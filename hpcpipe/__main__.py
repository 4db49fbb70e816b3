"""`python -m hpcpipe` is the `hpcpipe` command."""

import sys

from hpcpipe.cli.main import main

sys.exit(main())
