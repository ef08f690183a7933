"""Operators' commands beyond pause/resume/undo (docs/api.md, docs/rollouts.md): a
rollout step that waits for an approval, a cordoned host whose cards are keyed by
nobody until it is uncordoned (the host's own load count says so), and how long the
API keeps its history."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from orchestrator._proto.modelip.v1 import control_pb2, control_pb2_grpc
from orchestrator.api.apart import serve_api_apart
from orchestrator.engine.engine import Engine
from orchestrator.engine.store.sqlite import SQLiteStore
from orchestrator.errors import PlanError
from orchestrator.plan.api import ApiSpec, History
from orchestrator.plan.model import Plan
from orchestrator.plan.rollout import RolloutSpec, Step
from orchestrator.transport.client import HostClient
from tests.test_engine import wait_until
from tests.test_engine import write_plan as engine_plan
from tests.test_rollouts import fleet, operator, rollout_events, status, version_2_over_1

MODELIP = [sys.executable, "-m", "orchestrator"]
__all__ = ["fleet"]   # the fixture, used by name


# --- approvals -----------------------------------------------------------------------------

def test_a_manual_step_is_the_wave_its_approval_ends() -> None:
    spec = RolloutSpec(canary=1, steps=(Step(50, True), Step(100, True, manual=True)))
    assert spec.waves(8) == [1, 4, 8] and spec.manual_waves(8) == [2]
    first = RolloutSpec(canary=1, steps=(Step(1, False, manual=True), Step(100, True)))
    assert first.manual_waves(4) == [0]   # the canary itself waits


@pytest.mark.parametrize(("steps", "expected"), [
    ('[{groups: "50%", approval: later}]', "rollout.steps[0].approval: must be manual"),
    ("[{approval: manual}]", "rollout.steps[0].groups: is required"),
    ('[{groups: "150%"}]', "rollout.steps[0].groups: must be a share between 0% and 100%"),
    ('[{groups: 2, aproval: manual}]', "did you mean 'approval'?"),
])
def test_a_bad_step_is_one_line(steps: str, expected: str, tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=re.escape(expected)):
        Plan.load(engine_plan(tmp_path, extra=f"rollout: {{steps: {steps}}}"))


def test_a_wave_that_waits_for_an_approval_is_not_switched_until_approved(
        tmp_path: Path, fleet: tuple[list[str], Path]) -> None:
    v2 = version_2_over_1(tmp_path, fleet, rollout="""rollout:
  canary: 1
  steps: [{groups: "100%", approval: manual}]
""")
    process = subprocess.Popen([*MODELIP, "deploy", str(v2), "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    events: list[dict[str, object]] = []
    approved = False
    try:
        for line in process.stdout:
            event = json.loads(line)
            events.append(event)
            if event["event"] == "rollout" and "waits for an approval" in str(event["what"]) \
                    and not approved:
                time.sleep(1.5)   # waiting: nothing of wave 2 is switched meanwhile
                view = status(v2)
                assert view["wave"] == 1 and view["awaits_approval"], view
                said = subprocess.run([*MODELIP, "rollout", "status", str(v2)],
                                      capture_output=True, text=True, check=True).stdout
                assert "wave 2 waits for `modelip rollout approve`" in said
                assert "wave 2 of 2 approved" in operator("approve", v2)
                approved = True
    finally:
        process.communicate(timeout=120)
    assert approved and process.returncode == 0, events[-1]
    said = [str(e["what"]) for e in rollout_events(events)]
    waiting = next(i for i, w in enumerate(said) if "waits for an approval" in w)
    approval = next(i for i, w in enumerate(said) if "approved by the operator" in w)
    assert not [w for w in said[waiting:approval] if "switched to version 2" in w]
    assert [w for w in said[approval:] if "switched to version 2" in w]
    assert status(v2)["phase"] == "committed"
    refused = subprocess.run([*MODELIP, "rollout", "approve", str(v2)], capture_output=True,
                             text=True, check=False)
    assert refused.returncode == 2 and "no rollout in progress" in refused.stderr


# --- cordon ----------------------------------------------------------------------------------

async def _command(address: str, *words: str) -> tuple[int, str]:
    run = await anyio.run_process([*MODELIP, *words, "--api", address], check=False)
    return run.returncode, (run.stdout + run.stderr).decode()


async def test_a_cordoned_hosts_cards_are_keyed_by_nobody_until_it_is_uncordoned(
        tmp_path: Path) -> None:
    """Cordon host0: its serving cards keep serving; a card of it that resets waits
    CORDONED and the host loads nothing (its own count), while host1's reset card is
    re-keyed; uncordoned, the waiting card is keyed again. Journaled, shown in the
    list and the watch, refused for a host of no fleet, and kept for the next run."""
    from orchestrator.app import grpc_host
    from orchestrator.emulator.fleet import FleetConfig, run_fleet
    from orchestrator.engine.host import HostTarget
    from orchestrator.engine.prepare import obtain_mek, prepare_program

    plan = Plan.load(engine_plan(tmp_path, hosts=2, devices=2))
    mek = obtain_mek(plan)
    program = prepare_program(plan, mek)
    async with run_fleet(FleetConfig(hosts=2, devices_per_host=2)) as emulated:
        targets = [HostTarget(f"host{i}", a, (0, 1)) for i, a in enumerate(emulated.addresses)]

        def engine_on(journal: SQLiteStore) -> Engine:
            return Engine(plan, targets, [emulated.pki.root], mek, program, journal,
                          connect=grpc_host)

        with SQLiteStore(plan.journal_path) as journal:
            async with anyio.create_task_group() as tg:
                engine = engine_on(journal)
                tg.start_soon(lambda: engine.run(keep_serving=True))
                # the API in its own process, as `watch --api` runs it: the cordon
                # reaches the engine over the process's pipe
                address = await tg.start(lambda task_status: serve_api_apart(
                    ApiSpec(listen="127.0.0.1:0"), journal, release=engine.release,
                    cordoned=engine.cordons_changed, task_status=task_status))
                with anyio.fail_after(30):
                    await engine.deployed.wait()
                host0 = emulated.hosts[0]
                code, said = await _command(address, "cordon", "host0")
                assert code == 0 and "host host0 cordoned" in said, said
                assert (await _command(address, "cordon", "host0"))[1].startswith(
                    "host host0 is already cordoned")
                code, said = await _command(address, "cordon", "host9")
                assert code == 2 and len(said.splitlines()) == 1 and \
                    "'host9' is not a host of this fleet" in said, said
                loads = host0.stats.load_count
                rekeys = engine.stats.rekeys
                for address_of, device in ((emulated.addresses[0], 1),
                                           (emulated.addresses[1], 1)):
                    async with HostClient(address_of) as client:
                        await client.reset(device)
                await wait_until(engine, lambda: engine.cards[1].state.value == "CORDONED"
                                 and engine.cards[3].state.value == "SERVING"
                                 and engine.stats.rekeys > rekeys)
                await anyio.sleep(1.0)   # cordoned: nothing more happens to it
                assert engine.cards[1].state.value == "CORDONED"
                assert engine.cards[0].state.value == "SERVING"   # served on, not reset
                assert host0.stats.load_count == loads
                assert "cordoned by loopback (operator)" in engine.cards[1].reason
                assert engine.outcome()[0] == 4   # not serving, by an operator's word

                listed = await _listing(address)
                assert {h.host: h.cordoned_by for h in listed.hosts} == {
                    "host0": "loopback (operator)", "host1": ""}
                code, said = await _command(address, "uncordon", "host0")
                assert code == 0 and "host host0 uncordoned" in said, said
                await wait_until(engine, lambda: engine.cards[1].state.value == "SERVING")
                assert host0.stats.load_count == loads + 1
                await _command(address, "cordon", "host1")   # kept for the next run
                tg.cancel_scope.cancel()
            hosts = [c.body for c in await journal.changes(0, 10_000) if c.kind == "host"
                     and c.body["reason"] in ("cordoned by loopback (operator)", "uncordoned")]
            assert [(h["host"], h["cordoned_by"]) for h in hosts] == [
                ("host0", "loopback (operator)"), ("host0", ""),
                ("host1", "loopback (operator)")]
            commands = [(c.body["command"], c.body["outcome"])
                        for c in await journal.changes(0, 10_000) if c.kind == "command"]
            assert commands == [("cordon host0", "done"), ("cordon host0", "already so"),
                                ("cordon host9", "refused: no such host"),
                                ("uncordon host0", "done"), ("cordon host1", "done")]
        async with HostClient(emulated.addresses[1]) as client:
            await client.reset(0)      # host1's card 0 now needs a key, in the next run
        with SQLiteStore(plan.journal_path) as journal:
            engine = engine_on(journal)
            async with anyio.create_task_group() as tg:
                tg.start_soon(engine.run)
                await wait_until(engine, lambda: engine.cards[2].state.value == "CORDONED")
                assert engine.cards[3].state.value == "SERVING"   # holds its program
                tg.cancel_scope.cancel()


async def _listing(address: str) -> control_pb2.ListResponse:
    import grpc

    async with grpc.aio.insecure_channel(address) as channel:
        return await control_pb2_grpc.ControlStub(channel).List(control_pb2.ListRequest(),
                                                                 timeout=10)


# --- the history kept --------------------------------------------------------------------------

def test_the_history_window_is_the_plans(tmp_path: Path) -> None:
    plan = Plan.load(engine_plan(tmp_path, extra="api: {history: {revisions: 500, "
                                                  "seconds: 600}}"))
    assert plan.api is not None and plan.api.history == History(500, 600.0)
    assert Plan.load(engine_plan(tmp_path, extra="api: {}")).api.history == History()  # type: ignore[union-attr]
    for bad, expected in (("{revisions: 0}", "api.history.revisions: must be from 1"),
                          ("{seconds: 0.5}", "api.history.seconds: must be from 1 second"),
                          ("{seconds: 99999999}", "api.history.seconds: must be from 1 second"),
                          ("{kept: 5}", "api.history.kept: is not a known key")):
        with pytest.raises(PlanError, match=re.escape(expected)):
            Plan.load(engine_plan(tmp_path, extra=f"api: {{history: {bad}}}"))
