"""A plan's ``deployments:`` (docs/deployments.md): several models on one fleet, each its
own key domain (its own MEK), its MDP groups placed on the fleet's cards."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.crypto.custody import token_missing
from orchestrator.engine.placement import HostSlots, Need, place
from orchestrator.limits import MAX_CARDS_PER_HOST, MAX_HOSTS
from orchestrator.plan.reader import Problem, Reader
from orchestrator.plan.rollout import RolloutSpec, read_rollout
from orchestrator.plan.sections import plan_path, read_mek, read_model, read_policy
from orchestrator.plan.specs import EmulatedSpec, HostSpec, MEKSpec, ModelSpec, PolicySpec

_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
MAX_GROUPS = MAX_HOSTS * MAX_CARDS_PER_HOST


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """One deployment: its model, its MEK (a key domain of its own), how many MDP groups
    it runs (each of ``model.partitions`` cards on one host), on which hosts (names or
    ``key=value`` labels; none: any), spread across hosts or packed, how a new version
    of its model replaces the one it serves (``rollout``; None: at once), and what it
    asks of a card beyond the fleet's trust policy (``policy``: the fleet's tightened
    by the deployment's own ``trust.policy``; None: the fleet's)."""

    name: str
    model: ModelSpec
    mek: MEKSpec
    groups: int
    hosts: tuple[str, ...] = ()
    spread: bool = True
    line: int = 0
    rollout: RolloutSpec | None = None
    policy: PolicySpec | None = None
    policy_keys: frozenset[str] = frozenset()   # what its own trust.policy sets

    @property
    def need(self) -> Need:
        return Need(self.name, self.groups, self.model.partitions, self.hosts, self.spread)


def _groups(value: int) -> str | None:
    return None if 1 <= value <= MAX_GROUPS else f"must be from 1 to {MAX_GROUPS}"


def _name(value: str) -> str | None:
    return None if _NAME.fullmatch(value) else (
        "must be 1-63 lowercase letters, digits and dashes, starting and ending with a "
        "letter or digit")


def read_deployments(top: Reader, base: Path) -> tuple[DeploymentSpec, ...]:
    deployments: list[DeploymentSpec] = []
    seen: dict[str, int] = {}
    nodes = top.nodes("deployments")
    if not nodes and top.has("deployments"):
        raise Problem(top.items["deployments"][1], "deployments", "must list at least one")
    for index, (node, line) in enumerate(nodes):
        reader = Reader(node, f"deployments[{index}]")
        name = reader.get("name", str, required=True, check=_name)
        if name in seen:
            raise Problem(reader.items["name"][1], f"deployments[{index}].name",
                          f"{name!r} is already deployments[{seen[name]}]: one name each")
        seen[name] = index
        model = read_model(reader.child("model", required=True), base)  # type: ignore[arg-type]
        mek_reader = reader.child("mek", required=True)
        mek = read_mek(mek_reader, base)  # type: ignore[arg-type]
        if mek.pkcs11 is not None and (missing := token_missing(mek.pkcs11)) is not None:
            # one deployment's key cannot be there: refused before anything starts
            raise Problem(mek_reader.items["pkcs11"][1],  # type: ignore[union-attr]
                          f"deployments[{index}].mek.pkcs11", missing)
        groups = reader.get("groups", int, 1, check=_groups)
        hosts = reader.list_of("hosts", str)
        spread = reader.get("spread", bool, True)
        rollout = None
        if (rollout_reader := reader.child("rollout")) is not None:
            rollout = read_rollout(rollout_reader, lambda r, key: plan_path(
                base, r.get(key, str), r, key))
        policy, keys = None, frozenset[str]()
        if (trust := reader.child("trust")) is not None:
            if (policy_reader := trust.child("policy")) is not None:
                keys = frozenset(policy_reader.items)
                policy = read_policy(policy_reader)
            trust.done()
        reader.done()
        deployments.append(DeploymentSpec(name, model, mek, groups, hosts, spread, line,
                                          rollout, policy, keys))
    return tuple(deployments)


def tightened(deployments: Sequence[DeploymentSpec], fleet: PolicySpec
              ) -> tuple[DeploymentSpec, ...]:
    """Each deployment's policy: the fleet's, with what the deployment's own sets added
    (a card must satisfy both: allowed sets intersected, the higher minimum firmware,
    the shorter age). Problem if nothing could satisfy both."""
    return tuple(d if d.policy is None else dataclasses.replace(
        d, policy=_tighten(fleet, d.policy, d.policy_keys, d.line,
                           f"deployments[{index}].trust.policy"))
        for index, d in enumerate(deployments))


def _tighten(fleet: PolicySpec, adds: PolicySpec, keys: frozenset[str], line: int,
             where: str) -> PolicySpec:
    from orchestrator.crypto.evidence import parse_version

    def both(mine: tuple[str, ...], theirs: tuple[str, ...], key: str) -> tuple[str, ...]:
        if not theirs:
            return mine
        kept = tuple(v for v in mine if v in theirs)
        if not kept:
            raise Problem(line, f"{where}.{key}", f"none of {list(mine)} is allowed by the "
                          f"fleet's trust.policy.{key} ({list(theirs)})")
        return kept

    policy = fleet
    if "firmware" in keys:
        policy = dataclasses.replace(policy, firmware=both(adds.firmware, fleet.firmware,
                                                           "firmware"))
    if "min_firmware" in keys and (not fleet.min_firmware or parse_version(
            adds.min_firmware) > parse_version(fleet.min_firmware)):
        policy = dataclasses.replace(policy, min_firmware=adds.min_firmware)
    if "measurements" in keys:
        merged = dict(fleet.measurements)
        for name, values in adds.measurements.items():
            merged[name] = both(values, fleet.measurements.get(name, ()),
                                f"measurements.{name}")
        policy = dataclasses.replace(policy, measurements=merged)
    if "cards" in keys:
        policy = dataclasses.replace(policy, cards=both(adds.cards, fleet.cards, "cards"))
    if "kems" in keys:
        policy = dataclasses.replace(policy, kems=both(adds.kems, fleet.kems, "kems"))
    if "max_age" in keys:
        policy = dataclasses.replace(policy, max_age=min(adds.max_age, fleet.max_age))
    return policy


def inventory(hosts: Sequence[HostSpec], emulated: EmulatedSpec | None) -> list[HostSlots]:
    """Every card of the plan's fleet, by host name (a real host's is its address; the
    embedded fleet's are host0, host1, ...)."""
    if emulated is not None:
        return [HostSlots(f"host{i}", tuple(range(emulated.devices_per_host)))
                for i in range(emulated.hosts)]
    return [HostSlots(h.address, tuple(sorted(h.devices)), h.labels) for h in hosts]


def check_fit(deployments: Sequence[DeploymentSpec], slots: Sequence[HostSlots]) -> None:
    """Refuse (Problem at the deployment's line) a constraint that names no host, and a
    deployment that cannot fit even on the whole fleet with every card usable."""
    for index, d in enumerate(deployments):
        for selector in d.hosts:
            if not any(s.matches((selector,)) for s in slots):
                raise Problem(d.line, f"deployments[{index}].hosts",
                              f"{selector!r} names no host of the fleet (a host's address or "
                              "name, or key=value of its labels)")
    placed = place(slots, [d.need for d in deployments])
    for index, d in enumerate(deployments):
        if d.name in placed.pending:
            raise Problem(d.line, f"deployments[{index}]",
                          f"{d.name} can never fit: {placed.pending[d.name]} (with every "
                          "card of the fleet usable, beside the other deployments)")
