"""A deployment as the engine runs it (docs/deployments.md)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.engine.placement import Group
from orchestrator.engine.prepare import PreparedProgram
from orchestrator.plan.deployments import DeploymentSpec
from orchestrator.plan.model import Plan

if TYPE_CHECKING:
    from orchestrator.crypto.mek import MEK


@dataclass(frozen=True, slots=True)
class Deployment:
    """A deployment as the engine runs it: its program, its MEK (its key domain alone)
    and the MDP groups placed for it (engine/placement.py)."""

    name: str
    program: PreparedProgram
    mek: MEK
    groups: tuple[Group, ...]
    short: str = ""     # why it has fewer groups than it asks, if it does


# a deployment added while running: (plan, its spec, its groups, why it is short) -> it
PrepareDeployment = Callable[[Plan, DeploymentSpec, tuple[Group, ...], str],
                             Awaitable[Deployment]]


__all__ = ["Deployment", "PrepareDeployment"]
