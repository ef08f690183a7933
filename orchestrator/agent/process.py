"""Running an executable whose answers are hostile input (the exec backend,
agent/exec.py): in its own process group, its output bounded, killed with its whole
group when cancelled or flooding, what it says on stderr made inert for the log."""

from __future__ import annotations

import logging
import os
import signal

import anyio
from anyio.abc import ByteReceiveStream, Process

from orchestrator.terminal import terminal_safe

MAX_ANSWER = 4 << 20      # bytes of stdout an operation may answer
MAX_STDERR = 16 << 10     # bytes of stderr kept for the log
MAX_LINE = 64 << 10       # bytes of one line an executable writes
_log = logging.getLogger("modelip.agent")


def inert(text: bytes | str, limit: int = 300) -> str:
    """Untrusted text made safe for one log line or error message: decoded, control
    characters escaped (terminal.py), bounded."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = text.strip()
    return terminal_safe(text, limit) + ("..." if len(text) > limit else "")


async def log_lines(stream: ByteReceiveStream | None, what: str) -> None:
    """What an executable says on stderr, line by line, made inert, into the log."""
    if stream is None:
        return
    pending = b""
    async for chunk in stream:
        *lines, pending = (pending + chunk).split(b"\n")
        pending = pending[-MAX_LINE:]
        for line in lines:
            if line.strip():
                _log.info("card backend %s said on stderr: %s", what, inert(line, 2000))


def kill(process: Process) -> None:
    """The operation's whole process group (its leader not reaped yet: the group's id
    cannot have been reused)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def communicate(command: list[str], env: dict[str, str], stdin: bytes
                       ) -> tuple[int, bytes, bytes]:
    """Run one operation: stdin in, (exit status, stdout up to MAX_ANSWER + 1 bytes,
    stderr up to MAX_STDERR bytes); its process group killed if cancelled or flooding."""
    with anyio.CancelScope(shield=True):  # once started, it is ours to kill and reap
        process = await anyio.open_process(command, env=env, start_new_session=True)
    out, err = bytearray(), bytearray()

    async def drain(stream: ByteReceiveStream | None, into: bytearray, cap: int) -> None:
        if stream is None:
            return
        async for chunk in stream:
            if len(into) <= cap:
                into += chunk[:cap + 1 - len(into)]
            if len(into) > cap and into is out:
                kill(process)  # too much: nothing more is read
                return

    async with process:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain, process.stdout, out, MAX_ANSWER)
                tg.start_soon(drain, process.stderr, err, MAX_STDERR)
                if process.stdin is not None:
                    try:
                        await process.stdin.send(stdin)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass  # it did not read its request: its answer says what it thinks
                    await process.stdin.aclose()
                status = await process.wait()
        except BaseException:
            kill(process)  # timed out or failed: the whole group, before it is reaped
            raise
    return status, bytes(out), bytes(err)
