"""The live fleet view: a pure ``render(snapshot)`` and a small driver around rich.Live."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from orchestrator.engine.supervisor import Snapshot

STYLES = {"SERVING": "green", "QUARANTINED": "bold red", "FAILED": "red",
          "RETRY_WAIT": "yellow", "REKEYING": "magenta", "PENDING": "dim"}
MAX_ROWS = 48


def _seconds(value: float) -> str:
    return f"{value:.1f}s" if value < 60 else f"{int(value // 60)}m{int(value % 60):02d}s"


def _event_line(event: dict[str, Any]) -> str:
    stamp = dt.datetime.fromtimestamp(event.get("ts", 0), dt.UTC).strftime("%H:%M:%S")
    kind = event.get("event")
    where = f"{event.get('host', '')}/{event.get('device', '')}".strip("/")
    if kind == "transition":
        reason = f" ({event['reason']})" if event.get("reason") else ""
        return f"{stamp} {where} {event['from']} -> {event['to']}{reason}"
    if kind == "rekeyed":
        return f"{stamp} {where} re-keyed in {event['latency_ms']:.0f} ms"
    if kind == "hint_disproved":
        return f"{stamp} {where} {event['hint']} disproved (same session)"
    if kind == "staged":
        return (f"{stamp} {event['host']} program {event['program_id']} "
                f"{'already staged' if event['already_staged'] else 'staged'}")
    if kind == "deployed":
        return (f"{stamp} deployed in {event['seconds']} s: {event['serving']} serving, "
                f"{event['quarantined']} quarantined, {event['failed']} failed")
    return f"{stamp} {kind} {where}"


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
                                                         "RETRY_WAIT") else "")
    hidden = len(snapshot.cards) - MAX_ROWS
    counts = snapshot.counts
    serving = counts.get("SERVING", 0)
    bad = counts.get("QUARANTINED", 0) + counts.get("FAILED", 0)
    progress = len(snapshot.cards) - serving - bad
    p50 = "-" if snapshot.rekey_p50 is None else f"{snapshot.rekey_p50 * 1e3:.0f} ms"
    p99 = "-" if snapshot.rekey_p99 is None else f"{snapshot.rekey_p99 * 1e3:.0f} ms"
    summary = Text.assemble(
        ("serving ", "bold"), (str(serving), "green"), "   in progress ", str(progress),
        "   quarantined ", (str(counts.get("QUARANTINED", 0)), "red" if bad else ""),
        "   failed ", (str(counts.get("FAILED", 0)), "red" if bad else ""),
        f"   groups serving {snapshot.groups_serving}/{snapshot.groups}",
        f"   re-keys {snapshot.rekeys} (p50 {p50}, p99 {p99})",
        f"   hints disproved {snapshot.disproved_hints}",
        f"   elapsed {_seconds(snapshot.elapsed)}",
    )
    parts: list[Any] = [table]
    if hidden > 0:
        parts.append(Text(f"... and {hidden} more cards", style="dim"))
    parts.append(summary)
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

    def on_event(self, event: dict[str, Any]) -> None:
        self.refresh(force=event.get("event") == "deployed")

    def refresh(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self._interval:
            self._last = now
            self.live.update(render(self._snapshot(), title=self._title), refresh=True)
