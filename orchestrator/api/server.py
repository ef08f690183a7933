"""The control API's server (protos/modelip/v1/control.proto, docs/api.md): the fleet
listed at a revision, every change after a revision, read from the store; and
operators' commands, by role.

What it serves comes from the store alone (the journal, or the shared PostgreSQL
store), so every replica of a shared fleet serves the same revisions. It waits for
changes on the engine's word that something moved (``changed``), or polls.

Who asks: with ``api.tls``, the name on the caller's client certificate (issued by
``api.tls.client_ca``; its subject CN, else a SAN) and the role ``api.roles`` gives
it (a certificate the plan names nowhere is a viewer); without TLS the API is on
loopback and a caller is "loopback", an operator (as anyone who can write the
journal is).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeAlias

import anyio
import grpc
from anyio.abc import TaskStatus
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from orchestrator._proto.modelip.v1 import control_pb2
from orchestrator.api.feed import LOOK_EVERY, PAGE, C, ChangeFeed, change_message, entry
from orchestrator.engine.rollout.ledgers import requested_ledger
from orchestrator.engine.rollout.requests import request as request_rollout
from orchestrator.engine.store.protocol import Store
from orchestrator.errors import ModelIPError, UsageError
from orchestrator.plan.api import ROLES, ApiSpec, History
from orchestrator.plan.paths import is_loopback

OLDEST_KEY = "modelip-oldest-revision"
BOOKMARK_EVERY = 5.0      # seconds of quiet between bookmarks
TRIM_EVERY = 60.0
_log = logging.getLogger("modelip.api")


RANK = {role: rank for rank, role in enumerate(ROLES)}
# the engine's release of a quarantined card: (host, device, who) -> what was done
Release = Callable[[str, int, str], "str | Awaitable[str]"]
# the engine's look at the store's cordons after one changed
Cordoned = Callable[[], Awaitable[None]]


async def refuse(context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode,
                 said: str) -> NoReturn:
    """End the call with ``code`` (grpc's abort raises; said here for the reader)."""
    await context.abort(code, said)
    raise AssertionError(said)


class ControlService:
    """The Control service (control.proto); registered by serve_api, which sends
    Watch's batches as they are already serialized."""

    def __init__(self, store: Store, feed: ChangeFeed, *, spec: ApiSpec | None = None,
                 release: Release | None = None, cordoned: Cordoned | None = None) -> None:
        self.store = store
        self.feed = feed
        self.spec = spec or ApiSpec()
        self.release = release
        self.cordoned = cordoned

    def caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, str]:
        """(who, role) of the call's caller."""
        if self.spec.tls is None:
            return "loopback", "operator"
        auth = context.auth_context()
        names = [n.decode(errors="replace") for n in
                 (*auth.get("x509_common_name", ()), *auth.get("x509_subject_alternative_name",
                                                               ()))]
        for name in names:
            if name in self.spec.roles:
                return name, self.spec.roles[name]
        return (names[0] if names else "?"), "viewer"

    async def allowed(self, context: grpc.aio.ServicerContext[Any, Any], needs: str,
                      command: str | None = None) -> tuple[str, str]:
        """The caller, if its role is ``needs`` or above; else PERMISSION_DENIED (a
        refused command journaled)."""
        who, role = self.caller(context)
        if RANK[role] >= RANK[needs]:
            return who, role
        if command is not None:
            await self.store.record_command(who, role, command, f"refused: needs {needs}")
        await refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                     f"{who} is {role}; {command or 'this'} needs {needs}")

    async def _listing(self) -> tuple[int, list[control_pb2.Host], list[control_pb2.Card]]:
        # the revision first: the listing is at it or (a shared store's other writers)
        # shortly after it; what is after it is sent again as a change, never lost
        _, revision = await self.store.revisions()
        cordons = await self.store.cordons()
        hosts = [control_pb2.Host(host=h.host, state=h.state, reason=h.reason,
                                  cordoned_by=cordons.get(h.host, ""))
                 for h in await self.store.hosts()]
        cards = [control_pb2.Card(host=c.host, device=c.device, card_id=c.card_id,
                                  state=c.state, boot_counter=c.boot_counter,
                                  session_id=c.session_id, program_id=c.program_id,
                                  reason=c.reason, attempts=c.attempts)
                 for c in await self.store.cards()]
        return revision, hosts, cards

    async def List(self, request: control_pb2.ListRequest,  # noqa: N802
                   context: grpc.aio.ServicerContext[Any, Any]) -> control_pb2.ListResponse:
        await self.allowed(context, "viewer")
        revision, hosts, cards = await self._listing()
        return control_pb2.ListResponse(revision=revision, hosts=hosts, cards=cards)

    async def Watch(self, request: control_pb2.WatchRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        """Serialized ChangeBatch messages (the server sends them as they are)."""
        await self.allowed(context, "viewer")
        oldest, newest = await self.store.revisions()
        if request.HasField("since"):
            last = request.since
            if last > newest:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"revision {last} is from the future: the newest is "
                                    f"{newest}")
            await self._check_kept(last, oldest, context)
        else:
            last, hosts, cards = await self._listing()
            snapshot = control_pb2.ChangeBatch(changes=[
                *(C(revision=last, type=C.HOST, host=host) for host in hosts),
                *(C(revision=last, type=C.CARD, card=card) for card in cards),
                C(revision=last, type=C.SNAPSHOT_END)])
            yield snapshot.SerializeToString()
        quiet_since: float | None = None  # None: the backlog is not sent yet
        backlog = newest   # the first bookmark comes after every change journaled by now
        while True:
            held = self.feed.after(last)
            if held is None or (last < backlog and self.feed.newest < backlog):
                # further back than the feed holds, or ahead of it: from the store
                await self._check_kept(last, (await self.store.revisions())[0], context)
                changes = await self.store.changes(last, PAGE)
                if not changes:  # nothing more there now
                    backlog = last
                    if held is None:
                        with anyio.move_on_after(self.feed.look_every):
                            await self.feed.moved()
                    continue
                last = changes[-1].revision
                yield b"".join(entry(change_message(change)) for change in changes)
                continue
            last, ready = held
            now = anyio.current_time()
            if quiet_since is None or now - quiet_since >= BOOKMARK_EVERY:
                ready += entry(C(revision=last, type=C.BOOKMARK))  # caught up to here
                quiet_since = now
            if ready:
                yield ready
            with anyio.move_on_after(BOOKMARK_EVERY - (now - quiet_since)):
                await self.feed.moved()

    async def RolloutCommand(self, request: control_pb2.RolloutCommandRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext[Any, Any]
                             ) -> control_pb2.CommandResponse:
        action = {request.PAUSE: "pause", request.RESUME: "resume",
                  request.UNDO: "undo", request.APPROVE: "approve"}.get(request.action)
        if action is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "action: one of PAUSE, RESUME, UNDO, APPROVE")
        command = f"rollout {action}"
        who, role = await self.allowed(context, "operator", command)
        try:
            done = await request_rollout(
                await requested_ledger(self.store, request.deployment or None), str(action),
                f"{who} ({role}, control API)")
        except UsageError as err:
            await self.store.record_command(who, role, command, f"refused: {err}")
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
            raise
        await self.store.record_command(who, role, command,
                                        "done" if done.written else "already so")
        return control_pb2.CommandResponse(said=done.said, rollout=done.rollout,
                                           written=done.written)

    async def ReleaseCard(self, request: control_pb2.CardRef,  # noqa: N802
                          context: grpc.aio.ServicerContext[Any, Any]
                          ) -> control_pb2.CommandResponse:
        command = f"release {request.host[:200]}/{request.device}"
        who, role = await self.allowed(context, "admin", command)
        if self.release is None:
            await refuse(context, grpc.StatusCode.FAILED_PRECONDITION,
                         "no engine runs behind this API")
        try:
            said = self.release(request.host, request.device, f"{who} ({role}, control API)")
            if not isinstance(said, str):   # asked of an engine in another process
                said = await said
        except UsageError as err:
            await self.store.record_command(who, role, command, f"refused: {err}")
            await refuse(context, grpc.StatusCode.FAILED_PRECONDITION, str(err))
        await self.store.record_command(who, role, command, "done")
        return control_pb2.CommandResponse(said=said, written=True)

    async def CordonHost(self, request: control_pb2.HostRef,  # noqa: N802
                         context: grpc.aio.ServicerContext[Any, Any]
                         ) -> control_pb2.CommandResponse:
        return await self._cordon(request.host, context, cordon=True)

    async def UncordonHost(self, request: control_pb2.HostRef,  # noqa: N802
                           context: grpc.aio.ServicerContext[Any, Any]
                           ) -> control_pb2.CommandResponse:
        return await self._cordon(request.host, context, cordon=False)

    async def _cordon(self, host: str, context: grpc.aio.ServicerContext[Any, Any], *,
                      cordon: bool) -> control_pb2.CommandResponse:
        action = "cordon" if cordon else "uncordon"
        command = f"{action} {host[:200]}"
        who, role = await self.allowed(context, "operator", command)
        known = {h.host for h in await self.store.hosts()} or \
            {c.host for c in await self.store.cards()}
        if host not in known:
            await self.store.record_command(who, role, command, "refused: no such host")
            await refuse(context, grpc.StatusCode.NOT_FOUND,
                         f"host {host[:200]!r} is not a host of this fleet")
        written = await self.store.set_cordon(host, f"{who} ({role})" if cordon else None)
        await self.store.record_command(who, role, command,
                                        "done" if written else "already so")
        if self.cordoned is not None:
            await self.cordoned()
        said = (f"host {host} cordoned: none of its cards is keyed or loaded until it is "
                "uncordoned; its serving cards serve until they reset") if cordon else \
            f"host {host} uncordoned: its cards that wait are keyed again"
        if not written:
            said = f"host {host} is {'already cordoned' if cordon else 'not cordoned'}"
        return control_pb2.CommandResponse(said=said, written=written)

    async def _check_kept(self, last: int, oldest: int,
                          context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if oldest and last + 1 < oldest:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE,
                                f"revision {last} is older than the history kept (the "
                                f"oldest is {oldest}): list again, then watch from there",
                                trailing_metadata=((OLDEST_KEY, str(oldest)),))


async def serve_api(spec: ApiSpec, store: Store,
                    changed: Callable[[], Awaitable[None]] | None = None, *,
                    release: Release | None = None, cordoned: Cordoned | None = None,
                    look_every: float = LOOK_EVERY,
                    task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve the control API as ``spec`` says until cancelled (mutual TLS with
    ``spec.tls``; without it, loopback only); reports the address bound; trims the
    history kept meanwhile. Changes are read from the store when ``changed`` returns
    (the engine's word that something moved), and every ``look_every`` seconds."""
    address = spec.listen
    if spec.tls is None and not is_loopback(address):
        raise UsageError(f"api {address}: without api.tls (cert, key, client_ca) the control "
                         "API listens on loopback only (docs/api.md)")
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    feed = ChangeFeed(store, changed, look_every=look_every)
    service = ControlService(store, feed, spec=spec, release=release, cordoned=cordoned)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "modelip.v1.Control", {
            "List": grpc.unary_unary_rpc_method_handler(
                _answered(service.List),
                request_deserializer=control_pb2.ListRequest.FromString,
                response_serializer=control_pb2.ListResponse.SerializeToString),
            "Watch": grpc.unary_stream_rpc_method_handler(   # already serialized
                _streamed(service.Watch),
                request_deserializer=control_pb2.WatchRequest.FromString,
                response_serializer=bytes),
            "RolloutCommand": grpc.unary_unary_rpc_method_handler(
                _answered(service.RolloutCommand),
                request_deserializer=control_pb2.RolloutCommandRequest.FromString,
                response_serializer=control_pb2.CommandResponse.SerializeToString),
            "ReleaseCard": grpc.unary_unary_rpc_method_handler(
                _answered(service.ReleaseCard),
                request_deserializer=control_pb2.CardRef.FromString,
                response_serializer=control_pb2.CommandResponse.SerializeToString),
            **{name: grpc.unary_unary_rpc_method_handler(
                _answered(method), request_deserializer=control_pb2.HostRef.FromString,
                response_serializer=control_pb2.CommandResponse.SerializeToString)
               for name, method in (("CordonHost", service.CordonHost),
                                    ("UncordonHost", service.UncordonHost))}}),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (control_pb2.DESCRIPTOR.services_by_name["Control"].full_name,
         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    try:
        if spec.tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, grpc.ssl_server_credentials(
                [(spec.tls.key.read_bytes(), spec.tls.cert.read_bytes())],
                root_certificates=spec.tls.client_ca.read_bytes(),
                require_client_auth=True))
    except RuntimeError:
        port = 0
    if port == 0:
        raise UsageError(f"api {address}: cannot listen there (the port is in use, or it "
                         "is not an address of this machine)")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(feed.run)
            task_status.started(f"{address.rsplit(':', 1)[0]}:{port}")
            await _trim(store, spec.history)
    finally:
        with anyio.CancelScope(shield=True):
            await server.stop(0.5)


Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def _answered(method: Callable[[Any, Context], Awaitable[Any]]
              ) -> Callable[[Any, Context], Awaitable[Any]]:
    """A call that the store fails (away, unreadable) answers UNAVAILABLE saying why,
    in one line, not gRPC's UNKNOWN with a Python class name."""
    async def answer(request: Any, context: Context) -> Any:
        try:
            return await method(request, context)
        except ModelIPError as err:
            await refuse(context, grpc.StatusCode.UNAVAILABLE, f"the store: {err}")
    return answer


def _streamed(method: Callable[[Any, Context], AsyncIterator[bytes]]
              ) -> Callable[[Any, Context], AsyncIterator[bytes]]:
    """As _answered, for a stream."""
    async def stream(request: Any, context: Context) -> AsyncIterator[bytes]:
        try:
            async for message in method(request, context):
                yield message
        except ModelIPError as err:
            await refuse(context, grpc.StatusCode.UNAVAILABLE, f"the store: {err}")
    return stream


async def _trim(store: Store, history: History) -> None:
    """Keep the history to its window (``api.history``), every TRIM_EVERY seconds."""
    while True:
        try:
            await store.trim_changes(history.revisions, history.seconds)
        except Exception as err:  # noqa: BLE001 - trimming waits for the next time
            _log.warning("cannot trim the history of changes: %s", err)
        await anyio.sleep(TRIM_EVERY)
