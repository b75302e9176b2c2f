"""What the blocking and the asyncio drivers share: timeouts, the routing of
core events, and the card span bookkeeping."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from iscl_hw.arbiter import CardArbiter
from iscl_hw.core import Connection, Phase, Role
from iscl_hw.errors import (
    CardError,
    ConnectionLost,
    IsclError,
    LineClosed,
    PeerNeverSpoke,
    PeerRefusedClose,
    PeerTimeout,
    TransmissionRefused,
)
from iscl_hw.events import (
    Authenticated,
    CardOperation,
    CardRequest,
    CloseRefused,
    ConnectionClosed,
    Event,
    LineConnected,
    MessageReceived,
    MessageSent,
    SendRefused,
    Sentinel,
    ThroughModeReceived,
)

__all__ = ["Endpoint", "Timeouts"]

_HANDSHAKE_PHASES = (Phase.LINE_CONNECTION, Phase.MUTUAL_AUTHENTICATION)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timeouts:
    """Seconds allowed for each phase; None waits for ever."""

    #: Line connection and mutual authentication together.
    handshake: float = 10.0
    #: The peer's next pass while this side holds its card span: short, since
    #: every other handshake on the card waits meanwhile.
    peer_answer: float = 3.0
    #: For one message to go through, in either direction, once it has
    #: started; and for a write to drain when the peer does not read.
    transmission: float = 30.0
    #: Line disconnection, from request to answer.
    disconnection: float = 10.0
    #: Nothing in flight in either direction.
    idle: float | None = None
    #: One operation of a card whose calls block (a PC/SC reader), which the
    #: asyncio driver runs off its loop: past this the connection fails
    #: with a CardError and the other connections carry on.
    card: float | None = 5.0


class Endpoint:
    """Routes the events of one :class:`Connection` into queues and results."""

    def __init__(
        self, conn: Connection, arbiter: CardArbiter, timeouts: Timeouts
    ) -> None:
        self.conn = conn
        self.arbiter = arbiter
        self.timeouts = timeouts
        self.started = time.monotonic()
        self.messages: collections.deque[MessageReceived | ThroughModeReceived] = (
            collections.deque()
        )
        self.sent: dict[int, MessageSent | SendRefused] = {}
        self.authenticated: Authenticated | None = None
        self.closed: ConnectionClosed | None = None
        self.close_refused = False
        self.error: IsclError | None = None
        #: Where the card's end of a span runs (see CardArbiter.release);
        #: None runs it at once.
        self.end_span_with: Callable[[Callable[[], None]], None] | None = None
        self._wait_kind: str | None = None
        self._wait_since = self.started

    # -- timing ---------------------------------------------------------------

    def read_timeout(self) -> float | None:
        """How long the next read may wait.  Each limit runs from when its
        kind of wait began, not from the last byte, so a peer dripping one
        byte at a time cannot stretch it."""
        now = time.monotonic()
        kind, limit = self._current_wait()
        if kind is None or limit is None:
            return limit
        if kind != self._wait_kind:
            self._wait_kind, self._wait_since = kind, now
        left = self._wait_since + limit - now
        if self.conn.phase in _HANDSHAKE_PHASES:
            left = min(left, self.started + self.timeouts.handshake - now)
        return max(left, 0.0)

    def _current_wait(self) -> tuple[str | None, float | None]:
        conn, timeouts = self.conn, self.timeouts
        if conn.phase in _HANDSHAKE_PHASES:
            if conn.card_span_open:
                return "peer answer", timeouts.peer_answer
            return "handshake", timeouts.handshake
        if conn.phase is Phase.DISCONNECTION:
            return "disconnection", timeouts.disconnection
        if conn.receiving or conn.sending:
            return "transmission", timeouts.transmission
        return None, timeouts.idle

    def timed_out(self) -> PeerTimeout:
        """The error for a read that ran out of time: a peer that sent part
        of a message (dripping it) is told apart from one that sent
        nothing."""
        conn = self.conn
        kind, limit = self._current_wait()
        during = conn.phase.value
        if limit is not None:
            during += f" ({kind or 'idle'} limit {limit:g} s)"
        if conn.receiving:
            return PeerTimeout(
                f"peer did not finish its message in time during {during}"
                + conn.not_iscl_hint()
            )
        return PeerTimeout(f"peer sent nothing in time during {during}")

    def lost_before_a_frame(self, error: ConnectionLost) -> ConnectionLost:
        """``error`` explained when the handshake lost the connection before
        the peer sent one ISCL frame: a server's peer never spoke ISCL (a
        probe); a client's server closed at once (its connection limit, or
        refusing this address).  Otherwise ``error`` itself."""
        conn = self.conn
        if conn.frames_received:
            return error
        if conn.role is Role.SERVER:
            return PeerNeverSpoke(f"peer sent no ISCL frame: {error}")
        if isinstance(error, PeerTimeout) or conn.not_iscl_hint():
            return error  # it says what the other end is already
        return ConnectionLost(
            f"{error}; the server closed before line connection (at its "
            "connection limit, or refusing this address after failed handshakes?)"
        )

    def _progressed(self) -> None:
        """A message went through: the transmission limit starts again."""
        if self._wait_kind == "transmission":
            self._wait_kind = None

    # -- card -------------------------------------------------------------------

    def advance(self, *, inline_card: bool = True) -> CardRequest | None:
        """Handle the core's events until it needs data, or until a card
        request needs the card span, which the driver then acquires (in its
        own way: a thread waits, a coroutine awaits) before :meth:`run_card`.
        With ``inline_card`` False every card request is returned, for the
        driver to run where it wants (:meth:`card_answered` /
        :meth:`card_failed` then take the result).  Raises what the core
        raises."""
        while True:
            event = self.conn.next_event()
            if isinstance(event, Sentinel):
                return None
            if not isinstance(event, CardRequest):
                self.route(event)
            elif not inline_card or self.needs_span(event):
                return event
            else:
                self.run_card(event)

    def needs_span(self, request: CardRequest) -> bool:
        return (
            request.operation is CardOperation.GET_CHALLENGE
            and not self.arbiter.holds(self)
        )

    def run_card(self, request: CardRequest) -> None:
        """Run a card request whose span (if it needs one) is held."""
        try:
            answer = self.arbiter.run(self, request)
        except IsclError as exc:
            self.card_failed(exc)
        except Exception as exc:
            self.card_crashed(exc)
        else:
            self.card_answered(answer)

    def card_answered(self, answer: bytes) -> None:
        """Give the core the card's answer to its pending request."""
        self.conn.card_answer(answer)
        self.release_span_if_done()

    def card_failed(self, error: IsclError) -> None:
        """Tell the core its card request failed (the span was not had, or the
        card refused or went away)."""
        if not isinstance(error, CardError):
            wrapped = CardError(f"card {self.arbiter.card.name}: {error}")
            wrapped.__cause__ = error
            error = wrapped
        self.conn.card_failed(error)
        self.release_span_if_done()

    def card_crashed(self, exc: Exception) -> None:
        """A card implementation raised something other than an ISCL error
        (a bug in it): logged with its traceback, and the handshake fails as
        for any card failure, the peer told LOCAL_ICCARD."""
        name = self.arbiter.card.name
        log.error("card %s raised %s", name, type(exc).__name__, exc_info=exc)
        error = CardError(
            f"card {name} failed unexpectedly ({type(exc).__name__}; see the log)"
        )
        error.__cause__ = exc
        self.card_failed(error)

    def release_span_if_done(self) -> None:
        if not self.conn.card_span_open:
            self.release_span()

    def release_span(self) -> None:
        self.arbiter.release(self, end_span_with=self.end_span_with)

    # -- events ------------------------------------------------------------------

    def route(self, event: Event) -> None:
        if isinstance(event, MessageReceived | ThroughModeReceived):
            self.messages.append(event)
            self._progressed()
        elif isinstance(event, MessageSent | SendRefused):
            self.sent[event.send_id] = event
            self._progressed()
        elif isinstance(event, Authenticated):
            self.authenticated = event
            log.debug(
                "%s: authenticated with key %d, block length %d",
                self.conn.role.value,
                event.key_index,
                self.conn.block_length,
            )
        elif isinstance(event, ConnectionClosed):
            self.closed = event
        elif isinstance(event, CloseRefused):
            self.close_refused = True
        elif isinstance(event, LineConnected):
            log.debug(
                "%s: line connected, block %d", self.conn.role.value, event.block_length
            )

    def failed(self, error: IsclError) -> None:
        self.error = error
        self.release_span()

    def take_sent(self, send_id: int) -> bool:
        """True once ``send_id`` is through; raises if the peer refused it."""
        result = self.sent.pop(send_id, None)
        if result is None:
            return False
        if isinstance(result, SendRefused):
            raise TransmissionRefused(
                f"peer refused the message ({result.code.name})"
                + (
                    f"; its maximum message length is {result.peer_max_length}"
                    if result.peer_max_length is not None
                    else ""
                ),
                result.code,
                result.peer_max_length,
            )
        return True

    def message_or_close(self) -> bool:
        """A message is waiting, or none will come any more."""
        return bool(self.messages) or self.closed is not None

    def take_message(self) -> MessageReceived | ThroughModeReceived:
        if not self.messages:
            raise LineClosed("the line is closed; no message left")
        return self.messages.popleft()

    def disconnection_settled(self) -> bool:
        return self.closed is not None or self.close_refused

    def take_close_refused(self) -> None:
        if self.close_refused:
            self.close_refused = False
            raise PeerRefusedClose("peer refused the line disconnection")
