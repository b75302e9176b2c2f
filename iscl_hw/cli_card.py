"""``iscl card``: create and inspect software-card files.

``iscl card init CARDFILE --key-file KEYFILE`` reads key material (see
:func:`iscl_hw.keyfile.parse_key_material`) from a file or standard input,
never from the command line, and writes the authentication keys to the
card file and the encryption keys to the key file.  A PIN comes from an
environment variable or a file, never from the command line.

Each handler returns an exit code: 0 on success, 2 with a message on
standard error on failure.  Output never contains key values.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Final

from iscl_hw import cli_pcsc
from iscl_hw.cli_serve import add_serve_command
from iscl_hw.errors import IsclError, KeyFileError
from iscl_hw.keyfile import parse_key_material, read_private_file, write_key_file
from softcard.cardfile import (
    CARD_PROFILES,
    DEFAULT_PROFILE,
    create_card_file,
    load_card_file,
)

__all__ = ["cmd_card_info", "cmd_card_init", "register"]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 2


class _UsageError(Exception):
    """A command-line input problem reported as ``iscl card: error: ...``."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``card`` command; each leaf sets ``func`` to its handler."""
    card = subparsers.add_parser("card", help="create and inspect software cards")
    commands = card.add_subparsers(dest="card_command", required=True)
    _add_init(commands)
    info = commands.add_parser("info", help="show a card file without its keys")
    info.add_argument("card_file", metavar="CARDFILE", type=Path)
    info.set_defaults(func=cmd_card_info)
    add_serve_command(commands)
    cli_pcsc.register(commands)


def _add_init(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    init = commands.add_parser(
        "init",
        help="write a card file and a key file from key material",
        description="Key material lines: 'auth.N = <16 hex digits>' and "
        "'enc.N = <16 hex digits>', N in 1..8; '#' starts a comment.",
    )
    init.add_argument("card_file", metavar="CARDFILE", type=Path)
    init.add_argument("--key-file", required=True, type=Path, metavar="KEYFILE")
    init.add_argument(
        "--keys-from",
        default="-",
        metavar="PATH",
        help="file with the key material, '-' for standard input (default)",
    )
    pin = init.add_mutually_exclusive_group()
    pin.add_argument("--pin-env", metavar="VAR", help="read the PIN from $VAR")
    pin.add_argument("--pin-file", type=Path, metavar="PATH", help="read the PIN")
    init.add_argument("--max-retries", type=int, default=3, metavar="N")
    init.add_argument(
        "--profile",
        choices=sorted(CARD_PROFILES),
        default=DEFAULT_PROFILE,
        help="how the card behaves behind a PC/SC reader (default plain)",
    )
    init.add_argument("--force", action="store_true", help="replace existing files")
    init.set_defaults(func=cmd_card_init)


def _fail(command: str, message: str) -> int:
    print(f"iscl card {command}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def cmd_card_init(args: argparse.Namespace) -> int:
    """Handle ``iscl card init``."""
    try:
        return _card_init(args)
    except (IsclError, _UsageError) as exc:
        return _fail("init", str(exc))


def _card_init(args: argparse.Namespace) -> int:
    card_file: Path = args.card_file
    key_file: Path = args.key_file
    if not args.force:
        for path in (card_file, key_file):
            if path.exists():
                raise _UsageError(f"{path} exists; use --force to replace it")
    auth_keys, enc_keys = parse_key_material(_read_key_text(args.keys_from))
    if not auth_keys or not enc_keys:
        raise _UsageError("key material needs at least one auth.N and one enc.N")
    pin = _read_pin(args)
    create_card_file(
        card_file,
        auth_keys,
        pin=pin,
        max_retries=args.max_retries,
        overwrite=args.force,
        profile=args.profile,
    )
    try:
        write_key_file(key_file, enc_keys, overwrite=args.force)
    except BaseException:
        # Half a pair of files is worse than none: the next attempt would be
        # refused for a card file nobody meant to keep.
        card_file.unlink(missing_ok=True)
        raise
    print(
        f"wrote card file {card_file}: authentication keys "
        f"{_indexes(auth_keys)}, {args.max_retries} tries per key, "
        f"PIN {'set' if pin is not None else 'not set'}"
    )
    print(f"wrote key file {key_file}: encryption keys {_indexes(enc_keys)}")
    for index in sorted(set(auth_keys) ^ set(enc_keys)):
        print(f"note: key pair {index} is incomplete", file=sys.stderr)
    return EXIT_OK


def _indexes(keys: dict[int, bytes]) -> str:
    return ", ".join(str(index) for index in sorted(keys))


def _read_key_text(source: str) -> str:
    """Key material from standard input, or from a file only its owner can
    access (as the key files made from it)."""
    try:
        if source == "-":
            return _read_stdin()
        return read_private_file(source).decode("utf-8")
    except OSError as exc:
        message = exc.strerror or type(exc).__name__
        raise _UsageError(
            f"cannot read key material from {source}: {message}"
        ) from None
    except KeyFileError as exc:
        raise _UsageError(f"key material: {exc}") from None
    except UnicodeDecodeError:
        raise _UsageError(f"key material in {source} is not UTF-8 text") from None


def _read_stdin() -> str:
    """Key lines from standard input; from a terminal, without echo."""
    if not sys.stdin.isatty():
        return sys.stdin.read()
    import termios

    print(
        "key lines (auth.N = HEX, enc.N = HEX), then Ctrl-D; not echoed:",
        file=sys.stderr,
    )
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    quiet = termios.tcgetattr(fd)
    quiet[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSAFLUSH, quiet)
    try:
        return sys.stdin.read()
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


def _read_pin(args: argparse.Namespace) -> bytes | None:
    if args.pin_env is not None:
        return cli_pcsc.pin_from_env(args.pin_env)()
    if args.pin_file is not None:
        return cli_pcsc.pin_from_file(Path(args.pin_file))()
    return None


def cmd_card_info(args: argparse.Namespace) -> int:
    """Handle ``iscl card info``."""
    try:
        state = load_card_file(args.card_file)
    except IsclError as exc:
        return _fail("info", str(exc))
    print(f"card file {args.card_file}")
    print(f"  AID {state.aid.hex().upper()}, format version {state.version}")
    print(f"  profile {state.profile}")
    for index, slot in state.keys.items():
        status = "BLOCKED" if slot.blocked else "usable"
        print(
            f"  key {index}: {slot.remaining}/{slot.max_retries} tries left, {status}"
        )
    if state.pin is None:
        print("  PIN: not set")
    else:
        pin = state.pin
        status = "BLOCKED" if pin.blocked else "usable"
        print(f"  PIN: set, {pin.remaining}/{pin.max_retries} tries left, {status}")
    return EXIT_OK
