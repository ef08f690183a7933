"""Replicas sharing one fleet: how fast they bring it to serving, how fast they take over,
what each costs, and what they cost the database.

    python bench/replicas.py [--hosts 12] [--devices-per-host 8] [--ttl 3] [--steady 10]
    python bench/replicas.py --hosts 60 --devices-per-host 167     # 10,020 cards

A throwaway PostgreSQL server (the distribution's, unix socket) and a fresh
`modelip emulate` per round (fresh cards: nothing to confirm, every card is
attested, keyed and loaded). For 1, 2 and 3 `modelip watch` replicas started
together: cards brought to serving per second, from the first lease claimed to
the last card SERVING in the store. Then, with 2 and 3 replicas, one is killed
(SIGKILL), and printed beside the lease TTL (the floor: a dead replica's lease
must expire first): the time until the survivors hold every one of its hosts
(target: within 1.3x), and until every card of them is confirmed by a survivor
(a fresh attestation each: bounded by attestations per second). Beside them: each replica's CPU per
card it brought up (user + system, from /proc), the database's statements per
card until every card served (pg_stat_statements), and its load at steady state
(statements per second per 1,000 cards, over --steady seconds of a serving fleet
with nothing happening, every replica holding its share; BEGIN and COMMIT
count). All printed side by side, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
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


def statements(url: str) -> int:
    """Statements the database ran for this database so far (pg_stat_statements)."""
    found = query(url, "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE dbid = "
                  "(SELECT oid FROM pg_database WHERE datname = current_database())")
    return int(found[0][0]) if found else 0  # type: ignore[call-overload]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def round_of(server: PostgresServer, work: Path, replicas: int, cards: int
             ) -> dict[str, float | None]:
    """Cards per second to serving, CPU per card per replica, statements per card,
    steady statements per second per 1,000 cards, takeover seconds after a SIGKILL."""
    work.mkdir()
    fleet, plan = start_fleet(work, ARGS.hosts, ARGS.devices_per_host)
    url = server.new_database()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(b"CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
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
        result: dict[str, float | None] = {
            "rate": rate, "takeover": None, "claimed": None,
            "cpu": max(cpu_seconds(p.pid) for p in started) / (cards / replicas),
            "statements": statements(url) / cards}
        # every replica holds its share (nothing moves any more): the steady load
        while len(query(url, "SELECT DISTINCT owner FROM leases WHERE owner <> '' "
                        "AND expires > now()")) < replicas:
            time.sleep(0.05)
        time.sleep(ARGS.ttl)
        before, began = statements(url), time.monotonic()
        time.sleep(ARGS.steady)
        result["steady"] = (statements(url) - before) / (time.monotonic() - began) / (
            cards / 1000)
        if replicas == 1:
            return result
        victim = started[0]
        held = {h for (h,) in query(url, "SELECT host FROM leases WHERE owner = 'r0'")}
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        victim.wait()
        while True:
            if result["claimed"] is None and held and held <= {h for (h,) in query(
                    url, "SELECT host FROM leases WHERE owner NOT IN ('', 'r0') "
                    "AND expires > now()")}:
                result["claimed"] = time.monotonic() - killed
            rows = query(url, "SELECT host, replica, state FROM cards")
            if held and all(r != "r0" and s == "SERVING" for h, r, s in rows if h in held):
                result["takeover"] = time.monotonic() - killed
                return result
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
    server = PostgresServer("shared_preload_libraries=pg_stat_statements",
                            "pg_stat_statements.track=all")
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
    base = results[1]["rate"] or 1.0
    print(f"{ARGS.hosts} hosts x {ARGS.devices_per_host} cards ({cards}), lease TTL "
          f"{ARGS.ttl:g} s, emulated hosts in their own process, one PostgreSQL")
    print(f"{'replicas':>8}  {'cards/s':>8}  {'vs 1':>6}  {'CPU/card':>9}  "
          f"{'stmts/card':>10}  {'steady stmts/s/1k cards':>23}  {'hosts taken':>11}  "
          f"{'vs TTL':>6}  {'cards confirmed':>15}  {'vs TTL':>6}")

    def seconds(value: object) -> tuple[str, str]:
        if value is None:
            return "-", "-"
        return f"{value:.2f} s", f"{float(value) / ARGS.ttl:.2f}x"  # type: ignore[arg-type]
    for replicas, r in results.items():
        rate = r["rate"] or 0.0
        claimed, claimed_ratio = seconds(r["claimed"])
        took, ratio = seconds(r["takeover"])
        print(f"{replicas:>8}  {rate:>8.1f}  {rate / base:>5.2f}x  "
              f"{(r['cpu'] or 0) * 1e3:>7.2f}ms  {r['statements'] or 0:>10.1f}  "
              f"{r['steady'] or 0:>23.1f}  {claimed:>11}  {claimed_ratio:>6}  {took:>15}  "
              f"{ratio:>6}")
    print("hosts taken: until the survivors hold every host of the killed replica (target "
          "1.3x the TTL); cards confirmed: until every card of them is SERVING, attested "
          "by a survivor")
    print("CPU/card: the busiest replica's CPU seconds over the cards of its share, from "
          "its start to every card serving (start-up included)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=12)
    parser.add_argument("--devices-per-host", type=int, default=8)
    parser.add_argument("--ttl", type=float, default=3.0)
    parser.add_argument("--steady", type=float, default=10.0,
                        help="seconds of a serving fleet over which the steady load is read")
    ARGS = parser.parse_args()
    if ARGS.hosts % 6:
        parser.error("--hosts must be a multiple of 6 (a fair share for 1, 2 and 3 replicas)")
    main()
