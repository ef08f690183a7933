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
from typing import Any, NoReturn

import anyio
import grpc
from anyio.abc import TaskStatus
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from orchestrator._proto.modelip.v1 import control_pb2, control_pb2_grpc
from orchestrator.engine.rollout.ledger import RolloutLedger
from orchestrator.engine.rollout.requests import request as request_rollout
from orchestrator.engine.store.protocol import ChangeRecord, Store
from orchestrator.engine.store.sqlite import SQLiteStore
from orchestrator.errors import UsageError
from orchestrator.plan.api import ROLES, ApiSpec
from orchestrator.plan.paths import is_loopback

C = control_pb2.Change
OLDEST_KEY = "modelip-oldest-revision"
BOOKMARK_EVERY = 5.0      # seconds of quiet between bookmarks
LOOK_EVERY = 0.25         # seconds between looks at the store when nothing says it moved
KEEP_REVISIONS = 100_000  # history kept: the newest 100,000 revisions...
KEEP_SECONDS = 3600.0     # ...and whatever is younger than an hour
TRIM_EVERY = 60.0
PAGE = 500                # changes read at once
_log = logging.getLogger("modelip.api")


RANK = {role: rank for rank, role in enumerate(ROLES)}


async def refuse(context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode,
                 said: str) -> NoReturn:
    """End the call with ``code`` (grpc's abort raises; said here for the reader)."""
    await context.abort(code, said)
    raise AssertionError(said)


def change_message(change: ChangeRecord) -> control_pb2.Change:
    """A journaled change as the API sends it."""
    body = change.body
    if change.kind == "card":
        return C(revision=change.revision, type=C.CARD, ts=change.ts, card=control_pb2.Card(
            host=body["host"], device=body["device"], card_id=body["card_id"],
            state=body["state"], previous=body["previous"],
            boot_counter=body["boot_counter"], session_id=body["session_id"],
            program_id=body["program_id"], reason=body["reason"],
            attempts=body["attempts"]))
    if change.kind == "host":
        return C(revision=change.revision, type=C.HOST, ts=change.ts, host=control_pb2.Host(
            host=body["host"], state=body["state"], previous=body["previous"],
            reason=body["reason"]))
    if change.kind == "command":
        return C(revision=change.revision, type=C.COMMAND, ts=change.ts,
                 command=control_pb2.Command(who=body["who"], role=body["role"],
                                             command=body["command"],
                                             outcome=body["outcome"]))
    return C(revision=change.revision, type=C.ROLLOUT, ts=change.ts,
             rollout=control_pb2.RolloutStep(rollout=body["rollout"], wave=body["wave"],
                                             phase=body["phase"], what=body["what"]))


class ControlService(control_pb2_grpc.ControlServicer):  # type: ignore[misc]
    def __init__(self, store: Store, changed: Callable[[], Awaitable[None]] | None = None,
                 *, spec: ApiSpec | None = None) -> None:
        self.store = store
        self.changed = changed
        self.spec = spec or ApiSpec()

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
        hosts = [control_pb2.Host(host=h.host, state=h.state, reason=h.reason)
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
                    context: grpc.aio.ServicerContext[Any, Any]
                    ) -> AsyncIterator[control_pb2.Change]:
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
            for host in hosts:
                yield C(revision=last, type=C.HOST, host=host)
            for card in cards:
                yield C(revision=last, type=C.CARD, card=card)
            yield C(revision=last, type=C.SNAPSHOT_END)
        quiet_since: float | None = None  # None: the backlog is not sent yet
        while True:
            changes = await self.store.changes(last, PAGE)
            for change in changes:
                yield change_message(change)
                last = change.revision
            if len(changes) == PAGE:
                continue
            now = anyio.current_time()
            if changes or quiet_since is None or now - quiet_since >= BOOKMARK_EVERY:
                yield C(revision=last, type=C.BOOKMARK)  # caught up to here
                quiet_since = now
            await self._wait()
            await self._check_kept(last, (await self.store.revisions())[0], context)

    async def RolloutCommand(self, request: control_pb2.RolloutCommandRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext[Any, Any]
                             ) -> control_pb2.CommandResponse:
        action = {request.PAUSE: "pause", request.RESUME: "resume",
                  request.UNDO: "undo"}.get(request.action)
        if action is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "action: one of PAUSE, RESUME, UNDO")
        command = f"rollout {action}"
        who, role = await self.allowed(context, "operator", command)
        journal = self.store
        if not isinstance(journal, SQLiteStore):
            await refuse(context, grpc.StatusCode.FAILED_PRECONDITION, "rollouts are driven on "
                         "the embedded journal, not with a shared store (docs/rollouts.md)")
        try:
            done = await request_rollout(RolloutLedger(journal), str(action),
                                         f"{who} ({role}, control API)")
        except UsageError as err:
            await self.store.record_command(who, role, command, f"refused: {err}")
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
            raise
        await self.store.record_command(who, role, command,
                                        "done" if done.written else "already so")
        return control_pb2.CommandResponse(said=done.said, rollout=done.rollout,
                                           written=done.written)

    async def _check_kept(self, last: int, oldest: int,
                          context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if oldest and last + 1 < oldest:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE,
                                f"revision {last} is older than the history kept (the "
                                f"oldest is {oldest}): list again, then watch from there",
                                trailing_metadata=((OLDEST_KEY, str(oldest)),))

    async def _wait(self) -> None:
        with anyio.move_on_after(LOOK_EVERY):
            if self.changed is not None:
                await self.changed()
                await anyio.sleep(0.01)  # the moves of the same instant, in one look
            else:
                await anyio.sleep_forever()


async def serve_api(spec: ApiSpec, store: Store,
                    changed: Callable[[], Awaitable[None]] | None = None, *,
                    task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve the control API as ``spec`` says until cancelled (mutual TLS with
    ``spec.tls``; without it, loopback only); reports the address bound; trims the
    history kept meanwhile."""
    address = spec.listen
    if spec.tls is None and not is_loopback(address):
        raise UsageError(f"api {address}: without api.tls (cert, key, client_ca) the control "
                         "API listens on loopback only (docs/api.md)")
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    control_pb2_grpc.add_ControlServicer_to_server(
        ControlService(store, changed, spec=spec), server)
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
        task_status.started(f"{address.rsplit(':', 1)[0]}:{port}")
        while True:
            try:
                await store.trim_changes(KEEP_REVISIONS, KEEP_SECONDS)
            except Exception as err:  # noqa: BLE001 - trimming waits for the next time
                _log.warning("cannot trim the history of changes: %s", err)
            await anyio.sleep(TRIM_EVERY)
    finally:
        with anyio.CancelScope(shield=True):
            await server.stop(0.5)
