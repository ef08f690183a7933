"""A reset storm: every card of a fleet resets at once (a rack loses power, an operator
flips every card into a new mode), and the orchestrator brings every card back.

    python bench/storm.py [--sizes 1024,4096] [--devices-per-host 64] [--reboot-time 0.2]
                          [--concurrency N] [--rounds 3] [--through-rpc]

For each size, `modelip emulate` runs the hosts in a process of their own (the
cards' cryptography is spent there, as on real hosts). A fresh orchestrator
process deploys the fleet (the first deploy: wall and CPU per card), then keeps
it serving while every card resets at once, ``--rounds`` times (a storm once
every card has been serving for a second): a power cut of the emulated hosts
(SIGUSR1 to `modelip emulate`), or with ``--through-rpc`` ResetDevice calls from
this script, every card's at once (they take seconds to send: a spread storm).
Printed per size, and per storm:

- seconds from the last reset sent to every card serving again, against the
  first deploy's seconds of the same fleet in the same run;
- loads per card (the hosts' own count) and attestations per card (answered
  ones: a card still rebooting answers nothing and is not counted; those answers
  are counted apart), calls made, host events dropped as stale news, hints
  disproved by an attestation;
- the orchestrator's CPU per re-keyed card and per deployed card, against the
  floor measured in this script right before that storm or deploy (this
  machine's speed drifts): the cryptography one card needs (one evidence
  verification, one MEK wrap, one receipt verification: two P-256 signature
  checks and one HPKE wrap; in the first deploy each card's chain is verified
  too, as bench/fleet.py's floor; in a storm it is known); the median storm;
- the orchestrator's peak RSS.

Targets (docs/performance.md, issue "reset storms"): CPU per card <= 5x the floor
in the storm and in the first deploy; <= 1.05 attestations per card; exactly one
load per card; all serving again within the first deploy's time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _measure import FLEET_PLAN, cpu, floor_per_card, start_emulator  # noqa: E402

# --- the orchestrator: a child process ---------------------------------------------------

def storm_child(plan_path: Path, rounds: int) -> None:
    """Deploy; say so (one JSON line); keep serving; for each storm (a line on stdin
    says it begins), once every card has been re-keyed once more, print a JSON line;
    end after ``rounds`` storms."""
    import anyio

    from orchestrator.app import open_engine
    from orchestrator.engine.state import CardState
    from orchestrator.plan.model import Plan

    async def run() -> None:
        async with open_engine(Plan.load(plan_path)) as engine, \
                anyio.create_task_group() as tg:
            def calls(kind: str = "attest") -> int:  # calls made (a batch is one)
                return sum(getattr(h.client, f"{kind}_calls", 0) for h in engine.hosts)

            start, wall = cpu(), time.perf_counter()
            await tg.start(lambda task_status: engine.run(keep_serving=True,
                                                          task_status=task_status))
            await engine.deployed.wait()
            cards = len(engine.cards)
            first = {"cpu": cpu() - start, "wall": time.perf_counter() - wall, "cards": cards,
                     "attestations": engine.stats.attestations, "attest_calls": calls(),
                     "load_calls": calls("load"),
                     "serving": sum(c.state is CardState.SERVING for c in engine.cards)}
            print(json.dumps(first), flush=True)
            disproved: Counter[str] = Counter()
            back = anyio.Event()   # set once every card has been re-keyed (this storm)

            def heard(event: Any) -> None:   # called for every event: kept cheap
                if event.KIND == "hint_disproved":
                    disproved[event.trigger] += 1
                elif event.KIND == "rekeyed":
                    returned.append(time.time())
                    if engine.stats.rekeys >= cards * storm:
                        back.set()

            engine.subscribe(heard)
            for storm in range(1, rounds + 1):
                await anyio.to_thread.run_sync(sys.stdin.readline)   # the storm begins
                disproved.clear()
                returned: list[float] = []
                back = anyio.Event()
                base = {"attestations": engine.stats.attestations, "cpu": cpu(),
                        "calls": calls(), "load_calls": calls("load"),
                        "stale_hints": engine.stats.stale_hints,
                        "rebooting": engine.stats.found_rebooting}
                await back.wait()   # (not a wake at each of the engine's changes: its CPU
                while not all(c.state is CardState.SERVING for c in engine.cards):  # counts)
                    with anyio.move_on_after(0.05):
                        await engine.changed()
                print(json.dumps({
                    "cpu": cpu() - base["cpu"], "done_at": time.time(),
                    "rekeys": engine.stats.rekeys - cards * (storm - 1),
                    "attestations": engine.stats.attestations - base["attestations"],
                    "attest_calls": calls() - base["calls"],
                    "load_calls": calls("load") - base["load_calls"],
                    "stale_hints": engine.stats.stale_hints - base["stale_hints"],
                    "rebooting": engine.stats.found_rebooting - base["rebooting"],
                    "returned": [sorted(returned)[int(q * (len(returned) - 1))]
                                 for q in (0.5, 0.9, 0.99)],
                    "disproved": dict(disproved),
                    "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}),
                    flush=True)
            tg.cancel_scope.cancel()

    if os.environ.get("STORM_PROFILE"):  # where the orchestrator's CPU goes (a file)
        import cProfile

        cProfile.runctx("anyio.run(run)", globals(), {"anyio": anyio, "run": run},
                        os.environ["STORM_PROFILE"])
        return
    anyio.run(run)


# --- the storm ---------------------------------------------------------------------------

def host_loads(addresses: list[str]) -> int:
    import anyio

    from orchestrator.transport.client import HostClient

    async def count() -> int:
        total = 0
        for address in addresses:
            async with HostClient(address) as client:
                total += int((await client.stats())["load_count"])
        return total
    return anyio.run(count)


def reset_everything(addresses: list[str], devices: int) -> float:
    """ResetDevice for every card, every host at once; the time the last one was sent."""
    import anyio

    from orchestrator.transport.client import HostClient
    from orchestrator.transport.types import Deadlines

    async def reset() -> float:
        # the hosts may take a while to answer 4,096 resets while they attest and load:
        # each reset may wait a minute
        clients = [HostClient(address, deadlines=Deadlines(control=60.0))
                   for address in addresses]
        last = 0.0

        async def host(client: HostClient) -> None:
            nonlocal last
            async with anyio.create_task_group() as tg:
                for device in range(devices):
                    tg.start_soon(client.reset, device)
            last = max(last, time.time())

        async with anyio.create_task_group() as tg:
            for client in clients:
                tg.start_soon(host, client)
        for client in clients:
            await client.close()
        return last
    return anyio.run(reset)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def power_cut(emulator: subprocess.Popen[bytes], log: Path, cuts: int) -> float:
    """SIGUSR1 to `modelip emulate`: every card resets at once; the time it has said so
    (the ``cuts``-th time)."""
    emulator.send_signal(signal.SIGUSR1)
    while log.read_text().count("power cut:") < cuts:
        if emulator.poll() is not None:
            raise SystemExit("modelip emulate ended")
        time.sleep(0.001)
    return time.time()


def storm(size: int, devices: int, reboot_time: float, concurrency: int | None,
          rounds: int, through_rpc: bool) -> dict[str, Any]:
    hosts = size // devices
    with tempfile.TemporaryDirectory(prefix="modelip-storm-") as tmp:
        work = Path(tmp)
        from orchestrator.cli.samples import sample_mlp

        (work / "tiny.onnx").write_bytes(sample_mlp().SerializeToString())
        emulator, addresses, root = start_emulator(work, hosts, devices, "--reboot-time",
                                                   str(reboot_time))
        try:
            plan = work / "plan.yaml"
            plan.write_text(FLEET_PLAN.format(root=root, hosts="\n".join(
                f"    - {{address: \"{a}\", devices: {list(range(devices))}}}"
                for a in addresses)) + (f"concurrency: {concurrency}\n" if concurrency else ""))
            first_floor = floor_per_card()   # next to the first deploy
            hosts_cpu = process_cpu(emulator.pid)
            child = subprocess.Popen([sys.executable, __file__, "--storm-child", str(plan),
                                      "--rounds", str(rounds)], cwd=work,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert child.stdin is not None and child.stdout is not None
            first = json.loads(child.stdout.readline() or "{}")
            first["hosts_cpu"] = process_cpu(emulator.pid) - hosts_cpu
            if first.get("serving") != size:
                raise SystemExit(f"the first deploy did not bring {size} cards to serving: "
                                 f"{first}")
            storms = []
            for _ in range(rounds):
                # every card last looked at more than rekey.min_interval ago (1 s): the
                # storm is not held back by the per-card rate limit; meanwhile the floor,
                # measured again next to each storm (this machine's speed drifts)
                started = time.monotonic()
                floor = floor_per_card(known=True)
                time.sleep(max(0.0, 1.2 - (time.monotonic() - started)))
                loads_before = host_loads(addresses)
                hosts_cpu = process_cpu(emulator.pid)
                child.stdin.write("storm\n")
                child.stdin.flush()
                last_reset = reset_everything(addresses, devices) if through_rpc else \
                    power_cut(emulator, work / "emulate.log", len(storms) + 1)
                after = json.loads(child.stdout.readline() or "{}")
                if "done_at" not in after:
                    raise SystemExit("the orchestrator ended before every card was back")
                after["hosts_cpu"] = process_cpu(emulator.pid) - hosts_cpu
                after["loads"] = host_loads(addresses) - loads_before
                after["back_after"] = after["done_at"] - last_reset
                after["floor"] = floor
                storms.append(after)
            child.stdin.close()
            child.wait(timeout=120)
        finally:
            emulator.send_signal(signal.SIGINT)
            emulator.wait(timeout=60)
    first["floor"] = first_floor
    return {"size": size, "first": first, "storms": storms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024,4096")
    parser.add_argument("--devices-per-host", type=int, default=64)
    parser.add_argument("--reboot-time", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=None,
                        help="the plan's concurrency (default: the plan's default)")
    parser.add_argument("--rounds", type=int, default=3, help="storms per fleet (the median "
                        "is the result)")
    parser.add_argument("--through-rpc", action="store_true",
                        help="reset the cards with ResetDevice calls from this script (a "
                        "storm spread over the seconds they take to send) instead of a "
                        "power cut of the emulated hosts (all at once)")
    parser.add_argument("--storm-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    if args.storm_child:
        storm_child(args.storm_child, args.rounds)
        return
    for size in (int(s) for s in args.sizes.split(",")):
        r = storm(size, args.devices_per_host, args.reboot_time, args.concurrency,
                  args.rounds, args.through_rpc)
        first = r["first"]
        per_deploy = first["cpu"] / size
        print(f"{size} cards ({size // args.devices_per_host} hosts x "
              f"{args.devices_per_host}):")
        print(f"  first deploy: {first['wall']:.2f} s, CPU {per_deploy * 1e3:.2f} ms per card "
              f"= {per_deploy / first['floor']:.1f}x its floor ({first['floor'] * 1e3:.3f} ms: "
              f"chains verified); {first['attestations']} attestations in "
              f"{first['attest_calls']} calls, {size} loads in {first['load_calls']}; the "
              f"emulated hosts' process used {first['hosts_cpu']:.2f} s of CPU meanwhile")
        for number, after in enumerate(r["storms"], 1):
            per_card = after["cpu"] / size
            after["ratio"] = per_card / after["floor"]
            print(f"  storm {number}: all serving {after['back_after']:.2f} s after the last "
                  f"reset ({after['back_after'] / first['wall']:.2f}x the first deploy's "
                  f"time); CPU {per_card * 1e3:.2f} ms per re-keyed card = "
                  f"{after['ratio']:.1f}x the floor ({after['floor'] * 1e3:.3f} ms)")
            p50, p90, p99 = (t - (after["done_at"] - after["back_after"])
                             for t in after["returned"])
            print(f"    cards back {p50:.2f} s (median), {p90:.2f} s (90%), {p99:.2f} s "
                  f"(99%) after the last reset (less than 0: before it); the emulated "
                  f"hosts' process used "
                  f"{after['hosts_cpu']:.2f} s of CPU meanwhile")
            print(f"    loads per card {after['loads'] / size:.3f}, attestations per card "
                  f"{after['attestations'] / size:.3f} in {after['attest_calls']} calls, "
                  f"loads in {after['load_calls']} calls; stale hints dropped "
                  f"{after['stale_hints']}, attestations answered 'still rebooting' "
                  f"{after['rebooting']}, hints disproved "
                  f"{sum(after['disproved'].values())} "
                  f"(by trigger: {after['disproved'] or 'none'})")
        middle = sorted(r["storms"], key=lambda a: a["ratio"])[len(r["storms"]) // 2]
        slowest = max(a["back_after"] for a in r["storms"])
        print(f"  median storm: CPU {middle['ratio']:.1f}x the floor "
              f"({middle['cpu'] / size * 1e3:.2f} ms per re-keyed card); the slowest all "
              f"serving {slowest:.2f} s after its last reset ({slowest / first['wall']:.2f}x "
              f"the first deploy's time)")
        print(f"  peak RSS {r['storms'][-1]['rss'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
