"""deploy, watch, run, status: the plan-driven commands (thin wiring; see engine/).

This is where the embedded emulated fleet is wired in: the engine itself
never imports the emulator.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from orchestrator.engine.plan import Plan
from orchestrator.errors import UsageError


@asynccontextmanager
async def fleet_for(plan: Plan) -> AsyncIterator[tuple[list[Any], list[Any]]]:
    """(host targets, trust roots): the plan's hosts, or an embedded emulated fleet."""
    from orchestrator.crypto.evidence import load_roots_file
    from orchestrator.engine.supervisor import HostTarget
    from orchestrator.transport.client import TLSClientConfig

    roots = [root for path in plan.trust_roots for root in load_roots_file(str(path))]
    if plan.emulated is None:
        hosts = []
        for spec in plan.hosts:
            tls = None
            if spec.tls is not None:
                tls = TLSClientConfig.from_paths(
                    str(spec.tls.ca) if spec.tls.ca else None,
                    str(spec.tls.cert) if spec.tls.cert else None,
                    str(spec.tls.key) if spec.tls.key else None)
            hosts.append(HostTarget(spec.address, spec.address, spec.devices, tls))
        yield hosts, roots
        return
    from orchestrator.emulator.card import CardConfig
    from orchestrator.emulator.fleet import FleetConfig, run_fleet
    from orchestrator.emulator.host import Adversary, FaultConfig
    from orchestrator.emulator.pki import VendorPKI

    emulated = plan.emulated
    try:
        adversary = Adversary(emulated.adversary)
    except ValueError:
        raise UsageError(f"{plan.source}: fleet.emulated.adversary: unknown mode "
                         f"{emulated.adversary!r}") from None
    from orchestrator.crypto.wrap import Kem

    card = CardConfig(firmware_version=emulated.firmware, kem=Kem.parse(emulated.kem))
    config = FleetConfig(
        hosts=emulated.hosts, devices_per_host=emulated.devices_per_host,
        faults=FaultConfig(reset_rate=emulated.reset_rate, reboot_time=emulated.reboot_time,
                           attest_latency=emulated.attest_latency,
                           drop_events=emulated.drop_events),
        card=card,
        card_overrides={key: CardConfig(firmware_version="0.9.0", kem=card.kem)
                        for key in emulated.old_firmware_cards},
        adversary=adversary,
        adversary_hosts=frozenset(emulated.adversary_hosts or ()) or None,
        adversary_devices=frozenset(emulated.adversary_devices or ()) or None,
        seed=emulated.seed)
    pki = VendorPKI.load_or_create(plan.state_dir / "emulated-pki")
    async with run_fleet(config, pki=pki) as fleet:
        hosts = [HostTarget(host.name, host.address, tuple(range(len(host.cards))))
                 for host in fleet.hosts]
        yield hosts, [pki.root, *roots]


@asynccontextmanager
async def open_engine(plan: Plan, *, retry_quarantined: bool = False) -> AsyncIterator[Any]:
    """The plan's MEK, prepared program, journal and fleet, as an Engine ready to run.

    The MEK is wiped from memory when the block ends.
    """
    import anyio

    from orchestrator.engine.journal import Journal
    from orchestrator.engine.prepare import obtain_mek, prepare_program
    from orchestrator.engine.supervisor import Engine

    mek = obtain_mek(plan)
    try:
        program = await anyio.to_thread.run_sync(prepare_program, plan, mek)
        with Journal(plan.journal_path) as journal:
            async with fleet_for(plan) as (hosts, roots):
                yield Engine(plan, hosts, roots, mek, program, journal,
                             retry_quarantined=retry_quarantined)
    finally:
        mek.wipe()


async def orchestrate(plan: Plan, *, keep_serving: bool, duration: float | None,
                      json_events: bool, metrics_port: int | None = None,
                      inputs: dict[str, Any] | None = None,
                      retry_quarantined: bool = False) -> tuple[int, dict[str, Any] | None]:
    """Run the plan; returns (exit code, inference outputs if ``inputs``)."""
    import anyio

    outputs: dict[str, Any] | None = None
    stopped_by: list[int] = []
    out = sys.stderr if inputs is not None else sys.stdout
    async with open_engine(plan, retry_quarantined=retry_quarantined) as engine:
        names = engine.program.model_inputs
        if inputs is not None and set(inputs) == {""} and len(names) == 1:
            inputs = {names[0]: inputs[""]}
        dashboard = None
        if json_events:
            engine.subscribe(lambda event: print(json.dumps(event), file=out, flush=True))
        elif inputs is None:
            from orchestrator.dashboard import LiveDashboard

            dashboard = LiveDashboard(engine.snapshot, title=f"modelip  {plan.source.name}")
            engine.subscribe(dashboard.on_event)
        try:
            if dashboard is not None:
                dashboard.__enter__()
            async with anyio.create_task_group() as tg:

                async def on_signals() -> None:
                    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                        async for signum in sigs:
                            stopped_by.append(signum)
                            tg.cancel_scope.cancel()
                            return

                tg.start_soon(on_signals)
                if metrics_port is not None:
                    from orchestrator.engine.metrics import render_metrics, serve_metrics

                    await tg.start(serve_metrics, metrics_port,
                                   lambda: render_metrics(engine.snapshot(), engine.stats))
                if dashboard is not None:
                    tg.start_soon(_tick, dashboard)
                await tg.start(lambda task_status: engine.run(
                    keep_serving=True, task_status=task_status))
                await engine.deployed.wait()
                if inputs is not None:
                    outputs = await engine.execute(inputs)
                if keep_serving:
                    with anyio.move_on_after(duration if duration else float("inf")):
                        await anyio.sleep_forever()
                tg.cancel_scope.cancel()
        finally:
            if dashboard is not None:
                dashboard.__exit__(None, None, None)
        code, quarantined, failed = engine.outcome()
        summary = {"event": "summary", "exit_code": code,
                   "serving": sum(c.state.value == "SERVING" for c in engine.cards),
                   "cards": len(engine.cards), "rekeys": engine.stats.rekeys,
                   "quarantined": [{"card": c.name, "card_id": c.card_id,
                                    "reason": c.reason} for c in quarantined],
                   "failed": [{"card": c.name, "reason": c.reason} for c in failed]}
        if json_events:
            print(json.dumps(summary), file=out, flush=True)
        else:
            _print_summary(summary, out)
    if stopped_by:
        return (130 if stopped_by[0] == signal.SIGINT else 0), outputs
    return code, outputs


async def _tick(dashboard: Any) -> None:
    import anyio

    while True:
        await anyio.sleep(1.0)
        dashboard.refresh()


def _print_summary(summary: dict[str, Any], out: Any) -> None:
    print(f"{summary['serving']}/{summary['cards']} cards serving, {summary['rekeys']} "
          "re-keys", file=out)
    for item in summary["quarantined"]:
        print(f"QUARANTINED {item['card']} ({item['card_id']}): {item['reason']}", file=out)
    for item in summary["failed"]:
        print(f"FAILED {item['card']}: {item['reason']}", file=out)


def _json_mode(args: argparse.Namespace) -> bool:
    return bool(args.json) or not sys.stdout.isatty()


def cmd_deploy(args: argparse.Namespace) -> int:
    return _deploy(args, keep_serving=False)


def cmd_watch(args: argparse.Namespace) -> int:
    return _deploy(args, keep_serving=True)


def _deploy(args: argparse.Namespace, *, keep_serving: bool) -> int:
    import anyio

    plan = Plan.load(args.plan)
    code, _ = anyio.run(lambda: orchestrate(
        plan, keep_serving=keep_serving, duration=getattr(args, "duration", None),
        json_events=_json_mode(args), metrics_port=args.metrics_port,
        retry_quarantined=args.retry_quarantined))
    return code


def cmd_run(args: argparse.Namespace) -> int:
    import anyio

    from orchestrator.hostcli import read_inputs, write_outputs

    plan = Plan.load(args.plan)
    inputs = read_inputs(args.input)
    code, outputs = anyio.run(lambda: orchestrate(plan, keep_serving=False, duration=None,
                                                  json_events=bool(args.json), inputs=inputs))
    if outputs is None:
        return code or 4
    write_outputs(args.output, outputs)
    for name, value in outputs.items():
        print(f"{name}: {value.dtype} {list(value.shape)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator.engine.journal import Journal

    plan = Plan.load(args.plan)
    if not plan.journal_path.exists():
        raise UsageError(f"{plan.source}: no journal yet at {plan.journal_path} "
                         "(run `modelip deploy` first)")
    with Journal(plan.journal_path) as journal:
        cards = journal.cards()
        loads = journal.loads()
        if args.json:
            print(json.dumps({"cards": [dataclasses.asdict(c) for c in cards],
                              "loads": len(loads)}, indent=2))
            return 0
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{plan.source.name}: journal {plan.journal_path}")
        for column in ("host", "card", "card id", "group", "part", "state", "boot",
                       "session", "reason"):
            table.add_column(column)
        for c in cards:
            table.add_row(c.host, str(c.device), c.card_id, str(c.group), str(c.partition),
                          c.state, str(c.boot_counter), c.session_id[:16], c.reason[:60])
        Console().print(table)
        print(f"{sum(c.state == 'SERVING' for c in cards)}/{len(cards)} serving (as last "
              f"recorded), {len(loads)} loads sent")
    return 0


def register(sub: Any) -> None:
    for name, handler, text in (("deploy", cmd_deploy, "bring the plan's fleet to serving"),
                                ("watch", cmd_watch, "deploy, then keep the fleet serving")):
        p = sub.add_parser(name, help=text)
        p.add_argument("plan")
        p.add_argument("--json", action="store_true", help="JSON-lines events, no dashboard")
        p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics here")
        p.add_argument("--retry-quarantined", action="store_true",
                       help="try cards the journal quarantined again (an operator decision)")
        if name == "watch":
            p.add_argument("--duration", type=float, help="stop after this many seconds")
        p.set_defaults(handler=handler)
    p = sub.add_parser("run", help="run inference on a serving group")
    p.add_argument("plan")
    p.add_argument("--input", required=True, metavar="x.npy|x.npz")
    p.add_argument("--output", metavar="y.npy|y.npz")
    p.add_argument("--json", action="store_true", help="JSON-lines events on stderr")
    p.set_defaults(handler=cmd_run)
    p = sub.add_parser("status", help="the journal's view of the fleet (no network)")
    p.add_argument("plan")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_status)
