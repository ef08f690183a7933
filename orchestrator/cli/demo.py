"""The demo's plan, shipped inside the package (orchestrator/data/demo.yaml) and
found through the package's own resources, so `modelip demo` works the same
from a clone and from an installed wheel."""

from __future__ import annotations

import dataclasses
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.plan.model import Plan

DEMO_PLAN = "demo.yaml"


def demo_plan_bytes() -> bytes:
    """The packaged demo plan, as shipped."""
    return resources.files("orchestrator").joinpath("data", DEMO_PLAN).read_bytes()


def demo_state_dir() -> Path:
    """Where `modelip demo` keeps its state: $XDG_STATE_HOME/modelip/demo
    (~/.local/state/modelip/demo), never beside the installed package."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "modelip" / "demo"


def load_demo_plan() -> Plan:
    """The packaged demo plan, its state in demo_state_dir(). Raises PlanError."""
    from orchestrator.plan.model import Plan

    with resources.as_file(resources.files("orchestrator").joinpath("data", DEMO_PLAN)) \
            as path:
        plan = Plan.load(path)
    return dataclasses.replace(plan, state_dir=demo_state_dir())
