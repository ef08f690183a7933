from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HostRef(_message.Message):
    __slots__ = ("host",)
    HOST_FIELD_NUMBER: _ClassVar[int]
    host: str
    def __init__(self, host: _Optional[str] = ...) -> None: ...

class CardRef(_message.Message):
    __slots__ = ("host", "device")
    HOST_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    host: str
    device: int
    def __init__(self, host: _Optional[str] = ..., device: _Optional[int] = ...) -> None: ...

class RolloutCommandRequest(_message.Message):
    __slots__ = ("action", "deployment")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[RolloutCommandRequest.Action]
        PAUSE: _ClassVar[RolloutCommandRequest.Action]
        RESUME: _ClassVar[RolloutCommandRequest.Action]
        UNDO: _ClassVar[RolloutCommandRequest.Action]
        APPROVE: _ClassVar[RolloutCommandRequest.Action]
    ACTION_UNSPECIFIED: RolloutCommandRequest.Action
    PAUSE: RolloutCommandRequest.Action
    RESUME: RolloutCommandRequest.Action
    UNDO: RolloutCommandRequest.Action
    APPROVE: RolloutCommandRequest.Action
    ACTION_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    action: RolloutCommandRequest.Action
    deployment: str
    def __init__(self, action: _Optional[_Union[RolloutCommandRequest.Action, str]] = ..., deployment: _Optional[str] = ...) -> None: ...

class CommandResponse(_message.Message):
    __slots__ = ("said", "rollout", "written")
    SAID_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    said: str
    rollout: int
    written: bool
    def __init__(self, said: _Optional[str] = ..., rollout: _Optional[int] = ..., written: _Optional[bool] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("who", "role", "command", "outcome")
    WHO_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    who: str
    role: str
    command: str
    outcome: str
    def __init__(self, who: _Optional[str] = ..., role: _Optional[str] = ..., command: _Optional[str] = ..., outcome: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Card(_message.Message):
    __slots__ = ("host", "device", "card_id", "state", "boot_counter", "session_id", "program_id", "reason", "attempts", "previous")
    HOST_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CARD_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BOOT_COUNTER_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    host: str
    device: int
    card_id: str
    state: str
    boot_counter: int
    session_id: str
    program_id: str
    reason: str
    attempts: int
    previous: str
    def __init__(self, host: _Optional[str] = ..., device: _Optional[int] = ..., card_id: _Optional[str] = ..., state: _Optional[str] = ..., boot_counter: _Optional[int] = ..., session_id: _Optional[str] = ..., program_id: _Optional[str] = ..., reason: _Optional[str] = ..., attempts: _Optional[int] = ..., previous: _Optional[str] = ...) -> None: ...

class Host(_message.Message):
    __slots__ = ("host", "state", "reason", "previous", "cordoned_by")
    HOST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    CORDONED_BY_FIELD_NUMBER: _ClassVar[int]
    host: str
    state: str
    reason: str
    previous: str
    cordoned_by: str
    def __init__(self, host: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., previous: _Optional[str] = ..., cordoned_by: _Optional[str] = ...) -> None: ...

class RolloutStep(_message.Message):
    __slots__ = ("rollout", "wave", "phase", "what", "deployment")
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    WAVE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    WHAT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    rollout: int
    wave: int
    phase: str
    what: str
    deployment: str
    def __init__(self, rollout: _Optional[int] = ..., wave: _Optional[int] = ..., phase: _Optional[str] = ..., what: _Optional[str] = ..., deployment: _Optional[str] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("revision", "hosts", "cards")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    CARDS_FIELD_NUMBER: _ClassVar[int]
    revision: int
    hosts: _containers.RepeatedCompositeFieldContainer[Host]
    cards: _containers.RepeatedCompositeFieldContainer[Card]
    def __init__(self, revision: _Optional[int] = ..., hosts: _Optional[_Iterable[_Union[Host, _Mapping]]] = ..., cards: _Optional[_Iterable[_Union[Card, _Mapping]]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("since",)
    SINCE_FIELD_NUMBER: _ClassVar[int]
    since: int
    def __init__(self, since: _Optional[int] = ...) -> None: ...

class ChangeBatch(_message.Message):
    __slots__ = ("changes",)
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[Change]
    def __init__(self, changes: _Optional[_Iterable[_Union[Change, _Mapping]]] = ...) -> None: ...

class Change(_message.Message):
    __slots__ = ("revision", "type", "ts", "card", "host", "rollout", "command")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[Change.Type]
        CARD: _ClassVar[Change.Type]
        HOST: _ClassVar[Change.Type]
        ROLLOUT: _ClassVar[Change.Type]
        BOOKMARK: _ClassVar[Change.Type]
        SNAPSHOT_END: _ClassVar[Change.Type]
        COMMAND: _ClassVar[Change.Type]
    TYPE_UNSPECIFIED: Change.Type
    CARD: Change.Type
    HOST: Change.Type
    ROLLOUT: Change.Type
    BOOKMARK: Change.Type
    SNAPSHOT_END: Change.Type
    COMMAND: Change.Type
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    CARD_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    revision: int
    type: Change.Type
    ts: float
    card: Card
    host: Host
    rollout: RolloutStep
    command: Command
    def __init__(self, revision: _Optional[int] = ..., type: _Optional[_Union[Change.Type, str]] = ..., ts: _Optional[float] = ..., card: _Optional[_Union[Card, _Mapping]] = ..., host: _Optional[_Union[Host, _Mapping]] = ..., rollout: _Optional[_Union[RolloutStep, _Mapping]] = ..., command: _Optional[_Union[Command, _Mapping]] = ...) -> None: ...
