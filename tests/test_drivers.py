"""The asyncio and blocking drivers over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator

import pytest
from helpers import (
    FailingCard,
    craft,
    make_cards,
    make_keys,
    random_keys,
    serving,
    settle,
)

import iscl_hw
from iscl_hw import aio, sync
from iscl_hw.arbiter import CardArbiter
from iscl_hw.constants import (
    ACK,
    DEFAULT_MAX_MESSAGE_LENGTH,
    HEADER_LENGTH,
    VERSION_V1_00,
    ErrorCode,
    MessageId,
)
from iscl_hw.core import Phase
from iscl_hw.endpoint import Timeouts
from iscl_hw.errors import (
    CardError,
    ConnectionLost,
    IsclError,
    LineClosed,
    PeerNeverSpoke,
    PeerRejectedAuthentication,
    PeerTimeout,
    RemoteProtocolError,
)
from iscl_hw.ratelimit import FailureLimiter, held_against_peer
from iscl_hw.wire import ByteOrder, pack_u32

SHORT = 0.3  # seconds: the phase timeouts under test
Handler = Callable[[aio.AsyncChannel], Awaitable[None]]


def echo(ends: list[Phase]) -> Handler:
    """Echo every message; record the phase the connection ended in."""

    async def handler(channel: aio.AsyncChannel) -> None:
        try:
            while True:
                await channel.send(await channel.recv())
        except LineClosed:
            ends.append(channel.connection.phase)

    return handler


@contextlib.contextmanager
def silent_listener() -> Iterator[socket.socket]:
    """A TCP listener on 127.0.0.1 that never says anything."""
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        yield listener
    finally:
        listener.close()


# -- messages through both drivers -----------------------------------------------------


def test_aio_client_and_aio_server() -> None:
    cards, keys = make_cards(), make_keys()
    big = os.urandom(DEFAULT_MAX_MESSAGE_LENGTH)
    ends: list[Phase] = []

    async def scenario() -> None:
        async with serving(echo(ends), cards.server, keys) as port:
            channel = await aio.open_connection(
                "127.0.0.1", port, card=cards.client, keys=keys
            )
            async with channel:
                assert channel.peer_auth_data == b"iscl"
                await channel.send(b"hello")
                assert await channel.recv() == b"hello"
                await channel.send(big)
                message = await channel.recv_message()
                assert message.data == big
            assert channel.connection.phase is Phase.CLOSED
            await settle()
            assert ends == [Phase.CLOSED]

    asyncio.run(scenario())


def test_blocking_client_and_aio_server() -> None:
    cards, keys = make_cards(), make_keys()
    big = os.urandom(DEFAULT_MAX_MESSAGE_LENGTH)
    ends: list[Phase] = []

    def client(port: int) -> None:
        with iscl_hw.connect("127.0.0.1", port, card=cards.client, keys=keys) as ch:
            assert ch.peer_auth_data == b"iscl"
            ch.send(b"hello")
            assert ch.recv() == b"hello"
            ch.send(big)
            assert ch.recv() == big
        assert ch.connection.phase is Phase.CLOSED

    async def scenario() -> None:
        async with serving(echo(ends), cards.server, keys) as port:
            await asyncio.to_thread(client, port)
            await settle()
            assert ends == [Phase.CLOSED]

    asyncio.run(scenario())


def test_blocking_client_and_blocking_server() -> None:
    cards, keys = make_cards(), make_keys()
    ends: list[BaseException] = []

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            channel = sync.accept(conn, card=cards.server, keys=keys)
            try:
                channel.send(channel.recv()[::-1])
                channel.recv()
            except LineClosed as exc:
                ends.append(exc)
            finally:
                channel.abort()

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with iscl_hw.connect(
                "127.0.0.1", port, card=cards.client, keys=keys
            ) as channel:
                channel.send(b"abc")
                assert channel.recv() == b"cba"
        finally:
            thread.join()
    assert len(ends) == 1


# -- timeouts --------------------------------------------------------------------------


def test_silent_peer_times_out_on_aio_server(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="iscl_hw.aio")
    cards, keys = make_cards(), make_keys()

    async def scenario() -> None:
        async with serving(
            echo([]), cards.server, keys, timeouts=Timeouts(handshake=SHORT)
        ) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                header = await reader.readexactly(HEADER_LENGTH + 8)
                assert header[4:8] == struct.pack(
                    ">I", MessageId.LINE_CONNECTION_CHECK_RQ
                )
                assert await reader.read() == b""  # the server gave up
            finally:
                writer.close()
                await writer.wait_closed()
            await settle()

    asyncio.run(scenario())
    errors = [
        r.args[1]
        for r in caplog.records
        if r.msg.startswith(("handshake with", "%s left without"))
        and isinstance(r.args, tuple)
    ]
    assert len(errors) == 1
    assert isinstance(errors[0], PeerNeverSpoke)
    assert isinstance(errors[0].__cause__, PeerTimeout)


def test_silent_peer_times_out_on_blocking_accept() -> None:
    cards, keys = make_cards(), make_keys()
    with silent_listener() as listener:
        with socket.create_connection(listener.getsockname()) as fake:
            conn, _ = listener.accept()
            with pytest.raises(PeerTimeout):
                sync.accept(
                    conn,
                    card=cards.server,
                    keys=keys,
                    timeouts=Timeouts(handshake=SHORT),
                )
            assert conn.fileno() == -1
            # The server wrote its line connection check and then closed.
            received = b""
            while chunk := fake.recv(4096):
                received += chunk
            assert len(received) == HEADER_LENGTH + 8


def test_server_never_answers_blocking_client() -> None:
    cards, keys = make_cards(), make_keys()
    with silent_listener() as listener:
        with pytest.raises(PeerTimeout):
            iscl_hw.connect(
                *listener.getsockname(),
                card=cards.client,
                keys=keys,
                timeouts=Timeouts(handshake=SHORT),
            )


def test_server_never_answers_aio_client() -> None:
    cards, keys = make_cards(), make_keys()

    async def scenario() -> None:
        with silent_listener() as listener:
            with pytest.raises(PeerTimeout):
                await aio.open_connection(
                    *listener.getsockname(),
                    card=cards.client,
                    keys=keys,
                    timeouts=Timeouts(handshake=SHORT),
                )

    asyncio.run(scenario())


async def fake_client_until_pass1(port: int) -> asyncio.StreamWriter:
    """Speak the client's part up to the server's challenge, then stop."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readexactly(HEADER_LENGTH + 8)  # LINE_CONNECTION_CHECK_RQ
    writer.write(
        craft(
            MessageId.LINE_CONNECTION_CHECK_RP,
            pack_u32(ByteOrder.BIG, VERSION_V1_00, 8160),
            option=ACK,
        )
    )
    header = await reader.readexactly(HEADER_LENGTH)  # MUTUAL_AUTH_RQ
    (length,) = struct.unpack_from(">I", header, 8)
    await reader.readexactly(length)
    writer.write(
        craft(
            MessageId.MUTUAL_AUTH_RP, pack_u32(ByteOrder.BIG, 4) + b"fake", option=ACK
        )
    )
    pass1 = await reader.readexactly(HEADER_LENGTH + 8)
    assert pass1[4:8] == struct.pack(">I", MessageId.MUTUAL_AUTH_PASS1_NOTIF)
    writer.reader = reader  # type: ignore[attr-defined]
    return writer


@pytest.mark.parametrize("stall", ["silent", "eof"])
def test_stalled_peer_does_not_keep_the_card(stall: str) -> None:
    cards, keys = make_cards(), make_keys()
    # span_wait 0: a span still held would fail the next handshake at once.
    server_card = CardArbiter(cards.server, span_wait=0.0)

    async def scenario() -> None:
        async with serving(
            echo([]),
            server_card,
            keys,
            timeouts=Timeouts(peer_answer=SHORT),
        ) as port:
            writer = await fake_client_until_pass1(port)
            try:
                if stall == "eof":
                    writer.write_eof()
                reader: asyncio.StreamReader = writer.reader  # type: ignore[attr-defined]
                assert await reader.read() == b""  # the server dropped us
            finally:
                writer.close()
                await writer.wait_closed()
            await settle()
            probe = object()
            server_card.acquire(probe)  # CardBusy at once if the span leaked
            server_card.release(probe)
            channel = await aio.open_connection(
                "127.0.0.1", port, card=cards.client, keys=keys
            )
            async with channel:
                await channel.send(b"ok")
                assert await channel.recv() == b"ok"

    asyncio.run(scenario())


# -- rate limiting ---------------------------------------------------------------------


def test_failed_authentications_get_a_peer_refused() -> None:
    cards = make_cards()
    impostor = make_cards(client_keys=random_keys()).client
    keys = make_keys()
    limiter = FailureLimiter(max_failures=2, window=60.0, cooldown=60.0)

    async def connect(card: object) -> aio.AsyncChannel:
        return await aio.open_connection(
            "127.0.0.1",
            port,
            card=card,  # type: ignore[arg-type]
            keys=keys,
            timeouts=Timeouts(handshake=5.0),
        )

    async def scenario() -> None:
        nonlocal port
        async with serving(echo([]), cards.server, keys, limiter=limiter) as port:
            # A good peer first; its success does not count.
            async with await connect(cards.client) as channel:
                await channel.send(b"ok")
            for _ in range(2):
                assert not limiter.blocked("127.0.0.1")
                with pytest.raises(PeerRejectedAuthentication):
                    await connect(impostor)
                await settle()
            assert limiter.blocked("127.0.0.1")
            # Now even the right card is refused from this address, and the
            # client's error says what may be behind the closed connection.
            with pytest.raises(ConnectionLost, match="refusing this address"):
                await connect(cards.client)
            await settle()

    port = 0
    before = cards.counters()
    asyncio.run(scenario())
    assert cards.counters() == before
    assert cards.server_apdus.commands.count("GET CHALLENGE") == 3


def test_a_peer_reporting_its_card_failed_is_still_counted() -> None:
    """A client that says its card failed after holding our card up to the
    peer-answer limit must not hold it for free: such failures count, and
    the client is told, when refused, that the server may be refusing its
    address."""
    cards, keys = make_cards(), make_keys()
    limiter = FailureLimiter(max_failures=2, window=60.0, cooldown=60.0)

    async def scenario() -> None:
        async with serving(echo([]), cards.server, keys, limiter=limiter) as port:
            for _ in range(2):
                failing = FailingCard(cards.client, 0)  # its first operation
                with pytest.raises(CardError):
                    await aio.open_connection(
                        "127.0.0.1", port, card=failing, keys=keys
                    )
                await settle()
            assert limiter.blocked("127.0.0.1")
            with pytest.raises(ConnectionLost, match="refusing this address"):
                await aio.open_connection(
                    "127.0.0.1", port, card=cards.client, keys=keys
                )

    asyncio.run(scenario())


def test_a_server_closing_at_once_is_explained_to_both_clients() -> None:
    """A server that closes before line connection (at its connection limit,
    or refusing the address): both clients' errors say what may be behind
    it."""
    cards, keys = make_cards(), make_keys()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def close_at_once() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            conn.close()

    closer = threading.Thread(target=close_at_once)
    closer.start()
    try:
        with pytest.raises(ConnectionLost, match="refusing this address"):
            sync.connect("127.0.0.1", port, card=cards.client, keys=keys)

        async def aio_client() -> None:
            await aio.open_connection("127.0.0.1", port, card=cards.client, keys=keys)

        with pytest.raises(ConnectionLost, match="refusing this address"):
            asyncio.run(aio_client())
    finally:
        closer.join(10)
        listener.close()


def test_what_counts_against_a_peer() -> None:
    assert held_against_peer(PeerRejectedAuthentication("wrong answer"))
    assert held_against_peer(PeerTimeout("stalled while holding our card"))
    assert held_against_peer(RemoteProtocolError("bad length", ErrorCode.BAD_LENGTH))
    assert not held_against_peer(CardError("our card"))
    assert not held_against_peer(PeerNeverSpoke("a probe"))
    assert held_against_peer(
        RemoteProtocolError("peer's card failed", ErrorCode.REMOTE_ICCARD)
    )


# -- file descriptors ------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_leaked_file_descriptors() -> None:
    cards, keys = make_cards(), make_keys()
    impostor = make_cards(client_keys=random_keys()).client

    def blocking(port: int, i: int) -> None:
        with iscl_hw.connect("127.0.0.1", port, card=cards.client, keys=keys) as ch:
            ch.send(b"%d" % i)
            assert ch.recv() == b"%d" % i

    async def aio_client(port: int, i: int) -> None:
        async with await aio.open_connection(
            "127.0.0.1", port, card=cards.client, keys=keys
        ) as channel:
            await channel.send(b"%d" % i)
            assert await channel.recv() == b"%d" % i

    async def failing(port: int) -> None:
        with pytest.raises(PeerRejectedAuthentication):
            await aio.open_connection("127.0.0.1", port, card=impostor, keys=keys)

    async def scenario() -> tuple[int, int]:
        before = open_fds()
        async with serving(
            echo([]),
            cards.server,
            keys,
            limiter=FailureLimiter(max_failures=1000),
        ) as port:
            for _ in range(3):
                await asyncio.gather(
                    *(aio_client(port, i) for i in range(10)),
                    *(asyncio.to_thread(blocking, port, i) for i in range(5)),
                    *(failing(port) for _ in range(3)),
                )
        return before, open_fds()

    before, after = asyncio.run(scenario())
    assert after == before


# -- admission -------------------------------------------------------------------------

GUARD = 5.0  # seconds: the longest a step may hang before the test fails


async def refused_at_once(port: int) -> bool:
    """Connect and read: True if the server closed (or reset) the connection
    before sending a single byte."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.read(1), GUARD) == b""
    except ConnectionResetError:
        return True
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def test_connections_over_the_limit_are_closed_at_once() -> None:
    cards, keys = make_cards(), make_keys()
    limiter = FailureLimiter(max_failures=1)

    async def connect() -> aio.AsyncChannel:
        return await aio.open_connection(
            "127.0.0.1", port, card=cards.client, keys=keys
        )

    async def scenario() -> None:
        nonlocal port
        async with serving(
            echo([]), cards.server, keys, limiter=limiter, max_connections=2
        ) as port:
            for _ in range(2):  # the count goes down again when they end
                first, second = await connect(), await connect()
                async with first, second:
                    assert await refused_at_once(port)
                    with pytest.raises(ConnectionLost):
                        await connect()
                    # The two admitted ones still work.
                    for channel in (first, second):
                        await channel.send(b"ok")
                        assert await channel.recv() == b"ok"
                await settle()
            # Refusals at the limit are not failed authentications.
            assert not limiter.blocked("127.0.0.1")

    port = 0
    asyncio.run(scenario())
    assert cards.server_apdus.commands.count("GET CHALLENGE") == 4


def test_second_handshake_from_a_peer_waits_for_the_stalled_one() -> None:
    cards, keys = make_cards(), make_keys()
    # span_wait 0: a second handshake reaching the card while the stalled
    # one holds it would fail at once; with one slot per peer it waits.
    server_card = CardArbiter(cards.server, span_wait=0.0)
    limiter = FailureLimiter(max_failures=5)

    async def scenario() -> None:
        async with serving(
            echo([]),
            server_card,
            keys,
            timeouts=Timeouts(peer_answer=SHORT, handshake=2.0),
            limiter=limiter,
            max_handshakes_per_peer=1,
        ) as port:
            stalled = await fake_client_until_pass1(port)
            second = asyncio.create_task(
                aio.open_connection("127.0.0.1", port, card=cards.client, keys=keys)
            )
            try:
                reader: asyncio.StreamReader = stalled.reader  # type: ignore[attr-defined]
                assert await asyncio.wait_for(reader.read(), GUARD) == b""
                channel = await asyncio.wait_for(second, GUARD)
                async with channel:
                    await channel.send(b"after the stall")
                    assert await channel.recv() == b"after the stall"
            finally:
                second.cancel()
                stalled.close()
                await stalled.wait_closed()

    asyncio.run(scenario())
    assert not limiter.blocked("127.0.0.1")
    assert cards.server_apdus.commands.count("GET CHALLENGE") == 2


async def stall_silently(port: int) -> None:
    """Connect, read the line connection check, answer nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.readexactly(HEADER_LENGTH + 8)
        assert await asyncio.wait_for(reader.read(), GUARD) == b""
    finally:
        writer.close()
        await writer.wait_closed()


async def stall_after_pass1(port: int) -> None:
    """Take the server's challenge (it holds its card), answer nothing."""
    writer = await fake_client_until_pass1(port)
    try:
        reader: asyncio.StreamReader = writer.reader  # type: ignore[attr-defined]
        assert await asyncio.wait_for(reader.read(), GUARD) == b""
    finally:
        writer.close()
        await writer.wait_closed()


def test_stalled_handshakes_get_a_peer_blocked() -> None:
    """A peer that takes our challenge (our card's span) and stalls is
    blocked after max_failures."""
    cards, keys = make_cards(), make_keys()
    limiter = FailureLimiter(max_failures=2, window=60.0, cooldown=60.0)

    async def scenario() -> None:
        async with serving(
            echo([]),
            cards.server,
            keys,
            timeouts=Timeouts(peer_answer=SHORT, handshake=2 * SHORT),
            limiter=limiter,
        ) as port:
            for _ in range(2):
                assert not limiter.blocked("127.0.0.1")
                await stall_after_pass1(port)
                await settle()
            assert limiter.blocked("127.0.0.1")
            assert await refused_at_once(port)
            with pytest.raises(ConnectionLost):
                await aio.open_connection(
                    "127.0.0.1", port, card=cards.client, keys=keys
                )
            await settle()

    asyncio.run(scenario())


def test_peers_that_never_speak_iscl_are_not_blocked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Connect-and-wait or connect-and-close (a health check, a port scan)
    never reaches the card: neither a failure nor an audit record."""
    caplog.set_level(logging.INFO, logger="iscl.audit")
    cards, keys = make_cards(), make_keys()
    limiter = FailureLimiter(max_failures=2, window=60.0, cooldown=60.0)

    async def scenario() -> None:
        async with serving(
            echo([]),
            cards.server,
            keys,
            timeouts=Timeouts(handshake=SHORT),
            limiter=limiter,
        ) as port:
            for _ in range(3):
                await stall_silently(port)
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                await settle()
            assert not limiter.blocked("127.0.0.1")
            channel = await aio.open_connection(
                "127.0.0.1", port, card=cards.client, keys=keys
            )
            await channel.close()
            await settle()

    asyncio.run(scenario())
    outcomes = [r.__dict__["outcome"] for r in caplog.records if r.name == "iscl.audit"]
    assert outcomes == ["success"]


def test_connection_waiting_for_a_slot_is_refused_once_its_peer_is_blocked() -> None:
    cards, keys = make_cards(), make_keys()
    limiter = FailureLimiter(max_failures=1, window=60.0, cooldown=60.0)

    async def scenario() -> None:
        async with serving(
            echo([]),
            cards.server,
            keys,
            timeouts=Timeouts(peer_answer=SHORT, handshake=2.0),
            limiter=limiter,
            max_handshakes_per_peer=1,
        ) as port:
            stalled = await fake_client_until_pass1(port)
            # Accepted while the address is not blocked yet; waits its turn.
            waiting = asyncio.create_task(refused_at_once(port))
            try:
                reader: asyncio.StreamReader = stalled.reader  # type: ignore[attr-defined]
                assert await asyncio.wait_for(reader.read(), GUARD) == b""
                assert limiter.blocked("127.0.0.1")  # the stall counted
                assert await asyncio.wait_for(waiting, GUARD)
            finally:
                waiting.cancel()
                stalled.close()
                await stalled.wait_closed()

    asyncio.run(scenario())


def test_server_audits_every_authentication(caplog: pytest.LogCaptureFixture) -> None:
    """One audit record per handshake the server runs: success and failure,
    with the peer and the key index."""
    from helpers import make_card

    caplog.set_level(logging.INFO, logger="iscl.audit")
    cards, keys = make_cards(), make_keys()
    stranger, _, _ = make_card(random_keys())

    async def scenario() -> None:
        async with serving(echo([]), cards.server, keys) as port:
            channel = await aio.open_connection(
                "127.0.0.1", port, card=cards.client, keys=keys
            )
            await channel.close()
            with pytest.raises(IsclError):
                await aio.open_connection("127.0.0.1", port, card=stranger, keys=keys)
            await settle()

    asyncio.run(scenario())
    records = [r for r in caplog.records if r.name == "iscl.audit"]
    outcomes = [(r.__dict__["outcome"], r.__dict__["key_index"]) for r in records]
    assert outcomes == [("success", 1), ("failure", 1)]
    assert all(r.__dict__["peer"].startswith("127.0.0.1") for r in records)
    assert records[1].levelno == logging.WARNING


def test_the_audit_record_tells_our_card_failing_from_the_peer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="iscl.audit")
    cards, keys = make_cards(), make_keys()
    wrong = make_cards()  # another authentication key set
    failing = FailingCard(cards.server, fail_at=0)

    async def scenario() -> None:
        for server_card, client_card in (
            (failing, cards.client),
            (cards.server, wrong.client),
        ):
            async with serving(echo([]), server_card, keys) as port:
                with pytest.raises(IsclError):
                    await aio.open_connection(
                        "127.0.0.1", port, card=client_card, keys=keys
                    )
                await settle()

    asyncio.run(scenario())
    records = [r for r in caplog.records if r.name == "iscl.audit"]
    assert [r.__dict__["failed_on"] for r in records] == ["our card", "peer or line"]
    assert records[0].getMessage().startswith("authentication failed (our card): ")
    assert records[1].getMessage().startswith("authentication failed: peer ")
