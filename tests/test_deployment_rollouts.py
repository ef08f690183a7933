"""A rollout per deployment (docs/deployments.md "Rollouts"): a new version of one
deployment's model replaces the old over that deployment's groups alone, in waves,
under its own MEK; the other deployments' cards are not touched (the hosts' own
record); a failed gate rolls that deployment back alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from orchestrator.emulator.fleet import EmulatedFleet
from orchestrator.engine.rollout.ledger import Phase
from orchestrator.engine.store.sqlite import SQLiteStore
from tests.models import reference_output, tiny_mlp
from tests.test_deployments import MODELIP, card_programs, deploy, emulated, write

BETA = "  - {name: beta, model: {onnx: other.onnx, id: beta}, mek: {generate: true}, " \
       "groups: 4}\n"


def alpha(version: int, rollout: str = "") -> str:
    return (f"  - name: alpha\n    model: {{onnx: alpha{version}.onnx, id: alpha, version: "
            f"{version}}}\n    mek: {{generate: true}}\n    groups: 4\n"
            + (f"    rollout: {rollout}\n" if rollout else ""))


def record_loads(fleet: EmulatedFleet) -> list[tuple[str, int, str]]:
    """Every LoadProgram a card answers from now on: (host, device, program)."""
    loads: list[tuple[str, int, str]] = []
    for address, host in zip(fleet.addresses, fleet.hosts, strict=True):
        for device, card in enumerate(host.backend.cards):
            def recording(container: Any, *, program_id: str, _load: Any = card.load,
                          _at: tuple[str, int] = (address, device), **kw: Any) -> Any:
                loads.append((*_at, program_id))
                return _load(container, program_id=program_id, **kw)
            card.load = recording  # type: ignore[method-assign]
    return loads


def rollout_changes(tmp_path: Path) -> list[dict[str, Any]]:
    """The rollout steps as the control API serves them (the journal's changes)."""
    with SQLiteStore(tmp_path / "state" / "journal.sqlite", read_only=True) as journal:
        return [json.loads(body) for (body,) in journal.query(
            "SELECT body FROM changes WHERE kind = 'rollout' ORDER BY revision")]


async def test_one_deployment_rolls_out_over_its_groups_and_the_other_is_untouched(
        tmp_path: Path) -> None:
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8)
    np.savez(tmp_path / "x.npz", x=x)
    for version in (1, 2, 3):
        model = tiny_mlp(seed=10 + version)
        (tmp_path / f"alpha{version}.onnx").write_bytes(model.SerializeToString())
        np.savez(tmp_path / f"y{version}.npz", y=reference_output(model, x))
    async with emulated(tmp_path, hosts=2, devices=4) as fleet:
        first = await deploy(write(tmp_path, fleet, alpha(1) + BETA))
        assert first.summary().exit_code == 0 and not first.rollouts
        beta = first.deployments["beta"].program.program_id
        beta_cards = {(d.machine.host, d.machine.device) for d in first.drivers
                      if d.deployment == "beta"}
        alpha_cards = {(d.machine.host, d.machine.device) for d in first.drivers
                       if d.deployment == "alpha"}
        boots = {(a, i): c.boot_counter for a, h in zip(fleet.addresses, fleet.hosts,
                                                         strict=True)
                 for i, c in enumerate(h.backend.cards)}
        loads = record_loads(fleet)

        # version 2 of alpha, in three waves (1, 2, 4 groups), smoke-tested
        plan = write(tmp_path, fleet, alpha(2, "{canary: 1, steps: [50%], smoke: {input: "
                                               "x.npz, expect: y2.npz}}") + BETA)
        second = await deploy(plan)
        assert second.summary().exit_code == 0
        [rollout] = second.rollouts
        assert rollout.deployment == "alpha" and rollout.record.phase is Phase.COMMITTED
        assert rollout.record.waves == (1, 2, 4)
        # every version was staged on the hosts before a card was switched to it
        assert not [r for r in second.reasons if "lacks the program" in r]
        final = second.deployments["alpha"].program.program_id
        held = card_programs(fleet)
        assert {held[c] for c in alpha_cards} == {final}    # by the hosts' own record
        assert {held[c] for c in beta_cards} == {beta}
        assert not [load for load in loads if load[:2] in beta_cards]   # beta untouched
        assert all(fleet_card(fleet, c).boot_counter == boots[c] for c in beta_cards)
        # every alpha card loaded the candidate (rollback floor 1) then, at commit, the
        # final version (floor 2): two loads each, none of another deployment's program
        assert sorted(p for *at, p in loads if tuple(at) in alpha_cards).count(final) == 4
        assert {p for *at, p in loads if tuple(at) in alpha_cards} == {
            final, rollout.candidate.program_id}
        steps = rollout_changes(tmp_path)
        assert steps and {s["deployment"] for s in steps} == {"alpha"}
        assert steps[-1]["phase"] == "committed"

        # version 3's smoke test fails at the canary: alpha rolls back alone
        loads.clear()
        bad = write(tmp_path, fleet, alpha(3, "{canary: 1, smoke: {input: x.npz, expect: "
                                              "y2.npz}}") + BETA)
        third = await deploy(bad)
        assert third.summary().exit_code == 6
        [rollout] = third.rollouts
        assert rollout.record.phase is Phase.ROLLED_BACK and rollout.deployment == "alpha"
        assert "smoke" in rollout.record.verdict
        held = card_programs(fleet)
        assert {held[c] for c in alpha_cards} == {final}      # version 2 again
        assert {held[c] for c in beta_cards} == {beta}
        assert not [load for load in loads if load[:2] in beta_cards]
        said = await anyio.run_process([*MODELIP, "rollout", "status", str(bad),
                                        "--deployment", "alpha", "--json"])
        view = json.loads(said.stdout)
        assert view["deployment"] == "alpha" and view["rollout"]["phase"] == "rolled back"
        assert view["version"] == 2
        status = (await anyio.run_process([*MODELIP, "status", str(bad)])).stdout.decode()
        assert "deployment alpha (version 2): 4/4 groups serving, 4 wanted (4 cards); " \
            "rollout 2 of version 2 -> 3: rolled back, wave 1 of 2" in status, status
        assert "deployment beta (version 1): 4/4 groups serving" in status, status


def fleet_card(fleet: EmulatedFleet, at: tuple[str, int]) -> Any:
    return fleet.hosts[fleet.addresses.index(at[0])].backend.cards[at[1]]
