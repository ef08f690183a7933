"""modelip rollout status | pause | resume | undo | approve PLAN (docs/rollouts.md).

Requests are written into the plan's journal; the orchestrator running the plan
(deploy or watch) carries them out within a second, or the next one does.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from orchestrator.errors import UsageError


def cmd_rollout(args: argparse.Namespace) -> int:
    import anyio

    from orchestrator.app import existing_journal
    from orchestrator.cli.fleet import check_deployment, load_plan

    action = args.rollout_command
    if (args.plan is None) == (getattr(args, "api", None) is None):
        raise UsageError(f"rollout {action}: give the plan, or --api ADDR"
                         if action != "status" else "rollout status: give the plan")
    if args.plan is None:
        from orchestrator.cli.api import rollout_command

        return anyio.run(rollout_command, args, action)
    plan = load_plan(args, quiet=True)
    check_deployment(plan, args.deployment)
    if plan.shared:   # the replicas' store: whoever leads the rollout carries it out
        return anyio.run(_on_shared_store, plan, action, args)
    with existing_journal(plan, read_only=action == "status") as journal:
        if action == "status":
            return _show(anyio.run(_statuses, journal, plan, args.deployment), args)
        return anyio.run(_request, journal, plan, action, args.deployment)


async def _on_shared_store(plan: Any, action: str, args: argparse.Namespace) -> int:
    from orchestrator.app import shared_store

    async with shared_store(plan, f"operator-{os.getpid()}", migrate=False) as store:
        if action == "status":
            return _show(await _statuses(store, plan, args.deployment), args)
        return await _request(store, plan, action, args.deployment)


def _show(view: dict[str, Any], args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        _print_status(view)
    return 0


async def _statuses(journal: Any, plan: Any, name: str | None) -> dict[str, Any]:
    """The fleet's rollout; with deployments, the named one's, or each one's."""
    if not plan.deployments:
        return await _status(journal)
    views = [await _status(journal, d.name) for d in plan.deployments
             if name in (None, d.name)]
    return views[0] if name else {"deployments": views}


async def _status(journal: Any, deployment: str = "") -> dict[str, Any]:
    from orchestrator.engine.events import iso_time
    from orchestrator.engine.rollout.ledgers import ledger_for

    ledger = ledger_for(journal, deployment)
    current = await ledger.fleet_program()
    serving = await ledger.program(current) if current else None
    version = serving.version if serving else None
    view: dict[str, Any] = {"deployment": deployment, "program": current,
                            "version": version} if deployment else {
        "fleet_program": current, "fleet_version": version}
    view["rollout"] = None
    record = await ledger.latest()
    if record is None:
        return view
    versions = {pid: (p.version if p else None) for pid in
                (record.from_program, record.candidate, record.to_program)
                for p in [await ledger.program(pid)]}
    mine = {(g.host, device) for g in (await journal.placements()).get(deployment, ())
            for device in g.devices} if deployment else None
    groups: dict[int, set[str]] = {}
    for card in await journal.cards():
        if mine is not None and (card.host, card.device) not in mine:
            continue
        good = card.known_good.program_id if card.known_good else ""
        groups.setdefault(card.group, set()).add(good)
    by_program = Counter(next(iter(held)) if len(held) == 1 else "" for held in groups.values())
    view["rollout"] = {
        "id": record.id, "phase": record.phase.value, "wave": record.wave + 1,
        "waves": list(record.waves), "paused": record.paused, "undo_requested": record.undo,
        "approval_waves": [w + 1 for w in record.manual], "approved_through": record.approved + 1,
        "awaits_approval": record.phase.value in ("switching", "gating") and any(
            w >= record.wave and w > record.approved for w in record.manual),
        "verdict": record.verdict, "leader": await ledger.leader(),
        "started": iso_time(record.started),
        "ended": iso_time(record.ended) if record.ended else None,
        "from": {"program": record.from_program, "version": versions[record.from_program]},
        "candidate": {"program": record.candidate, "version": versions[record.candidate]},
        "to": {"program": record.to_program, "version": versions[record.to_program]},
        "groups": {"old": by_program[record.from_program],
                   "new": by_program[record.candidate] + (
                       by_program[record.to_program] if record.to_program != record.candidate
                       else 0),
                   "other": sum(n for pid, n in by_program.items() if pid not in
                                (record.from_program, record.candidate, record.to_program)),
                   "total": len(groups)},
        "history": [{"time": iso_time(h.ts), "wave": h.wave + 1, "phase": h.phase,
                     "what": h.what} for h in await ledger.history(record.id)]}
    return view


def _print_status(view: dict[str, Any]) -> None:
    for each in view.get("deployments", ()):
        print(f"deployment {each['deployment']}:")
        _print_status(each)
    if "deployments" in view:
        return
    r = view["rollout"]
    if r is None:
        whose = f"deployment {view['deployment']}" if "deployment" in view else "the fleet"
        version = view.get("version", view.get("fleet_version"))
        program = view.get("program", view.get("fleet_program")) or ""
        print("no rollout recorded" + (f"; {whose} serves version {version} (program "
                                       f"{program[:16]})" if version else ""))
        return
    flags = " (paused)" if r["paused"] else ""
    waiting = [w for w in r["approval_waves"] if w > r["approved_through"]]
    flags += f" (wave {waiting[0]} waits for `modelip rollout approve`)" if \
        r["awaits_approval"] and waiting else ""
    flags += " (undo requested)" if r["undo_requested"] and r["phase"] in (
        "switching", "gating") else ""
    print(f"rollout {r['id']}: version {r['from']['version']} -> {r['to']['version']}, "
          f"{r['phase']}, wave {r['wave']} of {len(r['waves'])}{flags}")
    g = r["groups"]
    other = f", {g['other']} on neither yet" if g["other"] else ""
    print(f"groups (as last recorded): {g['new']} on version {r['to']['version']}, {g['old']} "
          f"on version {r['from']['version']}{other}, of {g['total']}")
    print(f"waves end at {', '.join(map(str, r['waves']))} groups")
    if r["leader"]:
        print(f"led by replica {r['leader']}")
    if r["verdict"]:
        print(f"verdict: {r['verdict']}")
    for h in r["history"]:
        print(f"  {h['time'][:19].replace('T', ' ')}  wave {h['wave']}  {h['phase']:<12} "
              f"{h['what']}")


async def _request(journal: Any, plan: Any, action: str, deployment: str | None) -> int:
    from orchestrator.engine.rollout.ledgers import requested_ledger
    from orchestrator.engine.rollout.requests import request

    try:
        done = await request(await requested_ledger(journal, deployment), action,
                             f"modelip rollout {action}")
    except UsageError as err:
        raise UsageError(f"{plan.source}: {err}") from None
    if not done.written:
        print(done.said)
        return 0
    if plan.shared:
        print(f"{done.said}; the replica leading the rollout carries it out within a "
              "second (or the next one to lead)")
        return 0
    pid = _orchestrator_pid(plan.state_dir)
    if pid:
        print(f"{done.said}; the orchestrator running this plan (pid {pid}) carries it out "
              "within a second")
    else:
        print(f"{done.said}; no orchestrator runs this plan now: `modelip deploy "
              f"{plan.source}` carries it out")
    return 0


def _orchestrator_pid(state_dir: Path) -> int | None:
    """The pid in the state directory's lock, if that process is alive (a hint for the
    message only: the lock itself is not touched, so a deploy starting now is not hurt)."""
    try:
        pid = int((state_dir / "lock").read_text().strip() or 0)
        if pid:
            os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid or None


def register(sub: Any) -> None:
    from orchestrator.cli.fleet import add_store_flags

    rollout = sub.add_parser("rollout", help="a rollout of a new model version: status, "
                             "pause, resume, undo, approve (docs/rollouts.md)")
    actions = rollout.add_subparsers(dest="rollout_command", required=True, metavar="COMMAND")
    for name, text in (("status", "where the rollout stands, wave by wave"),
                       ("pause", "switch no more groups until resumed"),
                       ("resume", "carry on after a pause"),
                       ("undo", "roll every switched group back to the previous version"),
                       ("approve", "let the next wave that waits for an approval (a step "
                                   "with approval: manual) be switched")):
        p = actions.add_parser(name, help=text)
        p.add_argument("plan", nargs="?" if name != "status" else None,
                       help="the plan (its journal, on this machine)" if name != "status"
                       else None)
        add_store_flags(p, replica=False)
        p.add_argument("--deployment", metavar="NAME",
                       help="with deployments: whose rollout (default: every one's for "
                            "status; the only one in progress for a request)")
        if name == "status":
            p.add_argument("--json", action="store_true", help="everything, for scripts")
        else:
            from orchestrator.cli.api import add_api_flags

            add_api_flags(p, required=False)
        p.set_defaults(handler=cmd_rollout)
