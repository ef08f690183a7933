"""The live fleet view: a pure ``render(snapshot, width, height)`` and a small driver.

The view fits the screen at any fleet size and never drops what the operator
needs silently (docs/dashboard.md). Top to bottom:

    title, elapsed, filter
    totals by state (a progress bar while deploying)
    hosts and groups serving, re-keys with p50/p99 and a sparkline of the last minute
    one cell per host: its name (coloured by host state) and a glyph per card;
        several hosts per line when they fit, and when they do not, the hosts
        that need nothing are folded into one line ("+37 hosts serving")
    what needs attention: quarantined, failed, unreachable hosts, disconnected,
        stuck cards, with reasons; the worst first; "+N more" past the space
    the last events, with times

Rendering costs O(screen) in rich's layout: the fleet is only counted and
grouped. ``LiveDashboard`` redraws from a snapshot at most ``fps`` times a
second (rich.Live); ``views/tui.py`` is the interactive variant.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from orchestrator.engine.events import (
    Deployed,
    DeploymentOutcome,
    Event,
)
from orchestrator.engine.snapshot import CardView, HostView, RolloutView, Snapshot
from orchestrator.engine.state import SETTLED as SETTLED_STATES
from orchestrator.engine.state import CardState, HostState
from orchestrator.views.lines import event_line

# The states and their groupings are the engine's (engine/state.py): one source, so a
# new state cannot show as "?" or drop out of the totals. What is ours is how each
# looks (a table per enum, checked complete by tests/test_dashboard.py).
C, H = CardState, HostState
GLYPHS = {C.SERVING.value: ("●", "green"), C.PENDING.value: ("·", "dim"),
          C.ATTESTING.value: ("◐", "cyan"), C.KEYED.value: ("◐", "cyan"),
          C.LOADING.value: ("◑", "cyan"), C.REKEYING.value: ("◐", "magenta"),
          C.RETRY_WAIT.value: ("◌", "yellow"), C.DISCONNECTED.value: ("○", "red"),
          C.CORDONED.value: ("⊘", "yellow"),
          C.QUARANTINED.value: ("✖", "bold red"), C.FAILED.value: ("✗", "red")}
HOST_STYLES = {H.UP.value: "green", H.CONNECTING.value: "yellow",
               H.UNREACHABLE.value: "bold red", H.REFUSING.value: "bold red",
               H.FAILED.value: "bold red"}
STYLES = {**{state: style for state, (_, style) in GLYPHS.items()}, **HOST_STYLES}
# serving first, then the engine's order of the others
ORDER = (C.SERVING.value, *(state.value for state in CardState if state is not C.SERVING))
SETTLED = frozenset(state.value for state in SETTLED_STATES)
STUCK = 30.0          # seconds in a working state before a card "needs attention"
SPARK = "▁▂▃▄▅▆▇█"
LEGEND = ("● serving  ◐ working  ◌ retrying  ○ disconnected  ✖ quarantined  ✗ failed  "
          "· pending")


@dataclass(frozen=True, slots=True)
class Filter:
    """What the operator narrowed the view to (keys on the interactive view)."""

    host: str = ""      # substring of the host's name
    state: str = ""     # a card state
    deployment: str = ""   # a deployment's name: its cards alone (docs/deployments.md)

    def __bool__(self) -> bool:
        return bool(self.host or self.state or self.deployment)

    def describe(self) -> str:
        said = [f"host~{self.host!r}"] if self.host else []
        said += [f"deployment={self.deployment}"] if self.deployment else []
        return " ".join(said + ([f"state={self.state}"] if self.state else []))


def _seconds(value: float) -> str:
    if value < 60:
        return f"{value:.1f}s"
    if value < 3600:
        return f"{int(value // 60)}m{int(value % 60):02d}s"
    return f"{int(value // 3600)}h{int(value % 3600 // 60):02d}m"


# --- the pieces -------------------------------------------------------------------------------


def _totals(snapshot: Snapshot, width: int) -> Text:
    counts = snapshot.counts
    total = sum(counts.values())
    text = Text()
    for state in ORDER:   # narrow screens: the glyph stands for the name (see the legend)
        if counts.get(state):
            glyph, style = GLYPHS[state]
            name = f" {state.lower()}" if width >= 100 else ""
            text.append(f"{glyph}{name} {counts[state]}", style=style)
            text.append("  ")
    if snapshot.deployed_after is None and total:
        settled = sum(counts.get(state, 0) for state in SETTLED)
        said = f" {100 * settled // total}% settled"
        bar = min(40, width - len(text) - len(said) - 1)
        if bar >= 5:
            done = round(bar * settled / total)
            text.append("█" * done, style="green")
            text.append("░" * (bar - done), style="dim")
        text.append(said)
    return text


def sparkline(ages: Sequence[float], *, buckets: int = 20, span: float = 60.0) -> str:
    """Re-keys per bucket over the last ``span`` seconds, oldest left."""
    counts = [0] * buckets
    for age in ages:
        if 0 <= age < span:
            counts[buckets - 1 - int(age * buckets / span)] += 1
    top = max(counts)
    if not top:
        return SPARK[0] * buckets
    return "".join(SPARK[min(len(SPARK) - 1, math.ceil(c * (len(SPARK) - 1) / top))]
                   for c in counts)


def _rollup(snapshot: Snapshot, cards_by_host: dict[str, list[CardView]], width: int
            ) -> Text:
    hosts_serving = sum(h.state == "UP" and bool(cards_by_host.get(h.name)) and all(
        c.state == "SERVING" for c in cards_by_host[h.name]) for h in snapshot.hosts)
    p50 = "-" if snapshot.outage_p50 is None else f"{snapshot.outage_p50 * 1e3:.0f} ms"
    p99 = "-" if snapshot.outage_p99 is None else f"{snapshot.outage_p99 * 1e3:.0f} ms"
    rate = len(snapshot.rekey_ages) / 60.0
    text = Text.assemble(
        "hosts serving ", (f"{hosts_serving}/{len(snapshot.hosts)}", "bold"),
        "   groups serving ", (f"{snapshot.groups_serving}/{snapshot.groups}", "bold"))
    if not snapshot.live:
        return text
    text.append_text(Text.assemble(
        "\n" if width < 130 else "   ",
        f"re-keys {snapshot.rekeys} (p50 {p50}, p99 {p99})  last min ",
        (sparkline(snapshot.rekey_ages), "magenta"), f" {rate:.1f}/s",
        f"   hints disproved {snapshot.disproved_hints}"))
    if snapshot.replica:
        held = sum(h.owner == snapshot.replica for h in snapshot.hosts)
        text.append(f"\nreplica {snapshot.replica}: holds {held}/{len(snapshot.hosts)} hosts, "
                    f"{snapshot.replicas_alive} replicas alive, store ")
        text.append(*(("reachable", "green") if snapshot.store_reachable
                      else ("UNREACHABLE", "red")))
    for rollout in snapshot.rollouts:
        text.append("\n")
        text.append_text(rollout_line(rollout, width))
    # each deployment a line, those short of what they want first; a thousand do not
    # take the screen: the rest are counted
    ordered = sorted(snapshot.deployments,
                     key=lambda d: (d.groups_serving == d.groups_wanted, d.name))
    for d in ordered[:DEPLOYMENT_LINES]:
        text.append("\n")
        text.append_text(deployment_line(d))
    if rest := ordered[DEPLOYMENT_LINES:]:
        short = sum(d.groups_serving < d.groups_wanted for d in rest)
        text.append(f"\n+{len(rest)} more deployments"
                    + (f", {short} of them short" if short else ", every group serving"),
                    style="dim")
    return text


DEPLOYMENT_LINES = 6   # deployments shown one per line in the live view


def deployment_line(d: DeploymentOutcome) -> Text:
    """deployment vision v1  4/4 groups serving (4 wanted)  PENDING: needs ..."""
    whole = d.groups_serving == d.groups_wanted
    text = Text.assemble(("deployment ", "bold"), f"{d.name} v{d.version}  ",
                         (f"{d.groups_serving}/{d.groups_placed}", "bold green" if whole
                          else "bold yellow"), f" groups serving ({d.groups_wanted} wanted)")
    if d.short:
        text.append(f"  {'PENDING' if d.pending else 'NOT SERVED'}: {d.short}",
                    style="yellow" if d.pending else "red")
    return text


def rollout_line(r: RolloutView, width: int) -> Text:
    """rollout version 7 -> 8: wave 2/3 gating  capacity 15/16 (floor 15)  v8 4 | v7 12
    groups  [bar]  what it waits for (or the verdict); narrower: no bar, fewer words."""
    style = {"rolled back": "red", "rolling back": "red", "committed": "green"}.get(
        r.phase, "yellow")
    wide = width >= 100
    text = Text.assemble(("rollout ", "bold"),
                         f"{r.deployment} " if r.deployment else "",
                         f"{'version ' if wide else ''}{r.from_version} -> {r.to_version}: ",
                         (f"wave {r.wave}/{r.waves} {r.phase}", style))
    if r.paused:
        text.append(" PAUSED", style="bold yellow")
    text.append("  capacity ")
    text.append(f"{r.serving}/{r.groups}", style="bold" if r.serving >= r.floor else "bold red")
    text.append(f" (floor {r.floor})  v{r.to_version} {r.groups_new} | v{r.from_version} "
                f"{r.groups - r.groups_new}{' groups' if wide else ''}")
    if wide:
        bar = 20
        done = round(bar * r.groups_new / r.groups) if r.groups else 0
        text.append("  ")
        text.append("█" * done, style="cyan")
        text.append("░" * (bar - done), style="dim")
    said = r.verdict if r.phase in ("rolled back", "rolling back") else r.note
    if said:
        text.append(f"   {said}", style="red" if said == r.verdict else "dim")
    return text


@dataclass(frozen=True, slots=True)
class _Item:
    severity: int
    age: float
    text: Text


def _attention(snapshot: Snapshot, cards_by_host: dict[str, list[CardView]],
               view: Filter) -> list[_Item]:
    """What needs a person, worst first: a down host is one line, not one per card."""
    items: list[_Item] = []
    down: set[str] = set()
    for host in snapshot.hosts:
        if view.host and view.host not in host.name:
            continue
        not_up = max(host.not_up_for, host.in_state)
        stuck = host.state == "CONNECTING" and not_up > STUCK
        if host.state in ("UNREACHABLE", "REFUSING", "FAILED") or stuck:
            down.add(host.name)
            cards = len(cards_by_host.get(host.name, ()))
            items.append(_Item(1, not_up, Text.assemble(
                (f"host {host.name} {host.state}", STYLES.get(host.state, "")),
                f" for {_seconds(not_up)}: {host.reason[:120]} ({cards} cards)")))
    for card in snapshot.cards:
        # a down host is one line, but a quarantined card keeps its own: its verdict is
        # about the card, not the host's connection
        folded = card.host in down and card.state != "QUARANTINED"
        if folded or (view.host and view.host not in card.host) or (
                view.state and card.state != view.state):
            continue
        if card.state == "QUARANTINED":
            severity = 0
        elif card.state == "FAILED":
            severity = 1
        elif card.state == "DISCONNECTED":
            severity = 2
        elif card.state not in SETTLED and card.in_state > STUCK:
            severity = 3
        elif card.state in ("RETRY_WAIT", "CORDONED"):
            severity = 4
        else:
            continue
        glyph, style = GLYPHS.get(card.state, ("?", ""))
        note = " (stuck)" if severity == 3 else ""
        items.append(_Item(severity, card.in_state, Text.assemble(
            (f"{glyph} {card.host}/{card.device} {card.state}{note}", style),
            f" for {_seconds(card.in_state)}: {card.reason[:140]}")))
    items.sort(key=lambda item: (item.severity, -item.age))
    return items


def _cell(host: HostView, cards: list[CardView], name_width: int, glyph_room: int) -> Text:
    text = Text(host.name[:name_width].ljust(name_width), style=STYLES.get(host.state, ""))
    text.append(" ")
    for card in cards[:glyph_room]:
        glyph, style = GLYPHS.get(card.state, ("?", ""))
        text.append(glyph, style=style)
    if len(cards) > glyph_room:
        text.append(f"+{len(cards) - glyph_room}", style="dim")
    return text


def _grid(snapshot: Snapshot, cards_by_host: dict[str, list[CardView]], view: Filter,
          width: int, lines: int) -> list[Text]:
    hosts = [h for h in snapshot.hosts
             if (not view.host or view.host in h.name)
             and (not view.state or any(c.state == view.state
                                        for c in cards_by_host.get(h.name, ())))]
    if not hosts or lines <= 0:
        return [Text("(no host matches the filter)", style="dim")] if view and lines else []
    name_width = min(24, max(len(h.name) for h in hosts))
    most = max(len(cards_by_host.get(h.name, ())) for h in hosts)
    glyph_room = max(4, min(most, width - name_width - 6))
    cell_width = name_width + 1 + min(most, glyph_room) + (4 if most > glyph_room else 0) + 2
    columns = max(1, width // cell_width)
    shown = hosts
    folded: list[HostView] = []
    if math.ceil(len(hosts) / columns) > lines:
        # fold the hosts that need nothing; the others first, in fleet order
        quiet = [h for h in hosts if h.state == "UP" and all(
            c.state == "SERVING" for c in cards_by_host.get(h.name, ()))]
        quiet_names = {h.name for h in quiet}
        loud = [h for h in hosts if h.name not in quiet_names]
        room = max(0, (lines - 1) * columns)
        shown, folded = (loud + quiet)[:room], (loud + quiet)[room:]
    rows = []
    for start in range(0, len(shown), columns):
        row = Text()
        for host in shown[start:start + columns]:
            cell = _cell(host, cards_by_host.get(host.name, []), name_width, glyph_room)
            cell.pad_right(cell_width - len(cell))
            row.append_text(cell)
        rows.append(row)
    if folded:
        states = Counter(c.state for h in folded for c in cards_by_host.get(h.name, ()))
        said = ", ".join(f"{n} {s.lower()}" for s, n in sorted(
            states.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else 99))
        all_serving = set(states) <= {"SERVING"}
        rows.append(Text(f"+{len(folded)} more hosts{' serving' if all_serving else ''} "
                         f"({said})", style="green" if all_serving else "yellow"))
    return rows


# --- the screen -------------------------------------------------------------------------------


def render(snapshot: Snapshot, *, title: str = "modelip", width: int = 160,
           height: int = 50, view: Filter = Filter(), paused: bool = False) -> Group:
    """The whole screen for one snapshot, ``height`` lines at most (pure: no clock, no I/O)."""
    if view.deployment:   # one deployment's cards, counted and drawn as if alone
        mine = tuple(c for c in snapshot.cards if c.deployment == view.deployment)
        held = {c.host for c in mine}
        snapshot = dataclasses.replace(
            snapshot, cards=mine, counts=dict(Counter(c.state for c in mine)),
            hosts=tuple(h for h in snapshot.hosts if h.name in held),
            deployments=tuple(d for d in snapshot.deployments if d.name == view.deployment),
            events=tuple(e for e in snapshot.events if getattr(
                e, "deployment", None) == view.deployment or (
                    not hasattr(e, "deployment") and getattr(e, "host", None) in held)))
    cards_by_host: dict[str, list[CardView]] = {}
    for card in snapshot.cards:
        cards_by_host.setdefault(card.host, []).append(card)
    header = Text.assemble((title, "bold"), f"   elapsed {_seconds(snapshot.elapsed)}"
                           if snapshot.live else "")
    if view:
        header.append(f"   filter: {view.describe()}", style="yellow")
    if paused:
        header.append("   PAUSED", style="bold yellow")
    top = [header, _totals(snapshot, width), _rollup(snapshot, cards_by_host, width)]
    used = sum(t.plain.count("\n") + 1 for t in top)
    legend = Text(LEGEND, style="dim")
    items = _attention(snapshot, cards_by_host, view)
    events = list(snapshot.events)
    room = height - used - 2   # the legend line and one spare (the cursor's)
    want_events = min(len(events), 6 if height >= 40 else 3)
    want_items = min(len(items), max(3, height // 4))
    grid_lines = room - (want_items + 2 if items else 0) - (want_events + 1 if events else 0)
    while grid_lines < min(3, len(snapshot.hosts)) and (want_events or want_items > 1):
        if want_events:
            want_events -= 1
            grid_lines += 1 if want_events else 2
        else:
            want_items -= 1
            grid_lines += 1
    parts: list[Text] = [*top, legend, *_grid(snapshot, cards_by_host, view, width,
                                             grid_lines)]
    if items:
        parts.append(Text(f"needs attention ({len(items)})", style="bold red"))
        shown = items[:want_items] if len(items) <= want_items else items[:want_items - 1]
        parts += [item.text for item in shown]
        if len(shown) < len(items):
            rest = Counter(_kind(item) for item in items[len(shown):])
            parts.append(Text(f"+{len(items) - len(shown)} more: " + ", ".join(
                f"{n} {kind}" for kind, n in rest.most_common()), style="red"))
    if want_events:
        parts.append(Text("last events", style="bold"))
        parts += [Text(event_line(e), style="dim") for e in events[-want_events:]]
    for part in parts:  # one line each: cut at the edge, never wrapped
        part.no_wrap = True
        part.overflow = "ellipsis"
    return Group(*parts)


def _kind(item: _Item) -> str:
    return ("quarantined", "failed or host down", "disconnected", "stuck",
            "retrying")[item.severity]


class LiveDashboard:
    """Re-renders on engine events, at most ``fps`` times a second, to the terminal's size."""

    def __init__(self, snapshot: Callable[[], Snapshot], *, console: Console | None = None,
                 fps: float = 4.0, title: str = "modelip") -> None:
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
            width, height = self.live.console.size
            self.live.update(render(self._snapshot(), title=self._title, width=width,
                                    height=height), refresh=True)
