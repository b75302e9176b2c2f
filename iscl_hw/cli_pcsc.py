"""``iscl card list`` and ``iscl card probe``: IC cards in PC/SC readers.

``list`` shows every reader, whether it has a card, the ATR, the protocols
the ATR offers and the one a shared connection gets.  ``probe`` opens one
reader's card and reports SELECT of the ISCL application, the PIN state
(VERIFY without data, which ISO/IEC 7816-4 defines as a query), GET
CHALLENGE and which key references answer INTERNAL AUTHENTICATE.  Probing
never sends EXTERNAL AUTHENTICATE and never VERIFYs a PIN it was not given,
so no retry counter moves.  A PIN comes from an environment variable, a
file or a prompt, never from the command line, and is never logged.

Both run their PC/SC calls on a worker thread and give up, with an error
naming the reader and the command, when one gets no answer within
``--timeout``: a reader whose card (or the program serving a virtual card)
stopped would otherwise hold them until pcscd gives up.  ``probe`` prints
what it found before such an error, or before a card pulled out midway.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import math
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO, TypeVar

from iscl_hw import apdu
from iscl_hw.apdu import ResponseApdu, format_apdu_for_trace
from iscl_hw.card import ISCL_AID
from iscl_hw.constants import CHALLENGE_LENGTH, KEY_INDEXES
from iscl_hw.errors import ConfigError, IsclError, KeyFileError
from iscl_hw.keyfile import read_private_file
from iscl_hw.pcsc import (
    PcscContext,
    PcscTimeout,
    PinSource,
    ReaderInfo,
    ReaderLink,
    ReaderSelector,
    format_duration,
    list_readers,
    open_reader,
)
from iscl_hw.siteconfig import seconds_in_range, seconds_wanted
from iscl_hw.transport import ApduLink, RawTransport

__all__ = [
    "cmd_card_list",
    "cmd_card_probe",
    "pin_from_env",
    "pin_from_file",
    "pin_from_prompt",
    "register",
]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 2
_TRACE_LOGGERS: Final = ("iscl_hw.transport", "iscl_hw.card", "iscl_hw.pcsc")
_TRACE_HANDLER: Final = "iscl-card-trace"
#: Default for --timeout: how long one PC/SC call may go unanswered.
ANSWER_TIMEOUT: Final = 10.0
_WATCH_POLL: Final = 0.05

T = TypeVar("T")


class _UsageError(IsclError):
    """A command-line input problem."""


# ------------------------------------------------------------------ PIN


def pin_from_env(variable: str) -> PinSource:
    """A PIN source reading ``$variable`` each time it is asked."""

    def read() -> bytes:
        # The bytes as given: a PIN that is not UTF-8 must not crash here.
        value = os.environb.get(os.fsencode(variable))
        if not value:
            raise _UsageError(f"environment variable {variable} is unset or empty")
        return value

    return read


def pin_from_file(path: Path) -> PinSource:
    """A PIN source reading the first line of ``path`` each time; the file
    must be a regular file only its owner can access, as a key file."""

    def read() -> bytes:
        try:
            pin = read_private_file(path).split(b"\n", 1)[0].rstrip(b"\r")
        except KeyFileError as exc:
            raise _UsageError(f"PIN file: {exc}") from None
        if not pin:
            raise _UsageError(f"{path} holds no PIN")
        return pin

    return read


def pin_from_prompt(prompt: str = "card PIN: ") -> PinSource:
    """A PIN source asking on the terminal, without echo."""

    def read() -> bytes:
        try:
            pin = getpass.getpass(prompt)
        except EOFError:
            # No terminal (a service manager): getpass read standard input.
            raise _UsageError(
                "no PIN entered: the prompt found no terminal and standard input "
                "ended; give the PIN in an environment variable or a file"
            ) from None
        if not pin:
            raise _UsageError("no PIN entered")
        return pin.encode()

    return read


def _pin_source(args: argparse.Namespace) -> PinSource | None:
    if args.pin_env is not None:
        return pin_from_env(args.pin_env)
    if args.pin_file is not None:
        return pin_from_file(args.pin_file)
    if args.pin_prompt:
        return pin_from_prompt()
    return None


# --------------------------------------------------------------- parser


def register(
    card_commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add ``list`` and ``probe`` to the ``iscl card`` command group."""
    listing = card_commands.add_parser(
        "list", help="PC/SC readers and their cards (ATR, protocol)"
    )
    _add_timeout(listing)
    _add_trace(listing)
    listing.set_defaults(func=cmd_card_list)
    probe = card_commands.add_parser(
        "probe",
        help="SELECT, GET CHALLENGE and the key references of a reader's card",
        description="Never sends EXTERNAL AUTHENTICATE: no retry counter moves.",
    )
    add_reader_options(probe)
    pin = probe.add_mutually_exclusive_group()
    pin.add_argument("--pin-env", metavar="VAR", help="read the PIN from $VAR")
    pin.add_argument("--pin-file", type=Path, metavar="PATH", help="read the PIN")
    pin.add_argument("--pin-prompt", action="store_true", help="ask for the PIN")
    probe.add_argument(
        "--aid",
        help=f"AID (hex; a pcsc --config site's, else {ISCL_AID.hex().upper()})",
    )
    _add_timeout(probe)
    _add_trace(probe)
    probe.set_defaults(func=cmd_card_probe)


def add_reader_options(parser: argparse.ArgumentParser) -> None:
    """--reader / --reader-regex / --reader-index, --protocol, --wait."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--reader", metavar="NAME", help="exact reader name")
    which.add_argument("--reader-regex", metavar="RE", help="reader name pattern")
    which.add_argument("--reader-index", type=int, metavar="N", help="reader number")
    parser.add_argument(
        "--protocol",
        choices=["T0", "T1"],
        help="override the protocol the ATR offers first",
    )
    parser.add_argument(
        "--wait",
        type=_seconds(zero=True),
        metavar="S",
        help="wait for a card (a pcsc --config site's card_wait, else 5 s)",
    )


def _seconds(*, zero: bool) -> Callable[[str], float]:
    """An argparse type: seconds as the site file takes them."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not seconds_in_range(value, zero=zero):
            raise argparse.ArgumentTypeError(f"{seconds_wanted(zero=zero)}, not {text}")
        return value

    return parse


def reader_selector(args: argparse.Namespace) -> ReaderSelector:
    return ReaderSelector(
        name=args.reader, pattern=args.reader_regex, index=args.reader_index
    )


def protocol_override(args: argparse.Namespace) -> int | None:
    return None if args.protocol is None else int(args.protocol[1])


def _add_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=_seconds(zero=False),
        default=ANSWER_TIMEOUT,
        metavar="S",
        help="give up when the reader leaves a command unanswered for S seconds "
        f"({ANSWER_TIMEOUT:g})",
    )


def _add_trace(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trace",
        action="store_true",
        help="trace APDUs on standard error (PIN and key data redacted)",
    )


def enable_trace(out: TextIO | None = None) -> None:
    """Send the APDU trace loggers' records to ``out`` (standard error), and
    only there: they no longer reach the root logger's handler too."""
    handler = logging.StreamHandler(out or sys.stderr)
    handler.setFormatter(logging.Formatter("  trace %(message)s"))
    handler.set_name(_TRACE_HANDLER)
    for name in _TRACE_LOGGERS:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h.get_name() == _TRACE_HANDLER]:
            logger.removeHandler(old)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
        logger.propagate = False


def _fail(command: str, message: str) -> int:
    print(f"iscl card {command}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


# ---------------------------------------------------------- bounded waits


class _Watch:
    """What the PC/SC thread waits for now, and until when."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._what = "starting"
        self._limit = math.inf
        self._until = math.inf

    def expect(self, what: str, seconds: float) -> None:
        """The thread now waits for ``what``, for at most ``seconds``."""
        with self._lock:
            self._what, self._limit = what, seconds
            self._until = time.monotonic() + seconds

    def overdue(self) -> PcscTimeout | None:
        """The error to give up with, once the current wait ran out."""
        with self._lock:
            if time.monotonic() < self._until:
                return None
            return PcscTimeout(
                f"{self._what}: no answer within {format_duration(self._limit)}; "
                "is the reader, or the program serving its card, stopped?"
            )


def _watched(work: Callable[[_Watch], T]) -> T:
    """``work(watch)`` on a daemon thread, given up on (PcscTimeout) once
    its current wait runs out.  A call stuck in pcscd is left behind: the
    thread cannot be stopped, but it no longer holds the command up."""
    watch = _Watch()
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work(watch))
        except BaseException as exc:  # re-raised in the calling thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="iscl-card-pcsc", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(_WATCH_POLL)
        late = watch.overdue() if thread.is_alive() else None
        if late is not None:
            raise late
    if failure:
        raise failure[0]
    return outcome[0]


class _WatchedReader:
    """A reader whose every command is watched for an answer."""

    def __init__(self, link: ReaderLink, watch: _Watch, seconds: float) -> None:
        self._link = link
        self._watch = watch
        self._seconds = seconds

    def transmit(self, command: bytes) -> bytes:
        what = f"reader {self._link.reader!r}: {format_apdu_for_trace(command)}"
        self._watch.expect(what, self._seconds)
        return self._link.transmit(command)


# ----------------------------------------------------------------- list


def _protocols(numbers: tuple[int, ...]) -> str:
    return ", ".join(f"T={n}" for n in numbers) or "?"


def _format_reader(index: int, info: ReaderInfo) -> list[str]:
    lines = [f"{index}: {info.name}"]
    if not info.card:
        lines.append("   no card")
        return lines
    lines.append(f"   ATR {info.atr.hex(' ').upper()}")
    active = f"T={info.active}" if info.active is not None else "not connected"
    lines.append(f"   protocols offered {_protocols(info.offered)}; active {active}")
    if info.note:
        lines.append(f"   {info.note}")
    return lines


def cmd_card_list(args: argparse.Namespace) -> int:
    """Handle ``iscl card list``; the readers listed before a failure are
    shown before its error."""
    if args.trace:
        enable_trace()
    readers: list[ReaderInfo] = []

    def work(watch: _Watch) -> None:
        watch.expect("pcscd: listing readers", args.timeout)
        for info in list_readers(
            on_reader=lambda name: watch.expect(f"reader {name!r}", args.timeout)
        ):
            readers.append(info)

    try:
        _watched(work)
    except IsclError as exc:
        _print_readers(list(readers))
        return _fail("list", str(exc))
    if not readers:
        print("no PC/SC readers")
    _print_readers(readers)
    return EXIT_OK


def _print_readers(readers: list[ReaderInfo]) -> None:
    for index, info in enumerate(readers):
        print("\n".join(_format_reader(index, info)))


# ---------------------------------------------------------------- probe


def _status(resp: ResponseApdu) -> str:
    return f"SW {resp.sw:04X} ({apdu.sw_meaning(resp.sw1, resp.sw2)})"


def _probe_keys(link: ApduLink, lines: list[str]) -> None:
    for key_ref in KEY_INDEXES:
        challenge = secrets.token_bytes(CHALLENGE_LENGTH)
        command = apdu.gen_internal_authenticate_apdu(key_ref, challenge)
        resp = link.exchange(command, "INTERNAL AUTHENTICATE")
        if resp.sw == apdu.SW_OK and len(resp.data) == CHALLENGE_LENGTH:
            lines.append(f"  key {key_ref}: answers INTERNAL AUTHENTICATE")
        else:
            lines.append(f"  key {key_ref}: {_status(resp)}")


class PinNotVerified(IsclError):
    """``probe`` was given a PIN and the card did not verify it (or iscl
    would not spend the card's last try on it)."""


def _pin_state(link: ApduLink, pin: PinSource | None) -> tuple[str, bool]:
    """The PIN line of the report, and whether a PIN given was verified.
    The card is asked for its tries left first (VERIFY without data), and
    its last try is never spent: a wrong PIN file probed again and again
    must not block the card."""
    resp = link.exchange(apdu.gen_verify_status_apdu(), "VERIFY (tries left)")
    if resp.sw == apdu.SW_NO_PIN:
        if pin is None:
            return "PIN: none", True
        return "PIN: none on this card, so the PIN given was not sent", False
    if resp.sw == apdu.SW_OK:
        return "PIN: verified already", True
    tries = resp.sw2 & 0x0F if resp.sw1 == 0x63 and resp.sw2 & 0xF0 == 0xC0 else None
    if pin is None:
        if tries is not None:
            return f"PIN: set, {tries} tries left, not verified", True
        return f"PIN: {_status(resp)}", True
    if tries == 0 or resp.sw == 0x6983:
        return "PIN: blocked; not sent", False
    if tries == 1:
        return (
            "PIN: not sent: the card has one try left, which iscl does not spend "
            "(verify it with the card issuer's tool)",
            False,
        )
    resp = link.exchange(apdu.gen_verify_apdu(pin()), "VERIFY")
    if resp.sw == apdu.SW_OK:
        return "PIN: verified", True
    return f"PIN: wrong: {_status(resp)}", False


def probe(
    reader: ReaderLink,
    aid: bytes,
    pin: PinSource | None,
    lines: list[str] | None = None,
    *,
    transport: RawTransport | None = None,
) -> list[str]:
    """The probe report of the card behind ``reader``; sends no EXTERNAL
    AUTHENTICATE and no VERIFY with data unless a PIN is given.  Lines are
    appended to ``lines`` as they are found, so a caller still has them
    when a later command fails; commands go through ``transport`` if given
    (``reader`` itself otherwise)."""
    lines = [] if lines is None else lines
    info = reader.atr_info
    extended = info.extended_length if info is not None else False
    link = ApduLink(transport or reader, name=reader.reader, extended_length=extended)
    lines.append(f"reader {reader.reader}")
    lines.append(
        f"  ATR {reader.atr.hex(' ').upper()}, T={reader.protocol_number}, "
        f"extended length {'announced' if extended else 'not announced'}"
    )
    resp = link.exchange(apdu.gen_select_aid_apdu(aid), "SELECT")
    if resp.sw != apdu.SW_OK:
        lines.append(f"  SELECT {aid.hex().upper()}: {_status(resp)}")
        return lines
    lines.append(f"  SELECT {aid.hex().upper()}: ok")
    pin_line, pin_ok = _pin_state(link, pin)
    lines.append(f"  {pin_line}")
    if not pin_ok:
        raise PinNotVerified(pin_line)
    resp = link.exchange(apdu.gen_get_challenge_apdu(CHALLENGE_LENGTH))
    if resp.sw == apdu.SW_OK:
        lines.append(f"  GET CHALLENGE: {len(resp.data)} bytes")
    else:
        lines.append(f"  GET CHALLENGE: {_status(resp)}")
    _probe_keys(link, lines)
    return lines


@dataclass(frozen=True)
class _ProbeOptions:
    selector: ReaderSelector
    protocol: int | None
    wait: float
    aid: bytes
    pin: PinSource | None


def _probe_options(args: argparse.Namespace) -> _ProbeOptions:
    """The reader, protocol, card wait, AID and PIN source to probe with:
    each from the command line when given there, else from a pcsc
    ``--config`` site file's card, else the defaults."""
    from iscl_hw import cli_config
    from iscl_hw.siteconfig import PcscBackend

    site = cli_config.load_for_args(args)
    card: PcscBackend | None = None
    if site is not None:
        if not isinstance(site.backend, PcscBackend):
            raise ConfigError(
                f"{args.config}: its card is {site.backend.kind}, not pcsc: "
                "nothing to probe in a reader"
            )
        card = site.backend
    selector = reader_selector(args)
    protocol = protocol_override(args)
    if card is not None and selector == ReaderSelector():
        selector = card.selector()
        protocol = card.protocol if protocol is None else protocol
    wait = args.wait if args.wait is not None else (card.card_wait if card else 5.0)
    if args.aid is not None:
        try:
            aid = bytes.fromhex(args.aid)
        except ValueError as exc:
            raise ConfigError(f"bad AID: {exc}") from None
        if not 5 <= len(aid) <= 16:
            raise ConfigError(f"bad AID: an AID is 5..16 bytes, got {len(aid)}")
    else:
        aid = card.aid if card is not None else ISCL_AID
    pin = _pin_source(args)
    if pin is None and card is not None:
        pin = card.pin.source()
    return _ProbeOptions(selector, protocol, wait, aid, pin)


def _read_pin_first(source: PinSource | None) -> PinSource | None:
    """Ask for the PIN here, before the PC/SC thread starts: a prompt must
    not run against the thread's answer timeout."""
    if source is None:
        return None
    pin = source()
    return lambda: pin


def cmd_card_probe(args: argparse.Namespace) -> int:
    """Handle ``iscl card probe``; what was found before a failure (a card
    pulled out, a reader that stopped answering) is printed before its
    error."""
    if args.trace:
        enable_trace()
    report: list[str] = []
    try:
        options = _probe_options(args)
        selector = options.selector
        pin = _read_pin_first(options.pin)

        def work(watch: _Watch) -> None:
            watch.expect(
                f"waiting for a card in {selector}", options.wait + args.timeout
            )
            with PcscContext() as context:
                reader = open_reader(
                    context,
                    selector,
                    protocol=options.protocol,
                    card_timeout=options.wait,
                )
                try:
                    transport = _WatchedReader(reader, watch, args.timeout)
                    probe(reader, options.aid, pin, report, transport=transport)
                finally:
                    closing = f"reader {reader.reader!r}: disconnecting"
                    watch.expect(closing, args.timeout)
                    reader.close()

        _watched(work)
    except IsclError as exc:
        if report:
            print("\n".join(report))
        return _fail("probe", str(exc))
    print("\n".join(report))
    return EXIT_OK
