"""``iscl hsm``: SoftHSM2 tokens for the PKCS#11 backend.

``iscl hsm init --label L --dir D`` writes ``D/softhsm2.conf`` (tokens in
``D/tokens``), initialises a free SoftHSM slot as token ``L`` and prints
the ``SOFTHSM2_CONF`` the user must export.  The SO PIN and the user PIN
each come from an environment variable, a file or a prompt (asked twice),
never from the command line, and are never printed or logged.

Each handler returns an exit code: 0 on success, 2 with a message on
standard error on failure.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Final

from iscl_hw import cli_pcsc, softhsm
from iscl_hw.errors import IsclError, KeyFileError
from iscl_hw.keyfile import read_private_file
from iscl_hw.pcsc import PinSource

__all__ = ["cmd_hsm_import_key", "cmd_hsm_init", "cmd_hsm_list", "register"]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 2


class _UsageError(IsclError):
    """A command-line input problem."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``hsm`` command group; each leaf sets ``func`` to its handler."""
    hsm = subparsers.add_parser("hsm", help="SoftHSM2 tokens for the PKCS#11 backend")
    commands = hsm.add_subparsers(dest="hsm_command", required=True)
    _add_init(commands)
    _add_import_key(commands)
    _add_list(commands)


def _add_token_options(parser: argparse.ArgumentParser) -> None:
    """Which token (never by slot number) and where its user PIN comes from;
    without them, the pkcs11 card of the --config site file."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--label", help="the token's label")
    which.add_argument("--serial", help="the token's serial number")
    parser.add_argument(
        "--module",
        type=Path,
        metavar="PATH",
        help=f"PKCS#11 module (default: ${softhsm.MODULE_ENV} or SoftHSM2)",
    )
    pin = parser.add_mutually_exclusive_group()
    pin.add_argument("--pin-env", metavar="VAR", help="read the user PIN from $VAR")
    pin.add_argument("--pin-file", type=Path, metavar="PATH", help="read the user PIN")


def _add_import_key(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    parser = commands.add_parser(
        "import-key",
        help="store an ISCL key in a token (sensitive, not extractable)",
        description="Stores authentication or encryption key N as the object "
        "iscl-KIND-N (and, for an encryption key, its DESMAC variant "
        "iscl-enc-N-mac).  The key is 16 hex digits read from --key-file, or "
        "from standard input with '--key-file -'; never from the command line.",
    )
    _add_token_options(parser)
    parser.add_argument("--kind", required=True, choices=["auth", "enc"])
    parser.add_argument("--index", required=True, type=int, choices=range(1, 9))
    parser.add_argument(
        "--key-file", required=True, metavar="PATH", help="file with the key, or -"
    )
    parser.set_defaults(func=cmd_hsm_import_key)


def _add_list(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "list",
        help="the ISCL key objects of a token (check values, never keys)",
    )
    _add_token_options(parser)
    parser.set_defaults(func=cmd_hsm_list)


def _add_init(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    init = commands.add_parser(
        "init",
        help="create a SoftHSM2 token in a directory of your choosing",
        description="Writes DIR/softhsm2.conf and initialises token LABEL in "
        "DIR/tokens.  Each PIN comes from --*-env, --*-file or a prompt.",
    )
    init.add_argument("--label", required=True, help="token label (1..32 bytes)")
    init.add_argument(
        "--dir",
        required=True,
        type=Path,
        metavar="DIR",
        help="directory for softhsm2.conf and tokens/ (created if missing)",
    )
    init.add_argument(
        "--module",
        type=Path,
        metavar="PATH",
        help=f"libsofthsm2.so (default: ${softhsm.MODULE_ENV} or a known path)",
    )
    so_pin = init.add_mutually_exclusive_group()
    so_pin.add_argument("--so-pin-env", metavar="VAR", help="read the SO PIN from $VAR")
    so_pin.add_argument(
        "--so-pin-file", type=Path, metavar="PATH", help="read the SO PIN"
    )
    pin = init.add_mutually_exclusive_group()
    pin.add_argument("--pin-env", metavar="VAR", help="read the user PIN from $VAR")
    pin.add_argument("--pin-file", type=Path, metavar="PATH", help="read the user PIN")
    init.set_defaults(func=cmd_hsm_init)


def _fail(command: str, message: str) -> int:
    print(f"iscl hsm {command}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _new_pin(env: str | None, file: Path | None, name: str) -> bytes:
    source: PinSource
    if env is not None:
        source = cli_pcsc.pin_from_env(env)
    elif file is not None:
        source = cli_pcsc.pin_from_file(file)
    else:
        first = cli_pcsc.pin_from_prompt(f"new {name}: ")()
        if cli_pcsc.pin_from_prompt(f"new {name} again: ")() != first:
            raise _UsageError(f"the two {name}s differ")
        return _utf8_pin(first, name)
    return _utf8_pin(source(), name)


def _utf8_pin(pin: bytes, name: str) -> bytes:
    """PKCS#11 PINs are UTF-8 text; refuse others before a token is made
    that iscl could not log in to."""
    try:
        pin.decode("utf-8")
    except UnicodeDecodeError:
        raise _UsageError(f"the {name} must be UTF-8 text") from None
    return pin


def cmd_hsm_init(args: argparse.Namespace) -> int:
    """Handle ``iscl hsm init``."""
    try:
        module = args.module if args.module is not None else softhsm.find_module()
        if not module.is_file():
            raise _UsageError(f"PKCS#11 module {module}: no such file")
        so_pin = _new_pin(args.so_pin_env, args.so_pin_file, "SO PIN")
        user_pin = _new_pin(args.pin_env, args.pin_file, "user PIN")
        directory = Path(args.dir).absolute()
        made = _not_there_yet(directory)
        try:
            conf = softhsm.write_config(directory)
            softhsm.use_config(conf)
            softhsm.init_token(module, args.label, so_pin, user_pin)
        except BaseException:
            _remove_made(made)
            raise
    except (IsclError, OSError) as exc:
        return _fail("init", str(exc))
    print(f"initialised token {args.label!r} in {conf.parent / softhsm.TOKENS_DIR}")
    print(f"token label: {args.label}")
    print(f"module: {module}")
    print("to use it, export:")
    print(f"  export {softhsm.CONF_ENV}={shlex.quote(str(conf))}")
    return EXIT_OK


def _not_there_yet(directory: Path) -> list[Path]:
    """What ``hsm init`` in ``directory`` may make, that is not there now
    (a dangling link counts as there): the configuration, the token
    directory, then ``directory`` and its missing parents, deepest first."""
    paths = [directory / softhsm.CONF_NAME, directory / softhsm.TOKENS_DIR]
    paths += [directory, *directory.parents]
    return [path for path in paths if not os.path.lexists(path)]


def _remove_made(paths: list[Path]) -> None:
    """Remove the configuration file and the (empty) directories an
    ``hsm init`` that failed made, in that order; a directory that holds
    anything (a token) stays, and so does what is above it."""
    for path in paths:
        try:
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)
        except OSError:
            return


def _open_token(args: argparse.Namespace) -> Any:
    """The token the options name, logged in (python-pkcs11 loaded lazily,
    so the rest of the CLI works without it)."""
    try:
        from iscl_hw import hsm
    except ImportError as exc:
        raise _UsageError(
            "the PKCS#11 backend needs python-pkcs11: pip install 'iscl[pkcs11]'"
        ) from exc
    label, serial, module, source = _token_options(args)
    if module is None:
        module = softhsm.find_module()
    if not Path(module).is_file():
        raise _UsageError(f"PKCS#11 module {module}: no such file")
    if args.pin_env is not None:
        source = cli_pcsc.pin_from_env(args.pin_env)
    elif args.pin_file is not None:
        source = cli_pcsc.pin_from_file(args.pin_file)
    elif source is None:
        source = cli_pcsc.pin_from_prompt("token user PIN: ")
    config = hsm.TokenConfig(
        str(module), label=label, serial=serial, pin=source(), sessions=1
    )
    return hsm.Token(config)


def _token_options(
    args: argparse.Namespace,
) -> tuple[str | None, str | None, Path | None, PinSource | None]:
    """Label, serial, module and PIN source: from the command line, else
    from the site file's pkcs11 card; refuse when neither names a token."""
    from iscl_hw import cli_config
    from iscl_hw.siteconfig import Pkcs11Backend

    if args.label is not None or args.serial is not None:
        return args.label, args.serial, args.module, None
    site = cli_config.load_for_args(args)
    backend = site.backend if site is not None else None
    if not isinstance(backend, Pkcs11Backend):
        raise _UsageError("name the token: --label, --serial, or a pkcs11 --config")
    module = args.module if args.module is not None else backend.module
    return backend.label, backend.serial, module, backend.pin.source()


def _read_key(path: str) -> bytes:
    """A key from standard input, or from a file only its owner can access."""
    try:
        text = sys.stdin.read() if path == "-" else read_private_file(path).decode()
    except KeyFileError as exc:
        raise _UsageError(f"key file: {exc}") from None
    except UnicodeDecodeError:
        raise _UsageError("the key must be 16 hex digits (8 bytes)") from None
    digits = "".join(text.split())
    if len(digits) != 16:
        raise _UsageError("the key must be 16 hex digits (8 bytes)")
    try:
        return bytes.fromhex(digits)
    except ValueError:
        raise _UsageError("the key must be 16 hex digits (8 bytes)") from None


def cmd_hsm_import_key(args: argparse.Namespace) -> int:
    """Handle ``iscl hsm import-key``."""
    from iscl_hw.hsm import KeyKind

    try:
        key = _read_key(args.key_file)
        with _open_token(args) as token:
            labels = token.import_key(KeyKind(args.kind), args.index, key)
            kcv = {k.label: k.check_value for k in token.list_keys()}
    except (IsclError, OSError) as exc:
        return _fail("import-key", str(exc))
    for label in labels:
        print(f"stored {label} (check value {kcv.get(label, '?')})")
    return EXIT_OK


def cmd_hsm_list(args: argparse.Namespace) -> int:
    """Handle ``iscl hsm list``."""
    try:
        with _open_token(args) as token:
            keys = token.list_keys()
            mechanisms = sorted(token.mechanisms())
            way, name = token.way, token.name
    except (IsclError, OSError) as exc:
        return _fail("list", str(exc))
    print(f"token {name}: single DES runs as {way.name}")
    print(f"  mechanisms used: {', '.join(way.mechanisms)}")
    des = [m for m in mechanisms if "DES" in m]
    print(f"  DES mechanisms offered and allowed: {', '.join(des) or 'none'}")
    if not keys:
        print("  no ISCL key objects")
    for info in keys:
        print(f"  {info.label:<16} {info.key_type:<5} check value {info.check_value}")
    return EXIT_OK
