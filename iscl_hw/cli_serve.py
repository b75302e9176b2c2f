"""``iscl card serve``: put a software card into a vpcd virtual reader.

``iscl card serve CARDFILE --vpcd 127.0.0.1:35963`` loads the card file
(applying its profile, see :mod:`softcard.profiles`), connects to the vpcd
reader slot and answers pcscd until SIGTERM or SIGINT.  When vpcd drops the
connection (pcscd restarted) the card connects again, unless
``--no-reconnect`` is given.  vpcd takes one card per slot: a slot that
already has one (another ``iscl card serve``) is an error within a few
seconds (``softcard.vpcd.ACCEPT_WAIT``), not an endless wait.  The card file path is the
only input; keys stay in the file and the card checks PINs itself, so none
is asked for.

Exit codes: 0 after a signal or (with ``--no-reconnect``) after vpcd closed
the connection, 2 with a message on standard error on failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from iscl_hw.errors import IsclError
from softcard.profiles import open_card
from softcard.vpcd import (
    ACCEPT_WAIT,
    DEFAULT_HOST,
    DEFAULT_PORT,
    VpcdCardBridge,
    VpcdSlotTaken,
)

__all__ = [
    "add_serve_command",
    "cmd_card_serve",
    "main",
    "parse_host_port",
]

_log = logging.getLogger(__name__)

EXIT_OK: Final = 0
EXIT_ERROR: Final = 2
_DEFAULT_VPCD: Final = f"{DEFAULT_HOST}:{DEFAULT_PORT}"


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) to a (host, port) pair."""
    host, sep, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1..65535, got {port}")
    return host, port


def add_serve_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add ``serve`` to the ``card`` command group built by ``cli_card``."""
    serve = commands.add_parser(
        "serve",
        help="serve a card file as the card in a vpcd virtual reader",
        description="Connect to a vsmartcard vpcd reader slot (inside pcscd) "
        "and answer it with the card file's card until SIGTERM or SIGINT.",
    )
    _add_arguments(serve)
    serve.set_defaults(func=cmd_card_serve)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("card_file", metavar="CARDFILE", type=Path)
    parser.add_argument(
        "--vpcd",
        type=parse_host_port,
        default=parse_host_port(_DEFAULT_VPCD),
        metavar="HOST:PORT",
        help=f"vpcd reader slot to connect to (default {_DEFAULT_VPCD}; "
        "the second slot is port 35964)",
    )
    parser.add_argument(
        "--no-reconnect",
        action="store_true",
        help="end when vpcd closes the connection instead of connecting again",
    )


def _fail(message: str) -> int:
    print(f"iscl card serve: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def cmd_card_serve(args: argparse.Namespace) -> int:
    """Handle ``iscl card serve``."""
    try:
        card = open_card(args.card_file)
    except IsclError as exc:
        return _fail(str(exc))
    host, port = args.vpcd
    bridge = VpcdCardBridge(
        card, host, port, reconnect=not args.no_reconnect, accept_timeout=ACCEPT_WAIT
    )
    print(
        f"serving {args.card_file} (profile {card.profile}, "
        f"ATR {card.ATR.hex(' ').upper()}) to vpcd at {host}:{port}",
        file=sys.stderr,
    )
    try:
        bridge.run_forever()
    except VpcdSlotTaken as exc:
        return _fail(exc.strerror or str(exc))
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return _fail(f"cannot connect to vpcd at {host}:{port}: {reason}")
    _log.info("card serve ended")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry: ``python -m iscl_hw.cli_serve CARDFILE ...``."""
    parser = argparse.ArgumentParser(prog="iscl card serve")
    _add_arguments(parser)
    parser.add_argument("--log-level", default="WARNING", type=str.upper)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(levelname)s %(name)s: %(message)s"
    )
    return cmd_card_serve(args)


if __name__ == "__main__":
    sys.exit(main())
