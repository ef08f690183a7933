"""Placement of deployments on a shared fleet (engine/placement.py): spread, kept
where it is, shrunk where it has most, re-placed off a failed host only, short with
a reason; and, over random fleets and histories, its invariants."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.engine.placement import Group, HostSlots, Need, Placement, place


def fleet(hosts: int, cards: int, **labels: str) -> list[HostSlots]:
    return [HostSlots(f"h{i}", tuple(range(cards)), {"zone": labels.get(f"h{i}", "a")})
            for i in range(hosts)]


def test_groups_spread_across_hosts_one_host_each() -> None:
    result = place(fleet(4, 8), [Need("llm", 4, 4), Need("asr", 2, 1)])
    assert sorted(g.host for g in result.groups["llm"]) == ["h0", "h1", "h2", "h3"]
    assert all(len(g.devices) == 4 for g in result.groups["llm"])
    assert len({g.host for g in result.groups["asr"]}) == 2 and not result.pending


def test_packed_deployments_share_hosts() -> None:
    result = place(fleet(4, 8), [Need("batch", 4, 1, spread=False)])
    assert {g.host for g in result.groups["batch"]} == {"h0"}


def test_what_is_placed_stays_when_something_unrelated_changes() -> None:
    inventory = fleet(4, 8)
    first = place(inventory, [Need("llm", 2, 4), Need("asr", 3, 2)])
    second = place(inventory, [Need("llm", 2, 4), Need("asr", 3, 2), Need("ocr", 4, 1)],
                   first.groups)
    assert second.groups["llm"] == first.groups["llm"]
    assert second.groups["asr"] == first.groups["asr"]
    assert not second.moved_from(first.groups)


def test_a_failed_host_moves_only_its_groups() -> None:
    inventory = fleet(4, 8)
    first = place(inventory, [Need("llm", 3, 4), Need("asr", 4, 1)])
    lost = "h0"
    second = place([h for h in inventory if h.name != lost],
                   [Need("llm", 3, 4), Need("asr", 4, 1)], first.groups)
    moved = second.moved_from(first.groups)
    assert moved and all(g.host == lost for groups in moved.values() for g in groups)
    for name in ("llm", "asr"):
        assert len(second.groups[name]) == len(first.groups[name])
        assert lost not in {g.host for g in second.groups[name]}


def test_a_deployment_shrinks_where_it_has_most() -> None:
    current = {"llm": [Group("h0", (0,)), Group("h0", (1,)), Group("h1", (0,))]}
    result = place(fleet(2, 4), [Need("llm", 2, 1)], current)
    assert Counter(g.host for g in result.groups["llm"]) == {"h0": 1, "h1": 1}


def test_a_removed_deployment_is_drained() -> None:
    first = place(fleet(2, 4), [Need("llm", 2, 2), Need("asr", 1, 1)])
    second = place(fleet(2, 4), [Need("asr", 1, 1)], first.groups)
    assert "llm" not in second.groups
    assert second.moved_from(first.groups) == {"llm": list(first.groups["llm"])}


def test_short_says_what_it_needs_against_what_is_free() -> None:
    result = place(fleet(3, 4, h2="b"), [Need("llm", 3, 4, hosts=("zone=a",))])
    assert result.pending == {"llm": "needs 3 groups of 4 cards; 2 free groups of 4 on "
                                     "hosts that match"}
    assert len(result.groups["llm"]) == 2   # it keeps what it got
    none = place(fleet(2, 4), [Need("x", 1, 1, hosts=("zone=z",))])
    assert none.pending == {"x": "no host matches zone=z"}
    by_name = place(fleet(2, 4), [Need("y", 1, 4, hosts=("h1",))])
    assert by_name.groups["y"] == (Group("h1", (0, 1, 2, 3)),)


def test_unusable_cards_are_not_placed_and_their_groups_move() -> None:
    inventory = fleet(2, 4)
    first = place(inventory, [Need("llm", 2, 2)])
    broken = [HostSlots("h0", (0, 2, 3), {"zone": "a"}), inventory[1]]   # card 1 is down
    second = place(broken, [Need("llm", 2, 2)], first.groups)
    used = [(g.host, d) for g in second.groups["llm"] for d in g.devices]
    assert ("h0", 1) not in used and len(second.groups["llm"]) == 2


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[HostSlots], list[list[Need]]]:
    hosts = [HostSlots(f"h{i}", tuple(sorted(draw(st.sets(st.integers(0, 7), max_size=8)))),
                       {"zone": draw(st.sampled_from("ab"))})
             for i in range(draw(st.integers(1, 6)))]
    names = ["a", "b", "c", "d", "e"]
    rounds = []
    for _ in range(draw(st.integers(1, 4))):
        chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=5))
        rounds.append([Need(n, draw(st.integers(1, 5)), draw(st.integers(1, 4)),
                            draw(st.sampled_from([(), ("zone=a",), ("h0", "h2")])),
                            draw(st.booleans())) for n in chosen])
    return hosts, rounds


def check(inventory: list[HostSlots], needs: list[Need], result: Placement) -> None:
    usable = {(h.name, c) for h in inventory for c in h.cards}
    by_name = {h.name: h for h in inventory}
    taken = [(g.host, d) for groups in result.groups.values() for g in groups
             for d in g.devices]
    assert len(taken) == len(set(taken)) and set(taken) <= usable   # each card once, usable
    free = Counter({h.name: len(h.cards) for h in inventory})
    free.subtract(Counter(host for host, _ in taken))
    for need in needs:
        groups = result.groups[need.name]
        assert len(groups) <= need.groups
        for g in groups:
            assert len(set(g.devices)) == need.group_size
            assert by_name[g.host].matches(need.hosts)
        if len(groups) < need.groups:   # short only if nothing that matches is free
            assert need.name in result.pending
            assert all(free[h.name] < need.group_size for h in inventory
                       if h.matches(need.hosts))
        else:
            assert need.name not in result.pending


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_every_placement_keeps_its_invariants_and_stays_put(
        scenario: tuple[list[HostSlots], list[list[Need]]]) -> None:
    inventory, rounds = scenario
    current: dict[str, tuple[Group, ...]] = {}
    for needs in rounds:
        result = place(inventory, needs, current)
        check(inventory, needs, result)
        by_name = {h.name: h for h in inventory}
        for need in needs:   # what was placed and still fits stays (unless it shrank)
            valid = {g for g in current.get(need.name, ()) if len(g.devices) ==
                     need.group_size and by_name[g.host].matches(need.hosts)}
            now = set(result.groups[need.name])
            assert valid <= now if len(valid) <= need.groups else now <= valid
        again = place(inventory, needs, result.groups)
        assert again.groups == result.groups                  # a fixed point
        current = dict(result.groups)


def test_failover_moves_a_down_hosts_group_only_where_it_can_go() -> None:
    from orchestrator.engine.failover import failover_placement

    slots = [HostSlots("h0", (0, 1)), HostSlots("h1", (0, 1)), HostSlots("h2", (0,))]
    needs = [Need("a", 2, 1, (), True), Need("b", 1, 2, (), True)]
    placed = {"a": [Group("h0", (0,)), Group("h2", (0,))], "b": [Group("h1", (0, 1))]}
    # h2 down: a's group there goes to the free card of h0; b is not touched
    moved = failover_placement(slots, {"h2"}, needs, placed)
    assert sorted(moved.groups["a"]) == [Group("h0", (0,)), Group("h0", (1,))]
    assert moved.groups["b"] == (Group("h1", (0, 1)),) and not moved.pending
    # h1 down: b's group of two cards fits nowhere else: it stays, nothing is short
    kept = failover_placement(slots, {"h1"}, needs, placed)
    assert kept.groups["b"] == (Group("h1", (0, 1)),) and not kept.pending
    assert sorted(kept.groups["a"]) == sorted(placed["a"])
    # nothing down: the same placement
    same = failover_placement(slots, set(), needs, placed)
    assert {n: sorted(g) for n, g in same.groups.items()} == \
        {n: sorted(g) for n, g in placed.items()}
