"""One card, many connections: the GET CHALLENGE .. EXTERNAL AUTHENTICATE span.

A card keeps only its last challenge, so from the GET CHALLENGE a handshake
runs until its EXTERNAL AUTHENTICATE, no other handshake may ask the card
for a challenge.  :class:`CardArbiter` hands that span to one connection at
a time, with a bound on how long and how many handshakes wait, so a card
used on both sides of a gateway cannot deadlock two peers: a waiter gives
up with :class:`CardBusy` and its peer's span ends with it.

It also refuses to answer (INTERNAL AUTHENTICATE) a challenge equal to the
one this card has outstanding for another connection: that is a peer
reflecting our own challenge back at us.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Callable

from iscl_hw import crypto
from iscl_hw.card import Card
from iscl_hw.errors import CardBusy, CardError
from iscl_hw.events import CardOperation, CardRequest

__all__ = ["CardArbiter"]

log = logging.getLogger(__name__)


class CardArbiter:
    """Serialises the authentication span of every connection on ``card``."""

    def __init__(
        self, card: Card, *, span_wait: float = 5.0, max_waiting: int = 64
    ) -> None:
        self.card = card
        self.span_wait = span_wait
        self.max_waiting = max_waiting
        self._state = threading.Condition()
        self._owner: object | None = None
        self._waiting = 0
        self._async_waiters: list[
            tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]
        ] = []
        self._outstanding = b""
        self._span_begun = False

    @classmethod
    def for_card(cls, card: Card | CardArbiter) -> CardArbiter:
        """The one arbiter of ``card``, shared by every connection using it."""
        if isinstance(card, CardArbiter):
            return card
        card = card.for_connection()
        with _REGISTRY_LOCK:
            arbiter = _ARBITERS.get(card)
            if arbiter is None:
                arbiter = _ARBITERS[card] = cls(card)
            return arbiter

    def __repr__(self) -> str:
        return f"<CardArbiter {self.card.name} waiting={self._waiting}>"

    # -- the span -------------------------------------------------------------

    def holds(self, owner: object) -> bool:
        return self._owner is owner

    def acquire(self, owner: object) -> None:
        """Take the span for ``owner``, waiting at most ``span_wait``."""
        deadline = time.monotonic() + self.span_wait
        with self._state:
            if self._take(owner):
                return
            self._enter_queue()
            try:
                while not self._take(owner):
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._state.wait(left):
                        raise self._busy()
            finally:
                self._waiting -= 1

    async def acquire_async(self, owner: object) -> None:
        """:meth:`acquire` for a coroutine: waits without blocking the loop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.span_wait
        with self._state:
            if self._take(owner):
                return
            self._enter_queue()
        try:
            while True:
                with self._state:
                    if self._take(owner):
                        return
                    future: asyncio.Future[None] = loop.create_future()
                    self._async_waiters.append((loop, future))
                left = deadline - loop.time()
                if left <= 0:
                    raise self._busy()
                try:
                    await asyncio.wait_for(future, left)
                except TimeoutError:
                    raise self._busy() from None
        finally:
            with self._state:
                self._waiting -= 1

    def _take(self, owner: object) -> bool:
        if self._owner is not None:
            return False
        self._owner = owner
        return True

    def release(
        self,
        owner: object,
        *,
        end_span_with: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        """End ``owner``'s span (no effect if it does not hold it).  The
        card's own end of the span runs here, or is handed to
        ``end_span_with`` (a blocking card's worker thread, which runs it
        before that card's next operation)."""
        with self._state:
            if self._owner is not owner:
                return
            self._owner = None
            self._outstanding = b""
            begun, self._span_begun = self._span_begun, False
            if begun:
                if end_span_with is None:
                    self._end_card_span()
                else:
                    end_span_with(self._end_card_span)
            self._state.notify()
            waiters, self._async_waiters = self._async_waiters, []
        for loop, future in waiters:
            loop.call_soon_threadsafe(_wake, future)

    def _end_card_span(self) -> None:
        # The card's end_span must not raise; a card that does anyway must
        # not leave the span taken for ever.
        try:
            self.card.end_span()
        except Exception:
            log.exception("card %s: ending its span failed", self.card.name)

    def _enter_queue(self) -> None:
        if self._waiting >= self.max_waiting:
            raise CardBusy(
                f"card {self.card.name}: {self._waiting} handshakes already wait"
            )
        self._waiting += 1

    def _busy(self) -> CardBusy:
        return CardBusy(
            f"card {self.card.name} stayed busy with another handshake for "
            f"{self.span_wait:g} s"
        )

    # -- card operations ------------------------------------------------------

    def run(
        self,
        owner: object,
        request: CardRequest,
        *,
        end_span_with: Callable[[Callable[[], None]], None] | None = None,
    ) -> bytes:
        """Run one card operation for ``owner``; GET CHALLENGE and EXTERNAL
        AUTHENTICATE need the span (see :meth:`acquire`).  EXTERNAL
        AUTHENTICATE is the span's last command: the card's end of the span
        follows it at once, or is handed to ``end_span_with`` (a worker
        thread running it after the answer is handed over); the span itself
        stays ``owner``'s until :meth:`release`."""
        operation = request.operation
        if operation is CardOperation.INTERNAL_AUTHENTICATE:
            self._refuse_reflection(owner, request.data)
            return self.card.internal_authenticate(request.key_ref, request.data)

        if not self.holds(owner):
            raise CardError(f"{operation.value} outside the connection's card span")
        if operation is CardOperation.GET_CHALLENGE:
            if not self._span_begun:
                self._begin_card_span(owner)
            challenge = self.card.get_challenge()
            self._outstanding = challenge
            return challenge
        try:
            self.card.external_authenticate(request.key_ref, request.data)
        finally:
            self._end_card_span_of(owner, end_span_with)
        return b""

    def _end_card_span_of(
        self,
        owner: object,
        end_span_with: Callable[[Callable[[], None]], None] | None,
    ) -> None:
        with self._state:
            begun = self._span_begun and self._owner is owner
            if begun:
                self._span_begun = False
        if not begun:
            return
        if end_span_with is None:
            self._end_card_span()
        else:
            end_span_with(self._end_card_span)

    def _begin_card_span(self, owner: object) -> None:
        self.card.begin_span()
        with self._state:
            still_held = self._owner is owner
            if still_held:
                self._span_begun = True
        if not still_held:
            # The connection gave up (its card timeout) while a slow
            # begin_span ran on a worker thread: end what it began.
            self._end_card_span()
            raise CardError(f"card {self.card.name}: the span was given up")

    def _refuse_reflection(self, owner: object, challenge: bytes) -> None:
        with self._state:
            reflected = (
                self._owner is not None
                and self._owner is not owner
                and crypto.constant_time_equal(challenge, self._outstanding)
            )
        if reflected:
            log.warning("card %s: refused to answer its own challenge", self.card.name)
            raise CardError("peer sent back the challenge this card just issued")


_ARBITERS: weakref.WeakKeyDictionary[Card, CardArbiter] = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
