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
import shlex
import sys
from pathlib import Path
from typing import Final

from iscl_hw import cli_pcsc, softhsm
from iscl_hw.errors import IsclError
from iscl_hw.pcsc import PinSource

__all__ = ["cmd_hsm_init", "register"]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 2


class _UsageError(IsclError):
    """A command-line input problem."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``hsm`` command group; each leaf sets ``func`` to its handler."""
    hsm = subparsers.add_parser("hsm", help="SoftHSM2 tokens for the PKCS#11 backend")
    commands = hsm.add_subparsers(dest="hsm_command", required=True)
    _add_init(commands)
    # ------------------------------------------------------------------
    # Room for the PKCS#11 backend's subcommands (iscl_hw/pkcs11.py):
    #   import-key  put ISCL keys onto a token
    #   list        the tokens and their ISCL keys
    # ------------------------------------------------------------------


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
        return first
    return source()


def cmd_hsm_init(args: argparse.Namespace) -> int:
    """Handle ``iscl hsm init``."""
    try:
        module = args.module if args.module is not None else softhsm.find_module()
        if not module.is_file():
            raise _UsageError(f"PKCS#11 module {module}: no such file")
        so_pin = _new_pin(args.so_pin_env, args.so_pin_file, "SO PIN")
        user_pin = _new_pin(args.pin_env, args.pin_file, "user PIN")
        conf = softhsm.write_config(args.dir)
        softhsm.use_config(conf)
        softhsm.init_token(module, args.label, so_pin, user_pin)
    except (IsclError, OSError) as exc:
        return _fail("init", str(exc))
    print(f"initialised token {args.label!r} in {conf.parent / softhsm.TOKENS_DIR}")
    print(f"token label: {args.label}")
    print(f"module: {module}")
    print("to use it, export:")
    print(f"  export {softhsm.CONF_ENV}={shlex.quote(str(conf))}")
    return EXIT_OK
