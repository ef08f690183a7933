"""Attestations verified per second on one host of 16 cards, against the same
number of bare RPC round trips with an empty payload (the gRPC floor), same run.

    python bench/attest_rate.py [--count 800] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from orchestrator.crypto.evidence import TrustPolicy, verify_evidence  # noqa: E402
from orchestrator.emulator.fleet import FleetConfig, run_fleet  # noqa: E402
from orchestrator.transport.client import HostClient  # noqa: E402


async def measure(count: int, concurrency: int) -> None:
    async with run_fleet(FleetConfig(hosts=1, devices_per_host=16)) as fleet, \
            HostClient(fleet.addresses[0]) as host:
        roots = [fleet.pki.root]
        await host.health()

        async def attest_worker(indices: range) -> None:
            for index in indices:
                request = os.urandom(32)
                evidence = await host.attest(index % 16, request)
                verify_evidence(evidence, roots=roots, policy=TrustPolicy(), request=request)

        async def floor_worker(indices: range) -> None:
            for _ in indices:
                await host.health()  # a unary RPC with an empty request

        results = {}
        for name, worker in (("bare RPC (health)", floor_worker),
                             ("attest + verify", attest_worker)):
            per = count // concurrency
            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for w in range(concurrency):
                    tg.start_soon(worker, range(w * per, (w + 1) * per))
            elapsed = time.perf_counter() - start
            results[name] = per * concurrency / elapsed
            print(f"{name:<20} {results[name]:8.0f} per second ({per * concurrency} in "
                  f"{elapsed:.2f} s, {concurrency} in flight)")
        floor, attest = results.values()
        print(f"ratio attest/floor: {attest / floor:.2f}x of the bare gRPC rate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=800)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    anyio.run(measure, args.count, args.concurrency)


if __name__ == "__main__":
    main()
