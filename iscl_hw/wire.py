"""ISCL wire codec: the 32-byte header, payload layouts and a strict decoder.

Public record (LEADTOOLS ``Ltdic.h``): every message is a header of eight
unsigned 32-bit words (Indicator, MessageId, DataLength, Option, TimeStamp,
ErrNo, two reserved) followed by DataLength bytes.  The byte order and the
payload layouts are not public; ours are in ``docs/protocol.md``.

The decoder checks DataLength against the limit for the message before it
buffers any payload, so a peer cannot make it allocate more than one
communication block (or one maximum message in through mode).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass

from iscl_hw.constants import (
    AUTH_DATA_MAX,
    AUTH_DATA_MIN,
    CHALLENGE_LENGTH,
    HEADER_LENGTH,
    NAK,
    ErrorCode,
    MessageId,
)
from iscl_hw.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "ByteOrder",
    "Frame",
    "FrameDecoder",
    "encode_frame",
    "pack_u32",
    "unpack_u32",
]


class ByteOrder(enum.Enum):
    """Byte order of every integer on the wire (not public: a setting)."""

    BIG = "big"
    LITTLE = "little"

    @property
    def prefix(self) -> str:
        return ">" if self is ByteOrder.BIG else "<"


@dataclass(frozen=True, slots=True)
class Frame:
    """One ISCL message as received: the header fields that matter and data."""

    message_id: MessageId
    option: int
    err_no: int
    payload: bytes


def _header_struct(order: ByteOrder) -> struct.Struct:
    return struct.Struct(order.prefix + "8I")


_HEADERS = {order: _header_struct(order) for order in ByteOrder}


def encode_frame(
    order: ByteOrder,
    message_id: MessageId,
    payload: bytes = b"",
    *,
    option: int = 0,
    err_no: int = 0,
) -> bytes:
    """Header and payload of one message; Indicator, TimeStamp and the
    reserved words are sent as zero (LEADTOOLS marks them unused)."""
    header = _HEADERS[order].pack(0, message_id, len(payload), option, 0, err_no, 0, 0)
    return header + payload


def pack_u32(order: ByteOrder, *values: int) -> bytes:
    return struct.pack(f"{order.prefix}{len(values)}I", *values)


def unpack_u32(order: ByteOrder, data: bytes, count: int) -> tuple[int, ...]:
    return struct.unpack_from(f"{order.prefix}{count}I", data)


# Payload sizes of our layout (docs/protocol.md, "Payloads").  A rule maps
# (option, block length, maximum message length) to the accepted range.
_Rule = Callable[[int, int, int], tuple[int, int]]


def _exact(n: int) -> _Rule:
    return lambda option, block, max_message: (n, n)


def _auth_rp(option: int, block: int, max_message: int) -> tuple[int, int]:
    if option == NAK:
        return (0, 0)
    return (4 + AUTH_DATA_MIN, 4 + AUTH_DATA_MAX)


_SIZE_RULES: dict[MessageId, _Rule] = {
    MessageId.LINE_CONNECTION_CHECK_RQ: _exact(8),
    MessageId.LINE_CONNECTION_CHECK_RP: _exact(8),
    MessageId.MUTUAL_AUTH_RQ: lambda o, b, m: (12 + AUTH_DATA_MIN, 12 + AUTH_DATA_MAX),
    MessageId.MUTUAL_AUTH_RP: _auth_rp,
    MessageId.MUTUAL_AUTH_PASS1_NOTIF: _exact(CHALLENGE_LENGTH),
    MessageId.MUTUAL_AUTH_PASS2_NOTIF: _exact(2 * CHALLENGE_LENGTH),
    MessageId.MUTUAL_AUTH_PASS3_NOTIF: _exact(CHALLENGE_LENGTH),
    MessageId.MUTUAL_AUTH_COMPLETION_NOTIF: _exact(0),
    MessageId.MESSAGE_TRANSMISSION_RQ: _exact(16),
    MessageId.MESSAGE_TRANSMISSION_RP: _exact(4),
    MessageId.RNDNO_FOR_SESSION_KEY_RQ: _exact(8),
    MessageId.RNDNO_FOR_SESSION_KEY_RP: _exact(0),
    # Communication blocks limit data notifications only.
    MessageId.MESSAGE_TRANSMISSION_NOTIF: lambda o, b, m: (1, b),
    # 8 (DESMAC) .. 24 (MD5 encrypted with a padding block); the core
    # checks the exact size for the negotiated methods.
    MessageId.MAC_TRANSMISSION_NOTIF: lambda o, b, m: (8, 24),
    # Through mode is "not limited by comm block size" (Ltdic.h); the
    # maximum message length limits it instead (see FrameDecoder).
    MessageId.THROUGH_MODE_TRANSMISSION_NOTIF: lambda o, b, m: (1, m),
    MessageId.LINE_DISCONNECTION_RQ: _exact(0),
    MessageId.LINE_DISCONNECTION_RP: _exact(0),
}


def allowed_sizes(
    message_id: MessageId, option: int, block_length: int, through_mode_limit: int
) -> tuple[int, int]:
    """The inclusive range of DataLength this decoder accepts."""
    return _SIZE_RULES[message_id](option, block_length, through_mode_limit)


class FrameDecoder:
    """Turns a byte stream, in pieces of any size, into :class:`Frame` objects.

    ``block_length`` may be changed between frames (after line connection).
    ``through_mode_limit`` is the largest through-mode message accepted; 0
    (the start value) refuses through mode from its header, so a peer
    cannot make us buffer a maximum-length message we would refuse anyway.
    """

    def __init__(
        self, order: ByteOrder, block_length: int, through_mode_limit: int = 0
    ) -> None:
        self.order = order
        self.block_length = block_length
        self.through_mode_limit = through_mode_limit
        self._buffer = bytearray()
        self._pos = 0
        self._pending: tuple[MessageId, int, int, int] | None = None
        self._frames = 0

    def feed(self, data: bytes) -> None:
        if self._pos and self._pos == len(self._buffer):
            self._buffer.clear()
            self._pos = 0
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as part of a frame."""
        return len(self._buffer) - self._pos

    def not_iscl_hint(self) -> str:
        """What the peer's bytes so far are, when no frame came yet and they
        begin like another protocol's greeting (one shorter than a header,
        say), as "; not ISCL: ..."; else ""."""
        if self._frames:
            return ""
        return _not_iscl_hint(self._buffer[self._pos :])

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None until more bytes arrive."""
        if self._pending is None:
            if self.buffered < HEADER_LENGTH:
                return None
            self._pending = self._parse_header()
            self._pos += HEADER_LENGTH

        message_id, length, option, err_no = self._pending
        if self.buffered < length:
            return None
        payload = bytes(self._buffer[self._pos : self._pos + length])
        self._pos += length
        self._pending = None
        self._frames += 1
        self._compact()
        return Frame(message_id, option, err_no, payload)

    def _compact(self) -> None:
        # Dropping consumed bytes one frame at a time would move the whole
        # buffer for every frame of a large read.
        if self._pos > 65536 or self._pos == len(self._buffer):
            del self._buffer[: self._pos]
            self._pos = 0

    def _parse_header(self) -> tuple[MessageId, int, int, int]:
        fields = _HEADERS[self.order].unpack_from(self._buffer, self._pos)
        raw_id, length, option, err_no = fields[1], fields[2], fields[3], fields[5]
        try:
            message_id = MessageId(raw_id)
        except ValueError:
            raise RemoteProtocolError(
                f"unknown message ID 0x{raw_id:08X}{self.not_iscl_hint()}",
                ErrorCode.BAD_MSGID,
            ) from None

        if (
            message_id is MessageId.THROUGH_MODE_TRANSMISSION_NOTIF
            and not self.through_mode_limit
        ):
            raise LocalProtocolError(
                "peer sent a through-mode (unsecured) message, which is refused here",
                ErrorCode.MSG_TRANSMISSION,
            )
        low, high = allowed_sizes(
            message_id, option, self.block_length, self.through_mode_limit
        )
        if not low <= length <= high:
            raise RemoteProtocolError(
                f"{message_id.name} with DataLength {length}, expected "
                + (f"{low}" if low == high else f"{low}..{high}"),
                ErrorCode.BAD_LENGTH,
            )
        return message_id, length, option, err_no


# What a peer's first bytes are when they are not ISCL, for a clearer error.
_BEHIND_A_PROXY = " (a proxy in front of a gateway started without --proxy-protocol?)"
_FOREIGN_STARTS = (
    (b"PROXY ", "a PROXY protocol v1 header" + _BEHIND_A_PROXY),
    (b"\r\n\r\n\x00\r\nQUIT\n", "a PROXY protocol v2 header" + _BEHIND_A_PROXY),
    (b"\x16\x03", "a TLS handshake"),
    (b"GET ", "an HTTP request"),
    (b"POST ", "an HTTP request"),
    (b"HEAD ", "an HTTP request"),
    (b"SSH-", "an SSH greeting"),
    (b"220 ", "an SMTP or FTP greeting"),
    (b"220-", "an SMTP or FTP greeting"),
)


def _not_iscl_hint(start: bytes | bytearray) -> str:
    for prefix, what in _FOREIGN_STARTS:
        if start.startswith(prefix):
            return f"; not ISCL: the peer sent {what}"
    return ""
