from __future__ import annotations

import asyncio
import dataclasses
import struct

import pytest
from helpers import (
    CLIENT,
    SERVER,
    ConnectionPair,
    FailingCard,
    craft,
    make_cards,
    make_keys,
    parse_frame,
    random_keys,
    split_frames,
)

import iscl_hw
from iscl_hw import aio
from iscl_hw.arbiter import CardArbiter
from iscl_hw.constants import (
    ACK,
    DEFAULT_MAX_BLOCK_LENGTH,
    MIN_BLOCK_LENGTH,
    NAK,
    VERSION_V1_00,
    ErrorCode,
    MessageId,
)
from iscl_hw.core import Connection, Phase, Role
from iscl_hw.crypto import des_ecb_encrypt
from iscl_hw.errors import (
    AuthenticationBlocked,
    CardError,
    ConfigError,
    ConnectionLost,
    IsclError,
    LocalProtocolError,
    PeerAuthenticationFailed,
    PeerRejectedAuthentication,
    RemoteProtocolError,
)
from iscl_hw.events import (
    NEED_DATA,
    Authenticated,
    CardOperation,
    LineConnected,
)
from iscl_hw.settings import Settings
from iscl_hw.wire import ByteOrder, pack_u32

HANDSHAKE_IDS = [
    MessageId.LINE_CONNECTION_CHECK_RQ,
    MessageId.LINE_CONNECTION_CHECK_RP,
    MessageId.MUTUAL_AUTH_RQ,
    MessageId.MUTUAL_AUTH_RP,
    MessageId.MUTUAL_AUTH_PASS1_NOTIF,
    MessageId.MUTUAL_AUTH_PASS2_NOTIF,
    MessageId.MUTUAL_AUTH_PASS3_NOTIF,
    MessageId.MUTUAL_AUTH_COMPLETION_NOTIF,
]
SENDER_OF = {
    message_id: SERVER if i % 2 == 0 else CLIENT
    for i, message_id in enumerate(HANDSHAKE_IDS)
}

# A valid-size payload (with Option ACK) for any message.
SOME_PAYLOAD = {
    MessageId.LINE_CONNECTION_CHECK_RQ: pack_u32(ByteOrder.BIG, VERSION_V1_00, 8160),
    MessageId.LINE_CONNECTION_CHECK_RP: pack_u32(ByteOrder.BIG, VERSION_V1_00, 8160),
    MessageId.MUTUAL_AUTH_RQ: pack_u32(ByteOrder.BIG, 0, 1, 4) + b"auth",
    MessageId.MUTUAL_AUTH_RP: pack_u32(ByteOrder.BIG, 4) + b"auth",
    MessageId.MUTUAL_AUTH_PASS1_NOTIF: bytes(8),
    MessageId.MUTUAL_AUTH_PASS2_NOTIF: bytes(16),
    MessageId.MUTUAL_AUTH_PASS3_NOTIF: bytes(8),
    MessageId.MUTUAL_AUTH_COMPLETION_NOTIF: b"",
    MessageId.MESSAGE_TRANSMISSION_RQ: pack_u32(ByteOrder.BIG, 0x1212, 1, 0x1441, 5),
    MessageId.MESSAGE_TRANSMISSION_RP: pack_u32(ByteOrder.BIG, 5),
    MessageId.RNDNO_FOR_SESSION_KEY_RQ: bytes(8),
    MessageId.RNDNO_FOR_SESSION_KEY_RP: b"",
    MessageId.MESSAGE_TRANSMISSION_NOTIF: bytes(8),
    MessageId.MAC_TRANSMISSION_NOTIF: bytes(24),
    MessageId.THROUGH_MODE_TRANSMISSION_NOTIF: b"through",
    MessageId.LINE_DISCONNECTION_RQ: b"",
    MessageId.LINE_DISCONNECTION_RP: b"",
}

CLIENT_APDUS = [
    "SELECT",
    "INTERNAL AUTHENTICATE",
    "GET CHALLENGE",
    "INTERNAL AUTHENTICATE",
    "EXTERNAL AUTHENTICATE",
]
EARLY_CLIENT_APDUS = [
    "SELECT",
    "GET CHALLENGE",
    "INTERNAL AUTHENTICATE",
    "INTERNAL AUTHENTICATE",
    "EXTERNAL AUTHENTICATE",
]
SERVER_APDUS = [
    "SELECT",
    "GET CHALLENGE",
    "INTERNAL AUTHENTICATE",
    "INTERNAL AUTHENTICATE",
    "EXTERNAL AUTHENTICATE",
]


def any_frame(message_id: MessageId) -> bytes:
    return craft(message_id, SOME_PAYLOAD[message_id], option=ACK)


def replace_frame(index: int, new: bytes):  # type: ignore[no-untyped-def]
    """A hook replacing frame ``index`` of the handshake (both sides count)."""

    def hook(sender: str, raw: bytes, n: int) -> bytes:
        overall = 2 * n + (0 if sender == SERVER else 1)
        return new if overall == index else raw

    return hook


def patch_payload(message_id: MessageId, offset: int, value: bytes):  # type: ignore[no-untyped-def]
    """A hook overwriting bytes of ``message_id``'s payload in flight."""

    def hook(sender: str, raw: bytes, n: int) -> bytes:
        if parse_frame(raw).message_id is not message_id:
            return raw
        data = bytearray(raw)
        data[32 + offset : 32 + offset + len(value)] = value
        return bytes(data)

    return hook


def flip_payload_byte(message_id: MessageId, offset: int):  # type: ignore[no-untyped-def]
    """A hook changing one byte of ``message_id``'s payload in flight (an
    XOR, so that it always differs from what was sent)."""

    def hook(sender: str, raw: bytes, n: int) -> bytes:
        if parse_frame(raw).message_id is not message_id:
            return raw
        data = bytearray(raw)
        data[32 + offset] ^= 0x5A
        return bytes(data)

    return hook


def assert_span_free(pair: ConnectionPair) -> None:
    for side in pair.sides:
        if side.gone:
            continue
        assert not side.arbiter.holds(side.endpoint)
        assert not side.conn.card_span_open
        # span_wait is 0: this raises CardBusy if anybody still holds it.
        probe = object()
        side.arbiter.acquire(probe)
        side.arbiter.release(probe)


# -- success ---------------------------------------------------------------------------


@pytest.mark.parametrize("order", list(ByteOrder))
@pytest.mark.parametrize("chunk_size", [None, 1, 5])
def test_handshake_succeeds(order: ByteOrder, chunk_size: int | None) -> None:
    pair = ConnectionPair(
        client_settings=Settings(byte_order=order, auth_data=b"client AE"),
        server_settings=Settings(byte_order=order, auth_data=b"server AE title"),
        chunk_size=chunk_size,
    )
    before = pair.cards.counters()
    pair.handshake()

    assert pair.message_ids() == HANDSHAKE_IDS
    assert [s for s, _ in pair.transcript] == [SENDER_OF[m] for m in HANDSHAKE_IDS]
    assert all(f.option == ACK and f.err_no == 0 for f in pair.frames())
    assert pair.client.events == [
        LineConnected(DEFAULT_MAX_BLOCK_LENGTH, VERSION_V1_00),
        Authenticated(1, b"server AE title"),
    ]
    assert pair.server.events == [
        LineConnected(DEFAULT_MAX_BLOCK_LENGTH, VERSION_V1_00),
        Authenticated(1, b"client AE"),
    ]
    assert pair.client.conn.peer_auth_data == b"server AE title"
    assert pair.server.conn.peer_auth_data == b"client AE"
    for side in pair.sides:
        assert side.conn.phase is Phase.MESSAGES
        assert side.conn.block_length == DEFAULT_MAX_BLOCK_LENGTH
        assert side.conn.peer_version == VERSION_V1_00
        assert side.conn.data_to_send() == b""
        assert not side.conn.sending and not side.conn.receiving
    # "client AE" sorts before "server AE title": the client takes its card
    # first (its GET CHALLENGE before it answers the request).
    assert [r.operation for r in pair.client.card_requests] == [
        CardOperation.GET_CHALLENGE,
        CardOperation.INTERNAL_AUTHENTICATE,
        CardOperation.INTERNAL_AUTHENTICATE,
        CardOperation.EXTERNAL_AUTHENTICATE,
    ]
    assert [r.operation for r in pair.server.card_requests] == [
        CardOperation.GET_CHALLENGE,
        CardOperation.INTERNAL_AUTHENTICATE,
        CardOperation.INTERNAL_AUTHENTICATE,
        CardOperation.EXTERNAL_AUTHENTICATE,
    ]
    assert pair.cards.client_apdus.commands == EARLY_CLIENT_APDUS
    assert pair.cards.server_apdus.commands == SERVER_APDUS
    assert pair.cards.counters() == before
    assert_span_free(pair)


@pytest.mark.parametrize(
    ("client_data", "server_data", "client_first"),
    [
        (b"hospital-a", b"hospital-b", True),
        (b"hospital-b", b"hospital-a", False),
        (b"iscl", b"iscl", False),
    ],
)
def test_the_two_cards_are_taken_in_the_order_of_the_auth_data(
    client_data: bytes, server_data: bytes, client_first: bool
) -> None:
    """Both cards of a connection are held in one order, that of the
    authentication data, so two sites that each serve and connect with one
    card never hold one card each while waiting for the other's."""
    pair = ConnectionPair(
        client_settings=Settings(auth_data=client_data),
        server_settings=Settings(auth_data=server_data),
    )
    held_at_pass1: list[bool] = []

    def hook(sender: str, raw: bytes, n: int) -> bytes:
        if parse_frame(raw).message_id is MessageId.MUTUAL_AUTH_PASS1_NOTIF:
            held_at_pass1.append(pair.client.arbiter.holds(pair.client.endpoint))
        return raw

    pair.hook = hook
    pair.handshake()

    assert held_at_pass1 == [client_first]
    expected = EARLY_CLIENT_APDUS if client_first else CLIENT_APDUS
    assert pair.cards.client_apdus.commands == expected
    assert_span_free(pair)


def test_challenges_are_fresh_and_answers_are_right() -> None:
    pair = ConnectionPair().handshake()
    frames = {f.message_id: f.payload for f in pair.frames()}
    key = pair.cards.client_keys[1]
    server_challenge = frames[MessageId.MUTUAL_AUTH_PASS1_NOTIF]
    pass2 = frames[MessageId.MUTUAL_AUTH_PASS2_NOTIF]
    assert pass2[:8] == des_ecb_encrypt(key, server_challenge)
    assert frames[MessageId.MUTUAL_AUTH_PASS3_NOTIF] == des_ecb_encrypt(key, pass2[8:])
    other = ConnectionPair(cards=pair.cards).handshake()
    assert other.frames()[4].payload != server_challenge


def test_card_work_off_the_critical_path_is_asked_ahead() -> None:
    """Each side asks its own card for the answer it expects while the peer
    works on the pass carrying its challenge, and the server's EXTERNAL
    AUTHENTICATE runs while pass 3 travels: each such request comes after
    the pass is written and is marked ``ahead``; no other request is."""
    pair = ConnectionPair()
    written_before: dict[str, list[list[MessageId | int]]] = {}
    for side in pair.sides:
        run_card = side.endpoint.run_card

        def run(request, side=side, run_card=run_card):  # type: ignore[no-untyped-def]
            if request.ahead:
                pending = side.conn.data_to_send()
                written_before.setdefault(side.name, []).append(
                    [
                        parse_frame(raw).message_id
                        for raw in split_frames(bytearray(pending), pair.order)
                    ]
                )
                side.outbox += pending
            run_card(request)

        side.endpoint.run_card = run  # type: ignore[method-assign]
    pair.handshake()

    assert written_before == {
        SERVER: [
            [MessageId.MUTUAL_AUTH_PASS1_NOTIF],
            [MessageId.MUTUAL_AUTH_PASS3_NOTIF],
        ],
        CLIENT: [[MessageId.MUTUAL_AUTH_PASS2_NOTIF]],
    }
    frames = {f.message_id: f.payload for f in pair.frames()}
    pass2 = frames[MessageId.MUTUAL_AUTH_PASS2_NOTIF]
    ahead = {
        side: [(r.operation, r.data) for r in pair[side].card_requests if r.ahead]
        for side in (SERVER, CLIENT)
    }
    assert ahead == {
        SERVER: [
            (
                CardOperation.INTERNAL_AUTHENTICATE,
                frames[MessageId.MUTUAL_AUTH_PASS1_NOTIF],
            ),
            (CardOperation.EXTERNAL_AUTHENTICATE, pass2[:8]),
        ],
        CLIENT: [(CardOperation.INTERNAL_AUTHENTICATE, pass2[8:])],
    }


def test_server_span_ends_after_its_external_authenticate() -> None:
    """The server holds its span from GET CHALLENGE through EXTERNAL
    AUTHENTICATE, which now comes last, after pass 3 is written."""
    pair = ConnectionPair()
    spans: list[tuple[CardOperation, bool]] = []
    run_card = pair.server.endpoint.run_card

    def run(request):  # type: ignore[no-untyped-def]
        run_card(request)
        spans.append((request.operation, pair.server.conn.card_span_open))

    pair.server.endpoint.run_card = run  # type: ignore[method-assign]
    pair.handshake()

    assert spans == [
        (CardOperation.GET_CHALLENGE, True),
        (CardOperation.INTERNAL_AUTHENTICATE, True),  # the expected answer
        (CardOperation.INTERNAL_AUTHENTICATE, True),  # pass 3 is written
        (CardOperation.EXTERNAL_AUTHENTICATE, False),
    ]
    assert_span_free(pair)


def test_server_external_authenticate_failing_once_pass3_is_out() -> None:
    """With pass 3 already taken by the driver when the server's card check
    fails, there is no room for a NAK: the server ends the connection
    unauthenticated, with its card's error and its span free.  The client,
    which checked the server's answer itself, counts itself authenticated
    and learns of the failure when the connection closes."""
    cards = make_cards()
    failing = FailingCard(cards.server, 3)
    pair = ConnectionPair(cards=dataclasses.replace(cards, server=failing))
    server = pair.server
    run_card = server.endpoint.run_card

    def run(request):  # type: ignore[no-untyped-def]
        if request.ahead:
            server.outbox += server.conn.data_to_send()  # a driver's flush
        run_card(request)

    server.endpoint.run_card = run  # type: ignore[method-assign]
    pair.run()

    assert failing.calls[-1] == "EXTERNAL AUTHENTICATE"
    assert server.error is failing.error
    assert server.endpoint.authenticated is None
    last = pair.frames(SERVER)[-1]
    assert (last.message_id, last.option) == (MessageId.MUTUAL_AUTH_PASS3_NOTIF, ACK)
    assert pair.client.endpoint.authenticated is not None
    assert_span_free(pair)


@pytest.mark.parametrize("key_index", range(1, 9))
def test_every_auth_key_index(key_index: int) -> None:
    pair = ConnectionPair(
        server_settings=Settings(auth_key_index=key_index),
        client_settings=Settings(accepted_auth_key_indexes=frozenset({key_index})),
    ).handshake()
    assert pair.client.endpoint.authenticated == Authenticated(key_index, b"iscl")
    assert pair.server.endpoint.authenticated == Authenticated(key_index, b"iscl")
    for side in pair.sides:
        assert {r.key_ref for r in side.card_requests} == {key_index}


def test_only_the_requested_key_must_match() -> None:
    keys = random_keys()
    other = dict(keys)
    other[2] = bytes(8)  # key 2 differs, key 1 (the one in use) is the same
    cards = make_cards(client_keys=keys, server_keys=other)
    ConnectionPair(cards=cards).handshake()


def test_largest_auth_data_with_smallest_block() -> None:
    pair = ConnectionPair(
        client_settings=Settings(
            max_block_length=MIN_BLOCK_LENGTH, auth_data=b"c" * 128
        ),
        server_settings=Settings(auth_data=b"s" * 128),
    ).handshake()
    assert pair.client.conn.peer_auth_data == b"s" * 128
    assert pair.server.conn.peer_auth_data == b"c" * 128
    assert pair.server.conn.block_length == MIN_BLOCK_LENGTH


# -- wrong keys and wrong answers ------------------------------------------------------


@pytest.mark.parametrize("differs", [CLIENT, SERVER])
def test_wrong_auth_key(differs: str) -> None:
    keys = random_keys()
    cards = make_cards(keys, **{f"{differs}_keys": random_keys()})
    pair = ConnectionPair(cards=cards)
    before = cards.counters()
    pair.run()

    # The server checks first (pass 2), so it is the checking side either way.
    assert isinstance(pair.server.error, PeerAuthenticationFailed)
    assert isinstance(pair.client.error, PeerRejectedAuthentication)
    last = pair.frames(SERVER)[-1]
    assert last.message_id is MessageId.MUTUAL_AUTH_PASS3_NOTIF
    assert (last.option, last.err_no) == (NAK, ErrorCode.REMOTE_ICCARD)
    assert pair.server.output_after_error == craft(
        MessageId.MUTUAL_AUTH_PASS3_NOTIF,
        bytes(8),
        option=NAK,
        err_no=ErrorCode.REMOTE_ICCARD,
    )
    for side in pair.sides:
        assert side.endpoint.authenticated is None
        assert side.conn.phase is Phase.ERROR
    # The host-side check kept both cards' retry counters where they were.
    assert cards.counters() == before
    assert "EXTERNAL AUTHENTICATE" not in cards.server_apdus.commands
    assert "EXTERNAL AUTHENTICATE" not in cards.client_apdus.commands
    assert_span_free(pair)


@pytest.mark.parametrize("differs", [CLIENT, SERVER])
def test_repeated_wrong_keys_never_block_a_card(differs: str) -> None:
    cards = make_cards(max_retries=1, **{f"{differs}_keys": random_keys()})
    for _ in range(3):
        pair = ConnectionPair(cards=cards)
        pair.run()
        assert isinstance(pair.server.error, PeerAuthenticationFailed)
    assert cards.counters() == {
        CLIENT: dict.fromkeys(range(1, 9), 1),
        SERVER: dict.fromkeys(range(1, 9), 1),
    }


@pytest.mark.parametrize(
    ("tampered", "checker"),
    [
        (MessageId.MUTUAL_AUTH_PASS2_NOTIF, SERVER),  # client's answer
        (MessageId.MUTUAL_AUTH_PASS3_NOTIF, CLIENT),  # server's answer
    ],
)
@pytest.mark.parametrize("byte", [0, 7])
def test_peer_answering_wrongly(tampered: MessageId, checker: str, byte: int) -> None:
    cards = make_cards(max_retries=3)
    for soft in (cards.client_soft, cards.server_soft):
        soft.state.keys[1].remaining = 2  # a reset would show, too
    before = cards.counters()
    pair = ConnectionPair(cards=cards, hook=flip_payload_byte(tampered, byte))
    pair.run()
    other = CLIENT if checker == SERVER else SERVER

    assert isinstance(pair[checker].error, PeerAuthenticationFailed)
    assert isinstance(pair[other].error, PeerRejectedAuthentication)
    nak = pair.frames(checker)[-1]
    assert nak.option == NAK
    assert nak.err_no == ErrorCode.REMOTE_ICCARD
    expected_nak = (
        MessageId.MUTUAL_AUTH_PASS3_NOTIF
        if checker == SERVER
        else MessageId.MUTUAL_AUTH_COMPLETION_NOTIF
    )
    assert nak.message_id is expected_nak
    # The checking side never took the wrong answer to its card.
    checker_apdus = getattr(cards, f"{checker}_apdus").commands
    assert "EXTERNAL AUTHENTICATE" not in checker_apdus
    counters = cards.counters()
    assert counters[checker] == before[checker]
    if checker == CLIENT:
        # The server's card verified the client's right answer: reset.
        assert counters[SERVER][1] == 3
    else:
        assert counters[CLIENT] == before[CLIENT]
    assert_span_free(pair)


# -- version, block length, method, key index ------------------------------------------


@pytest.mark.parametrize("configured", [CLIENT, SERVER])
def test_wrong_version(configured: str) -> None:
    settings = {configured + "_settings": Settings(version=0x00020000)}
    pair = ConnectionPair(**settings)  # type: ignore[arg-type]
    pair.run()

    # The client compares the versions and refuses with BAD_VERSION ...
    assert isinstance(pair.client.error, RemoteProtocolError)
    assert pair.client.error.code is ErrorCode.BAD_VERSION
    rp = pair.frames(CLIENT)[-1]
    assert rp.message_id is MessageId.LINE_CONNECTION_CHECK_RP
    assert (rp.option, rp.err_no) == (NAK, ErrorCode.BAD_VERSION)
    # ... and the server learns why from the NAK.
    assert isinstance(pair.server.error, RemoteProtocolError)
    assert pair.server.error.code is ErrorCode.RECEIVED_NAK
    assert "BAD_VERSION" in str(pair.server.error)
    assert pair.client.conn.peer_version == pair.server.conn.settings.version
    for side in pair.sides:
        assert side.card_requests == []


def test_client_acknowledging_another_version_is_refused() -> None:
    pair = ConnectionPair(
        hook=patch_payload(
            MessageId.LINE_CONNECTION_CHECK_RP, 0, struct.pack(">I", 0x00020000)
        )
    )
    pair.run()
    assert isinstance(pair.server.error, RemoteProtocolError)
    assert pair.server.error.code is ErrorCode.BAD_VERSION
    assert pair.server.conn.peer_version == 0x00020000


@pytest.mark.parametrize("value", [0, 1, MIN_BLOCK_LENGTH - 1, 0x100000000])
def test_settings_refuse_block_length(value: int) -> None:
    with pytest.raises(ConfigError):
        Settings(max_block_length=value)


def feed_client(raw: bytes, settings: Settings | None = None) -> Connection:
    conn = Connection(Role.CLIENT, settings or Settings(), make_keys())
    conn.receive_data(raw)
    return conn


@pytest.mark.parametrize(
    ("offered", "client_max", "negotiated"),
    [
        (0, 8160, None),
        (MIN_BLOCK_LENGTH - 1, 8160, None),
        (MIN_BLOCK_LENGTH, 8160, MIN_BLOCK_LENGTH),
        (8160, 8160, 8160),
        (0xFFFFFFFF, 8160, 8160),
        (8160, 1000, 1000),
        (1000, 8160, 1000),
        (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
    ],
)
def test_client_block_length_negotiation(
    offered: int, client_max: int, negotiated: int | None
) -> None:
    conn = feed_client(
        craft(
            MessageId.LINE_CONNECTION_CHECK_RQ,
            pack_u32(ByteOrder.BIG, VERSION_V1_00, offered),
        ),
        Settings(max_block_length=client_max),
    )
    if negotiated is None:
        with pytest.raises(RemoteProtocolError) as info:
            conn.next_event()
        assert info.value.code is ErrorCode.BAD_COMMBLOCK_LENGTH
        rp = parse_frame(conn.data_to_send())
        assert (rp.option, rp.err_no) == (NAK, ErrorCode.BAD_COMMBLOCK_LENGTH)
        return
    assert conn.next_event() == LineConnected(negotiated, VERSION_V1_00)
    assert conn.block_length == negotiated
    rp = parse_frame(conn.data_to_send())
    assert rp.message_id is MessageId.LINE_CONNECTION_CHECK_RP
    assert rp.option == ACK
    assert rp.payload == pack_u32(ByteOrder.BIG, VERSION_V1_00, negotiated)
    assert conn.next_event() is NEED_DATA


@pytest.mark.parametrize(
    ("answered", "accepted"),
    [
        (0, False),
        (MIN_BLOCK_LENGTH - 1, False),
        (MIN_BLOCK_LENGTH, True),
        (4000, True),
        (4000 + 1, False),
        (0xFFFFFFFF, False),
    ],
)
def test_server_checks_the_clients_block_length(answered: int, accepted: bool) -> None:
    conn = Connection(Role.SERVER, Settings(max_block_length=4000), make_keys())
    rq = parse_frame(conn.data_to_send())
    assert rq.payload == pack_u32(ByteOrder.BIG, VERSION_V1_00, 4000)
    conn.receive_data(
        craft(
            MessageId.LINE_CONNECTION_CHECK_RP,
            pack_u32(ByteOrder.BIG, VERSION_V1_00, answered),
            option=ACK,
        )
    )
    if not accepted:
        with pytest.raises(RemoteProtocolError) as info:
            conn.next_event()
        assert info.value.code is ErrorCode.BAD_COMMBLOCK_LENGTH
        return
    assert conn.next_event() == LineConnected(answered, VERSION_V1_00)
    assert parse_frame(conn.data_to_send()).message_id is MessageId.MUTUAL_AUTH_RQ


@pytest.mark.parametrize(("client_max", "server_max"), [(1000, 8160), (8160, 1000)])
def test_negotiated_block_is_the_smaller(client_max: int, server_max: int) -> None:
    pair = ConnectionPair(
        client_settings=Settings(max_block_length=client_max),
        server_settings=Settings(max_block_length=server_max),
    ).handshake()
    assert pair.client.conn.block_length == pair.server.conn.block_length == 1000
    pair.send(CLIENT, bytes(5000))
    pair.send(SERVER, bytes(5000))
    pair.run()
    data = [
        f for f in pair.frames() if f.message_id is MessageId.MESSAGE_TRANSMISSION_NOTIF
    ]
    assert max(len(f.payload) for f in data) == 1000
    assert pair.client.received == pair.server.received == [bytes(5000)]


def test_mutual_auth_method_other_than_3p4w() -> None:
    pair = ConnectionPair(
        hook=patch_payload(MessageId.MUTUAL_AUTH_RQ, 0, struct.pack(">I", 1))
    )
    pair.run()
    assert isinstance(pair.client.error, RemoteProtocolError)
    assert pair.client.error.code is ErrorCode.BAD_MUTUAL_AUTH_METHOD
    rp = pair.frames(CLIENT)[-1]
    assert rp.message_id is MessageId.MUTUAL_AUTH_RP
    assert (rp.option, rp.err_no) == (NAK, ErrorCode.BAD_MUTUAL_AUTH_METHOD)
    assert rp.payload == b""
    assert isinstance(pair.server.error, RemoteProtocolError)
    assert "BAD_MUTUAL_AUTH_METHOD" in str(pair.server.error)
    for side in pair.sides:
        assert side.card_requests == []


def test_key_index_not_accepted_by_client() -> None:
    pair = ConnectionPair(
        server_settings=Settings(auth_key_index=3),
        client_settings=Settings(accepted_auth_key_indexes=frozenset({1, 2})),
    )
    pair.run()
    assert isinstance(pair.client.error, RemoteProtocolError)
    assert pair.client.error.code is ErrorCode.BAD_OPTION
    rp = pair.frames(CLIENT)[-1]
    assert rp.message_id is MessageId.MUTUAL_AUTH_RP
    assert rp.option == NAK
    assert isinstance(pair.server.error, RemoteProtocolError)
    assert pair.client.conn.peer_auth_data is None
    for side in pair.sides:
        assert side.card_requests == []


@pytest.mark.parametrize(
    ("message_id", "length_offset"),
    [(MessageId.MUTUAL_AUTH_RQ, 8), (MessageId.MUTUAL_AUTH_RP, 0)],
)
def test_auth_data_length_field_mismatch(
    message_id: MessageId, length_offset: int
) -> None:
    pair = ConnectionPair(
        hook=patch_payload(message_id, length_offset, struct.pack(">I", 3))
    )
    pair.run()
    receiver = pair.client if message_id is MessageId.MUTUAL_AUTH_RQ else pair.server
    assert isinstance(receiver.error, RemoteProtocolError)
    assert receiver.error.code is ErrorCode.BAD_LENGTH


# -- messages out of phase -------------------------------------------------------------


THROUGH = MessageId.THROUGH_MODE_TRANSMISSION_NOTIF


def assert_refused_out_of_phase(conn: Connection, message_id: MessageId) -> None:
    """A message out of phase is BAD_MSGID, except through mode: before
    authentication the decoder refuses it from its header alone."""
    if message_id is THROUGH:
        with pytest.raises(LocalProtocolError) as local:
            conn.next_event()
        assert local.value.code is ErrorCode.MSG_TRANSMISSION
        assert not isinstance(local.value, RemoteProtocolError)
    else:
        with pytest.raises(RemoteProtocolError) as remote:
            conn.next_event()
        assert remote.value.code is ErrorCode.BAD_MSGID
    assert conn.phase is Phase.ERROR


@pytest.mark.parametrize("allow_through_mode", [False, True])
@pytest.mark.parametrize(
    "message_id", [m for m in MessageId if m is not MessageId.LINE_CONNECTION_CHECK_RQ]
)
def test_fresh_client_refuses_anything_but_line_rq(
    message_id: MessageId, allow_through_mode: bool
) -> None:
    settings = Settings(allow_through_mode=allow_through_mode)
    conn = feed_client(any_frame(message_id), settings)
    assert_refused_out_of_phase(conn, message_id)


@pytest.mark.parametrize("allow_through_mode", [False, True])
@pytest.mark.parametrize(
    "message_id", [m for m in MessageId if m is not MessageId.LINE_CONNECTION_CHECK_RP]
)
def test_fresh_server_refuses_anything_but_line_rp(
    message_id: MessageId, allow_through_mode: bool
) -> None:
    settings = Settings(allow_through_mode=allow_through_mode)
    conn = Connection(Role.SERVER, settings, make_keys())
    conn.receive_data(any_frame(message_id))
    assert_refused_out_of_phase(conn, message_id)


@pytest.mark.parametrize("step", range(1, 8))
@pytest.mark.parametrize("intruder", [MessageId.MUTUAL_AUTH_PASS2_NOTIF, None])
def test_out_of_phase_message_at_each_step(
    step: int, intruder: MessageId | None
) -> None:
    # At each step, the sender sends a message the receiver does not expect
    # there (a later pass, or a transmission request).
    if intruder is None or intruder is HANDSHAKE_IDS[step]:
        intruder = MessageId.MESSAGE_TRANSMISSION_RQ
    pair = ConnectionPair(hook=replace_frame(step, any_frame(intruder)))
    pair.run()
    receiver = pair.client if SENDER_OF[HANDSHAKE_IDS[step]] == SERVER else pair.server
    assert isinstance(receiver.error, RemoteProtocolError)
    assert receiver.error.code is ErrorCode.BAD_MSGID
    assert receiver.endpoint.authenticated is None
    assert_span_free(pair)


@pytest.mark.parametrize("message_id", HANDSHAKE_IDS)
@pytest.mark.parametrize("receiver", [CLIENT, SERVER])
def test_handshake_message_after_authentication(
    message_id: MessageId, receiver: str
) -> None:
    pair = ConnectionPair().handshake()
    pair[receiver].conn.receive_data(any_frame(message_id))
    with pytest.raises(RemoteProtocolError) as info:
        pair[receiver].conn.next_event()
    assert info.value.code is ErrorCode.BAD_MSGID


# -- the peer vanishing ----------------------------------------------------------------


@pytest.mark.parametrize("frames", range(5))
@pytest.mark.parametrize("vanishing", [CLIENT, SERVER])
def test_peer_vanishes_during_handshake(vanishing: str, frames: int) -> None:
    pair = ConnectionPair()
    pair.vanish_after(vanishing, frames)
    pair.run()
    survivor = pair.server if vanishing == CLIENT else pair.client
    assert isinstance(survivor.error, ConnectionLost)
    assert survivor.conn.phase is Phase.ERROR
    assert survivor.output_after_error == b""
    assert_span_free(pair)


@pytest.mark.parametrize(("vanishing", "frames"), [(CLIENT, 2), (SERVER, 3)])
def test_vanishing_peer_releases_a_held_span(vanishing: str, frames: int) -> None:
    # The survivor holds its card span (it sent its challenge) when the peer
    # goes away; the span must end with the connection.
    pair = ConnectionPair()
    pair.vanish_after(vanishing, frames)
    survivor = pair.server if vanishing == CLIENT else pair.client
    held = []
    real_failed = survivor.endpoint.failed

    def failed(error: IsclError) -> None:
        held.append(survivor.arbiter.holds(survivor.endpoint))
        real_failed(error)

    survivor.endpoint.failed = failed  # type: ignore[method-assign]
    pair.run()
    assert held == [True]
    assert isinstance(survivor.error, ConnectionLost)
    assert_span_free(pair)


# -- card failures ---------------------------------------------------------------------

# (side, failing operation index) -> the NAK the peer receives
CARD_FAILURES = {
    (SERVER, 0): MessageId.MUTUAL_AUTH_PASS1_NOTIF,  # GET CHALLENGE
    (SERVER, 1): MessageId.MUTUAL_AUTH_PASS3_NOTIF,  # check INTERNAL AUTH
    (SERVER, 2): MessageId.MUTUAL_AUTH_PASS3_NOTIF,  # answer INTERNAL AUTH
    # EXTERNAL AUTH, which here (an inline card) fails before pass 3 is taken
    # from the core: pass 3 becomes the NAK.
    (SERVER, 3): MessageId.MUTUAL_AUTH_PASS3_NOTIF,
    (CLIENT, 0): MessageId.MUTUAL_AUTH_PASS2_NOTIF,  # answer INTERNAL AUTH
    (CLIENT, 1): MessageId.MUTUAL_AUTH_PASS2_NOTIF,  # GET CHALLENGE
    (CLIENT, 2): MessageId.MUTUAL_AUTH_COMPLETION_NOTIF,  # check INTERNAL AUTH
    (CLIENT, 3): MessageId.MUTUAL_AUTH_COMPLETION_NOTIF,  # EXTERNAL AUTH
}


# The same for a client that takes its card first (its auth data sorts
# before the server's).
EARLY_CLIENT_CARD_FAILURES = {
    (CLIENT, 0): MessageId.MUTUAL_AUTH_RP,  # GET CHALLENGE, before answering
    (CLIENT, 1): MessageId.MUTUAL_AUTH_PASS2_NOTIF,  # answer INTERNAL AUTH
    (CLIENT, 2): MessageId.MUTUAL_AUTH_COMPLETION_NOTIF,  # check INTERNAL AUTH
    (CLIENT, 3): MessageId.MUTUAL_AUTH_COMPLETION_NOTIF,  # EXTERNAL AUTH
}
FAILURE_CASES = [(s, n, False) for s, n in sorted(CARD_FAILURES)] + [
    (s, n, True) for s, n in sorted(EARLY_CLIENT_CARD_FAILURES)
]


@pytest.mark.parametrize(("side", "fail_at", "client_first"), FAILURE_CASES)
def test_card_failure_is_reported_to_the_peer(
    side: str, fail_at: int, client_first: bool
) -> None:
    cards = make_cards()
    failing = FailingCard(getattr(cards, side), fail_at)
    cards = dataclasses.replace(cards, **{side: failing})
    reports = EARLY_CLIENT_CARD_FAILURES if client_first else CARD_FAILURES
    pair = ConnectionPair(
        cards=cards,
        client_settings=Settings(auth_data=b"a" if client_first else b"iscl"),
    )
    pair.run()

    failed = pair[side]
    other = pair.server if side == CLIENT else pair.client
    assert failed.error is failing.error
    nak = pair.frames(side)[-1]
    assert nak.message_id is reports[side, fail_at]
    assert (nak.option, nak.err_no) == (NAK, ErrorCode.LOCAL_ICCARD)
    assert other.error is not None
    assert "LOCAL_ICCARD" in str(other.error)
    # A peer whose card failed is not a peer that refused our answer.
    assert isinstance(other.error, RemoteProtocolError)
    assert not isinstance(other.error, PeerRejectedAuthentication)
    assert other.error.code is ErrorCode.REMOTE_ICCARD
    for s in pair.sides:
        assert s.endpoint.authenticated is None
    assert_span_free(pair)


@pytest.mark.parametrize("blocked", [CLIENT, SERVER])
def test_blocked_card_key(blocked: str) -> None:
    cards = make_cards()
    cards.soft(blocked).state.keys[1].remaining = 0
    before = cards.counters()
    pair = ConnectionPair(cards=cards)
    pair.run()
    assert isinstance(pair[blocked].error, AuthenticationBlocked)
    assert isinstance(pair[blocked].error, CardError)
    nak = pair.frames(blocked)[-1]
    assert (nak.option, nak.err_no) == (NAK, ErrorCode.LOCAL_ICCARD)
    other = pair.server if blocked == CLIENT else pair.client
    assert other.error is not None
    assert cards.counters() == before
    assert_span_free(pair)


# -- concurrency with the real drivers -------------------------------------------------

CONCURRENT = 20


def test_concurrent_handshakes_on_one_card_pair() -> None:
    cards = make_cards()
    keys = make_keys()
    client_arbiter = CardArbiter.for_card(cards.client)

    async def handler(channel: aio.AsyncChannel) -> None:
        data = await channel.recv()
        await channel.send(data[::-1])

    async def aio_client(port: int, i: int) -> bytes:
        channel = await aio.open_connection(
            "127.0.0.1", port, card=cards.client, keys=keys
        )
        try:
            await channel.send(b"aio %d" % i)
            return await channel.recv()
        finally:
            await channel.close()

    def blocking_client(port: int, i: int) -> bytes:
        with iscl_hw.connect(
            "127.0.0.1", port, card=cards.client, keys=keys
        ) as channel:
            channel.send(b"thread %d" % i)
            return channel.recv()

    async def scenario() -> list[bytes]:
        server = await aio.start_server(
            handler, "127.0.0.1", 0, card=cards.server, keys=keys
        )
        try:
            port = server.sockets[0].getsockname()[1]
            return await asyncio.gather(
                *(aio_client(port, i) for i in range(CONCURRENT)),
                *(
                    asyncio.to_thread(blocking_client, port, i)
                    for i in range(CONCURRENT)
                ),
            )
        finally:
            server.close()
            await server.wait_closed()

    before = cards.counters()
    answers = asyncio.run(scenario())
    assert answers == [(b"aio %d" % i)[::-1] for i in range(CONCURRENT)] + [
        (b"thread %d" % i)[::-1] for i in range(CONCURRENT)
    ]
    assert cards.counters() == before
    assert cards.client_apdus.commands.count("EXTERNAL AUTHENTICATE") == 2 * CONCURRENT
    assert cards.server_apdus.commands.count("EXTERNAL AUTHENTICATE") == 2 * CONCURRENT
    for arbiter in (client_arbiter, CardArbiter.for_card(cards.server)):
        probe = object()
        arbiter.acquire(probe)  # CardBusy (after span_wait) if a span leaked
        arbiter.release(probe)


# -- API misuse ------------------------------------------------------------------------


def test_error_is_raised_once_then_local_protocol_error() -> None:
    conn = feed_client(any_frame(MessageId.MUTUAL_AUTH_PASS2_NOTIF))
    with pytest.raises(RemoteProtocolError) as first:
        conn.next_event()
    assert first.value.code is ErrorCode.BAD_MSGID
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    assert conn.phase is Phase.ERROR


def test_card_answer_without_a_request() -> None:
    conn = Connection(Role.CLIENT, Settings(), make_keys())
    with pytest.raises(LocalProtocolError):
        conn.card_answer(bytes(8))
    with pytest.raises(LocalProtocolError):
        conn.card_failed(CardError("no request"))
    with pytest.raises(LocalProtocolError):
        conn.send_message(b"before authentication")


def test_a_peer_that_closes_after_a_short_foreign_greeting_is_named() -> None:
    server = Connection(Role.SERVER, Settings(), make_keys())
    server.receive_data(b"GET / HTTP/1.0\r\n\r\n")
    server.receive_data(b"")
    with pytest.raises(ConnectionLost, match="; not ISCL: the peer sent an HTTP"):
        while server.next_event() is not NEED_DATA:
            pass
