"""deploy, watch, run, status: the plan-driven commands (thin wiring; the
composition root is app.py, the engine is engine/)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from typing import Any

import anyio

from orchestrator.engine.plan import Plan
from orchestrator.errors import UsageError


async def orchestrate(plan: Plan, *, keep_serving: bool, duration: float | None,
                      json_events: bool, metrics_port: int | None = None,
                      inputs: dict[str, Any] | None = None,
                      retry_quarantined: bool = False) -> tuple[int, dict[str, Any] | None]:
    """Run the plan; returns (exit code, inference outputs if ``inputs``).

    A failing state directory stops the engine: the summary is still printed,
    then the StateDirError is raised (one line, exit 5).
    """
    import anyio

    from orchestrator.app import open_engine
    from orchestrator.errors import StateDirError

    outputs: dict[str, Any] | None = None
    stopped_by: list[int] = []
    out = sys.stderr if inputs is not None else sys.stdout
    async with open_engine(plan, retry_quarantined=retry_quarantined) as engine:
        names = engine.program.model_inputs
        if inputs is not None and set(inputs) == {""} and len(names) == 1:
            inputs = {names[0]: inputs[""]}
        dashboard = None
        if json_events:
            engine.subscribe(lambda event: print(event.to_json(), file=out, flush=True))
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

                async def run_engine() -> None:
                    try:
                        await engine.run(keep_serving=True)
                    except StateDirError:
                        tg.cancel_scope.cancel()  # engine.fatal says why; reported below

                tg.start_soon(on_signals)
                if metrics_port is not None:
                    from orchestrator.engine.metrics import render_metrics, serve_metrics

                    await tg.start(serve_metrics, metrics_port,
                                   lambda: render_metrics(engine.snapshot(), engine.stats))
                if dashboard is not None:
                    tg.start_soon(_tick, dashboard)
                tg.start_soon(run_engine)
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
        summary = engine.summary()
        if json_events:
            print(summary.to_json(), file=out, flush=True)
        else:
            _print_summary(summary, out)
        if engine.fatal is not None:
            raise engine.fatal
    if stopped_by:
        return (130 if stopped_by[0] == signal.SIGINT else 0), outputs
    return summary.exit_code, outputs


async def _tick(dashboard: Any) -> None:
    import anyio

    while True:
        await anyio.sleep(1.0)
        dashboard.refresh()


def _print_summary(summary: Any, out: Any) -> None:
    print(f"{summary.serving}/{summary.cards} cards serving, {summary.hosts_up}/"
          f"{summary.hosts} hosts up, {summary.rekeys} re-keys", file=out)
    for card in summary.not_serving:
        named = f" ({card.card_id})" if card.card_id else ""
        print(f"{card.state} {card.card}{named}: {card.reason}", file=out)


def _json_mode(args: argparse.Namespace) -> bool:
    return bool(args.json) or not sys.stdout.isatty()


def cmd_deploy(args: argparse.Namespace) -> int:
    return _deploy(args, keep_serving=False)


def cmd_watch(args: argparse.Namespace) -> int:
    return _deploy(args, keep_serving=True)


def _load_plan(path: str) -> Plan:
    """Read a plan and say aloud what it allows on purpose (stderr)."""
    plan = Plan.load(path)
    for warning in plan.warnings():
        print(warning, file=sys.stderr)
    return plan


def _deploy(args: argparse.Namespace, *, keep_serving: bool) -> int:
    import anyio

    plan = _load_plan(args.plan)
    code, _ = anyio.run(lambda: orchestrate(
        plan, keep_serving=keep_serving, duration=getattr(args, "duration", None),
        json_events=_json_mode(args), metrics_port=args.metrics_port,
        retry_quarantined=args.retry_quarantined))
    return code


def cmd_run(args: argparse.Namespace) -> int:
    import anyio

    from orchestrator.hostcli import read_inputs, write_outputs

    plan = _load_plan(args.plan)
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
    from orchestrator.engine.store import CardRecord, HostRecord, LoadRecord, SQLiteStore

    plan = Plan.load(args.plan)
    if not plan.journal_path.exists():
        raise UsageError(f"{plan.source}: no journal yet at {plan.journal_path} "
                         "(run `modelip deploy` first)")
    async def read() -> tuple[list[CardRecord], list[HostRecord], list[LoadRecord]]:
        with SQLiteStore(plan.journal_path, read_only=True) as store:
            return await store.cards(), await store.hosts(), await store.loads()

    cards, hosts, loads = anyio.run(read)
    if args.json:
        print(json.dumps({"hosts": [dataclasses.asdict(h) for h in hosts],
                          "cards": [dataclasses.asdict(c) for c in cards],
                          "loads": len(loads)}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if hosts:
        table = Table(title=f"{plan.source.name}: hosts")
        for column in ("host", "address", "state", "reason"):
            table.add_column(column)
        for h in hosts:
            table.add_row(h.host, h.address, h.state, h.reason[:80])
        console.print(table)
    table = Table(title=f"{plan.source.name}: journal {plan.journal_path}")
    for column in ("host", "card", "card id", "group", "part", "state", "boot",
                   "session", "reason"):
        table.add_column(column)
    for c in cards:
        table.add_row(c.host, str(c.device), c.card_id, str(c.group), str(c.partition),
                      c.state, str(c.boot_counter), c.session_id[:16], c.reason[:60])
    console.print(table)
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
