"""Attestations verified per second on one host of 16 cards, against the same
number of bare RPC round trips with an empty payload (the gRPC floor), same run.

    python bench/attest_rate.py [--count 1600] [--concurrency 16] [--rounds 7]

The host is `modelip emulate` in its own process (as a real host is another
machine): this process does only what the orchestrator does, attest and
verify. Printed: the floor, attest + verify with a cold chain cache (every
chain verified afresh, as before the cache existed) and with the orchestrator's
cache, and the ratios (each round's over the floor of the same round; the median
of the rounds), with the CPU per call of this process and of the host, and the
ceiling that CPU sets on two shared cores. Target (the performance issue):
>= 0.7x the floor.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import start_emulator  # noqa: E402

from orchestrator.crypto.chain import ChainCache, load_roots_file
from orchestrator.crypto.evidence import TrustPolicy, verify_evidence
from orchestrator.transport.client import HostClient  # noqa: E402


def host_cpu(pid: int) -> float:
    """CPU seconds (user + system) the host process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def rate(count: int, concurrency: int, call: Callable[[int], Awaitable[None]],
               host: int) -> tuple[float, float, float]:
    """Calls per second; CPU seconds per call of this process and of the host's."""
    per = count // concurrency

    async def worker(first: int) -> None:
        for index in range(first, first + per):
            await call(index)

    start, mine, theirs = time.perf_counter(), own_cpu(), host_cpu(host)
    async with anyio.create_task_group() as tg:
        for w in range(concurrency):
            tg.start_soon(worker, w * per)
    calls = per * concurrency
    return (calls / (time.perf_counter() - start), (own_cpu() - mine) / calls,
            (host_cpu(host) - theirs) / calls)


async def measure(address: str, root: Path, count: int, concurrency: int,
                  rounds: int, host_pid: int) -> None:
    roots = load_roots_file(str(root))
    policy = TrustPolicy()
    async with HostClient(address) as host:
        await host.health()

        async def bare(_: int) -> None:
            await host.health()  # a unary RPC with an empty request

        def attest_with(cache: ChainCache | None) -> Callable[[int], Awaitable[None]]:
            async def attest(index: int) -> None:
                request = os.urandom(32)
                evidence = await host.attest(index % 16, request)
                verify_evidence(evidence, roots=roots, policy=policy, request=request,
                                cache=cache)
            return attest

        cases = {"bare RPC (health)": bare,
                 "attest + verify, no cache": attest_with(None),
                 "attest + verify (cached chains)": attest_with(ChainCache())}
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in cases}
        for _ in range(rounds):  # interleaved: each round measures every case back to back
            for name, call in cases.items():
                results[name].append(await rate(count, concurrency, call, host_pid))
        floors = results["bare RPC (health)"]
        bare_cpu = statistics.median(c + h for _, c, h in floors)
        print(f"{'':<32} {'per second':>10} {'vs floor':>9} {'rounds':>12} "
              f"{'CPU here':>9} {'CPU host':>9} {'ceiling':>8}")
        for name, measured in results.items():
            # each round's rate over the floor of the same round, then the median: a
            # slow moment of the machine slows both sides of one ratio, not just one
            ratios = sorted(r / f for (r, _, _), (f, _, _) in zip(measured, floors, strict=True))
            mine = statistics.median(c for _, c, _ in measured)
            theirs = statistics.median(h for _, _, h in measured)
            both = statistics.median(c + h for _, c, h in measured)
            print(f"{name:<32} {statistics.median(r for r, _, _ in measured):10.0f} "
                  f"{statistics.median(ratios):8.2f}x {ratios[0]:5.2f}x-{ratios[-1]:.2f}x "
                  f"{mine * 1e6:7.0f}us {theirs * 1e6:7.0f}us {bare_cpu / both:7.2f}x")
        print(f"({count} calls each, {concurrency} in flight, host in its own process; "
              f"median of {rounds} rounds; CPU per call, median; ceiling: the floor's CPU "
              "per call, both processes, over this case's: the most two shared cores allow)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1600)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        process, addresses, root = start_emulator(Path(scratch), 1, 16)
        try:
            anyio.run(measure, addresses[0], root, args.count, args.concurrency, args.rounds,
                      process.pid)
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
