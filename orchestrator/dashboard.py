"""The live fleet view: a pure ``render(snapshot)`` and a small driver around rich.Live."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from orchestrator.engine.engine import Snapshot
from orchestrator.engine.events import (
    CardChanged,
    Deployed,
    Event,
    HintDisproved,
    HostChanged,
    InternalError,
    ProtocolViolation,
    Rekeyed,
    Staged,
)

STYLES = {"SERVING": "green", "QUARANTINED": "bold red", "FAILED": "red",
          "RETRY_WAIT": "yellow", "REKEYING": "magenta", "PENDING": "dim",
          "DISCONNECTED": "red", "UP": "green", "UNREACHABLE": "bold red",
          "CONNECTING": "yellow"}
MAX_ROWS = 48


def _seconds(value: float) -> str:
    return f"{value:.1f}s" if value < 60 else f"{int(value // 60)}m{int(value % 60):02d}s"


def _event_line(event: Event) -> str:
    stamp = dt.datetime.fromtimestamp(event.ts, dt.UTC).strftime("%H:%M:%S")
    match event:
        case CardChanged():
            reason = f" ({event.reason})" if event.reason else ""
            return (f"{stamp} {event.host}/{event.device} {event.previous} -> "
                    f"{event.state}{reason}")
        case HostChanged():
            reason = f" ({event.reason})" if event.reason else ""
            return f"{stamp} host {event.host} {event.previous} -> {event.state}{reason}"
        case Rekeyed():
            return (f"{stamp} {event.host}/{event.device} serving again after "
                    f"{event.outage_ms:.0f} ms")
        case HintDisproved():
            return f"{stamp} {event.host}/{event.device} {event.trigger} disproved (same session)"
        case Staged():
            return (f"{stamp} {event.host} program {event.program_id} "
                    f"{'already staged' if event.already_staged else 'staged'}")
        case ProtocolViolation():
            return f"{stamp} host {event.host} protocol violation: {event.what} (x{event.count})"
        case InternalError():
            return f"{stamp} internal error in {event.where}: {event.error}"
        case Deployed():
            return (f"{stamp} settled in {event.seconds} s: {event.serving} serving, "
                    f"{event.disconnected} disconnected, {event.quarantined} quarantined, "
                    f"{event.failed} failed")
    return f"{stamp} {event.KIND}"


def render(snapshot: Snapshot, *, title: str = "modelip") -> Group:
    """The whole screen for one snapshot (pure: no clock, no I/O)."""
    table = Table(title=title, expand=False, title_justify="left", pad_edge=False)
    for column, justify in (("host", "left"), ("card", "right"), ("card id", "left"),
                            ("group", "right"), ("part", "right"), ("state", "left"),
                            ("session", "left"), ("boot", "right"), ("tries", "right"),
                            ("last event", "left"), ("in state", "right"),
                            ("reason", "left")):
        table.add_column(column, justify=justify, no_wrap=column != "reason")  # type: ignore[arg-type]
    for card in snapshot.cards[:MAX_ROWS]:
        table.add_row(card.host, str(card.device), card.card_id or "-", str(card.group),
                      str(card.partition), Text(card.state, style=STYLES.get(card.state, "")),
                      card.session or "-", str(card.boot_counter), str(card.attempts),
                      card.last_event or "-", _seconds(card.in_state),
                      card.reason[:60] if card.state in ("QUARANTINED", "FAILED",
                                                         "RETRY_WAIT", "DISCONNECTED") else "")
    hidden = len(snapshot.cards) - MAX_ROWS
    counts = snapshot.counts
    serving = counts.get("SERVING", 0)
    bad = counts.get("QUARANTINED", 0) + counts.get("FAILED", 0)
    progress = len(snapshot.cards) - serving - bad - counts.get("DISCONNECTED", 0)
    p50 = "-" if snapshot.outage_p50 is None else f"{snapshot.outage_p50 * 1e3:.0f} ms"
    p99 = "-" if snapshot.outage_p99 is None else f"{snapshot.outage_p99 * 1e3:.0f} ms"
    hosts_up = sum(h.state == "UP" for h in snapshot.hosts)
    summary = Text.assemble(
        ("serving ", "bold"), (str(serving), "green"), "   in progress ", str(progress),
        "   disconnected ", (str(counts.get("DISCONNECTED", 0)),
                             "red" if counts.get("DISCONNECTED") else ""),
        "   quarantined ", (str(counts.get("QUARANTINED", 0)), "red" if bad else ""),
        "   failed ", (str(counts.get("FAILED", 0)), "red" if bad else ""),
        f"   hosts up {hosts_up}/{len(snapshot.hosts)}",
        f"   groups serving {snapshot.groups_serving}/{snapshot.groups}",
        f"   re-keys {snapshot.rekeys} (outage p50 {p50}, p99 {p99})",
        f"   hints disproved {snapshot.disproved_hints}",
        f"   elapsed {_seconds(snapshot.elapsed)}",
    )
    down = [h for h in snapshot.hosts if h.state != "UP"]
    parts: list[Any] = [table]
    for host in down:
        parts.append(Text.assemble((f"host {host.name} {host.state}", STYLES.get(host.state, "")),
                                   f" for {_seconds(host.in_state)}: {host.reason[:100]}"))
    if hidden > 0:
        parts.append(Text(f"... and {hidden} more cards", style="dim"))
    parts.append(summary)
    if snapshot.replica:
        held = sum(h.owner == snapshot.replica for h in snapshot.hosts)
        parts.append(Text.assemble(
            f"replica {snapshot.replica}: holds {held}/{len(snapshot.hosts)} hosts, "
            f"{snapshot.replicas_alive} replicas alive, store ",
            ("reachable", "green") if snapshot.store_reachable else ("UNREACHABLE", "red")))
    parts.append(Text("\n".join(_event_line(e) for e in snapshot.events[-8:]), style="dim"))
    return Group(*parts)


class LiveDashboard:
    """Re-renders on engine events, at most ``fps`` times a second."""

    def __init__(self, snapshot: Any, *, console: Console | None = None, fps: float = 8.0,
                 title: str = "modelip") -> None:
        self._snapshot = snapshot
        self._title = title
        self._interval = 1.0 / fps
        self._last = 0.0
        self.live = Live(console=console, auto_refresh=False, transient=False)

    def __enter__(self) -> LiveDashboard:
        self.live.__enter__()
        self.refresh(force=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.refresh(force=True)
        self.live.__exit__(None, None, None)

    def on_event(self, event: Event) -> None:
        self.refresh(force=isinstance(event, Deployed))

    def refresh(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self._interval:
            self._last = now
            self.live.update(render(self._snapshot(), title=self._title), refresh=True)
