"""`modelip status PLAN`: the store's view of the fleet, read without calling any host
(the live view's picture as last recorded, one line per card with --cards, or
everything as JSON)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from orchestrator.cli.fleet import add_store_flags, check_deployment, load_plan
from orchestrator.errors import ModelIPError

if TYPE_CHECKING:  # imported where used: `modelip --help` and the file commands stay quick
    from orchestrator.plan.model import Plan



def cmd_status(args: argparse.Namespace) -> int:
    import shutil
    import time

    import anyio

    from orchestrator.views.dashboard import render
    from orchestrator.views.stored import stored_snapshot

    plan = load_plan(args, quiet=True)
    check_deployment(plan, args.deployment)
    view = anyio.run(_read_status, plan, args.deployment)
    snap = stored_snapshot(*view.pop("_records"), now=time.time())
    rollup = view["rollup"] = {
        "cards": len(snap.cards), "by_state": snap.counts,
        "hosts": len(snap.hosts), "hosts_up": sum(h.state == "UP" for h in snap.hosts),
        "groups": snap.groups, "groups_serving": snap.groups_serving,
        "loads": len(view["loads"])}
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    console, table_of = _tables()
    if args.cards:
        _card_table(plan, view, table_of, console)
    else:
        width, height = shutil.get_terminal_size((160, 50)) if sys.stdout.isatty() \
            else (160, 50)
        console.print(render(snap, title=f"{plan.source.name}: {view['store']} (as last "
                             "recorded)", width=width, height=height - 2 - len(
                                 view.get("replicas", ()))))
    at = f", revision {view['revision']}" if view["revision"] is not None else ""
    print(f"{snap.counts.get('SERVING', 0)}/{rollup['cards']} serving (as last recorded"
          f"{at}), {rollup['loads']} loads sent")
    for d in view.get("deployments", []):
        pending = " PENDING: fewer groups placed than wanted, until cards come back" \
            if d["groups_placed"] < d["groups_wanted"] else ""
        version = f" (version {d['version']})" if d.get("version") is not None else ""
        r = d.get("rollout")
        rollout = f"; rollout {r['id']} of version {r['from_version']} -> " \
            f"{r['to_version']}: {r['phase']}, wave {r['wave']} of {r['waves']}" if r else ""
        print(f"deployment {d['name']}{version}: {d['groups_serving']}/{d['groups_placed']} "
              f"groups serving, {d['groups_wanted']} wanted ({d['cards']} cards)"
              f"{pending}{rollout}")
    for r in view.get("replicas", []):
        held = sum(h["owner"] == r["name"] for h in view["hosts"])
        print(f"replica {r['name']}: {'alive' if r['alive'] else 'gone'}, holds {held} "
              f"hosts, last heartbeat {r['heartbeat']}")
    return 0


def _card_table(plan: Plan, view: dict[str, Any], table_of: Any, console: Any) -> None:
    if view["hosts"]:
        columns = ["host", "address", "state", "reason"]
        if plan.shared:
            columns[3:3] = ["replica", "lease until"]
        table = table_of(f"{plan.source.name}: hosts", columns)
        for h in view["hosts"]:
            row = [h["host"], h["address"], h["state"], h["reason"][:80]]
            if plan.shared:
                row[3:3] = [h["owner"] or "-", (h["lease_expires"] or "-")[11:19]]
            table.add_row(*row)
        console.print(table)
    deployments = bool(plan.deployments)
    table = table_of(f"{plan.source.name}: {view['store']}",
                     ["host", "card", "card id", "group", "part", *(["deployment"] if
                                                                    deployments else []),
                      "state", "boot", "session", "reason"])
    for c in view["cards"]:
        table.add_row(c["host"], str(c["device"]), c["card_id"], str(c["group"]),
                      str(c["partition"]), *([c["deployment"]] if deployments else []),
                      c["state"], str(c["boot_counter"]), c["session_id"][:16],
                      c["reason"][:60])
    console.print(table)


def _tables() -> tuple[Any, Callable[[str, list[str]], Any]]:
    """A console and a table maker: boxed on a terminal; piped, plain rows that are
    never wrapped (one line per row, for grep and less)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    tty = sys.stdout.isatty()
    console = Console() if tty else Console(width=400, soft_wrap=True)

    def table_of(title: str, columns: list[str]) -> Table:
        table = Table(title=title, box=box.HEAVY_HEAD if tty else box.SIMPLE,
                      title_justify="left")
        for column in columns:
            table.add_column(column, no_wrap=not tty)
        return table
    return console, table_of


async def _read_status(plan: Plan, deployment: str | None = None) -> dict[str, Any]:
    """What the store says, as plain values (times ISO 8601, UTC); with deployments,
    each card's and each deployment's groups (``deployment``: that one's cards only)."""
    from orchestrator.app import existing_journal, shared_store

    if plan.shared:
        async with shared_store(plan, "status", migrate=False) as store:
            view = await _store_view(store, store.label)
            view["replicas"] = [
                {"name": r.name, "alive": r.alive, "started": _iso(r.started),
                 "heartbeat": _iso(r.heartbeat)} for r in await store.replicas()]
            if plan.deployments:
                _by_deployment(view, plan, await store.placements(), deployment)
                await _versions(view, store)
            return view
    with existing_journal(plan, read_only=True) as journal:
        view = await _store_view(journal, f"journal {plan.journal_path}")
        if plan.deployments:
            _by_deployment(view, plan, await journal.placements(), deployment)
            await _versions(view, journal)
        return view


async def _versions(view: dict[str, Any], store: Any) -> None:
    """Each deployment's version and its last rollout, as the store records them (a
    journal from before rollouts per deployment: none)."""
    from orchestrator.engine.rollout.ledgers import ledger_for

    for d in view["deployments"]:
        d["version"], d["rollout"] = None, None
        ledger = ledger_for(store, d["name"])
        try:
            current = await ledger.fleet_program()
            record = await ledger.latest()
            serving = await ledger.program(current) if current else None
            d["version"] = serving.version if serving else None
            if record is not None:
                was, will = (await ledger.program(record.from_program),
                             await ledger.program(record.to_program))
                d["rollout"] = {"id": record.id, "phase": record.phase.value,
                                "wave": record.wave + 1, "waves": len(record.waves),
                                "from_version": was.version if was else None,
                                "to_version": will.version if will else None}
        except ModelIPError:
            continue


def _by_deployment(view: dict[str, Any], plan: Plan, placed: dict[str, Any],
                   only: str | None) -> None:
    """Each card's deployment (as placed), each deployment's groups serving (every card
    of the group SERVING); with ``only``, that deployment's cards alone."""
    of = {(g.host, device): name for name, groups in placed.items() for g in groups
          for device in g.devices}
    states = {(c["host"], c["device"]): c["state"] for c in view["cards"]}
    for card in view["cards"]:
        card["deployment"] = of.get((card["host"], card["device"]), "")
    view["deployments"] = [{
        "name": d.name, "groups_wanted": d.groups,
        "groups_placed": len(placed.get(d.name, [])),
        "groups_serving": sum(all(states.get((g.host, device)) == "SERVING"
                                  for device in g.devices) for g in placed.get(d.name, [])),
        "cards": sum(len(g.devices) for g in placed.get(d.name, []))}
        for d in plan.deployments if only in (None, d.name)]
    if only is not None:
        view["cards"] = [c for c in view["cards"] if c["deployment"] == only]
        cards, hosts, moves = view["_records"]
        view["_records"] = ([c for c in cards if of.get((c.host, c.device)) == only], hosts,
                            [t for t in moves if of.get((t.host, t.device)) == only])


async def _store_view(store: Any, label: str) -> dict[str, Any]:
    """Plain values for --json (times ISO 8601), and the records under "_records"."""
    host_records, card_records = await store.hosts(), await store.cards()
    hosts = [{**dataclasses.asdict(h), "updated": _iso(h.updated),
              "lease_expires": _iso(h.lease_expires)} for h in host_records]
    cards = [{**dataclasses.asdict(c), "updated": _iso(c.updated)} for c in card_records]
    loads = [dataclasses.asdict(r) for r in await store.loads()]
    try:
        _, revision = await store.revisions()
    except ModelIPError:   # a journal from before revisions, read without changing it
        revision = None
    return {"store": label, "revision": revision, "hosts": hosts, "cards": cards,
            "loads": loads,
            "_records": (card_records, host_records, await store.transitions(12))}


def _iso(ts: float | None) -> str | None:
    from orchestrator.engine.events import iso_time

    return iso_time(ts) if ts else None


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="the store's view of the fleet (no host is called)")
    p.add_argument("plan")
    p.add_argument("--json", action="store_true", help="everything, for scripts")
    p.add_argument("--cards", action="store_true", help="one line per card (and per host)")
    p.add_argument("--deployment", metavar="NAME",
                   help="that deployment's cards only (a plan with deployments)")
    add_store_flags(p, replica=False)
    p.set_defaults(handler=cmd_status)
