"""deploy, watch, run, status: the plan-driven commands (thin wiring; the
composition root is app.py, the engine is engine/)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import signal
import sys
from typing import TYPE_CHECKING, Any

from orchestrator.cli import argtypes
from orchestrator.errors import UsageError

if TYPE_CHECKING:  # imported where used: `modelip --help` and the file commands stay quick
    from orchestrator.plan.api import ApiSpec
    from orchestrator.plan.model import Plan


async def orchestrate(plan: Plan, *, keep_serving: bool, duration: float | None,
                      json_events: bool, metrics_port: int | None = None,
                      inputs: dict[str, Any] | None = None,
                      retry_quarantined: bool = False, replica: str | None = None,
                      interactive: bool = False, retry_rollout: bool = False,
                      replace_fleet: bool = False, take_over: bool = False,
                      live: bool = True, store_word: bool = False, api: ApiSpec | None = None,
                      deployment: str | None = None) -> tuple[int, dict[str, Any] | None]:
    """Run the plan; returns (exit code, inference outputs if ``inputs``).

    A run ends when the deployment is over (deploy, run), when ``duration``
    seconds from the start have passed or the view is quit with ``q`` (watch):
    then no new work starts, the work in flight finishes (Engine.wind_down), and
    the fleet is judged. Ctrl-C interrupts at once (130); SIGTERM ends at once
    with 0. Output: JSON lines, the live view (``live`` on a terminal; with keys
    if ``interactive``), or one plain line per event. A failing state directory
    stops the engine: the summary is still printed, then the StateDirError is
    raised (one line, exit 5).
    """
    import anyio

    from orchestrator.app import open_engine
    from orchestrator.errors import StateDirError

    deadline = anyio.current_time() + duration if duration else float("inf")
    outputs: dict[str, Any] | None = None
    stopped_by: list[int] = []
    out = sys.stderr if inputs is not None else sys.stdout
    async with open_engine(plan, retry_quarantined=retry_quarantined,
                           replica=replica, retry_rollout=retry_rollout,
                           replace_fleet=replace_fleet, take_over=take_over) as engine:
        if plan.mek.file is not None:  # said once the MEK is known to be one
            from orchestrator.crypto.mek import exposure_warning

            if (warning := exposure_warning(plan.mek.file)) is not None:
                print(warning, file=sys.stderr)
        names = (engine.deployments[deployment].program if deployment
                 else engine.program).model_inputs
        if inputs is not None and set(inputs) == {""} and len(names) == 1:
            inputs = {names[0]: inputs[""]}
        dashboard = None
        app: Any = None
        app_done, the_end = anyio.Event(), anyio.Event()
        if json_events:
            engine.subscribe(lambda event: print(event.to_json(), file=out, flush=True))
        elif inputs is None and live and interactive:
            from orchestrator.views.tui import FleetApp

            app = FleetApp(engine.snapshot, engine.store.card_transitions,
                           title=f"modelip  {plan.source.name}")
        elif inputs is None and live:
            from orchestrator.views.dashboard import LiveDashboard

            dashboard = LiveDashboard(engine.snapshot, title=f"modelip  {plan.source.name}")
            engine.subscribe(dashboard.on_event)
        elif inputs is None:
            from orchestrator.views.lines import event_line

            engine.subscribe(lambda event: print(event_line(event), file=out, flush=True))
        try:
            if dashboard is not None:
                dashboard.__enter__()
            async with anyio.create_task_group() as tg:

                async def stop_app() -> None:
                    """Let the interactive view give the terminal back before anything else."""
                    if app is not None and not app_done.is_set():
                        app.exit()
                        with anyio.move_on_after(5):
                            await app_done.wait()

                async def on_signals() -> None:
                    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                        async for signum in sigs:
                            stopped_by.append(signum)
                            await stop_app()
                            tg.cancel_scope.cancel()
                            return

                async def run_app() -> None:
                    try:
                        await app.run_async()
                    finally:
                        app_done.set()
                    the_end.set()  # q on the view: a normal end, judged as at --duration

                async def deployment_over() -> None:
                    await engine.finished.wait()   # deployed, and the rollout has ended
                    the_end.set()

                async def end_of_run() -> None:
                    """Until the run ends (then the engine winds down): ``duration`` from the
                    start, q on the view, or the deployment over; inference (run) while
                    the fleet still serves."""
                    nonlocal outputs
                    with anyio.move_on_after(deadline - anyio.current_time()):
                        await the_end.wait()
                    if inputs is not None and engine.finished.is_set():
                        outputs = await engine.execute(inputs, deployment=deployment)
                    await stop_app()   # we close the view now, not the user

                async def run_engine() -> None:
                    with contextlib.suppress(StateDirError):  # engine.fatal says why, below
                        await engine.run(until=end_of_run)
                    tg.cancel_scope.cancel()

                tg.start_soon(on_signals)
                if metrics_port is not None:
                    from orchestrator.views.metrics import render_metrics, serve_metrics

                    bound = await tg.start(serve_metrics, metrics_port,
                                           lambda: render_metrics(engine.snapshot(),
                                                                  engine.stats))
                    if not metrics_port:  # 0: any free port, so say which
                        print(f"modelip: metrics on http://127.0.0.1:{bound}/metrics",
                              file=sys.stderr)
                if api is not None:
                    from orchestrator.api.apart import serve_api_apart

                    bound = await tg.start(lambda task_status: serve_api_apart(
                        api, engine.store, release=engine.release,
                        cordoned=engine.cordons_changed, task_status=task_status))
                    print(f"modelip: control API on {bound}", file=sys.stderr)
                if dashboard is not None:
                    tg.start_soon(_tick, dashboard)
                if app is not None:
                    tg.start_soon(run_app)
                if not keep_serving:
                    tg.start_soon(deployment_over)
                elif plan.deployments and not plan.shared:   # `modelip apply` hands it plans
                    from orchestrator.apply import follow_applies
                    from orchestrator.engine.failover import fail_over

                    tg.start_soon(follow_applies, engine)
                    if plan.timeouts.failover:   # groups of a host down too long move
                        tg.start_soon(fail_over, engine)
                tg.start_soon(run_engine)
        finally:
            if dashboard is not None:
                dashboard.__exit__(None, None, None)
        summary = engine.summary(store_word=store_word)
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
          f"{summary.hosts} hosts up, {summary.rekeys} re-key"
          f"{'' if summary.rekeys == 1 else 's'}", file=out)
    if summary.in_flight_at_end:
        print(f"at the end: {summary.wind_down()}", file=out)
    if summary.store_word:
        print(f"the cards counted are this replica's own and those no live replica holds; "
              f"{summary.store_word} more are other replicas', by the store's word "
              "(--store-word counts them)", file=out)
    if summary.rollout:
        print(summary.rollout, file=out)
    for deployment in summary.deployments:
        print(deployment.line(), file=out)
    for card in summary.not_serving:
        named = f" ({card.card_id})" if card.card_id else ""
        print(f"{card.state} {card.card}{named}: {card.reason}", file=out)


def cmd_deploy(args: argparse.Namespace) -> int:
    return _deploy(args, keep_serving=False)


def cmd_watch(args: argparse.Namespace) -> int:
    return _deploy(args, keep_serving=True)


def watch_plan(args: argparse.Namespace, plan: Plan | None) -> int:
    """`watch` of ``plan`` (None: the one ``args.plan`` names): the demo's way in."""
    return _deploy(args, keep_serving=True, plan=plan)


def load_plan(args: argparse.Namespace, *, quiet: bool = False) -> Plan:
    """Read a plan (``--store`` replaces its store) and say aloud what it allows on
    purpose (stderr)."""
    from orchestrator.plan.model import Plan
    from orchestrator.plan.storeurl import store_url_problem

    plan = Plan.load(args.plan)
    if getattr(args, "store", None):
        problem = store_url_problem(args.store)
        if problem:
            from orchestrator.plan.storeurl import redact

            raise UsageError(f"--store {redact(args.store)}: {problem}")
        plan = dataclasses.replace(plan, store="" if args.store == "sqlite" else args.store)
        if plan.shared and plan.emulated is not None:
            raise UsageError(f"--store: {plan.source}: replicas share real hosts; an embedded "
                             "emulated fleet is one process's own (run `modelip emulate` and "
                             "list its hosts)")
    if quiet:
        return plan
    for warning in plan.warnings():
        print(warning, file=sys.stderr)
    return plan


def _deploy(args: argparse.Namespace, *, keep_serving: bool, plan: Plan | None = None) -> int:
    import anyio

    plan = plan or load_plan(args)
    # as command-line tools do: JSON when asked (--json), the live view on a terminal,
    # plain lines (one per event, the summary last) in a pipe or a log
    live = sys.stdout.isatty()
    interactive = live and not args.plain and sys.stdin.isatty()
    code, _ = anyio.run(lambda: orchestrate(
        plan, keep_serving=keep_serving, duration=getattr(args, "duration", None),
        json_events=bool(args.json), metrics_port=args.metrics_port,
        retry_quarantined=args.retry_quarantined, replica=_replica(args),
        interactive=interactive, retry_rollout=args.retry_rollout, live=live,
        replace_fleet=args.replace_fleet, take_over=args.take_over,
        store_word=args.store_word, api=_api(plan, args.api)))
    return code


def _api(plan: Plan, listen: str | None) -> ApiSpec | None:
    """The control API to serve: the plan's ``api:``, at ``--api``'s address if given."""
    if listen is None:
        return plan.api
    from orchestrator.plan.api import ApiSpec

    return dataclasses.replace(plan.api or ApiSpec(), listen=listen)


def cmd_run(args: argparse.Namespace) -> int:
    import anyio

    from orchestrator.atomicfile import refuse_existing
    from orchestrator.cli.hosts import read_inputs, write_outputs

    plan = load_plan(args)
    deployment = _deployment(plan, args.deployment)
    inputs = read_inputs(args.input)
    if args.output:  # before the fleet is brought up
        refuse_existing([args.output], overwrite=args.force)
    code, outputs = anyio.run(lambda: orchestrate(plan, keep_serving=False, duration=None,
                                                  json_events=bool(args.json), inputs=inputs,
                                                  replica=_replica(args),
                                                  deployment=deployment))
    if outputs is None:
        return code or 4
    write_outputs(args.output, outputs, overwrite=args.force)
    for name, value in outputs.items():
        print(f"{name}: {value.dtype} {list(value.shape)}")
    return 0


def _deployment(plan: Plan, name: str | None) -> str | None:
    """The deployment ``run`` asks (docs/deployments.md): named, or the plan's only one."""
    names = [d.name for d in plan.deployments]
    if name is None and len(names) > 1:
        raise UsageError(f"run: {plan.source} has {len(names)} deployments: give "
                         f"--deployment NAME (one of {', '.join(names)})")
    check_deployment(plan, name)
    return name or (names[0] if names else None)


def check_deployment(plan: Plan, name: str | None) -> None:
    """UsageError unless ``name`` (if given) is one of the plan's deployments."""
    names = [d.name for d in plan.deployments]
    if name is not None and name not in names:
        raise UsageError(f"--deployment {name!r}: not a deployment of {plan.source}" +
                         (f" (one of {', '.join(names)})" if names else
                          " (it has one top-level model)"))


_REPLICA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _replica(args: argparse.Namespace) -> str | None:
    name: str | None = getattr(args, "replica", None)
    if name is not None and not _REPLICA_NAME.fullmatch(name):
        raise UsageError(f"--replica {name!r}: must be 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def add_store_flags(p: Any, *, replica: bool = True) -> None:
    p.add_argument("--store", metavar="URL",
                   help="the store instead of the plan's: postgresql://... shared by replicas "
                        "(docs/replicas.md), or sqlite (the embedded journal)")
    if replica:
        p.add_argument("--replica", metavar="NAME",
                       help="this replica's name in a shared store (default: host name-pid)")


def register(sub: Any) -> None:
    for name, handler, text in (("deploy", cmd_deploy, "bring the plan's fleet to serving"),
                                ("watch", cmd_watch, "deploy, then keep the fleet serving")):
        p = sub.add_parser(name, help=text)
        p.add_argument("plan")
        p.add_argument("--json", action="store_true", help="JSON-lines events, no dashboard")
        p.add_argument("--plain", action="store_true",
                       help="the live view without keys (the default when stdin is not a "
                            "terminal; when stdout is not one: a plain line per event)")
        p.add_argument("--metrics-port", type=argtypes.port,
                       help="serve Prometheus metrics here")
        p.add_argument("--api", metavar="ADDR",
                       help="serve the control API (list, watch with revisions; "
                            "docs/api.md) on this loopback address, e.g. 127.0.0.1:62480")
        p.add_argument("--retry-quarantined", action="store_true",
                       help="try cards the journal quarantined again (an operator decision)")
        p.add_argument("--retry-rollout", action="store_true",
                       help="roll this version out again after it was rolled back "
                            "(docs/rollouts.md)")
        p.add_argument("--replace-fleet", action="store_true",
                       help="with a shared store: make this plan the fleet's, on purpose "
                            "(the replicas running another plan stop; docs/replicas.md)")
        p.add_argument("--take-over", action="store_true",
                       help="load cards another fleet holds (docs/protocol.md \"Claims\"), "
                            "on purpose; without it such a card is refused and named")
        p.add_argument("--store-word", action="store_true",
                       help="with replicas, count the cards other live replicas hold by the "
                            "store's word too (default: only what this replica verified)")
        if name == "watch":
            p.add_argument("--duration", type=argtypes.positive,
                           help="seconds from the start; then the work in flight finishes "
                                "(bounded by the plan's timeouts) and the fleet is judged")
        add_store_flags(p)
        p.set_defaults(handler=handler)
    p = sub.add_parser("run", help="run inference on a serving group")
    p.add_argument("plan")
    p.add_argument("--input", required=True, metavar="x.npy|x.npz")
    p.add_argument("--output", metavar="y.npy|y.npz")
    p.add_argument("--json", action="store_true", help="JSON-lines events on stderr")
    p.add_argument("--deployment", metavar="NAME",
                   help="the deployment to run (a plan with deployments: docs/deployments.md)")
    argtypes.add_force_flag(p)
    add_store_flags(p)
    p.set_defaults(handler=cmd_run)
