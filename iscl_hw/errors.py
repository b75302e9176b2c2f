"""Typed errors of the ISCL engine.

Protocol errors follow h11: :class:`LocalProtocolError` means this side
misused the API or refused something by its own policy,
:class:`RemoteProtocolError` means the peer sent something wrong.  Each
carries the ISCL error code (100..115) it maps to.

No error message ever contains key material, a PIN or decrypted payload.
"""

from __future__ import annotations

from iscl_hw.constants import ErrorCode

__all__ = [
    "AuthenticationBlocked",
    "AuthenticationError",
    "CardBusy",
    "CardCommunicationError",
    "CardError",
    "CardRemoved",
    "ConfigError",
    "ConnectionLost",
    "IntegrityError",
    "IsclError",
    "KeyFileError",
    "LineClosed",
    "LocalProtocolError",
    "PeerAuthenticationFailed",
    "PeerNeverSpoke",
    "PeerRefusedClose",
    "PeerRejectedAuthentication",
    "PeerTimeout",
    "PinRefused",
    "ProtocolError",
    "RemoteProtocolError",
    "StatusWordError",
    "TransmissionRefused",
    "VerificationFailed",
    "WrongCardAnswer",
]


class IsclError(Exception):
    """Base of every error raised by this package."""

    code: ErrorCode | None = None

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        text = super().__str__()
        if self.code is None:
            return text
        return f"{text} (ISCL error {self.code.value} {self.code.name})"


class ProtocolError(IsclError):
    """The ISCL conversation went wrong; use a subclass."""

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError")
        super().__init__(message, code)


class LocalProtocolError(ProtocolError):
    """This side misused the API, or its own policy refused the peer."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed, unexpected or out of phase."""


class IntegrityError(RemoteProtocolError):
    """A message failed its MAC or padding check; nothing of it is delivered.

    The wire never shows which of the two failed (both close the line at
    once); ``code`` keeps the local diagnosis.
    """


class ConnectionLost(RemoteProtocolError):
    """The transport ended before the ISCL conversation did."""


class PeerNeverSpoke(ConnectionLost):
    """A server's peer closed or went silent before sending one ISCL frame:
    a port probe or a health check, not a failed authentication, so neither
    the failure limit nor the audit trail counts it."""


class PeerTimeout(ConnectionLost):
    """The peer did not answer within the time allowed for the phase."""


class LineClosed(IsclError):
    """The line was closed by line disconnection; no message is left."""


class TransmissionRefused(IsclError):
    """The receiver answered a transmission request with NAK.

    The line stays open.  ``peer_max_length`` is the receiver's maximum
    message length when it refused for length.
    """

    def __init__(
        self, message: str, code: ErrorCode, peer_max_length: int | None = None
    ) -> None:
        super().__init__(message, code)
        self.peer_max_length = peer_max_length


class PeerRefusedClose(IsclError):
    """The peer answered the line disconnection request with NAK."""

    code = ErrorCode.PEER_REFUSE_CLOSE


class AuthenticationError(IsclError):
    """Mutual authentication failed; the connection is closed."""


class PeerAuthenticationFailed(AuthenticationError):
    """The peer's answer to our challenge was wrong."""

    code = ErrorCode.REMOTE_ICCARD


class PeerRejectedAuthentication(AuthenticationError):
    """The peer says our answer to its challenge was wrong (it sent NAK)."""

    code = ErrorCode.RECEIVED_NAK


class ConfigError(IsclError):
    """A setting, key file or card file is invalid."""


class KeyFileError(ConfigError):
    """A key file or card file cannot be read, is malformed or is unsafe."""


class CardError(IsclError):
    """The local IC card (or its emulation) failed."""

    code = ErrorCode.LOCAL_ICCARD


class CardBusy(CardError):
    """The card stayed held by other handshakes past the wait bound."""


class CardCommunicationError(CardError):
    """The APDU exchange itself failed (malformed response, transport)."""


class CardRemoved(CardCommunicationError):
    """The card went away mid-command; its authentication state is gone."""


class WrongCardAnswer(CardError):
    """A card answered with data of the wrong size or shape."""


class StatusWordError(CardError):
    """The card answered with a status word other than 9000.

    ``sw1`` and ``sw2`` keep the raw status word.
    """

    def __init__(self, message: str, sw1: int, sw2: int) -> None:
        super().__init__(f"{message} (SW {sw1:02X}{sw2:02X})")
        self.sw1 = sw1
        self.sw2 = sw2

    @property
    def sw(self) -> int:
        return (self.sw1 << 8) | self.sw2


class AuthenticationBlocked(StatusWordError):
    """The key's retry counter reached zero (SW 6983)."""


class VerificationFailed(StatusWordError):
    """EXTERNAL AUTHENTICATE or VERIFY failed (SW 63Cx or 6300).

    ``retries_left`` is x of 63Cx, or None for 6300.
    """

    def __init__(self, message: str, sw1: int, sw2: int) -> None:
        super().__init__(message, sw1, sw2)
        self.retries_left: int | None = sw2 & 0x0F if sw2 & 0xF0 == 0xC0 else None


class PinRefused(VerificationFailed):
    """The card refused the PIN (VERIFY) and counted a try; a card backend
    does not send that PIN again."""
