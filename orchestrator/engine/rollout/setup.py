"""What a rollout starts from (docs/rollouts.md): whether the fleet serves another
version than the plan's, the programs involved (the previous one, the candidate
sealed with the old rollback floor, the plan's own), the journal's record of the
rollout (new, resumed or held), and the smoke test's arrays, all checked before
anything starts: every problem is one line (UsageError, FormatError).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from orchestrator.arrays import read_arrays
from orchestrator.engine.prepare import PreparedProgram, describe_body, file_digest
from orchestrator.engine.rollout.ledger import Ledger, Phase, ProgramRecord, RolloutRecord
from orchestrator.engine.rollout.ledgers import ledger_for
from orchestrator.engine.store.protocol import Store
from orchestrator.errors import FormatError, UsageError, WrongMEKError
from orchestrator.plan.deployments import DeploymentSpec
from orchestrator.plan.model import Plan
from orchestrator.plan.rollout import RolloutSpec

if TYPE_CHECKING:
    from orchestrator.crypto.mek import MEK


@dataclass(frozen=True, slots=True)
class RolloutSetup:
    ledger: Ledger
    record: RolloutRecord
    spec: RolloutSpec
    old: PreparedProgram
    candidate: PreparedProgram
    final: PreparedProgram
    smoke_inputs: dict[str, Any]
    smoke_expect: dict[str, Any] | None
    fresh: bool           # started by this run (not resumed from the journal)
    deployment: str = ""  # the deployment it replaces the version of ("": the fleet's)
    mek: MEK | None = None  # the deployment's MEK (None: the plan's)


def program_record(program: PreparedProgram) -> ProgramRecord:
    return ProgramRecord(program.program_id, program.model_id, program.version, program.floor,
                         str(program.body))


async def arrange(plan: Plan, store: Store, mek: MEK, final: PreparedProgram, *,
                  retry: bool, prepare: Callable[[Plan], PreparedProgram],
                  deployment: str = "", groups: int | None = None) -> RolloutSetup | None:
    """The rollout this run carries out, if the fleet serves another version (or one
    is in progress, or was rolled back); None: every group runs the plan's program.

    ``prepare(plan)`` seals a plan's model (the candidate: the old floor kept).
    ``deployment``: the rollout of that deployment alone (``plan`` is its own, app.py
    Plan.of_deployment), over its ``groups``.
    UsageError: a rollout of another version is in progress; the previous version's
    body is gone or under another MEK; the plan's version is below the fleet's floor.
    """
    ledger = ledger_for(store, deployment)
    source = f"{plan.source}: deployment {deployment}" if deployment else str(plan.source)
    await ledger.record_program(program_record(final))
    current = await ledger.fleet_program()
    if current is None:
        await ledger.offer_fleet_program(final.program_id)
    record = await ledger.active()
    if record is not None and record.to_program != final.program_id:
        was = await ledger.program(record.from_program)
        will = await ledger.program(record.to_program)
        raise UsageError(
            f"{source}: a rollout from version {was.version if was else '?'} to version "
            f"{will.version if will else '?'} is in progress (wave {record.wave + 1} of "
            f"{len(record.waves)}, {record.phase.value}): deploy that version's plan to finish "
            "it, or `modelip rollout undo` it first")
    if record is None:
        if current is None or current == final.program_id:
            return None
        serving = await ledger.program(current)
        if serving is not None and final.version < serving.floor:
            raise UsageError(f"{source}: model.version {final.version} is below the "
                             f"rollback floor the fleet's cards hold ({serving.floor}, from "
                             f"version {serving.version}): they would refuse it")
        if plan.rollout is None:  # replaced at once (docs/rollouts.md: no rollout: section)
            await ledger.offer_fleet_program(final.program_id, replace=True)
            return None
        record = await ledger.latest(current, final.program_id)
        if record is not None and (retry or record.phase is not Phase.ROLLED_BACK):
            record = None   # tried again (--retry-rollout), or an old rollout's record
    if plan.rollout is None:
        raise UsageError(f"{source}: a rollout of this version is in progress: the "
                         "plan needs its rollout: section to carry it on")
    old = await _recorded(plan, source, ledger, record.from_program if record else current,
                          mek, "the previous version")
    if record is not None:  # resumed or held: exactly the bodies it started with
        candidate = await _recorded(plan, source, ledger, record.candidate, mek,
                                    "the candidate")
    else:
        candidate = final
        if final.floor > old.version:  # keep the way back open until commit
            candidate = await anyio.to_thread.run_sync(prepare, dataclasses.replace(
                plan, model=dataclasses.replace(plan.model, rollback_floor=old.version)))
        await ledger.record_program(program_record(candidate))
    groups = _group_count(plan) if groups is None else groups
    fresh = record is None
    if record is None:
        waves = plan.rollout.waves(groups)
        manual = plan.rollout.manual_waves(groups)
        approvals = f"; wave(s) {', '.join(str(w + 1) for w in manual)} wait for an " \
            "approval" if manual else ""
        record = await ledger.start(
            old.program_id, candidate.program_id, final.program_id, waves,
            f"version {old.version} -> {final.version}: {len(waves)} wave(s) ending at "
            f"{', '.join(map(str, waves))} of {groups} groups{approvals}", manual)
    elif record.groups != groups:
        raise UsageError(f"{source}: the fleet has {groups} MDP groups, the rollout in "
                         f"progress was planned for {record.groups}: `modelip rollout undo` "
                         "it, or restore the fleet")
    inputs, expect = _smoke_arrays(plan.rollout, final)
    return RolloutSetup(ledger, record, plan.rollout, old, candidate, final, inputs, expect,
                        fresh, deployment, mek if deployment else None)


async def arrange_deployment(plan: Plan, store: Store, spec: DeploymentSpec,
                             program: PreparedProgram, mek: MEK, groups: int, *,
                             retry: bool) -> RolloutSetup | None:
    """``arrange`` for one deployment of ``plan`` (its ``program``, under its ``mek``,
    over its ``groups``): its program recorded as the one it serves, a new version
    replaced at once or by the rollout its ``rollout:`` says."""
    from orchestrator.engine.prepare import prepare_program
    from orchestrator.statedir import in_state_dir

    return await arrange(plan.of_deployment(spec), store, mek, program, retry=retry,
                         deployment=spec.name, groups=groups, prepare=lambda p: in_state_dir(
                             p, lambda: prepare_program(p, mek)))


def _group_count(plan: Plan) -> int:
    if plan.emulated is not None:
        cards = plan.emulated.hosts * plan.emulated.devices_per_host
    else:
        cards = sum(len(h.devices) for h in plan.hosts)
    return cards // plan.group_size


async def _recorded(plan: Plan, source: str, ledger: Ledger, program_id: str | None,
                    mek: MEK, role: str) -> PreparedProgram:
    """A program the journal recorded (its body in the cache), checked again."""
    record = await ledger.program(program_id) if program_id else None
    if record is None:
        raise UsageError(f"{source}: the journal does not say which program the fleet "
                         "serves: a rollout needs the previous version (deploy without "
                         "rollout: to replace it at once)")
    body = Path(record.body)
    where = f"{source}: {role} (version {record.version}, program " \
            f"{record.program_id[:16]})"
    try:
        if file_digest(body) != record.program_id:
            raise UsageError(f"{where}: {body} was changed since it was deployed")
        return describe_body(body, record.program_id, mek, plan.group_size)
    except OSError as err:
        raise UsageError(f"{where}: {body}: {err.strerror or err}: a rollout needs its body "
                         "(deploy without rollout: to replace the fleet's version at once)"
                         ) from None
    except WrongMEKError:
        raise UsageError(f"{where} is sealed under another MEK: a rollout needs both "
                         "versions under the plan's MEK") from None


def _smoke_arrays(spec: RolloutSpec, program: PreparedProgram
                  ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(inputs, expected outputs) of the smoke test: read now, so a bad file is one
    line before anything starts. No input file: zeros of the declared shapes."""
    import numpy as np

    smoke = spec.smoke
    if smoke is None:
        return {}, None
    if smoke.input is not None:
        inputs = read_arrays(smoke.input)
        if set(inputs) == {""}:
            if len(program.model_inputs) != 1:
                raise FormatError(str(smoke.input), f"the model has {len(program.model_inputs)} "
                                  "inputs: give an .npz keyed by input name")
            inputs = {program.model_inputs[0]: inputs[""]}
    else:
        if not program.input_specs:
            raise UsageError("rollout.smoke: the model does not declare its inputs: give "
                             "smoke.input")
        inputs = {t.name: np.zeros([d if isinstance(d, int) else 1 for d in t.shape],
                                   dtype=t.dtype) for t in program.input_specs}
    return inputs, (read_arrays(smoke.expect) if smoke.expect is not None else None)


__all__ = ["RolloutSetup", "arrange", "arrange_deployment", "program_record"]
