"""Prometheus text exposition of an engine snapshot, served on request (--metrics-port)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import anyio
from anyio.abc import SocketStream, TaskStatus
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from orchestrator.engine.context import EngineStats
from orchestrator.engine.rollout.ledger import Phase
from orchestrator.engine.snapshot import RolloutView, Snapshot
from orchestrator.engine.state import CardState, HostState
from orchestrator.errors import UsageError


def render_metrics(snapshot: Snapshot, stats: EngineStats) -> str:
    """The Prometheus text exposition of one snapshot (docs/engine.md lists every metric),
    written by prometheus_client: its escaping of label values, its formats."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot, stats))
    return generate_latest(registry).decode()


class _SnapshotCollector(Collector):
    """A custom collector over one snapshot and the engine's counters."""

    def __init__(self, snapshot: Snapshot, stats: EngineStats) -> None:
        self.snapshot, self.stats = snapshot, stats

    def collect(self) -> Iterator[Metric]:
        snapshot, stats = self.snapshot, self.stats
        cards = GaugeMetricFamily("modelip_cards", "Cards per state.", labels=["state"])
        for state in CardState:
            cards.add_metric([state.value], snapshot.counts.get(state.value, 0))
        yield cards
        yield GaugeMetricFamily("modelip_groups_serving", "MDP groups whose cards all serve.",
                                value=snapshot.groups_serving)
        for name, text, value in (
                ("modelip_rekeys", "Cards re-keyed after losing their session.", stats.rekeys),
                ("modelip_attestations", "Attestations verified.", stats.attestations),
                ("modelip_loads", "Programs loaded.", stats.loads),
                ("modelip_hints_disproved", "Hints a fresh attestation disproved.",
                 stats.disproved_hints),
                ("modelip_hints_stale", "Host events dropped as old news: about a boot "
                 "older than the one a verified attestation has since seen.",
                 stats.stale_hints),
                ("modelip_attestations_rebooting", "Attestations the host answered "
                 "\"the card is rebooting\".", stats.found_rebooting),
                ("modelip_internal_errors", "Bugs contained to a card or a host.",
                 stats.internal_errors)):
            yield CounterMetricFamily(name, text, value=value)
        outage = Metric("modelip_outage_seconds",
                        "First sign of a lost session to serving again.", "summary")
        for quantile, seconds in (("0.5", snapshot.outage_p50),
                                  ("0.99", snapshot.outage_p99)):
            if seconds is not None:
                outage.add_sample("modelip_outage_seconds", {"quantile": quantile}, seconds)
        outage.add_sample("modelip_outage_seconds_sum", {}, sum(stats.outages))
        outage.add_sample("modelip_outage_seconds_count", {}, len(stats.outages))
        yield outage
        yield HistogramMetricFamily(
            "modelip_rekey_seconds", "Re-key latency: first sign of a lost session to "
            "serving again.", sum_value=sum(stats.outages),
            buckets=[*((f"{bound:g}", sum(v <= bound for v in stats.outages))
                       for bound in REKEY_BUCKETS), ("+Inf", len(stats.outages))])
        host_state = GaugeMetricFamily("modelip_host_state",
                                       "1 for the state each host is in.",
                                       labels=["host", "state"])
        host_cards = GaugeMetricFamily("modelip_host_cards", "Cards of each host per state.",
                                       labels=["host", "state"])
        per_host = Counter((card.host, card.state) for card in snapshot.cards)
        for host in snapshot.hosts:
            for each in HostState:
                host_state.add_metric([host.name, each.value], int(host.state == each.value))
            for state in CardState:
                host_cards.add_metric([host.name, state.value],
                                      per_host[(host.name, state.value)])
        yield host_state
        yield host_cards
        violations = CounterMetricFamily("modelip_protocol_violations",
                                         "Messages outside the protocol, by host.",
                                         labels=["host"])
        for name, count in sorted(stats.protocol_violations.items()):
            violations.add_metric([name], count)
        yield violations
        failures = CounterMetricFamily("modelip_verification_failures",
                                       "Security verdicts, by kind.", labels=["kind"])
        for reason, count in sorted(stats.verification_failures.items()):
            failures.add_metric([reason], count)
        yield failures
        if stats.deployed_after is not None:
            yield GaugeMetricFamily("modelip_deploy_seconds", "Seconds until every card "
                                    "first settled.", value=round(stats.deployed_after, 3))
        if any(card.deployment for card in snapshot.cards):
            yield from _deployment_metrics(snapshot)
        if snapshot.replica:
            yield from _replica_metrics(snapshot, stats)
        if snapshot.rollouts:
            yield from _rollout_metrics(snapshot.rollouts)


def _deployment_metrics(snapshot: Snapshot) -> Iterator[Metric]:
    """Each deployment's cards per state and groups serving (docs/deployments.md)."""
    cards = GaugeMetricFamily("modelip_deployment_cards", "Cards of each deployment per "
                              "state.", labels=["deployment", "state"])
    per_state = Counter((card.deployment, card.state) for card in snapshot.cards)
    groups: dict[tuple[str, int], bool] = {}
    for card in snapshot.cards:
        key = (card.deployment, card.group)
        groups[key] = groups.get(key, True) and card.state == CardState.SERVING.value
    names = sorted({card.deployment for card in snapshot.cards})
    for name in names:
        for state in CardState:
            cards.add_metric([name, state.value], per_state[(name, state.value)])
    yield cards
    serving = GaugeMetricFamily("modelip_deployment_groups_serving", "MDP groups of each "
                                "deployment with every card serving.", labels=["deployment"])
    for name in names:
        serving.add_metric([name], sum(ok for (d, _), ok in groups.items() if d == name))
    yield serving


def _rollout_metrics(rollouts: Sequence[RolloutView]) -> Iterator[Metric]:
    """Where each rollout stands (docs/rollouts.md): wave, groups per version, capacity;
    labelled by deployment ("" : the fleet's one model)."""
    def gauge(name: str, text: str, *labels: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, text, labels=["deployment", *labels])

    wave = gauge("modelip_rollout_wave", "The wave being switched or gated (1-based).")
    waves = gauge("modelip_rollout_waves", "Waves of the rollout.")
    groups = gauge("modelip_rollout_groups", "MDP groups to run each version.", "side",
                   "version")
    floor = gauge("modelip_rollout_capacity_floor",
                  "Groups serving the rollout never goes below.")
    phase = gauge("modelip_rollout_phase", "1 for the phase the rollout is in.", "phase")
    for r in rollouts:
        wave.add_metric([r.deployment], r.wave)
        waves.add_metric([r.deployment], r.waves)
        groups.add_metric([r.deployment, "new", str(r.to_version)], r.groups_new)
        groups.add_metric([r.deployment, "old", str(r.from_version)], r.groups - r.groups_new)
        floor.add_metric([r.deployment], r.floor)
        for each in Phase:
            phase.add_metric([r.deployment, each.value], int(r.phase == each.value))
    yield from (wave, waves, groups, floor, phase)


def _replica_metrics(snapshot: Snapshot, stats: EngineStats) -> Iterator[Metric]:
    """A replica's own view (docs/replicas.md): what it holds, who it sees, the store."""
    me = snapshot.replica
    held = sum(host.owner == me for host in snapshot.hosts)
    for name, text, value in (
            ("modelip_replica_hosts_held", "Hosts whose lease this replica holds.", held),
            ("modelip_replicas_alive", "Replicas with a fresh heartbeat, as this one sees.",
             snapshot.replicas_alive),
            ("modelip_store_reachable", "1 while the shared store answers.",
             int(snapshot.store_reachable))):
        gauge = GaugeMetricFamily(name, text, labels=["replica"])
        gauge.add_metric([me], value)
        yield gauge
    changes = CounterMetricFamily("modelip_lease_changes",
                                  "Leases claimed, taken over, handed back, lost.",
                                  labels=["replica", "action"])
    for action in ("claimed", "took over", "handed back", "lost"):
        changes.add_metric([me, action], stats.lease_changes[action])
    yield changes


_log = logging.getLogger(__name__)

REKEY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


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
