"""Site files: one TOML file describing one ISCL site.

A site file names the site's role and addresses, its card backend (a
software card, an IC card in a PC/SC reader, or a PKCS#11 token), its key
indexes, every protocol choice of :class:`~iscl_hw.settings.Settings`, its
limits, timeouts and logging.  The schema, with a commented example for a
server and a client, is in ``docs/siteconfig.md``.

Parsing is strict and typed.  Every problem names the file, the line and
the dotted field (``site.toml:12: protocol.max_block_length: must be
144..4294967295, got 100``), all problems of a file are reported at once,
and an unknown key is an error, so a typo never passes silently.  A PIN or
a key written into the file is refused: a PIN comes from an environment
variable, a file or a prompt (``pin_env``, ``pin_file``, ``pin_prompt``),
and keys live in the card, the key file or the token.  Relative paths are
relative to the site file's directory.

Nothing here touches a card, a reader or a token: :func:`open_backend`
does, and imports pyscard or python-pkcs11 only for the backend that needs
it.
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Final, TypeAlias, TypeVar

from iscl_hw.card import ISCL_AID, Card
from iscl_hw.constants import (
    AUTH_DATA_MAX,
    AUTH_DATA_MIN,
    KEY_INDEXES,
    MIN_BLOCK_LENGTH,
    UNIQUE_SESSION_KEYS,
    EncryptionMethod,
    MacMethod,
)
from iscl_hw.crypto import Padding
from iscl_hw.endpoint import Timeouts
from iscl_hw.errors import ConfigError
from iscl_hw.ratelimit import FailureLimiter
from iscl_hw.settings import ChainStart, IvPolicy, KeyProvider, MacKeyPolicy, Settings
from iscl_hw.wire import ByteOrder

if TYPE_CHECKING:
    from iscl_hw.pcsc import ReaderSelector

__all__ = [
    "Address",
    "Backend",
    "LimitsConfig",
    "LoggingConfig",
    "PcscBackend",
    "PinSpec",
    "Pkcs11Backend",
    "Problem",
    "SiteConfig",
    "SiteConfigError",
    "SiteRole",
    "SoftcardBackend",
    "key_lines",
    "load_site_config",
    "open_backend",
    "parse_address",
    "parse_site_config",
]

_T = TypeVar("_T")

# Every duration in a site file is at most a day; "none" (where allowed)
# means no limit.
_MAX_SECONDS = 86400.0


def seconds_wanted(*, zero: bool) -> str:
    """What a duration setting (site file or command line) must be."""
    return f"a number of seconds {'>= 0' if zero else '> 0'} and <= {_MAX_SECONDS:g}"


def seconds_in_range(value: float, *, zero: bool) -> bool:
    """Finite, at most a day, above 0 (or from 0 with ``zero``)."""
    if not math.isfinite(value) or not 0 <= value <= _MAX_SECONDS:
        return False
    return zero or value > 0


_U32_MAX: Final = 0xFFFFFFFF
_MAX_SESSIONS: Final = 64  # iscl_hw.hsm.MAX_SESSIONS, without importing pkcs11
_LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Names that can only hold a secret.  ``pin_env``, ``pin_file``, ``key_file``
# and the ``*_index`` names do not match.
_PIN_NAME: Final = re.compile(r"(?:^|_)(?:pin|password|passphrase|passwd|secret)$")
_KEY_NAME: Final = re.compile(r"^(?:\w+_)?keys?(?:_(?:value|hex|data))?$")
_KEY_PATH: Final = re.compile(r"(?:^|\.)(?:auth|enc)\.[0-9]+$")


# -- problems -----------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a site file, and where."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.message}"


class SiteConfigError(ConfigError):
    """A site file is unreadable or invalid; ``problems`` lists every
    problem found, each with its line and field.  No message quotes a
    value that could be a secret."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in problems))


# -- where keys are -----------------------------------------------------------

_BARE_OR_QUOTED = r"(?:[A-Za-z0-9_-]+|\"(?:[^\"\\]|\\.)*\"|'[^']*')"
_DOTTED = rf"{_BARE_OR_QUOTED}(?:\s*\.\s*{_BARE_OR_QUOTED})*"
_TABLE_LINE: Final = re.compile(rf"\s*\[\[?\s*({_DOTTED})\s*\]\]?\s*(?:#.*)?$")
_KEY_LINE: Final = re.compile(rf"\s*({_DOTTED})\s*=\s*(.*)$")
_SEGMENT: Final = re.compile(_BARE_OR_QUOTED)


def _split_dotted(text: str) -> list[str]:
    parts = []
    for match in _SEGMENT.finditer(text):
        part = match.group(0)
        if part[0] in "\"'":
            part = part[1:-1]
        parts.append(part)
    return parts


def _entries(text: str) -> Iterator[tuple[str, int, bool]]:
    """(dotted key, line, is an array-of-tables header) of each key and table
    header, skipping lines inside multi-line strings."""
    table: list[str] = []
    closing: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if closing is not None:
            if closing in line:
                closing = None
            continue
        header = _TABLE_LINE.match(line)
        if header is not None:
            table = _split_dotted(header.group(1))
            yield ".".join(table), number, line.lstrip().startswith("[[")
            continue
        entry = _KEY_LINE.match(line)
        if entry is None:
            continue
        yield ".".join([*table, *_split_dotted(entry.group(1))]), number, False
        value = entry.group(2).lstrip()
        for quote in ('"""', "'''"):
            if value.startswith(quote) and quote not in value[3:]:
                closing = quote


def key_lines(text: str) -> dict[str, int]:
    """Map each dotted key of a TOML document to its 1-based line.

    A table maps to its header's line.  Lines inside multi-line strings are
    skipped; keys inside inline tables are not listed (:meth:`SiteConfig.
    line_of` falls back to the enclosing key).
    """
    lines: dict[str, int] = {}
    for dotted, number, _ in _entries(text):
        lines.setdefault(dotted, number)
    return lines


def _line_of(lines: Mapping[str, int], dotted: str) -> int | None:
    """The line of ``dotted``, else of its nearest enclosing key or table."""
    parts = dotted.split(".")
    while parts:
        line = lines.get(".".join(parts))
        if line is not None:
            return line
        parts.pop()
    return None


def _first_duplicate(text: str) -> tuple[str, int, int] | None:
    """A key or table defined twice: (dotted, first line, second line)."""
    seen: dict[str, int] = {}
    for dotted, number, array in _entries(text):
        if array:
            continue
        if dotted in seen:
            return dotted, seen[dotted], number
        seen[dotted] = number
    return None


# -- value types --------------------------------------------------------------


class SiteRole(enum.Enum):
    """Which end of ISCL the site is: the server accepts, the client connects."""

    SERVER = "server"
    CLIENT = "client"


@dataclass(frozen=True)
class Address:
    """A host and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_address(text: str, *, allow_port_zero: bool = False) -> Address:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) to an :class:`Address`;
    ConfigError if malformed.  Port 0 (any free port) only where a socket
    listens and ``allow_port_zero`` is set."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"write an IPv6 address as [ADDRESS]:PORT, not {text!r}")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ConfigError(f"port must be {low}..65535, got {port}")
    return Address(host, port)


@dataclass(frozen=True)
class PinSpec:
    """Where a PIN comes from; never the PIN."""

    env: str | None = None
    file: Path | None = None
    prompt: bool = False

    @property
    def given(self) -> bool:
        return self.env is not None or self.file is not None or self.prompt

    def describe(self) -> str:
        if self.env is not None:
            return f"PIN from ${self.env}"
        if self.file is not None:
            return f"PIN from file {self.file}"
        if self.prompt:
            return "PIN asked at start"
        return "no PIN"

    def source(self) -> Callable[[], bytes] | None:
        """A callable reading the PIN when asked (each time), or None."""
        from iscl_hw import cli_pcsc

        if self.env is not None:
            return cli_pcsc.pin_from_env(self.env)
        if self.file is not None:
            return cli_pcsc.pin_from_file(self.file)
        if self.prompt:
            return cli_pcsc.pin_from_prompt()
        return None

    def read(self) -> bytes | None:
        """The PIN now, or None when none is configured."""
        source = self.source()
        return None if source is None else source()


@dataclass(frozen=True)
class SoftcardBackend:
    """The software card: a card file (authentication keys, retry counters)
    and a key file (encryption keys)."""

    card_file: Path
    key_file: Path
    pin: PinSpec = PinSpec()

    kind: ClassVar[str] = "softcard"

    def describe(self) -> str:
        return (
            f"softcard: card file {self.card_file}, key file {self.key_file}, "
            f"{self.pin.describe()}"
        )

    def files(self) -> list[tuple[str, Path, bool]]:
        """(field, path, private) of every file the backend reads."""
        found = [("card.card_file", self.card_file, True)]
        found.append(("card.key_file", self.key_file, True))
        if self.pin.file is not None:
            found.append(("card.pin_file", self.pin.file, True))
        return found


@dataclass(frozen=True)
class PcscBackend:
    """An IC card in a PC/SC reader; encryption keys in a key file."""

    key_file: Path
    reader: str | None = None
    reader_regex: str | None = None
    reader_index: int | None = None
    protocol: int | None = None
    card_wait: float = 5.0
    aid: bytes = ISCL_AID
    pin: PinSpec = PinSpec()

    kind: ClassVar[str] = "pcsc"

    def selector(self) -> ReaderSelector:
        from iscl_hw.pcsc import ReaderSelector

        return ReaderSelector(
            name=self.reader, pattern=self.reader_regex, index=self.reader_index
        )

    def describe(self) -> str:
        if self.reader is not None:
            which = f"reader {self.reader!r}"
        elif self.reader_regex is not None:
            which = f"readers matching /{self.reader_regex}/"
        elif self.reader_index is not None:
            which = f"reader #{self.reader_index}"
        else:
            which = "any reader"
        protocol = "from the ATR" if self.protocol is None else f"T={self.protocol}"
        return (
            f"pcsc: {which}, protocol {protocol}, card wait {self.card_wait:g} s, "
            f"AID {self.aid.hex().upper()}, {self.pin.describe()}, "
            f"key file {self.key_file}"
        )

    def files(self) -> list[tuple[str, Path, bool]]:
        found = [("card.key_file", self.key_file, True)]
        if self.pin.file is not None:
            found.append(("card.pin_file", self.pin.file, True))
        return found


@dataclass(frozen=True)
class Pkcs11Backend:
    """Keys in a PKCS#11 token (``docs/pkcs11.md``)."""

    pin: PinSpec
    module: Path | None = None
    label: str | None = None
    serial: str | None = None
    allowed_mechanisms: frozenset[str] | None = None
    sessions: int = 4
    session_wait: float = 1.0

    kind: ClassVar[str] = "pkcs11"

    def describe(self) -> str:
        module = self.module or "default ($ISCL_PKCS11_MODULE or SoftHSM2)"
        token = f"label {self.label!r}" if self.label else f"serial {self.serial!r}"
        mechanisms = (
            "any"
            if self.allowed_mechanisms is None
            else ", ".join(sorted(self.allowed_mechanisms))
        )
        return (
            f"pkcs11: module {module}, token {token}, {self.pin.describe()}, "
            f"{self.sessions} sessions (wait {self.session_wait:g} s), "
            f"mechanisms {mechanisms}"
        )

    def files(self) -> list[tuple[str, Path, bool]]:
        found = []
        if self.module is not None:
            found.append(("card.module", self.module, False))
        if self.pin.file is not None:
            found.append(("card.pin_file", self.pin.file, True))
        return found


Backend: TypeAlias = SoftcardBackend | PcscBackend | Pkcs11Backend


@dataclass(frozen=True)
class LimitsConfig:
    """Server limits (``aio.start_server`` and the failure limiter), the
    grace period for a stop, and the largest file ``iscl receive`` takes."""

    max_connections: int = 256
    max_handshakes_per_peer: int = 4
    stop_grace: float = 30.0
    max_failures: int = 5
    failure_window: float = 60.0
    failure_cooldown: float = 300.0
    max_file_size: int = 1 << 32

    def limiter(self) -> FailureLimiter:
        return FailureLimiter(
            self.max_failures, self.failure_window, self.failure_cooldown
        )


@dataclass(frozen=True)
class LoggingConfig:
    """Operator logging (:mod:`iscl_hw.oplog`).  ``level`` None keeps the
    command line's ``--log-level``; ``file`` None logs to standard error."""

    level: str | None = None
    json: bool = False
    file: Path | None = None
    audit_file: Path | None = None


@dataclass(frozen=True)
class SiteConfig:
    """A parsed, valid site file."""

    path: Path | None
    name: str
    role: SiteRole
    backend: Backend
    listen: Address | None = None
    connect: Address | None = None
    forward: Address | None = None
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    protocol: Settings = field(default_factory=Settings, repr=False)
    timeout_values: Timeouts = field(default_factory=Timeouts)
    lines: Mapping[str, int] = field(default_factory=dict, repr=False, compare=False)

    def settings(self) -> Settings:
        """The protocol settings of this site."""
        return self.protocol

    def timeouts(self) -> Timeouts:
        """The timeouts of this site."""
        return self.timeout_values

    def line_of(self, dotted: str) -> int | None:
        """The line of ``dotted`` (or of the nearest enclosing key) in the file."""
        return _line_of(self.lines, dotted)

    def problem(self, dotted: str, message: str) -> Problem:
        """A problem about field ``dotted`` of this file, with its line."""
        return Problem(
            str(self.path or "<site>"), self.line_of(dotted), dotted, message
        )


# -- reading ------------------------------------------------------------------


class _Missing:
    pass


_MISSING: Final = _Missing()


class _Reader:
    """Collects problems while the sections are read."""

    def __init__(self, source: str, text: str, document: dict[str, object]) -> None:
        self.source = source
        self.lines = key_lines(text)
        self.document = document
        self.problems: list[Problem] = []
        self.secret_keys: set[str] = set()

    def problem(self, dotted: str, message: str) -> None:
        line = _line_of(self.lines, dotted)
        self.problems.append(Problem(self.source, line, dotted, message))

    def refuse_secrets(self, table: Mapping[str, object], prefix: str = "") -> None:
        for key, value in table.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                self.refuse_secrets(value, f"{dotted}.")
            elif _PIN_NAME.search(key):
                self.secret_keys.add(dotted)
                self.problem(
                    dotted,
                    "a PIN must not be written in the site file; give pin_env "
                    "(an environment variable), pin_file or pin_prompt",
                )
            elif _KEY_NAME.match(key) or _KEY_PATH.search(dotted):
                self.secret_keys.add(dotted)
                self.problem(
                    dotted,
                    "key material must not be written in the site file; keys "
                    "live in the card, the key file or the token",
                )

    def section(self, name: str, *, required: bool = False) -> _Section:
        value = self.document.get(name, _MISSING)
        if value is _MISSING:
            if required:
                self.problem(name, "section is required")
            return _Section(self, name, {})
        if not isinstance(value, dict):
            self.problem(name, "must be a table ([" + name + "])")
            return _Section(self, name, {})
        return _Section(self, name, value)


class _Section:
    """One table of the file; tracks which of its keys were read."""

    def __init__(self, reader: _Reader, name: str, table: dict[str, object]) -> None:
        self.reader = reader
        self.name = name
        self.table = table
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.table

    def take(self, key: str) -> object:
        self.used.add(key)
        return self.table.get(key, _MISSING)

    def problem(self, key: str, message: str) -> None:
        self.reader.problem(f"{self.name}.{key}", message)

    def string(self, key: str, *, required: bool = False) -> str | None:
        value = self.take(key)
        if value is _MISSING:
            if required:
                self.problem(key, "is required")
            return None
        if not isinstance(value, str) or not value:
            self.problem(key, f"must be a non-empty string, got {_kind(value)}")
            return None
        return value

    def integer(self, key: str, low: int, high: int, default: int) -> int:
        value = self.take(key)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(key, f"must be an integer, got {_kind(value)}")
            return default
        if not low <= value <= high:
            self.problem(key, f"must be {low}..{high}, got {value}")
            return default
        return value

    def seconds(
        self, key: str, default: float, *, zero: bool = False, none: bool = False
    ) -> float:
        value = self.take(key)
        if value is _MISSING:
            return default
        wanted = seconds_wanted(zero=zero)
        if none:
            wanted += ' or "none"'
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(key, f"must be {wanted}, got {_kind(value)}")
            return default
        if not seconds_in_range(value, zero=zero):
            self.problem(key, f"must be {wanted}, got {value}")
            return default
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.take(key)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.problem(key, f"must be true or false, got {_kind(value)}")
            return default
        return value

    def choice(self, key: str, choices: Mapping[str, _T], default: _T) -> _T:
        value = self.take(key)
        if value is _MISSING:
            return default
        if isinstance(value, str) and value.lower() in choices:
            return choices[value.lower()]
        names = ", ".join(f'"{c}"' for c in choices)
        shown = repr(value) if isinstance(value, str) else _kind(value)
        self.problem(key, f"must be one of {names}, got {shown}")
        return default

    def path(self, key: str, base: Path, *, required: bool = False) -> Path | None:
        text = self.string(key, required=required)
        if text is None:
            return None
        path = Path(text).expanduser()
        return path if path.is_absolute() else base / path

    def address(self, key: str, *, listen: bool = False) -> Address | None:
        text = self.string(key)
        if text is None:
            return None
        try:
            return parse_address(text, allow_port_zero=listen)
        except ConfigError as exc:
            self.problem(key, str(exc))
            return None

    def pin(self, base: Path) -> PinSpec:
        env = self.string("pin_env")
        if env is not None and not _ENV_NAME.fullmatch(env):
            # Not quoted: someone may have written the PIN itself here.
            self.problem(
                "pin_env",
                "must name an environment variable (letters, digits, _), "
                "not hold the PIN",
            )
            env = None
        spec = PinSpec(
            env, self.path("pin_file", base), self.boolean("pin_prompt", False)
        )
        given = [n for n in ("pin_env", "pin_file") if self.has(n)]
        if spec.prompt:
            given.append("pin_prompt")
        if len(given) > 1:
            self.problem(given[1], f"give one PIN source, not {' and '.join(given)}")
        return spec

    def finish(self, others: Mapping[str, str] | None = None) -> None:
        """Report the keys nobody read: typos, or keys of another card type."""
        known = sorted(self.used)
        for key in self.table:
            dotted = f"{self.name}.{key}"
            if key in self.used or dotted in self.reader.secret_keys:
                continue
            if _has_secret_below(self.reader.secret_keys, dotted):
                continue
            if others and key in others:
                self.problem(key, others[key])
                continue
            close = get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            self.problem(key, f"unknown key{hint}")


def _has_secret_below(secrets: set[str], dotted: str) -> bool:
    return any(s.startswith(f"{dotted}.") for s in secrets)


def _kind(value: object) -> str:
    """A value's TOML type, for messages that must not quote the value."""
    if value is _MISSING:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string" if value else "an empty string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


_ROLES: Final = {r.value: r for r in SiteRole}
_BYTE_ORDERS: Final = {o.value: o for o in ByteOrder}
_ENCRYPTIONS: Final = {
    "des-cbc": EncryptionMethod.DES_CBC,
    "none": EncryptionMethod.NONE,
}
_MACS: Final = {
    "md5": MacMethod.MD5,
    "desmac": MacMethod.DESMAC,
    "none": MacMethod.NONE,
}
_PADDINGS: Final = {p.value: p for p in Padding if p is not Padding.ISO9797_M1}
_IV_POLICIES: Final = {p.value: p for p in IvPolicy}
_CHAIN_STARTS: Final = {c.value: c for c in ChainStart}
_MAC_KEY_POLICIES: Final = {p.value: p for p in MacKeyPolicy}
_LEVELS: Final = {name: name.upper() for name in _LOG_LEVELS}
_PROTOCOLS: Final = {"t0": 0, "t1": 1, "t=0": 0, "t=1": 1}
_CARD_TYPES: Final = ("softcard", "pcsc", "pkcs11")

# Which card type each type-specific key belongs to, for a clear message
# when one is used with another type.
_CARD_KEYS: Final = {
    "card_file": ("softcard",),
    "key_file": ("softcard", "pcsc"),
    "reader": ("pcsc",),
    "reader_regex": ("pcsc",),
    "reader_index": ("pcsc",),
    "protocol": ("pcsc",),
    "card_wait": ("pcsc",),
    "aid": ("pcsc",),
    "module": ("pkcs11",),
    "label": ("pkcs11",),
    "serial": ("pkcs11",),
    "allowed_mechanisms": ("pkcs11",),
    "sessions": ("pkcs11",),
    "session_wait": ("pkcs11",),
}
_SECTIONS: Final = (
    "site",
    "card",
    "keys",
    "protocol",
    "policy",
    "limits",
    "timeouts",
    "logging",
)


def load_site_config(path: str | os.PathLike[str]) -> SiteConfig:
    """Read and validate the site file at ``path``; raise
    :class:`SiteConfigError` naming every problem."""
    source = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SiteConfigError(
            [Problem(source, None, "file", f"cannot read: {reason}")]
        ) from None
    except UnicodeDecodeError as exc:
        raise SiteConfigError(
            [Problem(source, None, "file", f"not UTF-8 text (byte {exc.start})")]
        ) from None
    return parse_site_config(
        text, source=source, base=Path(path).absolute().parent, path=Path(path)
    )


_DECODE_PLACE: Final = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_AT_END: Final = " (at end of document)"


def parse_site_config(
    text: str,
    *,
    source: str = "<site>",
    base: Path | None = None,
    path: Path | None = None,
) -> SiteConfig:
    """Validate the TOML ``text`` of a site file; relative paths are taken
    from ``base`` (the current directory if None)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SiteConfigError([_syntax_problem(source, text, str(exc))]) from None
    reader = _Reader(source, text, document)
    reader.refuse_secrets(document)
    config = _read(reader, base or Path.cwd(), path)
    if config is None and not reader.problems:
        reader.problem("site", "incomplete site file")
    if reader.problems or config is None:
        raise SiteConfigError(
            sorted(reader.problems, key=lambda p: (p.line is None, p.line or 0))
        )
    return config


def _syntax_problem(source: str, text: str, message: str) -> Problem:
    duplicate = _first_duplicate(text)
    if duplicate is not None and message.startswith("Cannot "):
        dotted, first, second = duplicate
        return Problem(source, second, dotted, f"defined twice (first on line {first})")
    place = _DECODE_PLACE.search(message)
    if place is not None:
        line, column = int(place.group(1)), place.group(2)
        reason = _DECODE_PLACE.sub("", message)
        return Problem(source, line, "syntax", f"{reason} (column {column})")
    if message.endswith(_AT_END):
        line = max(1, len(text.splitlines()))
        return Problem(
            source, line, "syntax", f"{message.removesuffix(_AT_END)} (at the end)"
        )
    return Problem(source, None, "syntax", message)


def _read(reader: _Reader, base: Path, path: Path | None) -> SiteConfig | None:
    for name in reader.document:
        if name not in _SECTIONS and name not in reader.secret_keys:
            if _has_secret_below(reader.secret_keys, name):
                continue
            close = get_close_matches(name, _SECTIONS, n=1)
            hint = f"; did you mean [{close[0]}]?" if close else ""
            reader.problem(name, f"unknown section{hint}")

    site = reader.section("site", required=True)
    name = site.string("name") or (path.stem if path is not None else "site")
    role = site.choice("role", _ROLES, None)
    if role is None and not site.has("role") and "site" in reader.document:
        site.problem("role", 'is required ("server" or "client")')
    listen = site.address("listen", listen=True)
    connect = site.address("connect")
    forward = site.address("forward")
    _check_role(site, role, listen, connect, forward)
    site.finish()

    backend = _read_card(reader.section("card", required=True), base)
    settings = _read_settings(reader)
    timeouts = _read_timeouts(reader.section("timeouts"))
    limits = _read_limits(reader.section("limits"))
    logging_config = _read_logging(reader.section("logging"), base)

    if role is None or backend is None or settings is None:
        return None
    return SiteConfig(
        path=path,
        name=name,
        role=role,
        backend=backend,
        listen=listen,
        connect=connect,
        forward=forward,
        limits=limits,
        logging=logging_config,
        protocol=settings,
        timeout_values=timeouts,
        lines=dict(reader.lines),
    )


def _check_role(
    site: _Section,
    role: SiteRole | None,
    listen: Address | None,
    connect: Address | None,
    forward: Address | None,
) -> None:
    if role is SiteRole.SERVER:
        if listen is None and not site.has("listen"):
            site.problem("listen", "a server site needs the address it accepts ISCL on")
        if site.has("connect"):
            site.problem("connect", "a server site does not connect; use listen")
    elif role is SiteRole.CLIENT:
        if connect is None and not site.has("connect"):
            site.problem("connect", "a client site needs the ISCL peer's address")
        if site.has("forward"):
            site.problem("forward", "only a server site forwards; use connect")


def _read_card(card: _Section, base: Path) -> Backend | None:
    kind = card.choice("type", {t: t for t in _CARD_TYPES}, None)
    if kind is None:
        if not card.has("type") and isinstance(card.reader.document.get("card"), dict):
            card.problem("type", 'is required ("softcard", "pcsc" or "pkcs11")')
        return None
    backend: Backend | None
    if kind == "softcard":
        backend = _read_softcard(card, base)
    elif kind == "pcsc":
        backend = _read_pcsc(card, base)
    else:
        backend = _read_pkcs11(card, base)
    others = {
        key: f'is a setting of type = "{types[0]}", not of type = "{kind}"'
        for key, types in _CARD_KEYS.items()
        if kind not in types
    }
    card.finish(others)
    return backend


def _read_softcard(card: _Section, base: Path) -> SoftcardBackend | None:
    card_file = card.path("card_file", base, required=True)
    key_file = card.path("key_file", base, required=True)
    pin = card.pin(base)
    if card_file is None or key_file is None:
        return None
    return SoftcardBackend(card_file, key_file, pin)


def _read_pcsc(card: _Section, base: Path) -> PcscBackend | None:
    key_file = card.path("key_file", base, required=True)
    reader = card.string("reader")
    regex = card.string("reader_regex")
    index = card.integer("reader_index", 0, 255, -1)
    chosen = [k for k in ("reader", "reader_regex", "reader_index") if card.has(k)]
    if len(chosen) > 1:
        card.problem(chosen[1], f"choose the reader by one of {', '.join(chosen)}")
    if regex is not None:
        try:
            re.compile(regex)
        except re.error as exc:
            card.problem("reader_regex", f"not a regular expression: {exc}")
    protocol = card.choice("protocol", _PROTOCOLS, None)
    card_wait = card.seconds("card_wait", 5.0)
    aid = _read_aid(card)
    pin = card.pin(base)
    if key_file is None:
        return None
    return PcscBackend(
        key_file=key_file,
        reader=reader,
        reader_regex=regex,
        reader_index=None if index < 0 else index,
        protocol=protocol,
        card_wait=card_wait,
        aid=aid,
        pin=pin,
    )


def _read_aid(card: _Section) -> bytes:
    text = card.string("aid")
    if text is None:
        return ISCL_AID
    try:
        aid = bytes.fromhex(text)
    except ValueError:
        card.problem("aid", "must be hex digits")
        return ISCL_AID
    if not 5 <= len(aid) <= 16:
        card.problem("aid", f"must be 5..16 bytes, got {len(aid)}")
        return ISCL_AID
    return aid


def _read_pkcs11(card: _Section, base: Path) -> Pkcs11Backend | None:
    module = card.path("module", base)
    label = card.string("label")
    serial = card.string("serial")
    if card.has("label") and card.has("serial"):
        card.problem("serial", "give the token's label or its serial number, not both")
    elif not card.has("label") and not card.has("serial"):
        card.problem("label", "give the token's label (or its serial number)")
    mechanisms = _read_mechanisms(card)
    sessions = card.integer("sessions", 1, _MAX_SESSIONS, 4)
    session_wait = card.seconds("session_wait", 1.0)
    pin = card.pin(base)
    if not pin.given and not any(card.has(k) for k in ("pin_env", "pin_file")):
        card.problem(
            "pin_env",
            "a token needs its user PIN: give pin_env, pin_file or pin_prompt",
        )
    if label is None and serial is None:
        return None
    return Pkcs11Backend(
        pin=pin,
        module=module,
        label=label,
        serial=serial,
        allowed_mechanisms=mechanisms,
        sessions=sessions,
        session_wait=session_wait,
    )


def _read_mechanisms(card: _Section) -> frozenset[str] | None:
    value = card.take("allowed_mechanisms")
    if value is _MISSING:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        card.problem("allowed_mechanisms", "must be an array of mechanism names")
        return None
    if not value:
        card.problem("allowed_mechanisms", "must name at least one mechanism")
        return None
    return frozenset(str(v).removeprefix("CKM_") for v in value)


def _read_settings(reader: _Reader) -> Settings | None:
    keys = reader.section("keys")
    protocol = reader.section("protocol")
    policy = reader.section("policy")
    values: dict[str, object] = {}

    values["auth_key_index"] = keys.integer("auth_key_index", 1, 8, 1)
    accepted = _read_indexes(keys)
    if accepted is not None:
        values["accepted_auth_key_indexes"] = accepted
    values["encryption_key_index"] = _read_encryption_index(keys)
    values["session_key_base_index"] = keys.integer("session_key_base_index", 1, 8, 1)
    keys.finish()

    values["byte_order"] = protocol.choice("byte_order", _BYTE_ORDERS, ByteOrder.BIG)
    values["version"] = protocol.integer("version", 0, _U32_MAX, Settings.version)
    values["max_block_length"] = protocol.integer(
        "max_block_length", MIN_BLOCK_LENGTH, _U32_MAX, Settings.max_block_length
    )
    values["max_message_length"] = protocol.integer(
        "max_message_length", 1, _U32_MAX - 8, Settings.max_message_length
    )
    auth_data = _read_auth_data(protocol)
    if auth_data is not None:
        values["auth_data"] = auth_data
    values["encryption"] = protocol.choice(
        "encryption", _ENCRYPTIONS, Settings.encryption
    )
    values["mac"] = protocol.choice("mac", _MACS, Settings.mac)
    values["padding"] = protocol.choice("padding", _PADDINGS, Settings.padding)
    values["iv_policy"] = protocol.choice("iv_policy", _IV_POLICIES, Settings.iv_policy)
    values["chain_start"] = protocol.choice(
        "chain_start", _CHAIN_STARTS, Settings.chain_start
    )
    values["mac_key_policy"] = protocol.choice(
        "mac_key_policy", _MAC_KEY_POLICIES, Settings.mac_key_policy
    )
    protocol.finish()

    for flag in (
        "require_encryption",
        "allow_no_mac",
        "allow_unencrypted_md5",
        "allow_through_mode",
        "refuse_disconnection",
    ):
        values[flag] = policy.boolean(flag, getattr(Settings, flag))
    policy.finish()

    if reader.problems:
        return None
    try:
        return Settings(**values)  # type: ignore[arg-type]
    except ConfigError as exc:
        # Every field was checked above; this is a combination Settings refuses.
        reader.problem("protocol", str(exc))
        return None


def _read_indexes(keys: _Section) -> frozenset[int] | None:
    value = keys.take("accepted_auth_key_indexes")
    if value is _MISSING:
        return None
    if not isinstance(value, list) or not value:
        keys.problem("accepted_auth_key_indexes", "must be a non-empty array of 1..8")
        return None
    indexes = set()
    for item in value:
        if (
            isinstance(item, bool)
            or not isinstance(item, int)
            or item not in KEY_INDEXES
        ):
            shown = str(item) if isinstance(item, int) else _kind(item)
            keys.problem(
                "accepted_auth_key_indexes", f"must hold 1..8 only, got {shown}"
            )
            return None
        indexes.add(item)
    return frozenset(indexes)


def _read_encryption_index(keys: _Section) -> int:
    value = keys.take("encryption_key_index")
    if value is _MISSING:
        return Settings.encryption_key_index
    if value == "session":
        return UNIQUE_SESSION_KEYS
    if isinstance(value, int) and not isinstance(value, bool):
        if value in KEY_INDEXES or value == UNIQUE_SESSION_KEYS:
            return value
        shown = str(value)
    else:
        shown = _kind(value)
    keys.problem("encryption_key_index", f'must be 1..8 or "session", got {shown}')
    return Settings.encryption_key_index


def _read_auth_data(protocol: _Section) -> bytes | None:
    text = protocol.string("auth_data")
    hex_text = protocol.string("auth_data_hex")
    if text is not None and hex_text is not None:
        protocol.problem("auth_data_hex", "give auth_data or auth_data_hex, not both")
        return None
    if text is not None:
        data, field_name = text.encode("utf-8"), "auth_data"
    elif hex_text is not None:
        try:
            data, field_name = bytes.fromhex(hex_text), "auth_data_hex"
        except ValueError:
            protocol.problem("auth_data_hex", "must be hex digits")
            return None
    else:
        return None
    if not AUTH_DATA_MIN <= len(data) <= AUTH_DATA_MAX:
        protocol.problem(
            field_name,
            f"must be {AUTH_DATA_MIN}..{AUTH_DATA_MAX} bytes, got {len(data)}",
        )
        return None
    return data


def _read_timeouts(section: _Section) -> Timeouts:
    defaults = Timeouts()
    timeouts = Timeouts(
        handshake=section.seconds("handshake", defaults.handshake),
        peer_answer=section.seconds("peer_answer", defaults.peer_answer),
        transmission=section.seconds("transmission", defaults.transmission),
        disconnection=section.seconds("disconnection", defaults.disconnection),
        idle=_optional_seconds(section, "idle", defaults.idle),
        card=_optional_seconds(section, "card", defaults.card),
    )
    section.finish()
    return timeouts


def _optional_seconds(
    section: _Section, key: str, default: float | None
) -> float | None:
    value = section.table.get(key, _MISSING)
    if value == "none" or (value is _MISSING and default is None):
        section.used.add(key)
        return None
    return section.seconds(key, default or 0.0, none=True)


def _read_limits(section: _Section) -> LimitsConfig:
    defaults = LimitsConfig()
    limits = LimitsConfig(
        max_connections=section.integer(
            "max_connections", 1, 1_000_000, defaults.max_connections
        ),
        max_handshakes_per_peer=section.integer(
            "max_handshakes_per_peer", 1, 1024, defaults.max_handshakes_per_peer
        ),
        stop_grace=section.seconds("stop_grace", defaults.stop_grace, zero=True),
        max_failures=section.integer(
            "max_failures", 1, 1_000_000, defaults.max_failures
        ),
        failure_window=section.seconds("failure_window", defaults.failure_window),
        failure_cooldown=section.seconds(
            "failure_cooldown", defaults.failure_cooldown, zero=True
        ),
        max_file_size=section.integer(
            "max_file_size", 0, 1 << 62, defaults.max_file_size
        ),
    )
    section.finish()
    return limits


def _read_logging(section: _Section, base: Path) -> LoggingConfig:
    config = LoggingConfig(
        level=section.choice("level", _LEVELS, None),
        json=section.boolean("json", False),
        file=section.path("file", base),
        audit_file=section.path("audit_file", base),
    )
    section.finish()
    return config


# -- opening the backend ------------------------------------------------------


@contextlib.contextmanager
def open_backend(config: SiteConfig) -> Iterator[tuple[Card, KeyProvider]]:
    """Open the site's card and encryption keys; close them on exit.

    pyscard is imported only for ``pcsc``, python-pkcs11 only for
    ``pkcs11``.  A PIN is read from its source here (a prompt asks now).
    """
    backend = config.backend
    if isinstance(backend, SoftcardBackend):
        with _open_softcard(backend, config.name) as opened:
            yield opened
    elif isinstance(backend, PcscBackend):
        with _open_pcsc(backend, config.name) as opened:
            yield opened
    else:
        with _open_pkcs11(backend) as opened:
            yield opened


@contextlib.contextmanager
def _open_softcard(
    backend: SoftcardBackend, name: str
) -> Iterator[tuple[Card, KeyProvider]]:
    from iscl_hw.card import ApduCard
    from iscl_hw.keyfile import load_key_file
    from softcard.emulator import SoftCard

    keys = load_key_file(backend.key_file)
    card = ApduCard(
        SoftCard.from_file(backend.card_file),
        pin=backend.pin.read(),
        name=f"{name} card",
    )
    try:
        yield card, keys
    finally:
        card.close()


@contextlib.contextmanager
def _open_pcsc(backend: PcscBackend, name: str) -> Iterator[tuple[Card, KeyProvider]]:
    from iscl_hw.keyfile import load_key_file
    from iscl_hw.pcsc import PcscCard

    keys = load_key_file(backend.key_file)
    pin = backend.pin.source()
    if pin is not None and backend.pin.prompt:
        # Ask once, now: a re-inserted card must not prompt mid-connection.
        pin = _remembered(pin())
    card = PcscCard(
        backend.selector(),
        aid=backend.aid,
        pin=pin,
        protocol=backend.protocol,
        card_timeout=backend.card_wait,
    )
    try:
        yield card, keys
    finally:
        card.close()


def _remembered(pin: bytes) -> Callable[[], bytes]:
    return lambda: pin


@contextlib.contextmanager
def _open_pkcs11(backend: Pkcs11Backend) -> Iterator[tuple[Card, KeyProvider]]:
    try:
        from iscl_hw.hsm import Token, TokenCard, TokenConfig, TokenKeys
    except ImportError as exc:
        raise ConfigError(
            "the pkcs11 backend needs python-pkcs11: pip install 'iscl[pkcs11]'"
        ) from exc
    from iscl_hw import softhsm

    module = backend.module or softhsm.find_module()
    token = Token(
        TokenConfig(
            str(module),
            label=backend.label,
            serial=backend.serial,
            pin=backend.pin.read() or b"",
            sessions=backend.sessions,
            session_wait=backend.session_wait,
            allowed_mechanisms=backend.allowed_mechanisms,
        )
    )
    try:
        yield TokenCard(token), TokenKeys(token)
    finally:
        token.close()
