"""Deployment plans (YAML): one frozen configuration, built and validated once.

Every validation error names the file, the line and the field, e.g.
``plans/x.yaml:12: fleet.hosts[1].devices: must be a list of card numbers``.
docs/plans.md documents every key.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from orchestrator.crypto.custody import DEFAULT_PIN_ENV, TokenSpec
from orchestrator.errors import FormatError, PlanError
from orchestrator.limits import MAX_CARDS_PER_HOST, MAX_DEVICE, MAX_HOSTS
from orchestrator.plan.paths import PACKAGE_SCHEME, is_loopback, package_path
from orchestrator.plan.reader import (
    Node,
    Problem,
    Reader,
    annotate,
    cards_per_host,
    host_count,
    lease_ttl,
    non_negative,
    partition_count,
    positive,
    probability,
    version_number,
)
from orchestrator.plan.rollout import RolloutSpec, read_rollout
from orchestrator.plan.storeurl import store_url_problem, store_url_warning

MAX_PLAN_BYTES = 1 << 20
ROLLOUT_NOT_SHARED = ("a rollout is driven by one orchestrator on the embedded journal; "
                      "not yet with a shared store (docs/rollouts.md)")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    qpc: Path | None
    onnx: Path | None
    partitions: int
    balance: str
    model_id: str
    version: int
    rollback_floor: int
    expires: int
    min_firmware: str


@dataclass(frozen=True, slots=True)
class MEKSpec:
    file: Path | None
    generate: bool
    sealed: Path | None = None
    pkcs11: TokenSpec | None = None


@dataclass(frozen=True, slots=True)
class TLSSpec:
    ca: Path | None
    cert: Path | None
    key: Path | None


@dataclass(frozen=True, slots=True)
class HostSpec:
    address: str
    devices: tuple[int, ...]
    tls: TLSSpec | None
    insecure: bool = False  # plaintext gRPC to a host that is not loopback, on purpose

    @property
    def loopback(self) -> bool:
        return is_loopback(self.address)


@dataclass(frozen=True, slots=True)
class EmulatedSpec:
    hosts: int
    devices_per_host: int
    reset_rate: float = 0.0
    reboot_time: float = 0.2
    attest_latency: float = 0.0
    drop_events: float = 0.0
    stage_capacity: int = 0       # bytes each host stages at most (0: no limit)
    firmware: str = "1.12.0"
    kem: str = "P256"
    adversary: str = "none"
    adversary_hosts: tuple[int, ...] = ()
    adversary_devices: tuple[int, ...] = ()
    old_firmware_cards: tuple[str, ...] = ()  # "h/d" cards given firmware 0.9.0
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class PolicySpec:
    firmware: tuple[str, ...] = ()
    min_firmware: str = ""
    measurements: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    cards: tuple[str, ...] = ()
    kems: tuple[str, ...] = ("P256", "MLKEM768_X25519")
    max_age: float = 120.0


@dataclass(frozen=True, slots=True)
class RetrySpec:
    attempts: int = 5
    backoff: float = 0.2
    max_backoff: float = 5.0


@dataclass(frozen=True, slots=True)
class RekeySpec:
    auto: bool = True
    min_interval: float = 1.0     # per card: at most one re-key this often (storms)
    check_interval: float = 5.0   # periodic re-attestation of serving cards; 0 = off
    resync_interval: float = 1.0  # per host: list its cards, wake drivers whose card differs
    probe_timeout: float = 2.0    # deadline of that listing; two misses = host unreachable


@dataclass(frozen=True, slots=True)
class TimeoutSpec:
    rpc: float = 10.0
    load: float = 120.0
    card: float = 300.0           # outer limit for one card's attest-wrap-load


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    lease_ttl: float = 10.0       # seconds a host's lease lasts unless renewed (every ttl/3)


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
        try:
            with open(source, "rb") as handle:
                raw = handle.read(MAX_PLAN_BYTES + 1)
            if len(raw) > MAX_PLAN_BYTES:
                raise PlanError(str(source), None, "", f"is larger than {MAX_PLAN_BYTES} "
                                "bytes: not a plan")
            text = raw.decode("utf-8")
        except FileNotFoundError:
            raise PlanError(str(source), None, "", "plan file not found") from None
        except IsADirectoryError:
            raise PlanError(str(source), None, "", "is a directory, not a plan file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PlanError(str(source), None, "", f"cannot read plan: {exc}") from None
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            line = mark.line + 1 if mark else None
            raise PlanError(str(source), line, "", f"not valid YAML: {exc.problem}") from None
        if root is None:
            raise PlanError(str(source), None, "", "plan is empty")
        try:
            return cls.from_dict(annotate(root), source)
        except Problem as problem:
            raise PlanError(str(source), problem.line, problem.field_name,
                            problem.problem) from None

    @classmethod
    def from_dict(cls, node: Node, source: Path) -> Plan:
        base = source.resolve().parent
        top = Reader(node, "")
        model = _model(top.child("model", required=True), base)  # type: ignore[arg-type]
        mek = _mek(top.child("mek", required=True), base)  # type: ignore[arg-type]
        fleet = top.child("fleet", required=True)
        assert fleet is not None  # noqa: S101 - required above
        hosts, emulated = _fleet(fleet, base)
        trust = top.child("trust")
        roots: tuple[Path, ...] = ()
        policy = PolicySpec()
        if trust is not None:
            roots = tuple(_path(base, p, trust, "roots") for p in trust.list_of("roots", str))
            policy_reader = trust.child("policy")
            if policy_reader is not None:
                policy = _policy(policy_reader)
            trust.done()
        if emulated is None and not roots:
            raise Problem(fleet.node.line, "trust.roots",
                           "real hosts need at least one vendor root certificate")
        group_size = model.partitions
        groups = top.child("groups")
        if groups is not None:
            group_size = groups.get("size", int, model.partitions, check=positive)
            groups.done()
            if group_size != model.partitions:
                raise Problem(groups.node.line, "groups.size",
                               f"must equal model.partitions ({model.partitions}): one card "
                               "per partition")
        concurrency = top.get("concurrency", int, 64, check=positive)
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
                float(reader.get("card", (int, float), 300.0, check=positive)))
            reader.done()
        state_dir = _path(base, top.get("state_dir", str, f"state/{source.stem}"), top,
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
            rollout = read_rollout(reader, lambda r, key: _path(base, r.get(key, str), r, key))
        top.done()
        plan = cls(source, model, mek, hosts, emulated, roots, policy, group_size, concurrency,
                   retry, rekey, timeouts, state_dir, store, replicas, rollout)
        if store and emulated is not None:
            raise Problem(fleet.node.line, "fleet.emulated",
                           "replicas share real hosts: an embedded emulated fleet is one "
                           "process's own (run `modelip emulate` and list its hosts)")
        if store and rollout is not None:
            raise Problem(top.items["rollout"][1], "rollout", ROLLOUT_NOT_SHARED)
        plan._check_groups(fleet)
        return plan

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


def _path(base: Path, text: str, reader: Reader, key: str, *, must_exist: bool = True
          ) -> Path:
    line = reader.items[key][1] if key in reader.items else reader.node.line
    if text.startswith(PACKAGE_SCHEME):
        try:
            path = package_path(text)
        except LookupError as err:
            raise Problem(line, reader.field_name(key), str(err)) from None
    else:
        path = (base / text).resolve()
    if must_exist and not path.exists():
        raise Problem(line, reader.field_name(key), f"{text}: file not found")
    if must_exist and path.is_dir():
        raise Problem(line, reader.field_name(key),
                       f"{text}: is a directory, not a file")
    return path


def _model(reader: Reader, base: Path) -> ModelSpec:
    qpc = reader.get("qpc", str)
    onnx_path = reader.get("onnx", str)
    if (qpc is None) == (onnx_path is None):
        raise Problem(reader.node.line, "model", "give exactly one of qpc or onnx")
    partitions = reader.get("partitions", int, 1, check=partition_count)
    if qpc is not None and reader.has("partitions"):
        raise Problem(reader.items["partitions"][1], "model.partitions",
                       "only for onnx models (a QPC's partitions are in the file)")
    balance = reader.get("balance", str, "params",
                         check=lambda v: None if v in ("params", "flops")
                         else "must be params or flops")
    expires = reader.get("expires", (str, dt.date, dt.datetime))
    expiry = 0
    if expires is not None:
        try:
            moment = expires if isinstance(expires, dt.datetime) else (
                dt.datetime.combine(expires, dt.time()) if isinstance(expires, dt.date)
                else dt.datetime.fromisoformat(expires))
        except ValueError:
            raise Problem(reader.items["expires"][1], "model.expires",
                           "must be an ISO date or date-time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
        if moment <= dt.datetime.now(dt.UTC):
            raise Problem(reader.items["expires"][1], "model.expires",
                          f"{moment:%Y-%m-%d %H:%M} UTC has passed: every card would refuse "
                          "the model")
        expiry = int(moment.timestamp())
    qpc_path = _path(base, qpc, reader, "qpc") if qpc else None
    onnx_file = _path(base, onnx_path, reader, "onnx") if onnx_path else None
    default_id = (qpc_path or onnx_file or Path("model")).stem
    version = reader.get("version", int, 1, check=version_number)
    spec = ModelSpec(
        qpc=qpc_path, onnx=onnx_file, partitions=partitions, balance=balance,
        model_id=reader.get("id", str, default_id),
        version=version,
        rollback_floor=reader.get("rollback_floor", int, version, check=version_number),
        expires=expiry,
        min_firmware=str(reader.get("min_firmware", (str, int, float), "")),
    )
    reader.done()
    return spec


def _mek(reader: Reader, base: Path) -> MEKSpec:
    file = reader.get("file", str)
    generate = reader.get("generate", bool, False)
    sealed = reader.get("sealed", str)
    if [file is not None, generate, sealed is not None].count(True) != 1:
        raise Problem(reader.node.line, "mek",
                       "give exactly one of file, generate: true or sealed (with pkcs11)")
    token = None
    if (p11 := reader.child("pkcs11")) is not None:
        module = p11.get("module", str, required=True)
        _path(base, module, p11, "module")  # must exist
        # as written, not resolved: a PKCS#11 library is loaded once per path, and a
        # resolved symlink would be a second load of the same library
        token = TokenSpec(module=str(base / module),
                          token=p11.get("token", str, required=True),
                          kek=p11.get("kek", str, required=True),
                          pin_env=p11.get("pin_env", str, DEFAULT_PIN_ENV))
        p11.done()
    if (sealed is None) != (token is None):
        raise Problem(reader.node.line, "mek.pkcs11" if sealed else "mek.sealed",
                       "a sealed MEK and its pkcs11 token go together")
    spec = MEKSpec(_path(base, file, reader, "file") if file else None, generate,
                   _path(base, sealed, reader, "sealed") if sealed else None, token)
    reader.done()
    return spec


def _fleet(reader: Reader, base: Path) -> tuple[tuple[HostSpec, ...], EmulatedSpec | None]:
    emulated_reader = reader.child("emulated")
    host_nodes = reader.nodes("hosts")
    if (emulated_reader is None) == (not host_nodes):
        raise Problem(reader.node.line, "fleet", "give exactly one of emulated or hosts")
    hosts = []
    seen: dict[str, int] = {}
    if len(host_nodes) > MAX_HOSTS:
        raise Problem(reader.node.line, "fleet.hosts", f"at most {MAX_HOSTS} hosts")
    for index, (node, _) in enumerate(host_nodes):
        host = Reader(node, f"fleet.hosts[{index}]")
        devices = host.list_of("devices", int)
        if not devices:
            raise Problem(node.line, f"fleet.hosts[{index}].devices",
                           "must be a non-empty list of card numbers")
        if len(set(devices)) != len(devices) or min(devices) < 0 \
                or max(devices) > MAX_DEVICE:
            raise Problem(node.line, f"fleet.hosts[{index}].devices",
                           f"card numbers must be distinct, from 0 to {MAX_DEVICE}")
        if len(devices) > MAX_CARDS_PER_HOST:
            raise Problem(node.line, f"fleet.hosts[{index}].devices",
                          f"at most {MAX_CARDS_PER_HOST} cards per host")
        tls = None
        if (tls_reader := host.child("tls")) is not None:
            tls = TLSSpec(*(_path(base, v, tls_reader, k) if (v := tls_reader.get(k, str))
                            else None for k in ("ca", "cert", "key")))
            tls_reader.done()
        address = host.get("address", str, required=True)
        if address in seen:
            raise Problem(node.line, f"fleet.hosts[{index}].address",
                          f"{address} is already fleet.hosts[{seen[address]}]: one entry per "
                          "host (list all its cards there)")
        seen[address] = index
        insecure = host.get("insecure", bool, False)
        if tls is not None and insecure:
            raise Problem(node.line, f"fleet.hosts[{index}]", "give tls or insecure: true, "
                           "not both")
        if tls is None and not insecure and not is_loopback(address):
            raise Problem(node.line, f"fleet.hosts[{index}]",
                           f"{address} is not loopback: give tls: {{ca: ...}} (or "
                           "insecure: true to send gRPC in plaintext across the network)")
        hosts.append(HostSpec(address, devices, tls, insecure))
        host.done()
    emulated = None
    if emulated_reader is not None:
        r = emulated_reader
        emulated = EmulatedSpec(
            hosts=r.get("hosts", int, 1, check=host_count),
            devices_per_host=r.get("devices_per_host", int, 4, check=cards_per_host),
            reset_rate=float(r.get("reset_rate", (int, float), 0.0, check=non_negative)),
            reboot_time=float(r.get("reboot_time", (int, float), 0.2, check=non_negative)),
            attest_latency=float(r.get("attest_latency", (int, float), 0.0,
                                       check=non_negative)),
            drop_events=float(r.get("drop_events", (int, float), 0.0, check=probability)),
            stage_capacity=r.get("stage_capacity", int, 0, check=non_negative),
            firmware=str(r.get("firmware", (str, int, float), "1.12.0")),
            kem=r.get("kem", str, "P256", check=lambda v: None if v.lower() in (
                "p256", "hybrid", "mlkem768_x25519") else "must be P256 or hybrid"),
            adversary=r.get("adversary", str, "none"),
            adversary_hosts=r.list_of("adversary_hosts", int),
            adversary_devices=r.list_of("adversary_devices", int),
            old_firmware_cards=r.list_of("old_firmware_cards", str),
            seed=r.get("seed", int),
        )
        r.done()
    reader.done()
    return tuple(hosts), emulated


def _policy(reader: Reader) -> PolicySpec:
    measurements: dict[str, tuple[str, ...]] = {}
    if (m := reader.child("measurements")) is not None:
        for name in list(m.items):
            measurements[name] = m.list_of(name, str)
        m.done()
    kems = reader.list_of("kems", str, default=("P256", "MLKEM768_X25519"))
    from orchestrator.crypto.wrap import Kem

    for kem in kems:
        try:
            Kem.parse(kem)
        except FormatError:
            raise Problem(reader.items["kems"][1], reader.field_name("kems"),
                           f"unknown KEM {kem!r} (P256, MLKEM768_X25519 or hybrid)") from None
    spec = PolicySpec(
        firmware=tuple(str(v) for v in reader.list_of("firmware", str)),
        min_firmware=str(reader.get("min_firmware", (str, int, float), "")),
        measurements=measurements,
        cards=reader.list_of("cards", str),
        kems=kems,
        max_age=float(reader.get("max_age", (int, float), 120.0, check=positive)),
    )
    reader.done()
    return spec
