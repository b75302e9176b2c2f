"""The IC-card interface ISCL authenticates with, and an APDU implementation.

:class:`Card` is the three ISO/IEC 7816-4 operations the mutual
authentication needs.  :class:`ApduCard` implements them by sending APDUs
over any :class:`ApduTransport` (a PC/SC reader, or :class:`softcard.
emulator.SoftCard` in process).
"""

from __future__ import annotations

import abc
import logging
from types import TracebackType
from typing import Final

from iscl_hw import apdu
from iscl_hw.apdu import SW_NO_PIN, CommandApdu, ResponseApdu
from iscl_hw.constants import CHALLENGE_LENGTH, KEY_INDEXES, ErrorCode
from iscl_hw.errors import (
    AuthenticationBlocked,
    CardError,
    LocalProtocolError,
    PinRefused,
    StatusWordError,
    VerificationFailed,
)
from iscl_hw.transport import DEFAULT_MAX_ROUNDS, ApduLink, RawTransport

__all__ = ["ISCL_AID", "ApduCard", "ApduTransport", "Card"]

_log = logging.getLogger(__name__)

#: Application identifier of the ISCL card application.  Our choice: the
#: ISCL standard publishes no AID, so this is a proprietary AID (ISO/IEC
#: 7816-4 8.2.1.2: first nibble F, no registered RID) made of ``F0``,
#: ASCII ``iscl`` (``69 73 63 6C``) and the version ``00 01``.
ISCL_AID: Final = bytes.fromhex("F06973636C0001")

#: Carries one raw command APDU to a card and returns the raw response.
ApduTransport = RawTransport


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

    def for_connection(self) -> Card:
        """The card one connection uses: this card, by default.

        A card that keeps each connection's challenge on the host (a PKCS#11
        token) returns a fresh view, so its handshakes need no shared span.
        """
        return self

    def begin_span(self) -> None:
        """The span from GET CHALLENGE to EXTERNAL AUTHENTICATE begins.

        :class:`~iscl_hw.arbiter.CardArbiter` calls it before the span's
        GET CHALLENGE; a card shared with other processes takes an exclusive
        hold here (a PC/SC transaction).  No-op by default.
        """
        return

    def end_span(self) -> None:
        """The span ends (the arbiter released it); must not raise.  No-op
        by default."""
        return

    def __enter__(self) -> Card:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


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
    sent as P2 = *n* with P1 = 00.  Card quirks (61xx, 6Cxx, extended
    length, short answers) are handled by :class:`~iscl_hw.transport.
    ApduLink`; ``extended_length`` says whether the card announced extended
    Lc/Le.  ``close()`` also closes the transport when it has a ``close``
    method.
    """

    def __init__(
        self,
        transport: ApduTransport,
        *,
        aid: bytes = ISCL_AID,
        pin: bytes | None = None,
        name: str = "card",
        extended_length: bool = False,
        max_rounds: int = DEFAULT_MAX_ROUNDS,
        allow_last_pin_try: bool = False,
    ) -> None:
        self.name = name
        self._transport = transport
        self._link = ApduLink(
            transport,
            name=name,
            extended_length=extended_length,
            max_rounds=max_rounds,
            trace_logger=_log,
        )
        self._closed = False
        apdu.parse_select_resp(self._exchange(apdu.gen_select_aid_apdu(aid), "SELECT"))
        if pin is not None:
            self._check_pin_tries(allow_last_pin_try)
            self._verify(pin)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<ApduCard {self.name!r} {state}>"

    @property
    def link(self) -> ApduLink:
        """The quirk layer this card's commands go through."""
        return self._link

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

    def _verify(self, pin: bytes) -> None:
        resp = self._exchange(apdu.gen_verify_apdu(pin), "VERIFY")
        try:
            apdu.parse_verify_resp(resp)
        except AuthenticationBlocked:
            raise
        except VerificationFailed as exc:
            raise PinRefused(
                f"card {self.name!r}: VERIFY refused the PIN, "
                f"{apdu.sw_meaning(exc.sw1, exc.sw2)}",
                exc.sw1,
                exc.sw2,
            ) from None

    def _check_pin_tries(self, allow_last: bool) -> None:
        """Refuse to spend the card's last PIN try: a wrong PIN file read at
        every restart (a service manager restarting us) would block the card.

        A card that does not report its tries (no 63Cx to VERIFY without
        data) is verified as before.
        """
        resp = self._exchange(apdu.gen_verify_status_apdu(), "VERIFY (tries left)")
        try:
            apdu.parse_verify_resp(resp)
        except AuthenticationBlocked:
            raise
        except VerificationFailed as exc:
            if exc.retries_left == 1 and not allow_last:
                raise VerificationFailed(
                    f"card {self.name!r} has one PIN try left; iscl does not "
                    "spend the last one (verify the PIN with the card "
                    "issuer's tool)",
                    exc.sw1,
                    exc.sw2,
                ) from None
        except StatusWordError as exc:
            if exc.sw == SW_NO_PIN:
                raise CardError(
                    f"card {self.name!r} has no PIN, but a PIN was given; it is "
                    "not sent (remove the PIN source, or check the card)"
                ) from None
            return

    def _exchange(self, command: CommandApdu, name: str) -> ResponseApdu:
        """Send ``command`` through the quirk layer; return the last answer."""
        if self._closed:
            raise LocalProtocolError(f"{name}: card {self.name!r} is closed")
        return self._link.exchange(command, name)
