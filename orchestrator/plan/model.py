"""Deployment plans (YAML): one frozen configuration, built and validated once.

Every validation error names the file, the line and the field, e.g.
``plans/x.yaml:12: fleet.hosts[1].devices: must be a list of card numbers``.
docs/plans.md documents every key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import PlanError
from orchestrator.plan.api import ApiSpec, read_api
from orchestrator.plan.deployments import (
    DeploymentSpec,
    check_fit,
    inventory,
    read_deployments,
    tightened,
)
from orchestrator.plan.reader import (
    Node,
    Problem,
    Reader,
    lease_ttl,
    non_negative,
    positive,
    read_document,
)
from orchestrator.plan.rollout import RolloutSpec, read_rollout
from orchestrator.plan.sections import plan_path, read_fleet, read_mek, read_model, read_policy
from orchestrator.plan.specs import (
    EmulatedSpec,
    HostSpec,
    MEKSpec,
    ModelSpec,
    PolicySpec,
    RekeySpec,
    ReplicaSpec,
    RetrySpec,
    TimeoutSpec,
)
from orchestrator.plan.storeurl import store_url_problem, store_url_warning

_NOT_WITH_DEPLOYMENTS = {
    "model": "with deployments: each deployment has its model (deployments[i].model)",
    "mek": "with deployments: each deployment has its MEK (deployments[i].mek), its own key "
           "domain",
    "groups": "with deployments: each deployment says how many groups it runs "
              "(deployments[i].groups); a group's size is its model's partitions",
    "rollout": "with deployments: each deployment has its rollout (deployments[i].rollout)",
}


@dataclass(frozen=True, slots=True)
class Plan:
    """A validated deployment plan. Paths are absolute (relative to the plan file)."""

    source: Path
    model: ModelSpec
    mek: MEKSpec
    hosts: tuple[HostSpec, ...]
    emulated: EmulatedSpec | None
    trust_roots: tuple[Path, ...]
    policy: PolicySpec
    group_size: int
    concurrency: int
    retry: RetrySpec
    rekey: RekeySpec
    timeouts: TimeoutSpec
    state_dir: Path
    store: str = ""               # "" the embedded SQLite journal; postgresql://... shared
    replicas: ReplicaSpec = ReplicaSpec()
    rollout: RolloutSpec | None = None   # None: a new version replaces the old at once
    api: ApiSpec | None = None    # the control API (docs/api.md); None: not served
    # Several models on the fleet (docs/deployments.md); () for a plan with one top-level
    # model. With deployments, ``model``, ``mek`` and ``group_size`` are the first one's
    # (the engine reads each deployment's own).
    deployments: tuple[DeploymentSpec, ...] = ()

    @property
    def shared(self) -> bool:
        return bool(self.store)

    def warnings(self) -> list[str]:
        """What the plan allows on purpose but an operator should see said aloud."""
        said = [f"WARNING: {self.source}: host {h.address}: insecure: true, gRPC in "
                "plaintext across the network (the host's network sees every request)"
                for h in self.hosts if h.insecure and not h.loopback]
        said += [f"WARNING: {self.source}: host {h.address}: tls without ca trusts every "
                 "public certificate authority to vouch for the host; give tls.ca (the "
                 "hosts' own CA)"
                 for h in self.hosts if h.tls is not None and h.tls.ca is None
                 and not h.loopback]
        if (store_warning := store_url_warning(self.store)) is not None:
            said.append(f"{store_warning} ({self.source})")
        if self.model.rollback_floor < self.model.version:
            said.append(f"WARNING: {self.source}: model.rollback_floor "
                        f"{self.model.rollback_floor} is below model.version "
                        f"{self.model.version}: cards will accept older versions of "
                        f"{self.model.model_id!r}")
        return said

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read and validate a plan; PlanError (file:line: field: problem) if invalid."""
        source = Path(path)
        root = read_document(source, "plan")
        try:
            return cls.from_dict(root, source)
        except Problem as problem:
            raise PlanError(str(source), problem.line, problem.field_name,
                            problem.problem) from None

    @classmethod
    def from_dict(cls, node: Node, source: Path) -> Plan:
        base = source.resolve().parent
        top = Reader(node, "")
        deployments = read_deployments(top, base)
        if deployments:
            for key in _NOT_WITH_DEPLOYMENTS:
                if top.has(key):
                    raise Problem(top.items[key][1], key, _NOT_WITH_DEPLOYMENTS[key])
            model, mek = deployments[0].model, deployments[0].mek
        else:
            model = read_model(top.child("model", required=True), base)  # type: ignore[arg-type]
            mek = read_mek(top.child("mek", required=True), base)  # type: ignore[arg-type]
        fleet = top.child("fleet", required=True)
        assert fleet is not None  # noqa: S101 - required above
        hosts, emulated = read_fleet(fleet, base)
        trust = top.child("trust")
        roots: tuple[Path, ...] = ()
        policy = PolicySpec()
        if trust is not None:
            roots = tuple(plan_path(base, p, trust, "roots")
                          for p in trust.list_of("roots", str))
            policy_reader = trust.child("policy")
            if policy_reader is not None:
                policy = read_policy(policy_reader)
            trust.done()
        if emulated is None and not roots:
            raise Problem(fleet.node.line, "trust.roots",
                           "real hosts need at least one vendor root certificate")
        deployments = tightened(deployments, policy)
        group_size = model.partitions
        groups = top.child("groups")
        if groups is not None:
            group_size = groups.get("size", int, model.partitions, check=positive)
            groups.done()
            if group_size != model.partitions:
                raise Problem(groups.node.line, "groups.size",
                               f"must equal model.partitions ({model.partitions}): one card "
                               "per partition")
        concurrency = top.get("concurrency", int, 1024, check=positive)
        retry = RetrySpec()
        if (reader := top.child("retry")) is not None:
            retry = RetrySpec(reader.get("attempts", int, 5, check=positive),
                              float(reader.get("backoff", (int, float), 0.2, check=positive)),
                              float(reader.get("max_backoff", (int, float), 5.0,
                                               check=positive)))
            reader.done()
        rekey = RekeySpec()
        if (reader := top.child("rekey")) is not None:
            rekey = RekeySpec(reader.get("auto", bool, True),
                              float(reader.get("min_interval", (int, float), 1.0,
                                               check=non_negative)),
                              float(reader.get("check_interval", (int, float), 5.0,
                                               check=non_negative)),
                              float(reader.get("resync_interval", (int, float), 1.0,
                                               check=positive)),
                              float(reader.get("probe_timeout", (int, float), 2.0,
                                               check=positive)))
            reader.done()
        timeouts = TimeoutSpec()
        if (reader := top.child("timeouts")) is not None:
            timeouts = TimeoutSpec(
                float(reader.get("rpc", (int, float), 10.0, check=positive)),
                float(reader.get("load", (int, float), 120.0, check=positive)),
                float(reader.get("card", (int, float), 300.0, check=positive)),
                float(reader.get("failover", (int, float), 60.0, check=non_negative)))
            reader.done()
        state_dir = plan_path(base, top.get("state_dir", str, f"state/{source.stem}"), top,
                          "state_dir", must_exist=False)
        store = top.get("store", str, "", check=store_url_problem)
        store = "" if store == "sqlite" else store
        replicas = ReplicaSpec()
        if (reader := top.child("replicas")) is not None:
            replicas = ReplicaSpec(float(reader.get("lease_ttl", (int, float), 10.0,
                                                    check=lease_ttl)))
            reader.done()
        rollout = None
        if (reader := top.child("rollout")) is not None:
            rollout = read_rollout(reader,
                                   lambda r, key: plan_path(base, r.get(key, str), r, key))
        api = None
        if (reader := top.child("api")) is not None:
            api = read_api(reader, lambda r, key: plan_path(
                base, r.get(key, str, required=True), r, key))
        top.done()
        plan = cls(source, model, mek, hosts, emulated, roots, policy, group_size, concurrency,
                   retry, rekey, timeouts, state_dir, store, replicas, rollout, api,
                   deployments)
        if store and emulated is not None:
            raise Problem(fleet.node.line, "fleet.emulated",
                           "replicas share real hosts: an embedded emulated fleet is one "
                           "process's own (run `modelip emulate` and list its hosts)")
        if deployments:
            check_fit(deployments, inventory(hosts, emulated))
        else:
            plan._check_groups(fleet)
        return plan

    def of_deployment(self, deployment: DeploymentSpec) -> Plan:
        """The plan as one deployment's: its model, MEK and rollout, its own state
        subdirectory (its generated MEK, its cache), so no two deployments ever share a
        key."""
        return dataclasses.replace(
            self, model=deployment.model, mek=deployment.mek, rollout=deployment.rollout,
            group_size=deployment.model.partitions, deployments=(),
            state_dir=self.state_dir / "deployments" / deployment.name)

    def _check_groups(self, fleet: Reader) -> None:
        for index, host in enumerate(self.hosts):
            if len(host.devices) % self.group_size:
                raise Problem(fleet.node.line, f"fleet.hosts[{index}].devices",
                               f"{len(host.devices)} cards do not split into MDP groups of "
                               f"{self.group_size} (model.partitions: one card per "
                               "partition, and a group stays on one host)")
        if self.emulated and self.emulated.devices_per_host % self.group_size:
            raise Problem(fleet.node.line, "fleet.emulated.devices_per_host",
                           f"{self.emulated.devices_per_host} cards do not split into MDP "
                           f"groups of {self.group_size} (model.partitions: one card per "
                           "partition, and a group stays on one host)")

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal.sqlite"


