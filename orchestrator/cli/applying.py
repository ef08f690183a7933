"""``modelip apply PLAN [--dry-run]``: hand a changed plan with deployments to the
watch running its fleet (docs/deployments.md "Applying"), after saying what will
change."""

from __future__ import annotations

import argparse
import getpass
import os
import time
from pathlib import Path
from typing import Any

from orchestrator.cli import argtypes
from orchestrator.errors import UsageError

WAIT = 120.0     # seconds `apply` waits for the watch's answer by default


def watch_pid(state_dir: Path) -> int | None:
    """The pid of the `modelip watch` holding the state directory, if one runs."""
    try:
        pid = int((state_dir / "lock").read_text().split()[0])
        said = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    ours = any(arg == b"orchestrator" or arg.endswith(b"/modelip") or arg == b"modelip"
               for arg in said)
    return pid if ours and b"watch" in said else None


def cmd_apply(args: argparse.Namespace) -> int:
    import anyio

    from orchestrator.app import existing_journal
    from orchestrator.apply import digest, plan_changes
    from orchestrator.cli.fleet import load_plan
    from orchestrator.engine.store.applies import APPLIED, REQUESTED, Applies

    plan = load_plan(args)
    if plan.shared:
        raise UsageError(f"{plan.source}: deployments with a shared store are not built "
                         "yet; apply is for the embedded journal")
    with existing_journal(plan, read_only=True) as journal:
        placed = anyio.run(journal.placements)
    applies = Applies(plan.journal_path)
    running = applies.running()
    if not running:
        raise UsageError(f"{plan.journal_path}: no fleet with deployments has run here yet "
                         f"(`modelip deploy {args.plan}` starts one)")
    changes = plan_changes(plan, running, placed)
    for line in changes.lines():
        print(line)
    if args.dry_run:
        print("dry run: nothing applied")
        return 0
    if not changes.changed:
        print("nothing to change")
        return 0
    pid = watch_pid(plan.state_dir)
    if pid is None:
        raise UsageError(f"no `modelip watch` runs on {plan.state_dir}: `modelip deploy "
                         f"{args.plan}` applies this plan")
    number = applies.request(plan.source.resolve(), digest(plan.source),
                             f"{getpass.getuser()} (pid {os.getpid()})")
    print(f"handed to the watch (pid {pid}) as request {number}")
    deadline = time.monotonic() + args.wait
    while (request := applies.get(number)) is not None and request.state == REQUESTED:
        if time.monotonic() > deadline:
            print(f"the watch has not answered in {args.wait:g} s: request {number} stays, "
                  "and is applied when the watch takes it")
            return 4
        time.sleep(0.2)
    assert request is not None  # noqa: S101 - written above
    if request.state != APPLIED:
        raise UsageError(f"the watch refused it: {request.said}")
    print("applied (the cards come up now: `modelip status PLAN` shows them):")
    for line in request.said.splitlines():
        print(f"  {line}")
    return 0


def register(sub: Any) -> None:
    from orchestrator.cli.fleet import add_store_flags

    p = sub.add_parser("apply", help="hand a changed plan with deployments to the watch "
                                     "running its fleet (docs/deployments.md)")
    p.add_argument("plan")
    p.add_argument("--dry-run", action="store_true",
                   help="say what would change, apply nothing")
    p.add_argument("--wait", type=argtypes.positive, default=WAIT,
                   help=f"seconds to wait for the watch's answer (default {WAIT:g})")
    add_store_flags(p, replica=False)
    p.set_defaults(handler=cmd_apply)
