"""``iscl card list`` and ``iscl card probe``: IC cards in PC/SC readers.

``list`` shows every reader, whether it has a card, the ATR, the protocols
the ATR offers and the one a shared connection gets.  ``probe`` opens one
reader's card and reports SELECT of the ISCL application, the PIN state
(VERIFY without data, which ISO/IEC 7816-4 defines as a query), GET
CHALLENGE and which key references answer INTERNAL AUTHENTICATE.  Probing
never sends EXTERNAL AUTHENTICATE and never VERIFYs a PIN it was not given,
so no retry counter moves.  A PIN comes from an environment variable, a
file or a prompt, never from the command line, and is never logged.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Final, TextIO

from iscl_hw import apdu
from iscl_hw.apdu import ResponseApdu
from iscl_hw.card import ISCL_AID
from iscl_hw.constants import CHALLENGE_LENGTH, KEY_INDEXES
from iscl_hw.errors import IsclError
from iscl_hw.pcsc import (
    PcscContext,
    PinSource,
    ReaderInfo,
    ReaderLink,
    ReaderSelector,
    list_readers,
    open_reader,
)
from iscl_hw.transport import ApduLink

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


class _UsageError(IsclError):
    """A command-line input problem."""


# ------------------------------------------------------------------ PIN


def pin_from_env(variable: str) -> PinSource:
    """A PIN source reading ``$variable`` each time it is asked."""

    def read() -> bytes:
        value = os.environ.get(variable)
        if not value:
            raise _UsageError(f"environment variable {variable} is unset or empty")
        return value.encode()

    return read


def pin_from_file(path: Path) -> PinSource:
    """A PIN source reading the first line of ``path`` each time."""

    def read() -> bytes:
        try:
            pin = path.read_bytes().split(b"\n", 1)[0].rstrip(b"\r")
        except OSError as exc:
            message = exc.strerror or type(exc).__name__
            raise _UsageError(f"cannot read {path}: {message}") from None
        if not pin:
            raise _UsageError(f"{path} holds no PIN")
        return pin

    return read


def pin_from_prompt(prompt: str = "card PIN: ") -> PinSource:
    """A PIN source asking on the terminal, without echo."""

    def read() -> bytes:
        pin = getpass.getpass(prompt)
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
    probe.add_argument("--aid", default=ISCL_AID.hex().upper(), help="AID (hex)")
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
        "--wait", type=float, default=5.0, metavar="S", help="wait for a card (5 s)"
    )


def reader_selector(args: argparse.Namespace) -> ReaderSelector:
    return ReaderSelector(
        name=args.reader, pattern=args.reader_regex, index=args.reader_index
    )


def protocol_override(args: argparse.Namespace) -> int | None:
    return None if args.protocol is None else int(args.protocol[1])


def _add_trace(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trace",
        action="store_true",
        help="trace APDUs on standard error (PIN and key data redacted)",
    )


def enable_trace(out: TextIO | None = None) -> None:
    """Send the APDU trace loggers' DEBUG records to ``out`` (standard error)."""
    handler = logging.StreamHandler(out or sys.stderr)
    handler.setFormatter(logging.Formatter("  trace %(message)s"))
    handler.set_name(_TRACE_HANDLER)
    for name in _TRACE_LOGGERS:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h.get_name() == _TRACE_HANDLER]:
            logger.removeHandler(old)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)


def _fail(command: str, message: str) -> int:
    print(f"iscl card {command}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


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
    """Handle ``iscl card list``."""
    if args.trace:
        enable_trace()
    try:
        readers = list(list_readers())
    except IsclError as exc:
        return _fail("list", str(exc))
    if not readers:
        print("no PC/SC readers")
    for index, info in enumerate(readers):
        print("\n".join(_format_reader(index, info)))
    return EXIT_OK


# ---------------------------------------------------------------- probe


def _status(resp: ResponseApdu) -> str:
    return f"SW {resp.sw:04X} ({apdu.sw_meaning(resp.sw1, resp.sw2)})"


def _probe_keys(link: ApduLink) -> list[str]:
    lines = []
    for key_ref in KEY_INDEXES:
        challenge = secrets.token_bytes(CHALLENGE_LENGTH)
        command = apdu.gen_internal_authenticate_apdu(key_ref, challenge)
        resp = link.exchange(command, "INTERNAL AUTHENTICATE")
        if resp.sw == apdu.SW_OK and len(resp.data) == CHALLENGE_LENGTH:
            lines.append(f"  key {key_ref}: answers INTERNAL AUTHENTICATE")
        else:
            lines.append(f"  key {key_ref}: {_status(resp)}")
    return lines


def _pin_state(link: ApduLink, pin: PinSource | None) -> str:
    if pin is not None:
        resp = link.exchange(apdu.gen_verify_apdu(pin()), "VERIFY")
        return "PIN: verified" if resp.sw == apdu.SW_OK else f"PIN: {_status(resp)}"
    query = apdu.CommandApdu(apdu.CLA_ISO, apdu.INS_VERIFY, 0x00, 0x80)
    resp = link.exchange(query, "VERIFY (query)")
    if resp.sw == 0x6A88:
        return "PIN: none"
    if resp.sw1 == 0x63 and resp.sw2 & 0xF0 == 0xC0:
        return f"PIN: set, {resp.sw2 & 0x0F} tries left, not verified"
    return f"PIN: {_status(resp)}"


def probe(reader: ReaderLink, aid: bytes, pin: PinSource | None) -> list[str]:
    """The probe report of the card behind ``reader``; sends no EXTERNAL
    AUTHENTICATE and no VERIFY with data unless a PIN is given."""
    info = reader.atr_info
    extended = info.extended_length if info is not None else False
    link = ApduLink(reader, name=reader.reader, extended_length=extended)
    lines = [
        f"reader {reader.reader}",
        f"  ATR {reader.atr.hex(' ').upper()}, T={reader.protocol_number}, "
        f"extended length {'announced' if extended else 'not announced'}",
    ]
    resp = link.exchange(apdu.gen_select_aid_apdu(aid), "SELECT")
    if resp.sw != apdu.SW_OK:
        return [*lines, f"  SELECT {aid.hex().upper()}: {_status(resp)}"]
    lines.append(f"  SELECT {aid.hex().upper()}: ok")
    lines.append(f"  {_pin_state(link, pin)}")
    resp = link.exchange(apdu.gen_get_challenge_apdu(CHALLENGE_LENGTH))
    if resp.sw == apdu.SW_OK:
        lines.append(f"  GET CHALLENGE: {len(resp.data)} bytes")
    else:
        lines.append(f"  GET CHALLENGE: {_status(resp)}")
    return lines + _probe_keys(link)


def cmd_card_probe(args: argparse.Namespace) -> int:
    """Handle ``iscl card probe``."""
    if args.trace:
        enable_trace()
    try:
        aid = bytes.fromhex(args.aid)
        with PcscContext() as context:
            reader = open_reader(
                context,
                reader_selector(args),
                protocol=protocol_override(args),
                card_timeout=args.wait,
            )
            try:
                report = probe(reader, aid, _pin_source(args))
            finally:
                reader.close()
    except ValueError as exc:
        return _fail("probe", f"bad AID: {exc}")
    except IsclError as exc:
        return _fail("probe", str(exc))
    print("\n".join(report))
    return EXIT_OK
