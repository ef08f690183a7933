"""Applying a changed plan to a running fleet with deployments (docs/deployments.md
"Applying"): what would change (the diff `modelip apply` prints), and the watch's
side, which takes a request from the journal and carries it out.

Only deployments change on a running fleet: a deployment added is placed, one
removed gives up its cards (unloaded and reset), a changed `groups` grows or shrinks
it, a changed constraint moves what no longer matches, a changed model goes through
the deployment's rollout (or replaces the old at once without one). A deployment's
MEK is what it is (a new key is a new deployment), and the fleet section is the
running watch's: a plan that changes them is refused, saying which."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from orchestrator.engine.placement import Group, Placement, place
from orchestrator.engine.store.applies import APPLIED, REFUSED, Applies
from orchestrator.errors import ModelIPError, UsageError
from orchestrator.plan.deployments import DeploymentSpec, inventory
from orchestrator.plan.model import Plan

if TYPE_CHECKING:
    from orchestrator.engine.deployment import Deployment, PrepareDeployment
    from orchestrator.engine.engine import Engine
    from orchestrator.engine.rollout.setup import RolloutSetup
    from orchestrator.engine.store.sqlite import SQLiteStore

LOOK_EVERY = 0.5     # seconds between a watch's looks at the journal for a request
# what of a plan is the fleet's: a running watch keeps it
_FLEET_FIELDS = ("hosts", "emulated", "trust_roots", "policy", "concurrency", "retry",
                 "rekey", "timeouts", "state_dir", "store", "replicas", "rollout", "api")


def spec_record(spec: DeploymentSpec) -> dict[str, Any]:
    """A deployment as the journal keeps it (what `apply` compares a plan with)."""
    def plain(value: object) -> object:
        return {k: plain(v) for k, v in dataclasses.asdict(value).items()} \
            if dataclasses.is_dataclass(value) and not isinstance(value, type) else \
            value if isinstance(value, int | bool | float) or value is None else str(value)

    return {"model": plain(spec.model), "mek": plain(spec.mek), "groups": spec.groups,
            "hosts": list(spec.hosts), "spread": spec.spread, "policy": plain(spec.policy)}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True, slots=True)
class Change:
    name: str
    before: int           # groups placed before (0: a new deployment)
    after: int            # groups placed after (0: removed)
    added: tuple[Group, ...]
    given_up: tuple[Group, ...]
    short: str            # why it gets fewer groups than it asks, if it does
    new: bool
    removed: bool
    versions: tuple[int, int] | None = None   # its model changed: from, to
    rollout: bool = False                     # ... through its rollout (else at once)
    policy: bool = False                      # its trust policy changed

    def line(self) -> str:
        def where(groups: Sequence[Group]) -> str:
            return ", ".join(f"{g.host} {list(g.devices)}" for g in groups)
        if self.removed:
            return f"- {self.name}: removed; {self.before} group(s) given up (cards " \
                   f"unloaded and reset): {where(self.given_up)}"
        changed = self.added or self.given_up or self.versions or self.policy
        mark = "+" if self.new else "~" if changed else "="
        said = f"{mark} {self.name}: " + ("new, " if self.new else "") + (
            f"{self.before} -> {self.after} groups" if self.before != self.after or self.new
            else f"{self.after} groups")
        if self.added:
            said += f"; placed on {where(self.added)}"
        if self.given_up:
            said += f"; given up: {where(self.given_up)}"
        if self.versions:
            said += f"; model version {self.versions[0]} -> {self.versions[1]} " + (
                "through its rollout" if self.rollout else "at once (it has no rollout:)")
        if self.policy:
            said += "; its trust policy changed (asked at each card's next attestation)"
        if not (self.new or changed):
            said += ", unchanged"
        return said + (f" (short: {self.short})" if self.short else "")


@dataclass(frozen=True, slots=True)
class PlanChanges:
    changes: tuple[Change, ...]
    placement: Placement

    @property
    def changed(self) -> bool:
        return any(c.new or c.removed or c.added or c.given_up or c.versions or c.policy
                   for c in self.changes)

    def lines(self) -> list[str]:
        return [c.line() for c in self.changes]


def plan_changes(plan: Plan, running: Mapping[str, Mapping[str, Any]],
                 placed: Mapping[str, Sequence[Group]]) -> PlanChanges:
    """What applying ``plan`` changes, against the deployments the journal says run
    (``running``) and where they are (``placed``). UsageError for a change a running
    fleet does not take."""
    if not plan.deployments:
        raise UsageError(f"{plan.source}: apply changes the deployments of a running "
                         "fleet; this plan has none (a plan with `model:` is deployed "
                         "with `modelip deploy`)")
    versions: dict[str, tuple[int, int]] = {}
    policies: set[str] = set()
    for spec in plan.deployments:
        was = running.get(spec.name)
        if was is None:
            continue
        now = spec_record(spec)
        if now["model"] != was["model"]:
            versions[spec.name] = (int(was["model"]["version"]), spec.model.version)
        if now["policy"] != was.get("policy"):
            policies.add(spec.name)
        if now["mek"] != was["mek"]:
            raise UsageError(f"deployment {spec.name}: its MEK changed: a key domain is a "
                             "deployment; add one under another name and remove this one")
    placement = place(inventory(plan.hosts, plan.emulated),
                      [spec.need for spec in plan.deployments], placed)
    gone = placement.moved_from(placed)
    changes = []
    for spec in plan.deployments:
        before = tuple(placed.get(spec.name, ()))
        after = placement.groups.get(spec.name, ())
        change = Change(spec.name, len(before), len(after),
                        tuple(g for g in after if g not in before),
                        tuple(gone.get(spec.name, ())), placement.pending.get(spec.name, ""),
                        new=spec.name not in running, removed=False,
                        versions=versions.get(spec.name), rollout=spec.rollout is not None,
                        policy=spec.name in policies)
        if change.versions and (change.added or change.given_up):
            raise UsageError(f"deployment {spec.name}: its model and its groups changed "
                             "at once: apply one change, then the other")
        changes.append(change)
    wanted = {spec.name for spec in plan.deployments}
    for name in sorted(set(running) - wanted):
        changes.append(Change(name, len(placed.get(name, ())), 0, (),
                              tuple(placed.get(name, ())), "", new=False, removed=True))
    return PlanChanges(tuple(changes), placement)


def same_fleet(running: Plan, changed: Plan) -> None:
    """UsageError unless ``changed`` differs from ``running`` in deployments alone."""
    differ = [name for name in _FLEET_FIELDS
              if getattr(running, name) != getattr(changed, name)]
    if differ:
        raise UsageError(f"{changed.source}: only deployments change on a running fleet; "
                         f"this plan also changes {', '.join(differ)} (restart the watch "
                         "with it)")


# --- the watch's side ------------------------------------------------------------------

async def follow_applies(engine: Engine) -> None:
    """Take each plan `modelip apply` hands to this watch and carry it out; its answer
    (applied, with what moved; or refused, with why) goes to the journal."""
    from orchestrator.engine.store.sqlite import SQLiteStore

    journal, prepare = engine.store, engine.prepare_deployment
    assert isinstance(journal, SQLiteStore) and prepare is not None  # noqa: S101 - deployments
    applies = Applies(journal.path)
    await engine.deployed.wait()
    while True:
        request = await anyio.to_thread.run_sync(applies.pending)
        if request is None:
            await anyio.sleep(LOOK_EVERY)
            continue
        try:
            said = await _apply(engine, journal, applies, request.plan, request.digest,
                                request.who, prepare)
            state = APPLIED
        except ModelIPError as err:
            said, state = str(err), REFUSED
        except Exception as exc:  # a bug: answered and logged, the fleet runs on  # noqa: BLE001
            said = f"internal error: {engine.ctx.internal_error('apply', exc)}"
            state = REFUSED
        await anyio.to_thread.run_sync(applies.answer, request.id, state, said)


async def _apply(engine: Engine, journal: SQLiteStore, applies: Applies, path: Path,
                 expected: str, who: str, prepare: PrepareDeployment) -> str:
    try:
        if digest(path) != expected:
            raise UsageError(f"{path}: the file changed since `modelip apply` read it; "
                             "apply it again")
    except OSError as err:
        raise UsageError(f"{path}: cannot read it here ({os.strerror(err.errno or 0)})"
                         ) from None
    plan = Plan.load(path)
    same_fleet(engine.plan, plan)
    async with engine.placing:   # not while failover places (engine/failover.py)
        return await _replace(engine, journal, applies, plan, who, prepare)


async def _replace(engine: Engine, journal: SQLiteStore, applies: Applies, plan: Plan,
                   who: str, prepare: PrepareDeployment) -> str:
    placed = await journal.placements()
    changes = plan_changes(plan, applies.running(), placed)
    deployments, rollouts = [], []
    versions = {c.name for c in changes.changes if c.versions}
    for spec in plan.deployments:
        groups = changes.placement.groups.get(spec.name, ())
        short = changes.placement.pending.get(spec.name, "")
        kept = engine.deployments.get(spec.name)
        if kept is not None and spec.name not in versions:
            deployments.append(dataclasses.replace(kept, groups=tuple(groups), short=short))
            continue
        deployments.append(await prepare(plan, spec, groups, short))  # its MEK: the same
        if kept is not None:
            rollouts.append(await _new_version(engine, journal, plan, spec, deployments[-1]))
    from orchestrator.engine.replacing import replace_deployments

    await journal.record_placements(changes.placement.groups)
    moved = await replace_deployments(
        engine, plan, deployments, why=f"given up by `modelip apply` ({who})",
        rolling=frozenset(setup.deployment for setup in rollouts if setup is not None))
    applies.record_running({spec.name: spec_record(spec) for spec in plan.deployments})
    from orchestrator.engine.rollout.controller import rollout_of

    for setup in rollouts:
        if setup is not None:
            await engine.start_rollout(rollout_of(setup))
    return "\n".join([*changes.lines(), *moved])


async def _new_version(engine: Engine, journal: SQLiteStore, plan: Plan, spec: DeploymentSpec,
                       deployment: Deployment) -> RolloutSetup | None:
    """A kept deployment's new version: its rollout, set up in the journal (None: it has
    no rollout:, the new version replaces the old at once). UsageError if one of its
    rollouts runs already."""
    from orchestrator.engine.rollout.setup import arrange_deployment

    if any(r.deployment == spec.name and not r.ended for r in engine.rollouts):
        raise UsageError(f"deployment {spec.name}: a rollout of it is in progress in this "
                         "watch: let it end (or `modelip rollout undo` it) first")
    return await arrange_deployment(plan, journal, spec, deployment.program, deployment.mek,
                                    len(deployment.groups), retry=False)
