"""``iscl config check FILE`` and the ``--config FILE`` option.

``check`` validates a site file (``docs/siteconfig.md``), checks that the
files it names exist (card and key files also that only their owner can
read them), and prints a summary: role, addresses, backend, methods,
policy, limits, timeouts and logging.  The summary holds no secret: a site
file has none, and the files it names are not read, except by ``--open``,
which opens the backend (reading the PIN from its source) and reports the
card and the key indexes it found, never a key.

Exit codes: 0 when the file is valid, 2 with every problem on standard
error otherwise.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path
from typing import Final

from iscl_hw.constants import UNIQUE_SESSION_KEYS, EncryptionMethod, MacMethod
from iscl_hw.errors import IsclError
from iscl_hw.keyfile import private_file_problem
from iscl_hw.settings import Settings
from iscl_hw.siteconfig import (
    Problem,
    SiteConfig,
    SiteConfigError,
    SiteRole,
    load_site_config,
    open_backend,
)

__all__ = [
    "add_config_option",
    "check_files",
    "cmd_config_check",
    "load_for_args",
    "register",
    "summary",
]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 2
_CACHE: Final = "_iscl_site_config"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``config`` command group; each leaf sets ``func``."""
    config = subparsers.add_parser("config", help="check site files")
    commands = config.add_subparsers(dest="config_command", required=True)
    check = commands.add_parser(
        "check",
        help="validate a site file and print what it configures (no secrets)",
        description="Validates the site file, checks the files it names and "
        "prints a summary.  Exit 0 if valid, 2 otherwise.",
    )
    check.add_argument("file", metavar="FILE", type=Path)
    check.add_argument(
        "--open",
        action="store_true",
        help="also open the card or token and the key file (reads the PIN)",
    )
    check.set_defaults(func=cmd_config_check)


def add_config_option(
    parser: argparse.ArgumentParser, *, required: bool = False
) -> None:
    """Add ``--config FILE`` to ``parser`` (once; a second call does nothing)."""
    if "--config" in parser._option_string_actions:
        return
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        required=required,
        help="site file (TOML; see docs/siteconfig.md)",
    )


def load_for_args(args: argparse.Namespace) -> SiteConfig | None:
    """The site file of ``--config``, loaded once per ``args``; None without
    the option.  Raises :class:`SiteConfigError` naming every problem."""
    path: Path | None = getattr(args, "config", None)
    if path is None:
        return None
    cached = getattr(args, _CACHE, None)
    if isinstance(cached, SiteConfig):
        return cached
    config = load_site_config(path)
    setattr(args, _CACHE, config)
    return config


# -- check --------------------------------------------------------------------


def check_files(config: SiteConfig) -> list[Problem]:
    """Problems with the files the site file names: missing, not regular
    files, or (card, key and PIN files) not private to this user."""
    found = []
    for field, path, private in config.backend.files():
        try:
            info = os.stat(path)
        except FileNotFoundError:
            found.append(config.problem(field, f"{path} does not exist"))
            continue
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            found.append(config.problem(field, f"cannot access {path}: {reason}"))
            continue
        if not stat.S_ISREG(info.st_mode):
            found.append(config.problem(field, f"{path} is not a regular file"))
        elif private and (problem := private_file_problem(path, info)) is not None:
            found.append(config.problem(field, problem))
    for field, log_file in _log_files(config):
        problem = _log_file_problem(log_file)
        if problem is not None:
            found.append(config.problem(field, problem))
    return found


def _log_files(config: SiteConfig) -> list[tuple[str, Path]]:
    logging_config = config.logging
    found = []
    if logging_config.file is not None:
        found.append(("logging.file", logging_config.file))
    if logging_config.audit_file is not None:
        found.append(("logging.audit_file", logging_config.audit_file))
    return found


def _log_file_problem(path: Path) -> str | None:
    """Why records could not be appended to ``path``, or None."""
    if path.exists():
        if not path.is_file():
            return f"{path} is not a regular file"
        if not os.access(path, os.W_OK):
            return f"{path} is not writable"
        return None
    directory = path.parent
    if directory.exists() and not directory.is_dir():
        return f"{directory} is not a directory"
    if not directory.is_dir():
        return f"directory {directory} does not exist"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"cannot create {path}: directory {directory} is not writable"
    return None


def summary(config: SiteConfig) -> list[str]:
    """What the site file configures, one aspect per line; no secrets."""
    settings = config.settings()
    timeouts = config.timeouts()
    limits = config.limits
    lines = [f"site      {config.name}, role {config.role.value}"]
    if config.role is SiteRole.SERVER:
        lines.append(f"listen    {_or_none(config.listen)} (ISCL)")
        if config.forward is not None:
            lines.append(f"forward   {config.forward} (plain DICOM)")
    else:
        lines.append(f"connect   {_or_none(config.connect)} (ISCL)")
        if config.listen is not None:
            lines.append(f"listen    {config.listen} (plain DICOM)")
    lines.append(f"backend   {config.backend.describe()}")
    lines.append(f"keys      {_keys(settings)}")
    lines.append(f"sends     {_sends(settings)}")
    lines.append(f"accepts   {_accepts(settings)}")
    lines.append(
        f"protocol  byte order {settings.byte_order.value}, version "
        f"0x{settings.version:08X}, authentication data "
        f"{len(settings.auth_data)} bytes"
        + (", refuses line disconnection" if settings.refuse_disconnection else "")
    )
    lines.append(
        f"limits    block {settings.max_block_length} bytes, message "
        f"{settings.max_message_length} bytes, file {limits.max_file_size} bytes; "
        f"{limits.max_connections} connections, {limits.max_handshakes_per_peer} "
        f"handshakes per peer, stop grace {limits.stop_grace:g} s; "
        f"{limits.max_failures} failures in {limits.failure_window:g} s block a "
        f"peer for {limits.failure_cooldown:g} s"
        + (
            " (so never: the limiter is off)"
            if not limits.failure_cooldown
            else " (under a second: in effect no limit)"
            if limits.failure_cooldown < 1
            else ""
        )
    )
    lines.append(
        f"timeouts  handshake {_seconds(timeouts.handshake)}, peer answer "
        f"{_seconds(timeouts.peer_answer)}, transmission "
        f"{_seconds(timeouts.transmission)}, disconnection "
        f"{_seconds(timeouts.disconnection)}, idle {_seconds(timeouts.idle)}, "
        f"card {_seconds(timeouts.card)}"
    )
    lines.append(f"logging   {_logging(config)}")
    return lines


def _or_none(value: object) -> str:
    return "none" if value is None else str(value)


def _seconds(value: float | None) -> str:
    return "none" if value is None else f"{value:g} s"


def _keys(settings: Settings) -> str:
    accepted = ", ".join(str(i) for i in sorted(settings.accepted_auth_key_indexes))
    index = settings.encryption_key_index
    encryption = (
        f"session keys from base key {settings.session_key_base_index}"
        if index == UNIQUE_SESSION_KEYS
        else f"key {index}"
    )
    return (
        f"authentication key {settings.auth_key_index} (asked for as server), "
        f"accepted {accepted} (as client); encryption {encryption}"
    )


def _sends(settings: Settings) -> str:
    return (
        f"{settings.encryption.name} + {settings.mac.name}, padding "
        f"{settings.padding.value}, IV {settings.iv_policy.value} from "
        f"{settings.chain_start.value}, DESMAC key {settings.mac_key_policy.value}"
    )


def _accepts(settings: Settings) -> str:
    allowed = [
        f"{encryption.name} + {mac.name}"
        for encryption in EncryptionMethod
        for mac in MacMethod
        if settings.refusal_of(encryption, mac) is None
    ]
    text = ", ".join(allowed) if allowed else "nothing"
    if settings.allow_through_mode:
        text += "; through mode (unsecured)"
    return text


def _logging(config: SiteConfig) -> str:
    logging_config = config.logging
    level = logging_config.level or "from --log-level"
    style = "JSON lines" if logging_config.json else "plain"
    where = logging_config.file or "standard error"
    text = f"level {level}, {style}, to {where}"
    if logging_config.audit_file is not None:
        text += f"; audit to {logging_config.audit_file}"
    return text


def cmd_config_check(args: argparse.Namespace) -> int:
    """Handle ``iscl config check``."""
    try:
        config = load_site_config(args.file)
    except SiteConfigError as exc:
        for problem in exc.problems:
            print(f"iscl config check: {problem}", file=sys.stderr)
        return EXIT_ERROR
    problems = check_files(config)
    print(f"{args.file}: {'valid' if not problems else 'INVALID'}")
    for line in summary(config):
        print(f"  {line}")
    for problem in problems:
        print(f"iscl config check: {problem}", file=sys.stderr)
    pin_env = config.backend.pin.env
    if pin_env is not None and not os.environ.get(pin_env):
        print(
            f"iscl config check: note: ${pin_env} is not set here; the site "
            "needs the PIN in it when it runs",
            file=sys.stderr,
        )
    if problems:
        return EXIT_ERROR
    if args.open:
        return _open(config)
    return EXIT_OK


def _open(config: SiteConfig) -> int:
    try:
        with open_backend(config) as (card, keys):
            found = [i for i in range(1, 9) if i in keys]
            print(f"  opened    card {card.name!r}; encryption keys {found or 'none'}")
            index = config.settings().encryption_key_index
            base = config.settings().session_key_base_index
            needed = base if index == UNIQUE_SESSION_KEYS else index
            if needed not in found:
                print(
                    f"iscl config check: encryption key {needed} is not in the "
                    "key file or token",
                    file=sys.stderr,
                )
                return EXIT_ERROR
    except IsclError as exc:
        print(f"iscl config check: opening the backend failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK
