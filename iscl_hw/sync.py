"""Blocking API: one ISCL connection over a socket, driven from one thread.

>>> with iscl_hw.connect("127.0.0.1", 2761, card=card, keys=keys) as ch:
...     ch.send(b"hello")
...     reply = ch.recv()
"""

from __future__ import annotations

import logging
import selectors
import socket
from collections.abc import Callable
from types import TracebackType

from iscl_hw.arbiter import CardArbiter
from iscl_hw.card import Card
from iscl_hw.core import Connection, Role
from iscl_hw.endpoint import Endpoint, Timeouts
from iscl_hw.errors import (
    CardBusy,
    ConnectionLost,
    IsclError,
    LocalProtocolError,
    PeerRefusedClose,
    PeerTimeout,
)
from iscl_hw.events import MessageReceived, ThroughModeReceived
from iscl_hw.settings import KeyProvider, Settings

__all__ = ["Channel", "accept", "connect"]

log = logging.getLogger(__name__)

_READ_SIZE = 65536


class Channel:
    """A blocking ISCL connection whose handshake has completed."""

    def __init__(
        self,
        sock: socket.socket,
        role: Role,
        card: Card | CardArbiter,
        keys: KeyProvider,
        settings: Settings,
        timeouts: Timeouts,
    ) -> None:
        self._sock = sock
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ)
        self._endpoint = Endpoint(
            Connection(role, settings, keys), CardArbiter.for_card(card), timeouts
        )
        sock.settimeout(timeouts.transmission)
        try:
            self._pump_until(lambda: self._endpoint.authenticated is not None)
        except ConnectionLost as exc:
            self.abort()
            if role is Role.SERVER:
                raise
            explained = self._endpoint.lost_before_a_frame(exc)
            if explained is exc:
                raise
            raise explained from exc
        except BaseException:
            self.abort()
            raise

    def __repr__(self) -> str:
        return f"<Channel {self._endpoint.conn!r}>"

    def __enter__(self) -> Channel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def connection(self) -> Connection:
        """The protocol core: negotiated block length, peer diagnostics."""
        return self._endpoint.conn

    @property
    def peer_auth_data(self) -> bytes:
        return self._endpoint.conn.peer_auth_data or b""

    def send(self, data: bytes) -> None:
        """Send one secured message; returns once the peer accepted it and it
        is written.  Raises TransmissionRefused if the peer refused it."""
        self._send(self._endpoint.conn.send_message(data))

    def send_through(self, data: bytes) -> None:
        """Send one unsecured (through mode) message."""
        self._send(self._endpoint.conn.send_through(data))

    def _send(self, send_id: int) -> None:
        self._pump_until(lambda: self._endpoint.take_sent(send_id))

    def recv_message(self) -> MessageReceived | ThroughModeReceived:
        """The next whole message from the peer, with how it was protected."""
        self._pump_until(self._endpoint.message_or_close)
        return self._endpoint.take_message()

    def recv(self) -> bytes:
        """The data of the next whole message (only after its MAC check);
        raises LineClosed once the peer has closed the line."""
        return self.recv_message().data

    def disconnect(self) -> None:
        """Line disconnection.  Raises PeerRefusedClose (the line stays open)
        if the peer refuses."""
        endpoint = self._endpoint
        if endpoint.closed is not None:
            return
        endpoint.conn.request_disconnection()
        self._pump_until(endpoint.disconnection_settled)
        endpoint.take_close_refused()
        self.abort()

    def close(self) -> None:
        """Disconnect, and close the socket whatever the peer answers; a
        refusal is logged, not raised (use :meth:`disconnect` to see it)."""
        try:
            if self._endpoint.error is None and self._sock.fileno() >= 0:
                self.disconnect()
        except PeerRefusedClose:
            log.warning("peer refused the line disconnection; connection dropped")
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the socket at once, without line disconnection."""
        self._endpoint.arbiter.release(self._endpoint)
        if self._sock.fileno() >= 0:
            self._selector.close()
            self._sock.close()

    # -- the pump ----------------------------------------------------------------

    def _pump_until(self, done: Callable[[], bool]) -> None:
        endpoint = self._endpoint
        if endpoint.error is not None:
            raise LocalProtocolError(f"connection failed earlier: {endpoint.error}")
        try:
            while not done():
                if endpoint.closed is not None:
                    raise ConnectionLost("the line is closed")
                self._process_events()
                if done():
                    return
                self._read()
        except IsclError as exc:
            endpoint.failed(exc)
            self._flush_quietly()
            self.abort()
            raise

    def _process_events(self) -> None:
        endpoint = self._endpoint
        while (request := endpoint.advance(inline_card=False)) is not None:
            # What the core wrote first (a pass the peer works on while our
            # card does) leaves before the card is asked.
            self._flush()
            if endpoint.needs_span(request):
                try:
                    endpoint.arbiter.acquire(endpoint)
                except CardBusy as exc:
                    endpoint.card_failed(exc)
                    continue
            endpoint.run_card(request)
        self._flush()

    def _read(self) -> None:
        conn = self._endpoint.conn
        timeout = self._endpoint.read_timeout()
        if not self._selector.select(timeout):
            raise self._endpoint.timed_out()
        try:
            data = self._sock.recv(_READ_SIZE)
        except OSError as exc:
            raise ConnectionLost(f"connection failed: {exc.strerror}") from exc
        conn.receive_data(data)

    def _flush(self) -> None:
        data = self._endpoint.conn.data_to_send()
        if not data:
            return
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise PeerTimeout(
                f"peer read nothing for {self._endpoint.timeouts.transmission:g} s"
            ) from None
        except OSError as exc:
            raise ConnectionLost(f"connection failed: {exc.strerror}") from exc

    def _flush_quietly(self) -> None:
        try:
            self._flush()
        except IsclError:
            pass


def connect(
    host: str,
    port: int,
    *,
    card: Card | CardArbiter,
    keys: KeyProvider,
    settings: Settings | None = None,
    timeouts: Timeouts | None = None,
) -> Channel:
    """Open an ISCL connection as client and run line connection and mutual
    authentication; returns a :class:`Channel` ready for messages."""
    timeouts = timeouts or Timeouts()
    try:
        sock = socket.create_connection((host, port), timeout=timeouts.handshake)
    except OSError as exc:
        raise ConnectionLost(f"cannot connect to {host}:{port}: {exc}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    return Channel(sock, Role.CLIENT, card, keys, settings or Settings(), timeouts)


def accept(
    sock: socket.socket,
    *,
    card: Card | CardArbiter,
    keys: KeyProvider,
    settings: Settings | None = None,
    timeouts: Timeouts | None = None,
) -> Channel:
    """Run the server side of the handshake on an accepted socket."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Channel(
        sock, Role.SERVER, card, keys, settings or Settings(), timeouts or Timeouts()
    )
