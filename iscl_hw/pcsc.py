"""PC/SC card backend: the ISCL card in a reader, through pyscard and pcscd.

:class:`PcscCard` is a :class:`~iscl_hw.card.Card` whose APDUs go through
pyscard's low-level ``SCard*`` API to pcscd and a reader driver.  The
APDU quirks (61xx, 6Cxx, extended length) are handled by the one quirk
layer, :class:`~iscl_hw.transport.ApduLink`, through
:class:`~iscl_hw.card.ApduCard`; this module adds what is PC/SC's own:

* the reader, chosen by exact name, regular expression or index
  (:class:`ReaderSelector`), with a wait for a card;
* the protocol, the card's first offered one in its ATR (T=0 or T=1)
  unless overridden;
* an exclusive PC/SC transaction from GET CHALLENGE to EXTERNAL
  AUTHENTICATE (:meth:`PcscCard.begin_span` / :meth:`PcscCard.end_span`,
  called by the card arbiter);
* PC/SC failures as typed errors naming the reader (:class:`PcscError`
  and its subclasses); a pcscd that went away is reconnected to once,
  where no card state was lost;
* :class:`PcscdChild`, a private ``pcscd --foreground`` for tests and the
  demo, stopped by its PID.

A PC/SC call blocks until the reader answers, and a reader whose card (or
the program serving a virtual card) stopped answering holds it until pcscd
gives up, a minute or more.  :class:`PcscCard` therefore says so
(``blocking_io``): the asyncio driver runs its operations on a worker
thread, one at a time, with a time limit (:meth:`PcscCard.timeout_error`
is the error it then raises), and :meth:`PcscCard.end_span` and
:meth:`PcscCard.close` never wait behind a hung call: they run after it.

pyscard is the optional ``pcsc`` extra; without it the calls raise
:class:`PcscUnavailable`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Final, TypeVar

from iscl_hw.apdu import SW_SECURITY_STATUS
from iscl_hw.card import ISCL_AID, ApduCard, Card
from iscl_hw.errors import (
    CardCommunicationError,
    CardRemoved,
    ConfigError,
    PinRefused,
    StatusWordError,
)
from iscl_hw.transport import AtrInfo, parse_atr

__all__ = [
    "VPCD_PORTS",
    "VPCD_READERS",
    "NoCard",
    "NoReader",
    "PcscCard",
    "PcscCardRemoved",
    "PcscContext",
    "PcscError",
    "PcscServiceLost",
    "PcscTimeout",
    "PcscUnavailable",
    "PcscdChild",
    "PinSource",
    "ReaderBusy",
    "ReaderInfo",
    "ReaderLink",
    "ReaderSelector",
    "VpcdSlot",
    "format_duration",
    "list_readers",
    "open_reader",
    "pcscd_binary",
    "vpcd_installed",
    "vpcd_slots",
]

_log = logging.getLogger(__name__)

#: Reader names and TCP ports of the two vsmartcard vpcd slots (Debian's
#: ``vsmartcard-vpcd`` package, ``/etc/reader.conf.d/vpcd``).
VPCD_READERS: Final = ("Virtual PCD 00 00", "Virtual PCD 00 01")
VPCD_PORTS: Final = (35963, 35964)
_VPCD_CONF: Final = Path("/etc/reader.conf.d/vpcd")

# PC/SC return codes (pcsc-lite's pcsclite.h, the Windows SCard values).
_S_SUCCESS: Final = 0
_E_INVALID_HANDLE: Final = 0x80100003
_E_UNKNOWN_READER: Final = 0x80100009
_E_TIMEOUT: Final = 0x8010000A
_E_SHARING_VIOLATION: Final = 0x8010000B
_E_NO_SMARTCARD: Final = 0x8010000C
_E_PROTO_MISMATCH: Final = 0x8010000F
_F_COMM_ERROR: Final = 0x80100013
_E_NOT_TRANSACTED: Final = 0x80100016
_E_READER_UNAVAILABLE: Final = 0x80100017
_E_NO_SERVICE: Final = 0x8010001D
_E_SERVICE_STOPPED: Final = 0x8010001E
_E_NO_READERS_AVAILABLE: Final = 0x8010002E
_W_UNRESPONSIVE_CARD: Final = 0x80100066
_W_UNPOWERED_CARD: Final = 0x80100067
_W_RESET_CARD: Final = 0x80100068
_W_REMOVED_CARD: Final = 0x80100069

_SERVICE_GONE: Final = frozenset({_E_NO_SERVICE, _E_SERVICE_STOPPED, _E_INVALID_HANDLE})
_CARD_GONE: Final = frozenset(
    {
        _E_NO_SMARTCARD,
        _E_READER_UNAVAILABLE,
        _W_UNPOWERED_CARD,
        _W_RESET_CARD,
        _W_REMOVED_CARD,
    }
)
# Failures of a transmission that mean "gone" only if the card is absent.
_MAYBE_GONE: Final = frozenset({_E_NOT_TRANSACTED, _F_COMM_ERROR, _W_UNRESPONSIVE_CARD})

_PROTOCOL_FLAGS: Final = {0: 0x1, 1: 0x2}
_STATE_PRESENT: Final = 0x20
_STATE_MUTE: Final = 0x200
_POLL_INTERVAL: Final = 0.02
# How long an empty answer may take to show up as a removed card: pcscd
# polls a reader's card about three times a second.
_GONE_WAIT: Final = 0.6

T = TypeVar("T")
#: Where a PIN comes from when a card needs it (an environment variable, a
#: file, a prompt); called again after the card was re-inserted.
PinSource = Callable[[], bytes]


# --------------------------------------------------------------------- errors


class PcscError(CardCommunicationError):
    """A PC/SC operation failed; ``reader`` names the reader if known."""

    def __init__(
        self, message: str, reader: str | None = None, hresult: int | None = None
    ) -> None:
        super().__init__(message)
        self.reader = reader
        self.hresult = hresult


class PcscUnavailable(PcscError):
    """pcscd is not running (or pyscard is not installed)."""


class PcscServiceLost(PcscUnavailable):
    """pcscd went away under an established context (stopped or restarted)."""


class NoReader(PcscError):
    """No reader matches the selection."""


class NoCard(PcscError):
    """No card came into a matching reader within the wait."""


class ReaderBusy(PcscError):
    """Every matching reader is held by another process (sharing violation)."""


class PcscCardRemoved(CardRemoved, PcscError):
    """The card left the reader (or was reset); its security state is gone."""


class PcscTimeout(PcscError):
    """A reader did not answer within the time allowed: its card, or the
    program serving a virtual card, stopped answering."""


def _scard() -> ModuleType:
    try:
        from smartcard import scard
    except ImportError:
        raise PcscUnavailable(
            "pyscard is not installed; install the 'pcsc' extra "
            "(pip install 'iscl[pcsc]')"
        ) from None
    return scard  # type: ignore[no-any-return]


def _code(hresult: int) -> int:
    return hresult & 0xFFFFFFFF


def _message(hresult: int) -> str:
    try:
        text = str(_scard().SCardGetErrorMessage(hresult)).rstrip(". ")
    except Exception:  # pyscard knows no text for it
        text = "PC/SC error"
    return f"{text} (0x{_code(hresult):08X})"


def format_duration(seconds: float) -> str:
    """``0.3`` as ``300 ms``, ``2.0`` as ``2 s``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:g} s"


def _waited(seconds: float) -> str:
    """`` for 300 ms``; nothing for no wait at all."""
    return f" for {format_duration(seconds)}" if seconds > 0 else ""


def _error(what: str, hresult: int, reader: str | None) -> PcscError:
    """The typed error for a failed PC/SC call."""
    code = _code(hresult)
    where = f"reader {reader!r}: " if reader else ""
    text = f"{where}{what}: {_message(hresult)}"
    if code in _SERVICE_GONE:
        return PcscServiceLost(f"{text}; is pcscd running?", reader, code)
    if code in _CARD_GONE:
        return PcscCardRemoved(f"{text}; the card's state is gone", reader, code)
    if code == _E_SHARING_VIOLATION:
        return ReaderBusy(f"{text}; another process holds it", reader, code)
    if code in (_E_UNKNOWN_READER, _E_NO_READERS_AVAILABLE):
        return NoReader(text, reader, code)
    return PcscError(text, reader, code)


# --------------------------------------------------------------- the context


class PcscContext:
    """A PC/SC resource manager context, re-established on request."""

    def __init__(self) -> None:
        self._handle: Any = None

    def __repr__(self) -> str:
        return f"<PcscContext {'open' if self._handle is not None else 'closed'}>"

    @property
    def handle(self) -> Any:
        if self._handle is None:
            self._handle = self._establish()
        return self._handle

    @staticmethod
    def _establish() -> Any:
        scard = _scard()
        hresult, handle = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if _code(hresult) != _S_SUCCESS:
            raise PcscUnavailable(
                f"cannot reach pcscd: {_message(hresult)}; start it "
                "(pcscd --foreground, or systemctl start pcscd)",
                None,
                _code(hresult),
            )
        return handle

    def reestablish(self) -> None:
        """Drop the context (pcscd was restarted) and make a new one."""
        _log.info("re-establishing the PC/SC context")
        self.release()
        self._handle = self._establish()

    def release(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            _scard().SCardReleaseContext(handle)

    def readers(self) -> list[str]:
        """Reader names in pcscd's order (empty if there are none)."""
        hresult, names = _scard().SCardListReaders(self.handle, [])
        code = _code(hresult)
        if code == _E_NO_READERS_AVAILABLE:
            return []
        if code != _S_SUCCESS:
            raise _error("listing readers", hresult, None)
        return list(names)

    def states(self, readers: list[str]) -> dict[str, tuple[int, bytes]]:
        """Each reader's event state and ATR (empty when no card)."""
        if not readers:
            return {}
        scard = _scard()
        query = [(name, scard.SCARD_STATE_UNAWARE) for name in readers]
        hresult, answer = scard.SCardGetStatusChange(self.handle, 0, query)
        if _code(hresult) not in (_S_SUCCESS, _E_TIMEOUT):
            raise _error("reading reader states", hresult, None)
        return {name: (state, bytes(atr)) for name, state, atr in answer}

    def __enter__(self) -> PcscContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ------------------------------------------------------------ reader choice


@dataclass(frozen=True)
class ReaderSelector:
    """Which readers to use: one exact name, a regular expression (search),
    an index into pcscd's list, or (all None) every reader in order."""

    name: str | None = None
    pattern: str | None = None
    index: int | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.name, self.pattern, self.index) if v is not None]
        if len(given) > 1:
            raise ConfigError("choose a reader by name, pattern or index, not several")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ConfigError(
                    f"bad reader pattern {self.pattern!r}: {exc}"
                ) from None

    @classmethod
    def parse(cls, text: str | int | None) -> ReaderSelector:
        """``None``: any; an int or ``#N``: index; ``re:EXPR`` or ``/EXPR/``:
        pattern; anything else: exact name."""
        if text is None:
            return cls()
        if isinstance(text, int):
            return cls(index=text)
        if text.startswith("#") and text[1:].isdigit():
            return cls(index=int(text[1:]))
        if text.startswith("re:"):
            return cls(pattern=text[3:])
        if len(text) > 1 and text.startswith("/") and text.endswith("/"):
            return cls(pattern=text[1:-1])
        return cls(name=text)

    def __str__(self) -> str:
        if self.name is not None:
            return f"reader {self.name!r}"
        if self.pattern is not None:
            return f"readers matching /{self.pattern}/"
        if self.index is not None:
            return f"reader #{self.index}"
        return "any reader"

    def pick(self, readers: list[str]) -> list[str]:
        """The matching readers, in pcscd's order."""
        if self.name is not None:
            return [r for r in readers if r == self.name]
        if self.pattern is not None:
            expr = re.compile(self.pattern)
            return [r for r in readers if expr.search(r)]
        if self.index is not None:
            return readers[self.index : self.index + 1] if self.index >= 0 else []
        return list(readers)


# --------------------------------------------------------- one reader link


def _protocol_flag(atr: bytes, override: int | None) -> int:
    if override is not None:
        if override not in _PROTOCOL_FLAGS:
            raise ConfigError(f"protocol must be T=0 or T=1, got T={override}")
        return _PROTOCOL_FLAGS[override]
    try:
        info = parse_atr(atr)
    except ValueError:
        return _PROTOCOL_FLAGS[0] | _PROTOCOL_FLAGS[1]
    default = _PROTOCOL_FLAGS.get(info.default_protocol)
    return default or _PROTOCOL_FLAGS[0] | _PROTOCOL_FLAGS[1]


class ReaderLink:
    """A connected card in one reader: the raw transport under ApduCard."""

    def __init__(
        self, context: PcscContext, reader: str, handle: Any, protocol: int, atr: bytes
    ) -> None:
        self.context = context
        self.reader = reader
        self.atr = atr
        self.protocol = protocol
        self._handle: Any = handle
        self._in_transaction = False

    def __repr__(self) -> str:
        return f"<ReaderLink {self.reader!r} T={self.protocol_number}>"

    @property
    def protocol_number(self) -> int:
        return 1 if self.protocol == _PROTOCOL_FLAGS[1] else 0

    @property
    def atr_info(self) -> AtrInfo | None:
        try:
            return parse_atr(self.atr)
        except ValueError:
            return None

    def transmit(self, command: bytes) -> bytes:
        if self._handle is None:
            raise PcscCardRemoved("disconnected", self.reader)
        hresult, answer = _scard().SCardTransmit(
            self._handle, self.protocol, list(command)
        )
        if _code(hresult) != _S_SUCCESS:
            raise self._transmit_error(hresult)
        if len(answer) < 2 and self._gone_within(_GONE_WAIT):
            # vpcd answers a card that vanished mid-command with no bytes.
            raise _error("transmit", _W_REMOVED_CARD, self.reader)
        return bytes(answer)

    def _gone_within(self, wait: float) -> bool:
        """True once pcscd sees no card, polling at most ``wait`` seconds."""
        deadline = time.monotonic() + wait
        while self.card_present():
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_INTERVAL)
        return True

    def _transmit_error(self, hresult: int) -> PcscError:
        # pcscd may fail the command before its reader state shows the
        # card gone: give it the time the empty-answer path gives it.
        code = _code(hresult)
        if code in _MAYBE_GONE and self._gone_within(_GONE_WAIT):
            return _error("transmit", _W_REMOVED_CARD, self.reader)
        error = _error("transmit", hresult, self.reader)
        if type(error) is PcscError and not self._service_alive():
            # pcscd dying mid-command has failed it with other codes here
            # (0x8010006A, "Access denied").
            return PcscServiceLost(
                f"{error}; pcscd went away during the command", self.reader, code
            )
        return error

    def _service_alive(self) -> bool:
        """False when pcscd no longer answers on this context."""
        try:
            self.context.states([self.reader])
        except PcscServiceLost:
            return False
        except PcscError:
            pass  # pcscd answered, if only with an error
        return True

    def card_present(self) -> bool:
        try:
            state, _ = self.context.states([self.reader])[self.reader]
        except (PcscError, KeyError):
            return False
        return bool(state & _STATE_PRESENT)

    def begin_transaction(self) -> None:
        hresult = _scard().SCardBeginTransaction(self._handle)
        if _code(hresult) != _S_SUCCESS:
            raise _error("beginning a transaction", hresult, self.reader)
        self._in_transaction = True

    def end_transaction(self) -> None:
        if not self._in_transaction:
            return
        self._in_transaction = False
        scard = _scard()
        hresult = scard.SCardEndTransaction(self._handle, scard.SCARD_LEAVE_CARD)
        if _code(hresult) != _S_SUCCESS:
            _log.info(
                "reader %r: ending the transaction: %s", self.reader, _message(hresult)
            )

    def close(self) -> None:
        """End any transaction and disconnect, leaving the card powered."""
        if self._handle is None:
            return
        self.end_transaction()
        handle, self._handle = self._handle, None
        scard = _scard()
        scard.SCardDisconnect(handle, scard.SCARD_LEAVE_CARD)


@dataclass
class _Attempt:
    """What one pass over the matching readers found."""

    readers: list[str]
    busy: list[str]
    link: ReaderLink | None = None


def _try_readers(
    context: PcscContext, selector: ReaderSelector, protocol: int | None
) -> _Attempt:
    readers = selector.pick(context.readers())
    attempt = _Attempt(readers, [])
    states = context.states(readers)
    for reader in readers:
        state, atr = states.get(reader, (0, b""))
        if not state & _STATE_PRESENT or state & _STATE_MUTE:
            continue
        hresult, handle, active = _connect(context, reader, atr, protocol)
        code = _code(hresult)
        if code == _S_SUCCESS:
            attempt.link = ReaderLink(context, reader, handle, active, atr)
            return attempt
        if code == _E_SHARING_VIOLATION:
            attempt.busy.append(reader)
        elif code not in _CARD_GONE:
            raise _error("connecting", hresult, reader)
    return attempt


def _connect(
    context: PcscContext, reader: str, atr: bytes, protocol: int | None
) -> tuple[int, Any, int]:
    """SCardConnect, shared.  Without an override, a card another
    connection already runs in its other protocol is taken as it is."""
    scard = _scard()
    flags = _protocol_flag(atr, protocol)
    result = scard.SCardConnect(context.handle, reader, scard.SCARD_SHARE_SHARED, flags)
    if _code(result[0]) == _E_PROTO_MISMATCH and protocol is None:
        both = _PROTOCOL_FLAGS[0] | _PROTOCOL_FLAGS[1]
        result = scard.SCardConnect(
            context.handle, reader, scard.SCARD_SHARE_SHARED, both
        )
    return result[0], result[1], result[2]


def open_reader(
    context: PcscContext,
    selector: ReaderSelector,
    *,
    protocol: int | None = None,
    card_timeout: float = 5.0,
    busy_wait: float = 2.0,
) -> ReaderLink:
    """Connect (shared) to the card in the first matching reader that has
    one and is free; wait up to ``card_timeout`` for a card and, once every
    reader with a card is held by another process, up to ``busy_wait``.
    No matching reader at all fails at once (:class:`NoReader`)."""
    started = time.monotonic()
    busy_since: float | None = None
    while True:
        attempt = _try_readers(context, selector, protocol)
        if not attempt.readers:
            raise _nothing_found(selector, attempt, 0)
        if attempt.link is not None:
            _log.info(
                "reader %r: card connected, T=%d, ATR %s",
                attempt.link.reader,
                attempt.link.protocol_number,
                attempt.link.atr.hex().upper(),
            )
            return attempt.link
        now = time.monotonic()
        if attempt.busy:
            busy_since = busy_since if busy_since is not None else now
            if now - busy_since >= busy_wait:
                raise ReaderBusy(
                    f"{', '.join(map(repr, attempt.busy))} held by another "
                    f"process{_waited(busy_wait)} (sharing violation)",
                    attempt.busy[0],
                    _E_SHARING_VIOLATION,
                )
        else:
            busy_since = None
        if now - started >= card_timeout:
            raise _nothing_found(selector, attempt, card_timeout)
        time.sleep(_POLL_INTERVAL)


def _nothing_found(
    selector: ReaderSelector, attempt: _Attempt, waited: float
) -> PcscError:
    if not attempt.readers:
        return NoReader(f"no PC/SC reader: no {selector} among pcscd's readers")
    names = ", ".join(map(repr, attempt.readers))
    after = f" after {format_duration(waited)}" if waited > 0 else ""
    return NoCard(f"no card in {names}{after}", attempt.readers[0], _E_NO_SMARTCARD)


# ------------------------------------------------------------------ the card


class PcscCard(Card):
    """The ISCL card in a PC/SC reader.

    Opens at construction: waits up to ``card_timeout`` for a card in a
    matching reader, connects shared with the ATR's protocol (or
    ``protocol``), SELECTs the ISCL application and VERIFYs the PIN from
    ``pin`` if given.  ``extended_length`` None takes it from the ATR.

    A removed card raises :class:`PcscCardRemoved` (the connection using it
    ends); the next span waits up to ``reconnect_wait`` for a card and opens
    it again.  When pcscd went away, the context is re-established once,
    unless a challenge of the current span was already issued.

    Its calls block (``blocking_io``), and one card's calls never overlap:
    an operation holds the card until it returns.  :meth:`end_span` and
    :meth:`close` do not wait for one that hangs (a reader no longer
    answering): they run when it returns, before the next operation.
    """

    #: Operations wait for the reader; drivers run them off their event loop.
    blocking_io: ClassVar[bool] = True

    def __init__(
        self,
        reader: ReaderSelector | str | int | None = None,
        *,
        aid: bytes = ISCL_AID,
        pin: PinSource | None = None,
        protocol: int | None = None,
        extended_length: bool | None = None,
        card_timeout: float = 5.0,
        busy_wait: float = 2.0,
        reconnect_wait: float = 1.0,
        name: str | None = None,
        context: PcscContext | None = None,
    ) -> None:
        if isinstance(reader, ReaderSelector):
            self.selector = reader
        else:
            self.selector = ReaderSelector.parse(reader)
        self._aid = aid
        self._pin = pin
        self._protocol = protocol
        self._extended = extended_length
        self._busy_wait = busy_wait
        self._reconnect_wait = reconnect_wait
        self._in_span = False
        self._context = context or PcscContext()
        self._owns_context = context is None
        self._link: ReaderLink | None = None
        self._card: ApduCard | None = None
        self._closed = False
        self._challenge_out = False
        self._pin_refused: PinRefused | None = None
        # One operation at a time; what end_span/close could not run at
        # once (an operation held the card) runs when it lets go.
        self._io = threading.Lock()
        self._deferred_lock = threading.Lock()
        self._deferred: list[Callable[[], None]] = []
        self.name = name or str(self.selector)
        self._open(card_timeout)
        if name is None and self._link is not None:
            self.name = self._link.reader

    def __repr__(self) -> str:
        where = self._link.reader if self._link is not None else "no card"
        return f"<PcscCard {self.name!r} {where}>"

    # -- state ---------------------------------------------------------------

    @property
    def reader(self) -> str | None:
        """The reader of the current session (None between sessions)."""
        return self._link.reader if self._link is not None else None

    @property
    def atr(self) -> bytes:
        return self._link.atr if self._link is not None else b""

    @property
    def protocol(self) -> int | None:
        return self._link.protocol_number if self._link is not None else None

    def _open(self, wait: float) -> ApduCard:
        refused = self._pin_refused
        if refused is not None:
            # The card counts wrong PINs: one a card refused is never sent
            # again on its own (a reopen after a removal, say).
            raise PinRefused(
                f"card {self.name!r}: its PIN was refused before; iscl does not "
                "send it again: put the right PIN in place, then restart",
                refused.sw1,
                refused.sw2,
            )
        link = open_reader(
            self._context,
            self.selector,
            protocol=self._protocol,
            card_timeout=wait,
            busy_wait=self._busy_wait,
        )
        try:
            card = ApduCard(
                link,
                aid=self._aid,
                pin=self._pin() if self._pin is not None else None,
                name=link.reader,
                extended_length=self._extended_length(link),
            )
        except PinRefused as exc:
            self._pin_refused = exc
            link.close()
            raise
        except BaseException:
            link.close()
            raise
        self._link, self._card = link, card
        return card

    def _extended_length(self, link: ReaderLink) -> bool:
        if self._extended is not None:
            return self._extended
        info = link.atr_info
        return info.extended_length if info is not None else False

    def _drop(self) -> None:
        link, self._link, self._card = self._link, None, None
        if link is not None:
            try:
                link.close()
            except PcscError as exc:
                _log.debug("closing a dead link: %s", exc)

    def _session(self) -> ApduCard:
        if self._closed:
            raise PcscError(f"card {self.name!r} is closed", self.reader)
        if self._card is None:
            return self._open(self._reconnect_wait)
        return self._card

    # -- one operation at a time --------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the card for one operation (waiting for the one before)."""
        self._io.acquire()
        try:
            yield
        finally:
            self._let_go()

    def _let_go(self) -> None:
        """Run what was deferred while the card was held, then release it."""
        while True:
            with self._deferred_lock:
                if not self._deferred:
                    self._io.release()
                    return
                action = self._deferred.pop(0)
            self._quietly(action)

    def _now_or_later(self, action: Callable[[], None]) -> None:
        """Run ``action`` now if no operation holds the card, else when it
        lets go; never waits."""
        with self._deferred_lock:
            if not self._io.acquire(blocking=False):
                self._deferred.append(action)
                _log.debug("card %r: busy; %s deferred", self.name, action.__name__)
                return
        try:
            self._quietly(action)
        finally:
            self._let_go()

    def _quietly(self, action: Callable[[], None]) -> None:
        # A deferred step runs at the end of another operation: its failure
        # must not replace that operation's outcome.
        try:
            action()
        except PcscError as exc:
            _log.info("card %r: %s: %s", self.name, action.__name__, exc)
        except Exception:
            _log.exception("card %r: %s failed", self.name, action.__name__)

    def timeout_error(self, operation: str, seconds: float) -> PcscTimeout:
        """The error for an operation that took longer than ``seconds``."""
        where = self.reader or self.name
        return PcscTimeout(
            f"reader {where!r}: no answer to {operation} within "
            f"{format_duration(seconds)}; is the reader, or the program serving "
            "its card, stopped?",
            self.reader,
        )

    # -- operations ------------------------------------------------------------

    def _run(self, operation: Callable[[ApduCard], T]) -> T:
        with self._exclusive():
            return self._run_held(operation)

    def _run_held(self, operation: Callable[[ApduCard], T]) -> T:
        card = self._session()
        try:
            return operation(card)
        except PcscServiceLost:
            self._drop()
            if self._challenge_out:
                raise
            self._context.reestablish()
            return operation(self._reopened())
        except CardRemoved:
            self._drop()
            if self._in_span:
                raise
            # Outside a span (a client's INTERNAL AUTHENTICATE, a probe) no
            # card state is lost and no retry counter is involved: a card
            # put back since the last use is opened again, once.
            _log.info("card %r: opening it again after a removal", self.name)
            return operation(self._session())
        except StatusWordError as exc:
            if exc.sw != SW_SECURITY_STATUS or self._pin is None:
                raise
            # The card forgot its verified PIN: another program selected an
            # application on it, or reset it.  The next use opens it again
            # (SELECT, VERIFY); this one too, unless that loses a challenge
            # of the current span.
            _log.warning(
                "card %r lost its PIN verification (another program used it?); "
                "it is selected and verified again",
                self.name,
            )
            self._drop()
            if self._challenge_out:
                raise
            return operation(self._reopened())

    def _reopened(self) -> ApduCard:
        """The card opened again after :meth:`_drop`; within a span its
        PC/SC transaction is begun again first, so that other programs stay
        off the card until the span ends."""
        card = self._session()
        if self._in_span:
            assert self._link is not None
            self._link.begin_transaction()
        return card

    # -- Card ------------------------------------------------------------------

    def begin_span(self) -> None:
        """Hold a PC/SC transaction until :meth:`end_span`.  No card state
        matters yet, so a card changed or a pcscd restarted since the last
        span is opened again (once) first."""
        with self._exclusive():
            self._challenge_out = False
            try:
                self._begin_transaction()
            except (PcscServiceLost, PcscCardRemoved) as exc:
                _log.info("card %r: opening it again: %s", self.name, exc)
                self._drop()
                if isinstance(exc, PcscServiceLost):
                    self._context.reestablish()
                self._begin_transaction()

    def _begin_transaction(self) -> None:
        self._session()
        assert self._link is not None
        self._link.begin_transaction()
        self._in_span = True

    def end_span(self) -> None:
        """End the span's transaction; never waits for a hung operation (the
        span then ends when that returns, so that operation still counts
        as in the span: it is not run again on a card opened anew)."""
        self._now_or_later(self._end_span_now)

    def _end_span_now(self) -> None:
        self._challenge_out = False
        self._in_span = False
        if self._link is not None:
            self._link.end_transaction()

    def get_challenge(self) -> bytes:
        challenge = self._run(lambda card: card.get_challenge())
        # Only a span's challenge is worth keeping: outside one (a probe)
        # nothing stops another program from taking the card's next one.
        self._challenge_out = self._in_span
        return challenge

    def internal_authenticate(self, key_ref: int, challenge: bytes) -> bytes:
        return self._run(lambda card: card.internal_authenticate(key_ref, challenge))

    def external_authenticate(self, key_ref: int, response: bytes) -> None:
        self._run(lambda card: card.external_authenticate(key_ref, response))

    def transmit(self, command: bytes) -> bytes:
        """A raw APDU to the card of the current session (for probes)."""
        with self._exclusive():
            self._session()
            assert self._link is not None
            return self._link.transmit(command)

    @property
    def apdu_card(self) -> ApduCard:
        """The APDU layer of the current session (opens one if needed)."""
        with self._exclusive():
            return self._session()

    def close(self) -> None:
        """Disconnect; a hung operation is not waited for (the card is
        disconnected when it returns)."""
        if self._closed:
            return
        self._closed = True
        self._now_or_later(self._close_now)

    def _close_now(self) -> None:
        self._drop()
        if self._owns_context:
            self._context.release()


# ------------------------------------------------------------------- listing


@dataclass(frozen=True)
class ReaderInfo:
    """One reader as ``iscl card list`` shows it."""

    name: str
    card: bool
    atr: bytes
    #: Offered protocols from the ATR.
    offered: tuple[int, ...]
    #: The protocol a shared connection got, or None (no card, in use).
    active: int | None
    note: str = ""


def _describe(context: PcscContext, name: str, state: int, atr: bytes) -> ReaderInfo:
    if not state & _STATE_PRESENT:
        return ReaderInfo(name, False, b"", (), None, "no card")
    try:
        offered = parse_atr(atr).protocols
    except ValueError:
        offered = ()
    try:
        link = open_reader(
            context, ReaderSelector(name=name), card_timeout=0, busy_wait=0
        )
    except PcscError as exc:
        return ReaderInfo(name, True, atr, offered, None, str(exc))
    link.close()
    return ReaderInfo(name, True, atr, offered, link.protocol_number)


def list_readers(
    context: PcscContext | None = None,
    *,
    on_reader: Callable[[str], None] | None = None,
) -> Iterator[ReaderInfo]:
    """Every reader with its card, ATR and protocols; ``on_reader`` is told
    each reader's name before it is asked (a watchdog can name it)."""
    own = context is None
    context = context or PcscContext()
    try:
        readers = context.readers()
        states = context.states(readers)
        for name in readers:
            if on_reader is not None:
                on_reader(name)
            state, atr = states.get(name, (0, b""))
            yield _describe(context, name, state, atr)
    finally:
        if own:
            context.release()


@dataclass(frozen=True)
class VpcdSlot:
    """One vpcd reader slot as pcscd shows it."""

    reader: str
    port: int
    #: pcscd has a card in it (a virtual card is connected to its port).
    has_card: bool


def vpcd_slots(
    context: PcscContext | None = None, *, settle: float = 0.0
) -> list[VpcdSlot]:
    """The vpcd readers pcscd has (Debian's configuration: VPCD_READERS on
    VPCD_PORTS), each with whether a card is in it already.  With
    ``settle``, a reader that shows a card is looked at again for up to
    that long: a card that just left (a run a moment ago) shows until
    pcscd's next poll of vpcd, about a third of a second later."""
    deadline = time.monotonic() + settle
    while True:
        slots = _vpcd_slots(context)
        if all(not slot.has_card for slot in slots) or time.monotonic() >= deadline:
            return slots
        time.sleep(_POLL_INTERVAL)


def _vpcd_slots(context: PcscContext | None) -> list[VpcdSlot]:
    own = context is None
    context = context or PcscContext()
    try:
        readers = context.readers()
        present: list[str] = [r for r in VPCD_READERS if r in readers]
        states = context.states(present)
    finally:
        if own:
            context.release()
    return [
        VpcdSlot(reader, port, bool(states[reader][0] & _STATE_PRESENT))
        for reader, port in zip(VPCD_READERS, VPCD_PORTS, strict=True)
        if reader in states
    ]


# -------------------------------------------------------------- pcscd itself


def pcscd_binary() -> str | None:
    """Path of the pcscd program, or None if it is not installed."""
    found = shutil.which("pcscd")
    if found:
        return found
    for candidate in ("/usr/sbin/pcscd", "/sbin/pcscd"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def vpcd_installed() -> bool:
    """True if vsmartcard's vpcd reader driver is configured for pcscd."""
    return _VPCD_CONF.is_file()


def pcscd_running() -> bool:
    """True if a pcscd answers (a context can be established).  Raises
    PcscUnavailable if pyscard is not installed: that is not pcscd's
    absence, and starting one would not help."""
    _scard()
    try:
        with PcscContext() as context:
            context.readers()
    except PcscUnavailable:
        return False
    return True


class PcscdChild:
    """A private ``pcscd --foreground`` child process, ended by its PID."""

    def __init__(
        self, *, log_path: Path | None = None, ready_wait: float = 5.0
    ) -> None:
        self.log_path = log_path
        self.ready_wait = ready_wait
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        binary = pcscd_binary()
        if binary is None:
            raise PcscUnavailable(
                "pcscd is not installed (apt-get install --no-install-recommends pcscd)"
            )
        command = [binary, "--foreground"]
        if self.log_path is None:
            self.process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        else:
            with open(self.log_path, "ab") as out:
                self.process = subprocess.Popen(
                    command, stdout=out, stderr=subprocess.STDOUT
                )
        _log.info("started pcscd, PID %d", self.process.pid)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_wait
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise PcscUnavailable(
                    f"pcscd exited at once (status {self.process.returncode}); "
                    "does another pcscd own /run/pcscd?"
                )
            if pcscd_running():
                return
            time.sleep(_POLL_INTERVAL)
        self.stop()
        raise PcscUnavailable(f"pcscd did not answer within {self.ready_wait:g} s")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        _log.info("stopped pcscd, PID %d", process.pid)

    def __enter__(self) -> PcscdChild:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
