from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Measurement(_message.Message):
    __slots__ = ("name", "digest")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    digest: bytes
    def __init__(self, name: _Optional[str] = ..., digest: _Optional[bytes] = ...) -> None: ...

class ReportBody(_message.Message):
    __slots__ = ("report_version", "card_id", "serial", "sku", "firmware_version", "measurements", "boot_counter", "session_id", "session_kem", "session_public_key", "request_digest", "issued_at", "loaded")
    REPORT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CARD_ID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    SKU_FIELD_NUMBER: _ClassVar[int]
    FIRMWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    BOOT_COUNTER_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEM_FIELD_NUMBER: _ClassVar[int]
    SESSION_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    report_version: int
    card_id: str
    serial: str
    sku: str
    firmware_version: str
    measurements: _containers.RepeatedCompositeFieldContainer[Measurement]
    boot_counter: int
    session_id: bytes
    session_kem: str
    session_public_key: bytes
    request_digest: bytes
    issued_at: int
    loaded: LoadedProgram
    def __init__(self, report_version: _Optional[int] = ..., card_id: _Optional[str] = ..., serial: _Optional[str] = ..., sku: _Optional[str] = ..., firmware_version: _Optional[str] = ..., measurements: _Optional[_Iterable[_Union[Measurement, _Mapping]]] = ..., boot_counter: _Optional[int] = ..., session_id: _Optional[bytes] = ..., session_kem: _Optional[str] = ..., session_public_key: _Optional[bytes] = ..., request_digest: _Optional[bytes] = ..., issued_at: _Optional[int] = ..., loaded: _Optional[_Union[LoadedProgram, _Mapping]] = ...) -> None: ...

class LoadedProgram(_message.Message):
    __slots__ = ("program_info_digest", "model_id", "model_version", "partition", "program_id")
    PROGRAM_INFO_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_ID_FIELD_NUMBER: _ClassVar[int]
    program_info_digest: bytes
    model_id: str
    model_version: int
    partition: int
    program_id: str
    def __init__(self, program_info_digest: _Optional[bytes] = ..., model_id: _Optional[str] = ..., model_version: _Optional[int] = ..., partition: _Optional[int] = ..., program_id: _Optional[str] = ...) -> None: ...

class AttestationEvidence(_message.Message):
    __slots__ = ("body", "signature", "certificate_chain")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_CHAIN_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signature: bytes
    certificate_chain: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, body: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., certificate_chain: _Optional[_Iterable[bytes]] = ...) -> None: ...

class EncryptionInfo(_message.Message):
    __slots__ = ("format_version", "aead", "kdf", "salt", "chunk_size", "model_id", "model_version", "mek_check", "policy", "segments", "partition", "partition_count", "parent_salt", "container_minor", "compression")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    AEAD_FIELD_NUMBER: _ClassVar[int]
    KDF_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MEK_CHECK_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    PARTITION_COUNT_FIELD_NUMBER: _ClassVar[int]
    PARENT_SALT_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_MINOR_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    aead: str
    kdf: str
    salt: bytes
    chunk_size: int
    model_id: str
    model_version: int
    mek_check: bytes
    policy: Policy
    segments: _containers.RepeatedCompositeFieldContainer[SegmentInfo]
    partition: int
    partition_count: int
    parent_salt: bytes
    container_minor: int
    compression: int
    def __init__(self, format_version: _Optional[int] = ..., aead: _Optional[str] = ..., kdf: _Optional[str] = ..., salt: _Optional[bytes] = ..., chunk_size: _Optional[int] = ..., model_id: _Optional[str] = ..., model_version: _Optional[int] = ..., mek_check: _Optional[bytes] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ..., segments: _Optional[_Iterable[_Union[SegmentInfo, _Mapping]]] = ..., partition: _Optional[int] = ..., partition_count: _Optional[int] = ..., parent_salt: _Optional[bytes] = ..., container_minor: _Optional[int] = ..., compression: _Optional[int] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("not_after", "min_firmware", "rollback_floor")
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    MIN_FIRMWARE_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FLOOR_FIELD_NUMBER: _ClassVar[int]
    not_after: int
    min_firmware: str
    rollback_floor: int
    def __init__(self, not_after: _Optional[int] = ..., min_firmware: _Optional[str] = ..., rollback_floor: _Optional[int] = ...) -> None: ...

class SegmentInfo(_message.Message):
    __slots__ = ("name", "encrypted", "plaintext_size", "stream_index", "plaintext_sha256", "nested", "offset", "nested_size", "nested_info_sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_FIELD_NUMBER: _ClassVar[int]
    PLAINTEXT_SIZE_FIELD_NUMBER: _ClassVar[int]
    STREAM_INDEX_FIELD_NUMBER: _ClassVar[int]
    PLAINTEXT_SHA256_FIELD_NUMBER: _ClassVar[int]
    NESTED_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NESTED_SIZE_FIELD_NUMBER: _ClassVar[int]
    NESTED_INFO_SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    encrypted: bool
    plaintext_size: int
    stream_index: int
    plaintext_sha256: bytes
    nested: bool
    offset: int
    nested_size: int
    nested_info_sha256: bytes
    def __init__(self, name: _Optional[str] = ..., encrypted: _Optional[bool] = ..., plaintext_size: _Optional[int] = ..., stream_index: _Optional[int] = ..., plaintext_sha256: _Optional[bytes] = ..., nested: _Optional[bool] = ..., offset: _Optional[int] = ..., nested_size: _Optional[int] = ..., nested_info_sha256: _Optional[bytes] = ...) -> None: ...

class KeySlot(_message.Message):
    __slots__ = ("slot", "card_id", "session_id", "kem", "enc", "wrapped_mek", "program_info_digest")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    CARD_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEM_FIELD_NUMBER: _ClassVar[int]
    ENC_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_MEK_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_INFO_DIGEST_FIELD_NUMBER: _ClassVar[int]
    slot: int
    card_id: str
    session_id: bytes
    kem: str
    enc: bytes
    wrapped_mek: bytes
    program_info_digest: bytes
    def __init__(self, slot: _Optional[int] = ..., card_id: _Optional[str] = ..., session_id: _Optional[bytes] = ..., kem: _Optional[str] = ..., enc: _Optional[bytes] = ..., wrapped_mek: _Optional[bytes] = ..., program_info_digest: _Optional[bytes] = ...) -> None: ...

class KeySlotTable(_message.Message):
    __slots__ = ("format_version", "slots")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    slots: _containers.RepeatedCompositeFieldContainer[KeySlot]
    def __init__(self, format_version: _Optional[int] = ..., slots: _Optional[_Iterable[_Union[KeySlot, _Mapping]]] = ...) -> None: ...

class LoadReceipt(_message.Message):
    __slots__ = ("card_id", "session_id", "boot_counter", "program_info_digest", "partition", "model_id", "model_version", "verified", "rollback_floor", "key_slot_digest")
    CARD_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BOOT_COUNTER_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_INFO_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FLOOR_FIELD_NUMBER: _ClassVar[int]
    KEY_SLOT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    card_id: str
    session_id: bytes
    boot_counter: int
    program_info_digest: bytes
    partition: int
    model_id: str
    model_version: int
    verified: bool
    rollback_floor: int
    key_slot_digest: bytes
    def __init__(self, card_id: _Optional[str] = ..., session_id: _Optional[bytes] = ..., boot_counter: _Optional[int] = ..., program_info_digest: _Optional[bytes] = ..., partition: _Optional[int] = ..., model_id: _Optional[str] = ..., model_version: _Optional[int] = ..., verified: _Optional[bool] = ..., rollback_floor: _Optional[int] = ..., key_slot_digest: _Optional[bytes] = ...) -> None: ...
