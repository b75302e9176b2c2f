"""Deadlines over real sockets on 127.0.0.1: a message must go through within
``Timeouts.transmission`` once it has started (a peer dripping bytes cannot
stretch it), and a write must drain within it when the peer does not read."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from helpers import CardPair, make_cards, make_keys, parse_frame, serving

from iscl_hw import aio, sync
from iscl_hw.constants import (
    ACK,
    DEFAULT_MAX_MESSAGE_LENGTH,
    HEADER_LENGTH,
    EncryptionMethod,
    MacMethod,
    MessageId,
)
from iscl_hw.core import Role
from iscl_hw.endpoint import Timeouts
from iscl_hw.errors import IsclError, PeerTimeout
from iscl_hw.keyfile import KeyStore
from iscl_hw.settings import Settings
from iscl_hw.wire import ByteOrder, encode_frame, pack_u32

SHORT = 0.3  # seconds: Timeouts.transmission under test
DRIP_INTERVAL = 0.1
MAX_DRIPS = 40  # a dripping peer must be dropped well before this many bytes
GUARD = 3.0  # seconds: the longest any step here may hang before the test fails
BIG = DEFAULT_MAX_MESSAGE_LENGTH
SMALL_BUFFER = 4096  # SO_SNDBUF / SO_RCVBUF of the side that stops the flow
ORDER = ByteOrder.BIG


def transmission_rq(length: int) -> bytes:
    return encode_frame(
        ORDER,
        MessageId.MESSAGE_TRANSMISSION_RQ,
        pack_u32(ORDER, EncryptionMethod.DES_CBC, 1, MacMethod.MD5, length),
    )


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(GUARD)
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"peer closed after {len(data)} of {n} bytes"
        data += chunk
    return data


def drip_until_dropped(sock: socket.socket, data: bytes) -> int | None:
    """Send ``data`` one byte every DRIP_INTERVAL; the number of bytes sent
    when the peer dropped the connection, or None if it never did."""
    for sent in range(min(len(data), MAX_DRIPS)):
        try:
            sock.send(data[sent : sent + 1])
            readable, _, _ = select.select([sock], [], [], DRIP_INTERVAL)
            if readable and sock.recv(4096) == b"":
                return sent + 1
        except OSError:  # reset by the peer
            return sent + 1
    return None


def client_channel(
    cards: CardPair,
    keys: KeyStore,
    port: int,
    *,
    timeouts: Timeouts | None = None,
    buffers: int | None = None,
) -> sync.Channel:
    """A blocking client on a socket of our own: ``buffers`` shrinks its send
    and receive buffers, before connecting so the TCP window is small too."""
    sock = socket.socket()
    try:
        if buffers is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
        sock.connect(("127.0.0.1", port))
        return sync.Channel(
            sock, Role.CLIENT, cards.client, keys, Settings(), timeouts or Timeouts()
        )
    except BaseException:
        sock.close()
        raise


@contextlib.contextmanager
def blocking_server(
    serve: Callable[[socket.socket], None], *, buffers: int | None = None
) -> Iterator[int]:
    """A thread that accepts one connection on 127.0.0.1 and runs ``serve``
    on it; yields the port and joins the thread on the way out."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        if buffers is not None:  # accepted sockets inherit them
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
        listener.settimeout(GUARD)
        failures: list[BaseException] = []

        def run() -> None:
            try:
                conn, _ = listener.accept()
                serve(conn)
            except BaseException as exc:  # reported in the test's thread
                failures.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        try:
            yield listener.getsockname()[1]
        finally:
            thread.join(2 * GUARD)
        assert not thread.is_alive()
        if failures:
            raise failures[0]


def answer_transmission_rq(sock: socket.socket) -> None:
    """Read the peer's MESSAGE_TRANSMISSION_RQ and accept it (then read no
    more).  The answer comes a moment later, as over a real network, so the
    sender is already waiting for it."""
    rq = parse_frame(recv_exactly(sock, HEADER_LENGTH + 16), ORDER)
    time.sleep(DRIP_INTERVAL)
    assert rq.message_id is MessageId.MESSAGE_TRANSMISSION_RQ
    length = int.from_bytes(rq.payload[12:16], "big")
    sock.sendall(
        encode_frame(
            ORDER,
            MessageId.MESSAGE_TRANSMISSION_RP,
            pack_u32(ORDER, length),
            option=ACK,
        )
    )


# -- a peer dripping a message ----------------------------------------------------


def drip_a_message(channel: sync.Channel) -> int | None:
    """As the client of ``channel``: start a 1 MiB message by hand, then drip
    its first data notification."""
    sock = channel._sock
    sock.sendall(transmission_rq(BIG))
    rp = parse_frame(recv_exactly(sock, HEADER_LENGTH + 4), ORDER)
    assert rp.message_id is MessageId.MESSAGE_TRANSMISSION_RP
    assert rp.option == ACK
    notification = encode_frame(
        ORDER, MessageId.MESSAGE_TRANSMISSION_NOTIF, bytes(8160)
    )
    return drip_until_dropped(sock, notification)


def test_dripping_peer_is_dropped_by_aio_server() -> None:
    cards, keys = make_cards(), make_keys()
    errors: list[BaseException] = []

    async def handler(channel: aio.AsyncChannel) -> None:
        try:
            await channel.recv()
        except IsclError as exc:
            errors.append(exc)

    def client(port: int) -> int | None:
        channel = client_channel(cards, keys, port)
        try:
            return drip_a_message(channel)
        finally:
            channel.abort()

    async def scenario() -> int | None:
        async with serving(
            handler, cards.server, keys, timeouts=Timeouts(transmission=SHORT)
        ) as port:
            return await asyncio.wait_for(asyncio.to_thread(client, port), 2 * GUARD)

    dropped_after = asyncio.run(scenario())
    assert dropped_after is not None, "the server kept a dripping peer"
    assert dropped_after < MAX_DRIPS
    assert len(errors) == 1
    assert isinstance(errors[0], PeerTimeout)
    assert "did not finish its message in time during messages" in str(errors[0])
    assert "transmission limit 0.3 s" in str(errors[0])


def test_dripping_peer_is_dropped_by_blocking_server() -> None:
    cards, keys = make_cards(), make_keys()
    errors: list[BaseException] = []

    def serve(conn: socket.socket) -> None:
        channel = sync.accept(
            conn, card=cards.server, keys=keys, timeouts=Timeouts(transmission=SHORT)
        )
        try:
            channel.recv()
        except IsclError as exc:
            errors.append(exc)
        finally:
            channel.abort()

    with blocking_server(serve) as port:
        channel = client_channel(cards, keys, port)
        try:
            dropped_after = drip_a_message(channel)
        finally:
            channel.abort()

    assert dropped_after is not None, "the server kept a dripping peer"
    assert dropped_after < MAX_DRIPS
    assert len(errors) == 1
    assert isinstance(errors[0], PeerTimeout)
    assert "did not finish its message in time during messages" in str(errors[0])
    assert "transmission limit 0.3 s" in str(errors[0])


# -- a peer that stops reading ----------------------------------------------------

#: How the receiving peer behaves once authenticated.
NEVER_READS = "never reads"  # does not even answer the transmission request
STOPS_READING = "stops reading"  # accepts the request, then reads no data


def receive_like(peer: str, sock: socket.socket, through: bool) -> None:
    if peer == STOPS_READING and not through:
        answer_transmission_rq(sock)


@pytest.mark.parametrize(
    ("peer", "through"),
    [(NEVER_READS, False), (STOPS_READING, False), (NEVER_READS, True)],
    ids=["secured-never-reads", "secured-stops-reading", "through-never-reads"],
)
def test_blocking_send_times_out_when_the_peer_stops_reading(
    peer: str, through: bool
) -> None:
    cards, keys = make_cards(), make_keys()
    finished = threading.Event()

    def serve(conn: socket.socket) -> None:
        # Through mode allowed: the server's handshake may read the start of
        # the first message, which would otherwise end the connection.
        settings = Settings(allow_through_mode=through)
        channel = sync.accept(conn, card=cards.server, keys=keys, settings=settings)
        try:
            receive_like(peer, channel._sock, through)
            assert finished.wait(GUARD)
        finally:
            channel.abort()

    with blocking_server(serve, buffers=SMALL_BUFFER) as port:
        channel = client_channel(
            cards,
            keys,
            port,
            timeouts=Timeouts(transmission=SHORT),
            buffers=SMALL_BUFFER,
        )
        try:
            send = channel.send_through if through else channel.send
            with pytest.raises(PeerTimeout):
                for _ in range(64):
                    send(bytes(BIG))
        finally:
            finished.set()
            channel.abort()


def shrink_send_buffer(channel: aio.AsyncChannel) -> None:
    sock = channel._writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)


def aio_send_to_a_peer_that(peer: str, through: bool) -> list[BaseException]:
    """An aio server sends up to 64 messages of 1 MiB to a client that
    behaves like ``peer``; what the handler's send raised."""
    cards, keys = make_cards(), make_keys()
    errors: list[BaseException] = []
    finished = threading.Event()

    async def handler(channel: aio.AsyncChannel) -> None:
        shrink_send_buffer(channel)
        send = channel.send_through if through else channel.send
        try:
            for _ in range(64):
                # The guard only turns a hang into a failure of this test.
                await asyncio.wait_for(send(bytes(BIG)), GUARD)
        except (IsclError, TimeoutError) as exc:
            errors.append(exc)
        finally:
            finished.set()

    def client(port: int) -> None:
        channel = client_channel(cards, keys, port, buffers=SMALL_BUFFER)
        try:
            receive_like(peer, channel._sock, through)
            assert finished.wait(2 * GUARD)
        finally:
            channel.abort()

    async def scenario() -> None:
        async with serving(
            handler, cards.server, keys, timeouts=Timeouts(transmission=SHORT)
        ) as port:
            await asyncio.to_thread(client, port)

    asyncio.run(scenario())
    return errors


def test_aio_through_mode_send_times_out_when_the_peer_never_reads() -> None:
    errors = aio_send_to_a_peer_that(NEVER_READS, through=True)
    assert len(errors) == 1
    assert isinstance(errors[0], PeerTimeout)


def test_aio_send_times_out_when_the_peer_never_answers() -> None:
    errors = aio_send_to_a_peer_that(NEVER_READS, through=False)
    assert len(errors) == 1
    assert isinstance(errors[0], PeerTimeout)


def test_aio_send_times_out_when_the_peer_stops_reading() -> None:
    errors = aio_send_to_a_peer_that(STOPS_READING, through=False)
    assert len(errors) == 1
    assert isinstance(errors[0], PeerTimeout)


def test_a_short_foreign_greeting_is_named_when_it_times_out() -> None:
    """An SSH client's banner is shorter than an ISCL header; the server
    waits for the rest of a header and then says what it got."""
    cards, keys = make_cards(), make_keys()
    errors: list[BaseException] = []

    def serve(conn: socket.socket) -> None:
        try:
            sync.accept(
                conn, card=cards.server, keys=keys, timeouts=Timeouts(handshake=SHORT)
            )
        except IsclError as exc:
            errors.append(exc)

    with blocking_server(serve) as port:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"SSH-2.0-x\r\n")
            sock.settimeout(GUARD)
            while sock.recv(4096):
                pass  # until the server gives up and closes

    assert len(errors) == 1
    assert isinstance(errors[0], PeerTimeout)
    assert "did not finish its message in time" in str(errors[0])
    assert str(errors[0]).endswith("; not ISCL: the peer sent an SSH greeting")


def test_a_client_names_a_foreign_server_without_guessing_why_it_closed() -> None:
    cards, keys = make_cards(), make_keys()

    def smtp(conn: socket.socket) -> None:
        with conn:
            conn.sendall(b"220 mx ESMTP\r\n")

    with blocking_server(smtp) as port:
        with pytest.raises(IsclError) as raised:
            sync.connect("127.0.0.1", port, card=cards.client, keys=keys)
    message = str(raised.value)
    assert "not ISCL: the peer sent an SMTP or FTP greeting" in message
    assert "connection limit" not in message
