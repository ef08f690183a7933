"""The fleet's control API (docs/api.md): list and watch with revisions."""

from orchestrator.api.server import ControlService, serve_api

__all__ = ["ControlService", "serve_api"]
