"""A plan's ``rollout:`` section: how a new model version replaces the one the
fleet serves (docs/rollouts.md). Read and validated with the plan; the waves are
resolved against the fleet's MDP groups when the rollout starts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.plan.reader import Node, Problem, Reader, non_negative, positive

_PERCENT = re.compile(r"(\d+(?:\.\d+)?)%")


@dataclass(frozen=True, slots=True)
class Step:
    """A wave's end, cumulative: a share of the groups ("25%") or a count (4);
    ``manual``: the wave is not switched until an operator approves it."""

    value: float
    percent: bool
    manual: bool = False

    def groups(self, total: int) -> int:
        if self.percent:
            return min(total, max(1, math.ceil(self.value * total / 100 - 1e-9)))
        return min(total, int(self.value))

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.percent else str(int(self.value))


ALL_AT_ONCE = (Step(100, True),)


@dataclass(frozen=True, slots=True)
class SmokeSpec:
    """The inference every switched group must pass: outputs close to ``expect``, or
    only finite (``check: finite``). No input: zeros of the model's declared shapes."""

    input: Path | None
    expect: Path | None
    rtol: float = 1e-3
    atol: float = 0.0


@dataclass(frozen=True, slots=True)
class RolloutSpec:
    canary: int = 1                            # groups switched first, alone
    steps: tuple[Step, ...] = ALL_AT_ONCE
    max_unavailable: int = 1                   # groups out of service at once
    pause: float = 0.0                         # seconds between waves
    soak: float = 0.0                          # seconds a wave must stay SERVING
    smoke: SmokeSpec | None = None

    def waves(self, total: int) -> list[int]:
        """Cumulative group counts at the end of each wave: the canary, the steps, and
        (as Argo Rollouts does) the rest of the fleet if the steps stop short."""
        ends = [min(self.canary, total)] if self.canary else []
        ends += [step.groups(total) for step in self.steps]
        waves: list[int] = []
        for end in [*ends, total]:
            if end > (waves[-1] if waves else 0):
                waves.append(end)
        return waves

    def manual_waves(self, total: int) -> list[int]:
        """The waves (0-based, as ``waves`` numbers them) an operator must approve
        before they are switched: those a step marked ``approval: manual`` ends."""
        waves = self.waves(total)
        ends = {step.groups(total) for step in self.steps if step.manual}
        return [index for index, end in enumerate(waves) if end in ends]


def read_rollout(reader: Reader, path_of: Callable[[Reader, str], Path]) -> RolloutSpec:
    """``path_of(reader, key)``: the plan's file named at ``key`` (relative to the plan)."""
    canary = reader.get("canary", int, 1, check=non_negative)
    steps: list[Step] = []
    for index, (node, line) in enumerate(reader.nodes("steps")):
        step = _step(node, line, reader.field_name(f"steps[{index}]"))
        if steps and steps[-1].percent == step.percent and step.value <= steps[-1].value:
            raise Problem(line, reader.field_name(f"steps[{index}]"), f"must be larger than "
                          f"the step before ({steps[-1]}): steps are cumulative")
        steps.append(step)
    max_unavailable = reader.get("max_unavailable", int, 1, check=positive)
    pause = float(reader.get("pause", (int, float), 0.0, check=non_negative))
    soak = float(reader.get("soak", (int, float), 0.0, check=non_negative))
    smoke = None
    if (smoke_reader := reader.child("smoke")) is not None:
        smoke = _smoke(smoke_reader, path_of)
    reader.done()
    return RolloutSpec(canary, tuple(steps) or ALL_AT_ONCE, max_unavailable, pause, soak,
                       smoke)


def _step(node: Node, line: int, name: str) -> Step:
    """A step: "25%", 4, or {groups: "50%", approval: manual}."""
    manual = False
    value = node.value
    if isinstance(value, dict):
        reader = Reader(node, name)
        manual = reader.get("approval", str, "auto", check=lambda v: None if v in (
            "auto", "manual") else "must be manual (wait for `modelip rollout approve`) or "
            "auto") == "manual"
        value_node, line = reader.items["groups"] if reader.has("groups") else (node, line)
        reader.get("groups", (int, str), required=True)
        reader.done()
        name, value = f"{name}.groups", value_node.value
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise Problem(line, name, "must be a share like \"25%\" or a count of groups (or "
                      "{groups: ..., approval: manual})")
    if isinstance(value, int):
        if value < 1:
            raise Problem(line, name, "a count of groups must be at least 1")
        return Step(value, False, manual)
    match = _PERCENT.fullmatch(value.strip())
    if match is None or not 0 < float(match.group(1)) <= 100:
        raise Problem(line, name, "must be a share between 0% and 100% (\"25%\") or a "
                      "count of groups")
    return Step(float(match.group(1)), True, manual)


def _tolerance(reader: Reader, key: str, default: float) -> float:
    """A number >= 0; ``1e-3`` too, which YAML 1.1 (PyYAML) reads as a string."""
    def problem(value: object) -> str | None:
        try:
            number = float(value)  # type: ignore[arg-type]
        except ValueError:
            return f"must be a number, got {value!r}"
        return None if number >= 0 and math.isfinite(number) else "must be a number >= 0"

    return float(reader.get(key, (int, float, str), default, check=problem))


def _smoke(reader: Reader, path_of: Callable[[Reader, str], Path]) -> SmokeSpec:
    check = reader.get("check", str, None, check=lambda v: None if v == "finite"
                       else "must be finite (or give expect: with the expected outputs)")
    given = path_of(reader, "input") if reader.has("input") else None
    expected = path_of(reader, "expect") if reader.has("expect") else None
    rtol, atol = _tolerance(reader, "rtol", 1e-3), _tolerance(reader, "atol", 0.0)
    reader.done()
    if (check is None) == (expected is None):
        raise Problem(reader.node.line, reader.path,
                      "give exactly one of expect (expected outputs, .npy/.npz) or check: finite")
    if expected is not None and given is None:
        raise Problem(reader.node.line, reader.field_name("input"),
                      "is required with expect (the input the expected outputs answer)")
    return SmokeSpec(given, expected, rtol, atol)
