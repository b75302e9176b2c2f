"""Per-peer limit on failed authentications.

The host-side check before EXTERNAL AUTHENTICATE already keeps an
unauthenticated peer away from the card's retry counter; this limit also
keeps such a peer from using the card as a free challenge and INTERNAL
AUTHENTICATE service: after ``max_failures`` failures within ``window``
seconds, its new connections are refused for ``cooldown`` seconds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

from iscl_hw.errors import CardError, IsclError, PeerNeverSpoke

__all__ = ["FailureLimiter", "NoSlot", "PeerSlots", "held_against_peer"]

log = logging.getLogger(__name__)


class FailureLimiter:
    def __init__(
        self,
        max_failures: int = 5,
        window: float = 60.0,
        cooldown: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, collections.deque[float]] = {}
        self._blocked_until: dict[str, float] = {}
        if cooldown < 1:
            log.warning(
                "failure cool-down is %g s: a peer that keeps failing "
                "authentication is refused for under a second, if at all",
                cooldown,
            )

    def blocked(self, peer: str) -> bool:
        with self._lock:
            until = self._blocked_until.get(peer)
            if until is None:
                return False
            if self._clock() < until:
                return True
            del self._blocked_until[peer]
            return False

    def failure(self, peer: str) -> None:
        now = self._clock()
        with self._lock:
            times = self._failures.setdefault(peer, collections.deque())
            times.append(now)
            while times and times[0] <= now - self.window:
                times.popleft()
            if len(times) >= self.max_failures:
                self._blocked_until[peer] = now + self.cooldown
                del self._failures[peer]
                log.warning(
                    "refusing %s for %g s after %d failed handshakes in %g s",
                    peer,
                    self.cooldown,
                    self.max_failures,
                    self.window,
                )

    def success(self, peer: str) -> None:
        with self._lock:
            self._failures.pop(peer, None)


def held_against_peer(error: IsclError) -> bool:
    """Whether a failed handshake counts towards the peer's limit.  Not
    counted: our own card's trouble and a connection that never spoke
    ISCL.  A peer that reports its own card failed is counted: it may have
    held our card up to the peer-answer limit first, and nothing tells an
    honest card failure from one claimed to hold our card for free."""
    return not isinstance(error, CardError | PeerNeverSpoke)


class NoSlot(TimeoutError):
    """No handshake slot of the peer's freed in time."""


class PeerSlots:
    """At most ``size`` handshakes at a time from one address (asyncio);
    more wait their turn."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._users: collections.Counter[str] = collections.Counter()

    @contextlib.asynccontextmanager
    async def hold(self, peer: str, timeout: float) -> AsyncIterator[None]:
        """A slot of ``peer``'s for the ``async with`` body; raises NoSlot
        if none is free within ``timeout``."""
        semaphore = self._slots.setdefault(peer, asyncio.Semaphore(self._size))
        self._users[peer] += 1
        try:
            try:
                async with asyncio.timeout(timeout):
                    await semaphore.acquire()
            except TimeoutError:
                raise NoSlot(f"{peer}'s other handshakes took too long") from None
            try:
                yield
            finally:
                semaphore.release()
        finally:
            self._users[peer] -= 1
            if not self._users[peer]:
                del self._users[peer], self._slots[peer]
