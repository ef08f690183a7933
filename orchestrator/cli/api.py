"""The control API's clients (docs/api.md): ``modelip events --api ADDR`` (watch from a
revision) and ``modelip fleet --api ADDR`` (list)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from orchestrator.cli import argtypes
from orchestrator.errors import UnreachableError, UsageError


def _failure(err: Any, address: str) -> Exception:
    """A failed API call as one line and its exit code."""
    import grpc

    code = err.code()
    said = err.details() or code.name
    if code in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.INVALID_ARGUMENT):
        return UsageError(f"--since: {said}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return UnreachableError(address, "the control API does not answer (is a `modelip "
                                "deploy` or `watch` with --api running there?)")
    return UnreachableError(address, f"control API: {code.name}: {said}")


def _line(change: Any) -> str:
    from orchestrator._proto.modelip.v1 import control_pb2
    from orchestrator.terminal import terminal_safe

    C = control_pb2.Change  # noqa: N806 - the message's name
    if change.type == C.CARD:
        c = change.card
        was = f" (was {c.previous})" if c.previous else ""
        text = (f"{change.revision:>8}  card {c.host}/{c.device} {c.card_id} {c.state}{was} "
                f"boot {c.boot_counter}" + (f": {c.reason}" if c.reason else ""))
    elif change.type == C.HOST:
        h = change.host
        was = f" (was {h.previous})" if h.previous else ""
        text = f"{change.revision:>8}  host {h.host} {h.state}{was}" + \
            (f": {h.reason}" if h.reason else "")
    elif change.type == C.ROLLOUT:
        r = change.rollout
        text = f"{change.revision:>8}  rollout {r.rollout} wave {r.wave + 1} {r.phase}: {r.what}"
    else:
        text = f"{change.revision:>8}  {C.Type.Name(change.type).lower().replace('_', ' ')}"
    return terminal_safe(text, 2000)


def _json(message: Any) -> str:
    from google.protobuf.json_format import MessageToDict

    return json.dumps(MessageToDict(message, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True))


def cmd_events(args: argparse.Namespace) -> int:
    import anyio

    return anyio.run(_events, args)


async def _events(args: argparse.Namespace) -> int:
    import grpc

    from orchestrator._proto.modelip.v1 import control_pb2, control_pb2_grpc

    request = control_pb2.WatchRequest() if args.since is None else \
        control_pb2.WatchRequest(since=args.since)
    async with grpc.aio.insecure_channel(args.api) as channel:
        try:
            async for change in control_pb2_grpc.ControlStub(channel).Watch(request):
                bookmark = change.type == control_pb2.Change.BOOKMARK
                if args.json:
                    print(_json(change), flush=True)
                elif not bookmark:
                    print(_line(change), flush=True)
                if bookmark and not args.follow:
                    return 0  # caught up
        except grpc.aio.AioRpcError as err:
            raise _failure(err, args.api) from None
    return 0


def cmd_fleet(args: argparse.Namespace) -> int:
    import anyio

    return anyio.run(_fleet, args)


async def _fleet(args: argparse.Namespace) -> int:
    import grpc

    from orchestrator._proto.modelip.v1 import control_pb2, control_pb2_grpc
    from orchestrator.terminal import terminal_safe

    async with grpc.aio.insecure_channel(args.api) as channel:
        try:
            listing = await control_pb2_grpc.ControlStub(channel).List(
                control_pb2.ListRequest(), timeout=10)
        except grpc.aio.AioRpcError as err:
            raise _failure(err, args.api) from None
    if args.json:
        print(_json(listing))
        return 0
    print(f"revision {listing.revision}: {len(listing.hosts)} hosts, {len(listing.cards)} "
          f"cards, {sum(c.state == 'SERVING' for c in listing.cards)} serving")
    for h in listing.hosts:
        print(terminal_safe(f"  host {h.host} {h.state}" + (f": {h.reason}" if h.reason
                                                              else ""), 500))
    for c in listing.cards:
        print(terminal_safe(f"  card {c.host}/{c.device} {c.card_id} {c.state} boot "
                            f"{c.boot_counter}" + (f": {c.reason}" if c.reason else ""), 500))
    return 0


def register(sub: Any) -> None:
    """Add events and fleet to the main parser."""
    p = sub.add_parser("events", help="the fleet's changes from the control API, from a "
                                      "revision (docs/api.md)")
    p.add_argument("--api", required=True, metavar="ADDR",
                   help="where a `deploy`/`watch --api` serves it, e.g. 127.0.0.1:62480")
    p.add_argument("--since", type=argtypes.revision, metavar="REV",
                   help="every change after this revision (default: the fleet as it is, "
                        "then the changes)")
    p.add_argument("--follow", action="store_true",
                   help="keep watching (default: stop once caught up)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per change, bookmarks included")
    p.set_defaults(handler=cmd_events)
    p = sub.add_parser("fleet", help="the fleet's hosts and cards at one revision, from the "
                                     "control API")
    p.add_argument("--api", required=True, metavar="ADDR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_fleet)
