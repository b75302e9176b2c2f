"""ISO/IEC 7816-4 command and response APDUs for the ISCL card operations.

Builders are ``gen_<command>_apdu`` and return a :class:`CommandApdu`;
parsers are ``parse_<command>_resp`` and take a :class:`ResponseApdu`,
check its status word and return the data ISCL needs.

Traces: :func:`format_apdu_for_trace` shows the data field only for
commands whose data is known to hold no secret (SELECT, GET CHALLENGE,
INTERNAL / EXTERNAL AUTHENTICATE, GET RESPONSE); VERIFY and every other
command get their data field replaced by its length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from iscl_hw.errors import (
    AuthenticationBlocked,
    CardCommunicationError,
    StatusWordError,
    VerificationFailed,
    WrongCardAnswer,
)

__all__ = [
    "CLA_ISO",
    "INS_EXTERNAL_AUTHENTICATE",
    "INS_GET_CHALLENGE",
    "INS_GET_RESPONSE",
    "INS_INTERNAL_AUTHENTICATE",
    "INS_SELECT",
    "INS_VERIFY",
    "SW_NO_PIN",
    "SW_OK",
    "SW_SECURITY_STATUS",
    "ApduFormatError",
    "CommandApdu",
    "ResponseApdu",
    "format_apdu_for_trace",
    "format_response_for_trace",
    "gen_external_authenticate_apdu",
    "gen_get_challenge_apdu",
    "gen_get_response_apdu",
    "gen_internal_authenticate_apdu",
    "gen_select_aid_apdu",
    "gen_verify_apdu",
    "parse_external_authenticate_resp",
    "parse_get_challenge_resp",
    "parse_internal_authenticate_resp",
    "parse_select_resp",
    "parse_verify_resp",
    "sw_meaning",
]

CLA_ISO: Final = 0x00
INS_VERIFY: Final = 0x20
INS_EXTERNAL_AUTHENTICATE: Final = 0x82
INS_GET_CHALLENGE: Final = 0x84
INS_INTERNAL_AUTHENTICATE: Final = 0x88
INS_SELECT: Final = 0xA4
INS_GET_RESPONSE: Final = 0xC0

SW_OK: Final = 0x9000
SW_SECURITY_STATUS: Final = 0x6982
# VERIFY without data answers this when the card has no such PIN.
SW_NO_PIN: Final = 0x6A88

# Commands whose data field may appear in a trace; any other data field
# (VERIFY's PIN, anything that could carry a key) is shown as a length.
_TRACEABLE_INS: Final = frozenset(
    {
        INS_SELECT,
        INS_GET_CHALLENGE,
        INS_INTERNAL_AUTHENTICATE,
        INS_EXTERNAL_AUTHENTICATE,
        INS_GET_RESPONSE,
    }
)

_INS_NAMES: Final = {
    INS_VERIFY: "VERIFY",
    INS_EXTERNAL_AUTHENTICATE: "EXTERNAL AUTHENTICATE",
    INS_GET_CHALLENGE: "GET CHALLENGE",
    INS_INTERNAL_AUTHENTICATE: "INTERNAL AUTHENTICATE",
    INS_SELECT: "SELECT",
    INS_GET_RESPONSE: "GET RESPONSE",
}

# ISO/IEC 7816-4 5.6 (Table 5, 6): meanings of the status words ISCL meets.
_SW_MEANINGS: Final = {
    0x9000: "success",
    0x6300: "verification failed",
    0x6581: "memory failure",
    0x6700: "wrong length",
    0x6982: "security status not satisfied",
    0x6983: "authentication method blocked",
    0x6984: "reference data not usable",
    0x6985: "conditions of use not satisfied",
    0x6A80: "incorrect parameters in the data field",
    0x6A81: "function not supported",
    0x6A82: "file or application not found",
    0x6A86: "incorrect parameters P1-P2",
    0x6A88: "referenced data not found",
    0x6B00: "wrong parameters P1-P2",
    0x6D00: "INS not supported",
    0x6E00: "CLA not supported",
    0x6F00: "no precise diagnosis",
}

_SHORT_MAX_LC: Final = 255
_SHORT_MAX_LE: Final = 256
_EXTENDED_MAX_LC: Final = 65535
_EXTENDED_MAX_LE: Final = 65536


class ApduFormatError(CardCommunicationError):
    """A command APDU is malformed (length fields inconsistent with its size)."""


def sw_meaning(sw1: int, sw2: int) -> str:
    """Describe a status word in words (ISO/IEC 7816-4 5.6)."""
    sw = (sw1 << 8) | sw2
    if sw in _SW_MEANINGS:
        return _SW_MEANINGS[sw]
    if sw1 == 0x63 and sw2 & 0xF0 == 0xC0:
        tries = sw2 & 0x0F
        return f"verification failed, {tries} {'try' if tries == 1 else 'tries'} left"
    if sw1 == 0x61:
        return f"{sw2 or 256} response bytes still available"
    if sw1 == 0x6C:
        return f"wrong Le field, {sw2 or 256} bytes available"
    return "unknown status word"


def _check_byte(name: str, value: int) -> None:
    if not 0 <= value <= 0xFF:
        raise ValueError(f"{name} must be a byte (0..255), got {value}")


@dataclass(frozen=True)
class CommandApdu:
    """A command APDU (ISO/IEC 7816-4 5.1).

    ``le=None`` means no Le field; ``le=256`` is a short Le of ``00`` and
    ``le=65536`` an extended Le of ``0000``.  ``extended`` is set
    automatically when the data or Le do not fit the short form.
    """

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    le: int | None = None
    extended: bool = False

    def __post_init__(self) -> None:
        for name in ("cla", "ins", "p1", "p2"):
            _check_byte(name, getattr(self, name))
        if not isinstance(self.data, bytes):
            raise TypeError("data must be bytes")
        if len(self.data) > _EXTENDED_MAX_LC:
            raise ValueError(f"data field too long: {len(self.data)} bytes")
        if self.le is not None and not 1 <= self.le <= _EXTENDED_MAX_LE:
            raise ValueError(f"Le must be 1..65536 or None, got {self.le}")
        needs_extended = len(self.data) > _SHORT_MAX_LC or (
            self.le is not None and self.le > _SHORT_MAX_LE
        )
        # A case 1 APDU is the bare header in both forms.
        extended = needs_extended or (self.extended and self.case != 1)
        object.__setattr__(self, "extended", extended)

    def __repr__(self) -> str:
        if self.ins in _TRACEABLE_INS:
            data = self.data.hex().upper()
        else:
            data = f"<{len(self.data)} bytes>"
        return (
            f"CommandApdu(cla=0x{self.cla:02X}, ins=0x{self.ins:02X}, "
            f"p1=0x{self.p1:02X}, p2=0x{self.p2:02X}, data={data}, "
            f"le={self.le}, extended={self.extended})"
        )

    @property
    def case(self) -> int:
        """The ISO/IEC 7816-3 command case: 1 (no data, no Le) .. 4 (both)."""
        if self.data:
            return 3 if self.le is None else 4
        return 1 if self.le is None else 2

    @property
    def header(self) -> bytes:
        return bytes((self.cla, self.ins, self.p1, self.p2))

    def encode(self) -> bytes:
        """Encode as short or extended APDU (ISO/IEC 7816-4 5.1, Table 1)."""
        body = self._encode_extended() if self.extended else self._encode_short()
        return self.header + body

    def _encode_short(self) -> bytes:
        out = b""
        if self.data:
            out += bytes((len(self.data),)) + self.data
        if self.le is not None:
            out += bytes((self.le % 256,))
        return out

    def _encode_extended(self) -> bytes:
        out = b"\x00"
        if self.data:
            out += len(self.data).to_bytes(2, "big") + self.data
        if self.le is not None:
            out += (self.le % 65536).to_bytes(2, "big")
        return out

    @classmethod
    def decode(cls, raw: bytes) -> CommandApdu:
        """Parse a command APDU strictly; raise :class:`ApduFormatError`."""
        if len(raw) < 4:
            raise ApduFormatError(
                f"command APDU too short: {len(raw)} bytes, a header is 4"
            )
        header, body = raw[:4], raw[4:]
        cla, ins, p1, p2 = header
        if not body:
            return cls(cla, ins, p1, p2)
        if body[0] != 0 or len(body) == 1:
            data, le = _decode_short_body(body)
            return cls(cla, ins, p1, p2, data, le)
        data, le = _decode_extended_body(body)
        return cls(cla, ins, p1, p2, data, le, extended=True)


def _decode_short_body(body: bytes) -> tuple[bytes, int | None]:
    if len(body) == 1:
        return b"", body[0] or 256
    lc = body[0]
    if len(body) == 1 + lc:
        return body[1:], None
    if len(body) == 2 + lc:
        return body[1:-1], body[-1] or 256
    raise ApduFormatError(
        f"inconsistent Lc: Lc={lc} but {len(body) - 1} bytes follow it (short APDU)"
    )


def _decode_extended_body(body: bytes) -> tuple[bytes, int | None]:
    # ISO/IEC 7816-4 5.1: a first body byte of 00 followed by more bytes
    # introduces an extended Lc or, when only two bytes follow, an extended Le.
    if len(body) < 3:
        raise ApduFormatError(
            f"extended length field truncated: {len(body)} bytes after header"
        )
    if len(body) == 3:
        return b"", int.from_bytes(body[1:3], "big") or 65536
    lc = int.from_bytes(body[1:3], "big")
    if lc == 0:
        raise ApduFormatError("extended Lc of 0000 is not allowed")
    if len(body) == 3 + lc:
        return body[3:], None
    if len(body) == 5 + lc:
        return body[3:-2], int.from_bytes(body[-2:], "big") or 65536
    raise ApduFormatError(
        f"inconsistent Lc: Lc={lc} but {len(body) - 3} bytes follow it (extended APDU)"
    )


@dataclass(frozen=True)
class ResponseApdu:
    """A response APDU: data field and the status word SW1-SW2."""

    data: bytes
    sw1: int
    sw2: int

    def __post_init__(self) -> None:
        _check_byte("sw1", self.sw1)
        _check_byte("sw2", self.sw2)

    @classmethod
    def parse(cls, raw: bytes) -> ResponseApdu:
        if len(raw) < 2:
            raise CardCommunicationError(
                f"response APDU too short: {len(raw)} bytes, need a status word"
            )
        return cls(bytes(raw[:-2]), raw[-2], raw[-1])

    @classmethod
    def from_sw(cls, sw: int, data: bytes = b"") -> ResponseApdu:
        return cls(data, sw >> 8, sw & 0xFF)

    def encode(self) -> bytes:
        return self.data + bytes((self.sw1, self.sw2))

    @property
    def sw(self) -> int:
        return (self.sw1 << 8) | self.sw2

    def check(self, command_name: str) -> None:
        """Raise the typed error for any status word other than 9000."""
        if self.sw == SW_OK:
            return
        message = f"{command_name} refused: {sw_meaning(self.sw1, self.sw2)}"
        if self.sw == 0x6983:
            raise AuthenticationBlocked(message, self.sw1, self.sw2)
        if self.sw == 0x6300 or (self.sw1 == 0x63 and self.sw2 & 0xF0 == 0xC0):
            raise VerificationFailed(message, self.sw1, self.sw2)
        raise StatusWordError(message, self.sw1, self.sw2)


def gen_select_aid_apdu(aid: bytes, le: int | None = None) -> CommandApdu:
    """SELECT by DF name (ISO/IEC 7816-4 7.1.1: P1 04, P2 00 first occurrence)."""
    if not 5 <= len(aid) <= 16:
        raise ValueError(f"an AID is 5..16 bytes, got {len(aid)}")
    return CommandApdu(CLA_ISO, INS_SELECT, 0x04, 0x00, aid, le)


def gen_get_challenge_apdu(le: int = 8) -> CommandApdu:
    """GET CHALLENGE (ISO/IEC 7816-4 7.5.3): P1-P2 0000, Le = length."""
    return CommandApdu(CLA_ISO, INS_GET_CHALLENGE, 0x00, 0x00, le=le)


def gen_internal_authenticate_apdu(
    key_ref: int, challenge: bytes, le: int = 8
) -> CommandApdu:
    """INTERNAL AUTHENTICATE (ISO/IEC 7816-4 7.5.2): P1 00, P2 key reference."""
    return CommandApdu(CLA_ISO, INS_INTERNAL_AUTHENTICATE, 0x00, key_ref, challenge, le)


def gen_external_authenticate_apdu(key_ref: int, response: bytes) -> CommandApdu:
    """EXTERNAL AUTHENTICATE (ISO/IEC 7816-4 7.5.4): case 3, no Le."""
    return CommandApdu(CLA_ISO, INS_EXTERNAL_AUTHENTICATE, 0x00, key_ref, response)


def gen_verify_apdu(pin: bytes, ref: int = 0x80) -> CommandApdu:
    """VERIFY (ISO/IEC 7816-4 7.5.6); P2 80 is the specific (DF) reference 0."""
    if not 1 <= len(pin) <= _SHORT_MAX_LC:
        raise ValueError("a PIN is 1..255 bytes")
    return CommandApdu(CLA_ISO, INS_VERIFY, 0x00, ref, pin)


def gen_verify_status_apdu(ref: int = 0x80) -> CommandApdu:
    """VERIFY without data (ISO/IEC 7816-4 7.5.6): asks how many tries are
    left (63Cx) or whether the PIN is verified already (9000), using none."""
    return CommandApdu(CLA_ISO, INS_VERIFY, 0x00, ref)


def gen_get_response_apdu(le: int) -> CommandApdu:
    """GET RESPONSE (ISO/IEC 7816-4 7.6.1) after a 61xx status word."""
    return CommandApdu(CLA_ISO, INS_GET_RESPONSE, 0x00, 0x00, le=le)


def _expect_length(resp: ResponseApdu, name: str, expected_len: int) -> bytes:
    resp.check(name)
    if len(resp.data) != expected_len:
        raise WrongCardAnswer(
            f"{name} answered {len(resp.data)} bytes, expected {expected_len}"
        )
    return resp.data


def parse_select_resp(resp: ResponseApdu) -> bytes:
    """Check a SELECT answer; return its FCI data (possibly empty)."""
    resp.check("SELECT")
    return resp.data


def parse_get_challenge_resp(resp: ResponseApdu, expected_len: int = 8) -> bytes:
    return _expect_length(resp, "GET CHALLENGE", expected_len)


def parse_internal_authenticate_resp(
    resp: ResponseApdu, expected_len: int = 8
) -> bytes:
    return _expect_length(resp, "INTERNAL AUTHENTICATE", expected_len)


def parse_external_authenticate_resp(resp: ResponseApdu) -> None:
    _expect_length(resp, "EXTERNAL AUTHENTICATE", 0)


def parse_verify_resp(resp: ResponseApdu) -> None:
    _expect_length(resp, "VERIFY", 0)


def format_apdu_for_trace(raw: bytes) -> str:
    """Render a command APDU for a DEBUG trace, without PINs or keys."""
    try:
        apdu = CommandApdu.decode(raw)
    except ApduFormatError:
        shown = raw[:4].hex(" ").upper()
        return f"{shown} <malformed, {len(raw)} bytes>"
    name = _INS_NAMES.get(apdu.ins, f"INS {apdu.ins:02X}")
    parts = [name, apdu.header.hex(" ").upper()]
    if apdu.data:
        if apdu.ins in _TRACEABLE_INS:
            parts.append(f"data={apdu.data.hex().upper()}")
        else:
            parts.append("data=<redacted>")
    if apdu.le is not None:
        parts.append(f"Le={apdu.le}")
    return " ".join(parts)


def format_response_for_trace(raw: bytes) -> str:
    """Render a response APDU for a DEBUG trace (data and status word)."""
    if len(raw) < 2:
        return f"<malformed, {len(raw)} bytes>"
    resp = ResponseApdu.parse(raw)
    text = f"SW {resp.sw:04X} ({sw_meaning(resp.sw1, resp.sw2)})"
    if resp.data:
        text = f"data={resp.data.hex().upper()} {text}"
    return text
