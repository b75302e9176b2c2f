"""DICOM over ISCL in process: pynetdicom associations on ISCL lines.

>>> assoc = iscl_hw.dicom.associate(ae, "10.0.0.5", 2761, card=card, keys=keys)
>>> server = iscl_hw.dicom.start_server(ae, ("", 2761), card=card, keys=keys)

Theory of operation
-------------------
pynetdicom (3.0.4, ``transport.py``) decides whether an association has
input with ``select.select([sock], [], [], 0)`` on the socket's descriptor
(``AssociationSocket.ready``), then reads with blocking ``sock.recv``.  It
makes an exception only for an ``ssl.SSLSocket``, whose ``pending()`` it
asks as well.  An object that decrypted ISCL messages into a Python buffer
would have data that ``select`` cannot see, and the association would
stall.  So each ISCL line here is relayed through a real descriptor:

* pynetdicom gets one end of a ``socket.socketpair()`` (an
  :class:`_AppSocket`); its ``select``, ``recv`` and ``send`` work on it
  unchanged.
* A thread of our own per line runs an asyncio loop with the ISCL
  connection (:class:`iscl_hw.aio.AsyncChannel`, full duplex) and relays
  plaintext between the other end and the channel.
* Towards the peer every DICOM PDU goes as one ISCL message (split only
  where it exceeds the maximum message length).  Towards pynetdicom only
  whole PDUs are written: the relay reassembles them, so when the line
  fails (a MAC that does not verify, a peer that vanishes) pynetdicom reads
  end of stream at a PDU boundary, which its state machine handles as
  Evt17, an A-P-ABORT.  It never sees part of a PDU.
* When pynetdicom closes its socket (release, abort, rejection), the relay
  runs ISCL line disconnection; ``close()`` of the socket waits for it, so
  ``Association.release()`` returns with the line closed and the thread
  ended.

How pynetdicom is given the socket, through its public seams only:

* Requestor: ``AE.associate(..., tls_args=(context, hostname))``.
  ``AssociationSocket.connect`` calls ``context.wrap_socket(sock, ...)`` on
  the bound, unconnected TCP socket and then ``connect()`` and
  ``getsockname()`` on what it returns, as it would on an ``SSLSocket``.
  :class:`_AppSocket` is a ``socket.socket`` whose ``connect`` opens the
  TCP connection and runs the ISCL handshake, as ``SSLSocket.connect`` runs
  the TLS one.
* Acceptor: a ``ThreadedAssociationServer`` built by ``AE.make_server``
  with our ``request_handler``.  The handler runs in the server's
  per-connection thread, authenticates the peer first and only then lets
  pynetdicom create the ``Association`` on the socketpair end.  A peer that
  fails or stalls its handshake never gets an association (whose acceptor
  thread would otherwise wait ``acse_timeout`` for an A-ASSOCIATE-RQ), and
  the ``ssl_context`` hook is not used: it is called in the accept loop,
  where a handshake would hold up every other connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import socket
import ssl
import struct
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, cast

from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from iscl_hw import aio, eventloop
from iscl_hw.arbiter import CardArbiter
from iscl_hw.card import Card
from iscl_hw.core import Connection, Phase, Role
from iscl_hw.endpoint import Timeouts
from iscl_hw.errors import (
    ConfigError,
    ConnectionLost,
    IsclError,
    LineClosed,
    LocalProtocolError,
    PeerNeverSpoke,
    RemoteProtocolError,
    TransmissionRefused,
)
from iscl_hw.oplog import audit_authentication
from iscl_hw.ratelimit import FailureLimiter, held_against_peer
from iscl_hw.settings import KeyProvider, Settings

__all__ = [
    "DEFAULT_MAX_PDU_LENGTH",
    "IsclAssociationServer",
    "IsclLine",
    "associate",
    "line_for",
    "start_server",
]

log = logging.getLogger(__name__)

#: The largest PDU (header included) the relay buffers for pynetdicom; a
#: peer announcing a larger one loses the line.  A conforming peer sends
#: P-DATA-TF PDUs no larger than the maximum our AE announced.
DEFAULT_MAX_PDU_LENGTH: Final = 64 * 1024 * 1024

# PS3.8 9.3.1: PDU type, reserved, PDU length (big endian), then the body.
_PDU_HEADER: Final = struct.Struct(">BxL")
_READ_SIZE: Final = 65536
# Reads of what pynetdicom wrote, discarded when the relay gives up.
_DRAIN_READS: Final = 64
# Slack on top of the ISCL timeouts when a thread waits for the relay.
_GRACE: Final = 2.0


@dataclass(frozen=True)
class _LineConfig:
    card: Card | CardArbiter
    keys: KeyProvider
    settings: Settings
    timeouts: Timeouts
    max_pdu_length: int | None


# -- PDU framing ----------------------------------------------------------------


class _PduSplitter:
    """Cuts pynetdicom's output into ISCL messages: one per PDU, or
    ``limit``-byte pieces of a PDU longer than that."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._left = 0  # bytes of the current PDU not yet cut off

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes, limit: int) -> list[bytes]:
        self._buffer += data
        pieces: list[bytes] = []
        while True:
            if self._left == 0:
                if len(self._buffer) < _PDU_HEADER.size:
                    return pieces
                _, length = _PDU_HEADER.unpack_from(self._buffer)
                self._left = _PDU_HEADER.size + length
            take = min(self._left, limit)
            if len(self._buffer) < take:
                return pieces
            pieces.append(bytes(self._buffer[:take]))
            del self._buffer[:take]
            self._left -= take


class _PduAssembler:
    """Joins ISCL message data into whole PDUs for pynetdicom."""

    def __init__(self, max_length: int | None) -> None:
        self._buffer = bytearray()
        self._max = max_length

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        pdus: list[bytes] = []
        while len(self._buffer) >= _PDU_HEADER.size:
            _, length = _PDU_HEADER.unpack_from(self._buffer)
            total = _PDU_HEADER.size + length
            if self._max is not None and total > self._max:
                raise RemoteProtocolError(
                    f"peer sent a PDU of {total} bytes; at most {self._max} "
                    "are accepted"
                )
            if len(self._buffer) < total:
                break
            pdus.append(bytes(self._buffer[:total]))
            del self._buffer[:total]
        return pdus


# -- the socket pynetdicom holds ----------------------------------------------------


class _AppSocket(socket.socket):
    """pynetdicom's end of a line's socketpair.

    A real socket, so pynetdicom's ``select`` sees what the relay wrote.
    ``connect`` (requestor only) opens the TCP connection and authenticates;
    the addresses are the TCP connection's; ``close`` waits for the line to
    end (line disconnection, bounded by :attr:`Timeouts.disconnection`).
    """

    def __init__(self, fileno: int, line: IsclLine) -> None:
        super().__init__(fileno=fileno)
        self.line = line

    def connect(self, address: Any, /) -> None:
        self.line._connect(address, self.gettimeout())

    def getsockname(self) -> Any:
        return self.line.local_address

    def getpeername(self) -> Any:
        return self.line.peer_address

    def close(self) -> None:
        super().close()
        self.line._app_closed()


class _LineNotEstablished(ConnectionError):
    """Raised into pynetdicom's ``connect`` when the line failed; pynetdicom
    logs it and ends the association attempt (T_CONNECT Evt17)."""


class _End(enum.Enum):
    APP_CLOSED = "pynetdicom closed its socket"
    PEER_CLOSED = "the peer closed the line"


class IsclLine:
    """One ISCL connection carrying one DICOM association.

    Read-only for the application: who the peer is (:attr:`peer_auth_data`,
    :attr:`peer_address`), what was negotiated (:attr:`connection`), and
    what ended the line if it failed (:attr:`error`).
    """

    _numbers = itertools.count(1)

    def __init__(
        self,
        role: Role,
        config: _LineConfig,
        tcp: socket.socket,
        *,
        on_done: Callable[[IsclLine], None] | None = None,
    ) -> None:
        self.role = role
        self._config = config
        self._tcp = tcp
        self._on_done = on_done
        #: What ended the line abnormally (None while it runs, or if it was
        #: closed by line disconnection).
        self.error: IsclError | None = None
        self.local_address: Any = _address_of(tcp.getsockname)
        self.peer_address: Any = _address_of(tcp.getpeername)
        self._channel: aio.AsyncChannel | None = None
        self._lock = threading.Lock()
        self._abort_requested = False
        self._wake: Callable[[], None] | None = None
        self._ready = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        app, self._plain = socket.socketpair()
        self._plain.setblocking(False)  # the relay's loop.sock_* need it
        self.app_socket = _AppSocket(app.detach(), self)
        self._name = f"iscl-dicom-{role.value}-{next(IsclLine._numbers)}"

    def __repr__(self) -> str:
        state = (
            "closed"
            if self._done.is_set()
            else "established"
            if self.established
            else "connecting"
        )
        return f"<IsclLine {self.role.value} peer={self.peer_address} {state}>"

    @property
    def established(self) -> bool:
        """Mutual authentication has completed."""
        return self._channel is not None

    @property
    def connection(self) -> Connection | None:
        """The protocol core (negotiated block length, peer diagnostics),
        once the handshake has completed."""
        return None if self._channel is None else self._channel.connection

    @property
    def peer_auth_data(self) -> bytes:
        """The authentication data the peer sent in the handshake."""
        return b"" if self._channel is None else self._channel.peer_auth_data

    @property
    def closed(self) -> bool:
        """The line has ended and its thread is gone (or never started)."""
        thread = self._thread
        return self._done.is_set() and (thread is None or not thread.is_alive())

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until the line has ended and its thread has finished; True if
        it has."""
        thread = self._thread
        if thread is None:
            return self._done.wait(timeout)
        thread.join(timeout)
        return not thread.is_alive()

    def abort(self) -> None:
        """Drop the line at once, without line disconnection (from any
        thread); pynetdicom then reads end of stream."""
        with self._lock:
            self._abort_requested = True
            if self._wake is not None:
                self._wake()

    # -- starting, from pynetdicom's threads --------------------------------------

    def _start(self) -> None:
        self._thread = threading.Thread(
            target=self._thread_main, name=self._name, daemon=True
        )
        self._thread.start()

    def _wait_handshake(self) -> bool:
        """Wait for the handshake's outcome; True if the line is up."""
        if not self._ready.wait(self._config.timeouts.handshake + _GRACE):
            self.abort()
            self.wait_closed(_GRACE)
        return self.established

    def _connect(self, address: Any, timeout: float | None) -> None:
        """The requestor's connect: TCP, then the ISCL handshake."""
        if self.role is not Role.CLIENT or self._thread is not None:
            raise OSError("the ISCL line is already connected")
        tcp = self._tcp
        try:
            tcp.settimeout(timeout)
            tcp.connect(address)
            tcp.settimeout(None)
            tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            self.error = ConnectionLost(f"cannot connect to {address}: {exc}")
            raise
        self.local_address = tcp.getsockname()
        self.peer_address = tcp.getpeername()
        self._start()
        if not self._wait_handshake():
            self.wait_closed(_GRACE)
            raise _LineNotEstablished(f"ISCL line not established: {self.error}")

    def _app_closed(self) -> None:
        """pynetdicom closed its socket: wait for the line to end."""
        thread = self._thread
        if thread is None:
            _close_quietly(self._tcp)
            _close_quietly(self._plain)
            self._finished()
            return
        if thread is threading.current_thread():
            return
        if not self.established:
            self.abort()
        if not self.wait_closed(self._config.timeouts.disconnection + _GRACE):
            self.abort()
            self.wait_closed(_GRACE)

    def _finished(self) -> None:
        if self._done.is_set():
            return
        self._ready.set()
        self._done.set()
        if self._on_done is not None:
            self._on_done(self)

    # -- the relay thread ------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            eventloop.run(self._run())
        except ConfigError as exc:
            log.error("%s: %s", self._name, exc)
        except Exception:
            log.exception("%s: internal error; line dropped", self._name)
        finally:
            _close_quietly(self._plain)
            _close_quietly(self._tcp)
            self._finished()

    def _fail(self, error: IsclError) -> None:
        if self.error is None:
            self.error = error

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        with self._lock:
            if self._abort_requested:
                self._fail(LocalProtocolError("ISCL line aborted locally"))
                return

            def wake() -> None:
                loop.call_soon_threadsafe(stop.set)

            self._wake = wake
        work = asyncio.create_task(self._work())
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            with self._lock:
                self._wake = None
            for task in (work, stopper):
                task.cancel()
            await asyncio.gather(work, stopper, return_exceptions=True)
        if work.cancelled():
            self._fail(LocalProtocolError("ISCL line aborted locally"))
        elif (exc := work.exception()) is not None:
            raise exc

    async def _work(self) -> None:
        channel: aio.AsyncChannel | None = None
        try:
            channel = await self._handshake()
            self._channel = channel
            self._ready.set()
            await self._relay(channel)
        except IsclError as exc:
            self._fail(exc)
            if channel is not None:
                log.warning("%s with %s failed: %s", self._name, self.peer_address, exc)
        finally:
            if channel is not None:
                await channel.abort()
            self._close_relay_end()
            self._ready.set()

    def _close_relay_end(self) -> None:
        """pynetdicom reads end of stream after the last whole PDU.  What it
        wrote and we did not read is discarded first: closing a socketpair
        end with unread data would make its next ``recv`` fail with
        ECONNRESET, which pynetdicom logs as a PDU cut short."""
        plain = self._plain
        try:
            plain.shutdown(socket.SHUT_WR)
            for _ in range(_DRAIN_READS):
                if not plain.recv(_READ_SIZE):
                    break
        except OSError:  # BlockingIOError: nothing left
            pass
        _close_quietly(plain)

    async def _handshake(self) -> aio.AsyncChannel:
        config = self._config
        try:
            reader, writer = await asyncio.open_connection(sock=self._tcp)
        except OSError as exc:
            raise ConnectionLost(f"connection failed: {exc}") from exc
        channel = aio.AsyncChannel(
            reader,
            writer,
            self.role,
            config.card,
            config.keys,
            config.settings,
            config.timeouts,
        )
        try:
            await channel.handshake()
        except BaseException as exc:
            await channel.abort()
            if isinstance(exc, IsclError):
                self._audit_failure(channel, exc)
            raise
        audit_authentication(
            self.peer_address, channel.connection.auth_key_index, role=self.role.value
        )
        return channel

    def _audit_failure(self, channel: aio.AsyncChannel, exc: IsclError) -> None:
        if isinstance(exc, PeerNeverSpoke):
            return
        audit_authentication(
            self.peer_address,
            channel.connection.auth_key_index,
            exc,
            role=self.role.value,
        )

    async def _relay(self, channel: aio.AsyncChannel) -> None:
        """Relay until one side ends; closes the line the way it ended."""
        uplink = asyncio.create_task(self._uplink(channel))
        downlink = asyncio.create_task(self._downlink(channel))
        try:
            await asyncio.wait({uplink, downlink}, return_when=asyncio.FIRST_COMPLETED)
            if not downlink.done() and channel.connection.phase is Phase.CLOSED:
                # The peer closed the line while we sent: pynetdicom still
                # gets what came before the close.
                await asyncio.wait(
                    {downlink}, timeout=self._config.timeouts.transmission
                )
        finally:
            for task in (uplink, downlink):
                task.cancel()
            await asyncio.gather(uplink, downlink, return_exceptions=True)
        ends: list[_End] = []
        for task in (downlink, uplink):  # the peer's verdict first
            if task.cancelled():
                continue
            error = task.exception()
            if error is None:
                ends.append(task.result())
            elif not isinstance(error, IsclError):
                raise error
            elif channel.connection.phase is not Phase.CLOSED:
                raise error
        if ends and ends[0] is _End.APP_CLOSED:
            await self._disconnect(channel)

    async def _disconnect(self, channel: aio.AsyncChannel) -> None:
        """Line disconnection after pynetdicom closed its socket.  Messages
        the peer sent meanwhile are read and dropped, so the channel's
        backpressure cannot hold up the peer's answer; a refusal is logged
        and the line dropped (AsyncChannel.close)."""

        async def discard() -> None:
            with contextlib.suppress(IsclError):
                while True:
                    await channel.recv()

        discarding = asyncio.create_task(discard())
        try:
            await channel.close()
        finally:
            discarding.cancel()
            await asyncio.gather(discarding, return_exceptions=True)

    async def _uplink(self, channel: aio.AsyncChannel) -> _End:
        """pynetdicom's PDUs to the peer, one ISCL message each."""
        loop = asyncio.get_running_loop()
        splitter = _PduSplitter()
        while True:
            try:
                data = await loop.sock_recv(self._plain, _READ_SIZE)
            except OSError:
                return _End.APP_CLOSED
            if not data:
                if splitter.pending:
                    log.debug(
                        "%s: %d bytes of a PDU dropped", self._name, splitter.pending
                    )
                return _End.APP_CLOSED
            for piece in splitter.feed(data, self._message_limit(channel)):
                await self._send(channel, piece)

    def _message_limit(self, channel: aio.AsyncChannel) -> int:
        conn = channel.connection
        limit = conn.settings.max_message_length
        if conn.peer_max_message_length is not None:
            limit = min(limit, conn.peer_max_message_length)
        return limit

    async def _send(self, channel: aio.AsyncChannel, data: bytes) -> None:
        """Send ``data``, in smaller messages if the peer refuses its length."""
        while data:
            limit = self._message_limit(channel)
            piece, data = data[:limit], data[limit:]
            try:
                await channel.send(piece)
            except TransmissionRefused as exc:
                smaller = exc.peer_max_length
                if smaller is None or not 0 < smaller < len(piece):
                    raise
                log.info(
                    "%s: peer takes at most %d bytes a message", self._name, smaller
                )
                data = piece + data

    async def _downlink(self, channel: aio.AsyncChannel) -> _End:
        """The peer's messages to pynetdicom, whole PDUs only."""
        loop = asyncio.get_running_loop()
        assembler = _PduAssembler(self._config.max_pdu_length)
        while True:
            try:
                data = await channel.recv()
            except LineClosed:
                if assembler.pending:
                    log.warning(
                        "%s: peer closed the line inside a PDU; %d bytes dropped",
                        self._name,
                        assembler.pending,
                    )
                return _End.PEER_CLOSED
            for pdu in assembler.feed(data):
                try:
                    await loop.sock_sendall(self._plain, pdu)
                except OSError:
                    return _End.APP_CLOSED


def _address_of(get: Callable[[], Any]) -> Any:
    try:
        return get()
    except OSError:
        return None


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


# -- requestor ---------------------------------------------------------------------


class _RequestorContext:
    """What pynetdicom's ``tls_args`` carries for one association: it calls
    only :meth:`wrap_socket` (``AssociationSocket.connect``)."""

    def __init__(self, config: _LineConfig) -> None:
        self.config = config
        self.line: IsclLine | None = None

    def wrap_socket(
        self, sock: socket.socket, server_side: bool = False, **_: Any
    ) -> socket.socket:
        if server_side or self.line is not None:
            raise ValueError("an ISCL requestor context wraps one client socket")
        self.line = IsclLine(Role.CLIENT, self.config, sock)
        return self.line.app_socket


_LINES: weakref.WeakKeyDictionary[Association, IsclLine] = weakref.WeakKeyDictionary()
_LINES_LOCK = threading.Lock()


def associate(
    ae: ApplicationEntity,
    addr: str | tuple[str, int, int],
    port: int,
    *,
    card: Card | CardArbiter,
    keys: KeyProvider,
    settings: Settings | None = None,
    timeouts: Timeouts | None = None,
    max_pdu_length: int | None = DEFAULT_MAX_PDU_LENGTH,
    **assoc_kwargs: Any,
) -> Association:
    """``ae.associate(addr, port, **assoc_kwargs)`` over an ISCL line.

    Raises the :class:`~iscl_hw.errors.IsclError` that stopped the line
    (TCP connection, authentication) before any DICOM was exchanged; a
    rejection or abort after that is reported the pynetdicom way
    (``assoc.is_rejected``, ``assoc.is_aborted``), once the line has
    ended.  Releasing or aborting the association closes the line (line
    disconnection).
    """
    if "tls_args" in assoc_kwargs:
        raise TypeError("associate() runs over ISCL; tls_args cannot be combined")
    context = _RequestorContext(
        _LineConfig(
            card, keys, settings or Settings(), timeouts or Timeouts(), max_pdu_length
        )
    )
    # pynetdicom types tls_args as (SSLContext, str) but only calls
    # wrap_socket on it.
    assoc = ae.associate(
        addr, port, tls_args=(cast(ssl.SSLContext, context), ""), **assoc_kwargs
    )
    line = context.line
    if line is None:
        return assoc
    with _LINES_LOCK:
        _LINES[assoc] = line
    if not line.established:
        line.wait_closed(_GRACE)
        raise line.error or ConnectionLost("ISCL line not established")
    if not assoc.is_established:
        # Rejected or aborted: pynetdicom closes the socket from its DUL
        # thread without waiting for it (on rejection only kill_dul()); the
        # caller gets the association once the line has ended.
        line.wait_closed(context.config.timeouts.disconnection + _GRACE)
    return assoc


def line_for(assoc: Association) -> IsclLine | None:
    """The ISCL line under ``assoc``, or None for an association not made
    by this module (an acceptor's is found while its socket is open)."""
    with _LINES_LOCK:
        line = _LINES.get(assoc)
        if line is None:
            sock = getattr(getattr(assoc, "dul", None), "socket", None)
            inner = getattr(sock, "socket", None)
            if isinstance(inner, _AppSocket):
                line = _LINES[assoc] = inner.line
        return line


# -- acceptor ----------------------------------------------------------------------


class _PeerSlots:
    """At most ``size`` handshakes at a time from one address; more wait."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._used: dict[str, int] = {}
        self._changed = threading.Condition()

    def acquire(self, peer: str, timeout: float, give_up: Callable[[], bool]) -> bool:
        with self._changed:
            free = self._changed.wait_for(
                lambda: give_up() or self._used.get(peer, 0) < self._size, timeout
            )
            if not free or give_up():
                return False
            self._used[peer] = self._used.get(peer, 0) + 1
            return True

    def release(self, peer: str) -> None:
        with self._changed:
            left = self._used[peer] - 1
            if left:
                self._used[peer] = left
            else:
                del self._used[peer]
            self._changed.notify_all()

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()


@dataclass(frozen=True)
class _ServerOptions:
    line: _LineConfig
    limiter: FailureLimiter
    max_connections: int
    max_handshakes_per_peer: int


class _IsclRequestHandler(RequestHandler):
    """Authenticates the peer before pynetdicom makes an Association."""

    def handle(self) -> None:
        server = cast(IsclAssociationServer, self.server)
        app = server._admit(self.request, self.client_address)
        if app is None:
            return
        self.request = app
        try:
            super().handle()
        except BaseException:
            app.close()
            raise


class IsclAssociationServer(ThreadedAssociationServer):
    """A pynetdicom association server whose connections are ISCL lines.

    Made by :func:`start_server`.  Connections over ``max_connections`` and
    addresses the limiter has blocked are closed before line connection; a
    peer's handshakes beyond ``max_handshakes_per_peer`` wait their turn.
    :meth:`shutdown` also aborts this server's associations and waits for
    their lines to close.
    """

    def __init__(
        self,
        ae: ApplicationEntity,
        address: tuple[str, int] | tuple[str, int, int, int],
        ae_title: str,
        contexts: list[PresentationContext],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[EventHandlerType] | None = None,
        *,
        iscl: _ServerOptions,
    ) -> None:
        if ssl_context is not None:
            raise ValueError("an ISCL server does not take an ssl_context")
        self._options = iscl
        self._lines: set[IsclLine] = set()
        self._admitting = 0
        self._state = threading.Lock()
        self._closing = False
        self._slots = _PeerSlots(iscl.max_handshakes_per_peer)
        self._serve_thread: threading.Thread | None = None
        super().__init__(
            ae,
            address,
            ae_title,
            contexts,
            None,
            evt_handlers=evt_handlers,
            request_handler=_IsclRequestHandler,
        )

    @property
    def lines(self) -> list[IsclLine]:
        """The server's ISCL lines, in handshake or carrying an association."""
        with self._state:
            return list(self._lines)

    def _admit(self, tcp: socket.socket, address: Any) -> _AppSocket | None:
        """Run the ISCL handshake on an accepted connection; the socket for
        pynetdicom, or None (the connection is closed) if it failed."""
        options = self._options
        peer = str(address[0]) if isinstance(address, tuple) else str(address)
        with self._state:
            refused = None
            if self._closing:
                refused = "shutting down"
            elif len(self._lines) + self._admitting >= options.max_connections:
                refused = f"connection limit ({options.max_connections})"
            elif options.limiter.blocked(peer):
                refused = "too many failed handshakes"
            else:
                self._admitting += 1
        if refused is not None:
            log.warning("refused %s: %s", peer, refused)
            _close_quietly(tcp)
            return None
        try:
            return self._authenticate(tcp, peer)
        finally:
            with self._state:
                self._admitting -= 1

    def _authenticate(self, tcp: socket.socket, peer: str) -> _AppSocket | None:
        options = self._options
        timeouts = options.line.timeouts
        if not self._slots.acquire(peer, timeouts.handshake, lambda: self._closing):
            log.warning("refused %s: its other handshakes took too long", peer)
            _close_quietly(tcp)
            return None
        try:
            with self._state:
                refused = self._closing or options.limiter.blocked(peer)
                if not refused:
                    tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    line = IsclLine(
                        Role.SERVER, options.line, tcp, on_done=self._forget
                    )
                    self._lines.add(line)
            if refused:
                _close_quietly(tcp)
                return None
            line._start()
            established = line._wait_handshake()
        finally:
            self._slots.release(peer)
        if established:
            options.limiter.success(peer)
            return line.app_socket
        if isinstance(line.error, PeerNeverSpoke):
            log.info("%s left without a word of ISCL: %s", peer, line.error)
            line.app_socket.close()
            return None
        # A peer that fails, stalls or vanishes mid-handshake has held our
        # card; our shutdown is not held against it.
        if not self._closing and (line.error is None or held_against_peer(line.error)):
            options.limiter.failure(peer)
        line.app_socket.close()
        return None

    def _forget(self, line: IsclLine) -> None:
        with self._state:
            self._lines.discard(line)

    def shutdown(self) -> None:
        """Stop accepting, abort handshakes in progress and this server's
        associations, and wait for every line to end.  Idempotent."""
        with self._state:
            if self._closing:
                return
            self._closing = True
            pending = [line for line in self._lines if not line.established]
        self._slots.wake()
        for line in pending:
            line.abort()
        super().shutdown()
        for assoc in self.active_associations:
            assoc.abort()
        limit = self._options.line.timeouts.disconnection + _GRACE
        for line in self.lines:
            if not line.wait_closed(limit):
                line.abort()
                line.wait_closed(_GRACE)
        if self._serve_thread is not None:
            self._serve_thread.join()


def start_server(
    ae: ApplicationEntity,
    address: tuple[str, int] | tuple[str, int, int, int],
    *,
    card: Card | CardArbiter,
    keys: KeyProvider,
    settings: Settings | None = None,
    timeouts: Timeouts | None = None,
    limiter: FailureLimiter | None = None,
    max_connections: int = 256,
    max_handshakes_per_peer: int = 4,
    max_pdu_length: int | None = DEFAULT_MAX_PDU_LENGTH,
    **server_kwargs: Any,
) -> IsclAssociationServer:
    """Accept associations over ISCL, like ``ae.start_server(address,
    block=False, **server_kwargs)`` (``ae_title``, ``contexts``,
    ``evt_handlers``); returns the running server.

    ``ae.shutdown()`` stops it as it stops pynetdicom's own servers.
    """
    if "ssl_context" in server_kwargs or "block" in server_kwargs:
        raise TypeError("start_server() runs over ISCL, non-blocking")
    options = _ServerOptions(
        _LineConfig(
            card, keys, settings or Settings(), timeouts or Timeouts(), max_pdu_length
        ),
        limiter or FailureLimiter(),
        max_connections,
        max_handshakes_per_peer,
    )
    server = ae.make_server(
        address, server_class=IsclAssociationServer, iscl=options, **server_kwargs
    )
    assert isinstance(server, IsclAssociationServer)
    # As AE.start_server(block=False) does in pynetdicom 3.0.4: serve from a
    # daemon thread and register the server, so ae.shutdown() stops it.
    timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(
        target=make_target(server.serve_forever),
        name=f"IsclAcceptorServer@{timestamp}",
        daemon=True,
    )
    server._serve_thread = thread
    thread.start()
    ae._servers.append(server)
    return server
