"""Prometheus text exposition of an engine snapshot, served on request (--metrics-port)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import anyio
from anyio.abc import SocketStream, TaskStatus

from orchestrator.engine.context import EngineStats
from orchestrator.engine.ledger import Phase
from orchestrator.engine.snapshot import RolloutView, Snapshot
from orchestrator.engine.state import CardState, HostState
from orchestrator.errors import UsageError


def render_metrics(snapshot: Snapshot, stats: EngineStats) -> str:
    lines = ["# HELP modelip_cards Cards per state.", "# TYPE modelip_cards gauge"]
    for state in CardState:
        count = snapshot.counts.get(state.value, 0)
        lines.append(f'modelip_cards{{state="{state.value}"}} {count}')
    lines += ["# HELP modelip_groups_serving MDP groups whose cards all serve.",
              "# TYPE modelip_groups_serving gauge",
              f"modelip_groups_serving {snapshot.groups_serving}",
              "# TYPE modelip_rekeys_total counter", f"modelip_rekeys_total {stats.rekeys}",
              "# TYPE modelip_attestations_total counter",
              f"modelip_attestations_total {stats.attestations}",
              "# TYPE modelip_loads_total counter", f"modelip_loads_total {stats.loads}",
              "# TYPE modelip_hints_disproved_total counter",
              f"modelip_hints_disproved_total {stats.disproved_hints}",
              "# HELP modelip_outage_seconds First sign of a lost session to serving again.",
              "# TYPE modelip_outage_seconds summary"]
    for quantile, value in (("0.5", snapshot.outage_p50), ("0.99", snapshot.outage_p99)):
        if value is not None:
            lines.append(f'modelip_outage_seconds{{quantile="{quantile}"}} {value:.6f}')
    lines += [f"modelip_outage_seconds_sum {sum(stats.outages):.6f}",
              f"modelip_outage_seconds_count {len(stats.outages)}",
              *_histogram("modelip_rekey_seconds", "Re-key latency: first sign of a lost "
                          "session to serving again.", stats.outages),
              "# HELP modelip_host_state 1 for the state each host is in.",
              "# TYPE modelip_host_state gauge"]
    for host in snapshot.hosts:
        name = _label(host.name)
        for each in HostState:
            lines.append(f'modelip_host_state{{host="{name}",state="{each.value}"}} '
                         f"{int(host.state == each.value)}")
    lines += ["# HELP modelip_host_cards Cards of each host per state.",
              "# TYPE modelip_host_cards gauge"]
    per_host = Counter((card.host, card.state) for card in snapshot.cards)
    for host in snapshot.hosts:
        name = _label(host.name)
        for state in CardState:
            lines.append(f'modelip_host_cards{{host="{name}",state="{state.value}"}} '
                         f"{per_host[(host.name, state.value)]}")
    lines += ["# HELP modelip_protocol_violations_total Messages outside the protocol, by host.",
              "# TYPE modelip_protocol_violations_total counter"]
    for name, count in sorted(stats.protocol_violations.items()):
        lines.append(f'modelip_protocol_violations_total{{host="{_label(name)}"}} {count}')
    lines += ["# TYPE modelip_internal_errors_total counter",
              f"modelip_internal_errors_total {stats.internal_errors}",
              "# TYPE modelip_verification_failures_total counter"]
    for reason, count in sorted(stats.verification_failures.items()):
        lines.append(f'modelip_verification_failures_total{{kind="{reason}"}} {count}')
    if stats.deployed_after is not None:
        lines.append(f"modelip_deploy_seconds {stats.deployed_after:.3f}")
    if snapshot.replica:
        lines += _replica_lines(snapshot, stats)
    if snapshot.rollout is not None:
        lines += _rollout_lines(snapshot.rollout)
    return "\n".join(lines) + "\n"


def _rollout_lines(r: RolloutView) -> list[str]:
    """Where a rollout stands (docs/rollouts.md): wave, groups per version, capacity."""
    lines = ["# HELP modelip_rollout_wave The wave being switched or gated (1-based).",
             "# TYPE modelip_rollout_wave gauge", f"modelip_rollout_wave {r.wave}",
             "# TYPE modelip_rollout_waves gauge", f"modelip_rollout_waves {r.waves}",
             "# HELP modelip_rollout_groups MDP groups to run each version.",
             "# TYPE modelip_rollout_groups gauge",
             f'modelip_rollout_groups{{side="new",version="{r.to_version}"}} {r.groups_new}',
             f'modelip_rollout_groups{{side="old",version="{r.from_version}"}} '
             f"{r.groups - r.groups_new}",
             "# HELP modelip_rollout_capacity_floor Groups serving the rollout never goes below.",
             "# TYPE modelip_rollout_capacity_floor gauge",
             f"modelip_rollout_capacity_floor {r.floor}",
             "# HELP modelip_rollout_phase 1 for the phase the rollout is in.",
             "# TYPE modelip_rollout_phase gauge"]
    for phase in Phase:
        lines.append(f'modelip_rollout_phase{{phase="{phase.value}"}} '
                     f"{int(r.phase == phase.value)}")
    return lines


def _replica_lines(snapshot: Snapshot, stats: EngineStats) -> list[str]:
    """A replica's own view (docs/replicas.md): what it holds, who it sees, the store."""
    me = f'replica="{_label(snapshot.replica)}"'
    held = sum(host.owner == snapshot.replica for host in snapshot.hosts)
    lines = ["# HELP modelip_replica_hosts_held Hosts whose lease this replica holds.",
             "# TYPE modelip_replica_hosts_held gauge",
             f"modelip_replica_hosts_held{{{me}}} {held}",
             "# HELP modelip_replicas_alive Replicas with a fresh heartbeat, as this one sees.",
             "# TYPE modelip_replicas_alive gauge",
             f"modelip_replicas_alive{{{me}}} {snapshot.replicas_alive}",
             "# HELP modelip_store_reachable 1 while the shared store answers.",
             "# TYPE modelip_store_reachable gauge",
             f"modelip_store_reachable{{{me}}} {int(snapshot.store_reachable)}",
             "# HELP modelip_lease_changes_total Leases claimed, taken over, handed back, lost.",
             "# TYPE modelip_lease_changes_total counter"]
    for action in ("claimed", "took over", "handed back", "lost"):
        lines.append(f'modelip_lease_changes_total{{{me},action="{action}"}} '
                     f"{stats.lease_changes[action]}")
    return lines


_log = logging.getLogger(__name__)

REKEY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _histogram(name: str, text: str, values: list[float]) -> list[str]:
    lines = [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
    for bound in REKEY_BUCKETS:
        lines.append(f'{name}_bucket{{le="{bound:g}"}} {sum(v <= bound for v in values)}')
    lines += [f'{name}_bucket{{le="+Inf"}} {len(values)}', f"{name}_sum {sum(values):.6f}",
              f"{name}_count {len(values)}"]
    return lines


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# connections served at once; more are closed at once (a scanner or a flood of
# probes must not grow the engine's process)
MAX_METRICS_CONNECTIONS = 16


async def serve_metrics(port: int, text: Callable[[], str], *, bind: str = "127.0.0.1",
                        task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
    """A minimal HTTP/1.0 endpoint: any GET returns the metrics text.

    Whatever a connection does (closes at once, as a port scanner or a TCP health
    probe does; sends garbage; stalls) ends with that connection: nothing raises
    into the caller's task group, which is the engine's.
    """
    try:
        listener = await anyio.create_tcp_listener(local_host=bind, local_port=port)
    except OSError as exc:
        raise UsageError(f"--metrics-port {port}: cannot listen on {bind}:{port}: "
                         f"{(exc.strerror or str(exc)).lower()}") from None
    open_connections = 0

    async def respond(stream: SocketStream) -> None:
        with anyio.move_on_after(5):
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 8192:
                request += await stream.receive(4096)
            ok = request.startswith(b"GET ")
            body = text().encode() if ok else b""
            status = b"200 OK" if ok else b"405 Method Not Allowed"
            head = (b"HTTP/1.0 " + status + b"\r\nContent-Type: text/plain; version=0.0.4"
                    b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
            await stream.send(head + body)

    async def handle(stream: SocketStream) -> None:
        nonlocal open_connections
        busy = open_connections >= MAX_METRICS_CONNECTIONS
        open_connections += 1
        try:
            async with stream:
                if not busy:
                    await respond(stream)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                OSError):
            pass  # the peer went away: its business
        except Exception:  # a bug in rendering: this scrape fails, the engine goes on
            _log.exception("metrics: a scrape failed")
        finally:
            open_connections -= 1

    async with listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))  # noqa: S610 - anyio, not Django
        await listener.serve(handle)
