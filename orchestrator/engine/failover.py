"""Failover of deployments' groups while the fleet runs (docs/deployments.md
"Failover"): a host down longer than ``timeouts.failover`` has its groups placed on
other cards of the fleet, and a deployment short of groups gets them when cards
come back. The same placement as at a start (engine/placement.py) and the same
moves as `modelip apply` (engine/replacing.py): what stays placed is not touched.

A group that cannot go anywhere else stays where it is (it serves again when its
host answers). The cards of a group placed elsewhere are given up: driven no more,
kept in the journal, unloaded and reset when their host answers again (before it
is UP: engine/host.py)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import anyio

from orchestrator.engine.events import Placed
from orchestrator.engine.placement import Group, HostSlots, Need, Placement, place
from orchestrator.plan.deployments import inventory

if TYPE_CHECKING:
    from orchestrator.engine.engine import Engine

LOOK_EVERY = 1.0   # seconds between looks at the hosts


def failover_placement(slots: Sequence[HostSlots], down: set[str], needs: Sequence[Need],
                       placed: Mapping[str, Sequence[Group]]) -> Placement:
    """Where the groups are to be with the ``down`` hosts unusable; a deployment that
    gets fewer groups than it needs keeps those on down hosts (up to its need) rather
    than lose them for nothing. Pure."""
    usable = [h if h.name not in down else dataclasses.replace(h, cards=()) for h in slots]
    result = place(usable, needs, placed)
    groups = {name: list(each) for name, each in result.groups.items()}
    pending = dict(result.pending)
    for need in needs:
        mine = groups.setdefault(need.name, [])
        for group in placed.get(need.name, ()):
            if len(mine) < need.groups and group.host in down and group not in mine:
                mine.append(group)
        if len(mine) >= need.groups:
            pending.pop(need.name, None)
    return Placement({name: tuple(each) for name, each in groups.items()}, pending)


async def fail_over(engine: Engine) -> None:
    """Look at the hosts every second; place again what a host down past the plan's
    ``timeouts.failover`` holds, or what a short deployment can get now (a host not
    yet down that long keeps its groups)."""
    grace = engine.plan.timeouts.failover
    await engine.deployed.wait()
    looked: tuple[object, ...] = ()
    while True:
        await anyio.sleep(LOOK_EVERY)
        now = time.monotonic()
        down = {h.name for h in engine.hosts
                if h.down and now - h.machine.not_up_since >= grace}
        # placed again only when that changes (a placement of 4,096 cards is ~0.1 s)
        seen = (frozenset(down), frozenset(h.name for h in engine.hosts if h.up),
                id(engine.plan))
        if seen == looked:
            continue
        looked = seen
        async with engine.placing:
            placed = await engine.store.placements()
            result = failover_placement(
                inventory(engine.plan.hosts, engine.plan.emulated), down,
                [spec.need for spec in engine.plan.deployments], placed)
            if any(sorted(result.groups.get(n, ())) != sorted(placed.get(n, ()))
                   for n in set(result.groups) | set(placed)):
                await _apply(engine, placed, result, down)


async def _apply(engine: Engine, placed: Mapping[str, Sequence[Group]], result: Placement,
                 down: set[str]) -> None:
    from orchestrator.engine.replacing import replace_deployments

    why = (f"{', '.join(sorted(down))} down longer than timeouts.failover "
           f"({engine.plan.timeouts.failover:g} s)") if down else "cards came back"
    await engine.store.record_placements(result.groups)
    deployments = [dataclasses.replace(d, groups=tuple(result.groups.get(d.name, ())),
                                       short=result.pending.get(d.name, ""))
                   for d in engine.deployments.values()]
    await replace_deployments(engine, engine.plan, deployments,
                              why=f"placed elsewhere: {why}")
    for name in sorted(set(result.groups) | set(placed)):
        before, after = set(placed.get(name, ())), set(result.groups.get(name, ()))
        if before != after:
            engine.ctx.emit(Placed(
                deployment=name, added=tuple(_where(g) for g in sorted(after - before)),
                removed=tuple(_where(g) for g in sorted(before - after)), why=why))


def _where(group: Group) -> str:
    return f"{group.host} {list(group.devices)}"


__all__ = ["fail_over", "failover_placement"]
