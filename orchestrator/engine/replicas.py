"""One replica among several sharing a fleet through PostgreSQL (docs/replicas.md).

The ``Replica`` sits between the Engine and its HostSupervisors: every lease
period (a third of the lease TTL) it heartbeats, renews the leases it holds,
drops at once any host whose lease it lost, claims free or expired hosts up
to its fair share (hosts / live replicas, rounded up) and hands back what is
above it. A host it holds runs a HostSupervisor exactly as with the embedded
store; a host another replica holds is shown from the store (``mirror``).

A supervisor whose lease is lost (expired here, refused by the database,
taken over) is fenced: cancelled without one more write or call to its cards.
Every RPC to a card asks the lease first (``HostClient`` gate) and carries a
deadline that ends before the lease does.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence

import anyio
from anyio.abc import TaskGroup, TaskStatus

from orchestrator.engine.context import EngineContext
from orchestrator.engine.events import LeaseChanged, StoreStatus
from orchestrator.engine.host import HostSupervisor
from orchestrator.engine.hostapi import HostLease
from orchestrator.engine.ports import RolloutPart
from orchestrator.engine.store.leases import Claimed
from orchestrator.engine.store.postgres import PostgresStore
from orchestrator.engine.store.protocol import CardRecord, is_rollout_lease, rollout_lease
from orchestrator.errors import FleetReplaced, LeaseLost, ReplicaNameInUse, StoreUnavailable


class Replica:
    """engine/ports.py ``ReplicaPart``: runs the supervisors of the hosts this replica
    holds (``hosts``: every host of the plan); ``recount`` tells the engine its cards
    changed other than by a transition (taken over, shown from the store)."""

    def __init__(self, hosts: Sequence[HostSupervisor], ctx: EngineContext,
                 recount: Callable[[], None], store: PostgresStore, *, fleet: str = "",
                 rollouts: Sequence[RolloutPart] = ()) -> None:
        """``fleet``: the digest of this replica's plan, the store's fleet's when it
        started; if another replica replaces it on purpose, this one stops.
        ``rollouts``: the rollouts in progress (the fleet's, or each deployment's),
        which every replica follows and the holder of each one's lease leads
        (docs/replicas.md "Rollouts")."""
        self.fleet = fleet
        self.rollouts = {rollout_lease(r.deployment): r for r in rollouts}
        self._leading: dict[str, anyio.CancelScope] = {}   # by the rollout's lease
        self.ctx = ctx
        self.recount = recount
        self.store = store
        self.name = store.replica
        self.period = store.lease_ttl / 3
        self.hosts = {host.name: host for host in hosts}
        self.running: dict[str, tuple[anyio.CancelScope, anyio.Event]] = {}
        self.epochs: dict[str, int] = {}   # the epoch each host was last claimed at
        self.reachable = True
        self.alive = 1
        # After the store comes back: the replicas alive before the outage, counted
        # until this (monotonic) time, so that the first to reconnect does not claim
        # everyone's hosts and hand them back a moment later (docs/replicas.md).
        self._known_alive, self._grace_until = 1, 0.0
        self._tg: TaskGroup | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await self._cycle()
                task_status.started()
                while True:
                    await anyio.sleep(self.period)
                    await self._cycle()
        finally:
            # A clean stop: every supervisor has stopped (rolled back what was in
            # flight) with this task group; now hand their hosts back at once.
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.store.lease_ttl):
                for name in list(self.store.fences):
                    with contextlib.suppress(StoreUnavailable):
                        await self.store.release(name)
                        self._announce(name, "handed back", reason="clean stop")
                with contextlib.suppress(StoreUnavailable):
                    await self.store.stop()

    async def _cycle(self) -> None:
        names = sorted(self.hosts)
        try:
            self.alive = await self.store.heartbeat(names + list(self.rollouts))
            await self._same_fleet()
            if not self.reachable:   # back: the others get one lease TTL to come back too
                self._grace_until = time.monotonic() + self.store.lease_ttl
            if time.monotonic() < self._grace_until:
                counted = max(self.alive, self._known_alive)
            else:
                counted = self._known_alive = self.alive
            for name in await self.store.renew():
                self._drop(name, LeaseLost(name, "not renewed: expired or taken over"))
            share = math.ceil(len(names) / max(1, counted))
            held = [name for name in names if name in self.running]
            for name in held[share:]:
                await self._hand_back(name)
            if len(held) < share:
                free = [name for name in names if name not in self.running]
                for claimed in await self.store.claim(free, share - len(held)):
                    self._start(claimed)
            await self._mirror()
            cordons = await self.store.cordons()
            for name, host in self.hosts.items():
                host.cordon(cordons.get(name))
            await self._rollout_cycle()
            if not self.reachable:
                self.reachable = True
                self.ctx.emit(StoreStatus(replica=self.name, reachable=True))
        except ReplicaNameInUse:
            raise  # a configuration error, not an outage: this replica must not run
        except StoreUnavailable as err:
            if self.reachable:
                self.reachable = False
                self.ctx.emit(StoreStatus(replica=self.name, reachable=False,
                                          reason=err.problem))
            # Leases lapse here before they do in the database: stop what has lapsed.
            for name, fence in list(self.store.fences.items()):
                if fence.remaining() <= 0:
                    self._drop(name, LeaseLost(name, f"expired: {err.problem}"))
        except FleetReplaced:
            raise  # on purpose, by another replica: this one stops
        except Exception as exc:  # a bug: logged; the next cycle starts over  # noqa: BLE001
            self.ctx.internal_error(f"replica {self.name}", exc)

    async def _same_fleet(self) -> None:
        """FleetReplaced if the store's fleet now runs another plan than this replica's
        (recorded by a replica started with --replace-fleet): this one stops, handing
        its hosts back, and the replica with the new plan takes them."""
        recorded = await self.store.fleet_plan() if self.fleet else None
        if recorded is not None and recorded.digest != self.fleet:
            raise FleetReplaced(f"the fleet's plan was replaced by replica {recorded.replica} "
                                f"({recorded.what}): this replica's plan is no longer the "
                                "fleet's; it stops (start it again with that plan)")

    # --- starting and stopping supervisors --------------------------------------------

    def _start(self, claimed: Claimed) -> None:
        host = self.hosts[claimed.host]
        host.claim(HostLease(self.name, claimed.epoch, self._gate(claimed.host)))
        self.epochs[claimed.host] = claimed.epoch
        self.recount()
        action = "took over" if claimed.previous_owner not in ("", self.name) else "claimed"
        self._announce(claimed.host, action, epoch=claimed.epoch,
                       previous_owner=claimed.previous_owner)
        scope, done = anyio.CancelScope(), anyio.Event()
        self.running[claimed.host] = (scope, done)
        assert self._tg is not None  # noqa: S101 - started inside run()
        self._tg.start_soon(self._hold, host, scope, done)

    async def _hold(self, host: HostSupervisor, scope: anyio.CancelScope,
                    done: anyio.Event) -> None:
        try:
            with scope:
                await host.give_up_strays()
                await host.run()
        finally:
            self.running.pop(host.name, None)
            done.set()
            if host.lease_lost is not None:
                self.store.fences.pop(host.name, None)
                host.release()
                self._announce(host.name, "lost", reason=str(host.lease_lost))
            self.recount()

    def _drop(self, name: str, lost: LeaseLost) -> None:
        """Fenced: stop at once, without a call to the host's cards (the rollout's
        lease: stop leading it, without one more write)."""
        if is_rollout_lease(name):
            if (leading := self._leading.get(name)) is not None:
                leading.cancel()
                self._announce(name, "lost", reason=str(lost))
            return
        if name in self.running:
            self.hosts[name].fence(lost)

    async def _hand_back(self, name: str) -> None:
        """Above the fair share: stop cleanly (in-flight work rolled back), then free it.
        A host whose supervisor stopped meanwhile (its lease lost while another host
        was being handed back) has nothing left to hand back."""
        running = self.running.get(name)
        if running is None:
            return
        scope, done = running
        scope.cancel()
        await done.wait()
        await self.store.release(name)
        self.hosts[name].release()
        self._announce(name, "handed back", reason=f"fair share of {self.alive} replicas")

    def _gate(self, name: str) -> Callable[[], float]:
        fences = self.store.fences

        def remaining() -> float:
            fence = fences.get(name)
            left = fence.remaining() if fence is not None else 0.0
            if left <= 0:
                raise LeaseLost(name, "expired here" if fence else "not held")
            return left
        return remaining

    # --- the rollout (docs/replicas.md "Rollouts") ----------------------------------------

    async def _rollout_cycle(self) -> None:
        """Follow each rollout as the store says; lead one whose lease is free."""
        for lease, rollout in self.rollouts.items():
            await rollout.follow()
            if lease in self._leading or rollout.ended:
                continue
            for claimed in await self.store.claim([lease], 1):
                scope = self._leading[lease] = anyio.CancelScope()
                self.epochs[lease] = claimed.epoch
                self._announce(lease, "took over" if claimed.previous_owner not in
                               ("", self.name) else "claimed", epoch=claimed.epoch,
                               previous_owner=claimed.previous_owner)
                assert self._tg is not None  # noqa: S101 - started inside run()
                self._tg.start_soon(self._lead, rollout, lease, scope)

    async def _lead(self, rollout: RolloutPart, lease: str, scope: anyio.CancelScope) -> None:
        try:
            with scope:
                await rollout.lead(self.name)
        except (LeaseLost, StoreUnavailable) as lost:   # another leads now, or will
            self.store.fences.pop(lease, None)
            self._announce(lease, "lost", reason=str(lost))
        except Exception as exc:  # a bug: logged; this replica leads no more  # noqa: BLE001
            self.store.fences.pop(lease, None)
            self._announce(lease, "lost", reason=self.ctx.internal_error(
                f"replica {self.name} leading the rollout", exc))
        finally:
            self._leading.pop(lease, None)
            if rollout.ended and lease in self.store.fences:
                with anyio.CancelScope(shield=True), contextlib.suppress(StoreUnavailable):
                    await self.store.release(lease)
                    self._announce(lease, "handed back", reason="the rollout ended")

    # --- what others drive -------------------------------------------------------------

    async def _mirror(self) -> None:
        others = {name for name in self.hosts if name not in self.running}
        if not others:
            return
        records = {r.host: r for r in await self.store.hosts() if r.host in others}
        cards: dict[str, list[CardRecord]] = {}
        for card in await self.store.cards():
            cards.setdefault(card.host, []).append(card)
        for name, record in records.items():
            self.hosts[name].mirror(record, cards.get(name, []))
        self.recount()

    def _announce(self, host: str, action: str, *, epoch: int = 0, previous_owner: str = "",
                  reason: str = "") -> None:
        self.ctx.stats.lease_changes[action] += 1
        self.ctx.emit(LeaseChanged(
            host=host, replica=self.name, action=action,
            epoch=epoch or self.epochs.get(host, 0), previous_owner=previous_owner,
            reason=reason))


__all__ = ["Replica"]
