"""The interactive live view (Textual): the screen of ``dashboard.render``, plus keys.

    f   filter by host (a part of its name)      s   cycle the card-state filter
    c   one card's history (host/device), from the store's transitions
    p   pause / resume the view (the engine goes on)
    esc clear the filters                         q   quit (stops the engine, as Ctrl-C)

Used by deploy/watch when both stdin and stdout are terminals (``--plain`` or a
pipe gives the rich view, ``--json`` the events). The engine runs in the same
event loop; the view redraws from a snapshot at most ``fps`` times a second.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Awaitable, Callable

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, Static

from orchestrator.engine.snapshot import Snapshot
from orchestrator.engine.store.protocol import TransitionRecord
from orchestrator.views.dashboard import Filter, render

STATES = ("", "QUARANTINED", "FAILED", "DISCONNECTED", "CORDONED", "RETRY_WAIT", "REKEYING",
          "ATTESTING", "PENDING", "SERVING")
History = Callable[[str, int], Awaitable[list[TransitionRecord]]]


class CardHistory(ModalScreen[None]):
    """One card's transitions, oldest first; any of esc, q, enter closes it."""

    BINDINGS = [Binding("escape,q,enter", "dismiss", "close")]

    def __init__(self, card: str, moves: list[TransitionRecord]) -> None:
        super().__init__()
        self.card = card
        self.moves = moves

    def compose(self) -> ComposeResult:
        text = Text(f"history of {self.card} ({len(self.moves)} moves)\n", style="bold")
        for move in self.moves:
            stamp = dt.datetime.fromtimestamp(move.ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
            text.append(f"{stamp}  {move.previous} -> {move.state}  {move.reason}\n")
        if not self.moves:
            text.append("(the store has no move of this card)\n", style="dim")
        yield Static(text, id="history")

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(result)


class FleetApp(App[None]):
    AUTO_FOCUS = None          # keys go to the view; the prompt takes focus only when asked
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #view { height: 1fr; }
    #ask { dock: bottom; display: none; }
    #ask.asking { display: block; }
    CardHistory { align: center middle; }
    #history { width: 90%; height: auto; max-height: 90%; border: round $accent;
               padding: 0 1; background: $surface; }
    """
    BINDINGS = [
        Binding("f", "ask('host')", "filter host"),
        Binding("s", "cycle_state", "state filter"),
        Binding("d", "ask('deployment')", "deployment"),
        Binding("c", "ask('card')", "card history"),
        Binding("p", "pause", "pause"),
        Binding("escape", "clear", "clear"),
        Binding("q,ctrl+c", "quit", "quit"),
    ]

    def __init__(self, snapshot: Callable[[], Snapshot], history: History, *,
                 title: str = "modelip", fps: float = 4.0) -> None:
        super().__init__()
        self.snapshot = snapshot
        self.history = history
        self.view_title = title
        self.fps = fps
        self.filter = Filter()
        self.paused = False
        self._asking = ""

    def compose(self) -> ComposeResult:
        yield Static(id="view")
        yield Input(id="ask")
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(1.0 / self.fps, self.redraw)
        self.redraw()

    def redraw(self, *, force: bool = False) -> None:
        if self.paused and not force:
            return
        view = self.query_one("#view", Static)
        width = view.size.width or self.size.width
        height = view.size.height or max(1, self.size.height - 2)
        view.update(render(self.snapshot(), title=self.view_title, width=width,
                           height=height + 1, view=self.filter, paused=self.paused))

    # --- keys -------------------------------------------------------------------------

    def action_ask(self, what: str) -> None:
        self._asking = what
        ask = self.query_one("#ask", Input)
        ask.placeholder = {
            "host": "show hosts whose name contains ... (enter: apply, empty: all)",
            "deployment": "show one deployment's cards: its name (enter: apply, empty: all)",
        }.get(what, "card as host/device, e.g. host3/0")
        ask.value = {"host": self.filter.host, "deployment": self.filter.deployment}.get(
            what, "")
        ask.add_class("asking")
        ask.focus()

    async def on_input_submitted(self, message: Input.Submitted) -> None:
        ask = self.query_one("#ask", Input)
        ask.remove_class("asking")
        value = message.value.strip()
        if self._asking == "host":
            self.filter = dataclasses.replace(self.filter, host=value)
        elif self._asking == "deployment":
            self.filter = dataclasses.replace(self.filter, deployment=value)
        elif self._asking == "card" and value:
            host, _, device = value.rpartition("/")
            if not host or not device.isdigit():
                self.notify(f"{value!r}: a card is host/device", severity="error")
            else:
                moves = await self.history(host, int(device))
                self.push_screen(CardHistory(value, moves))
        self._asking = ""
        self.redraw(force=True)

    def action_cycle_state(self) -> None:
        following = STATES[(STATES.index(self.filter.state) + 1) % len(STATES)]
        self.filter = dataclasses.replace(self.filter, state=following)
        self.redraw(force=True)

    def action_pause(self) -> None:
        self.paused = not self.paused
        self.redraw(force=True)

    def action_clear(self) -> None:
        ask = self.query_one("#ask", Input)
        if ask.has_class("asking"):
            ask.remove_class("asking")
            self._asking = ""
        self.filter = Filter()
        self.redraw(force=True)


__all__ = ["FleetApp"]
