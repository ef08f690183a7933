"""The control API under a reset storm: how late watchers hear of a change, and what
watchers cost the engine.

    python bench/api.py [--cards 1024] [--devices-per-host 64] [--watchers 0,10,100]

`modelip emulate` runs the hosts in a process of their own; `modelip watch --api`
runs the orchestrator in another. For each number of watchers (streams opened by
this script), every card is reset at once and the orchestrator brings every card
back. Printed per round: the orchestrator's CPU seconds for the storm (its own
process, from before the resets to every card serving again) against the round
without watchers, the CPU seconds of the control API's process (the orchestrator
serves the API from a process of its own: docs/api.md "Where it runs"), and, with
watchers, the delay from a change's journal time to a watcher receiving it (p50,
p99, max, over every change every watcher received).

Targets (docs/api.md, issue "an API for automation"): p99 <= 50 ms; 100 watchers
cost the engine at most 10% more CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _measure import FLEET_PLAN, start_emulator  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """User + system seconds of a process (and its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def api_process(pid: int) -> int:
    """The control API's process, a child of the orchestrator's (orchestrator/api/apart.py)."""
    for _ in range(100):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            if "orchestrator.api" in Path(f"/proc/{child}/cmdline").read_text():
                return int(child)
        time.sleep(0.1)
    raise SystemExit("the orchestrator runs no control API process")


async def listing(stub: Any) -> list[tuple[str, int, str, int]]:
    from orchestrator._proto.modelip.v1 import control_pb2

    answer = await stub.List(control_pb2.ListRequest())
    return [(c.host, c.device, c.state, c.boot_counter) for c in answer.cards]


async def storm_round(api: str, addresses: list[str], devices: int, watchers: int,
                      pids: tuple[int, int]) -> tuple[float, float, list[float], int]:
    """Reset every card with ``watchers`` streams open; (orchestrator CPU s, the API
    process's CPU s, delays, messages the watchers received)."""
    import anyio
    import grpc

    from orchestrator._proto.modelip.v1 import control_pb2, control_pb2_grpc
    from orchestrator.transport.client import HostClient

    delays: list[float] = []
    async with grpc.aio.insecure_channel(api) as channel:
        stub = control_pb2_grpc.ControlStub(channel)
        before = {(h, d): boot for h, d, _, boot in await listing(stub)}
        since = (await stub.List(control_pb2.ListRequest())).revision
        caught_up = anyio.Semaphore(0)

        # each batch kept as it came, with the time it came: parsed after the round,
        # so a hundred watchers' parsing does not delay the next arrival
        watch = channel.unary_stream("/modelip.v1.Control/Watch",
                                     request_serializer=control_pb2.WatchRequest.SerializeToString,
                                     response_deserializer=None)
        arrived: list[tuple[float, bytes]] = []

        async def one() -> None:
            first = True
            async for raw in watch(control_pb2.WatchRequest(since=since)):
                arrived.append((time.time(), raw))
                if first and control_pb2.ChangeBatch.FromString(raw).changes[-1].type == \
                        control_pb2.Change.BOOKMARK:
                    first = False
                    caught_up.release()

        async with anyio.create_task_group() as tg:
            for _ in range(watchers):
                tg.start_soon(one)
            for _ in range(watchers):
                await caught_up.acquire()
            started = [process_cpu(pid) for pid in pids]
            clients = [HostClient(address) for address in addresses]
            async with anyio.create_task_group() as resets:
                for client in clients:
                    for device in range(devices):
                        resets.start_soon(client.reset, device)
            for client in clients:
                await client.close()
            while not all(state == "SERVING" and boot > before[(h, d)]  # noqa: ASYNC110 - polled
                          for h, d, state, boot in await listing(stub)):
                await anyio.sleep(0.1)
            spent = [process_cpu(pid) - before for pid, before in zip(pids, started, strict=True)]
            await anyio.sleep(1.0)   # the last changes reach the watchers
            tg.cancel_scope.cancel()
    for now, raw in arrived:
        delays.extend(now - change.ts for change in control_pb2.ChangeBatch.FromString(raw).changes
                      if change.ts)
    return spent[0], spent[1], delays, len(arrived)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cards", type=int, default=1024)
    parser.add_argument("--devices-per-host", type=int, default=64)
    parser.add_argument("--watchers", default="0,10,100")
    args = parser.parse_args()
    hosts = args.cards // args.devices_per_host
    with tempfile.TemporaryDirectory(prefix="modelip-api-bench-") as tmp:
        work = Path(tmp)
        from orchestrator.cli.samples import sample_mlp

        (work / "tiny.onnx").write_bytes(sample_mlp().SerializeToString())
        emulator, addresses, root = start_emulator(work, hosts, args.devices_per_host,
                                                   "--reboot-time", "0.2")
        plan = work / "plan.yaml"
        plan.write_text(FLEET_PLAN.format(root=root, hosts="\n".join(
            f"    - {{address: \"{a}\", devices: {list(range(args.devices_per_host))}}}"
            for a in addresses)))
        api = "127.0.0.1:62499"
        orchestrator = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "watch", str(plan), "--json", "--api", api],
            cwd=work, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert orchestrator.stdout is not None
            for line in orchestrator.stdout:
                if json.loads(line).get("event") == "deployed":
                    break
            threading_drain(orchestrator)
            pids = (orchestrator.pid, api_process(orchestrator.pid))
            print(f"{args.cards} cards ({hosts} hosts x {args.devices_per_host}), every card "
                  "reset at once, per round:")
            base = None
            for watchers in (int(n) for n in args.watchers.split(",")):
                spent, serving, delays, messages = anyio.run(storm_round, api, addresses,
                                                   args.devices_per_host, watchers, pids)
                base = spent if base is None else base
                said = (f"  {watchers:>3} watchers: orchestrator CPU {spent:.2f} s "
                        f"({spent / base:.2f}x the first round), the API's process "
                        f"{serving:.2f} s")
                if delays:
                    said += (f"; {len(delays)} changes received in {messages} messages, "
                             f"delay p50 "
                             f"{percentile(delays, 0.5) * 1e3:.1f} ms, p99 "
                             f"{percentile(delays, 0.99) * 1e3:.1f} ms, max "
                             f"{max(delays) * 1e3:.1f} ms")
                print(said, flush=True)
        finally:
            orchestrator.send_signal(signal.SIGTERM)
            orchestrator.wait(timeout=60)
            emulator.send_signal(signal.SIGINT)
            emulator.wait(timeout=60)


def threading_drain(process: subprocess.Popen[str]) -> None:
    """Keep reading the orchestrator's events so its pipe never fills."""
    import threading

    def drain() -> None:
        assert process.stdout is not None
        for _ in process.stdout:
            pass
    threading.Thread(target=drain, daemon=True).start()


if __name__ == "__main__":
    main()
