"""The ``iscl`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from iscl_hw import (
    __version__,
    cli_card,
    cli_config,
    cli_gateway,
    cli_hsm,
    cli_transfer,
)
from iscl_hw.errors import IsclError
from iscl_hw.filexfer import DEFAULT_CHUNK_SIZE
from iscl_hw.oplog import configure_logging

__all__ = ["main"]

_Handler = Callable[[argparse.Namespace], int]


def _cmd_demo(args: argparse.Namespace) -> int:
    from iscl_hw.demo import run_demo

    return run_demo(
        args.file, trace=args.trace, chunk_size=args.chunk_size, backend=args.backend
    )


def _positive(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 1048576 - 8:
        raise argparse.ArgumentTypeError("must be 1..1048568")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iscl",
        description="ISCL (MEDIS-DC Integrated Secure Communication Layer V1.00)",
    )
    parser.add_argument("--version", action="version", version=f"iscl {__version__}")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="logging level (default WARNING); DEBUG traces APDUs and frames, "
        "never keys, PINs or message data",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="two peers with virtual cards move a DICOM file over ISCL"
    )
    demo.add_argument(
        "--file",
        type=Path,
        help="file to send (default: a DICOM file shipped with pydicom)",
    )
    demo.add_argument(
        "--trace", action="store_true", help="also trace every data frame"
    )
    demo.add_argument(
        "--chunk-size",
        type=_positive,
        default=DEFAULT_CHUNK_SIZE,
        help="file bytes per ISCL message (default 65536)",
    )
    demo.add_argument(
        "--backend",
        choices=["softcard", "pcsc", "pkcs11"],
        default="softcard",
        help="cards in process (default), in two vpcd readers of pcscd, or "
        "keys in two SoftHSM2 tokens",
    )
    demo.set_defaults(func=_cmd_demo)

    cli_card.register(commands)
    cli_hsm.register(commands)
    cli_config.register(commands)
    cli_transfer.register(commands)
    cli_gateway.register(commands)
    for leaf in _leaf_parsers(parser):
        cli_config.add_config_option(leaf)
    return parser


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers of every command (the ones that run something)."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found += _leaf_parsers(sub) or [sub]
    return found


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so a pcscd the demo started is stopped
    # and temporary card and key files are removed.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(levelname)s %(name)s: %(message)s"
    )
    handler: _Handler = args.func
    try:
        site = cli_config.load_for_args(args)
        if site is not None:
            configure_logging(site.logging)
        return handler(args)
    except BrokenPipeError:
        # The reader of our output left (``iscl ... | head``): stop quietly,
        # as other command-line tools do, without a second error at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    except (IsclError, OSError) as exc:
        print(f"iscl: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
