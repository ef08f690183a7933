"""Deployment plans: the schema (``model``), reading YAML with line numbers
(``reader``), where a plan's names lead (``paths``), the ``rollout:`` section."""

from orchestrator.plan.model import Plan

__all__ = ["Plan"]
