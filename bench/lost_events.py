"""How much of the time do cards hold their program when hosts lose events?

    python bench/lost_events.py [--seconds 30] [--drop 0.5] [--reset-rate 0.1]

`modelip emulate` runs as a separate process (2 hosts x 8 cards, cards reset at
--reset-rate per card per second, reboot 0.2 s). `modelip`'s engine (default
plan settings: periodic attestation every 5 s, host resync every 1 s) keeps
the fleet serving. Every 50 ms the hosts' own ListDevices is sampled: a card
"holds its program" when its host shows our program loaded on it. Printed side
by side, in the same run: no events lost, and --drop of them lost; plus the
floor the reboots alone impose (1 - reset_rate x reboot_time) and how often the
engine said SERVING while the host showed nothing loaded for longer than one
check interval.

Target (issue: the supervision tree): >= 95% held with half the events lost.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from orchestrator.app import open_engine  # noqa: E402
from orchestrator.engine.context import percentile  # noqa: E402
from orchestrator.plan.model import Plan  # noqa: E402
from orchestrator.transport.client import HostClient  # noqa: E402
from orchestrator.transport.types import DeviceState  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from _measure import start_emulator as emulate  # noqa: E402

REBOOT = 0.2


def start_emulator(work: Path, drop: float, rate: float
                   ) -> tuple[subprocess.Popen[bytes], list[str]]:
    process, addresses, _ = emulate(work, 2, 8, "--reset-rate", str(rate), "--reboot-time",
                                    str(REBOOT), "--drop-events", str(drop))
    return process, addresses


async def measure(work: Path, drop: float, rate: float, seconds: float) -> dict[str, float]:
    process, addresses = start_emulator(work, drop, rate)
    sys.path.insert(0, str(ROOT / "tests"))
    from models import tiny_mlp

    (work / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
    hosts = "\n".join(f"    - {{address: \"{a}\", devices: [0, 1, 2, 3, 4, 5, 6, 7]}}"
                      for a in addresses)
    (work / "plan.yaml").write_text(f"model: {{onnx: tiny.onnx}}\nmek: {{generate: true}}\n"
                                    f"fleet:\n  hosts:\n{hosts}\n"
                                    "trust: {roots: [pki/root.pem]}\nstate_dir: state\n")
    plan = Plan.load(work / "plan.yaml")
    held = total = lying = 0
    try:
        async with open_engine(plan) as engine, anyio.create_task_group() as tg:
            await tg.start(lambda task_status: engine.run(keep_serving=True,
                                                          task_status=task_status))
            await engine.deployed.wait()
            program = engine.program.program_id
            clients = [HostClient(a) for a in addresses]
            unloaded_since: dict[tuple[str, int], float] = {}
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                now = time.monotonic()
                for client, host in zip(clients, engine.hosts, strict=True):
                    for status in await client.list_devices():
                        key = (host.name, status.device)
                        loaded = (status.state is DeviceState.LOADED
                                  and status.program_id == program)
                        total += 1
                        held += loaded
                        if loaded:
                            unloaded_since.pop(key, None)
                        else:
                            unloaded_since.setdefault(key, now)
                        serving = host.drivers[status.device].machine.state.value == "SERVING"
                        if serving and not loaded and \
                                now - unloaded_since[key] > plan.rekey.check_interval:
                            lying += 1
                await anyio.sleep(0.05)
            outages = list(engine.stats.outages)
            for client in clients:
                await client.close()
            tg.cancel_scope.cancel()
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    p99 = percentile(outages, 0.99) or 0.0
    return {"held": held / max(total, 1), "lying": lying / max(total, 1),
            "rekeys": len(outages), "p50": percentile(outages, 0.5) or 0.0, "p99": p99}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--drop", type=float, default=0.5)
    parser.add_argument("--reset-rate", type=float, default=0.1)
    args = parser.parse_args()
    floor = 1 - args.reset_rate * REBOOT
    print(f"2 hosts x 8 cards, {args.reset_rate} resets/card/s, reboot {REBOOT} s, "
          f"{args.seconds:g} s each; reboots alone allow {floor:.1%}")
    results = {}
    for drop in (0.0, args.drop):
        with tempfile.TemporaryDirectory(dir=".") as scratch:
            r = anyio.run(measure, Path(scratch), drop, args.reset_rate, args.seconds)
        results[drop] = r
        print(f"events lost {drop:4.0%}: program held {r['held']:.1%} of samples "
              f"({r['held'] / floor:.3f} of the floor), {r['rekeys']:.0f} re-keys, outage "
              f"p50 {r['p50'] * 1e3:.0f} ms p99 {r['p99'] * 1e3:.0f} ms; SERVING while the "
              f"host showed nothing for > 1 check interval: {r['lying']:.2%} of samples")
    ratio = results[args.drop]["held"] / max(results[0.0]["held"], 1e-9)
    print(f"held with {args.drop:.0%} lost / held with none lost: {ratio:.3f}  "
          f"(target: >= 95% held with half the events lost)")


if __name__ == "__main__":
    main()
