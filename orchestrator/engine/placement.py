"""Placing deployments on a shared fleet (docs/deployments.md): which MDP groups of
which host's cards each deployment runs. Pure: an inventory, what each deployment
needs, where things are now; out comes where they are to be, and why a deployment
is short. No I/O, no clock; the same input gives the same answer.

The rules, in order of precedence:

- a group's cards are on one host, usable, and each card is in at most one group;
- what is placed stays where it is while its host still matches and its cards are
  still usable (nothing unrelated reshuffles a serving group: moving one costs a
  reset of every card of it, docs/deployments.md "Handover");
- a deployment that shrinks gives up groups where it has the most;
- new groups go, deployment by deployment (the largest groups first, so that small
  ones do not fragment the hosts they need; then by name), to the matching host
  where the deployment has the fewest groups (``spread``) or the most (packed),
  then the one with the most free cards, then by name;
- a deployment that does not get every group it needs keeps what it got and says
  why ("needs 3 groups of 4 cards; 2 free groups of 4 on hosts that match").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class HostSlots:
    """One host of the inventory: its name, labels, and the cards usable on it now."""

    name: str
    cards: tuple[int, ...]
    labels: Mapping[str, str] = field(default_factory=dict)

    def matches(self, selectors: Sequence[str]) -> bool:
        """``selectors``: host names or ``key=value`` labels (any of them); none: any."""
        return not selectors or any(
            s == self.name or ("=" in s and self.labels.get(s.split("=", 1)[0]) ==
                               s.split("=", 1)[1]) for s in selectors)


@dataclass(frozen=True, slots=True)
class Need:
    """What a deployment asks for: ``groups`` MDP groups of ``group_size`` cards, on
    hosts matching ``hosts`` (names or ``key=value`` labels; empty: any host)."""

    name: str
    groups: int
    group_size: int
    hosts: tuple[str, ...] = ()
    spread: bool = True


@dataclass(frozen=True, slots=True, order=True)
class Group:
    host: str
    devices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Placement:
    groups: Mapping[str, tuple[Group, ...]]   # by deployment
    pending: Mapping[str, str]                # deployment -> why it is short

    def moved_from(self, before: Mapping[str, Sequence[Group]]) -> dict[str, list[Group]]:
        """The groups of ``before`` this placement no longer has, by deployment: the
        ones to drain (their cards unloaded and reset before anyone else's key)."""
        gone: dict[str, list[Group]] = {}
        for name, groups in before.items():
            kept = set(self.groups.get(name, ()))
            if lost := [g for g in groups if g not in kept]:
                gone[name] = lost
        return gone


def place(inventory: Sequence[HostSlots], needs: Sequence[Need],
          current: Mapping[str, Iterable[Group]] | None = None) -> Placement:
    """Where each deployment's groups are to be (module docstring for the rules)."""
    hosts = {h.name: h for h in inventory}
    free = {h.name: set(h.cards) for h in inventory}
    placed: dict[str, list[Group]] = {}
    wanted = {need.name: need for need in needs}
    for name, groups in (current or {}).items():
        need = wanted.get(name)
        if need is None:
            continue            # the deployment is gone: its groups are drained
        kept: list[Group] = []
        for group in sorted(groups):
            host = hosts.get(group.host)
            if host is None or len(group.devices) != need.group_size or \
                    not host.matches(need.hosts) or not free[group.host] >= set(group.devices):
                continue        # its host is gone or changed, a card of it is not usable
            free[group.host] -= set(group.devices)
            kept.append(group)
        placed[name] = kept
    for need in needs:          # shrink where the deployment has the most
        kept = placed.setdefault(need.name, [])
        while len(kept) > need.groups:
            per_host = Counter(g.host for g in kept)
            victim = max(kept, key=lambda g: (per_host[g.host], g))
            kept.remove(victim)
            free[victim.host] |= set(victim.devices)
    pending: dict[str, str] = {}
    for need in sorted(needs, key=lambda n: (-n.group_size, n.name)):
        kept = placed[need.name]
        missing = need.groups - len(kept)
        if missing <= 0:
            continue
        matching = [h for h in inventory if h.matches(need.hosts)]
        mine = Counter(g.host for g in kept)
        free_before = sum(len(free[h.name]) // need.group_size for h in matching)
        for _ in range(missing):
            fits = [h for h in matching if len(free[h.name]) >= need.group_size]
            if not fits:
                break
            sign = 1 if need.spread else -1
            host = min(fits, key=lambda h: (sign * mine[h.name], -len(free[h.name]), h.name))
            devices = tuple(sorted(free[host.name])[:need.group_size])
            free[host.name] -= set(devices)
            mine[host.name] += 1
            kept.append(Group(host.name, devices))
        if len(kept) < need.groups:
            pending[need.name] = short(need, free_before + need.groups - missing, matching)
    return Placement({name: tuple(sorted(groups)) for name, groups in placed.items()},
                     pending)


def short(need: Need, available: int, matching: Sequence[HostSlots]) -> str:
    """Why ``need`` is short: what it asks against what the matching hosts have."""
    where = "hosts that match" if need.hosts else "the fleet's hosts"
    if not matching:
        return f"no host matches {', '.join(need.hosts)}"
    return (f"needs {need.groups} group{'s' if need.groups != 1 else ''} of "
            f"{need.group_size} card{'s' if need.group_size != 1 else ''}; {available} free "
            f"group{'s' if available != 1 else ''} of {need.group_size} on {where}")
