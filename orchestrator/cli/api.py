"""The control API's clients (docs/api.md): ``modelip events --api ADDR`` (watch from a
revision), ``modelip fleet --api ADDR`` (list) and the commands (``modelip rollout
pause|resume|undo|approve --api ADDR``, ``cordon``, ``uncordon``, ``release``); mutual
TLS with --tls-ca/--tls-cert/--tls-key."""

from __future__ import annotations

import argparse
import json
from typing import Any

from orchestrator.cli import argtypes
from orchestrator.errors import PermissionDenied, UnreachableError, UsageError


def channel(args: argparse.Namespace) -> Any:
    """A channel to the API (the hosts' kind: transport/client.py): plaintext on
    loopback, TLS with --tls-ca (mutual with --tls-cert and --tls-key); a listing of a
    large fleet comes in one message, so answers may be as large as the hosts' bulk."""
    from orchestrator.transport.client import open_channel
    from orchestrator.transport.types import MAX_MESSAGE, TLSClientConfig

    tls = None if args.tls_ca is None and args.tls_cert is None else \
        TLSClientConfig.from_paths(args.tls_ca, args.tls_cert, args.tls_key)
    return open_channel(args.api, tls, receive=MAX_MESSAGE)


def failure(err: Any, address: str, what: str) -> Exception:
    """A failed API call as one line and its exit code."""
    import grpc

    from orchestrator.terminal import terminal_safe

    code = err.code()
    said = terminal_safe(err.details() or code.name, 500)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(f"{address}: {said}")
    if code in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
        return UsageError(f"{what}: {said}")
    if code == grpc.StatusCode.UNAVAILABLE and said.startswith("the store:"):
        return UnreachableError(address, f"control API: {said}")  # it answered: its store not
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
            (f": {h.reason}" if h.reason else "") + \
            (f" [cordoned by {h.cordoned_by}]" if h.cordoned_by else "")
    elif change.type == C.ROLLOUT:
        r = change.rollout
        whose = f" ({r.deployment})" if r.deployment else ""
        text = (f"{change.revision:>8}  rollout {r.rollout}{whose} wave {r.wave + 1} "
                f"{r.phase}: {r.what}")
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
    async with channel(args) as chan:
        try:
            async for batch in control_pb2_grpc.ControlStub(chan).Watch(request):
                for change in batch.changes:
                    bookmark = change.type == control_pb2.Change.BOOKMARK
                    if args.json:
                        print(_json(change), flush=True)
                    elif not bookmark:
                        print(_line(change), flush=True)
                    if bookmark and not args.follow:
                        return 0  # caught up
        except grpc.aio.AioRpcError as err:
            raise failure(err, args.api, "--since") from None
    return 0


def cmd_fleet(args: argparse.Namespace) -> int:
    import anyio

    return anyio.run(_fleet, args)


async def _fleet(args: argparse.Namespace) -> int:
    import grpc

    from orchestrator._proto.modelip.v1 import control_pb2, control_pb2_grpc
    from orchestrator.terminal import terminal_safe

    async with channel(args) as chan:
        try:
            listing = await control_pb2_grpc.ControlStub(chan).List(
                control_pb2.ListRequest(), timeout=10)
        except grpc.aio.AioRpcError as err:
            raise failure(err, args.api, "fleet") from None
    if args.json:
        print(_json(listing))
        return 0
    print(f"revision {listing.revision}: {len(listing.hosts)} hosts, {len(listing.cards)} "
          f"cards, {sum(c.state == 'SERVING' for c in listing.cards)} serving")
    for h in listing.hosts:
        print(terminal_safe(f"  host {h.host} {h.state}" + (f": {h.reason}" if h.reason
                                                              else "") +
                            (f" [cordoned by {h.cordoned_by}]" if h.cordoned_by else ""),
                            500))
    for c in listing.cards:
        print(terminal_safe(f"  card {c.host}/{c.device} {c.card_id} {c.state} boot "
                            f"{c.boot_counter}" + (f": {c.reason}" if c.reason else ""), 500))
    return 0


async def rollout_command(args: argparse.Namespace, action: str) -> int:
    """``modelip rollout ACTION --api ADDR``: the command, in the caller's name."""
    import grpc

    from orchestrator._proto.modelip.v1 import control_pb2, control_pb2_grpc

    request = control_pb2.RolloutCommandRequest(action=action.upper(),
                                                deployment=args.deployment or "")
    async with channel(args) as chan:
        try:
            answer = await control_pb2_grpc.ControlStub(chan).RolloutCommand(request,
                                                                            timeout=10)
        except grpc.aio.AioRpcError as err:
            raise failure(err, args.api, f"rollout {action}") from None
    print(answer.said + ("; the orchestrator serving this API carries it out within a "
                         "second" if answer.written else ""))
    return 0


def cmd_command(args: argparse.Namespace) -> int:
    """``modelip release|cordon|uncordon ... --api ADDR``."""
    import anyio

    return anyio.run(_command, args)


async def _command(args: argparse.Namespace) -> int:
    import grpc

    from orchestrator._proto.modelip.v1 import control_pb2, control_pb2_grpc

    name = args.api_command
    async with channel(args) as chan:
        stub = control_pb2_grpc.ControlStub(chan)
        call, request = (
            (stub.ReleaseCard, control_pb2.CardRef(host=args.host, device=args.device))
            if name == "release" else
            (stub.CordonHost if name == "cordon" else stub.UncordonHost,
             control_pb2.HostRef(host=args.host)))
        try:
            answer = await call(request, timeout=10)
        except grpc.aio.AioRpcError as err:
            raise failure(err, args.api, name) from None
    print(answer.said)
    return 0


def add_api_flags(p: Any, *, required: bool = True) -> None:
    p.add_argument("--api", required=required, metavar="ADDR",
                   help="where a `deploy`/`watch` serves the control API, e.g. "
                        "127.0.0.1:62480")
    p.add_argument("--tls-ca", metavar="PEM", help="verify the API's server with this CA")
    p.add_argument("--tls-cert", metavar="PEM", help="this client's certificate (mTLS)")
    p.add_argument("--tls-key", metavar="PEM", help="this client's key (mTLS)")


def register(sub: Any) -> None:
    """Add events and fleet to the main parser."""
    p = sub.add_parser("events", help="the fleet's changes from the control API, from a "
                                      "revision (docs/api.md)")
    add_api_flags(p)
    p.add_argument("--since", type=argtypes.revision, metavar="REV",
                   help="every change after this revision (default: the fleet as it is, "
                        "then the changes)")
    p.add_argument("--follow", action="store_true",
                   help="keep watching (default: stop once caught up)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per change, bookmarks included")
    p.set_defaults(handler=cmd_events)
    p = sub.add_parser("release", help="try a quarantined card again (an admin's decision, "
                                       "through the control API)")
    p.add_argument("host", help="the card's host, as `modelip fleet --api` names it")
    p.add_argument("device", type=argtypes.device)
    add_api_flags(p)
    p.set_defaults(handler=cmd_command, api_command="release")
    for name, text in (
            ("cordon", "key and load no card of a host until uncordoned (its serving cards "
                       "serve until they reset), through the control API"),
            ("uncordon", "key the cards of a cordoned host again, through the control API")):
        p = sub.add_parser(name, help=text)
        p.add_argument("host", help="as `modelip fleet --api` names it")
        add_api_flags(p)
        p.set_defaults(handler=cmd_command, api_command=name)
    p = sub.add_parser("fleet", help="the fleet's hosts and cards at one revision, from the "
                                     "control API")
    add_api_flags(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_fleet)
