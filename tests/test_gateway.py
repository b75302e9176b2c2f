"""The server and tunnel gateways on 127.0.0.1, with soft cards.

A plain TCP target (echo, sink or source) sits behind a server gateway, a
tunnel gateway in front of it, and the test speaks plain TCP to the tunnel:

    client --TCP--> tunnel --ISCL--> [middle] --ISCL--> server --TCP--> target

``Middle`` is a frame-aware TCP proxy that can spoil or drop ISCL traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import struct
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from helpers import (
    CardPair,
    flip_bit,
    make_cards,
    make_keys,
    parse_frame,
    random_keys,
    settle,
    split_frames,
)
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from iscl_hw import aio
from iscl_hw.card import Card
from iscl_hw.constants import MessageId
from iscl_hw.core import Role
from iscl_hw.endpoint import Timeouts
from iscl_hw.errors import ConfigError
from iscl_hw.gateway import (
    Gateway,
    GatewayLimits,
    MalformedProxyHeader,
    ProxyHeader,
    read_proxy_header,
    serve_gateway,
    start_server_gateway,
    start_tunnel_gateway,
    tunnel_gateway,
)
from iscl_hw.keyfile import KeyStore
from iscl_hw.oplog import AUDIT_LOGGER
from iscl_hw.ratelimit import FailureLimiter
from iscl_hw.settings import Settings
from iscl_hw.wire import ByteOrder

Address = tuple[str, int]
LOCAL = ("127.0.0.1", 0)
GUARD = 10.0  # seconds: the longest a step may hang before the test fails
LIMITS = GatewayLimits(message_size=64 * 1024, stop_grace=0.0)


# -- plain TCP ends --------------------------------------------------------------------


async def read_to_end(reader: asyncio.StreamReader, into: bytearray) -> str:
    """Read until the stream ends; "eof" or "reset"."""
    try:
        async with asyncio.timeout(GUARD):
            while chunk := await reader.read(65536):
                into += chunk
    except ConnectionResetError:
        return "reset"
    return "eof"


@dataclass
class Seen:
    """What one connection to the target saw."""

    data: bytearray = field(default_factory=bytearray)
    ended: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)


TargetHandler = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter, Seen], Awaitable[None]
]


async def sink(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen
) -> None:
    seen.ended = await read_to_end(reader, seen.data)


async def echo(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen
) -> None:
    try:
        while chunk := await reader.read(65536):
            seen.data += chunk
            writer.write(chunk)
            await writer.drain()
    except ConnectionResetError:
        seen.ended = "reset"
    else:
        seen.ended = "eof"


@contextlib.asynccontextmanager
async def target(handler: TargetHandler) -> AsyncIterator[tuple[Address, list[Seen]]]:
    """A plain TCP service on 127.0.0.1; yields its address and what each
    connection to it saw."""
    seen: list[Seen] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(record := Seen())
        try:
            await handler(reader, writer, record)
        finally:
            record.done.set()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(serve, *LOCAL)
    try:
        yield server.sockets[0].getsockname()[:2], seen
    finally:
        server.close()
        await server.wait_closed()


# -- gateways --------------------------------------------------------------------------


@dataclass
class Pair:
    tunnel: Gateway
    server: Gateway
    cards: CardPair
    keys: KeyStore

    @property
    def address(self) -> Address:
        return self.tunnel.address


@contextlib.asynccontextmanager
async def gateways(
    forward: Address,
    *,
    limits: GatewayLimits = LIMITS,
    tunnel_limits: GatewayLimits | None = None,
    server_settings: Settings | None = None,
    tunnel_settings: Settings | None = None,
    tunnel_card: Card | None = None,
    tunnel_keys: KeyStore | None = None,
    middle: Middle | None = None,
    timeouts: Timeouts | None = None,
) -> AsyncIterator[Pair]:
    cards, keys = make_cards(), make_keys()
    server = await start_server_gateway(
        LOCAL,
        forward,
        card=cards.server,
        keys=keys,
        settings=server_settings,
        timeouts=timeouts,
        limits=limits,
    )
    remote = server.address if middle is None else await middle.start(server.address)
    tunnel = await start_tunnel_gateway(
        LOCAL,
        remote,
        card=tunnel_card or cards.client,
        keys=tunnel_keys or keys,
        settings=tunnel_settings,
        timeouts=timeouts,
        limits=tunnel_limits or limits,
    )
    try:
        yield Pair(tunnel, server, cards, keys)
    finally:
        await tunnel.shutdown(grace=0)
        await server.shutdown(grace=0)
        if middle is not None:
            middle.close()
        await settle()


async def connect(
    address: Address,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*address)


async def exchange(address: Address, payload: bytes) -> bytes:
    """Send ``payload`` through an echo path while reading it back."""
    reader, writer = await connect(address)
    try:

        async def send() -> None:
            writer.write(payload)
            await writer.drain()

        sending = asyncio.create_task(send())
        async with asyncio.timeout(GUARD * 3):
            echoed = await reader.readexactly(len(payload))
        await sending
        return echoed
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def gateway_lines(
    caplog: pytest.LogCaptureFixture, kind: str
) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "iscl_hw.gateway" and r.getMessage().startswith(f"{kind} gateway")
    ]


# -- bytes through ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 8159, 8160, 100_000, 3_000_000])
def test_bytes_go_both_ways(size: int) -> None:
    payload = os.urandom(size)

    async def scenario() -> None:
        async with target(echo) as (forward, seen), gateways(forward) as pair:
            assert await exchange(pair.address, payload) == payload
            await asyncio.wait_for(seen[0].done.wait(), GUARD)
            assert seen[0].data == payload

    asyncio.run(scenario())


def test_large_transfer_with_both_directions_busy() -> None:
    payload = os.urandom(12 * 1024 * 1024)

    async def scenario() -> None:
        async with target(echo) as (forward, _), gateways(forward) as pair:
            echoed = await exchange(pair.address, payload)
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()

    asyncio.run(scenario())


def test_many_connections_at_once() -> None:
    payloads = [os.urandom(50_000 + i) for i in range(40)]

    async def scenario() -> None:
        async with target(echo) as (forward, seen), gateways(forward) as pair:
            echoed = await asyncio.gather(
                *(exchange(pair.address, p) for p in payloads)
            )
            assert echoed == payloads
            assert len(seen) == len(payloads)
            await settle_gateways(pair)

    asyncio.run(scenario())


async def settle_gateways(pair: Pair) -> None:
    async with asyncio.timeout(GUARD):
        while pair.tunnel.active or pair.server.active:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("small", ["server", "tunnel"])
def test_peer_with_a_smaller_maximum_message_length(
    small: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    tight = Settings(max_message_length=1000)
    request, reply = os.urandom(200_000), os.urandom(300_000)

    async def answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen
    ) -> None:
        seen.data += await reader.readexactly(len(request))
        writer.write(reply)  # in one piece: messages as large as allowed
        await writer.drain()

    async def scenario() -> None:
        async with (
            target(answer) as (forward, seen),
            gateways(
                forward,
                server_settings=tight if small == "server" else None,
                tunnel_settings=tight if small == "tunnel" else None,
            ) as pair,
        ):
            reader, writer = await connect(pair.address)
            writer.write(request)
            received = bytearray()
            assert await read_to_end(reader, received) == "eof"
            assert received == reply
            assert seen[0].data == request
            writer.close()
            await settle_gateways(pair)

    asyncio.run(scenario())
    learner = "tunnel" if small == "server" else "server"
    (line,) = gateway_lines(caplog, learner)
    assert "messages up to 1000 bytes" in line.getMessage()
    refusals = [r for r in caplog.records if "peer refused message" in r.getMessage()]
    assert len(refusals) == 1  # learned once, then every message fits


# -- endings ---------------------------------------------------------------------------


def test_client_end_drains_then_disconnects_the_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    payload = os.urandom(2_000_000)

    async def scenario() -> None:
        async with target(sink) as (forward, seen), gateways(forward) as pair:
            reader, writer = await connect(pair.address)
            writer.write(payload)
            writer.write_eof()
            rest = bytearray()
            assert await read_to_end(reader, rest) == "eof"
            assert rest == b""
            writer.close()
            await asyncio.wait_for(seen[0].done.wait(), GUARD)
            assert seen[0].ended == "eof"
            assert seen[0].data == payload  # what was in flight arrived first
            await settle_gateways(pair)

    asyncio.run(scenario())
    (tunnel,) = gateway_lines(caplog, "tunnel")
    (server,) = gateway_lines(caplog, "server")
    assert tunnel.getMessage().endswith("plain side closed")
    assert server.getMessage().endswith("closed by peer")


def test_target_end_disconnects_the_line_and_closes_the_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    greeting = os.urandom(300_000)

    async def say_and_go(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen
    ) -> None:
        writer.write(greeting)
        await writer.drain()

    async def scenario() -> None:
        async with target(say_and_go) as (forward, _), gateways(forward) as pair:
            reader, writer = await connect(pair.address)
            received = bytearray()
            assert await read_to_end(reader, received) == "eof"
            assert received == greeting
            writer.close()
            await settle_gateways(pair)

    asyncio.run(scenario())
    (server,) = gateway_lines(caplog, "server")
    (tunnel,) = gateway_lines(caplog, "tunnel")
    assert server.getMessage().endswith("plain side closed")
    assert tunnel.getMessage().endswith("closed by peer")
    assert server.levelno == tunnel.levelno == logging.INFO


def test_operator_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        async with target(echo) as (forward, _), gateways(forward) as pair:
            assert await exchange(pair.address, b"x" * 1000) == b"x" * 1000
            await settle_gateways(pair)

    asyncio.run(scenario())
    (line,) = gateway_lines(caplog, "server")
    text = line.getMessage()
    assert text.startswith("server gateway, peer 127.0.0.1:")
    assert "key 1, block 8160, DES_CBC+MD5, messages up to 65536 bytes" in text
    assert "1000 bytes sent, 1000 received" in text
    # The same as fields, for JSON-lines logs.
    fields = vars(line)
    assert fields["gateway"] == "server"
    assert (fields["key_index"], fields["outcome"]) == (1, "closed by peer")
    assert (fields["bytes_sent"], fields["bytes_received"]) == (1000, 1000)
    audit = [vars(r) for r in caplog.records if r.name == AUDIT_LOGGER]
    assert sorted(a["role"] for a in audit) == ["client", "server"]
    assert {a["outcome"] for a in audit} == {"success"}


# -- failures: reset on both plain sides -----------------------------------------------


class Middle:
    """A TCP proxy between the gateways that reads ISCL frames.  The data
    notification number ``at`` going ``direction`` ("up": to the target,
    "down": to the client) is spoilt (``fault`` "flip") or makes the proxy
    drop both connections ("drop")."""

    def __init__(self, direction: str, fault: str, at: int = 1) -> None:
        self.direction = direction
        self.fault = fault
        self.at = at
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self, upstream: Address) -> Address:
        async def serve(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            up_reader, up_writer = await connect(upstream)
            self._writers += [writer, up_writer]
            await asyncio.gather(
                self._pipe(reader, up_writer, "up"),
                self._pipe(up_reader, writer, "down"),
                return_exceptions=True,
            )
            self.close()

        self._server = await asyncio.start_server(serve, *LOCAL)
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str
    ) -> None:
        buffer, count = bytearray(), 0
        while chunk := await reader.read(65536):
            buffer += chunk
            for frame in split_frames(buffer, ByteOrder.BIG):
                data = (
                    parse_frame(frame).message_id
                    is MessageId.MESSAGE_TRANSMISSION_NOTIF
                )
                if data and direction == self.direction:
                    if count == self.at and self.fault == "drop":
                        self.close()
                        return
                    if count == self.at:
                        frame = flip_bit(frame, 0)
                    count += 1
                writer.write(frame)
            await writer.drain()
        writer.close()

    def close(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()


@pytest.mark.parametrize("fault", ["flip", "drop"])
def test_failure_towards_the_target_resets_both_plain_sides(
    fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    first, second = os.urandom(1000), os.urandom(1000)

    async def scenario() -> None:
        async with (
            target(sink) as (forward, seen),
            gateways(forward, middle=Middle("up", fault)) as pair,
        ):
            reader, writer = await connect(pair.address)
            writer.write(first)
            async with asyncio.timeout(GUARD):
                while len(seen) < 1 or len(seen[0].data) < len(first):
                    await asyncio.sleep(0.01)
            writer.write(second)
            assert await read_to_end(reader, bytearray()) == "reset"
            await asyncio.wait_for(seen[0].done.wait(), GUARD)
            assert seen[0].ended == "reset"
            assert seen[0].data == first  # nothing of the failed message
            writer.close()

    asyncio.run(scenario())
    (server,) = gateway_lines(caplog, "server")
    if fault == "flip":
        assert "integrity failure" in server.getMessage()
        assert server.levelno == logging.WARNING
    else:
        assert "ISCL connection failed" in server.getMessage()


@pytest.mark.parametrize("fault", ["flip", "drop"])
def test_failure_towards_the_client_resets_both_plain_sides(fault: str) -> None:
    first, second = os.urandom(1000), os.urandom(1000)
    go_on = asyncio.Event()

    async def source(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen
    ) -> None:
        writer.write(first)
        await go_on.wait()
        writer.write(second)
        seen.ended = await read_to_end(reader, seen.data)

    async def scenario() -> None:
        async with (
            target(source) as (forward, seen),
            gateways(forward, middle=Middle("down", fault)) as pair,
        ):
            reader, writer = await connect(pair.address)
            assert await asyncio.wait_for(reader.readexactly(1000), GUARD) == first
            go_on.set()
            rest = bytearray()
            assert await read_to_end(reader, rest) == "reset"
            assert rest == b""
            await asyncio.wait_for(seen[0].done.wait(), GUARD)
            assert seen[0].ended == "reset"
            writer.close()

    asyncio.run(scenario())


def test_wrong_card_key_resets_the_client(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    impostor = make_cards(client_keys=random_keys()).client

    async def scenario() -> None:
        async with (
            target(sink) as (forward, seen),
            gateways(forward, tunnel_card=impostor) as pair,
        ):
            reader, writer = await connect(pair.address)
            writer.write(b"A-ASSOCIATE-RQ, say")
            assert await read_to_end(reader, bytearray()) == "reset"
            writer.close()
            await settle_gateways(pair)
            assert seen == []  # the target was never connected

    asyncio.run(scenario())
    for kind in ("server", "tunnel"):
        (line,) = gateway_lines(caplog, kind)
        assert "authentication failed" in line.getMessage()
        assert line.levelno == logging.WARNING


def test_wrong_encryption_key_resets_both_plain_sides(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        async with (
            target(sink) as (forward, seen),
            gateways(forward, tunnel_keys=make_keys()) as pair,
        ):
            reader, writer = await connect(pair.address)
            writer.write(b"secret")
            assert await read_to_end(reader, bytearray()) == "reset"
            await asyncio.wait_for(seen[0].done.wait(), GUARD)
            assert seen[0].ended == "reset"
            assert seen[0].data == b""
            writer.close()

    asyncio.run(scenario())
    (server,) = gateway_lines(caplog, "server")
    assert "integrity failure" in server.getMessage()


def test_plain_reset_aborts_the_other_side() -> None:
    async def scenario() -> None:
        async with target(sink) as (forward, seen), gateways(forward) as pair:
            _, writer = await connect(pair.address)
            writer.write(b"hello")
            async with asyncio.timeout(GUARD):
                while not seen or not seen[0].data:
                    await asyncio.sleep(0.01)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            writer.transport.abort()
            await asyncio.wait_for(seen[0].done.wait(), GUARD)
            assert seen[0].ended == "reset"

    asyncio.run(scenario())


# -- back-pressure ---------------------------------------------------------------------

TOTAL = 24 * 1024 * 1024
BLOCK = os.urandom(256 * 1024)
# Both gateways, the test's own buffers and the channels' state: a few
# 64 KiB messages per direction.  Far below what flows, and below what the
# kernel's socket buffers alone take in while the reader stalls.
MEMORY_BOUND = 4 * 1024 * 1024


@pytest.mark.parametrize("stalled", ["target", "client"])
def test_stalled_reader_keeps_gateway_memory_bounded(stalled: str) -> None:
    resume = asyncio.Event()
    pushed = 0
    digest = hashlib.sha256(BLOCK * (TOTAL // len(BLOCK))).digest()

    async def push(writer: asyncio.StreamWriter) -> None:
        nonlocal pushed
        for _ in range(TOTAL // len(BLOCK)):
            writer.write(BLOCK)
            await writer.drain()
            pushed += len(BLOCK)
        writer.write_eof()

    async def stalled_read(reader: asyncio.StreamReader) -> tuple[int, bytes]:
        await resume.wait()
        hasher, count = hashlib.sha256(), 0
        while chunk := await reader.read(65536):
            hasher.update(chunk)
            count += len(chunk)
        return count, hasher.digest()

    received: list[tuple[int, bytes]] = []

    async def far_end(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen
    ) -> None:
        if stalled == "target":
            received.append(await stalled_read(reader))
        else:
            await push(writer)
            await reader.read()

    async def scenario() -> int:
        async with target(far_end) as (forward, seen), gateways(forward) as pair:
            tracemalloc.start()
            try:
                baseline = tracemalloc.get_traced_memory()[0]
                reader, writer = await connect(pair.address)
                if stalled == "target":
                    pushing = asyncio.create_task(push(writer))
                else:
                    reading = asyncio.create_task(stalled_read(reader))
                await asyncio.sleep(2.0)
                assert pushed < TOTAL  # the stall reached the writer
                resume.set()
                if stalled == "target":
                    await asyncio.wait_for(pushing, GUARD * 3)
                    await asyncio.wait_for(seen[0].done.wait(), GUARD * 3)
                else:
                    received.append(await asyncio.wait_for(reading, GUARD * 3))
                writer.close()
                peak = tracemalloc.get_traced_memory()[1] - baseline
            finally:
                tracemalloc.stop()
        assert received == [(TOTAL, digest)]
        return peak

    peak = asyncio.run(scenario())
    assert peak < MEMORY_BOUND, f"peak {peak} bytes"


# -- limits and stopping ---------------------------------------------------------------


def test_connections_over_the_limit_are_reset() -> None:
    async def scenario() -> None:
        async with (
            target(echo) as (forward, _),
            gateways(forward, tunnel_limits=GatewayLimits(max_connections=1)) as pair,
        ):
            first_reader, first_writer = await connect(pair.address)
            first_writer.write(b"one")
            assert await asyncio.wait_for(first_reader.readexactly(3), GUARD) == b"one"
            reader, writer = await connect(pair.address)
            assert await read_to_end(reader, bytearray()) == "reset"
            writer.close()
            first_writer.close()
            await settle_gateways(pair)
            assert await exchange(pair.address, b"again") == b"again"

    asyncio.run(scenario())


def test_handshakes_wait_their_turn() -> None:
    payloads = [os.urandom(1000 + i) for i in range(10)]
    one_at_a_time = GatewayLimits(max_handshakes=1)

    async def scenario() -> None:
        async with (
            target(echo) as (forward, _),
            gateways(forward, limits=one_at_a_time) as pair,
        ):
            echoed = await asyncio.gather(
                *(exchange(pair.address, p) for p in payloads)
            )
            assert echoed == payloads

    asyncio.run(scenario())


def test_connection_waiting_too_long_for_its_turn_is_reset(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    cards, keys = make_cards(), make_keys()
    impatient = GatewayLimits(max_handshakes=1, handshake_wait=0.05)

    async def scenario() -> None:
        # A remote that accepts and never speaks holds the only turn.
        with socket.create_server(LOCAL) as silent:
            tunnel = await start_tunnel_gateway(
                LOCAL,
                silent.getsockname()[:2],
                card=cards.client,
                keys=keys,
                timeouts=Timeouts(handshake=1.0),
                limits=impatient,
            )
            try:
                _, holder = await connect(tunnel.address)
                await asyncio.sleep(0.1)
                reader, writer = await connect(tunnel.address)
                assert await read_to_end(reader, bytearray()) == "reset"
                writer.close()
                holder.close()
            finally:
                await tunnel.shutdown(grace=0)
                await settle()

    asyncio.run(scenario())
    lines = [r.getMessage() for r in gateway_lines(caplog, "tunnel")]
    assert any(t.endswith("refused: its other handshakes took too long") for t in lines)


def test_idle_connection_is_closed_in_order(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        async with (
            target(echo) as (forward, seen),
            gateways(forward, tunnel_limits=GatewayLimits(idle_timeout=0.3)) as pair,
        ):
            reader, writer = await connect(pair.address)
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), GUARD) == b"ping"
            assert await read_to_end(reader, bytearray()) == "eof"
            await asyncio.wait_for(seen[0].done.wait(), GUARD)
            assert seen[0].ended == "eof"
            writer.close()

    asyncio.run(scenario())
    (tunnel,) = gateway_lines(caplog, "tunnel")
    assert tunnel.getMessage().endswith("; idle")


def test_stop_lets_a_transfer_finish() -> None:
    payload = os.urandom(4_000_000)

    async def scenario() -> None:
        async with target(sink) as (forward, seen), gateways(forward) as pair:
            reader, writer = await connect(pair.address)
            writer.write(payload[:100_000])
            await writer.drain()
            stopping = asyncio.create_task(pair.tunnel.shutdown(grace=GUARD))
            await asyncio.sleep(0.1)
            with pytest.raises(OSError):
                await connect(pair.address)  # no longer listening
            writer.write(payload[100_000:])
            writer.write_eof()
            assert await read_to_end(reader, bytearray()) == "eof"
            await asyncio.wait_for(stopping, GUARD)
            await asyncio.wait_for(seen[0].done.wait(), GUARD)
            assert seen[0].ended == "eof"
            assert seen[0].data == payload
            writer.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("stopping", ["tunnel", "server"])
def test_stop_closes_what_remains_after_the_grace(
    stopping: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        async with target(echo) as (forward, seen), gateways(forward) as pair:
            reader, writer = await connect(pair.address)
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), GUARD) == b"ping"
            gateway = pair.tunnel if stopping == "tunnel" else pair.server
            await asyncio.wait_for(gateway.shutdown(grace=0.2), GUARD)
            assert await read_to_end(reader, bytearray()) == "eof"
            await asyncio.wait_for(seen[0].done.wait(), GUARD)
            assert seen[0].ended == "eof"
            writer.close()

    asyncio.run(scenario())
    (line,) = gateway_lines(caplog, stopping)
    assert line.getMessage().endswith("; stopped")


def test_serve_functions_run_until_stop() -> None:
    cards, keys = make_cards(), make_keys()

    def free_port() -> int:
        with socket.create_server(LOCAL) as probe:
            port: int = probe.getsockname()[1]
        return port

    async def scenario() -> None:
        async with target(echo) as (forward, _):
            server_at, tunnel_at = (
                ("127.0.0.1", free_port()),
                ("127.0.0.1", free_port()),
            )
            stop, ready = asyncio.Event(), [asyncio.Event(), asyncio.Event()]
            running = [
                asyncio.create_task(
                    serve_gateway(
                        server_at,
                        forward,
                        card=cards.server,
                        keys=keys,
                        ready=ready[0],
                        stop=stop,
                    )
                ),
                asyncio.create_task(
                    tunnel_gateway(
                        tunnel_at,
                        server_at,
                        card=cards.client,
                        keys=keys,
                        ready=ready[1],
                        stop=stop,
                    )
                ),
            ]
            for event in ready:
                await asyncio.wait_for(event.wait(), GUARD)
            assert await exchange(tunnel_at, b"through") == b"through"
            stop.set()
            await asyncio.wait_for(asyncio.gather(*running), GUARD)
            await settle()

    asyncio.run(scenario())


def test_limits_are_checked() -> None:
    for size in (0, 1, 1023, (16 << 20) + 1):
        with pytest.raises(ConfigError, match="message_size"):
            GatewayLimits(message_size=size)
    with pytest.raises(ConfigError):
        GatewayLimits(idle_timeout=0)
    with pytest.raises(ConfigError):
        GatewayLimits(handshake_wait=0)


# -- PROXY protocol --------------------------------------------------------------------

V2 = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(command: int, family: int, body: bytes, version: int = 2) -> bytes:
    return (
        V2
        + bytes([version << 4 | command, family])
        + struct.pack("!H", len(body))
        + body
    )


V2_INET = struct.pack(
    "!4s4sHH", bytes([203, 0, 113, 7]), bytes([10, 0, 0, 1]), 4000, 104
)
V2_INET6 = (
    bytes.fromhex("20010db8000000000000000000000007")
    + bytes.fromhex("20010db8000000000000000000000001")
    + struct.pack("!HH", 4000, 104)
)

GOOD_HEADERS = [
    (
        b"PROXY TCP4 203.0.113.7 10.0.0.1 4000 104\r\n",
        ProxyHeader(("203.0.113.7", 4000), ("10.0.0.1", 104)),
    ),
    (
        b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 104\r\n",
        ProxyHeader(("2001:db8::7", 4000), ("2001:db8::1", 104)),
    ),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(None, None)),
    (b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n", ProxyHeader(None, None)),
    (
        v2(1, 0x11, V2_INET),
        ProxyHeader(("203.0.113.7", 4000), ("10.0.0.1", 104)),
    ),
    (
        v2(1, 0x21, V2_INET6),
        ProxyHeader(("2001:db8::7", 4000), ("2001:db8::1", 104)),
    ),
    # TLVs after the addresses are skipped.
    (
        v2(1, 0x11, V2_INET + b"\x04\x00\x03abc"),
        ProxyHeader(("203.0.113.7", 4000), ("10.0.0.1", 104)),
    ),
    (v2(0, 0x00, b""), ProxyHeader(None, None)),  # LOCAL: a health check
    (v2(1, 0x00, b""), ProxyHeader(None, None)),  # UNSPEC
    (v2(1, 0x31, bytes(216)), ProxyHeader(None, None)),  # AF_UNIX
]

MALFORMED_HEADERS = [
    b"\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x08",  # ISCL, no header
    b"proxy TCP4 203.0.113.7 10.0.0.1 4000 104\r\n",
    b"PROXY TCP4 203.0.113.7 10.0.0.1 4000\r\n",
    b"PROXY TCP4 203.0.113.7 10.0.0.1 4000 104 5\r\n",
    b"PROXY TCP5 203.0.113.7 10.0.0.1 4000 104\r\n",
    b"PROXY TCP4 203.0.113.256 10.0.0.1 4000 104\r\n",
    b"PROXY TCP4 2001:db8::7 10.0.0.1 4000 104\r\n",
    b"PROXY TCP6 203.0.113.7 2001:db8::1 4000 104\r\n",
    b"PROXY TCP4 203.0.113.7 10.0.0.1 70000 104\r\n",
    b"PROXY TCP4 203.0.113.7 10.0.0.1 -1 104\r\n",
    b"PROXY TCP4  203.0.113.7 10.0.0.1 4000 104\r\n",
    b"PROXY TCP4 203.0.113.7 10.0.0.1 4000 104\n",
    b"PROXY TCP4 203.0.113.\xe7 10.0.0.1 4000 104\r\n",
    b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n",
    b"PROXY TCP4 203.0.113.7",  # cut short
    v2(1, 0x11, V2_INET, version=1),
    v2(2, 0x11, V2_INET),
    v2(1, 0x41, V2_INET),
    v2(1, 0x13, V2_INET),
    v2(1, 0x11, V2_INET[:11]),
    v2(1, 0x21, V2_INET),
    v2(1, 0x11, V2_INET)[:-1],  # cut short
]


async def parse(data: bytes) -> tuple[ProxyHeader, bytes]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await read_proxy_header(reader), await reader.read()


@pytest.mark.parametrize(("header", "expected"), GOOD_HEADERS)
def test_proxy_header_parses(header: bytes, expected: ProxyHeader) -> None:
    after = b"\x00\x00\x00\x00ISCL frames"
    assert asyncio.run(parse(header + after)) == (expected, after)


@pytest.mark.parametrize("header", MALFORMED_HEADERS)
def test_malformed_proxy_header_is_refused(header: bytes) -> None:
    with pytest.raises(MalformedProxyHeader):
        asyncio.run(parse(header))


def test_overlong_proxy_v1_line_is_refused() -> None:
    async def scenario() -> None:
        reader = asyncio.StreamReader(limit=1024)
        reader.feed_data(b"PROXY " + b"1" * 4096)
        with pytest.raises(MalformedProxyHeader):
            await read_proxy_header(reader)

    asyncio.run(scenario())


async def iscl_client_after(
    address: Address, header: bytes, card: Card, keys: KeyStore
) -> aio.AsyncChannel:
    """An ISCL client that sends ``header`` first, as a load balancer would."""
    reader, writer = await connect(address)
    writer.write(header)
    channel = aio.AsyncChannel(
        reader, writer, Role.CLIENT, card, keys, Settings(), Timeouts()
    )
    try:
        await channel.handshake()
    except BaseException:
        await channel.abort()
        raise
    return channel


@contextlib.asynccontextmanager
async def proxied_server(
    forward: Address, cards: CardPair, keys: KeyStore, limiter: FailureLimiter
) -> AsyncIterator[Gateway]:
    server = await start_server_gateway(
        LOCAL,
        forward,
        card=cards.server,
        keys=keys,
        limits=LIMITS,
        limiter=limiter,
        proxy_protocol=True,
    )
    try:
        yield server
    finally:
        await server.shutdown(grace=0)
        await settle()


@pytest.mark.parametrize(
    ("header", "peer"),
    [
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 4000 104\r\n", "203.0.113.7:4000"),
        (v2(1, 0x21, V2_INET6), "[2001:db8::7]:4000"),
        (v2(0, 0x00, b""), "127.0.0.1:"),
    ],
)
def test_proxy_header_gives_the_peer_address(
    header: bytes, peer: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cards, keys = make_cards(), make_keys()

    async def scenario() -> None:
        async with (
            target(echo) as (forward, _),
            proxied_server(forward, cards, keys, FailureLimiter()) as server,
        ):
            channel = await iscl_client_after(
                server.address, header, cards.client, keys
            )
            async with channel:
                await channel.send(b"ping")
                assert await channel.recv() == b"ping"

    asyncio.run(scenario())
    (line,) = gateway_lines(caplog, "server")
    assert line.getMessage().startswith(f"server gateway, peer {peer}")


def test_failed_handshakes_count_against_the_proxied_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    cards, keys = make_cards(), make_keys()
    impostor = make_cards(client_keys=random_keys()).client
    limiter = FailureLimiter(max_failures=1)
    header = b"PROXY TCP4 203.0.113.7 10.0.0.1 4000 104\r\n"

    async def scenario() -> None:
        async with (
            target(echo) as (forward, _),
            proxied_server(forward, cards, keys, limiter) as server,
        ):
            with pytest.raises(Exception):  # noqa: B017 - the client's own error
                await iscl_client_after(server.address, header, impostor, keys)
            await settle_one(server)
            assert limiter.blocked("203.0.113.7")
            assert not limiter.blocked("127.0.0.1")
            (audit,) = [vars(r) for r in caplog.records if r.name == AUDIT_LOGGER]
            assert (audit["peer"], audit["outcome"]) == ("203.0.113.7:4000", "failure")
            # Another real address through the same balancer still gets in.
            other = b"PROXY TCP4 198.51.100.9 10.0.0.1 4000 104\r\n"
            async with await iscl_client_after(
                server.address, other, cards.client, keys
            ) as channel:
                await channel.send(b"ok")
                assert await channel.recv() == b"ok"

    asyncio.run(scenario())


async def settle_one(gateway: Gateway) -> None:
    async with asyncio.timeout(GUARD):
        while gateway.active:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    "header", [b"PROXY TCP4 nonsense\r\n", b"GET / HTTP/1.1\r\n\r\n", b""]
)
def test_malformed_proxy_header_closes_the_connection(
    header: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cards, keys = make_cards(), make_keys()

    async def scenario() -> None:
        async with (
            target(echo) as (forward, seen),
            proxied_server(forward, cards, keys, FailureLimiter()) as server,
        ):
            reader, writer = await connect(server.address)
            writer.write(header)
            if not header:
                writer.write_eof()
            received = bytearray()
            assert await read_to_end(reader, received) in ("reset", "eof")
            assert received == b""  # not even the line connection check
            writer.close()
            await settle_one(server)
            assert seen == []

    asyncio.run(scenario())
    (line,) = gateway_lines(caplog, "server")
    assert "PROXY" in line.getMessage()
    assert line.levelno == logging.WARNING


# -- DICOM through both gateways -------------------------------------------------------

DICOM_FILES = [
    "rtplan.dcm",  # 2.6 kB, implicit VR
    "MR_small.dcm",
    "CT_small.dcm",
    "waveform_ecg.dcm",
    "examples_overlay.dcm",  # 322 kB, the largest shipped with pydicom
]


def load_datasets() -> list[Any]:
    datasets = []
    for name in DICOM_FILES:
        path = get_testdata_file(name, download=False)
        assert isinstance(path, str), name
        datasets.append(dcmread(path))
    return datasets


@contextlib.contextmanager
def dicom_scp(received: list[Any]) -> Any:
    def on_store(event: Any) -> int:
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="STORE-SCP")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    server = ae.start_server(
        LOCAL, block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None
    try:
        yield server.server_address[:2]
    finally:
        server.shutdown()


def dicom_scu(address: Address, datasets: list[Any]) -> list[int]:
    ae = AE(ae_title="STORE-SCU")
    ae.add_requested_context(Verification)
    for context in {
        (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets
    }:
        ae.add_requested_context(*context)
    assoc = ae.associate(*address, ae_title="STORE-SCP")
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_echo().Status]
        statuses += [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()
    return statuses


def test_dicom_echo_and_store_through_both_gateways() -> None:
    datasets = load_datasets()
    received: list[Any] = []

    async def scenario(scp: Address) -> None:
        async with gateways(scp, limits=GatewayLimits()) as pair:
            statuses = await asyncio.to_thread(dicom_scu, pair.address, datasets)
            assert statuses == [0x0000] * (1 + len(datasets))
            await settle_gateways(pair)

    with dicom_scp(received) as scp:
        asyncio.run(scenario(scp))
    assert len(received) == len(datasets)
    for original, copy in zip(datasets, received, strict=True):
        assert [e.tag for e in copy] == [e.tag for e in original]
        for element in original:
            assert copy[element.tag] == element, element.tag


def test_dicom_associations_at_once() -> None:
    datasets = load_datasets()[:3]
    received: list[Any] = []

    async def scenario(scp: Address) -> None:
        async with gateways(scp, limits=GatewayLimits()) as pair:
            results = await asyncio.gather(
                *(
                    asyncio.to_thread(dicom_scu, pair.address, datasets)
                    for _ in range(8)
                )
            )
            assert results == [[0x0000] * (1 + len(datasets))] * 8
            await settle_gateways(pair)

    with dicom_scp(received) as scp:
        asyncio.run(scenario(scp))
    assert len(received) == 8 * len(datasets)
