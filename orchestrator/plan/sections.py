"""Reading a plan's sections (model, mek, fleet, policy): each checked as it is read, every
problem at its file, line and field."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from orchestrator.crypto.custody import DEFAULT_PIN_ENV, TokenSpec
from orchestrator.errors import FormatError
from orchestrator.limits import MAX_CARDS_PER_HOST, MAX_DEVICE, MAX_HOSTS
from orchestrator.plan.paths import PACKAGE_SCHEME, is_loopback, package_path
from orchestrator.plan.reader import (
    Problem,
    Reader,
    cards_per_host,
    host_count,
    non_negative,
    partition_count,
    positive,
    probability,
    version_number,
)
from orchestrator.plan.specs import (
    EmulatedSpec,
    HostSpec,
    MEKSpec,
    ModelSpec,
    PolicySpec,
    TLSSpec,
)


def plan_path(base: Path, text: str, reader: Reader, key: str, *, must_exist: bool = True
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


def read_model(reader: Reader, base: Path) -> ModelSpec:
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
    qpc_path = plan_path(base, qpc, reader, "qpc") if qpc else None
    onnx_file = plan_path(base, onnx_path, reader, "onnx") if onnx_path else None
    default_id = (qpc_path or onnx_file or Path("model")).stem
    version = reader.get("version", int, 1, check=version_number)
    spec = ModelSpec(
        qpc=qpc_path, onnx=onnx_file, partitions=partitions, balance=balance,
        model_id=reader.get("id", str, default_id),
        version=version,
        rollback_floor=reader.get("rollback_floor", int, version, check=version_number),
        expires=expiry,
        min_firmware=str(reader.get("min_firmware", (str, int, float), "",
                                    check=_dotted_version)),
    )
    reader.done()
    return spec


def read_mek(reader: Reader, base: Path) -> MEKSpec:
    file = reader.get("file", str)
    generate = reader.get("generate", bool, False)
    sealed = reader.get("sealed", str)
    if [file is not None, generate, sealed is not None].count(True) != 1:
        raise Problem(reader.node.line, "mek",
                       "give exactly one of file, generate: true or sealed (with pkcs11)")
    token = None
    if (p11 := reader.child("pkcs11")) is not None:
        module = p11.get("module", str, required=True)
        plan_path(base, module, p11, "module")  # must exist
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
    spec = MEKSpec(plan_path(base, file, reader, "file") if file else None, generate,
                   plan_path(base, sealed, reader, "sealed") if sealed else None, token)
    reader.done()
    return spec


def read_fleet(reader: Reader, base: Path) -> tuple[tuple[HostSpec, ...], EmulatedSpec | None]:
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
            tls = TLSSpec(*(plan_path(base, v, tls_reader, k) if (v := tls_reader.get(k, str))
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
        labels: dict[str, str] = {}
        if (label_reader := host.child("labels")) is not None:
            for key in list(label_reader.items):
                labels[key] = label_reader.get(key, str)
            label_reader.done()
        hosts.append(HostSpec(address, devices, tls, insecure, labels))
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


def _dotted_version(value: object) -> str | None:
    from orchestrator.crypto.evidence import parse_version

    try:
        parse_version(str(value))
    except FormatError:
        return f"{str(value)!r} is not a version of dotted numbers (\"1.2\")"
    return None


def read_policy(reader: Reader) -> PolicySpec:
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
        min_firmware=str(reader.get("min_firmware", (str, int, float), "",
                                    check=_dotted_version)),
        measurements=measurements,
        cards=reader.list_of("cards", str),
        kems=kems,
        max_age=float(reader.get("max_age", (int, float), 120.0, check=positive)),
    )
    reader.done()
    return spec
