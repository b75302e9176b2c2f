"""ISCL gateways: plain TCP (DICOM) on one side, ISCL on the other.

A *server gateway* accepts ISCL connections, authenticates each with the
local card, then connects to a plain TCP service (a DICOM SCP) and relays.
A *tunnel gateway* accepts plain TCP from local DICOM software and opens one
ISCL connection, with a full handshake, per TCP connection.

Theory of operation
-------------------
Each connection is a :class:`Relay` between a plain stream and a
:class:`Link` (an ISCL channel) with two pumps:

- plain to link: read at most one message (the peer's maximum message
  length caps it), send it, and read again only once the peer accepted it
  and it is written;
- link to plain: write one whole message, MAC checked, and take the next
  only once the socket's write buffer has drained.

The channel queues at most one received message and stops reading its
socket past that, so TCP flow control reaches the far side: per connection
and direction a few messages are buffered, whatever either side's speed.

ISCL has no half-close.  When a plain side ends, what is in flight is
delivered, the line is closed by line disconnection and the other plain side
is closed.  When the ISCL connection fails (integrity, authentication, a
dropped peer) or a plain side is reset, both ends are closed at once, the
plain one with a reset (SO_LINGER 0) so DICOM software sees an abort.

A server gateway behind a load balancer can take a PROXY protocol header
(v1 or v2, as HAProxy sends it) before the ISCL handshake; the address it
carries is the one per-peer limits and the log use.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final, Protocol

from iscl_hw import aio
from iscl_hw.arbiter import CardArbiter
from iscl_hw.card import Card
from iscl_hw.core import Phase, Role
from iscl_hw.endpoint import Timeouts
from iscl_hw.errors import (
    AuthenticationError,
    ConfigError,
    ConnectionLost,
    IntegrityError,
    IsclError,
    LineClosed,
    LocalProtocolError,
    PeerNeverSpoke,
    PeerRefusedClose,
    PeerTimeout,
    TransmissionRefused,
)
from iscl_hw.oplog import audit_authentication, format_peer
from iscl_hw.ratelimit import FailureLimiter, NoSlot, PeerSlots, held_against_peer
from iscl_hw.settings import KeyProvider, Settings

__all__ = [
    "Gateway",
    "GatewayLimits",
    "Link",
    "MalformedProxyHeader",
    "ProxyHeader",
    "Relay",
    "parse_proxy_v1",
    "parse_proxy_v2",
    "read_proxy_header",
    "serve_gateway",
    "start_server_gateway",
    "start_tunnel_gateway",
    "tunnel_gateway",
]

log = logging.getLogger(__name__)

Address = tuple[str, int]

# One received message waits for the plain side; the channel stops reading
# its socket while it does.
_QUEUED_MESSAGES: Final = 1
# A peer that refuses our line disconnection is still sending.
_CLOSE_RETRY: Final = 0.05
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
_STREAM_LIMIT: Final = 65536  # asyncio's default


_MIN_MESSAGE_SIZE: Final = 1024
_MAX_MESSAGE_SIZE: Final = 16 << 20


@dataclass(frozen=True)
class GatewayLimits:
    """Admission, buffering and time limits of one gateway."""

    #: Connections at once; more are reset as they arrive.
    max_connections: int = 256
    #: Handshakes at once: per peer address on a server gateway, in all on
    #: a tunnel gateway.  More wait their turn.
    max_handshakes: int = 4
    #: Seconds a connection may wait for its turn to handshake before it is
    #: reset.  A burst of connections queues here; the handshake itself has
    #: Timeouts.handshake.
    handshake_wait: float = 30.0
    #: Largest message sent.  A peer accepting less gets smaller ones.  Each
    #: connection buffers a few messages per direction.
    message_size: int = 256 * 1024
    #: Seconds to connect to the forward (server) or remote (tunnel) address.
    connect_timeout: float = 10.0
    #: Seconds without a byte either way before line disconnection.
    idle_timeout: float | None = 300.0
    #: Seconds connections may go on after a stop before they are closed.
    stop_grace: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_handshakes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if not _MIN_MESSAGE_SIZE <= self.message_size <= _MAX_MESSAGE_SIZE:
            # Tiny messages cost a transmission request each (a gateway
            # crawls); huge ones block the event loop while they are sealed.
            raise ConfigError(
                f"message_size must be {_MIN_MESSAGE_SIZE}..{_MAX_MESSAGE_SIZE}, "
                f"not {self.message_size}"
            )
        if min(self.connect_timeout, self.handshake_wait) <= 0 or self.stop_grace < 0:
            raise ConfigError(
                "connect_timeout and handshake_wait must be positive, "
                "stop_grace not negative"
            )
        if self.idle_timeout is not None and self.idle_timeout <= 0:
            raise ConfigError("idle_timeout must be positive or None")

    @property
    def plain_read_limit(self) -> int:
        # A StreamReader stops reading its socket past twice its limit, so
        # the plain side holds about one message before we take it.
        return max(self.message_size // 2, _STREAM_LIMIT)


# -- PROXY protocol --------------------------------------------------------------------


class MalformedProxyHeader(IsclError):
    """The PROXY protocol header is missing or malformed."""


@dataclass(frozen=True)
class ProxyHeader:
    """What a PROXY header says; None for LOCAL, UNKNOWN and non-IP."""

    source: Address | None
    destination: Address | None


_V1_MAX: Final = 107  # the longest v1 line, CRLF included (PROXY protocol 2.1)
_V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_V2_UNSPEC, _V2_INET, _V2_INET6, _V2_UNIX = 0x0, 0x1, 0x2, 0x3
_V2_ADDRESS_SIZES: Final = {_V2_INET: 4, _V2_INET6: 16}


async def read_proxy_header(reader: asyncio.StreamReader) -> ProxyHeader:
    """Read a v1 or v2 header and nothing after it."""
    try:
        # Twelve bytes: the v2 signature, and less than the shortest v1 line.
        start = await reader.readexactly(len(_V2_SIGNATURE))
        if start == _V2_SIGNATURE:
            fixed = await reader.readexactly(4)
            (length,) = struct.unpack_from("!H", fixed, 2)
            return parse_proxy_v2(start + fixed + await reader.readexactly(length))
        if not start.startswith(b"PROXY "):
            raise MalformedProxyHeader("no PROXY protocol header")
        return parse_proxy_v1(start + await reader.readuntil(b"\r\n"))
    except asyncio.IncompleteReadError:
        raise MalformedProxyHeader("connection ended inside the PROXY header") from None
    except asyncio.LimitOverrunError:
        raise MalformedProxyHeader("PROXY v1 line without its CRLF") from None


def parse_proxy_v1(line: bytes) -> ProxyHeader:
    """A whole v1 line, CRLF included."""
    if len(line) > _V1_MAX or not line.endswith(b"\r\n") or b"\r\n" in line[:-2]:
        raise MalformedProxyHeader("PROXY v1 line too long or not one line")
    try:
        fields = line[:-2].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise MalformedProxyHeader("PROXY v1 line is not ASCII") from None
    if fields[:2] == ["PROXY", "UNKNOWN"]:
        return ProxyHeader(None, None)
    if len(fields) != 6 or fields[0] != "PROXY" or fields[1] not in ("TCP4", "TCP6"):
        raise MalformedProxyHeader("PROXY v1 line has the wrong fields")
    version = 4 if fields[1] == "TCP4" else 6
    return ProxyHeader(
        _v1_address(fields[2], fields[4], version),
        _v1_address(fields[3], fields[5], version),
    )


def _v1_address(host: str, port: str, version: int) -> Address:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise MalformedProxyHeader("PROXY v1 address is not an IP address") from None
    if address.version != version or str(address) != host:
        raise MalformedProxyHeader("PROXY v1 address does not match its family")
    if not (port.isdigit() and len(port) <= 5 and int(port) <= 0xFFFF):
        raise MalformedProxyHeader("PROXY v1 port is not 0..65535")
    return host, int(port)


def parse_proxy_v2(header: bytes) -> ProxyHeader:
    """A whole v2 header: signature, 4 fixed bytes and its addresses."""
    if len(header) < 16 or not header.startswith(_V2_SIGNATURE):
        raise MalformedProxyHeader("PROXY v2 header too short or unsigned")
    version, command = header[12] >> 4, header[12] & 0x0F
    family, transport = header[13] >> 4, header[13] & 0x0F
    (length,) = struct.unpack_from("!H", header, 14)
    if version != 2 or command not in (_V2_LOCAL, _V2_PROXY):
        raise MalformedProxyHeader("PROXY v2 version or command unknown")
    if family > _V2_UNIX or transport > 2 or len(header) != 16 + length:
        raise MalformedProxyHeader("PROXY v2 family or length invalid")
    size = _V2_ADDRESS_SIZES.get(family)
    if command == _V2_LOCAL or size is None:
        return ProxyHeader(None, None)
    if length < 2 * size + 4:
        raise MalformedProxyHeader("PROXY v2 addresses cut short")
    body = header[16:]
    source_port, destination_port = struct.unpack_from("!HH", body, 2 * size)
    return ProxyHeader(
        (str(ipaddress.ip_address(body[:size])), source_port),
        (str(ipaddress.ip_address(body[size : 2 * size])), destination_port),
    )


# -- the relay -------------------------------------------------------------------------


class Link(Protocol):
    """The message side of a relay (an ISCL channel, or raw TCP to compare)."""

    @property
    def send_limit(self) -> int:
        """Largest message :meth:`send` takes in one piece now."""
        ...

    async def send(self, data: bytes) -> None:
        """Returns once the data is accepted and written."""
        ...

    async def recv(self) -> bytes:
        """The next whole message; LineClosed once the peer closed."""
        ...

    async def disconnect(self) -> None:
        """Close in order; PeerRefusedClose if the peer is still sending."""
        ...

    async def abort(self) -> None: ...


class _IsclLink:
    """An AsyncChannel as a Link: messages cut to what the peer accepts."""

    def __init__(self, channel: aio.AsyncChannel, message_size: int) -> None:
        self.channel = channel
        self._message_size = message_size

    @property
    def send_limit(self) -> int:
        conn = self.channel.connection
        limit = min(self._message_size, conn.settings.max_message_length)
        if conn.peer_max_message_length is not None:
            limit = min(limit, conn.peer_max_message_length)
        return limit

    async def send(self, data: bytes) -> None:
        done = 0
        while done < len(data):
            piece = data[done : done + self.send_limit]
            try:
                await self.channel.send(piece)
            except TransmissionRefused as exc:
                # The core took note of the peer's length: send smaller ones.
                if not 0 < (exc.peer_max_length or 0) < len(piece):
                    raise
                continue
            except LocalProtocolError:
                if self.channel.connection.phase is Phase.CLOSED:
                    raise LineClosed("the peer closed the line") from None
                raise
            done += len(piece)

    async def recv(self) -> bytes:
        return await self.channel.recv()

    async def disconnect(self) -> None:
        await self.channel.disconnect()

    async def abort(self) -> None:
        await self.channel.abort()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a reset, so the peer sees an abort and not an end."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()


class Relay:
    """Moves bytes between a plain stream and a :class:`Link` until either
    ends.  :meth:`run` records how in :attr:`ending` and :attr:`error`
    rather than raising ISCL or socket errors; cancelled, it resets the
    plain side and aborts the link."""

    def __init__(
        self,
        link: Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        idle_timeout: float | None = None,
        close_timeout: float = 10.0,
    ) -> None:
        self.link = link
        self._reader = reader
        self._writer = writer
        self._idle_timeout = idle_timeout
        self._close_timeout = close_timeout
        self._closing = asyncio.Event()
        self._last_activity = time.monotonic()
        #: Bytes from the plain side into the link, and back.
        self.sent = 0
        self.received = 0
        self.ending = "running"
        self.error: IsclError | OSError | None = None

    def close(self) -> None:
        """End in order: line disconnection, then the plain side closed."""
        self._closing.set()

    async def run(self) -> None:
        up = asyncio.create_task(self._upstream())
        down = asyncio.create_task(self._downstream())
        until = asyncio.create_task(self._until_closed())
        clean = False
        try:
            await asyncio.wait((up, down, until), return_when=asyncio.FIRST_COMPLETED)
            _raise_failure(up, down)
            if down.done():
                self.ending = "closed by peer"
            else:
                self.ending = up.result() if up.done() else until.result()
                up.cancel()
                await self._close_line(down)
            await self._close_plain()
            clean = True
        except (IsclError, OSError) as exc:
            self.error = exc
            self.ending = _failure_text(exc)
        finally:
            for task in (up, down, until):
                task.cancel()
            await asyncio.gather(up, down, until, return_exceptions=True)
            if not clean:
                _reset(self._writer)
                await self.link.abort()

    async def _upstream(self) -> str:
        try:
            while data := await self._reader.read(self.link.send_limit):
                await self.link.send(data)
                self.sent += len(data)
                self._last_activity = time.monotonic()
        except LineClosed:
            return "closed by peer"
        return "plain side closed"

    async def _downstream(self) -> None:
        with contextlib.suppress(LineClosed):
            while True:
                data = await self.link.recv()
                self._writer.write(data)
                self.received += len(data)
                self._last_activity = time.monotonic()
                await self._writer.drain()

    async def _until_closed(self) -> str:
        while self._idle_timeout is not None:
            left = self._last_activity + self._idle_timeout - time.monotonic()
            if left <= 0:
                return "idle"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._closing.wait()
                    return "stopped"
        await self._closing.wait()
        return "stopped"

    async def _close_line(self, down: asyncio.Task[None]) -> None:
        """Line disconnection while ``down`` delivers what is in flight."""
        try:
            async with asyncio.timeout(self._close_timeout):
                while True:
                    try:
                        await self.link.disconnect()
                        break
                    except PeerRefusedClose:
                        await asyncio.sleep(_CLOSE_RETRY)
                await down
        except TimeoutError:
            raise PeerTimeout(
                f"line disconnection not done in {self._close_timeout:g} s"
            ) from None

    async def _close_plain(self) -> None:
        self._writer.close()
        try:
            async with asyncio.timeout(self._close_timeout):
                await self._writer.wait_closed()
        except (OSError, TimeoutError):
            _reset(self._writer)


def _raise_failure(*tasks: asyncio.Task[str] | asyncio.Task[None]) -> None:
    for task in tasks:
        if task.done() and (error := task.exception()) is not None:
            raise error


def _failure_text(exc: BaseException) -> str:
    if isinstance(exc, _Refused):
        return f"refused: {exc}"
    if isinstance(exc, AuthenticationError):
        return f"authentication failed: {exc}"
    if isinstance(exc, IntegrityError):
        return f"integrity failure: {exc}"
    if isinstance(exc, IsclError):
        return f"ISCL connection failed: {exc}"
    return f"plain connection failed: {exc}"


def _level_of(exc: BaseException | None) -> int:
    """WARNING for every failure (an operator at WARNING must see a PACS
    that is down or a timeout), INFO for a clean end."""
    return logging.INFO if exc is None else logging.WARNING


# -- gateways --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Setup:
    """What every connection of one gateway shares."""

    card: Card | CardArbiter
    keys: KeyProvider
    settings: Settings
    timeouts: Timeouts
    limits: GatewayLimits


class _Refused(Exception):
    """A connection turned away before its handshake."""


class _Connection:
    """One accepted connection: what the operator's log line reports."""

    def __init__(self, address: object, task: asyncio.Task[None]) -> None:
        self.task = task
        self.started = time.monotonic()
        self.set_address(address)
        self.parameters = "not authenticated"
        self.key_index: int | None = None
        self.relay: Relay | None = None
        self.ending = "running"
        self.level = logging.INFO

    def set_address(self, address: object) -> None:
        self.host = str(address[0]) if isinstance(address, tuple) else str(address)
        self.peer = format_peer(address)

    def describe(self, channel: aio.AsyncChannel) -> None:
        conn = channel.connection
        settings = conn.settings
        self.key_index = conn.auth_key_index
        self.parameters = (
            f"key {conn.auth_key_index}, block {conn.block_length}, "
            f"{settings.encryption.name}+{settings.mac.name}"
        )

    def failed(self, exc: BaseException) -> None:
        self.ending = _failure_text(exc)
        # A probe that never spoke ISCL (a health check) is no failure.
        self.level = (
            logging.INFO if isinstance(exc, PeerNeverSpoke) else logging.WARNING
        )

    def close(self) -> None:
        if self.relay is not None:
            self.relay.close()
        else:
            self.task.cancel()

    def report(self, kind: str) -> None:
        sent = received = 0
        parameters = self.parameters
        if self.relay is not None:
            sent, received = self.relay.sent, self.relay.received
            parameters += f", messages up to {self.relay.link.send_limit} bytes"
        seconds = time.monotonic() - self.started
        fields = {
            "event": "gateway connection",
            "gateway": kind,
            "peer": self.peer,
            "key_index": self.key_index,
            "bytes_sent": sent,
            "bytes_received": received,
            "seconds": round(seconds, 3),
            "outcome": self.ending,
        }
        log.log(
            self.level,
            "%s gateway, peer %s: %s; %d bytes sent, %d received, %.3f s; %s",
            kind,
            self.peer,
            parameters,
            sent,
            received,
            seconds,
            self.ending,
            extra=fields,
        )


class Gateway:
    """A listening gateway, from :func:`start_server_gateway` or
    :func:`start_tunnel_gateway`.  :meth:`shutdown` stops it gracefully."""

    kind = "gateway"

    def __init__(self, setup: _Setup) -> None:
        self._setup = setup
        self._limits = setup.limits
        self._timeouts = setup.timeouts
        self._slots = PeerSlots(setup.limits.max_handshakes)
        self._connections: dict[asyncio.Task[None], _Connection] = {}
        self._stopping = False
        self._server: asyncio.Server | None = None
        self._address: Address = ("", 0)

    async def _listen(self, listen: Address, limit: int = _STREAM_LIMIT) -> None:
        self._server = await asyncio.start_server(
            self._on_client, listen[0], listen[1], limit=limit
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        self._address = str(host), int(port)

    @property
    def address(self) -> Address:
        """Where it listens (the port chosen, for port 0)."""
        return self._address

    @property
    def active(self) -> int:
        """Connections being served."""
        return len(self._connections)

    async def serve(
        self, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None
    ) -> None:
        """Run until ``stop`` is set, then :meth:`shutdown`.  Cancelled, it
        closes what runs without waiting for it."""
        if ready is not None:
            ready.set()
        try:
            await (stop or asyncio.Event()).wait()
        except asyncio.CancelledError:
            await self.shutdown(grace=0)
            raise
        await self.shutdown()

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, let connections go on for ``grace`` seconds
        (:attr:`GatewayLimits.stop_grace` by default), close the rest with
        line disconnection, and abort those that do not close in time."""
        assert self._server is not None
        self._stopping = True
        self._server.close()
        if grace is None:
            grace = self._limits.stop_grace
        if self._connections:
            await asyncio.wait(set(self._connections), timeout=grace)
        for connection in list(self._connections.values()):
            connection.close()
        if self._connections:
            # Each relay bounds its own close; this guards the rest.
            await asyncio.wait(
                set(self._connections), timeout=2 * self._timeouts.disconnection
            )
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    async def _on_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        connection = _Connection(writer.get_extra_info("peername"), task)
        if self._stopping or self.active >= self._limits.max_connections:
            _reset(writer)
            connection.failed(_Refused("connection limit or stopping"))
            connection.report(self.kind)
            return
        self._connections[task] = connection
        try:
            await self._serve(connection, reader, writer)
        except asyncio.CancelledError:
            # Python 3.11's stream server logs a cancelled connection task as
            # an error; a gateway stopping is not one.
            connection.ending = "aborted at stop"
        except (_Refused, IsclError, OSError) as exc:
            connection.failed(exc)
        finally:
            del self._connections[task]
            if not writer.is_closing():
                _reset(writer)
            connection.report(self.kind)

    async def _serve(
        self,
        connection: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def _turn(self, peer: str) -> AsyncIterator[None]:
        """One of ``peer``'s handshake slots; refused when none frees in time."""
        try:
            async with self._slots.hold(peer, self._limits.handshake_wait):
                yield
        except NoSlot:
            raise _Refused("its other handshakes took too long") from None

    def _channel(
        self, streams: tuple[asyncio.StreamReader, asyncio.StreamWriter], role: Role
    ) -> aio.AsyncChannel:
        setup = self._setup
        return aio.AsyncChannel(
            *streams,
            role,
            setup.card,
            setup.keys,
            setup.settings,
            setup.timeouts,
            max_queued_messages=_QUEUED_MESSAGES,
        )

    async def _open_stream(
        self, address: Address, limit: int = _STREAM_LIMIT
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        where = format_peer(address)
        seconds = self._limits.connect_timeout
        try:
            async with asyncio.timeout(seconds):
                return await asyncio.open_connection(*address, limit=limit)
        except TimeoutError:
            raise ConnectionLost(f"{where} did not answer in {seconds:g} s") from None
        except OSError as exc:
            raise ConnectionLost(f"cannot connect to {where}: {exc}") from exc

    async def _relay(
        self,
        connection: _Connection,
        channel: aio.AsyncChannel,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        relay = connection.relay = Relay(
            _IsclLink(channel, self._limits.message_size),
            reader,
            writer,
            idle_timeout=self._limits.idle_timeout,
            close_timeout=self._timeouts.disconnection,
        )
        try:
            await relay.run()
        finally:
            if not writer.is_closing():
                _reset(writer)
        connection.ending = relay.ending
        connection.level = _level_of(relay.error)


class _ServerGateway(Gateway):
    kind = "server"

    def __init__(
        self,
        setup: _Setup,
        forward: Address,
        limiter: FailureLimiter,
        proxy_protocol: bool,
    ) -> None:
        super().__init__(setup)
        self._forward = forward
        self._limiter = limiter
        self._proxy_protocol = proxy_protocol

    async def _serve(
        self,
        connection: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        if self._proxy_protocol:
            await self._read_proxy_header(connection, reader)
        channel = await self._authenticate(connection, (reader, writer))
        try:
            connection.describe(channel)
            plain = await self._open_stream(
                self._forward, limit=self._limits.plain_read_limit
            )
            await self._relay(connection, channel, *plain)
        finally:
            await channel.abort()

    async def _read_proxy_header(
        self, connection: _Connection, reader: asyncio.StreamReader
    ) -> None:
        try:
            async with asyncio.timeout(self._timeouts.handshake):
                header = await read_proxy_header(reader)
        except TimeoutError:
            raise MalformedProxyHeader("no PROXY header in time") from None
        if header.source is not None:
            connection.set_address(header.source)

    async def _authenticate(
        self,
        connection: _Connection,
        streams: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> aio.AsyncChannel:
        host, peer = connection.host, connection.peer
        if self._limiter.blocked(host):
            raise _Refused("too many failed handshakes")
        try:
            async with self._turn(host):
                if self._limiter.blocked(host):
                    raise _Refused("too many failed handshakes")
                channel = await _handshake(self._channel(streams, Role.SERVER), peer)
        except IsclError as exc:
            if held_against_peer(exc):
                self._limiter.failure(host)
            raise
        self._limiter.success(host)
        return channel


class _TunnelGateway(Gateway):
    kind = "tunnel"

    def __init__(self, setup: _Setup, connect: Address) -> None:
        super().__init__(setup)
        self._connect = connect

    async def _serve(
        self,
        connection: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        # One remote: the per-peer slots become a limit on all handshakes.
        async with self._turn("remote"):
            streams = await self._open_stream(self._connect)
            channel = await _handshake(
                self._channel(streams, Role.CLIENT), format_peer(self._connect)
            )
        try:
            connection.describe(channel)
            await self._relay(connection, channel, reader, writer)
        finally:
            await channel.abort()


async def _handshake(channel: aio.AsyncChannel, peer: str) -> aio.AsyncChannel:
    """Run the handshake and record it in the audit trail; abort on failure."""
    role = channel.connection.role.value
    key_index = channel.connection.auth_key_index
    try:
        await channel.handshake()
    except BaseException as exc:
        await channel.abort()
        if isinstance(exc, IsclError) and not isinstance(exc, PeerNeverSpoke):
            audit_authentication(peer, key_index, exc, role=role)
        raise
    audit_authentication(peer, key_index, role=role)
    return channel


def _setup(
    card: Card | CardArbiter,
    keys: KeyProvider,
    settings: Settings | None,
    timeouts: Timeouts | None,
    limits: GatewayLimits | None,
) -> _Setup:
    return _Setup(
        card,
        keys,
        settings or Settings(),
        timeouts or Timeouts(),
        limits or GatewayLimits(),
    )


async def start_server_gateway(
    listen: Address,
    forward: Address,
    *,
    card: Card | CardArbiter,
    keys: KeyProvider,
    settings: Settings | None = None,
    timeouts: Timeouts | None = None,
    limits: GatewayLimits | None = None,
    limiter: FailureLimiter | None = None,
    proxy_protocol: bool = False,
) -> Gateway:
    """Listen for ISCL peers on ``listen``; relay each authenticated one to
    the plain TCP service at ``forward``.  ``limiter`` counts failed
    handshakes per peer address (the PROXY header's, with
    ``proxy_protocol``)."""
    gateway = _ServerGateway(
        _setup(card, keys, settings, timeouts, limits),
        forward,
        limiter or FailureLimiter(),
        proxy_protocol,
    )
    await gateway._listen(listen)
    return gateway


async def start_tunnel_gateway(
    listen: Address,
    connect: Address,
    *,
    card: Card | CardArbiter,
    keys: KeyProvider,
    settings: Settings | None = None,
    timeouts: Timeouts | None = None,
    limits: GatewayLimits | None = None,
) -> Gateway:
    """Listen for plain TCP on ``listen``; carry each connection over its own
    ISCL connection to the server gateway at ``connect``."""
    setup = _setup(card, keys, settings, timeouts, limits)
    gateway = _TunnelGateway(setup, connect)
    await gateway._listen(listen, limit=setup.limits.plain_read_limit)
    return gateway


async def serve_gateway(
    listen: Address,
    forward: Address,
    *,
    card: Card | CardArbiter,
    keys: KeyProvider,
    settings: Settings | None = None,
    timeouts: Timeouts | None = None,
    limits: GatewayLimits | None = None,
    limiter: FailureLimiter | None = None,
    proxy_protocol: bool = False,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """:func:`start_server_gateway`, then serve until ``stop`` is set and
    the graceful stop is over; ``ready`` is set once it listens."""
    gateway = await start_server_gateway(
        listen,
        forward,
        card=card,
        keys=keys,
        settings=settings,
        timeouts=timeouts,
        limits=limits,
        limiter=limiter,
        proxy_protocol=proxy_protocol,
    )
    await gateway.serve(ready, stop)


async def tunnel_gateway(
    listen: Address,
    connect: Address,
    *,
    card: Card | CardArbiter,
    keys: KeyProvider,
    settings: Settings | None = None,
    timeouts: Timeouts | None = None,
    limits: GatewayLimits | None = None,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """:func:`start_tunnel_gateway`, then serve until ``stop`` is set and
    the graceful stop is over; ``ready`` is set once it listens."""
    gateway = await start_tunnel_gateway(
        listen,
        connect,
        card=card,
        keys=keys,
        settings=settings,
        timeouts=timeouts,
        limits=limits,
    )
    await gateway.serve(ready, stop)
