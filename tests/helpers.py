"""Shared test helpers: soft cards, keys, frames, and :class:`ConnectionPair`.

``ConnectionPair`` wires a client and a server :class:`~iscl_hw.core.Connection`
through an in-memory link, the way h11's tests wire two ``Connection`` objects.
Card requests run on software cards through an :class:`~iscl_hw.endpoint.Endpoint`
and a :class:`~iscl_hw.arbiter.CardArbiter`, as the real drivers run them, and a
side that fails is handled as the drivers handle it: ``Endpoint.failed`` (which
ends its card span), whatever ``data_to_send`` still holds is written, and the
transport is closed, so the peer reads end of stream after those bytes.

The link can deliver in chunks of any size (one byte at a time included), hand
every frame in flight to a hook that may replace it, and make a side vanish
after it has sent a chosen number of frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from iscl_hw import aio
from iscl_hw.arbiter import CardArbiter
from iscl_hw.card import ApduCard, Card
from iscl_hw.constants import HEADER_LENGTH, KEY_INDEXES, MessageId
from iscl_hw.core import Connection, Role
from iscl_hw.endpoint import Endpoint, Timeouts
from iscl_hw.errors import CardBusy, CardError, IsclError
from iscl_hw.events import (
    CardRequest,
    ConnectionClosed,
    Event,
    MessageReceived,
    Sentinel,
)
from iscl_hw.keyfile import KeyStore
from iscl_hw.settings import Settings
from iscl_hw.wire import ByteOrder, encode_frame
from softcard.cardfile import new_card_state
from softcard.emulator import SoftCard

__all__ = [
    "CLIENT",
    "SERVER",
    "SIDES",
    "CardPair",
    "ConnectionPair",
    "CountingTransport",
    "FailingCard",
    "Side",
    "WireFrame",
    "craft",
    "flip_bit",
    "make_card",
    "make_cards",
    "make_keys",
    "parse_frame",
    "random_keys",
    "serving",
    "settle",
]

CLIENT = "client"
SERVER = "server"
SIDES = (CLIENT, SERVER)

INS_NAMES = {
    0xA4: "SELECT",
    0x84: "GET CHALLENGE",
    0x88: "INTERNAL AUTHENTICATE",
    0x82: "EXTERNAL AUTHENTICATE",
    0x20: "VERIFY",
    0xC0: "GET RESPONSE",
}


# -- keys and cards --------------------------------------------------------------------


def random_keys() -> dict[int, bytes]:
    """Eight random DES keys, indexes 1..8."""
    return {index: os.urandom(8) for index in KEY_INDEXES}


def make_keys(enc_keys: Mapping[int, bytes] | None = None) -> KeyStore:
    """A KeyStore of encryption keys (random 1..8 unless given)."""
    return KeyStore(random_keys() if enc_keys is None else enc_keys)


class CountingTransport:
    """An ApduTransport in front of a SoftCard that records each command's INS."""

    def __init__(self, soft: SoftCard) -> None:
        self.soft = soft
        self.commands: list[str] = []

    def transmit(self, command: bytes) -> bytes:
        self.commands.append(INS_NAMES.get(command[1], f"INS {command[1]:02X}"))
        return self.soft.transmit(command)


def make_card(
    auth_keys: Mapping[int, bytes],
    *,
    max_retries: int = 3,
    pin: bytes | None = None,
    name: str = "card",
) -> tuple[ApduCard, SoftCard, CountingTransport]:
    soft = SoftCard(new_card_state(auth_keys, pin=pin, max_retries=max_retries))
    transport = CountingTransport(soft)
    return ApduCard(transport, pin=pin, name=name), soft, transport


@dataclass
class CardPair:
    """A client card and a server card; iterates as ``(client, server)``."""

    client: ApduCard
    server: ApduCard
    client_soft: SoftCard
    server_soft: SoftCard
    client_apdus: CountingTransport
    server_apdus: CountingTransport
    client_keys: dict[int, bytes]
    server_keys: dict[int, bytes]

    def __iter__(self) -> Iterator[ApduCard]:
        yield self.client
        yield self.server

    def soft(self, side: str) -> SoftCard:
        return self.client_soft if side == CLIENT else self.server_soft

    def counters(self) -> dict[str, dict[int, int]]:
        """Each card's retry counters, by key index."""
        return {
            side: {i: slot.remaining for i, slot in self.soft(side).state.keys.items()}
            for side in SIDES
        }


def make_cards(
    auth_keys: Mapping[int, bytes] | None = None,
    *,
    max_retries: int = 3,
    client_keys: Mapping[int, bytes] | None = None,
    server_keys: Mapping[int, bytes] | None = None,
    pin: bytes | None = None,
) -> CardPair:
    """Two soft cards holding the same authentication keys (random 1..8 unless
    given); ``client_keys`` / ``server_keys`` override one side's keys."""
    shared = dict(random_keys() if auth_keys is None else auth_keys)
    ckeys = dict(shared if client_keys is None else client_keys)
    skeys = dict(shared if server_keys is None else server_keys)
    client, client_soft, client_apdus = make_card(
        ckeys, max_retries=max_retries, pin=pin, name="client-card"
    )
    server, server_soft, server_apdus = make_card(
        skeys, max_retries=max_retries, pin=pin, name="server-card"
    )
    return CardPair(
        client,
        server,
        client_soft,
        server_soft,
        client_apdus,
        server_apdus,
        ckeys,
        skeys,
    )


# -- frames ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WireFrame:
    """A frame as seen on the link, without the decoder's checks."""

    message_id: MessageId | int
    length: int
    option: int
    err_no: int
    payload: bytes


def parse_frame(raw: bytes, order: ByteOrder = ByteOrder.BIG) -> WireFrame:
    fields = struct.unpack_from(order.prefix + "8I", raw)
    try:
        message_id: MessageId | int = MessageId(fields[1])
    except ValueError:
        message_id = fields[1]
    return WireFrame(message_id, fields[2], fields[3], fields[5], raw[HEADER_LENGTH:])


def craft(
    message_id: MessageId | int,
    payload: bytes = b"",
    *,
    option: int = 0,
    err_no: int = 0,
    order: ByteOrder = ByteOrder.BIG,
    length: int | None = None,
) -> bytes:
    """A frame with any header values (``length`` overrides DataLength)."""
    if length is None and isinstance(message_id, MessageId):
        return encode_frame(order, message_id, payload, option=option, err_no=err_no)
    header = struct.pack(
        order.prefix + "8I",
        0,
        message_id,
        len(payload) if length is None else length,
        option,
        0,
        err_no,
        0,
        0,
    )
    return header + payload


def flip_bit(raw: bytes, payload_offset: int, bit: int = 0) -> bytes:
    """``raw`` (a whole frame) with one bit of its payload flipped."""
    position = HEADER_LENGTH + payload_offset
    data = bytearray(raw)
    data[position] ^= 1 << bit
    return bytes(data)


def split_frames(buffer: bytearray, order: ByteOrder) -> list[bytes]:
    """Remove and return the complete frames at the start of ``buffer``."""
    frames = []
    while len(buffer) >= HEADER_LENGTH:
        (length,) = struct.unpack_from(order.prefix + "I", buffer, 8)
        end = HEADER_LENGTH + length
        if len(buffer) < end:
            break
        frames.append(bytes(buffer[:end]))
        del buffer[:end]
    return frames


# -- the pair --------------------------------------------------------------------------

#: hook(sender, raw_frame, index) -> the bytes to deliver instead (b"" drops it);
#: ``index`` counts the sender's frames from 0.
Hook = Callable[[str, bytes, int], bytes]


@dataclass
class Side:
    name: str
    conn: Connection
    endpoint: Endpoint
    events: list[Event] = field(default_factory=list)
    card_requests: list[CardRequest] = field(default_factory=list)
    error: IsclError | None = None
    #: What data_to_send held right after the failure (None: no failure).
    output_after_error: bytes | None = None
    frames_sent: int = 0
    gone: bool = False
    transport_closed: bool = False
    eof_delivered: bool = False
    outbox: bytearray = field(default_factory=bytearray)

    @property
    def arbiter(self) -> CardArbiter:
        return self.endpoint.arbiter

    @property
    def alive(self) -> bool:
        return not (self.gone or self.transport_closed)

    @property
    def received(self) -> list[bytes]:
        return [e.data for e in self.events if isinstance(e, MessageReceived)]

    def of_type(self, cls: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]

    def event_types(self) -> list[type[Any]]:
        return [type(e) for e in self.events]


class ConnectionPair:
    """A client and a server Connection joined by an in-memory link."""

    def __init__(
        self,
        *,
        cards: CardPair | None = None,
        keys: KeyStore | None = None,
        client_keys: KeyStore | None = None,
        server_keys: KeyStore | None = None,
        client_settings: Settings | None = None,
        server_settings: Settings | None = None,
        chunk_size: int | None = None,
        hook: Hook | None = None,
        span_wait: float = 0.0,
        client_arbiter: CardArbiter | None = None,
        server_arbiter: CardArbiter | None = None,
        seal_ahead: bool = False,
    ) -> None:
        self.seal_ahead = seal_ahead
        self.cards = cards if cards is not None else make_cards()
        shared = keys if keys is not None else make_keys()
        self.keys = shared
        client_settings = client_settings or Settings()
        server_settings = server_settings or Settings()
        self.order = server_settings.byte_order
        self.chunk_size = chunk_size
        self.hook = hook
        self.transcript: list[tuple[str, WireFrame]] = []
        self._vanish_after: dict[str, int] = {}
        # The server writes LINE_CONNECTION_CHECK_RQ when it is built, like a
        # server that accepted the TCP connection.
        client_conn = Connection(Role.CLIENT, client_settings, client_keys or shared)
        self.client = Side(
            CLIENT,
            client_conn,
            Endpoint(
                client_conn,
                client_arbiter or CardArbiter(self.cards.client, span_wait=span_wait),
                Timeouts(),
            ),
        )
        server_conn = Connection(Role.SERVER, server_settings, server_keys or shared)
        self.server = Side(
            SERVER,
            server_conn,
            Endpoint(
                server_conn,
                server_arbiter or CardArbiter(self.cards.server, span_wait=span_wait),
                Timeouts(),
            ),
        )

    def __getitem__(self, name: str) -> Side:
        return self.client if name == CLIENT else self.server

    def peer(self, side: Side) -> Side:
        return self.server if side is self.client else self.client

    @property
    def sides(self) -> tuple[Side, Side]:
        return (self.client, self.server)

    # -- driving ------------------------------------------------------------

    def vanish_after(self, name: str, frames: int) -> None:
        """``name`` disappears (transport gone, no more pumping) once it has
        sent ``frames`` frames; its peer then reads end of stream."""
        self._vanish_after[name] = frames
        side = self[name]
        if side.frames_sent >= frames:
            self._vanish(side)

    def vanish(self, name: str) -> None:
        self._vanish(self[name])

    def run(self) -> dict[str, list[Event]]:
        """Pump both sides until neither has anything left to do; returns the
        new (non-card) events of each side."""
        start = {side.name: len(side.events) for side in self.sides}
        progress = True
        while progress:
            progress = False
            for side in self.sides:
                progress |= self._pump(side)
                progress |= self._transfer(side)
        return {side.name: side.events[start[side.name] :] for side in self.sides}

    def handshake(self) -> ConnectionPair:
        self.run()
        for side in self.sides:
            assert side.error is None, f"{side.name}: {side.error!r}"
            assert side.endpoint.authenticated is not None, side.name
        return self

    def send(self, name: str, data: bytes) -> int:
        """Queue a secured message on ``name``; returns its send id."""
        return self[name].conn.send_message(data)

    def frames(self, sender: str | None = None) -> list[WireFrame]:
        return [f for s, f in self.transcript if sender is None or s == sender]

    def message_ids(self, sender: str | None = None) -> list[MessageId | int]:
        return [f.message_id for f in self.frames(sender)]

    # -- internals ----------------------------------------------------------

    def _pump(self, side: Side) -> bool:
        if not side.alive or side.error is not None:
            return False
        progressed = False
        while True:
            try:
                event = side.conn.next_event()
                if isinstance(event, Sentinel):
                    return progressed
                progressed = True
                if isinstance(event, CardRequest):
                    side.card_requests.append(event)
                    if side.endpoint.needs_span(event):
                        # As the drivers do: a span that cannot be had is a
                        # card failure the peer is told about.
                        try:
                            side.arbiter.acquire(side.endpoint)
                        except CardBusy as exc:
                            side.endpoint.card_failed(exc)
                            continue
                    side.endpoint.run_card(event)
                    continue
            except IsclError as exc:
                self._failed(side, exc)
                return True
            side.endpoint.route(event)
            side.events.append(event)
            if isinstance(event, ConnectionClosed):
                side.outbox += side.conn.data_to_send()
                side.transport_closed = True
                return True

    def _failed(self, side: Side, exc: IsclError) -> None:
        side.error = exc
        side.endpoint.failed(exc)
        side.output_after_error = side.conn.data_to_send()
        side.outbox += side.output_after_error
        side.transport_closed = True

    def _vanish(self, side: Side) -> None:
        side.gone = True
        side.outbox.clear()

    def _transfer(self, side: Side) -> bool:
        progressed = False
        if side.alive and side.error is None:
            side.outbox += side.conn.data_to_send()
            if self.seal_ahead:  # as the asyncio driver does after a write
                side.conn.seal_ahead()
        peer = self.peer(side)
        for raw in split_frames(side.outbox, self.order):
            limit = self._vanish_after.get(side.name)
            if side.gone or (limit is not None and side.frames_sent >= limit):
                self._vanish(side)
                break
            index = side.frames_sent
            side.frames_sent += 1
            if self.hook is not None:
                raw = self.hook(side.name, raw, index)
            progressed = True
            for frame_raw in split_frames(bytearray(raw), self.order):
                self.transcript.append((side.name, parse_frame(frame_raw, self.order)))
            self._deliver(peer, raw)
        limit = self._vanish_after.get(side.name)
        if limit is not None and side.frames_sent >= limit and not side.gone:
            self._vanish(side)
        if not side.alive and not side.outbox and not side.eof_delivered:
            side.eof_delivered = True
            progressed = True
            if peer.alive:
                peer.conn.receive_data(b"")
        return progressed

    def _deliver(self, peer: Side, data: bytes) -> None:
        if not peer.alive or not data:
            return
        if self.chunk_size is None:
            peer.conn.receive_data(data)
            return
        for start in range(0, len(data), self.chunk_size):
            if not peer.alive:
                return
            peer.conn.receive_data(data[start : start + self.chunk_size])
            self._pump(peer)


class FailingCard(Card):
    """A Card that fails its ``fail_at``-th operation (0-based) with
    ``error``; every other operation goes to ``inner``."""

    def __init__(
        self, inner: Card, fail_at: int, error: CardError | None = None
    ) -> None:
        self.inner = inner
        self.name = f"failing-{inner.name}"
        self.fail_at = fail_at
        self.error = error or CardError("card went wrong (test)")
        self.calls: list[str] = []

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if len(self.calls) - 1 == self.fail_at:
            raise self.error

    def get_challenge(self) -> bytes:
        self._call("GET CHALLENGE")
        return self.inner.get_challenge()

    def internal_authenticate(self, key_ref: int, challenge: bytes) -> bytes:
        self._call("INTERNAL AUTHENTICATE")
        return self.inner.internal_authenticate(key_ref, challenge)

    def external_authenticate(self, key_ref: int, response: bytes) -> None:
        self._call("EXTERNAL AUTHENTICATE")
        self.inner.external_authenticate(key_ref, response)

    def close(self) -> None:
        self.inner.close()


# -- asyncio servers -------------------------------------------------------------------


async def settle() -> None:
    """Wait for every other task of the loop (the servers' connection
    handlers) to finish."""
    current = asyncio.current_task()
    while tasks := [t for t in asyncio.all_tasks() if t is not current]:
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def serving(
    handler: Callable[[aio.AsyncChannel], Awaitable[None]],
    card: object,
    keys: KeyStore,
    **options: object,
) -> AsyncIterator[int]:
    """An :func:`aio.start_server` on 127.0.0.1 port 0; yields its port, and
    closes it and waits for its connection handlers on the way out."""
    server = await aio.start_server(
        handler,
        "127.0.0.1",
        0,
        card=card,  # type: ignore[arg-type]
        keys=keys,
        **options,  # type: ignore[arg-type]
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()
        await settle()
