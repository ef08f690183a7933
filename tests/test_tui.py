"""The live view as an operator meets it: the interactive view's keys (Textual's pilot),
and the real program in a pseudo-terminal, its screen read by a terminal emulator."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import sys
import termios
import time
from pathlib import Path

import pyte
from rich.console import Console
from textual.widgets import Static

from orchestrator.engine.state import CardState, CardTransition
from orchestrator.engine.store.sqlite import SQLiteStore
from orchestrator.views.tui import CardHistory, FleetApp
from tests.models import tiny_mlp
from tests.test_dashboard import PROBLEMS, fleet


def shown(app: FleetApp, widget: str = "#view") -> str:
    static = app.screen.query_one(widget, Static)
    console = Console(record=True, width=160, color_system=None, file=io.StringIO())
    console.print(static.content)
    return console.export_text()


async def test_keys_filter_pause_and_show_a_cards_history(tmp_path: Path) -> None:
    snap = fleet(16, 16, PROBLEMS)
    with SQLiteStore(tmp_path / "journal.sqlite") as store:
        await store.ensure_cards("host0003", [(1, 3, 0)])
        for previous, state, reason in ((CardState.PENDING, CardState.ATTESTING, "start"),
                                        (CardState.ATTESTING, CardState.QUARANTINED,
                                         "report signature does not verify")):
            await store.record_card(CardTransition("host0003", 1, "c", previous, state, reason,
                                                   1, "", "", 1, None))
        app = FleetApp(lambda: snap, store.card_transitions, title="fleet")
        async with app.run_test(size=(160, 50)) as pilot:
            await pilot.pause()
            assert "host0000 ●●●●" in shown(app) and "needs attention (3)" in shown(app)
            await pilot.press("s")                       # state filter: QUARANTINED first
            text = shown(app)
            assert "filter: state=QUARANTINED" in text and "host0005" not in text
            await pilot.press("escape", "f", *"host0005", "enter")
            text = shown(app)
            assert "filter: host~'host0005'" in text and "host0005/0 FAILED" in text
            assert "host0003" not in text
            await pilot.press("p")
            assert "PAUSED" in shown(app)
            await pilot.press("p", "escape", "c", *"host0003/1", "enter")
            await pilot.pause()
            assert isinstance(app.screen, CardHistory)
            history = shown(app, "#history")
            assert "history of host0003/1 (2 moves)" in history
            assert "ATTESTING -> QUARANTINED  report signature does not verify" in history
            await pilot.press("escape")
            assert not isinstance(app.screen, CardHistory)
            await pilot.press("c", *"nonsense", "enter")  # not host/device: said, no crash
            await pilot.press("q")
        assert app.return_code == 0


def run_in_terminal(args: list[str], keys: list[tuple[str, bytes]], *, cols: int = 120,
                    rows: int = 40, limit: float = 60) -> tuple[int, pyte.Screen, bytes]:
    """Run modelip in a pseudo-terminal; at each (text on screen, key) send the key once
    the text shows. Returns (exit code, the screen, everything written)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal of cols x rows
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        os.environ.update(TERM="xterm-256color", COLUMNS=str(cols), LINES=str(rows))
        os.execv(sys.executable, [sys.executable, "-m", "orchestrator", *args])  # noqa: S606
    screen = pyte.Screen(cols, rows)
    stream = pyte.ByteStream(screen)
    written = bytearray()
    pending = list(keys)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            written += data
            stream.feed(data)
        if pending and pending[0][0] in "\n".join(screen.display):
            time.sleep(0.3)
            os.write(fd, pending.pop(0)[1])
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), screen, bytes(written)


def test_the_real_program_in_a_terminal_shows_the_fleet_and_takes_keys(tmp_path: Path) -> None:
    (tmp_path / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
    plan = tmp_path / "plan.yaml"
    plan.write_text("model: {onnx: tiny.onnx}\nmek: {generate: true}\n"
                    "fleet: {emulated: {hosts: 4, devices_per_host: 4}}\nstate_dir: state\n")
    code, screen, written = run_in_terminal(
        ["watch", str(plan), "--duration", "60"],
        [("● serving 16", b"s"), ("filter: state=QUARANTINED", b"q")])
    lines = screen.display
    assert code == 0              # q: a normal end, judged (every card serves), not 130
    assert any("filter: state=QUARANTINED" in line for line in lines)
    assert any("hosts serving 4/4   groups serving 16/16" in line for line in lines)
    assert b"16/16 cards serving, 4/4 hosts up" in written  # the summary, after the view
    # the view closes by itself when --duration ends (as `make demo` does): exit 0, summary
    code, _, written = run_in_terminal(["watch", str(plan), "--duration", "2"], [])
    assert code == 0 and b"16/16 cards serving" in written
    # --plain: the rich view, no keys; fits the 80x24 terminal, and deploy exits 0
    code, screen, written = run_in_terminal(["deploy", str(plan), "--plain"], [], cols=80,
                                            rows=24)
    assert code == 0
    text = "\n".join(screen.display)
    assert "host0 ●●●●  host1 ●●●●  host2 ●●●●  host3 ●●●●" in text
    assert "16/16 cards serving" in text


async def test_the_d_key_shows_one_deployments_cards_alone() -> None:
    """Two deployments on four hosts; `d` and a name: only that deployment's hosts,
    cards, counts and line; escape: everything again."""
    import dataclasses

    from orchestrator.engine.events import DeploymentOutcome

    snap = fleet(4, 4, {(1, 0): "FAILED", (2, 1): "QUARANTINED"})
    cards = tuple(dataclasses.replace(c, deployment="vision" if c.host in ("host0000",
                                                                           "host0001")
                                      else "ranking") for c in snap.cards)
    snap = dataclasses.replace(snap, cards=cards, deployments=(
        DeploymentOutcome("vision", 1, 3, 4, 4), DeploymentOutcome("ranking", 2, 3, 4, 4)))
    app = FleetApp(lambda: snap, lambda host, device: None, title="fleet")  # type: ignore[arg-type, return-value]
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.pause()
        text = shown(app)
        assert "deployment vision" in text and "deployment ranking" in text
        await pilot.press("d", *"ranking", "enter")
        text = shown(app)
        assert "filter: deployment=ranking" in text
        assert "host0002" in text and "host0003" in text
        assert "host0000" not in text and "host0001" not in text
        assert "deployment ranking" in text and "deployment vision" not in text
        assert "host0002/1 QUARANTINED" in text and "host0001/0 FAILED" not in text
        await pilot.press("escape")
        assert "host0000" in shown(app)
