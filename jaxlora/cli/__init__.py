"""The interface layer: the ``jaxlora`` command (`commands`), the memory estimator (`memory`), the
pre-flight report (`preflight`) and exports (`export`)."""

from jaxlora.cli.commands import build_parser, main

__all__ = ["build_parser", "main"]
