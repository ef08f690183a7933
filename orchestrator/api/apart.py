"""The control API in a process of its own (docs/api.md "Where it runs").

The API serves what the store holds, so it needs nothing of the engine but two
commands: the release of a quarantined card and the word that the cordons
changed. Served apart, watchers never cost the engine a cycle (its loop is the
busiest part of a storm) and the engine never delays a watcher: the API process
looks at the store every few milliseconds on its own.

The engine's side (``serve_api_apart``) starts ``python -m orchestrator.api``,
hands it the API's settings and how to open the store on its standard input (one
JSON line: the store's address may hold a password, which an argument would show
to every user of the machine), and answers its requests. The two speak JSON
lines: the API process says ``{"started": ADDRESS}`` or ``{"failed": WHY}`` once,
then asks ``{"id": N, "release": [HOST, DEVICE, WHO]}`` or ``{"id": N,
"cordoned": true}``; the engine answers ``{"id": N, "said": TEXT}`` or ``{"id": N,
"refused": WHY}``. The API process ends when its standard input does (the engine
ended, however it ended). If it ends on its own, the engine says so and starts
another on the same address.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from orchestrator.engine.store.protocol import Store
from orchestrator.errors import ModelIPError, UsageError
from orchestrator.plan.api import ApiSpec, ApiTLS, History

GRACE = 3.0              # seconds an API process has to end once told to
RESTART_AFTER = 1.0      # seconds before an API process that ended is started again
LINE = 1 << 16           # the longest line either side accepts
_log = logging.getLogger("modelip.api")

Release = Callable[[str, int, str], str]
Cordoned = Callable[[], Awaitable[None]]


def settings(spec: ApiSpec, store: Store) -> dict[str, Any]:
    """What the API process needs: the API's settings and the store's address."""
    from orchestrator.engine.store.sqlite import SQLiteStore

    if isinstance(store, SQLiteStore):
        where: dict[str, Any] = {"journal": str(store.path)}
    else:
        where = {"url": getattr(store, "url"), "replica": getattr(store, "replica"),  # noqa: B009 - the shared store's
                 "lease_ttl": getattr(store, "lease_ttl")}  # noqa: B009
    tls = spec.tls
    return {"store": where, "api": {
        "listen": spec.listen, "roles": dict(spec.roles),
        "history": [spec.history.revisions, spec.history.seconds],
        "tls": None if tls is None else [str(tls.cert), str(tls.key), str(tls.client_ca)]}}


def spec_of(said: dict[str, Any]) -> ApiSpec:
    tls = said["tls"]
    return ApiSpec(listen=said["listen"], roles=said["roles"],
                   history=History(*said["history"]),
                   tls=None if tls is None else ApiTLS(*(Path(p) for p in tls)))


async def serve_api_apart(spec: ApiSpec, store: Store, *, release: Release,
                          cordoned: Cordoned,
                          task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
    """Run the control API in its own process until cancelled; report the address it
    bound. UsageError (nothing started) if it cannot serve as ``spec`` says."""
    asked = settings(spec, store)
    environment = dict(os.environ)
    environment.setdefault("GRPC_VERBOSITY", "NONE")   # its errors are said in our words
    started = False
    while True:
        child = await anyio.open_process([sys.executable, "-m", "orchestrator.api"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=None, env=environment)
        try:
            assert child.stdin is not None and child.stdout is not None  # noqa: S101 - piped
            await child.stdin.send(json.dumps(asked).encode() + b"\n")
            lines = BufferedByteReceiveStream(child.stdout)
            first = await _line(lines)
            if first is None or "started" not in first:
                await child.wait()
                why = (first or {}).get("failed") or \
                    f"api {spec.listen}: its process ended (exit {child.returncode})"
                if not started:
                    raise UsageError(str(why))
                _log.error("the control API cannot start again: %s", why)
            else:
                address = str(first["started"])
                if not started:
                    started = True
                    # again on the address it bound (port 0 asked for any free one)
                    asked["api"]["listen"] = address
                    task_status.started(address)
                await _answer(lines, child.stdin, release, cordoned)
                await child.wait()
                _log.error("the control API's process ended (exit %s); starting another",
                           child.returncode)
        finally:
            with anyio.CancelScope(shield=True):
                await _end(child)
        await anyio.sleep(RESTART_AFTER)


async def _end(child: Process) -> None:
    """Close its standard input (it ends at that: its server stops, its store is
    closed), and kill it if it has not ended in GRACE seconds."""
    assert child.stdin is not None  # noqa: S101 - piped
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
        await child.stdin.aclose()
    with anyio.move_on_after(GRACE):
        await child.wait()
    if child.returncode is None:
        child.kill()
    await child.aclose()


async def _line(lines: BufferedByteReceiveStream) -> dict[str, Any] | None:
    """The next JSON line; None at the end of the stream."""
    try:
        said = json.loads(await lines.receive_until(b"\n", LINE))
    except (anyio.EndOfStream, anyio.IncompleteRead, anyio.DelimiterNotFound, ValueError):
        return None
    return said if isinstance(said, dict) else None


async def _answer(lines: BufferedByteReceiveStream, to: Any, release: Release,
                  cordoned: Cordoned) -> None:
    """Answer the API process's requests until it ends."""
    while (request := await _line(lines)) is not None:
        answer: dict[str, Any] = {"id": request.get("id")}
        try:
            if "release" in request:
                host, device, who = request["release"]
                answer["said"] = release(str(host), int(device), str(who))
            elif request.get("cordoned"):
                await cordoned()
                answer["said"] = ""
            else:
                answer["refused"] = "not a request"
        except UsageError as err:
            answer["refused"] = str(err)
        except (ValueError, TypeError):   # not a request this engine understands
            answer["refused"] = "malformed request"
        await to.send(json.dumps(answer).encode() + b"\n")


# --- the API process ----------------------------------------------------------------


class Engine:
    """The engine, as the API process asks it (over its standard input and output)."""

    def __init__(self) -> None:
        self._next = 0
        self._waiting: dict[int, tuple[anyio.Event, list[dict[str, Any]]]] = {}

    async def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self._next += 1
        done, answer = anyio.Event(), list[dict[str, Any]]()
        self._waiting[self._next] = (done, answer)
        say({**request, "id": self._next})
        await done.wait()
        return answer[0]

    async def release(self, host: str, device: int, who: str) -> str:
        answer = await self.ask({"release": [host, device, who]})
        if "refused" in answer:
            raise UsageError(str(answer["refused"]))
        return str(answer["said"])

    async def cordoned(self) -> None:
        await self.ask({"cordoned": True})

    async def listen(self) -> None:
        """Take the engine's answers until its end (then return)."""
        while line := await anyio.to_thread.run_sync(sys.stdin.buffer.readline,
                                                     abandon_on_cancel=True):
            try:
                answer = json.loads(line)
            except ValueError:
                continue
            waiting = self._waiting.pop(answer.get("id"), None)
            if waiting is not None:
                waiting[1].append(answer)
                waiting[0].set()


def say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


@asynccontextmanager
async def _store(where: dict[str, Any]) -> AsyncIterator[Store]:
    if "journal" in where:
        from orchestrator.engine.store.sqlite import SQLiteStore

        with SQLiteStore(Path(where["journal"])) as journal:
            yield journal
        return
    from orchestrator.engine.store.postgres import opened

    async with opened(where["url"], where["replica"], lease_ttl=where["lease_ttl"],
                      migrate=False) as shared:
        yield shared


async def _serve(asked: dict[str, Any]) -> None:
    from orchestrator.api.server import serve_api

    spec = spec_of(asked["api"])
    engine = Engine()
    look_every = POLL_JOURNAL if "journal" in asked["store"] else POLL_SHARED
    async with _store(asked["store"]) as store, anyio.create_task_group() as tg:
        address = await tg.start(functools.partial(
            serve_api, spec, store, None, release=engine.release, cordoned=engine.cordoned,
            look_every=look_every))
        say({"started": address})
        await engine.listen()
        tg.cancel_scope.cancel()


POLL_JOURNAL = 0.005   # seconds between looks at the journal for changes
POLL_SHARED = 0.02     # ... at the shared store (a query on the database each time)


def main() -> int:
    """The API process: its settings on the first line of standard input."""
    logging.basicConfig(format="modelip api: %(message)s", level=logging.WARNING)
    try:
        asked = json.loads(sys.stdin.buffer.readline())
        anyio.run(_serve, asked)
    except (ModelIPError, BaseExceptionGroup) as err:
        failed = _first(err)
        if failed is None:
            raise
        say({"failed": str(failed)})
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _first(err: BaseException) -> ModelIPError | None:
    """The error to say, of ``err`` or of the group it is."""
    if isinstance(err, ModelIPError):
        return err
    if isinstance(err, BaseExceptionGroup):
        return next(filter(None, map(_first, err.exceptions)), None)
    return None
