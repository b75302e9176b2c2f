"""Serve a software card as the card in a vpcd virtual reader.

vpcd (vsmartcard's virtual reader driver for pcscd) listens on TCP, one
port per reader slot (35963 for ``Virtual PCD 00 00``, 35964 for ``... 00
01``); the card connects to it.  Closing the connection is pulling the card
out of the reader.

Wire protocol, both ways: a frame is a 2-byte big-endian length and that
many bytes.  From vpcd, a 1-byte frame is a control byte: ``00`` power off,
``01`` power on, ``02`` reset (no answer), ``04`` "send the ATR" (answered
with a frame holding the ATR).  A longer frame is a command APDU, passed
through unchanged (vpcd does no T=0 GET RESPONSE handling); the card
answers one frame, data and SW1 SW2.  pcscd asks for the ATR about three
times a second while idle to see that the card is still there.

Latency: vpcd 0.8 (Debian 12) sends the length and the body of a frame in
two ``send`` calls.  Nagle's algorithm then holds the body until the length
is acknowledged, and the card's kernel delays that ACK by about 40 ms.  The
bridge re-arms ``TCP_QUICKACK`` right after reading every length header so
the ACK leaves at once; an APDU then costs about 0.1 ms instead of 44 ms.
Its own answers go out as header and body in one ``sendall`` with
``TCP_NODELAY``.

Power off and reset call the card's ``reset()``, as does every new
connection: the card forgets its selection, PIN state and last challenge,
like a real card losing power.

One card per slot: vpcd serves the first connection and leaves any other
one unaccepted in its listen queue, silent, until the first card leaves.
With ``accept_timeout`` the bridge notices: a first connection that vpcd
sends nothing on within that time fails the bridge with
:class:`VpcdSlotTaken` instead of waiting for ever.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import socket
import threading
import time
from types import FrameType, TracebackType
from typing import Final

from iscl_hw.apdu import format_apdu_for_trace, format_response_for_trace
from softcard.profiles import VirtualCard

__all__ = [
    "ACCEPT_WAIT",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "VpcdCardBridge",
    "VpcdSlotTaken",
]

_log = logging.getLogger(__name__)

DEFAULT_HOST: Final = "127.0.0.1"
#: vpcd's CHANNELID 0x8C7B; slot n listens on DEFAULT_PORT + n.
DEFAULT_PORT: Final = 35963
#: A good ``accept_timeout``: pcscd polls an empty slot about three times a
#: second, and vpcd speaks at once when it takes the card.
ACCEPT_WAIT: Final = 3.0

CTRL_POWER_OFF: Final = 0x00
CTRL_POWER_ON: Final = 0x01
CTRL_RESET: Final = 0x02
CTRL_GET_ATR: Final = 0x04

_SW_NO_DIAGNOSIS: Final = b"\x6f\x00"
_MAX_FRAME: Final = 0xFFFF
_FIRST_BACKOFF: Final = 0.05
_POLL: Final = 0.05


class _SessionEnd(Exception):
    """The connection to vpcd is over (closed, broken or malformed)."""


class VpcdSlotTaken(ConnectionError):
    """vpcd did not take the card: another card is in that reader slot."""

    def __init__(self, host: str, port: int, waited: float) -> None:
        super().__init__(
            errno.EBUSY,
            f"vpcd at {host}:{port} did not take the card within {waited:g} s: "
            "another card is already in that reader (another 'iscl card "
            "serve'?); use the other slot's port or stop that card",
        )


class VpcdCardBridge:
    """Connects to a vpcd reader slot and answers it with ``card``.

    ``start()`` serves in a daemon thread; ``stop()`` closes the connection
    (the card leaves the reader) and joins the thread.  ``remove()`` and
    ``insert()`` pull the card out and put it back without ending the
    thread.  With ``reconnect=True`` a connection that fails or that vpcd
    drops (pcscd restarted) is tried again, waiting 0.05 s doubling up to
    ``max_backoff``; without it the thread ends when the connection ends.

    With ``accept_timeout``, a first connection on which vpcd sends nothing
    within that time (it left it queued: the slot has a card) ends the
    bridge with :class:`VpcdSlotTaken` as its ``failure``, reconnect or
    not; a later one (pcscd restarted) only logs a warning and waits.
    """

    def __init__(
        self,
        card: VirtualCard,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        reconnect: bool = False,
        max_backoff: float = 2.0,
        connect_timeout: float = 5.0,
        accept_timeout: float | None = None,
    ) -> None:
        self.card = card
        self.host = host
        self.port = port
        self.reconnect = reconnect
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        self.accept_timeout = accept_timeout
        #: Set while connected to vpcd (the card is in the reader).
        self.connected = threading.Event()
        #: Set once vpcd has spoken on the current connection (it took the
        #: card; a connection it left queued stays silent).
        self.accepted = threading.Event()
        #: The connection error that ended the bridge, if one did.
        self.failure: OSError | None = None
        self._stopping = threading.Event()
        self._inserted = threading.Event()
        self._inserted.set()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._removals = 0
        self._removals_at_connect = 0
        self._ever_accepted = False
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        state = "connected" if self.connected.is_set() else "not connected"
        return f"<VpcdCardBridge {self.host}:{self.port} {state}>"

    def __enter__(self) -> VpcdCardBridge:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Serve in a daemon thread; returns at once."""
        if self._thread is not None:
            raise RuntimeError("bridge already started")
        self._thread = threading.Thread(
            target=self._run, name=f"vpcd-card-{self.port}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Take the card out for good and wait for the thread; idempotent."""
        self._stopping.set()
        self._inserted.set()
        self._drop_connection()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def remove(self) -> None:
        """Pull the card out of the reader (close the connection)."""
        with self._lock:
            self._removals += 1
            self._inserted.clear()
        self._drop_connection()
        _log.info("card removed from vpcd %s:%d", self.host, self.port)

    def insert(self) -> None:
        """Put the card back (connect again)."""
        _log.info("card inserted into vpcd %s:%d", self.host, self.port)
        self._inserted.set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_accepted(self, timeout: float) -> bool:
        """Wait until vpcd takes the card; False after ``timeout`` or once
        the bridge ended (see ``failure``)."""
        deadline = time.monotonic() + timeout
        while not self.accepted.wait(min(_POLL, max(deadline - time.monotonic(), 0))):
            if not self.running or time.monotonic() >= deadline:
                return self.accepted.is_set()
        return True

    def run_forever(self) -> None:
        """Serve until SIGTERM or SIGINT (or, without reconnect, until vpcd
        closes the connection); raise the connection error that ended it."""
        previous = self._install_signal_handlers()
        try:
            self.start()
            assert self._thread is not None
            while self._thread.is_alive():
                self._thread.join(0.5)
        finally:
            self.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if self.failure is not None:
            raise self.failure

    def _install_signal_handlers(self) -> dict[int, signal._HANDLER]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            # No lock here: the main thread may hold it (in stop()).  Waking
            # the worker is enough; it closes the socket and ends.
            _log.info("%s: taking the card out", signal.Signals(signum).name)
            self._stopping.set()
            self._inserted.set()
            sock = self._sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        previous: dict[int, signal._HANDLER] = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.getsignal(signum)
            signal.signal(signum, on_signal)
        return previous

    def _drop_connection(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        self.connected.clear()
        self.accepted.clear()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    # --------------------------------------------------------------- worker

    def _run(self) -> None:
        backoff = _FIRST_BACKOFF
        failures = 0
        while not self._stopping.is_set():
            self._inserted.wait()
            if self._stopping.is_set():
                break
            try:
                sock = self._connect()
            except OSError as exc:
                self._log_connect_failure(exc, failures)
                failures += 1
                if not self.reconnect:
                    self.failure = exc
                    break
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            if sock is None:
                continue
            backoff, failures = _FIRST_BACKOFF, 0
            try:
                self._serve(sock)
            except VpcdSlotTaken as exc:
                self.failure = exc
                break
            if not self.reconnect and self._removals == self._removals_at_connect:
                break  # vpcd ended the session, not remove()
        self.connected.clear()
        self.accepted.clear()
        _log.debug("vpcd bridge %s:%d ends", self.host, self.port)

    def _log_connect_failure(self, exc: OSError, failures: int) -> None:
        # The first failure in a row is worth a warning; the retries are not.
        # Without reconnect the failure ends the bridge and its caller reports
        # it (``failure``, run_forever), so it is not logged twice.
        level = logging.WARNING if self.reconnect and failures == 0 else logging.DEBUG
        _log.log(
            level,
            "cannot connect to vpcd at %s:%d: %s",
            self.host,
            self.port,
            exc.strerror or type(exc).__name__,
        )

    def _connect(self) -> socket.socket | None:
        """Connect; None if the card was removed or stopped meanwhile."""
        sock = socket.create_connection(
            (self.host, self.port), timeout=self.connect_timeout
        )
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm_quickack(sock)
        with self._lock:
            if self._stopping.is_set() or not self._inserted.is_set():
                sock.close()
                return None
            self._sock = sock
            self._removals_at_connect = self._removals
        return sock

    def _serve(self, sock: socket.socket) -> None:
        _log.info("card in vpcd reader %s:%d", self.host, self.port)
        self._reset_card()
        self.connected.set()
        try:
            self._await_acceptance(sock)
            while True:
                self._handle_frame(sock, self._read_frame(sock))
        except _SessionEnd as end:
            _log.info(
                "card session with vpcd %s:%d ended: %s", self.host, self.port, end
            )
        finally:
            self._drop_if_current(sock)

    def _await_acceptance(self, sock: socket.socket) -> None:
        """Until vpcd sends something (it took the card), within
        ``accept_timeout``; raises VpcdSlotTaken for a first connection
        that stays silent."""
        limit = self.accept_timeout
        first = self._peek(sock, limit)
        if first is None:
            assert limit is not None
            if not self._ever_accepted:
                raise VpcdSlotTaken(self.host, self.port, limit)
            _log.warning(
                "vpcd at %s:%d has not taken the card within %g s: another card "
                "is in that reader?  Waiting for it to leave",
                self.host,
                self.port,
                limit,
            )
            first = self._peek(sock, None)
        if not first:
            raise _SessionEnd("closed")
        self._ever_accepted = True
        self.accepted.set()

    @staticmethod
    def _peek(sock: socket.socket, timeout: float | None) -> bytes | None:
        """The next byte, left unread (empty: closed); None on timeout."""
        sock.settimeout(timeout)
        try:
            return sock.recv(1, socket.MSG_PEEK)
        except TimeoutError:
            return None
        except OSError as exc:
            raise _SessionEnd(exc.strerror or type(exc).__name__) from None
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(None)

    def _reset_card(self) -> None:
        try:
            self.card.reset()
        except Exception as exc:
            _log.error("card reset failed (%s)", type(exc).__name__)

    def _drop_if_current(self, sock: socket.socket) -> None:
        with self._lock:
            current = self._sock is sock
        if current:
            self._drop_connection()
        else:
            sock.close()

    # ------------------------------------------------------------- framing

    @staticmethod
    def _arm_quickack(sock: socket.socket) -> None:
        quickack = getattr(socket, "TCP_QUICKACK", None)
        if quickack is not None:
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)

    def _read_frame(self, sock: socket.socket) -> bytes:
        header = self._read_exact(sock, 2)
        self._arm_quickack(sock)
        length = int.from_bytes(header, "big")
        if length == 0:
            _log.warning("vpcd sent an empty frame; closing the connection")
            raise _SessionEnd("malformed frame")
        return self._read_exact(sock, length)

    @staticmethod
    def _read_exact(sock: socket.socket, size: int) -> bytes:
        buffer = bytearray(size)
        view = memoryview(buffer)
        done = 0
        while done < size:
            try:
                count = sock.recv_into(view[done:])
            except OSError as exc:
                raise _SessionEnd(exc.strerror or type(exc).__name__) from None
            if count == 0:
                raise _SessionEnd("closed" if done == 0 else "short read")
            done += count
        return bytes(buffer)

    @staticmethod
    def _send_frame(sock: socket.socket, body: bytes) -> None:
        try:
            sock.sendall(len(body).to_bytes(2, "big") + body)
        except OSError as exc:
            raise _SessionEnd(exc.strerror or type(exc).__name__) from None

    # ------------------------------------------------------------ messages

    def _handle_frame(self, sock: socket.socket, body: bytes) -> None:
        if len(body) == 1:
            self._handle_control(sock, body[0])
        else:
            self._send_frame(sock, self._answer(body))

    def _handle_control(self, sock: socket.socket, control: int) -> None:
        if control == CTRL_GET_ATR:
            self._send_frame(sock, self.card.ATR)
        elif control in (CTRL_POWER_OFF, CTRL_RESET):
            _log.debug("vpcd: %s", "power off" if control == 0 else "reset")
            self._reset_card()
        elif control == CTRL_POWER_ON:
            _log.debug("vpcd: power on")
        else:
            _log.warning("vpcd sent unknown control byte %02X; ignored", control)

    def _answer(self, command: bytes) -> bytes:
        tracing = _log.isEnabledFor(logging.DEBUG)
        if tracing:
            _log.debug("APDU > %s", format_apdu_for_trace(command))
        try:
            response = self.card.transmit(command)
        except Exception as exc:
            _log.error("card failed (%s); answering 6F00", type(exc).__name__)
            response = _SW_NO_DIAGNOSIS
        if not 2 <= len(response) <= _MAX_FRAME:
            _log.error("card answered %d bytes; answering 6F00", len(response))
            response = _SW_NO_DIAGNOSIS
        if tracing:
            _log.debug("APDU < %s", format_response_for_trace(response))
        return response
