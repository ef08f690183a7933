"""Rollouts against a live `modelip emulate` fleet, the orchestrator as a process:
waves under a capacity floor (sampled from the hosts), a bad version stopped at
the canary and rolled back, a kill mid-rollout resumed, resets re-keyed to each
group's version while paused, undo, and the rollback floor raised only at commit."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest

from orchestrator.engine.store.sqlite import SQLiteStore
from orchestrator.plan.rollout import RolloutSpec, Step
from orchestrator.transport.client import HostClient
from orchestrator.transport.types import DeviceState
from tests.emulate import MODELIP, emulate
from tests.models import reference_output, tiny_mlp

HOSTS, CARDS = 2, 4


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[list[str], Path]]:
    """A live `modelip emulate` (2 hosts x 4 cards): their addresses and trust root."""
    with emulate(tmp_path, hosts=HOSTS, devices=CARDS) as running:
        yield running


X = np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8)


def write_plan(tmp_path: Path, fleet: tuple[list[str], Path], version: int, *,
               partitions: int = 1, rollout: str = "") -> Path:
    """Version N of the model (its own weights), the same MEK and state directory."""
    addresses, root = fleet
    model = tiny_mlp(seed=version)
    (tmp_path / f"m{version}.onnx").write_bytes(model.SerializeToString())
    np.savez(tmp_path / "x.npz", x=X)
    np.savez(tmp_path / f"y{version}.npz", y=reference_output(model, X))
    hosts = "".join(f"    - address: {a}\n      devices: [0, 1, 2, 3]\n" for a in addresses)
    path = tmp_path / f"v{version}.yaml"
    path.write_text(f"""
model:
  onnx: m{version}.onnx
  id: mlp
  version: {version}
  partitions: {partitions}
mek:
  generate: true
fleet:
  hosts:
{hosts}trust:
  roots: [{root}]
retry:
  attempts: 3
  backoff: 0.05
rekey:
  check_interval: 1
  min_interval: 0.1
state_dir: state
{rollout}
""")
    return path


def version_2_over_1(tmp_path: Path, fleet: tuple[list[str], Path], rollout: str, *,
                     partitions: int = 1) -> Path:
    """Version 1 deployed (every card serving it); the plan of version 2 with ``rollout``."""
    v1 = write_plan(tmp_path, fleet, 1, partitions=partitions)
    assert deploy(v1)[0] == 0
    return write_plan(tmp_path, fleet, 2, partitions=partitions, rollout=rollout)


def deploy(plan: Path, *extra: str) -> tuple[int, list[dict[str, object]], str]:
    result = subprocess.run([*MODELIP, "deploy", str(plan), "--json", *extra],
                            capture_output=True, text=True, timeout=180, check=False)
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines()], \
        result.stderr


def rollout_events(events: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in events if e["event"] == "rollout"]


def journal(tmp_path: Path) -> SQLiteStore:
    return SQLiteStore(tmp_path / "state" / "journal.sqlite")


def status(plan: Path) -> dict[str, object]:
    out = subprocess.run([*MODELIP, "rollout", "status", str(plan), "--json"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    view: dict[str, object] = json.loads(out)["rollout"]
    return view


def operator(action: str, plan: Path) -> str:
    """`modelip rollout ACTION PLAN` from another terminal: what it printed."""
    return subprocess.run([*MODELIP, "rollout", action, str(plan)], capture_output=True,
                          text=True, timeout=60, check=True).stdout


def lowest_capacity(events: list[dict[str, object]], groups: dict[tuple[str, int], int]
                    ) -> int:
    """Replay the card events: the fewest groups with every card SERVING at any moment
    after the first deployment settled."""
    state = {card: "SERVING" for card in groups}
    lowest = len(set(groups.values()))
    settled = False
    for e in events:
        settled = settled or e["event"] == "deployed"
        if settled and e["event"] == "card":
            state[(str(e["host"]), int(e["device"]))] = str(e["state"])  # type: ignore[arg-type]
            down = {groups[c] for c, s in state.items() if s != "SERVING"}
            lowest = min(lowest, len(set(groups.values())) - len(down))
    return lowest


class HostSampler:
    """Polls every host's own device list while a rollout runs: the groups whose cards
    are all loaded with one program (what can serve inference right now)."""

    def __init__(self, addresses: list[str], group_size: int) -> None:
        self.addresses, self.group_size = addresses, group_size
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: anyio.run(self._run), daemon=True)

    def __enter__(self) -> HostSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    async def _run(self) -> None:
        clients = [HostClient(a) for a in self.addresses]
        for client in clients:
            await client.__aenter__()
        try:
            while not self._stop.is_set():
                serving = 0
                for client in clients:
                    listing = sorted(await client.list_devices(), key=lambda d: d.device)
                    for start in range(0, len(listing), self.group_size):
                        group = listing[start:start + self.group_size]
                        serving += all(d.state is DeviceState.LOADED for d in group) and \
                            len({d.program_id for d in group}) == 1
                self.samples.append(serving)
                await anyio.sleep(0.005)
        finally:
            for client in clients:
                await client.__aexit__(None, None, None)


def test_waves_are_resolved_from_the_canary_and_cumulative_steps() -> None:
    spec = RolloutSpec(canary=1, steps=(Step(25, True), Step(100, True)))
    assert spec.waves(8) == [1, 2, 8]
    assert RolloutSpec(canary=2, steps=(Step(3, False),)).waves(10) == [2, 3, 10]  # rest after
    assert RolloutSpec(canary=0, steps=(Step(50, True),)).waves(3) == [2, 3]
    assert RolloutSpec(canary=5).waves(2) == [2]


def test_a_good_version_rolls_out_in_waves_above_the_capacity_floor_and_commits(
        tmp_path: Path, fleet: tuple[list[str], Path]) -> None:
    v2 = version_2_over_1(tmp_path, fleet, partitions=2, rollout="""rollout:
  canary: 1
  steps: ["50%", "100%"]
  max_unavailable: 1
  soak: 0.5
  smoke: {input: x.npz, expect: y2.npz, rtol: 1e-4}
""")
    with HostSampler(fleet[0], 2) as sampler:
        code, events, err = deploy(v2)
    assert code == 0, err + json.dumps(events[-1])
    groups = {(str(e["host"]), int(e["device"])): int(e["group"])  # type: ignore[arg-type]
              for e in events if e["event"] == "card"}
    assert len(set(groups.values())) == 4   # 2 hosts x 4 cards in MDP groups of 2
    # never below groups - max_unavailable: by the engine's own events, and by the hosts
    assert lowest_capacity(events, groups) >= 3
    assert min(sampler.samples) >= 3 and len(sampler.samples) > 20, sampler.samples[:50]
    said = rollout_events(events)
    assert all(e["serving"] >= e["floor"] == 3 for e in said)
    switched = {}
    for e in said:
        if "switched to version 2 (rollback floor 1)" in str(e["what"]):
            switched.setdefault(e["wave"], []).append(e["what"])
    assert {w: len(s) for w, s in switched.items()} == {1: 1, 2: 1, 3: 2}  # 1, 50%, 100%
    assert [e["phase"] for e in said][-1] == "committed"
    assert sum("wave 3 passed: 2 new group(s) serve version 2, smoke passed, soaked 0.5 s"
               in str(e["what"]) for e in said) == 1
    # the rollback floor: kept at 1 while the waves ran (a way back), 2 once committed
    serving = [str(e["reason"]) for e in events
               if e["event"] == "card" and e["state"] == "SERVING"]
    assert sum("(version 2, rollback floor 1)" in r for r in serving) == 8
    last = {}
    for e in events:
        if e["event"] == "card" and e["state"] == "SERVING":
            last[(e["host"], e["device"])] = e["reason"]
    assert all("(version 2, rollback floor 2)" in r for r in last.values()) and len(last) == 8
    view = status(v2)
    assert view["phase"] == "committed" and view["groups"] == {  # type: ignore[comparison-overlap]
        "old": 0, "new": 4, "other": 0, "total": 4}
    # no way back after commit: version 1 is below every card's floor
    code, _, err = deploy(tmp_path / "v1.yaml")
    assert code == 2 and "below the rollback floor the fleet's cards hold (2" in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_version_that_fails_its_smoke_stops_at_the_canary_and_rolls_back(
        tmp_path: Path, fleet: tuple[list[str], Path]) -> None:
    v1 = write_plan(tmp_path, fleet, 1)
    assert deploy(v1)[0] == 0
    with journal(tmp_path) as store:
        before = len(anyio.run(store.loads))
    # version 2's outputs are checked against version 1's: they differ
    v2 = write_plan(tmp_path, fleet, 2, rollout="""rollout:
  canary: 1
  steps: ["50%"]
  smoke: {input: x.npz, expect: y1.npz}
""")
    code, events, err = deploy(v2)
    assert code == 6, err
    said = rollout_events(events)
    assert said[-1]["phase"] == "rolled back" and "smoke on group 0: output 'y' differs" in \
        str(said[-1]["verdict"])
    assert events[-1]["event"] == "summary" and events[-1]["serving"] == 8
    with journal(tmp_path) as store:
        loads = anyio.run(store.loads)[before:]
    touched = {(r.host, r.device) for r in loads}
    assert len(touched) == 1 and len(loads) == 2   # the canary's card: version 2, then 1
    assert loads[0].program_id != loads[1].program_id
    view = status(v2)
    assert view["phase"] == "rolled back" and "differs" in str(view["verdict"])
    # the verdict stands: the same plan again keeps version 1 serving, loads nothing
    code, events, _ = deploy(v2)
    assert code == 6 and not [e for e in events if e.get("state") == "LOADING"]
    assert "held:" in str(rollout_events(events)[0]["what"])
    result = subprocess.run([*MODELIP, "rollout", "undo", str(v2)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 2 and "no rollout in progress" in result.stderr


def test_a_killed_orchestrator_resumes_the_rollout_where_it_was(
        tmp_path: Path, fleet: tuple[list[str], Path]) -> None:
    v2 = version_2_over_1(tmp_path, fleet, rollout="""rollout:
  canary: 1
  steps: [4, 6]
  max_unavailable: 2
  soak: 1
  smoke: {check: finite}
""")
    process = subprocess.Popen([*MODELIP, "deploy", str(v2), "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        event = json.loads(line)
        if event["event"] == "rollout" and event["phase"] == "gating" and event["wave"] == 2:
            process.kill()   # wave 2 of 4 switched, its gate under way
            break
    process.communicate(timeout=30)
    view = status(v2)
    assert (view["phase"], view["wave"]) == ("gating", 2)
    candidate = view["candidate"]["program"]  # type: ignore[index]
    with journal(tmp_path) as store:
        loaded_before = {(r.host, r.device) for r in anyio.run(store.loads)
                         if r.program_id == candidate}
    assert len(loaded_before) == 4
    code, events, err = deploy(v2)
    assert code == 0, err
    said = rollout_events(events)
    assert said[0]["what"] == "resumed from the journal" and said[0]["wave"] == 2
    assert not [e for e in said if e["wave"] == 1]
    with journal(tmp_path) as store:
        loads = [r for r in anyio.run(store.loads) if r.program_id == candidate]
    again = [(r.host, r.device) for r in loads if (r.host, r.device) in loaded_before]
    assert len(again) == len(loaded_before)   # wave 1 and 2 were not switched again
    assert len({(r.host, r.device) for r in loads}) == 8
    assert said[-1]["phase"] == "committed"


def test_resets_while_paused_are_rekeyed_to_each_groups_version_then_resume_and_undo(
        tmp_path: Path, fleet: tuple[list[str], Path]) -> None:
    v2 = version_2_over_1(tmp_path, fleet, rollout="""rollout:
  canary: 1
  steps: ["50%", "100%"]
  pause: 5
  smoke: {check: finite}
""")
    address = fleet[0][0]
    process = subprocess.Popen([*MODELIP, "watch", str(v2), "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    events: list[dict[str, object]] = []
    step = "canary"
    try:
        for line in process.stdout:
            event = json.loads(line)
            events.append(event)
            if step == "canary" and event["event"] == "rollout" and event["phase"] == "gating":
                assert "pause requested" in operator("pause", v2)
                step = "paused"
            elif step == "paused" and event["event"] == "rollout" \
                    and event["what"] == "paused by the operator":
                # the canary (group 0: host 0 card 0) runs v2, group 1 (card 1) still v1

                async def reset() -> None:
                    async with HostClient(address) as host:
                        await host.reset(0)
                        await host.reset(1)
                anyio.run(reset)
                step = "reset"
                rekeyed: dict[int, str] = {}
            elif step == "reset" and event["event"] == "card" and event["host"] == address \
                    and event["state"] == "SERVING" and event["device"] in (0, 1):
                rekeyed[int(event["device"])] = str(event["reason"])  # type: ignore[arg-type]
                if len(rekeyed) == 2:
                    assert "(version 2, rollback floor 1)" in rekeyed[0]
                    assert "(version 1, rollback floor 1)" in rekeyed[1]
                    time.sleep(1.5)   # paused: no group is switched meanwhile
                    assert status(v2)["wave"] == 1
                    operator("resume", v2)
                    step = "resumed"
            elif step == "resumed" and event["event"] == "rollout" and event["wave"] == 2 \
                    and event["phase"] == "gating":
                assert "undo requested" in operator("undo", v2)
                step = "undo"
            elif step == "undo" and event["event"] == "rollout" \
                    and event["phase"] == "rolled back":
                process.send_signal(signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    assert step == "undo", step
    assert process.returncode == 0   # SIGTERM: a clean stop
    said = rollout_events(events)
    paused_at = next(i for i, e in enumerate(said) if e["what"] == "paused by the operator")
    resumed_at = next(i for i, e in enumerate(said) if e["what"] == "resumed by the operator")
    assert not [e for e in said[paused_at:resumed_at] if "switched" in str(e["what"])]
    assert said[-1]["verdict"] == "undone by the operator (modelip rollout undo)"
    view = status(v2)
    assert view["phase"] == "rolled back" and view["groups"]["new"] == 0  # type: ignore[index]


def test_the_smoke_verdict_names_the_output_and_how_far_it_is() -> None:
    from orchestrator.engine.rollout.smoke import smoke_verdict

    y = np.array([[1.0, 2.0]], dtype=np.float32)
    assert smoke_verdict({"y": y}, None, rtol=0, atol=0, group=3) is None
    said = smoke_verdict({"y": y * np.nan}, None, rtol=0, atol=0, group=3)
    assert said == "smoke on group 3: output 'y' is not finite"
    assert smoke_verdict({"y": y}, {"": y * (1 + 1e-5)}, rtol=1e-4, atol=0, group=0) is None
    said = smoke_verdict({"y": y}, {"y": y + 0.5}, rtol=1e-3, atol=0, group=1) or ""
    assert "output 'y' differs" in said and "largest difference 0.5" in said
    assert "shape [1, 2], expected [2]" in (smoke_verdict({"y": y}, {"y": y[0]}, rtol=1,
                                                          atol=0, group=0) or "")
    assert "no output 'z'" in (smoke_verdict({"y": y}, {"z": y}, rtol=1, atol=0, group=0) or "")


def test_rollout_commands_refuse_without_a_journal_and_name_an_unreachable_store(
        tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(tiny_mlp().SerializeToString())
    plan = tmp_path / "p.yaml"
    plan.write_text("model: {onnx: m.onnx}\nmek: {generate: true}\n"
                    "fleet: {emulated: {hosts: 1}}\nstate_dir: state\n")
    result = subprocess.run([*MODELIP, "rollout", "status", str(plan)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 2 and "no journal yet" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    plan.write_text("model: {onnx: m.onnx}\nmek: {generate: true}\n"
                    "fleet: {hosts: [{address: '127.0.0.1:1', devices: [0]}]}\n"
                    "trust: {roots: [m.onnx]}\nstore: 'postgresql:///x?host=/run/nodb'\n"
                    "rollout: {canary: 1}\n")   # with replicas, a rollout is the store's
    for action in ("status", "pause"):
        result = subprocess.run([*MODELIP, "rollout", action, str(plan)], capture_output=True,
                                text=True, timeout=60, check=False)
        [line] = result.stderr.strip().splitlines()
        assert result.returncode == 5 and "cannot connect" in line, result.stderr
