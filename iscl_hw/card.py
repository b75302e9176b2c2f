"""The IC-card interface ISCL authenticates with, and an APDU implementation.

:class:`Card` is the three ISO/IEC 7816-4 operations the mutual
authentication needs.  :class:`ApduCard` implements them by sending APDUs
over any :class:`ApduTransport` (a PC/SC reader, or :class:`softcard.
emulator.SoftCard` in process).
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import time
from types import TracebackType
from typing import Final, Protocol

from iscl_hw import apdu
from iscl_hw.apdu import CommandApdu, ResponseApdu
from iscl_hw.constants import CHALLENGE_LENGTH, KEY_INDEXES, ErrorCode
from iscl_hw.errors import (
    CardCommunicationError,
    IsclError,
    LocalProtocolError,
)

__all__ = ["ISCL_AID", "ApduCard", "ApduTransport", "Card"]

_log = logging.getLogger(__name__)

#: Application identifier of the ISCL card application.  Our choice: the
#: ISCL standard publishes no AID, so this is a proprietary AID (ISO/IEC
#: 7816-4 8.2.1.2: first nibble F, no registered RID) made of ``F0``,
#: ASCII ``iscl`` (``69 73 63 6C``) and the version ``00 01``.
ISCL_AID: Final = bytes.fromhex("F06973636C0001")

# Bound on 61xx / 6Cxx follow-ups for one command, so a card that keeps
# asking for GET RESPONSE cannot hold the caller forever.
_MAX_FOLLOW_UPS: Final = 16


class Card(abc.ABC):
    """One IC card: the three ISO/IEC 7816-4 operations ISCL needs."""

    name: str

    @abc.abstractmethod
    def get_challenge(self) -> bytes:
        """Return a fresh 8-byte challenge the card keeps as its last one."""

    @abc.abstractmethod
    def internal_authenticate(self, key_ref: int, challenge: bytes) -> bytes:
        """Return the card's 8-byte answer to ``challenge`` with key ``key_ref``."""

    @abc.abstractmethod
    def external_authenticate(self, key_ref: int, response: bytes) -> None:
        """Have the card check ``response`` to its last challenge.

        Raises :class:`~iscl_hw.errors.VerificationFailed`,
        :class:`~iscl_hw.errors.AuthenticationBlocked` or
        :class:`~iscl_hw.errors.StatusWordError` when the card refuses.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release the card; later calls raise."""

    def __enter__(self) -> Card:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ApduTransport(Protocol):
    """Carries one raw command APDU to a card and returns the raw response."""

    def transmit(self, command: bytes) -> bytes: ...


def check_key_ref(key_ref: int) -> None:
    """Refuse an ISCL key index outside 1..8."""
    if isinstance(key_ref, bool) or not isinstance(key_ref, int):
        raise LocalProtocolError("key reference must be an int")
    if key_ref not in KEY_INDEXES:
        raise LocalProtocolError(
            f"key reference must be 1..8, got {key_ref}", ErrorCode.LOCAL_ICCARD
        )


def check_block(name: str, value: bytes) -> None:
    """Refuse a challenge or response that is not 8 bytes."""
    if not isinstance(value, bytes):
        raise LocalProtocolError(f"{name} must be bytes")
    if len(value) != CHALLENGE_LENGTH:
        raise LocalProtocolError(
            f"{name} must be {CHALLENGE_LENGTH} bytes, got {len(value)}",
            ErrorCode.LOCAL_ICCARD,
        )


class ApduCard(Card):
    """A :class:`Card` that speaks ISO/IEC 7816-4 APDUs over a transport.

    The constructor SELECTs the ISCL application by AID and, if ``pin`` is
    given, VERIFYs it; the PIN is not kept.  ISCL key index *n* (1..8) is
    sent as P2 = *n* with P1 = 00.  A 61xx answer is followed by GET
    RESPONSE and a 6Cxx answer by one re-send with the Le the card asked
    for (ISO/IEC 7816-3 T=0 conventions).  ``close()`` also closes the
    transport when it has a ``close`` method.
    """

    def __init__(
        self,
        transport: ApduTransport,
        *,
        aid: bytes = ISCL_AID,
        pin: bytes | None = None,
        name: str = "card",
    ) -> None:
        self.name = name
        self._transport = transport
        self._closed = False
        apdu.parse_select_resp(self._exchange(apdu.gen_select_aid_apdu(aid), "SELECT"))
        if pin is not None:
            resp = self._exchange(apdu.gen_verify_apdu(pin), "VERIFY")
            apdu.parse_verify_resp(resp)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<ApduCard {self.name!r} {state}>"

    def get_challenge(self) -> bytes:
        command = apdu.gen_get_challenge_apdu(CHALLENGE_LENGTH)
        resp = self._exchange(command, "GET CHALLENGE")
        return apdu.parse_get_challenge_resp(resp, CHALLENGE_LENGTH)

    def internal_authenticate(self, key_ref: int, challenge: bytes) -> bytes:
        check_key_ref(key_ref)
        check_block("challenge", challenge)
        command = apdu.gen_internal_authenticate_apdu(
            key_ref, challenge, CHALLENGE_LENGTH
        )
        resp = self._exchange(command, "INTERNAL AUTHENTICATE")
        return apdu.parse_internal_authenticate_resp(resp, CHALLENGE_LENGTH)

    def external_authenticate(self, key_ref: int, response: bytes) -> None:
        check_key_ref(key_ref)
        check_block("response", response)
        command = apdu.gen_external_authenticate_apdu(key_ref, response)
        resp = self._exchange(command, "EXTERNAL AUTHENTICATE")
        apdu.parse_external_authenticate_resp(resp)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        close = getattr(self._transport, "close", None)
        if callable(close):
            close()

    def _exchange(self, command: CommandApdu, name: str) -> ResponseApdu:
        """Send ``command``, following 61xx and 6Cxx; return the last answer."""
        if self._closed:
            raise LocalProtocolError(f"{name}: card {self.name!r} is closed")
        resp = self._transmit(command)
        data = b""
        for _ in range(_MAX_FOLLOW_UPS):
            if resp.sw1 == 0x6C:
                resp = self._transmit(dataclasses.replace(command, le=resp.sw2 or 256))
            elif resp.sw1 == 0x61:
                data += resp.data
                resp = self._transmit(apdu.gen_get_response_apdu(resp.sw2 or 256))
            else:
                return ResponseApdu(data + resp.data, resp.sw1, resp.sw2)
        raise CardCommunicationError(
            f"{name}: card {self.name!r} kept asking for GET RESPONSE"
        )

    def _transmit(self, command: CommandApdu) -> ResponseApdu:
        raw = command.encode()
        tracing = _log.isEnabledFor(logging.DEBUG)
        if tracing:
            _log.debug("%s > %s", self.name, apdu.format_apdu_for_trace(raw))
        start = time.perf_counter()
        try:
            answer = self._transport.transmit(raw)
        except IsclError:
            raise
        except OSError as exc:
            raise CardCommunicationError(
                f"card {self.name!r}: transport failed: {exc.strerror or exc}"
            ) from exc
        elapsed_ms = (time.perf_counter() - start) * 1000
        if tracing:
            _log.debug(
                "%s < %s (%.1f ms)",
                self.name,
                apdu.format_response_for_trace(answer),
                elapsed_ms,
            )
        return ResponseApdu.parse(answer)
