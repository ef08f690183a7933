"""The exec card backend (docs/host-agent.md "The exec backend: contract"): every card
operation runs a configured executable, CNI-style. The operation and the card are in
the environment, one JSON request on stdin, one JSON result on stdout, a ``version``
in every message; a non-zero exit carries a JSON error naming an ErrorReason.

What the executable answers is hostile input: an answer that is not the contract's
(garbage, no JSON, a missing version, an unknown reason, too much output, no answer
in time) is an INTERNAL error of that card, the process group killed at its timeout,
never a crashed agent.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from anyio.abc import ByteReceiveStream, TaskStatus
from google.protobuf.message import DecodeError

from orchestrator._proto.modelip.v1 import evidence_pb2, runtime_pb2
from orchestrator.agent.aborts import CODES, HostAbort
from orchestrator.agent.backend import Emit
from orchestrator.agent.process import MAX_ANSWER, MAX_LINE, communicate, inert, kill, log_lines
from orchestrator.agent.staging import Staged

R = runtime_pb2
VERSION = 1
OPERATIONS = ("list", "attest", "load", "execute", "unload", "reset")
DEFAULT_TIMEOUTS = {"list": 5.0, "attest": 10.0, "load": 120.0, "execute": 60.0,
                    "unload": 10.0, "reset": 30.0}
_STATES = {"ONLINE": R.DEVICE_STATE_ONLINE, "OFFLINE": R.DEVICE_STATE_OFFLINE,
           "LOADED": R.DEVICE_STATE_LOADED}
_KINDS = {"RESET": R.EVENT_KIND_RESET, "OFFLINE": R.EVENT_KIND_OFFLINE,
          "ONLINE": R.EVENT_KIND_ONLINE, "LOADED": R.EVENT_KIND_LOADED,
          "UNLOADED": R.EVENT_KIND_UNLOADED}
_U32, _U64 = (1 << 32) - 1, (1 << 64) - 1
_log = logging.getLogger("modelip.agent")


@dataclass(frozen=True, slots=True)
class ExecConfig:
    executable: Path
    watch: Path | None = None
    poll_interval: float = 1.0
    timeouts: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TIMEOUTS))
    per_card: int = 1
    env: Mapping[str, str] = field(default_factory=dict)


class BadAnswer(Exception):
    """What an executable wrote is not the contract's."""


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise BadAnswer(f"{what} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadAnswer(f"{what} is not base64") from None


def _int(value: Any, what: str, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise BadAnswer(f"{what} is not an integer in 0..{top}")
    return value


def _text(value: Any, what: str, limit: int = 256) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise BadAnswer(f"{what} is not a string of at most {limit} characters")
    return value


def _hex(value: Any, what: str) -> bytes:
    try:
        return bytes.fromhex(_text(value, what, 128))
    except ValueError:
        raise BadAnswer(f"{what} is not hex") from None


def card_row(row: Any) -> runtime_pb2.DeviceInfo:
    """One row of a ``list`` answer as ListDevices says it (BadAnswer if malformed)."""
    if not isinstance(row, dict):
        raise BadAnswer("a card is not an object")
    state = _STATES.get(row.get("state"))  # type: ignore[arg-type]
    if state is None:
        raise BadAnswer(f"state is not one of {', '.join(_STATES)}")
    info = runtime_pb2.DeviceInfo(
        device=_int(row.get("device"), "device", _U32), card_id=_text(row.get("card_id"),
                                                                     "card_id"),
        state=state, boot_counter=_int(row.get("boot_counter", 0), "boot_counter", _U64))
    if state != R.DEVICE_STATE_OFFLINE:
        info.session_id = _hex(row.get("session_id", ""), "session_id")
        info.session_fingerprint = _hex(row.get("session_fingerprint", ""),
                                        "session_fingerprint")
    if state == R.DEVICE_STATE_LOADED:
        info.program_id = _text(row.get("program_id", ""), "program_id", 128)
        info.partition = _int(row.get("partition", 0), "partition", _U32)
        ready = row.get("program_ready", True)
        if not isinstance(ready, bool):
            raise BadAnswer("program_ready is not a boolean")
        info.program_ready = ready
    return info


def event_line(line: bytes) -> runtime_pb2.DeviceEvent:
    """One line of the watch executable (BadAnswer if it is not the contract's)."""
    try:
        message = json.loads(line)
    except ValueError:
        raise BadAnswer("not JSON") from None
    if not isinstance(message, dict) or message.get("version") != VERSION:
        raise BadAnswer(f"not a version {VERSION} object")
    kind = _KINDS.get(message.get("kind"))  # type: ignore[arg-type]
    if kind is None:
        raise BadAnswer(f"kind is not one of {', '.join(_KINDS)}")
    return runtime_pb2.DeviceEvent(
        device=_int(message.get("device"), "device", _U32), kind=kind,
        boot_counter=_int(message.get("boot_counter", 0), "boot_counter", _U64))


class ExecBackend:
    """Cards driven by an executable (agent/backend.py ``CardBackend``)."""

    def __init__(self, config: ExecConfig, *, scratch: Path | None = None) -> None:
        self.config = config
        self.scratch = scratch          # where execute's per-call directories go
        self.bad_lines = 0              # watch lines that were not the contract's
        self._per_card: dict[int, anyio.Semaphore] = {}
        self._listing = anyio.Lock()    # `list` runs alone

    # --- one operation -------------------------------------------------------------------

    def _env(self, operation: str, device: int | None) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "MODELIP_BACKEND_VERSION": str(VERSION), "MODELIP_OPERATION": operation}
        if device is not None:
            env["MODELIP_DEVICE"] = str(device)
        env.update(self.config.env)
        return env

    async def run(self, operation: str, device: int | None, request: Mapping[str, Any]
                  ) -> dict[str, Any]:
        """Run ``operation`` (on ``device``) and give back its result; HostAbort with the
        backend's reason, or INTERNAL when the answer is not the contract's."""
        where = operation if device is None else f"{operation} of device {device}"
        timeout = self.config.timeouts.get(operation, DEFAULT_TIMEOUTS[operation])
        payload = json.dumps({"version": VERSION, **request}).encode()
        with anyio.move_on_after(timeout) as scope:
            status, out, err = await communicate([str(self.config.executable)],
                                                  self._env(operation, device), payload)
        if scope.cancelled_caught:
            raise HostAbort.of(R.ERROR_REASON_INTERNAL, f"card backend: {where}: no answer "
                               f"within {timeout:g} s (killed)", device)
        if err:
            _log.info("card backend %s said on stderr: %s", where, inert(err, 2000))
        try:
            answer = self._parse(out, status)
        except BadAnswer as problem:
            detail = f"; stderr: {inert(err)}" if err and status else ""
            raise HostAbort.of(R.ERROR_REASON_INTERNAL, f"card backend: {where}: {problem} "
                               f"(exit status {status}){detail}", device) from None
        error = answer.get("error")
        if error is not None:
            raise _refusal(error, where, device, status)
        return answer

    @staticmethod
    def _parse(out: bytes, status: int) -> dict[str, Any]:
        if len(out) > MAX_ANSWER:
            raise BadAnswer(f"answered more than {MAX_ANSWER} bytes")
        if not out.strip():
            raise BadAnswer("answered nothing" if status == 0 else
                            "exited without a JSON error")
        try:
            answer = json.loads(out)
        except ValueError:
            raise BadAnswer(f"answered something that is not JSON: {inert(out, 80)!r}") \
                from None
        if not isinstance(answer, dict) or answer.get("version") != VERSION:
            raise BadAnswer(f"answered without \"version\": {VERSION}")
        if status != 0 and not isinstance(answer.get("error"), dict):
            raise BadAnswer("exited non-zero without an error object")
        return answer

    def _card(self, device: int) -> anyio.Semaphore:
        if device not in self._per_card:
            self._per_card[device] = anyio.Semaphore(self.config.per_card)
        return self._per_card[device]

    async def _on_card(self, operation: str, device: int, request: Mapping[str, Any]
                       ) -> dict[str, Any]:
        async with self._card(device):
            return await self.run(operation, device, request)

    # --- CardBackend ---------------------------------------------------------------------

    async def devices(self) -> list[runtime_pb2.DeviceInfo]:
        async with self._listing:
            answer = await self.run("list", None, {})
        rows = answer.get("cards")
        if not isinstance(rows, list):
            raise HostAbort.of(R.ERROR_REASON_INTERNAL,
                               "card backend: list: answered without a \"cards\" list")
        listed, seen = [], set()
        for index, row in enumerate(rows):
            try:
                info = card_row(row)
                if info.device in seen:
                    raise BadAnswer(f"device {info.device} listed twice")
            except BadAnswer as problem:
                _log.warning("card backend: list: card %d dropped: %s", index, problem)
                continue
            seen.add(info.device)
            listed.append(info)
        return listed

    async def attest(self, device: int, request: bytes) -> evidence_pb2.AttestationEvidence:
        answer = await self._on_card("attest", device,
                                     {"request": base64.b64encode(request).decode()})
        try:
            return evidence_pb2.AttestationEvidence.FromString(
                _b64(answer.get("evidence"), "evidence"))
        except (BadAnswer, DecodeError) as problem:
            raise HostAbort.of(R.ERROR_REASON_INTERNAL, f"card backend: attest of device "
                               f"{device}: evidence is not AttestationEvidence ({problem})",
                               device) from None

    async def load(self, device: int, program: Staged, partition: int,
                   key_slots: evidence_pb2.KeySlotTable | None
                   ) -> runtime_pb2.LoadProgramResponse:
        if program.path is None:
            raise HostAbort.of(R.ERROR_REASON_INTERNAL,
                               "the exec backend needs a staging directory", device)
        request: dict[str, Any] = {"program_id": program.program_id,
                                   "program_path": str(program.path), "partition": partition}
        if key_slots is not None:
            request["key_slots"] = base64.b64encode(
                key_slots.SerializeToString(deterministic=True)).decode()
        answer = await self._on_card("load", device, request)
        try:
            segments = answer.get("segments")
            if not isinstance(segments, list) or len(segments) > 4096:
                raise BadAnswer("segments is not a list of names")
            return runtime_pb2.LoadProgramResponse(
                segments=[_text(name, "a segment name") for name in segments],
                receipt=_b64(answer.get("receipt"), "receipt"),
                receipt_signature=_b64(answer.get("receipt_signature"), "receipt_signature"))
        except BadAnswer as problem:
            raise HostAbort.of(R.ERROR_REASON_INTERNAL,
                               f"card backend: load of device {device}: {problem}",
                               device) from None

    async def execute(self, devices: Sequence[int], inputs: Mapping[str, Any]
                      ) -> dict[str, Any]:
        call = Path(tempfile.mkdtemp(prefix="execute-", dir=self.scratch))
        try:
            np.savez(call / "inputs.npz", **inputs)
            async with AsyncExitStack() as cards:
                for device in sorted(set(devices)):
                    await cards.enter_async_context(self._card(device))
                await self.run("execute", devices[0], {
                    "devices": list(devices), "inputs": str(call / "inputs.npz"),
                    "outputs": str(call / "outputs.npz")})
            try:
                with np.load(call / "outputs.npz", allow_pickle=False) as outputs:
                    return {name: outputs[name] for name in outputs.files}
            except (OSError, ValueError) as problem:
                raise HostAbort.of(R.ERROR_REASON_INTERNAL, f"card backend: execute: no "
                                   f"readable outputs.npz ({inert(str(problem), 120)})",
                                   devices[0]) from None
        finally:
            shutil.rmtree(call, ignore_errors=True)

    async def unload(self, device: int) -> None:
        await self._on_card("unload", device, {})

    async def reset(self, device: int) -> None:
        await self._on_card("reset", device, {})

    # --- events ----------------------------------------------------------------------------

    async def live(self, emit: Emit, *,
                   task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Card events from the watch executable, or from polling ``list``."""
        task_status.started()
        if self.config.watch is not None:
            await self._watch(self.config.watch, emit)
        else:
            await self._poll(emit)

    async def _watch(self, executable: Path, emit: Emit) -> None:
        pause = 1.0
        while True:
            try:
                with anyio.CancelScope(shield=True):  # once started, ours to kill and reap
                    process = await anyio.open_process(
                        [str(executable)], env=self._env("watch", None),
                        start_new_session=True, stdin=subprocess.DEVNULL)
                async with process:
                    try:
                        assert process.stdout is not None  # noqa: S101 - piped
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(log_lines, process.stderr, "watch")
                            await self._read_events(process.stdout, emit)
                            status = await process.wait()
                    except BaseException:
                        kill(process)
                        raise
                _log.warning("card backend: watch ended (exit status %s); restarting in "
                             "%g s", status, pause)
            except OSError as problem:
                _log.warning("card backend: watch cannot start (%s); retrying in %g s",
                             problem.strerror, pause)
            await anyio.sleep(pause)
            pause = min(pause * 2, 30.0)

    async def _read_events(self, stream: ByteReceiveStream, emit: Emit) -> None:
        pending = b""
        async for chunk in stream:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > MAX_LINE:
                self._bad_line(f"a line longer than {MAX_LINE} bytes")
                pending = b""
            for line in lines:
                if not line.strip():
                    continue
                try:
                    emit(event_line(line))
                except BadAnswer as problem:
                    self._bad_line(str(problem))

    def _bad_line(self, problem: str) -> None:
        self.bad_lines += 1
        _log.warning("card backend: watch line dropped (%d so far): %s", self.bad_lines,
                     problem)

    async def _poll(self, emit: Emit) -> None:
        """Events derived from changes between listings (a lost one costs a resync)."""
        known: dict[int, runtime_pb2.DeviceInfo] = {}
        while True:
            try:
                listed = {info.device: info for info in await self.devices()}
            except HostAbort as problem:
                _log.warning("card backend: polling list: %s", problem)
                listed = known
            for device, now in listed.items():
                for kind in changes(known.get(device), now):
                    emit(runtime_pb2.DeviceEvent(device=device, kind=kind,
                                                 boot_counter=now.boot_counter))
            known = listed
            await anyio.sleep(self.config.poll_interval)


def changes(before: runtime_pb2.DeviceInfo | None, now: runtime_pb2.DeviceInfo
            ) -> list[runtime_pb2.EventKind]:
    """The events a change between two listings of one card stands for."""
    if before is None:
        return []
    kinds: list[runtime_pb2.EventKind] = []
    rebooted = now.boot_counter > before.boot_counter
    if rebooted:
        kinds.append(R.EVENT_KIND_RESET)
    if now.state != before.state or rebooted:
        if now.state == R.DEVICE_STATE_OFFLINE:
            kinds.append(R.EVENT_KIND_OFFLINE)
        elif now.state == R.DEVICE_STATE_LOADED:
            kinds.append(R.EVENT_KIND_LOADED)
        elif before.state == R.DEVICE_STATE_LOADED and not rebooted:
            kinds.append(R.EVENT_KIND_UNLOADED)
        else:
            kinds.append(R.EVENT_KIND_ONLINE)
    return kinds


def _refusal(error: Any, where: str, device: int | None, status: int) -> HostAbort:
    """The backend's own error: its reason (one of the protocol's), its message."""
    if not isinstance(error, dict):
        return HostAbort.of(R.ERROR_REASON_INTERNAL,
                            f"card backend: {where}: error is not an object", device)
    name = error.get("reason")
    message = inert(str(error.get("message", "")))
    try:
        reason = R.ErrorReason.Value(name) if isinstance(name, str) else -1
    except ValueError:
        reason = -1
    if reason not in CODES or reason == R.ERROR_REASON_FENCED:
        return HostAbort.of(R.ERROR_REASON_INTERNAL, f"card backend: {where}: unknown error "
                            f"reason {inert(str(name), 60)!r} (exit status {status}): "
                            f"{message}", device)
    return HostAbort.of(reason, f"card backend: {where}: {message}", device)


