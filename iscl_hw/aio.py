"""asyncio driver: ISCL clients and servers on asyncio streams.

Each connection runs one reader task that feeds the protocol core, runs the
card requests it asks for and routes its events; the caller's coroutines
send and receive whole messages.  Both directions flow at once.

A card whose calls block (``blocking_io`` true, such as a PC/SC reader's)
is called from a worker thread of its own, one operation after the other,
so a reader that stops answering stalls only the connections using that
card; each operation is bounded by :attr:`Timeouts.card`.  When a
connection is the loop's only handshake, the loop waits in place for up
to 2 ms for an answer the handshake needs (a virtual card or a fast reader
answers within); otherwise, and for slower cards and work the core asks for
ahead, it awaits the answer.  The end of a card span runs on the worker
too.  A card that answers at once (the in-process software card) is called
inline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import weakref
from collections.abc import Awaitable, Callable
from types import TracebackType

from iscl_hw.arbiter import CardArbiter
from iscl_hw.card import Card
from iscl_hw.core import Connection, Role
from iscl_hw.endpoint import Endpoint, Timeouts
from iscl_hw.errors import (
    CardBusy,
    CardCommunicationError,
    CardError,
    ConnectionLost,
    IsclError,
    LineClosed,
    PeerNeverSpoke,
    PeerRefusedClose,
    PeerTimeout,
)
from iscl_hw.events import (
    CardRequest,
    MessageReceived,
    ThroughModeReceived,
)
from iscl_hw.oplog import audit_authentication
from iscl_hw.ratelimit import FailureLimiter, NoSlot, PeerSlots, held_against_peer
from iscl_hw.settings import KeyProvider, Settings

__all__ = ["AsyncChannel", "open_connection", "start_server"]

log = logging.getLogger(__name__)

_READ_SIZE = 65536
_CLOSE_GRACE = 1.0
# A card's worker thread ends after this long without work.
_WORKER_IDLE = 5.0
# How long the loop blocks for a blocking card's answer before it awaits it
# instead; bounds how long one card operation can hold up other connections.
_WAIT_IN_PLACE = 0.002


_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[bytes]"]


class _CardJob:
    """One card operation handed to a worker thread.  The loop first waits a
    moment for it in place (:meth:`wait_in_place`), then, for a slower card,
    on an asyncio future (:meth:`future`)."""

    def __init__(
        self, work: Callable[[], bytes], after: list[Callable[[], None]] | None = None
    ) -> None:
        self._work = work
        # Run once the outcome is handed over (a card's end of its span).
        self._after = after if after is not None else []
        self._finished = threading.Lock()
        self._finished.acquire()
        self._guard = threading.Lock()
        self._outcome: bytes | BaseException | None = None
        self._waiter: _Waiter | None = None
        #: Set when the connection gave up; a job not yet begun is skipped.
        self.abandoned = False

    def run(self) -> None:
        """Run the operation (on the worker thread) and hand its outcome over."""
        if self.abandoned:
            return
        try:
            outcome: bytes | BaseException = self._work()
        except BaseException as exc:  # handed to the awaiting coroutine
            outcome = exc
        with self._guard:
            self._outcome = outcome
            waiter = self._waiter
        self._finished.release()
        if waiter is not None:
            _settle_soon(*waiter, outcome)
        for action in self._after:
            action()

    def wait_in_place(self, seconds: float) -> bool:
        """Block the calling thread until the job is done, at most ``seconds``."""
        return self._finished.acquire(timeout=seconds)

    def future(self) -> asyncio.Future[bytes]:
        """A future of the running loop that the job's outcome settles."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        with self._guard:
            outcome = self._outcome
            if outcome is None:
                self._waiter = (loop, future)
                return future
        _settle(future, outcome)
        return future

    def result(self) -> bytes:
        """The answer of a finished job, or the error it raised."""
        outcome = self._outcome
        if outcome is None:
            raise RuntimeError("card job not finished")
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class _CardWorker:
    """One daemon thread per blocking card: its operations run there in
    order, never two at once and never on the event loop.  The thread ends
    when idle and is started again on demand; being a daemon, one stuck in
    a reader that never answers does not hold up the program's exit."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_CardJob] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = False

    def submit(
        self, work: Callable[[], bytes], after: list[Callable[[], None]] | None = None
    ) -> _CardJob:
        """Queue ``work`` behind the card's earlier operations; the actions
        in ``after`` (filled in as it runs) follow its answer."""
        job = _CardJob(work, after)
        with self._lock:
            self._jobs.put(job)
            if not self._running:
                self._running = True
                threading.Thread(
                    target=self._work, name=f"iscl-card {self._name}", daemon=True
                ).start()
        return job

    def post(self, action: Callable[[], None]) -> None:
        """Queue ``action`` behind the card's earlier operations; nobody
        waits for it (it must not raise)."""

        def work() -> bytes:
            action()
            return b""

        self.submit(work)

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=_WORKER_IDLE)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._running = False
                        return
                continue
            job.run()


def _settle(future: asyncio.Future[bytes], outcome: bytes | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _settle_soon(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[bytes],
    outcome: bytes | BaseException,
) -> None:
    """Hand ``outcome`` to ``future`` on its loop (if it still waits)."""
    try:
        loop.call_soon_threadsafe(_settle, future, outcome)
    except RuntimeError:
        pass  # the loop is closed: nobody waits any more


_WORKERS: weakref.WeakKeyDictionary[Card, _CardWorker] = weakref.WeakKeyDictionary()
_WORKERS_LOCK = threading.Lock()

# Handshakes in progress on each event loop: with others under way, the loop
# has their work to do while a card answers, so nobody waits in place.
_HANDSHAKING: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = (
    weakref.WeakKeyDictionary()
)


def _worker_for(card: Card) -> _CardWorker:
    with _WORKERS_LOCK:
        worker = _WORKERS.get(card)
        if worker is None:
            worker = _WORKERS[card] = _CardWorker(card.name)
        return worker


def _blocks(card: Card) -> bool:
    """True for a card whose calls wait on I/O (``blocking_io``)."""
    return bool(getattr(card, "blocking_io", False))


def _card_timeout(card: Card, operation: str, seconds: float) -> CardError:
    """The card's own error for an operation past its time (a PC/SC card
    names its reader), else a generic one."""
    make = getattr(card, "timeout_error", None)
    if callable(make):
        error = make(operation, seconds)
        if isinstance(error, CardError):
            return error
    return CardCommunicationError(
        f"card {card.name}: no answer to {operation} within {seconds:g} s"
    )


class AsyncChannel:
    """One ISCL connection on asyncio streams."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        role: Role,
        card: Card | CardArbiter,
        keys: KeyProvider,
        settings: Settings,
        timeouts: Timeouts,
        *,
        max_queued_messages: int = 16,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._endpoint = Endpoint(
            Connection(role, settings, keys), CardArbiter.for_card(card), timeouts
        )
        self._max_queued = max_queued_messages
        self._card_blocks = _blocks(self._endpoint.arbiter.card)
        if self._card_blocks:
            # The card's end of a span that ends early (a failure) runs on its
            # worker thread, behind the card's earlier operations.
            self._endpoint.end_span_with = _worker_for(self._endpoint.arbiter.card).post
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._finished = False
        self._read_scope: asyncio.Timeout | None = None
        self._notifying: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<AsyncChannel {self._endpoint.conn!r}>"

    async def __aenter__(self) -> AsyncChannel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.abort()

    @property
    def connection(self) -> Connection:
        return self._endpoint.conn

    @property
    def peer_auth_data(self) -> bytes:
        return self._endpoint.conn.peer_auth_data or b""

    @property
    def peer_address(self) -> object:
        return self._writer.get_extra_info("peername")

    async def handshake(self) -> None:
        """Run line connection and mutual authentication."""
        loop = asyncio.get_running_loop()
        _HANDSHAKING[loop] = _HANDSHAKING.get(loop, 0) + 1
        # A server's line connection check request leaves now, not once the
        # reader task first runs.
        self._write_quietly()
        self._task = asyncio.create_task(self._run())
        try:
            await self._wait(lambda: self._endpoint.authenticated is not None)
        except ConnectionLost as exc:
            explained = self._endpoint.lost_before_a_frame(exc)
            if explained is exc:
                raise
            raise explained from exc
        finally:
            _HANDSHAKING[loop] -= 1

    # -- messages -------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Send one secured message; returns once the peer accepted it and it
        is written.  Raises TransmissionRefused if the peer refused it."""
        self._check_not_failed()
        await self._send(self._endpoint.conn.send_message(data))

    async def send_through(self, data: bytes) -> None:
        """Send one unsecured (through mode) message."""
        self._check_not_failed()
        await self._send(self._endpoint.conn.send_through(data))

    def _check_not_failed(self) -> None:
        # What ended the connection (the peer closed it, a MAC failed), as
        # every waiting call raises it, not the core's "cannot send during
        # error".
        error = self._endpoint.error
        if error is not None:
            raise error

    async def _send(self, send_id: int) -> None:
        self._kick()
        await self._flush_or_fail()
        # The request is on its way: encrypt while the peer answers it.
        self._endpoint.conn.seal_ahead()
        await self._wait(lambda: self._endpoint.take_sent(send_id))
        await self._flush_or_fail()

    async def recv_message(self) -> MessageReceived | ThroughModeReceived:
        """The next whole message from the peer, with how it was protected."""
        await self._wait(self._endpoint.message_or_close)
        message = self._endpoint.take_message()
        async with self._changed:
            self._changed.notify_all()
        return message

    async def recv(self) -> bytes:
        """The data of the next whole message (only after its MAC check)."""
        return (await self.recv_message()).data

    def recv_nowait(self) -> bytes | None:
        """The data of a whole message already received and not yet taken,
        else None; never waits (a message the peer sent before it closed
        is still there)."""
        if not self._endpoint.messages:
            return None
        message = self._endpoint.take_message()
        self._changed_soon()
        return message.data

    def _changed_soon(self) -> None:
        # Taking a message may lift back-pressure on the reader task.
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        if not self._finished:
            task = asyncio.get_running_loop().create_task(notify())
            self._notifying.add(task)
            task.add_done_callback(self._notifying.discard)

    # -- closing ----------------------------------------------------------------

    async def disconnect(self) -> None:
        """Line disconnection.  Raises PeerRefusedClose, and the line stays
        open, if the peer refuses."""
        endpoint = self._endpoint
        if endpoint.closed is not None:
            return
        endpoint.conn.request_disconnection()
        self._kick()
        await self._flush_or_fail()
        await self._wait(endpoint.disconnection_settled)
        endpoint.take_close_refused()
        await self.abort()

    async def close(self) -> None:
        """Disconnect, and close the transport whatever the peer answers; a
        refusal is logged, not raised (use :meth:`disconnect` to see it)."""
        try:
            if self._endpoint.error is None and not self._finished:
                await self.disconnect()
        except PeerRefusedClose:
            log.warning("peer refused the line disconnection; connection dropped")
        finally:
            await self.abort()

    async def abort(self) -> None:
        """Close the transport at once, without line disconnection."""
        self._endpoint.release_span()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self._close_transport()

    async def _close_transport(self) -> None:
        if self._writer.is_closing():
            return
        self._writer.close()
        try:
            # A peer that does not read must not hold the close.
            await asyncio.wait_for(self._writer.wait_closed(), _CLOSE_GRACE)
        except (OSError, TimeoutError):
            self._writer.transport.abort()

    # -- the reader task ----------------------------------------------------------

    async def _wait(self, done: Callable[[], bool]) -> None:
        """Until ``done()``; raises what ended the connection if it ends first."""
        endpoint = self._endpoint
        finished = False

        def ready() -> bool:
            nonlocal finished
            finished = done()
            return finished or self._finished

        async with self._changed:
            await self._changed.wait_for(ready)
        if finished:
            return
        if endpoint.error is not None:
            raise endpoint.error
        raise ConnectionLost("the connection is closed")

    async def _run(self) -> None:
        endpoint = self._endpoint
        try:
            while endpoint.closed is None:
                await self._process_events()
                if endpoint.closed is not None:
                    break
                await self._backpressure()
                endpoint.conn.receive_data(await self._read())
        except IsclError as exc:
            endpoint.failed(exc)
            self._write_quietly()
            log.debug("%s failed: %s", endpoint.conn.role.value, exc)
        except Exception:
            log.exception(
                "%s: internal error; connection dropped", endpoint.conn.role.value
            )
            raise
        finally:
            endpoint.release_span()
            self._finished = True
            async with self._changed:
                self._changed.notify_all()
            await self._close_transport()

    async def _process_events(self) -> None:
        endpoint = self._endpoint
        inline = not self._card_blocks
        while (request := endpoint.advance(inline_card=inline)) is not None:
            if endpoint.needs_span(request):
                try:
                    await endpoint.arbiter.acquire_async(endpoint)
                except CardBusy as exc:
                    endpoint.card_failed(exc)
                    continue
            if inline:
                endpoint.run_card(request)
            else:
                # What the core wrote first (a pass the peer works on while
                # our card does) leaves before the card is asked.
                await self._flush()
                await self._run_card_off_loop(request)
        await self._flush()
        endpoint.conn.seal_ahead()
        async with self._changed:
            self._changed.notify_all()

    async def _run_card_off_loop(self, request: CardRequest) -> None:
        """Run a blocking card's operation on its worker thread, within
        :attr:`Timeouts.card`; the core hears the outcome on the loop."""
        endpoint = self._endpoint
        arbiter = endpoint.arbiter
        limit = endpoint.timeouts.card
        # The end of the span after EXTERNAL AUTHENTICATE runs on the worker
        # once the answer is handed over, without a job of its own.
        after: list[Callable[[], None]] = []
        job = _worker_for(arbiter.card).submit(
            lambda: arbiter.run(endpoint, request, end_span_with=after.append), after
        )
        loop = asyncio.get_running_loop()
        try:
            in_place = not request.ahead and _HANDSHAKING.get(loop, 0) <= 1
            answer = await self._card_answer(job, limit, in_place=in_place)
        except TimeoutError:
            assert limit is not None
            # The core logs the failure and tells the peer.
            endpoint.card_failed(
                _card_timeout(arbiter.card, request.operation.value, limit)
            )
        except IsclError as exc:
            endpoint.card_failed(exc)
        except Exception as exc:
            endpoint.card_crashed(exc)
        else:
            endpoint.card_answered(answer)

    @staticmethod
    async def _card_answer(
        job: _CardJob, limit: float | None, *, in_place: bool
    ) -> bytes:
        # An answer the loop's only handshake waits for, from a card that
        # gives it within _WAIT_IN_PLACE (a virtual card, a fast reader), is
        # waited for on the spot: handing it back through the loop costs
        # more than the operation.  A slower one, work done ahead, or one
        # among concurrent handshakes is awaited.
        waited = 0.0
        if in_place:
            waited = _WAIT_IN_PLACE if limit is None else min(limit, _WAIT_IN_PLACE)
            if job.wait_in_place(waited):
                return job.result()
        future = job.future()
        try:
            async with asyncio.timeout(None if limit is None else limit - waited):
                return await future
        finally:
            job.abandoned = True

    async def _backpressure(self) -> None:
        # A consumer that does not read makes us stop reading the socket, so
        # TCP flow control slows the peer instead of our memory growing.
        endpoint = self._endpoint
        async with self._changed:
            await self._changed.wait_for(
                lambda: len(endpoint.messages) < self._max_queued
            )

    async def _read(self) -> bytes:
        """The next bytes from the peer, within the deadline of what we wait
        for; a send started meanwhile (:meth:`_kick`) moves the deadline."""
        endpoint = self._endpoint
        try:
            async with asyncio.timeout_at(self._deadline()) as scope:
                self._read_scope = scope
                return await self._reader.read(_READ_SIZE)
        except TimeoutError:
            raise endpoint.timed_out() from None
        except OSError as exc:
            raise ConnectionLost(f"connection failed: {exc.strerror}") from exc
        finally:
            self._read_scope = None

    def _deadline(self) -> float | None:
        timeout = self._endpoint.read_timeout()
        if timeout is None:
            return None
        return asyncio.get_running_loop().time() + timeout

    def _kick(self) -> None:
        if self._read_scope is not None:
            self._read_scope.reschedule(self._deadline())

    async def _flush(self) -> None:
        data = self._endpoint.conn.data_to_send()
        if not data or self._writer.is_closing():
            return
        self._writer.write(data)
        if not self._writer.transport.get_write_buffer_size():
            return  # all in the kernel already: nothing to wait for
        limit = self._endpoint.timeouts.transmission
        try:
            async with asyncio.timeout(limit):
                await self._writer.drain()
        except TimeoutError:
            raise PeerTimeout(f"peer read nothing for {limit:g} s") from None
        except OSError as exc:
            raise ConnectionLost(f"connection failed: {exc.strerror}") from exc

    async def _flush_or_fail(self) -> None:
        """Flush from the caller's coroutine; a failure ends the connection
        as one in the reader task would."""
        try:
            await self._flush()
        except IsclError as exc:
            self._endpoint.failed(exc)
            self._writer.transport.abort()
            raise

    def _write_quietly(self) -> None:
        """Hand what the core still has (a NAK) to the transport, without
        waiting for a peer that may not read."""
        data = self._endpoint.conn.data_to_send()
        if data and not self._writer.is_closing():
            self._writer.write(data)


async def open_connection(
    host: str,
    port: int,
    *,
    card: Card | CardArbiter,
    keys: KeyProvider,
    settings: Settings | None = None,
    timeouts: Timeouts | None = None,
) -> AsyncChannel:
    """Connect as client and authenticate; returns a ready channel."""
    timeouts = timeouts or Timeouts()
    try:
        async with asyncio.timeout(timeouts.handshake):
            reader, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError) as exc:
        raise ConnectionLost(f"cannot connect to {host}:{port}: {exc}") from exc
    channel = AsyncChannel(
        reader, writer, Role.CLIENT, card, keys, settings or Settings(), timeouts
    )
    try:
        await channel.handshake()
    except BaseException:
        await channel.abort()
        raise
    return channel


Handler = Callable[[AsyncChannel], Awaitable[None]]


async def start_server(
    handler: Handler,
    host: str,
    port: int,
    *,
    card: Card | CardArbiter,
    keys: KeyProvider,
    settings: Settings | None = None,
    timeouts: Timeouts | None = None,
    limiter: FailureLimiter | None = None,
    max_connections: int = 256,
    max_handshakes_per_peer: int = 4,
) -> asyncio.Server:
    """Accept ISCL connections; ``handler`` gets each authenticated channel
    and the line is closed when it returns.

    Connections over ``max_connections`` and addresses ``limiter`` has
    blocked are closed at once, before line connection.  Handshakes from one
    address beyond ``max_handshakes_per_peer`` wait their turn (each may
    hold our card for up to ``Timeouts.peer_answer``).
    """
    settings = settings or Settings()
    timeouts = timeouts or Timeouts()
    limiter = limiter or FailureLimiter()
    slots = PeerSlots(max_handshakes_per_peer)
    active = 0

    async def authenticate(channel: AsyncChannel, peer: str) -> bool:
        try:
            await channel.handshake()
        except IsclError as exc:
            # A peer that fails, stalls or vanishes mid-handshake has held
            # our card; only our own card's trouble is not held against it.
            if isinstance(exc, PeerNeverSpoke):
                log.info("%s left without a word of ISCL: %s", peer, exc)
                return False
            if held_against_peer(exc):
                limiter.failure(peer)
            log.debug("handshake with %s failed: %s", peer, exc)
            audit_authentication(
                channel.peer_address,
                channel.connection.auth_key_index,
                exc,
                role="server",
            )
            return False
        limiter.success(peer)
        audit_authentication(
            channel.peer_address, channel.connection.auth_key_index, role="server"
        )
        return True

    async def serve(channel: AsyncChannel, peer: str) -> None:
        try:
            await handler(channel)
        except LineClosed:
            log.debug("%s closed the line", peer)
        except IsclError as exc:
            log.warning("connection with %s ended: %s", peer, exc)
        finally:
            try:
                await channel.close()
            except IsclError as exc:
                log.info("closing the line with %s: %s", peer, exc)

    async def on_client(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # Python 3.11's stream server logs a cancelled connection task as an
        # error with a traceback; a server shutting down is not one.
        with contextlib.suppress(asyncio.CancelledError):
            await admit(reader, writer)

    async def admit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active
        peer = _host_of(writer.get_extra_info("peername"))
        if active >= max_connections or limiter.blocked(peer):
            why = (
                f"connection limit ({max_connections})"
                if active >= max_connections
                else "too many failed handshakes"
            )
            log.warning("refused %s: %s", peer, why)
            writer.transport.abort()
            return
        active += 1
        channel: AsyncChannel | None = None
        try:
            try:
                async with slots.hold(peer, timeouts.handshake):
                    if limiter.blocked(peer):
                        log.warning("refused %s: too many failed handshakes", peer)
                        return
                    channel = AsyncChannel(
                        reader, writer, Role.SERVER, card, keys, settings, timeouts
                    )
                    authenticated = await authenticate(channel, peer)
            except NoSlot:
                log.warning("refused %s: its other handshakes took too long", peer)
                return
            if authenticated:
                await serve(channel, peer)
        finally:
            active -= 1
            if channel is None:
                writer.transport.abort()
            else:
                await channel.abort()

    return await asyncio.start_server(on_client, host, port)


def _host_of(address: object) -> str:
    if isinstance(address, tuple) and address:
        return str(address[0])
    return str(address)
