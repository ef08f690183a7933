"""The one exception tree of modelip.

Every error a user can cause ends in one of these; the CLI prints ``str(err)``
(one line naming the thing and the problem) and exits with ``exit_code``.
"""

from __future__ import annotations

from typing import Self

# Not an error: the exit code of a deploy or watch whose rollout was rolled back
# (a failed gate, or `modelip rollout undo`); the fleet serves the previous version.
ROLLED_BACK_EXIT = 6


class ModelIPError(Exception):
    """Root of every error modelip raises on purpose.

    ``host``, ``device`` and ``card_id`` say where it happened when that is
    known; decisions (which card to quarantine) use them, never the text.
    """

    exit_code = 1
    host: str | None = None
    device: int | None = None
    card_id: str | None = None

    def located(self, *, host: str | None = None, device: int | None = None,
                card_id: str | None = None) -> Self:
        """Attach where the error happened (keeps what is already known)."""
        self.host = self.host if host is None else host
        self.device = self.device if device is None else device
        self.card_id = self.card_id if card_id is None else card_id
        return self


# --- bad input -------------------------------------------------------------


class InputError(ModelIPError):
    """The user gave us something we cannot use (file, flag, plan, format)."""

    exit_code = 2


class UsageError(InputError):
    """Flags that do not fit together."""


class FileInputError(InputError):
    """A named file is missing, unreadable, or would be overwritten."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


class MEKError(InputError):
    """A model encryption key file is not a 128-bit key."""


class ClaimedError(InputError):
    """The host says another fleet holds the card (docs/protocol.md "Claims"): no
    retry changes that; `deploy|watch --take-over` takes it on purpose."""


class FormatError(InputError):
    """A container, evidence or wrapped-MEK file is malformed."""

    def __init__(self, what: str, problem: str) -> None:
        super().__init__(f"{what}: {problem}")
        self.what = what
        self.problem = problem


class PlanError(InputError):
    """A deployment plan is invalid; says file, line and field."""

    def __init__(self, file: str, line: int | None, field: str, problem: str) -> None:
        where = f"{file}:{line}" if line is not None else file
        prefix = f"{where}: {field}: " if field else f"{where}: "
        super().__init__(prefix + problem)
        self.file = file
        self.line = line
        self.field = field
        self.problem = problem


# --- verification (security verdicts) --------------------------------------


class VerificationError(ModelIPError):
    """Something failed a cryptographic or policy check: never retried."""

    exit_code = 3


class AttestationError(VerificationError):
    """Evidence does not prove what it claims (chain, signature, nonce, age)."""


class PolicyError(VerificationError):
    """Evidence is genuine but the card or model is outside policy."""


class IntegrityError(VerificationError):
    """Ciphertext, encryption info or a key slot was altered or truncated."""


class SessionInvalidError(VerificationError):
    """A key slot is not for this card's current session (stale or foreign)."""


class CustodyError(VerificationError):
    """The key's custodian refused: wrong PIN, no such token or KEK, a blob sealed by
    another KEK or altered."""


class WrongMEKError(VerificationError):
    """The MEK given is not the one the container was encrypted with."""


# --- transport --------------------------------------------------------------


class TransportError(ModelIPError):
    """Talking to a host failed; may be retried."""

    exit_code = 4

    def __init__(self, target: str, problem: str) -> None:
        super().__init__(f"{target}: {problem}")
        self.target = target
        self.problem = problem


class UnreachableError(TransportError):
    """The host does not answer (connection refused, DNS, TLS)."""


class DeadlineError(TransportError):
    """A call did not finish within its deadline."""


class RemoteError(TransportError):
    """The host answered with an error we do not map more precisely."""


class NotFoundError(InputError):
    """A named card, program or group does not exist on the host."""


class ProgramNotStaged(NotFoundError):
    """The host does not hold the encrypted body (say it restarted): stage it again.
    The engine never takes this as final."""


# --- state ------------------------------------------------------------------


class StateError(ModelIPError):
    """An impossible state change was attempted."""

    exit_code = 5


class InvalidTransition(StateError):
    """A state machine (a card's, a host's, a rollout's) was asked for a move its table
    does not allow. ``subject`` names the machine ("card host0/1", "rollout 3")."""

    def __init__(self, subject: str, current: str, target: str) -> None:
        super().__init__(f"{subject}: cannot move from {current} to {target}")
        self.subject = subject
        self.current = current
        self.target = target


class ProgramNotLoaded(StateError):
    """Execute or unload on a card that holds no program."""


class StateDirError(StateError):
    """The state directory (journal, caches, lock) cannot be used: read-only, full,
    deleted under a running engine, or held by another orchestrator."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


class StoreUnavailable(StateDirError):
    """The shared store (PostgreSQL) cannot be reached or refuses us."""


class FleetReplaced(UsageError):
    """Another replica replaced the shared fleet's plan on purpose (--replace-fleet):
    this replica's plan is no longer the fleet's, and it stops (docs/replicas.md)."""


class ReplicaNameInUse(StoreUnavailable):
    """Another live process is this replica (same --replica NAME): never retried."""


class LeaseLost(Exception):  # noqa: N818 - a condition of a replica, not a user's error
    """This replica no longer holds a host's lease (expired, or taken over): it must
    not write about that host or call its cards. Contained to that host; never
    reaches the command line."""

    def __init__(self, host: str, why: str) -> None:
        super().__init__(f"host {host}: lease lost ({why})")
        self.host = host


class CardOffline(ModelIPError):  # noqa: N818 - a state, named as the host reports it
    """A card's own word (card side, behind a host): it is rebooting and answers nothing."""

    exit_code = 4


class PermissionDenied(ModelIPError):  # noqa: N818 - as gRPC names it
    """The caller's role does not allow what it asked (the control API's roles)."""

    exit_code = 3


class DeviceOffline(TransportError):
    """The card is rebooting; try again after it is back online."""


class ProtocolViolation(TransportError):
    """A host sent something the protocol does not allow (an undefined enum value,
    a card it does not have, an absurd counter): counted against that host."""
