"""Placing deployments again while the engine runs (docs/deployments.md "Applying"):
the changed plan a running watch was handed, carried out card by card.

A card keeps its driver while it stays in a deployment. One that changes deployment
is handed over: its driver is told its new deployment, group, partition and program,
and the first thing it does is reset the card (its session was keyed for the
deployment it leaves), then attest it in its new session and load. A card no
deployment holds any more is given up: its driver stopped, the card unloaded and
reset, the move journaled, the card forgotten. A card placed for the first time
gets a new driver. Nothing else moves: a group that stays where it was is not
touched."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio

from orchestrator.engine.card import CardDriver
from orchestrator.engine.placement import Group
from orchestrator.engine.prepare import PreparedProgram
from orchestrator.engine.state import CardMachine
from orchestrator.errors import ModelIPError

if TYPE_CHECKING:
    from orchestrator.engine.deployment import Deployment
    from orchestrator.engine.engine import Engine
    from orchestrator.engine.host import HostSupervisor
    from orchestrator.plan.model import Plan


async def replace_deployments(engine: Engine, plan: Plan, deployments: Sequence[Deployment],
                              *, why: str, rolling: frozenset[str] = frozenset()
                              ) -> list[str]:
    """Drive ``deployments`` on their groups from now on (``plan`` is the plan they are
    of; ``why``: said in the history of every card given up; ``rolling``: deployments
    whose cards keep the version they run, a rollout switches them). Returns what was
    done, a line per card that moved."""
    ctx = engine.ctx
    for d in deployments:   # every program stays known: a card may still hold it
        ctx.keys[d.program.program_id] = d.mek
        ctx.offer(d.program)
    wanted: dict[tuple[str, int], tuple[Deployment, Group, int]] = {
        (g.host, device): (d, g, partition)
        for d in deployments for g in d.groups for partition, device in enumerate(g.devices)}
    numbers = {Group(ds[0].machine.host, tuple(x.machine.device for x in ds)): n
               for n, ds in engine.groups.items()}
    fresh = iter(range(max(engine.groups, default=-1) + 1, 1 << 62))
    supervisors = {h.name: h for h in engine.hosts}
    said: list[str] = []

    async def give_up(driver: CardDriver) -> None:
        m = driver.machine
        await supervisors[m.host].give_up(m.device, why)
        said.append(f"{m.host}/{m.device}: given up by {driver.deployment} (unloaded and "
                    "reset)")

    async with anyio.create_task_group() as tg:
        for key, leaving in engine.cards_by_name().items():
            if key not in wanted:
                tg.start_soon(give_up, leaving)
    current = engine.cards_by_name()
    # a program new on a host is staged there before a card is told to run it
    unstaged: dict[str, dict[str, PreparedProgram]] = {}
    for (host, _), (d, _, _) in wanted.items():
        if d.program.program_id not in {x.machine.program_id for x in
                                        supervisors[host].drivers.values()}:
            unstaged.setdefault(host, {})[d.program.program_id] = d.program
    async with anyio.create_task_group() as tg:
        for host, programs in unstaged.items():
            tg.start_soon(_stage, supervisors[host], list(programs.values()))
    for (host, device), (d, group, partition) in sorted(wanted.items()):
        number = numbers.get(group)
        if number is None:
            number = numbers[group] = next(fresh)
        driver = current.get((host, device))
        program_id = d.program.program_id
        if driver is not None and d.name in rolling and driver.deployment == d.name:
            program_id = driver.machine.program_id
        if driver is None:
            machine = CardMachine(host, device, number, partition, d.program.program_id)
            new = CardDriver(machine, supervisors[host], ctx)
            new.deployment = d.name
            await supervisors[host].add(new)
            said.append(f"{host}/{device}: placed for {d.name}")
        elif (driver.deployment, driver.machine.group, driver.machine.partition,
              driver.machine.program_id) != (d.name, number, partition, program_id):
            left, was = driver.deployment, driver.machine.group
            driver.hand_over(d.name, number, partition, program_id)
            await supervisors[host].regroup(driver)
            said.append(f"{host}/{device}: handed over from {left} to {d.name}" if left != d.name
                        else f"{host}/{device}: regrouped in {d.name}" if was != number
                        else f"{host}/{device}: version {d.program.version} of {d.name}")
    engine.reindex(plan, deployments)
    return said


async def _stage(host: HostSupervisor, programs: list[PreparedProgram]) -> None:
    with contextlib.suppress(ModelIPError):   # else staged when a load needs it
        await host.restage(programs)

