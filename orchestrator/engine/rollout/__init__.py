"""Rollouts (docs/rollouts.md): what one starts from (``setup``), what the journal
keeps of it (``ledger``), the controller that drives it inside the fleet."""

from orchestrator.engine.rollout.controller import Rollout

__all__ = ["Rollout"]
