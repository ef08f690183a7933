"""The orchestrator end to end on embedded emulated fleets (real gRPC, real crypto)."""

from __future__ import annotations

import gc
import json
import types
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import onnx
import pytest

from orchestrator.app import fleet_for, grpc_host, open_engine
from orchestrator.cli.fleet import orchestrate
from orchestrator.crypto.container import SealSettings
from orchestrator.crypto.mek import load_mek
from orchestrator.engine.engine import Engine
from orchestrator.engine.prepare import obtain_mek, prepare_program
from orchestrator.engine.store.sqlite import SQLiteStore
from orchestrator.fileops.encrypt import encrypt_model
from orchestrator.plan.model import Plan
from orchestrator.transport.client import HostClient
from orchestrator.views.metrics import render_metrics
from tests.models import tiny_mlp
from tests.test_partition import LIGHT, dummy_input, original_outputs


def write_plan(tmp_path: Path, *, model: str = "tiny", partitions: int = 1, hosts: int = 1,
               devices: int = 2, extra_fleet: str = "", extra: str = "",
               model_extra: str = "") -> Path:
    if model == "tiny":
        (tmp_path / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
        source = "tiny.onnx"
    else:
        source = f"package:onnx/backend/test/data/light/light_{model}.onnx"
    path = tmp_path / "plan.yaml"
    path.write_text(f"""
model:
  onnx: {source}
  partitions: {partitions}
{model_extra}mek:
  generate: true
fleet:
  emulated:
    hosts: {hosts}
    devices_per_host: {devices}
    reboot_time: 0.05
{extra_fleet}
retry:
  attempts: 3
  backoff: 0.05
rekey:
  min_interval: 0.05
  check_interval: 0.3
state_dir: state
{extra}
""")
    return path


@asynccontextmanager
async def running(plan: Plan) -> AsyncIterator[tuple[Engine, list[HostClient]]]:
    async with open_engine(plan) as engine:
        clients = [HostClient(h.target.address) for h in engine.hosts]
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: engine.run(keep_serving=True,
                                                          task_status=task_status))
            with anyio.fail_after(60):
                await engine.deployed.wait()
            try:
                yield engine, clients
            finally:
                for client in clients:
                    await client.close()
                tg.cancel_scope.cancel()


async def wait_until(engine: Engine, condition: Any, limit: float = 20) -> None:
    with anyio.fail_after(limit):
        while not condition():
            await engine.changed()


async def transitions_of(engine: Engine) -> list[tuple[str, int, str, str]]:
    return [(r.host, r.device, r.previous, r.state)
            for r in await engine.store.transitions(limit=100000)]


async def test_resnet50_on_two_hosts_in_groups_of_four(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    plan = Plan.load(write_plan(tmp_path, model="resnet50", partitions=4, hosts=2, devices=4))
    model = onnx.load(LIGHT / "light_resnet50.onnx")
    feeds = dummy_input(model)
    code, outputs = await orchestrate(plan, keep_serving=False, duration=None,
                                      json_events=True, inputs=feeds)
    assert code == 0 and outputs is not None
    np.testing.assert_allclose(outputs[model.graph.output[0].name],
                               original_outputs(model, feeds)[0], rtol=1e-3, atol=1e-7)
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    deployed = next(e for e in events if e["event"] == "deployed")
    assert deployed["serving"] == 8 and deployed["groups_serving"] == 2
    assert sum(e["event"] == "staged" for e in events) == 2  # once per host
    assert not (plan.state_dir / "journal.sqlite").read_bytes().count(
        load_mek(plan.state_dir / "mek.dat").key)  # the MEK is never in the journal


async def test_resets_are_rekeyed_without_reupload_and_others_keep_serving(tmp_path: Path
                                                                           ) -> None:
    plan = Plan.load(write_plan(tmp_path, partitions=2, hosts=2, devices=4))
    async with running(plan) as (engine, hosts):
        stages_before = [(await h.stats())["stage_count"] for h in hosts]
        victim = engine.groups[1][1].machine  # host0, second group, partition 1
        before = victim.boot_counter
        await hosts[0].reset(victim.device)
        await wait_until(engine, lambda: victim.boot_counter > before
                         and victim.state.value == "SERVING" and engine.group_serving(1))
        assert [(await h.stats())["stage_count"] for h in hosts] == stages_before
        assert engine.stats.rekeys == 1
        x = np.ones((1, 8), np.float32)
        result = await engine.execute({"x": x}, group=victim.group)
        assert result["y"].shape == (1, 4)
        moved = {(h, d) for h, d, f, t in await transitions_of(engine) if t == "REKEYING"}
        assert moved == {(victim.host, victim.device)}  # nobody else was interrupted


@pytest.mark.parametrize("events", [True, False])
async def test_a_rebooting_card_is_asked_less_and_less_often(tmp_path: Path, events: bool
                                                             ) -> None:
    """A card reset for 1.5 s: the check that finds it rebooting is not followed by
    another question at once, a reset or offline hint does not end the wait, and the
    waits double (50 ms, 100 ms, ...): a handful of questions, not one every 50 ms (30).
    With every event lost, the periodic check finds the reset and the listing the end."""
    path = write_plan(tmp_path, devices=2, extra_fleet="" if events else
                      "    drop_events: 1.0")
    path.write_text(path.read_text().replace("reboot_time: 0.05", "reboot_time: 1.5"))
    async with running(Plan.load(path)) as (engine, hosts):
        victim = engine.drivers[0].machine
        before = victim.boot_counter
        await hosts[0].reset(victim.device)
        await wait_until(engine, lambda: victim.boot_counter > before
                         and victim.state.value == "SERVING")
        assert 1 <= engine.stats.found_rebooting <= 7, engine.stats.found_rebooting
        assert f"modelip_attestations_rebooting_total {engine.stats.found_rebooting:.1f}" \
            in render_metrics(engine.snapshot(), engine.stats)


async def test_reset_during_deploy_still_ends_serving(tmp_path: Path) -> None:
    plan = Plan.load(write_plan(tmp_path, hosts=1, devices=4,
                                extra_fleet="    attest_latency: 0.05"))
    async with open_engine(plan) as engine, \
            HostClient(engine.hosts[0].target.address) as client, anyio.create_task_group() as tg:
        tg.start_soon(lambda: engine.run(keep_serving=True))
        await anyio.sleep(0.02)
        await client.reset(2)  # while the engine is attesting it
        with anyio.fail_after(30):
            await engine.deployed.wait()
        await wait_until(engine, lambda: all(c.state.value == "SERVING"
                                             for c in engine.cards))
        assert engine.cards[2].boot_counter == 2
        assert (await client.stats())["stage_count"] == 1
        tg.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("substitute-key", "signature does not verify"),
        ("ignore-nonce", "nonce mismatch"),
        ("replay-report", "nonce mismatch"),
        ("tamper-body", "failed authentication"),
        ("swap-slots", "wrapped MEK does not open"),
    ],
)
async def test_each_attack_quarantines_only_the_attacked_card(tmp_path: Path, mode: str,
                                                              expected: str) -> None:
    plan = Plan.load(write_plan(tmp_path, hosts=2, devices=2, extra_fleet=(
        f"    adversary: {mode}\n    adversary_hosts: [1]\n    adversary_devices: [1]")))
    async with running(plan) as (engine, _):
        victim = next(c for c in engine.cards if c.host == "host1" and c.device == 1)
        if mode == "replay-report":  # the first report is fresh; the replay comes later
            await wait_until(engine, lambda: victim.state.value == "QUARANTINED")
        assert victim.state.value == "QUARANTINED"
        assert expected in victim.reason
        others = [c for c in engine.cards if c is not victim]
        assert all(c.state.value == "SERVING" for c in others)
        code, not_serving = engine.outcome()
        assert (code, [(c.name, c.state.value) for c in not_serving]) == (
            3, [("host1/1", "QUARANTINED")])


async def test_old_version_substitution_is_refused_by_the_card(tmp_path: Path) -> None:
    plan = Plan.load(write_plan(tmp_path, hosts=1, devices=2, extra_fleet=(
        "    adversary: old-version\n    adversary_devices: [0]")))
    mek = obtain_mek(plan)
    # the host already holds an older release of this model under the same MEK
    old = tmp_path / "old"
    from orchestrator.qpc.partition import package_onnx

    package_onnx(tmp_path / "tiny.onnx", tmp_path / "old.qpc")
    program = encrypt_model(str(tmp_path / "old.qpc"), mek, str(old),
                            SealSettings("tiny", model_version=0))[0]
    prepared = prepare_program(plan, mek)
    with SQLiteStore(plan.journal_path) as journal:
        async with fleet_for(plan) as (hosts, roots):
            async with HostClient(hosts[0].address) as client:
                await client.stage(program)
            engine = Engine(plan, hosts, roots, mek, prepared, journal, connect=grpc_host)
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: engine.run(keep_serving=False))
                with anyio.fail_after(30):
                    await engine.deployed.wait()
    assert engine.cards[0].state.value == "QUARANTINED"
    # the slot we wrapped opens only the program it was made for
    assert "made for another program" in engine.cards[0].reason
    assert engine.cards[1].state.value == "SERVING"


async def test_everything_under_the_state_dir_is_owner_only(tmp_path: Path) -> None:
    """The packaged plaintext model, the encrypted cache, the journal and its WAL, the
    generated MEK, the emulated PKI: 0600 files in 0700 directories, even in a state
    directory an older version left readable."""
    import stat

    plan = Plan.load(write_plan(tmp_path, hosts=1, devices=1))
    (plan.state_dir / "cache").mkdir(parents=True, mode=0o755)
    (plan.state_dir / "cache" / "left-over").write_bytes(b"x")
    (plan.state_dir / "cache" / "left-over").chmod(0o644)
    async with running(plan):
        seen = {path.name: stat.S_IMODE(path.stat().st_mode)
                for path in [plan.state_dir, *plan.state_dir.rglob("*")]}
    assert {"mek.dat", plan.journal_path.name, plan.journal_path.name + "-wal", "root.pem",
            "left-over", "lock"} <= set(seen)
    assert any(name.startswith("packaged-") for name in seen)
    loose = {name: oct(mode) for name, mode in seen.items() if mode & 0o077}
    assert loose == {}


async def test_reset_storm_is_rate_limited_and_disproved(tmp_path: Path) -> None:
    plan = Plan.load(write_plan(tmp_path, hosts=2, devices=2, extra_fleet=(
        "    adversary: reset-storm\n    adversary_hosts: [0]")))
    async with running(plan) as (engine, hosts):
        await wait_until(engine, lambda: engine.stats.disproved_hints >= 2)
        assert engine.stats.rekeys == 0
        assert all(c.state.value == "SERVING" for c in engine.cards)
        # rate limited: the 2 stormed cards re-check at most once per min_interval
        # (0.05 s); plus the first attestations and the periodic checks (0.3 s)
        assert engine.stats.attestations <= 4 + 2 * (1.0 / 0.05 + 4) + 4 * (1.0 / 0.3 + 2)
        # the honest host's cards still re-key promptly
        honest = next(c for c in engine.cards if c.host == "host1")
        await hosts[1].reset(honest.device)
        await wait_until(engine, lambda: engine.stats.rekeys == 1, limit=10)


async def test_suppressed_resets_are_caught_by_the_periodic_check(tmp_path: Path) -> None:
    plan = Plan.load(write_plan(tmp_path, hosts=1, devices=2, extra_fleet=(
        "    adversary: suppress-resets")))
    async with running(plan) as (engine, hosts):
        victim = engine.cards[0]
        await hosts[0].reset(victim.device)
        await wait_until(engine, lambda: engine.stats.rekeys == 1
                         and victim.state.value == "SERVING", limit=10)
        assert victim.boot_counter == 2


async def test_every_attestation_checks_what_the_card_holds(tmp_path: Path) -> None:
    """Same session throughout: a card the host unloads is reloaded; a card the host
    loads with another program (one the owner once keyed to this very session) is
    quarantined on its own signed report, with that reason."""
    import hashlib
    import os

    from orchestrator.crypto.container import SealedContainer
    from orchestrator.crypto.evidence import verify_evidence
    from orchestrator.fileops.encrypt import SessionTarget, wrap_to_targets
    from orchestrator.qpc.container import open_container
    from orchestrator.qpc.partition import package_onnx

    plan = Plan.load(write_plan(tmp_path, hosts=1, devices=2))
    async with running(plan) as (engine, hosts):
        unloaded, victim = engine.cards
        loads = engine.stats.loads
        await hosts[0].unload(unloaded.device)
        await wait_until(engine, lambda: engine.stats.loads == loads + 1
                         and unloaded.state.value == "SERVING")
        assert unloaded.boot_counter == 1  # the same session: reloaded, not reset
        # another program the owner keyed to this card's session earlier
        package_onnx(tmp_path / "tiny.onnx", tmp_path / "other.qpc")
        other = encrypt_model(str(tmp_path / "other.qpc"), engine.ctx.mek, str(tmp_path / "o"),
                              SealSettings("other-model"))[0]
        request = os.urandom(32)
        report = verify_evidence(await hosts[0].attest(victim.device, request),
                                 roots=engine.ctx.roots, policy=engine.ctx.policy,
                                 request=request)
        with open_container(other) as container:
            digest = hashlib.sha256(SealedContainer(container).info_bytes).digest()
        slots = wrap_to_targets(engine.ctx.mek, [SessionTarget.from_report(report, "0")],
                                digest)
        other_id, _ = await hosts[0].stage(other)
        await hosts[0].load(victim.device, other_id, key_slots=slots)
        await wait_until(engine, lambda: victim.state.value == "QUARANTINED")
        assert "runs another program: model 'other-model' version 1" in victim.reason
        assert unloaded.state.value == "SERVING"


async def test_policy_rejects_old_firmware_cards(tmp_path: Path) -> None:
    plan = Plan.load(write_plan(tmp_path, hosts=1, devices=2, extra_fleet=(
        '    old_firmware_cards: ["0/1"]'), extra="trust:\n  policy:\n    min_firmware: '1.10'"))
    async with running(plan) as (engine, _):
        assert engine.cards[1].state.value == "QUARANTINED"
        assert "firmware 0.9.0 is older than 1.10" in engine.cards[1].reason
        assert engine.cards[0].state.value == "SERVING"


async def test_a_rekeyed_card_serves_only_once_its_body_is_verified(tmp_path: Path) -> None:
    """The host alters the staged body after the first loads: the re-key load is refused
    by the card, so the card is QUARANTINED and never reported SERVING on that body."""
    from orchestrator.emulator.adversary import Adversary
    from orchestrator.emulator.fleet import FleetConfig, run_fleet
    from orchestrator.engine.host import HostTarget

    plan = Plan.load(write_plan(tmp_path, hosts=1, devices=2))
    mek = obtain_mek(plan)
    program = prepare_program(plan, mek)
    with SQLiteStore(plan.journal_path) as journal:
        async with run_fleet(FleetConfig(hosts=1, devices_per_host=2)) as fleet:
            target = HostTarget("host0", fleet.addresses[0], (0, 1))
            engine = Engine(plan, [target], [fleet.pki.root], mek, program, journal,
                            connect=grpc_host)
            async with HostClient(fleet.addresses[0]) as client, \
                    anyio.create_task_group() as tg:
                tg.start_soon(lambda: engine.run(keep_serving=True))
                with anyio.fail_after(30):
                    await engine.deployed.wait()
                fleet.hosts[0].backend.adversary = Adversary.TAMPER_BODY  # from now on
                fleet.hosts[0].backend.adversary_devices = frozenset({1})
                served_before = len([t for t in await journal.transitions(1000)
                                     if t.device == 1 and t.state == "SERVING"])
                await client.reset(1)
                await wait_until(engine, lambda: engine.cards[1].state.value == "QUARANTINED")
                assert "failed authentication" in engine.cards[1].reason
                served = [t for t in await journal.transitions(1000)
                          if t.device == 1 and t.state == "SERVING"]
                assert len(served) == served_before == 1 and engine.stats.rekeys == 0
                result = await engine.execute({"x": np.ones((1, 8), np.float32)}, group=0)
                assert result["y"].shape == (1, 4)
                tg.cancel_scope.cancel()


@pytest.mark.parametrize("path", ["engine", "deploy command"])
async def test_a_deploy_lets_serving_drivers_return_rather_than_cancelling_them(
        tmp_path: Path, path: str) -> None:
    """A cancelled driver unwinds with an exception and a traceback per frame: cyclic
    garbage that cost 0.5 s of CPU at 4,096 cards. A deploy (the engine's own, and the
    `deploy` command's, which runs the engine as `watch` does and ends it) wakes the
    drivers waiting for their next check and lets them return."""
    plan = Plan.load(write_plan(tmp_path, hosts=2, devices=4))
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector frees is kept to be looked at
    try:
        if path == "engine":
            async with open_engine(plan) as engine:
                await engine.run(keep_serving=False)
            assert [c.state.value for c in engine.cards] == ["SERVING"] * 8
        else:
            code, _ = await orchestrate(plan, keep_serving=False, duration=None,
                                        json_events=True)
            assert code == 0
        gc.collect()
        unwound = [o for o in gc.garbage if isinstance(o, types.FrameType)
                   and o.f_code.co_name == "_next_trigger"]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert unwound == []
