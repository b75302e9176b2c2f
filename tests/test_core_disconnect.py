from __future__ import annotations

import asyncio

import pytest
from helpers import CLIENT, SERVER, SIDES, ConnectionPair, craft, make_cards, make_keys

import iscl_hw
from iscl_hw import aio
from iscl_hw.constants import (
    ACK,
    MIN_BLOCK_LENGTH,
    NAK,
    UNIQUE_SESSION_KEYS,
    ErrorCode,
    MessageId,
)
from iscl_hw.core import Phase
from iscl_hw.errors import (
    ConnectionLost,
    LocalProtocolError,
    PeerRefusedClose,
    RemoteProtocolError,
)
from iscl_hw.events import (
    Authenticated,
    CloseRefused,
    ConnectionClosed,
    LineConnected,
    MessageReceived,
    MessageSent,
)
from iscl_hw.settings import Settings


def other(side: str) -> str:
    return SERVER if side == CLIENT else CLIENT


@pytest.mark.parametrize("requester", SIDES)
def test_disconnection(requester: str) -> None:
    pair = ConnectionPair().handshake()
    pair[requester].conn.request_disconnection()
    assert pair[requester].conn.phase is Phase.DISCONNECTION
    events = pair.run()
    assert events[requester] == [ConnectionClosed(by_peer=False)]
    assert events[other(requester)] == [ConnectionClosed(by_peer=True)]
    rq, rp = pair.frames()[-2:]
    assert rq.message_id is MessageId.LINE_DISCONNECTION_RQ
    assert rp.message_id is MessageId.LINE_DISCONNECTION_RP
    assert rp.option == ACK
    for side in pair.sides:
        assert side.error is None
        assert side.conn.phase is Phase.CLOSED
        with pytest.raises(LocalProtocolError):
            side.conn.send_message(b"too late")
        with pytest.raises(LocalProtocolError):
            side.conn.request_disconnection()


@pytest.mark.parametrize("requester", SIDES)
def test_refused_disconnection_keeps_the_line(requester: str) -> None:
    refuser = other(requester)
    pair = ConnectionPair(
        **{f"{refuser}_settings": Settings(refuse_disconnection=True)}  # type: ignore[arg-type]
    ).handshake()
    pair[requester].conn.request_disconnection()
    events = pair.run()
    assert events[requester] == [CloseRefused()]
    assert events[refuser] == []
    rp = pair.frames(refuser)[-1]
    assert rp.message_id is MessageId.LINE_DISCONNECTION_RP
    assert (rp.option, rp.err_no) == (NAK, ErrorCode.PEER_REFUSE_CLOSE)
    for side in pair.sides:
        assert side.conn.phase is Phase.MESSAGES
        assert side.error is None

    pair.send(requester, b"still here")
    pair.send(refuser, b"me too")
    pair.run()
    assert pair[refuser].received == [b"still here"]
    assert pair[requester].received == [b"me too"]
    # The refusing side may still close the line itself.
    pair[refuser].conn.request_disconnection()
    pair.run()
    assert pair[refuser].endpoint.closed == ConnectionClosed(by_peer=False)
    assert pair[requester].endpoint.closed == ConnectionClosed(by_peer=True)


@pytest.mark.parametrize("key_index", [1, UNIQUE_SESSION_KEYS])
def test_disconnection_goes_after_queued_messages(key_index: int) -> None:
    settings = Settings(
        max_block_length=MIN_BLOCK_LENGTH, encryption_key_index=key_index
    )
    pair = ConnectionPair(client_settings=settings, server_settings=settings)
    pair.handshake()
    messages = [b"one", bytes(500), b"three"]
    ids = [pair.send(CLIENT, m) for m in messages]
    pair.client.conn.request_disconnection()
    with pytest.raises(LocalProtocolError):
        pair.send(CLIENT, b"after the request")
    assert pair.client.conn.phase is Phase.MESSAGES  # still sending
    pair.run()

    assert pair.server.events[2:] == [
        *(
            MessageReceived(m, settings.encryption, settings.mac, key_index)
            for m in messages
        ),
        ConnectionClosed(by_peer=True),
    ]
    assert pair.client.events[2:] == [
        *(MessageSent(i, len(m)) for i, m in zip(ids, messages, strict=True)),
        ConnectionClosed(by_peer=False),
    ]
    client_ids = pair.message_ids(CLIENT)
    assert client_ids[-1] is MessageId.LINE_DISCONNECTION_RQ
    assert client_ids[-2] is MessageId.MAC_TRANSMISSION_NOTIF


def test_peer_refuses_while_it_is_still_sending() -> None:
    pair = ConnectionPair().handshake()
    pair.send(SERVER, b"server's message")
    pair.client.conn.request_disconnection()
    pair.run()
    # The request crosses the server's transmission request: the server is
    # sending, so it refuses; the client still takes the server's message.
    assert pair.client.events[2:] == [
        CloseRefused(),
        MessageReceived(b"server's message", *_methods()),
    ]
    assert pair.server.endpoint.closed is None
    rp = [
        f
        for f in pair.frames(SERVER)
        if f.message_id is MessageId.LINE_DISCONNECTION_RP
    ]
    assert [(f.option, f.err_no) for f in rp] == [(NAK, ErrorCode.PEER_REFUSE_CLOSE)]
    pair.client.conn.request_disconnection()
    pair.run()
    assert pair.client.endpoint.closed == ConnectionClosed(by_peer=False)
    assert pair.server.endpoint.closed == ConnectionClosed(by_peer=True)


def _methods() -> tuple[object, object, int]:
    s = Settings()
    return (s.encryption, s.mac, s.encryption_key_index)


def test_both_sides_disconnect_at_once() -> None:
    pair = ConnectionPair().handshake()
    pair.client.conn.request_disconnection()
    pair.server.conn.request_disconnection()
    pair.run()
    for side in pair.sides:
        assert side.error is None
        assert side.conn.phase is Phase.CLOSED
        assert len(side.of_type(ConnectionClosed)) == 1


def test_disconnection_during_handshake_is_refused() -> None:
    pair = ConnectionPair()
    for side in pair.sides:
        with pytest.raises(LocalProtocolError):
            side.conn.request_disconnection()


@pytest.mark.parametrize("option", [1, 0x12345678])
def test_disconnection_response_with_bad_option(option: int) -> None:
    pair = ConnectionPair().handshake()
    pair.client.conn.request_disconnection()
    pair.client.conn.data_to_send()
    pair.client.conn.receive_data(craft(MessageId.LINE_DISCONNECTION_RP, option=option))
    with pytest.raises(RemoteProtocolError) as info:
        pair.client.conn.next_event()
    assert info.value.code is ErrorCode.BAD_OPTION


# -- the peer vanishing mid-message ----------------------------------------------------

# Frames of one 400-byte message with the 144-byte block: request, (random,)
# three data notifications, MAC.
STEPS = {1: 5, UNIQUE_SESSION_KEYS: 6}


@pytest.mark.parametrize(
    ("key_index", "step"),
    [(k, step) for k, n in STEPS.items() for step in range(n)],
)
def test_sender_vanishes_mid_message(key_index: int, step: int) -> None:
    settings = Settings(
        max_block_length=MIN_BLOCK_LENGTH, encryption_key_index=key_index
    )
    pair = ConnectionPair(client_settings=settings, server_settings=settings)
    pair.handshake()
    pair.vanish_after(CLIENT, 4 + step)  # 4 handshake frames, then `step` more
    pair.send(CLIENT, bytes(400))
    pair.run()
    assert isinstance(pair.server.error, ConnectionLost)
    assert pair.server.received == []
    assert pair.server.events == [
        LineConnected(MIN_BLOCK_LENGTH, 0x00010000),
        _auth(pair),
    ]


def _auth(pair: ConnectionPair) -> Authenticated:
    auth = pair.server.endpoint.authenticated
    assert auth is not None
    return auth


@pytest.mark.parametrize("key_index", [1, UNIQUE_SESSION_KEYS])
@pytest.mark.parametrize("answers", [0, 1])
def test_receiver_vanishes_mid_message(key_index: int, answers: int) -> None:
    settings = Settings(encryption_key_index=key_index)
    pair = ConnectionPair(client_settings=settings, server_settings=settings)
    pair.handshake()
    # The server sent 4 handshake frames; it vanishes after `answers` answers.
    pair.vanish_after(SERVER, 4 + answers)
    pair.send(CLIENT, b"hello")
    pair.run()
    assert isinstance(pair.client.error, ConnectionLost)
    assert pair.server.received == []


@pytest.mark.parametrize("vanishing", SIDES)
def test_vanishing_during_disconnection(vanishing: str) -> None:
    pair = ConnectionPair().handshake()
    sent = pair[vanishing].frames_sent
    if vanishing == CLIENT:
        # The requester vanishes once its request is out: the peer still
        # completes the disconnection, and the end of stream is no error.
        pair.vanish_after(CLIENT, sent + 1)
        pair.client.conn.request_disconnection()
        pair.run()
        assert pair.server.endpoint.closed == ConnectionClosed(by_peer=True)
        assert pair.server.error is None
    else:
        # The peer vanishes before answering the request.
        pair.vanish_after(SERVER, sent)
        pair.client.conn.request_disconnection()
        pair.run()
        assert isinstance(pair.client.error, ConnectionLost)
        assert "disconnection" in str(pair.client.error)


# -- drivers ---------------------------------------------------------------------------


def test_refused_close_at_the_drivers() -> None:
    cards = make_cards()
    keys = make_keys()

    async def handler(channel: aio.AsyncChannel) -> None:
        while True:
            data = await channel.recv()
            await channel.send(data.upper())

    def blocking_client(port: int) -> None:
        channel = iscl_hw.connect("127.0.0.1", port, card=cards.client, keys=keys)
        try:
            with pytest.raises(PeerRefusedClose):
                channel.disconnect()
            channel.send(b"after refusal")
            assert channel.recv() == b"AFTER REFUSAL"
            assert channel.connection.phase is Phase.MESSAGES
        finally:
            channel.abort()

    async def scenario() -> None:
        server = await aio.start_server(
            handler,
            "127.0.0.1",
            0,
            card=cards.server,
            keys=keys,
            settings=Settings(refuse_disconnection=True),
        )
        try:
            port = server.sockets[0].getsockname()[1]
            channel = await aio.open_connection(
                "127.0.0.1", port, card=cards.client, keys=keys
            )
            try:
                with pytest.raises(PeerRefusedClose):
                    await channel.disconnect()
                await channel.send(b"still open")
                assert await channel.recv() == b"STILL OPEN"
            finally:
                await channel.abort()
            await asyncio.to_thread(blocking_client, port)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())
