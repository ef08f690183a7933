"""modelip host-agent: a plan deployed and re-keyed through the exec backend, hostile
backends, the watch executable, staging on disk, AGENT.yaml's errors, JSON logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
import pytest

from orchestrator._proto.modelip.v1 import runtime_pb2
from orchestrator.agent.aborts import HostAbort
from orchestrator.agent.exec import ExecBackend, ExecConfig
from orchestrator.agent.host import HostAgent
from orchestrator.agent.servicers import serve
from orchestrator.agent.staging import Staging
from orchestrator.emulator.pki import VendorPKI
from orchestrator.errors import RemoteError
from orchestrator.transport.client import HostClient
from tests.backend_contract import cardfiles_config
from tests.emulate import MODELIP
from tests.test_engine_process import real_plan

# --- a plan through `modelip host-agent` over the exec test backend ------------------------


@contextmanager
def host_agent(directory: Path, config: str, *extra: str) -> Iterator[tuple[str, Path]]:
    """`modelip host-agent --config` running; yields its address and its stderr log."""
    (directory / "agent.yaml").write_text(config)
    log = directory / "agent.log"
    with open(log, "w") as err, open(directory / "agent.out", "w") as out:
        process = subprocess.Popen([*MODELIP, "host-agent", "--config",
                                    str(directory / "agent.yaml"), *extra],
                                   stdout=out, stderr=err)
    try:
        for _ in range(300):
            if "READY" in (directory / "agent.out").read_text():
                break
            assert process.poll() is None, log.read_text()
            time.sleep(0.05)
        text = log.read_text()
        address = text.split("listening on ", 1)[1].split()[0]
        yield address, log
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0


def _cards_agent(tmp_path: Path) -> str:
    """AGENT.yaml for the exec test backend over two card files (made here)."""
    config = cardfiles_config(tmp_path, VendorPKI.create())
    env = "".join(f"    {k}: {v!r}\n" for k, v in config.env.items())
    return (f"listen: 127.0.0.1:0\nname: agent0\nstaging_dir: staging\nbackend:\n"
            f"  kind: exec\n  executable: {config.executable}\n  poll_interval: 0.2\n"
            f"  env:\n{env}")


def test_a_plan_deploys_and_rekeys_through_the_exec_backend(tmp_path: Path) -> None:
    with host_agent(tmp_path, _cards_agent(tmp_path)) as (address, _):
        plan = real_plan(tmp_path, address, tmp_path / "pki" / "root.pem", devices=2,
                         check_interval=5)
        watch = subprocess.Popen([*MODELIP, "watch", str(plan), "--json",
                                  "--duration", "60"], stdout=subprocess.PIPE, text=True,
                                 stderr=subprocess.DEVNULL)
        assert watch.stdout is not None
        events = []
        reset = False
        for line in watch.stdout:
            event = json.loads(line)
            events.append(event)
            if event["event"] == "deployed" and not reset:
                assert event["serving"] == 2
                before = _show(tmp_path, 1)
                # the reset goes through the agent and the exec backend to the card file
                subprocess.run([*MODELIP, "device", "reset", "--ip", address.split(":")[0],
                                "--port", address.split(":")[1], "-d", "1"], check=True,
                               capture_output=True)
                reset = True
            if event["event"] == "rekeyed" and event.get("device") == 1:
                watch.send_signal(signal.SIGINT)
        watch.wait(timeout=30)
        watch.stdout.close()
        assert reset and any(e["event"] == "rekeyed" for e in events), events[-5:]
        # the card's own word (its file): a new boot, a new session, the program held
        after = _show(tmp_path, 1)
        assert after["boot_counter"] == before["boot_counter"] + 1
        assert after["session_id"] != before["session_id"]
        assert after["state"] == "LOADED" and after["program_id"] == before["program_id"]


def _show(tmp_path: Path, device: int) -> dict[str, object]:
    shown = subprocess.run([*MODELIP, "card", "show", "--json",
                            str(tmp_path / "cards" / f"card{device}.json")],
                           check=True, capture_output=True, text=True).stdout
    card: dict[str, object] = json.loads(shown)[0]
    return card


# --- hostile backends ------------------------------------------------------------------------


HOSTILE = {
    "garbage": ("echo 'not json {{{'", "not JSON"),
    "no JSON and a failure": ("echo 'segfault' >&2; exit 3",
                              "exited without a JSON error (exit status 3); stderr: segfault"),
    "no version": ("echo '{\"evidence\": \"\"}'", "without \"version\": 1"),
    "unknown reason": ("echo '{\"version\": 1, \"error\": {\"reason\": \"ERROR_REASON_NOPE\", "
                       "\"message\": \"x\"}}'; exit 1", "unknown error reason"),
    "a flood": ("head -c 6000000 /dev/zero | tr '\\0' a", "answered more than"),
}


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\nif [ \"$MODELIP_OPERATION\" = list ]; then\n"
                    f"  echo '{{\"version\": 1, \"cards\": [{{\"device\": 0, \"card_id\": \"c0\", "
                    f"\"state\": \"ONLINE\", \"boot_counter\": 1}}]}}'; exit 0\nfi\n{body}\n")
    path.chmod(0o755)
    return path


@asynccontextmanager
async def agent_over(backend: ExecBackend, tmp_path: Path) -> AsyncIterator[HostClient]:
    agent = HostAgent("hostile", backend, Staging(tmp_path / "staging"))
    async with anyio.create_task_group() as tg:
        address = await tg.start(lambda task_status: serve(agent, task_status=task_status))
        async with HostClient(address) as host:
            yield host
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("kind", sorted(HOSTILE))
async def test_a_backend_that_answers_badly_is_an_error_of_that_card(kind: str,
                                                                    tmp_path: Path) -> None:
    body, expected = HOSTILE[kind]
    backend = ExecBackend(ExecConfig(_script(tmp_path, "backend", body)))
    async with agent_over(backend, tmp_path) as host:
        with pytest.raises(RemoteError, match="device 0") as caught:
            await host.attest(0, os.urandom(32))
        assert expected in str(caught.value)
        assert [c.card_id for c in await host.list_devices()] == ["c0"]  # still serving


async def test_a_backend_that_hangs_is_killed_at_its_timeout(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = _script(tmp_path, "backend", f"sleep 300 & echo $! >> {pids}; echo $$ >> {pids}; "
                                          "wait")
    backend = ExecBackend(ExecConfig(script, timeouts={"attest": 0.5}))
    async with agent_over(backend, tmp_path) as host:
        started = time.monotonic()
        with pytest.raises(RemoteError, match="no answer within 0.5 s"):
            await host.attest(0, os.urandom(32))
        assert time.monotonic() - started < 10
        await anyio.sleep(0.2)
        for pid in map(int, pids.read_text().split()):  # the whole group, the child too
            assert not _running(pid)
        assert [c.card_id for c in await host.list_devices()] == ["c0"]


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan may wait for a reaper that never comes)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_evidence_of_another_card_is_named_by_the_agent(tmp_path: Path) -> None:
    """The backend answers device 0 with card 1's evidence: the agent says so, per card
    (the orchestrator's verification would refuse it too: it names the card it attests)."""
    config = cardfiles_config(tmp_path, VendorPKI.create())
    real = config.executable
    liar = tmp_path / "liar"
    liar.write_text(f"#!/bin/sh\n[ \"$MODELIP_OPERATION\" = attest ] && "
                    f"export MODELIP_DEVICE=1\nexec {real}\n")
    liar.chmod(0o755)
    backend = ExecBackend(ExecConfig(liar, env=config.env))
    async with agent_over(backend, tmp_path) as host:
        await host.list_devices()
        with pytest.raises(RemoteError, match=r"device 0 \(c0\) with evidence of card 'c1'"):
            await host.attest(0, os.urandom(32))
        await host.attest(1, os.urandom(32))  # the card it really is answers for itself


# --- events from a watch executable ----------------------------------------------------------


async def test_watch_lines_become_events_and_garbage_is_counted(tmp_path: Path) -> None:
    watch = tmp_path / "watch"
    watch.write_text("#!/bin/sh\n"
                     "echo '{\"version\": 1, \"device\": 0, \"kind\": \"RESET\", "
                     "\"boot_counter\": 2}'\n"
                     "echo 'garbage'\n"
                     "echo '{\"version\": 2, \"device\": 0, \"kind\": \"RESET\"}'\n"
                     "echo '{\"version\": 1, \"device\": 0, \"kind\": \"EXPLODED\"}'\n"
                     "echo '{\"version\": 1, \"device\": 0, \"kind\": \"ONLINE\", "
                     "\"boot_counter\": 2}'\n"
                     "sleep 300\n")
    watch.chmod(0o755)
    backend = ExecBackend(ExecConfig(_script(tmp_path, "backend", "exit 1"), watch=watch))
    events: list[runtime_pb2.DeviceEvent] = []
    both = anyio.Event()
    agent = HostAgent("w", backend)
    async with anyio.create_task_group() as tg:
        async def collect() -> None:
            async for queued in agent.events():
                events.extend(queued)
                if len(events) == 2:  # the last line: every line before it was read
                    both.set()

        tg.start_soon(collect)
        await agent.watched()
        await tg.start(agent.live)
        with anyio.fail_after(10):
            await both.wait()
        tg.cancel_scope.cancel()
    assert [(e.device, e.kind, e.boot_counter) for e in events] == [
        (0, runtime_pb2.EVENT_KIND_RESET, 2), (0, runtime_pb2.EVENT_KIND_ONLINE, 2)]
    assert backend.bad_lines == 3


# --- staging on the agent's disk ---------------------------------------------------------------


async def _upload(staging: Staging, body: bytes, *, cut: int | None = None
                  ) -> tuple[str, bool]:
    import hashlib

    program_id = hashlib.sha256(body).hexdigest()

    async def chunks() -> AsyncIterator[runtime_pb2.StageChunk]:
        sent = body if cut is None else body[:cut]
        yield runtime_pb2.StageChunk(program_id=program_id, total_size=len(body),
                                     data=sent[:1000])
        if sent[1000:]:
            yield runtime_pb2.StageChunk(data=sent[1000:])

    return await staging.receive(chunks())


async def test_staging_keeps_whole_bodies_only_and_adopts_them_after_a_restart(
        tmp_path: Path) -> None:
    staging = Staging(tmp_path / "staging", limit=10_000)
    with pytest.raises(HostAbort, match="stage ended after 1500 of 3000 bytes"):
        await _upload(staging, os.urandom(3000), cut=1500)
    assert list((tmp_path / "staging").iterdir()) == []  # nothing half-staged is kept
    body = os.urandom(3000)
    program_id, stored = await _upload(staging, body)
    assert stored and (tmp_path / "staging" / program_id).read_bytes() == body
    assert oct((tmp_path / "staging" / program_id).stat().st_mode & 0o777) == "0o600"
    assert await _upload(staging, body) == (program_id, False)
    with pytest.raises(HostAbort, match="no room to stage 8000 bytes"):
        await _upload(staging, os.urandom(8000))
    again = Staging(tmp_path / "staging")  # a restarted agent
    held = again.get(program_id)
    assert held is not None and held.read() == body and len(again) == 1


async def test_a_staging_directory_gone_is_an_error_of_the_stage(tmp_path: Path) -> None:
    """The directory removed under a running agent (as an operator's cleanup might):
    the stage fails with the reason, the agent stays, nothing is held."""
    staging = Staging(tmp_path / "staging")
    (tmp_path / "staging").rmdir()
    with pytest.raises(HostAbort, match="staging directory: No such file or directory"):
        await _upload(staging, os.urandom(100))
    assert len(staging) == 0


async def test_a_full_disk_refuses_the_stage_and_leaves_nothing(tmp_path: Path) -> None:
    """A real full filesystem: a small tmpfs would need root and mount; /dev/full is a
    file that is always full, so the staging directory is made to write there."""
    staging = Staging(tmp_path / "staging")
    original = os.open

    def full(path: object, flags: int, mode: int = 0o777) -> int:
        return original("/dev/full", os.O_WRONLY) if str(path).endswith(".partial") \
            else original(path, flags, mode)  # type: ignore[arg-type]

    os.open = full  # type: ignore[assignment]
    try:
        with pytest.raises(HostAbort) as caught:
            await _upload(staging, os.urandom(2000))
    finally:
        os.open = original
    assert caught.value.code.name == "RESOURCE_EXHAUSTED"
    assert "staging directory is full" in str(caught.value)
    assert len(staging) == 0


# --- AGENT.yaml and the command ------------------------------------------------------------------


BAD_CONFIGS = {
    "per_card 0": ("backend:\n  kind: exec\n  executable: backend\n  per_card: 0\n",
                   "agent.yaml:6: backend.per_card: must be from 1 to 64"),
    "unknown key": ("backend:\n  kind: exec\n  executable: backend\n  timeout: 3\n",
                    "agent.yaml:6: backend.timeout: is not a known key: did you mean "
                    "'timeouts'?"),
    "not loopback": ("backend:\n  kind: emulated\n",
                     "listen: 0.0.0.0:62473 is not loopback: give tls"),
    "a backend that is not executable": ("backend:\n  kind: exec\n  executable: agent.yaml\n",
                                         "backend.executable: "),
    "a negative timeout": ("backend:\n  kind: exec\n  executable: backend\n  timeouts: "
                           "{load: -1}\n", "backend.timeouts.load: must be from more than 0"),
    "a bad size": ("staging_limit: lots\nbackend:\n  kind: emulated\n",
                   "staging_limit: must be bytes or a size such as 512MiB"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_agent_configuration_is_one_line_and_exit_2(case: str, tmp_path: Path) -> None:
    body, expected = BAD_CONFIGS[case]
    _script(tmp_path, "backend", "exit 1")
    listen = "0.0.0.0:62473" if case == "not loopback" else "127.0.0.1:0"
    (tmp_path / "agent.yaml").write_text(f"listen: {listen}\nstaging_dir: s\n{body}")
    run = subprocess.run([*MODELIP, "host-agent", "--config", str(tmp_path / "agent.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert expected in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "s").exists()  # nothing made before the file was read whole


def test_the_emulated_backend_serves_with_json_logs(tmp_path: Path) -> None:
    config = ("listen: 127.0.0.1:0\nname: emu\nstaging_dir: staging\n"
              "backend:\n  kind: emulated\n  cards: 3\n  pki: pki\n")
    with host_agent(tmp_path, config, "--log-json") as (address, log):
        listed = subprocess.run([*MODELIP, "device", "list", "--ip", address.split(":")[0],
                                 "--port", address.split(":")[1]], capture_output=True,
                                text=True, check=True).stdout
        assert [line.split()[2] for line in listed.splitlines()] == [
            "emu-card0", "emu-card1", "emu-card2"]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0]["level"] == "info" and "listening on" in lines[0]["message"]
    assert lines[-1]["message"] == "stopping (SIGTERM)"
    assert (tmp_path / "pki" / "root.pem").is_file()


def test_the_agent_serves_mutual_tls_when_its_file_names_the_material(tmp_path: Path) -> None:
    """tls: in AGENT.yaml: any address may be listened on; an orchestrator without a
    certificate from the named CA is refused."""
    import anyio

    from orchestrator.errors import UnreachableError
    from orchestrator.transport.types import TLSClientConfig
    from tests.test_tls import _cert, _cert_pem, _pem

    ca = _cert("orchestrators ca", None, ca=True)
    server, client = _cert("host", ca, ip="127.0.0.1"), _cert("orchestrator", ca)
    for name, data in {"ca.pem": _cert_pem(ca[1]), "agent.pem": _cert_pem(server[1]),
                       "agent.key": _pem(server[0])}.items():
        (tmp_path / name).write_bytes(data)
    config = ("listen: 0.0.0.0:0\nname: secure\nstaging_dir: staging\n"
              "tls: {cert: agent.pem, key: agent.key, client_ca: ca.pem}\n"
              "backend: {kind: emulated, cards: 1, pki: pki}\n")
    with host_agent(tmp_path, config) as (address, log):
        assert "mutual TLS" in log.read_text()
        local = f"127.0.0.1:{address.rsplit(':', 1)[1]}"

        async def calls() -> None:
            mutual = TLSClientConfig(_cert_pem(ca[1]), _cert_pem(client[1]), _pem(client[0]))
            async with HostClient(local, tls=mutual) as host:
                assert [c.card_id for c in await host.list_devices()] == ["secure-card0"]
            async with HostClient(local, tls=TLSClientConfig(_cert_pem(ca[1]))) as host:
                with pytest.raises(UnreachableError):
                    await host.list_devices()

        anyio.run(calls)


async def test_a_host_lists_its_services_by_reflection() -> None:
    """gRPC server reflection on every host (emulated or agent): what it serves."""
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from orchestrator.emulator.fleet import FleetConfig, run_fleet

    async with run_fleet(FleetConfig(hosts=1, devices_per_host=1)) as fleet:
        async with grpc.aio.insecure_channel(fleet.addresses[0]) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            async for answer in stub.ServerReflectionInfo(iter([request])):
                names = {s.name for s in answer.list_services_response.service}
                break
    assert names >= {"modelip.v1.DeviceRuntime", "modelip.v1.RemoteAttestation",
                     "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


async def test_one_operation_at_a_time_per_card_and_the_backends_reason_kept(
        tmp_path: Path) -> None:
    """per_card: 1: three attests of card 0 run one after the other (never two at once),
    while card 1's runs beside them; the backend's own reason reaches the client."""
    from orchestrator.errors import DeviceOffline

    log = tmp_path / "log"
    busy = f"{tmp_path}/busy.$MODELIP_DEVICE"
    body = (f"if ! mkdir {busy} 2>/dev/null; then echo overlap >> {log}; fi\n"
            f"echo start $MODELIP_DEVICE >> {log}; sleep 0.3; rmdir {busy}\n"
            "echo '{\"version\": 1, \"error\": {\"reason\": \"ERROR_REASON_OFFLINE\", "
            "\"message\": \"rebooting\"}}'; exit 1")
    backend = ExecBackend(ExecConfig(_script(tmp_path, "backend", body), per_card=1))
    async with agent_over(backend, tmp_path) as host:
        failures: list[BaseException] = []

        async def attest(device: int) -> None:
            try:
                await host.attest(device, os.urandom(32))
            except DeviceOffline as err:
                failures.append(err)

        async with anyio.create_task_group() as tg:
            for device in (0, 0, 0, 1):
                tg.start_soon(attest, device)
    assert len(failures) == 4 and all("rebooting" in str(f) for f in failures)
    lines = log.read_text().split()
    assert "overlap" not in lines
    assert lines.count("0") == 3 and lines.count("1") == 1
    # card 1 did not wait for card 0's queue: it started before card 0's third
    starts = [line for line in lines if line in ("0", "1")]
    assert starts.index("1") < 3


async def test_execute_hands_the_backend_files_and_reads_back_what_it_wrote(
        tmp_path: Path) -> None:
    """The execute contract: inputs in an .npz the agent writes, outputs in the .npz the
    backend writes at the path given; a backend that writes none is an error of the
    card; the per-call directory is gone after the call."""
    import sys

    import numpy as np

    script = tmp_path / "backend"
    script.write_text(f"""#!{sys.executable}
import json, os, sys
import numpy as np
request = json.load(sys.stdin)
if os.environ["MODELIP_OPERATION"] == "list":
    print(json.dumps({{"version": 1, "cards": []}}))
    sys.exit(0)
with open("{tmp_path}/calls", "a") as calls:
    calls.write(os.path.dirname(request["inputs"]) + "\\n")
if request["devices"] == [0, 1]:
    with np.load(request["inputs"]) as inputs:
        np.savez(request["outputs"], y=inputs["x"] * 2)
print(json.dumps({{"version": 1}}))
""")
    script.chmod(0o755)
    backend = ExecBackend(ExecConfig(script), scratch=tmp_path)
    async with agent_over(backend, tmp_path) as host:
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        outputs = await host.execute([0, 1], {"x": x})
        assert list(outputs) == ["y"] and np.array_equal(outputs["y"], x * 2)
        with pytest.raises(RemoteError, match="no readable outputs.npz"):
            await host.execute([1], {"x": x})
    calls = (tmp_path / "calls").read_text().split()
    left = {str(path) async for path in anyio.Path(tmp_path).iterdir()}
    assert len(calls) == 2 and not set(calls) & left
