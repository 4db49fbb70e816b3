"""Command-line interface: one place for every subcommand."""

from hpcpipe.cli.main import main

__all__ = ["main"]
