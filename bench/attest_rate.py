"""Attestations verified per second on one host of 16 cards, against the same
number of bare RPC round trips with an empty payload (the gRPC floor), same run.

    python bench/attest_rate.py [--count 1600] [--concurrency 16]

The host is `modelip emulate` in its own process (as a real host is another
machine): this process does only what the orchestrator does, attest and
verify. Printed: the floor, attest + verify with a cold chain cache (every
chain verified afresh, as before the cache existed) and with the orchestrator's
cache, and the ratios. Target (the performance issue): >= 0.7x the floor.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import start_emulator  # noqa: E402

from orchestrator.crypto.evidence import (  # noqa: E402
    ChainCache,
    TrustPolicy,
    load_roots_file,
    verify_evidence,
)
from orchestrator.transport.client import HostClient  # noqa: E402


async def rate(count: int, concurrency: int, call: Callable[[int], Awaitable[None]]) -> float:
    per = count // concurrency

    async def worker(first: int) -> None:
        for index in range(first, first + per):
            await call(index)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for w in range(concurrency):
            tg.start_soon(worker, w * per)
    return per * concurrency / (time.perf_counter() - start)


async def measure(address: str, root: Path, count: int, concurrency: int) -> None:
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
        results: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(2):  # interleaved, best of two
            for name, call in cases.items():
                results[name].append(await rate(count, concurrency, call))
        floor = max(results["bare RPC (health)"])
        for name, rates in results.items():
            print(f"{name:<34} {max(rates):8.0f} per second   {max(rates) / floor:5.2f}x floor")
        print(f"({count} calls each, {concurrency} in flight, host in its own process)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1600)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        process, addresses, root = start_emulator(Path(scratch), 1, 16)
        try:
            anyio.run(measure, addresses[0], root, args.count, args.concurrency)
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
