"""The APDU quirk layer: one place that knows how cards bend ISO/IEC 7816.

:class:`ApduLink` sits between the card operations (:class:`~iscl_hw.card.
ApduCard`) and a raw transport (a PC/SC reader, the in-process soft card).
It owns every quirk of the exchange:

* 61xx: more data waits; GET RESPONSE with Le = xx (00 means 256) is sent,
  in the clear, until the card answers something else, at most
  ``max_rounds`` times for one command.
* 6Cxx: the Le was wrong; the command is re-sent once with Le = xx.  Only a
  command that has an Le (case 2 or 4) is re-sent; for case 1 and 3 the
  status word is returned as it is.
* Case 3 commands go out without an Le: the layer never adds one.
* Extended length: a command that needs it (data over 255 bytes, Le over
  256, or built extended) is refused before sending unless the card
  announced extended length (:func:`parse_atr`, or the caller says so).
* A response shorter than a status word is a :class:`~iscl_hw.errors.
  CardCommunicationError`.

Every exchange is traced at DEBUG (command, response, status word, time),
with VERIFY data and any data field that may carry a key redacted.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from iscl_hw import apdu
from iscl_hw.apdu import CommandApdu, ResponseApdu
from iscl_hw.errors import CardCommunicationError, IsclError

__all__ = [
    "DEFAULT_MAX_ROUNDS",
    "ApduLink",
    "AtrInfo",
    "ExtendedLengthUnsupported",
    "RawTransport",
    "parse_atr",
]

_log = logging.getLogger(__name__)

#: Bound on GET RESPONSE rounds (and the one 6Cxx re-send) for one command.
DEFAULT_MAX_ROUNDS: Final = 16

_SW1_MORE_DATA: Final = 0x61
_SW1_WRONG_LE: Final = 0x6C

_INS_LABELS: Final = {
    apdu.INS_SELECT: "SELECT",
    apdu.INS_VERIFY: "VERIFY",
    apdu.INS_GET_CHALLENGE: "GET CHALLENGE",
    apdu.INS_INTERNAL_AUTHENTICATE: "INTERNAL AUTHENTICATE",
    apdu.INS_EXTERNAL_AUTHENTICATE: "EXTERNAL AUTHENTICATE",
    apdu.INS_GET_RESPONSE: "GET RESPONSE",
}


class RawTransport(Protocol):
    """Carries one raw command APDU to a card and returns the raw response."""

    def transmit(self, command: bytes) -> bytes: ...


class ExtendedLengthUnsupported(CardCommunicationError):
    """A command needs extended length but the card did not announce it."""


@dataclass(frozen=True)
class AtrInfo:
    """What an ATR (ISO/IEC 7816-3 8.2) says about the card."""

    atr: bytes
    #: Offered protocols in ATR order (T=0 is implied when no TD1 is present).
    protocols: tuple[int, ...]
    historical: bytes
    #: Card capabilities (compact-TLV tag 7, ISO/IEC 7816-4 8.1.1.2.7) say
    #: extended Lc and Le fields are supported.
    extended_length: bool

    @property
    def default_protocol(self) -> int:
        """The card's first offered protocol (ISO/IEC 7816-3 without PPS)."""
        return self.protocols[0]


def _interface_bytes(atr: bytes) -> tuple[tuple[int, ...], int]:
    """Offered protocols and the index of the first historical byte."""
    position, y = 2, atr[1] >> 4
    protocols: list[int] = []
    rounds = 0
    while True:
        rounds += 1
        td_index = position + bin(y & 0x7).count("1")
        if not y & 0x8:
            return tuple(protocols) or (0,), td_index
        if td_index >= len(atr) or rounds > 8:
            raise ValueError("ATR interface bytes are truncated")
        td = atr[td_index]
        if (td & 0x0F) not in protocols and (td & 0x0F) != 15:
            protocols.append(td & 0x0F)
        position, y = td_index + 1, td >> 4


def _compact_tlv_extended(data: bytes) -> bool:
    """True if a card capabilities object announces extended Lc/Le."""
    index = 0
    while index < len(data):
        tag, length = data[index] >> 4, data[index] & 0x0F
        value = data[index + 1 : index + 1 + length]
        if tag == 0x7 and len(value) >= 3:
            return bool(value[2] & 0x40)
        index += 1 + length
    return False


def parse_atr(atr: bytes) -> AtrInfo:
    """Parse the parts of an ATR the transport needs; ValueError if malformed."""
    if len(atr) < 2 or atr[0] not in (0x3B, 0x3F):
        raise ValueError(f"not an ATR: {atr.hex().upper()}")
    protocols, first_historical = _interface_bytes(atr)
    count = atr[1] & 0x0F
    historical = atr[first_historical : first_historical + count]
    if len(historical) != count:
        raise ValueError("ATR historical bytes are truncated")
    # Category indicator 80: compact-TLV objects; 00: the same followed by a
    # three-byte status indicator (ISO/IEC 7816-4 8.1.1.1).
    extended = False
    if historical[:1] == b"\x80":
        extended = _compact_tlv_extended(historical[1:])
    elif historical[:1] == b"\x00":
        extended = _compact_tlv_extended(historical[1:-3])
    return AtrInfo(bytes(atr), protocols, bytes(historical), extended)


class ApduLink:
    """Exchanges whole commands with a card, following 61xx and 6Cxx.

    ``transport`` carries raw APDUs.  ``name`` names the card in errors and
    traces; traces go to ``trace_logger`` (default: this module's logger).
    """

    def __init__(
        self,
        transport: RawTransport,
        *,
        name: str = "card",
        extended_length: bool = False,
        max_rounds: int = DEFAULT_MAX_ROUNDS,
        trace_logger: logging.Logger | None = None,
    ) -> None:
        if max_rounds < 1:
            raise ValueError("max_rounds must be at least 1")
        self.transport = transport
        self.name = name
        self.extended_length = extended_length
        self.max_rounds = max_rounds
        self._trace = trace_logger or _log

    def __repr__(self) -> str:
        return f"<ApduLink {self.name!r} extended={self.extended_length}>"

    def exchange(self, command: CommandApdu, label: str | None = None) -> ResponseApdu:
        """Send ``command`` and return the card's final answer, with the data
        of every GET RESPONSE round joined.  The status word is not checked."""
        label = label or _INS_LABELS.get(command.ins, f"INS {command.ins:02X}")
        self._check_length(command, label)
        resp = self.transmit(command)
        data, resent = b"", False
        for _ in range(self.max_rounds):
            if resp.sw1 == _SW1_WRONG_LE and command.le is not None and not resent:
                resent = True
                command = dataclasses.replace(command, le=resp.sw2 or 256)
                resp = self.transmit(command)
            elif resp.sw1 == _SW1_MORE_DATA:
                data += resp.data
                command = apdu.gen_get_response_apdu(resp.sw2 or 256)
                resp = self.transmit(command)
            else:
                return ResponseApdu(data + resp.data, resp.sw1, resp.sw2)
        raise CardCommunicationError(
            f"{label}: card {self.name!r} still asked for GET RESPONSE or a "
            f"new Le after {self.max_rounds} rounds"
        )

    def _check_length(self, command: CommandApdu, label: str) -> None:
        if command.extended and not self.extended_length:
            raise ExtendedLengthUnsupported(
                f"{label}: needs extended length ({len(command.data)} data "
                f"bytes, Le {command.le}) but card {self.name!r} does not "
                "announce it; nothing was sent"
            )

    def transmit(self, command: CommandApdu) -> ResponseApdu:
        """One raw round trip, traced; no quirk handling."""
        raw = command.encode()
        tracing = self._trace.isEnabledFor(logging.DEBUG)
        if tracing:
            self._trace.debug("%s > %s", self.name, apdu.format_apdu_for_trace(raw))
        started = time.perf_counter()
        answer = _call_transport(self.transport.transmit, raw, self.name)
        if tracing:
            self._trace.debug(
                "%s < %s (%.3f ms)",
                self.name,
                apdu.format_response_for_trace(answer),
                (time.perf_counter() - started) * 1000,
            )
        return ResponseApdu.parse(answer)


def _call_transport(transmit: Callable[[bytes], bytes], raw: bytes, name: str) -> bytes:
    try:
        answer = transmit(raw)
    except IsclError:
        raise
    except OSError as exc:
        raise CardCommunicationError(
            f"card {name!r}: transport failed: {exc.strerror or exc}"
        ) from exc
    if not isinstance(answer, bytes | bytearray):
        raise CardCommunicationError(
            f"card {name!r}: transport returned {type(answer).__name__}, not bytes"
        )
    return bytes(answer)
