from __future__ import annotations

import random
import struct

import pytest
from helpers import craft

from iscl_hw.constants import (
    ACK,
    HEADER_LENGTH,
    NAK,
    ErrorCode,
    MessageId,
)
from iscl_hw.errors import LocalProtocolError, RemoteProtocolError
from iscl_hw.wire import (
    ByteOrder,
    Frame,
    FrameDecoder,
    allowed_sizes,
    encode_frame,
    pack_u32,
    unpack_u32,
)

BLOCK = 8160
MAX_MESSAGE = 1 << 20

# A payload of a valid size for each message (ACK where the option matters).
VALID_PAYLOADS = {
    MessageId.LINE_CONNECTION_CHECK_RQ: bytes(8),
    MessageId.LINE_CONNECTION_CHECK_RP: bytes(8),
    MessageId.MUTUAL_AUTH_RQ: bytes(12) + b"auth",
    MessageId.MUTUAL_AUTH_RP: bytes(4) + b"data",
    MessageId.MUTUAL_AUTH_PASS1_NOTIF: bytes(range(8)),
    MessageId.MUTUAL_AUTH_PASS2_NOTIF: bytes(range(16)),
    MessageId.MUTUAL_AUTH_PASS3_NOTIF: bytes(range(8, 16)),
    MessageId.MUTUAL_AUTH_COMPLETION_NOTIF: b"",
    MessageId.MESSAGE_TRANSMISSION_RQ: bytes(range(16)),
    MessageId.MESSAGE_TRANSMISSION_RP: bytes(4),
    MessageId.RNDNO_FOR_SESSION_KEY_RQ: bytes(range(8)),
    MessageId.RNDNO_FOR_SESSION_KEY_RP: b"",
    MessageId.MESSAGE_TRANSMISSION_NOTIF: bytes(range(200)),
    MessageId.MAC_TRANSMISSION_NOTIF: bytes(range(24)),
    MessageId.THROUGH_MODE_TRANSMISSION_NOTIF: bytes(range(256)) * 40,
    MessageId.LINE_DISCONNECTION_RQ: b"",
    MessageId.LINE_DISCONNECTION_RP: b"",
}

EXACT_SIZES = {
    MessageId.LINE_CONNECTION_CHECK_RQ: 8,
    MessageId.LINE_CONNECTION_CHECK_RP: 8,
    MessageId.MUTUAL_AUTH_PASS1_NOTIF: 8,
    MessageId.MUTUAL_AUTH_PASS2_NOTIF: 16,
    MessageId.MUTUAL_AUTH_PASS3_NOTIF: 8,
    MessageId.MUTUAL_AUTH_COMPLETION_NOTIF: 0,
    MessageId.MESSAGE_TRANSMISSION_RQ: 16,
    MessageId.MESSAGE_TRANSMISSION_RP: 4,
    MessageId.RNDNO_FOR_SESSION_KEY_RQ: 8,
    MessageId.RNDNO_FOR_SESSION_KEY_RP: 0,
    MessageId.LINE_DISCONNECTION_RQ: 0,
    MessageId.LINE_DISCONNECTION_RP: 0,
}

# Messages that cannot be empty (for MUTUAL_AUTH_RP: with Option ACK).
PAYLOAD_REQUIRED = [
    m for m, payload in VALID_PAYLOADS.items() if EXACT_SIZES.get(m, 1) != 0
]


def decoder(order: ByteOrder = ByteOrder.BIG, block: int = BLOCK) -> FrameDecoder:
    return FrameDecoder(order, block, MAX_MESSAGE)


def decode_all(data: bytes, order: ByteOrder = ByteOrder.BIG) -> list[Frame]:
    d = decoder(order)
    d.feed(data)
    frames = []
    while (frame := d.next_frame()) is not None:
        frames.append(frame)
    assert d.buffered == 0
    return frames


def header_error(raw_header: bytes, order: ByteOrder = ByteOrder.BIG) -> ErrorCode:
    d = decoder(order)
    d.feed(raw_header)
    with pytest.raises(RemoteProtocolError) as info:
        d.next_frame()
    assert info.value.code is not None
    return info.value.code


@pytest.mark.parametrize("order", list(ByteOrder))
def test_header_layout(order: ByteOrder) -> None:
    raw = encode_frame(
        order,
        MessageId.MESSAGE_TRANSMISSION_RP,
        b"\x01\x02\x03\x04",
        option=NAK,
        err_no=ErrorCode.LOCAL_SMALL_LENGTH,
    )
    assert len(raw) == HEADER_LENGTH + 4
    prefix = ">" if order is ByteOrder.BIG else "<"
    fields = struct.unpack(prefix + "8I", raw[:HEADER_LENGTH])
    assert fields == (
        0,
        MessageId.MESSAGE_TRANSMISSION_RP,
        4,
        NAK,
        0,
        ErrorCode.LOCAL_SMALL_LENGTH,
        0,
        0,
    )
    assert raw[HEADER_LENGTH:] == b"\x01\x02\x03\x04"


def test_big_endian_header_bytes() -> None:
    raw = encode_frame(ByteOrder.BIG, MessageId.LINE_CONNECTION_CHECK_RQ, bytes(8))
    assert raw[:16].hex() == "00000000001100010000000800000000"
    little = encode_frame(
        ByteOrder.LITTLE, MessageId.LINE_CONNECTION_CHECK_RQ, bytes(8)
    )
    assert little[:16].hex() == "00000000010011000800000000000000"


@pytest.mark.parametrize("order", list(ByteOrder))
def test_pack_unpack_u32(order: ByteOrder) -> None:
    packed = pack_u32(order, 1, 0xFFFFFFFF, 0x00010000)
    assert len(packed) == 12
    assert unpack_u32(order, packed, 3) == (1, 0xFFFFFFFF, 0x00010000)
    assert packed[:4] == (
        b"\x00\x00\x00\x01" if order is ByteOrder.BIG else b"\x01\x00\x00\x00"
    )


@pytest.mark.parametrize("order", list(ByteOrder))
@pytest.mark.parametrize("message_id", list(MessageId))
def test_every_message_round_trips(order: ByteOrder, message_id: MessageId) -> None:
    payload = VALID_PAYLOADS[message_id]
    raw = encode_frame(order, message_id, payload, option=ACK, err_no=0)
    assert decode_all(raw, order) == [Frame(message_id, ACK, 0, payload)]


@pytest.mark.parametrize("order", list(ByteOrder))
def test_options_and_err_no_round_trip(order: ByteOrder) -> None:
    raw = encode_frame(
        order,
        MessageId.MUTUAL_AUTH_PASS3_NOTIF,
        bytes(8),
        option=NAK,
        err_no=ErrorCode.REMOTE_ICCARD,
    )
    (frame,) = decode_all(raw, order)
    assert (frame.option, frame.err_no) == (NAK, ErrorCode.REMOTE_ICCARD)


def test_wrong_byte_order_is_refused() -> None:
    raw = encode_frame(ByteOrder.LITTLE, MessageId.LINE_CONNECTION_CHECK_RQ, bytes(8))
    assert header_error(raw[:HEADER_LENGTH], ByteOrder.BIG) is ErrorCode.BAD_MSGID


@pytest.mark.parametrize("raw_id", [0, 1, 0x00110002, 0x00FF0002, 0xFFFFFFFF])
@pytest.mark.parametrize("order", list(ByteOrder))
def test_unknown_message_id(raw_id: int, order: ByteOrder) -> None:
    header = craft(raw_id, b"", order=order)
    assert header_error(header, order) is ErrorCode.BAD_MSGID


@pytest.mark.parametrize(
    ("start", "named"),
    [
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 40000 2761\r\n", "PROXY protocol v1"),
        (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes(20), "PROXY protocol v2"),
        (b"\x16\x03\x01\x02\x00\x01" + bytes(40), "TLS handshake"),
        (b"GET / HTTP/1.1\r\nHost: example\r\n\r\n", "HTTP request"),
    ],
)
def test_a_first_frame_of_another_protocol_is_named(start: bytes, named: str) -> None:
    decoder = FrameDecoder(ByteOrder.BIG, BLOCK)
    decoder.feed(start)
    with pytest.raises(RemoteProtocolError, match=f"the peer sent an? {named}"):
        decoder.next_frame()


@pytest.mark.parametrize(
    ("start", "named"),
    [
        (b"SSH-2.0-x\r\n", "SSH greeting"),
        (b"GET / HTTP/1.0\r\n\r\n", "HTTP request"),
        (b"220 mx ESMTP\r\n", "SMTP or FTP greeting"),
    ],
)
def test_a_greeting_shorter_than_a_header_is_named(start: bytes, named: str) -> None:
    decoder = FrameDecoder(ByteOrder.BIG, BLOCK)
    decoder.feed(start)
    assert decoder.next_frame() is None  # still waiting for a whole header
    assert decoder.not_iscl_hint() == f"; not ISCL: the peer sent an {named}"


def test_only_the_first_frame_gets_a_foreign_protocol_hint() -> None:
    decoder = FrameDecoder(ByteOrder.BIG, BLOCK)
    decoder.feed(encode_frame(ByteOrder.BIG, MessageId.LINE_DISCONNECTION_RQ))
    assert decoder.next_frame() is not None
    decoder.feed(b"PROXY TCP4 192.0.2.1 192.0.2.2 40000 2761\r\n")
    with pytest.raises(RemoteProtocolError) as caught:
        decoder.next_frame()
    assert "PROXY" not in str(caught.value)


WRONG_SIZES = [
    (message_id, size + delta)
    for message_id, size in EXACT_SIZES.items()
    for delta in (-1, 1, 0xFFFF)
    if size + delta >= 0
]


@pytest.mark.parametrize(("message_id", "length"), WRONG_SIZES)
def test_wrong_size_for_fixed_size_message(message_id: MessageId, length: int) -> None:
    header = craft(message_id, length=length)
    assert header_error(header) is ErrorCode.BAD_LENGTH


@pytest.mark.parametrize("message_id", PAYLOAD_REQUIRED)
def test_zero_length_where_payload_required(message_id: MessageId) -> None:
    assert header_error(craft(message_id, b"", option=ACK)) is ErrorCode.BAD_LENGTH


def test_auth_rp_nak_has_no_payload() -> None:
    (frame,) = decode_all(craft(MessageId.MUTUAL_AUTH_RP, b"", option=NAK))
    assert frame.option == NAK
    header = craft(MessageId.MUTUAL_AUTH_RP, bytes(5), option=NAK)[:HEADER_LENGTH]
    assert header_error(header) is ErrorCode.BAD_LENGTH


@pytest.mark.parametrize(
    ("message_id", "low", "high"),
    [
        (MessageId.MUTUAL_AUTH_RQ, 13, 140),
        (MessageId.MUTUAL_AUTH_RP, 5, 132),
        (MessageId.MAC_TRANSMISSION_NOTIF, 8, 24),
        (MessageId.MESSAGE_TRANSMISSION_NOTIF, 1, BLOCK),
        (MessageId.THROUGH_MODE_TRANSMISSION_NOTIF, 1, MAX_MESSAGE),
    ],
)
def test_ranged_sizes(message_id: MessageId, low: int, high: int) -> None:
    assert allowed_sizes(message_id, ACK, BLOCK, MAX_MESSAGE) == (low, high)
    for length in (low - 1, high + 1):
        header = craft(message_id, length=length, option=ACK)
        assert header_error(header) is ErrorCode.BAD_LENGTH
    for length in (low, high):
        d = decoder()
        d.feed(craft(message_id, length=length, option=ACK))
        assert d.next_frame() is None  # header accepted, waiting for payload


@pytest.mark.parametrize("claimed", [BLOCK + 1, 1 << 31, 0xFFFFFFFF])
def test_data_notification_over_block_refused_from_header_alone(
    claimed: int,
) -> None:
    d = decoder()
    d.feed(craft(MessageId.MESSAGE_TRANSMISSION_NOTIF, length=claimed))
    assert d.buffered == HEADER_LENGTH
    with pytest.raises(RemoteProtocolError) as info:
        d.next_frame()
    assert info.value.code is ErrorCode.BAD_LENGTH
    # Nothing but the header was ever buffered.
    assert d.buffered == HEADER_LENGTH


def test_block_limit_follows_negotiation() -> None:
    d = decoder(block=BLOCK)
    d.block_length = 144
    d.feed(craft(MessageId.MESSAGE_TRANSMISSION_NOTIF, length=145))
    with pytest.raises(RemoteProtocolError) as info:
        d.next_frame()
    assert info.value.code is ErrorCode.BAD_LENGTH
    d = decoder(block=BLOCK)
    d.block_length = 144
    d.feed(craft(MessageId.MESSAGE_TRANSMISSION_NOTIF, bytes(144)))
    assert d.next_frame() == Frame(
        MessageId.MESSAGE_TRANSMISSION_NOTIF, 0, 0, bytes(144)
    )


def test_through_mode_over_max_message_length_refused() -> None:
    d = FrameDecoder(ByteOrder.BIG, BLOCK, 1000)
    d.feed(craft(MessageId.THROUGH_MODE_TRANSMISSION_NOTIF, length=1001))
    with pytest.raises(RemoteProtocolError) as info:
        d.next_frame()
    assert info.value.code is ErrorCode.BAD_LENGTH


@pytest.mark.parametrize("claimed", [1, MAX_MESSAGE, 0xFFFFFFFF])
def test_through_mode_refused_from_header_by_default(claimed: int) -> None:
    d = FrameDecoder(ByteOrder.BIG, BLOCK)
    assert d.through_mode_limit == 0
    d.feed(craft(MessageId.THROUGH_MODE_TRANSMISSION_NOTIF, length=claimed))
    with pytest.raises(LocalProtocolError) as info:
        d.next_frame()
    assert info.value.code is ErrorCode.MSG_TRANSMISSION
    assert d.buffered == HEADER_LENGTH


def test_through_mode_limit_can_be_raised_between_frames() -> None:
    d = FrameDecoder(ByteOrder.BIG, BLOCK)
    d.through_mode_limit = 1000
    d.feed(craft(MessageId.THROUGH_MODE_TRANSMISSION_NOTIF, bytes(1000)))
    assert d.next_frame() == Frame(
        MessageId.THROUGH_MODE_TRANSMISSION_NOTIF, 0, 0, bytes(1000)
    )


def test_partial_header_and_payload_wait() -> None:
    raw = craft(MessageId.MUTUAL_AUTH_PASS1_NOTIF, bytes(range(8)))
    d = decoder()
    d.feed(raw[:31])
    assert d.next_frame() is None
    d.feed(raw[31:39])
    assert d.next_frame() is None
    assert d.buffered == 7
    d.feed(raw[39:])
    assert d.next_frame() == Frame(
        MessageId.MUTUAL_AUTH_PASS1_NOTIF, 0, 0, bytes(range(8))
    )
    assert d.next_frame() is None
    assert d.buffered == 0


def stream_of_every_message(order: ByteOrder) -> tuple[bytes, list[Frame]]:
    frames = [
        Frame(message_id, ACK if i % 2 else 0, i, payload)
        for i, (message_id, payload) in enumerate(VALID_PAYLOADS.items())
    ]
    frames *= 2
    data = b"".join(
        encode_frame(order, f.message_id, f.payload, option=f.option, err_no=f.err_no)
        for f in frames
    )
    return data, frames


def feed_in_pieces(data: bytes, cuts: list[int], order: ByteOrder) -> list[Frame]:
    d = decoder(order)
    frames = []
    previous = 0
    for cut in [*cuts, len(data)]:
        d.feed(data[previous:cut])
        previous = cut
        while (frame := d.next_frame()) is not None:
            frames.append(frame)
    assert d.buffered == 0
    return frames


@pytest.mark.parametrize("order", list(ByteOrder))
@pytest.mark.parametrize("size", [1, 2, 3, 7, 31, 32, 33, 4096, 70000])
def test_fixed_fragmentation_gives_identical_frames(
    order: ByteOrder, size: int
) -> None:
    data, frames = stream_of_every_message(order)
    assert feed_in_pieces(data, list(range(size, len(data), size)), order) == frames


@pytest.mark.parametrize("seed", range(20))
def test_random_fragmentation_gives_identical_frames(seed: int) -> None:
    data, frames = stream_of_every_message(ByteOrder.BIG)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 300)))
    assert feed_in_pieces(data, cuts, ByteOrder.BIG) == frames


def test_large_stream_beyond_compaction_threshold() -> None:
    # Many frames in one feed move the read position past the compaction
    # threshold; frames must still come out intact.
    payloads = [bytes([i % 256]) * 8000 for i in range(40)]
    data = b"".join(
        encode_frame(ByteOrder.BIG, MessageId.MESSAGE_TRANSMISSION_NOTIF, p)
        for p in payloads
    )
    cuts = list(range(5000, len(data), 5000))
    frames = feed_in_pieces(data, cuts, ByteOrder.BIG)
    assert [f.payload for f in frames] == payloads
