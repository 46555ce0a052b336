"""The `jaxgen` command line: a parser table over thin handlers, one module per command group."""

from jaxgen.cli.app import main

__all__ = ["main"]
