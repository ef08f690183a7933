from orchestrator._proto.modelip.v1 import evidence_pb2 as _evidence_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    ERROR_REASON_SESSION_INVALID: _ClassVar[ErrorReason]
    ERROR_REASON_INTEGRITY: _ClassVar[ErrorReason]
    ERROR_REASON_POLICY: _ClassVar[ErrorReason]
    ERROR_REASON_NOT_LOADED: _ClassVar[ErrorReason]
    ERROR_REASON_OFFLINE: _ClassVar[ErrorReason]
    ERROR_REASON_UNKNOWN_DEVICE: _ClassVar[ErrorReason]
    ERROR_REASON_UNKNOWN_PROGRAM: _ClassVar[ErrorReason]
    ERROR_REASON_FORMAT: _ClassVar[ErrorReason]
    ERROR_REASON_INTERNAL: _ClassVar[ErrorReason]
    ERROR_REASON_FENCED: _ClassVar[ErrorReason]
    ERROR_REASON_CLAIMED: _ClassVar[ErrorReason]

class DeviceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEVICE_STATE_UNSPECIFIED: _ClassVar[DeviceState]
    DEVICE_STATE_ONLINE: _ClassVar[DeviceState]
    DEVICE_STATE_OFFLINE: _ClassVar[DeviceState]
    DEVICE_STATE_LOADED: _ClassVar[DeviceState]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_ONLINE: _ClassVar[EventKind]
    EVENT_KIND_OFFLINE: _ClassVar[EventKind]
    EVENT_KIND_RESET: _ClassVar[EventKind]
    EVENT_KIND_LOADED: _ClassVar[EventKind]
    EVENT_KIND_UNLOADED: _ClassVar[EventKind]
ERROR_REASON_UNSPECIFIED: ErrorReason
ERROR_REASON_SESSION_INVALID: ErrorReason
ERROR_REASON_INTEGRITY: ErrorReason
ERROR_REASON_POLICY: ErrorReason
ERROR_REASON_NOT_LOADED: ErrorReason
ERROR_REASON_OFFLINE: ErrorReason
ERROR_REASON_UNKNOWN_DEVICE: ErrorReason
ERROR_REASON_UNKNOWN_PROGRAM: ErrorReason
ERROR_REASON_FORMAT: ErrorReason
ERROR_REASON_INTERNAL: ErrorReason
ERROR_REASON_FENCED: ErrorReason
ERROR_REASON_CLAIMED: ErrorReason
DEVICE_STATE_UNSPECIFIED: DeviceState
DEVICE_STATE_ONLINE: DeviceState
DEVICE_STATE_OFFLINE: DeviceState
DEVICE_STATE_LOADED: DeviceState
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_ONLINE: EventKind
EVENT_KIND_OFFLINE: EventKind
EVENT_KIND_RESET: EventKind
EVENT_KIND_LOADED: EventKind
EVENT_KIND_UNLOADED: EventKind

class AttestationRequest(_message.Message):
    __slots__ = ("device", "request")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    device: int
    request: bytes
    def __init__(self, device: _Optional[int] = ..., request: _Optional[bytes] = ...) -> None: ...

class AttestationBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[AttestationRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[AttestationRequest, _Mapping]]] = ...) -> None: ...

class CardError(_message.Message):
    __slots__ = ("status", "reason", "message")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    status: int
    reason: ErrorReason
    message: str
    def __init__(self, status: _Optional[int] = ..., reason: _Optional[_Union[ErrorReason, str]] = ..., message: _Optional[str] = ...) -> None: ...

class AttestationResult(_message.Message):
    __slots__ = ("evidence", "error")
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    evidence: bytes
    error: CardError
    def __init__(self, evidence: _Optional[bytes] = ..., error: _Optional[_Union[CardError, _Mapping]] = ...) -> None: ...

class AttestationBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[AttestationResult]
    def __init__(self, results: _Optional[_Iterable[_Union[AttestationResult, _Mapping]]] = ...) -> None: ...

class DeviceRef(_message.Message):
    __slots__ = ("device",)
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    device: int
    def __init__(self, device: _Optional[int] = ...) -> None: ...

class ListDevicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("device", "card_id", "state", "boot_counter", "session_fingerprint", "program_id", "partition", "program_ready", "session_id", "claimed_by")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CARD_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BOOT_COUNTER_FIELD_NUMBER: _ClassVar[int]
    SESSION_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_ID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_READY_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_BY_FIELD_NUMBER: _ClassVar[int]
    device: int
    card_id: str
    state: DeviceState
    boot_counter: int
    session_fingerprint: bytes
    program_id: str
    partition: int
    program_ready: bool
    session_id: bytes
    claimed_by: str
    def __init__(self, device: _Optional[int] = ..., card_id: _Optional[str] = ..., state: _Optional[_Union[DeviceState, str]] = ..., boot_counter: _Optional[int] = ..., session_fingerprint: _Optional[bytes] = ..., program_id: _Optional[str] = ..., partition: _Optional[int] = ..., program_ready: _Optional[bool] = ..., session_id: _Optional[bytes] = ..., claimed_by: _Optional[str] = ...) -> None: ...

class ListDevicesResponse(_message.Message):
    __slots__ = ("devices",)
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceInfo]
    def __init__(self, devices: _Optional[_Iterable[_Union[DeviceInfo, _Mapping]]] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeviceEvent(_message.Message):
    __slots__ = ("device", "kind", "boot_counter", "time_ns")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BOOT_COUNTER_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    device: int
    kind: EventKind
    boot_counter: int
    time_ns: int
    def __init__(self, device: _Optional[int] = ..., kind: _Optional[_Union[EventKind, str]] = ..., boot_counter: _Optional[int] = ..., time_ns: _Optional[int] = ...) -> None: ...

class DeviceEventBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[DeviceEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[DeviceEvent, _Mapping]]] = ...) -> None: ...

class ResetDeviceResponse(_message.Message):
    __slots__ = ("taken_from",)
    TAKEN_FROM_FIELD_NUMBER: _ClassVar[int]
    taken_from: str
    def __init__(self, taken_from: _Optional[str] = ...) -> None: ...

class StageChunk(_message.Message):
    __slots__ = ("program_id", "total_size", "data")
    PROGRAM_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    program_id: str
    total_size: int
    data: bytes
    def __init__(self, program_id: _Optional[str] = ..., total_size: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class StageProgramResponse(_message.Message):
    __slots__ = ("program_id", "already_staged")
    PROGRAM_ID_FIELD_NUMBER: _ClassVar[int]
    ALREADY_STAGED_FIELD_NUMBER: _ClassVar[int]
    program_id: str
    already_staged: bool
    def __init__(self, program_id: _Optional[str] = ..., already_staged: _Optional[bool] = ...) -> None: ...

class LoadProgramRequest(_message.Message):
    __slots__ = ("device", "program_id", "partition", "key_slots")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_ID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    KEY_SLOTS_FIELD_NUMBER: _ClassVar[int]
    device: int
    program_id: str
    partition: int
    key_slots: _evidence_pb2.KeySlotTable
    def __init__(self, device: _Optional[int] = ..., program_id: _Optional[str] = ..., partition: _Optional[int] = ..., key_slots: _Optional[_Union[_evidence_pb2.KeySlotTable, _Mapping]] = ...) -> None: ...

class LoadProgramResponse(_message.Message):
    __slots__ = ("segments", "receipt", "receipt_signature", "taken_from")
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    TAKEN_FROM_FIELD_NUMBER: _ClassVar[int]
    segments: _containers.RepeatedScalarFieldContainer[str]
    receipt: bytes
    receipt_signature: bytes
    taken_from: str
    def __init__(self, segments: _Optional[_Iterable[str]] = ..., receipt: _Optional[bytes] = ..., receipt_signature: _Optional[bytes] = ..., taken_from: _Optional[str] = ...) -> None: ...

class LoadProgramBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[LoadProgramRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[LoadProgramRequest, _Mapping]]] = ...) -> None: ...

class LoadProgramResult(_message.Message):
    __slots__ = ("loaded", "error")
    LOADED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    loaded: LoadProgramResponse
    error: CardError
    def __init__(self, loaded: _Optional[_Union[LoadProgramResponse, _Mapping]] = ..., error: _Optional[_Union[CardError, _Mapping]] = ...) -> None: ...

class LoadProgramBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[LoadProgramResult]
    def __init__(self, results: _Optional[_Iterable[_Union[LoadProgramResult, _Mapping]]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("devices", "inputs")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedScalarFieldContainer[int]
    inputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, devices: _Optional[_Iterable[int]] = ..., inputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class ExecuteResponse(_message.Message):
    __slots__ = ("outputs",)
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, outputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class UnloadResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HostStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HostStatsResponse(_message.Message):
    __slots__ = ("stage_count", "load_count", "staged_programs", "fenced_refusals", "claimed_refusals", "takeovers")
    STAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    LOAD_COUNT_FIELD_NUMBER: _ClassVar[int]
    STAGED_PROGRAMS_FIELD_NUMBER: _ClassVar[int]
    FENCED_REFUSALS_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_REFUSALS_FIELD_NUMBER: _ClassVar[int]
    TAKEOVERS_FIELD_NUMBER: _ClassVar[int]
    stage_count: int
    load_count: int
    staged_programs: int
    fenced_refusals: int
    claimed_refusals: int
    takeovers: int
    def __init__(self, stage_count: _Optional[int] = ..., load_count: _Optional[int] = ..., staged_programs: _Optional[int] = ..., fenced_refusals: _Optional[int] = ..., claimed_refusals: _Optional[int] = ..., takeovers: _Optional[int] = ...) -> None: ...
