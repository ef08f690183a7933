"""The command line: every command module and its helpers (``main`` is the entry point)."""

from orchestrator.cli.main import main

__all__ = ["main"]
