"""Events the protocol core hands to its driver, and its sentinels.

Events are frozen dataclasses (h11 style).  Those carrying message data show
only its length in their repr: DICOM messages carry patient data.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from iscl_hw.constants import EncryptionMethod, ErrorCode, MacMethod

__all__ = [
    "AWAITING_CARD",
    "NEED_DATA",
    "Authenticated",
    "CardOperation",
    "CardRequest",
    "CloseRefused",
    "ConnectionClosed",
    "Event",
    "LineConnected",
    "MessageReceived",
    "MessageSent",
    "SendRefused",
    "Sentinel",
    "ThroughModeReceived",
]


class Sentinel(enum.Enum):
    """Values :meth:`Connection.next_event` returns when it has no event."""

    NEED_DATA = "need data"
    AWAITING_CARD = "awaiting card"


NEED_DATA = Sentinel.NEED_DATA
AWAITING_CARD = Sentinel.AWAITING_CARD


class CardOperation(enum.Enum):
    """The three ISO 7816-4 operations ISCL authentication runs on a card."""

    GET_CHALLENGE = "GET CHALLENGE"
    INTERNAL_AUTHENTICATE = "INTERNAL AUTHENTICATE"
    EXTERNAL_AUTHENTICATE = "EXTERNAL AUTHENTICATE"


@dataclass(frozen=True, slots=True)
class CardRequest:
    """Run ``operation`` on the local card and answer with
    :meth:`Connection.card_answer` or :meth:`Connection.card_failed`.

    ``data`` is the challenge (INTERNAL AUTHENTICATE) or the peer's answer
    (EXTERNAL AUTHENTICATE); both travel in the clear on the wire.

    ``ahead`` marks work asked for while the peer works on our last pass:
    nothing waits for its answer until the peer's next pass arrives, so a
    driver may let other work run meanwhile.
    """

    operation: CardOperation
    key_ref: int = 0
    data: bytes = b""
    ahead: bool = False


@dataclass(frozen=True, slots=True)
class LineConnected:
    block_length: int
    peer_version: int


@dataclass(frozen=True, slots=True)
class Authenticated:
    """Mutual authentication succeeded: the secure link is ready."""

    key_index: int
    peer_auth_data: bytes


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A whole secured message whose MAC (if any) has been checked."""

    data: bytes = field(repr=False)
    encryption: EncryptionMethod
    mac: MacMethod
    key_index: int

    def __repr__(self) -> str:
        return (
            f"MessageReceived(<{len(self.data)} bytes>, {self.encryption.name}, "
            f"{self.mac.name}, key_index=0x{self.key_index:X})"
        )


@dataclass(frozen=True, slots=True)
class ThroughModeReceived:
    """An unsecured (through mode) message: no integrity, no privacy."""

    data: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"ThroughModeReceived(<{len(self.data)} bytes>)"


@dataclass(frozen=True, slots=True)
class MessageSent:
    """Message ``send_id`` is accepted by the peer and fully queued."""

    send_id: int
    length: int


@dataclass(frozen=True, slots=True)
class SendRefused:
    """The peer answered NAK to the transmission of ``send_id``; the line
    stays open.  ``peer_max_length`` is set for a length refusal."""

    send_id: int
    code: ErrorCode
    peer_max_length: int | None


@dataclass(frozen=True, slots=True)
class CloseRefused:
    """The peer answered NAK to our line disconnection request."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """Line disconnection completed; ``by_peer`` if the peer asked for it."""

    by_peer: bool


Event = (
    CardRequest
    | LineConnected
    | Authenticated
    | MessageReceived
    | ThroughModeReceived
    | MessageSent
    | SendRefused
    | CloseRefused
    | ConnectionClosed
)
