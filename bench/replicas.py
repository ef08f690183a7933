"""Replicas sharing one fleet: how fast they bring it to serving, how fast they take over.

    python bench/replicas.py [--hosts 12] [--devices-per-host 8] [--ttl 3]

A throwaway PostgreSQL server (the distribution's, unix socket) and a fresh
`modelip emulate` per round (fresh cards: nothing to confirm, every card is
attested, keyed and loaded). For 1, 2 and 3 `modelip watch` replicas started
together: cards brought to serving per second, from the first lease claimed to
the last card SERVING in the store. Then, with 2 and 3 replicas, one is killed
(SIGKILL) and the time until every card of its hosts is confirmed by a
survivor is printed beside the lease TTL (the floor: a dead replica's lease
must expire first). All printed side by side, measured in the same run.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from orchestrator.crypto.mek import MEK, write_mek  # noqa: E402
from tests.models import tiny_mlp  # noqa: E402
from tests.pg import PostgresServer  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from _measure import start_emulator  # noqa: E402

MODELIP = [sys.executable, "-m", "orchestrator"]


def query(url: str, sql: str) -> list[tuple[object, ...]]:
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            return conn.execute(sql.encode()).fetchall()
    except psycopg.errors.UndefinedTable:
        return []


def start_fleet(work: Path, hosts: int, devices: int) -> tuple[subprocess.Popen[bytes], Path]:
    process, addresses, _ = start_emulator(work, hosts, devices)
    listed = "\n".join(f"    - address: {a}\n      devices: {list(range(devices))}"
                       for a in addresses)
    plan = work / "plan.yaml"
    plan.write_text(f"""
model: {{onnx: {work.parent / 'tiny.onnx'}}}
mek: {{file: {work.parent / 'mek.bin'}}}
fleet:
  hosts:
{listed}
trust: {{roots: [pki/root.pem]}}
rekey: {{check_interval: 5}}
replicas: {{lease_ttl: {ARGS.ttl}}}
state_dir: state
""")
    return process, plan


def round_of(server: PostgresServer, work: Path, replicas: int, cards: int
             ) -> tuple[float, float | None]:
    """(cards per second to serving, takeover seconds after a SIGKILL or None)."""
    work.mkdir()
    fleet, plan = start_fleet(work, ARGS.hosts, ARGS.devices_per_host)
    url = server.new_database()
    started = []
    try:
        for i in range(replicas):
            started.append(subprocess.Popen(
                [*MODELIP, "watch", str(plan), "--json", "--store", url, "--replica", f"r{i}"],
                stdout=subprocess.DEVNULL, stderr=open(work / f"r{i}.err", "w")))  # noqa: SIM115
        first = None
        while True:
            now = time.monotonic()
            if first is None and query(url, "SELECT 1 FROM leases WHERE owner <> '' LIMIT 1"):
                first = now
            serving = query(url, "SELECT count(*) FROM cards WHERE state = 'SERVING'")
            if first is not None and serving and serving[0][0] == cards:
                rate = cards / (now - first)
                break
            time.sleep(0.02)
        if replicas == 1:
            return rate, None
        # let every replica hold its share, then kill one
        while len(query(url, "SELECT DISTINCT owner FROM leases WHERE owner <> '' "
                        "AND expires > now()")) < replicas:
            time.sleep(0.05)
        victim = started[0]
        held = {h for (h,) in query(url, "SELECT host FROM leases WHERE owner = 'r0'")}
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        victim.wait()
        while True:
            rows = query(url, "SELECT host, replica, state FROM cards")
            if held and all(r != "r0" and s == "SERVING" for h, r, s in rows if h in held):
                return rate, time.monotonic() - killed
            time.sleep(0.02)
    finally:
        for process in started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in started:
            process.wait(timeout=30)
        fleet.send_signal(signal.SIGINT)
        fleet.wait(timeout=30)


def main() -> None:
    cards = ARGS.hosts * ARGS.devices_per_host
    server = PostgresServer()
    results = {}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch)
            (root / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
            write_mek(root / "mek.bin", MEK.generate())
            for replicas in (1, 2, 3):
                results[replicas] = round_of(server, root / f"round-{replicas}", replicas,
                                             cards)
    finally:
        server.close()
    base = results[1][0]
    print(f"{ARGS.hosts} hosts x {ARGS.devices_per_host} cards ({cards}), lease TTL "
          f"{ARGS.ttl:g} s, emulated hosts in their own process, one PostgreSQL")
    print(f"{'replicas':>8}  {'cards/s to serving':>18}  {'vs 1 replica':>12}  "
          f"{'takeover after SIGKILL':>22}  {'vs TTL':>6}")
    for replicas, (rate, takeover) in results.items():
        took = f"{takeover:.2f} s" if takeover is not None else "-"
        ratio = f"{takeover / ARGS.ttl:.2f}x" if takeover is not None else "-"
        print(f"{replicas:>8}  {rate:>18.1f}  {rate / base:>11.2f}x  {took:>22}  {ratio:>6}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=12)
    parser.add_argument("--devices-per-host", type=int, default=8)
    parser.add_argument("--ttl", type=float, default=3.0)
    ARGS = parser.parse_args()
    if ARGS.hosts % 6:
        parser.error("--hosts must be a multiple of 6 (a fair share for 1, 2 and 3 replicas)")
    main()
