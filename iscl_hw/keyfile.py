"""Encryption-key files (ISCL key pairs 1..8) and private-file helpers.

A key file is JSON, mode 0600::

    {"format": "iscl-keys", "version": 1, "keys": {"1": "<16 hex digits>"}}

:func:`write_private_file` and :func:`read_private_file` are shared with the
software card's card file: files are written atomically with mode 0600
from creation, and a file that group or other may read or write is refused.

Key material is never part of an exception message or a ``repr``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

from iscl_hw.constants import KEY_INDEXES, KEY_LENGTH
from iscl_hw.errors import ConfigError, KeyFileError

__all__ = [
    "KEY_FILE_FORMAT",
    "KeyStore",
    "load_json_document",
    "load_key_file",
    "parse_index_field",
    "parse_key_field",
    "parse_key_material",
    "private_file_problem",
    "read_private_file",
    "write_key_file",
    "write_private_file",
]

KEY_FILE_FORMAT: Final = "iscl-keys"
_KEY_FILE_VERSION: Final = 1
# Card and key files are a few kilobytes; refuse to slurp anything huge.
_MAX_PRIVATE_FILE: Final = 1 << 20

_KEY_LINE: Final = re.compile(r"(auth|enc)\.([0-9]{1,3})\s*=\s*(\S*)")
_INDEX_NAME: Final = re.compile(r"[1-8]")
_HEX_KEY: Final = re.compile(r"[0-9A-Fa-f]{16}")


def write_private_file(
    path: str | os.PathLike[str], data: bytes, overwrite: bool
) -> None:
    """Write ``data`` to ``path`` atomically, mode 0600.

    The data goes to a temporary file in the same directory, created 0600,
    fsynced, then renamed over ``path`` (``overwrite``) or hard-linked to it
    (otherwise, so an existing file is never replaced).
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        _write_new_file(tmp, data)
        if overwrite:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)
        _fsync_dir(target.parent)
    except FileExistsError:
        raise KeyFileError(
            f"{target} already exists; refusing to overwrite it"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot write {target}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _write_new_file(path: Path, data: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask can only clear bits; make it exact
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_private_file(path: str | os.PathLike[str]) -> bytes:
    """Read a key or card file, refusing one that group or other can access."""
    target = Path(path)
    try:
        # O_NONBLOCK so a FIFO in its place cannot hang the open; the
        # regular-file check below then refuses it.
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KeyFileError(f"{target} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"cannot open {target}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        _check_private(target, info)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(_MAX_PRIVATE_FILE + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read {target}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if len(data) > _MAX_PRIVATE_FILE:
        raise KeyFileError(f"{target} is larger than {_MAX_PRIVATE_FILE} bytes")
    return data


def _check_private(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path} is not a regular file")
    problem = private_file_problem(path, info)
    if problem is not None:
        raise KeyFileError(problem)


def private_file_problem(
    path: str | os.PathLike[str], info: os.stat_result
) -> str | None:
    """Why a regular file ``info`` describes may not hold keys or a PIN: one
    group or other can access, or another user's (root's excepted), whose
    owner could put keys or a PIN of their choosing in it."""
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        return (
            f"{path} is accessible by group or other (mode {mode:04o}); make it "
            f"the file of the user iscl runs as, with 'chmod 600 {path}'"
        )
    if info.st_uid not in (os.geteuid(), 0):
        return (
            f"{path} belongs to another user (uid {info.st_uid}), not to this "
            f"one (uid {os.geteuid()}) or root"
        )
    return None


class KeyStore:
    """ISCL encryption keys by index 1..8; its ``repr`` shows indexes only."""

    def __init__(self, keys: Mapping[int, bytes]) -> None:
        for index, key in keys.items():
            _check_index(index)
            if not isinstance(key, bytes) or len(key) != KEY_LENGTH:
                raise ConfigError(f"key {index} must be {KEY_LENGTH} bytes")
        self._keys = dict(sorted(keys.items()))

    def __repr__(self) -> str:
        return f"KeyStore(indexes={list(self._keys)})"

    def __contains__(self, index: object) -> bool:
        return index in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys)

    @property
    def indexes(self) -> tuple[int, ...]:
        return tuple(self._keys)

    def get(self, index: int) -> bytes:
        """Return key ``index``; raise :class:`ConfigError` if it is absent."""
        try:
            return self._keys[index]
        except KeyError:
            raise ConfigError(f"no encryption key with index {index}") from None


def _check_index(index: int) -> None:
    if isinstance(index, bool) or not isinstance(index, int):
        raise ConfigError("key index must be an int")
    if index not in KEY_INDEXES:
        raise ConfigError(f"key index must be 1..8, got {index}")


def write_key_file(
    path: str | os.PathLike[str], keys: Mapping[int, bytes], overwrite: bool = False
) -> None:
    """Write encryption keys to a new key file (mode 0600, atomic)."""
    store = KeyStore(keys)
    document = {
        "format": KEY_FILE_FORMAT,
        "version": _KEY_FILE_VERSION,
        "keys": {str(i): store.get(i).hex().upper() for i in store},
    }
    data = json.dumps(document, indent=2).encode() + b"\n"
    write_private_file(path, data, overwrite)


def load_key_file(path: str | os.PathLike[str]) -> KeyStore:
    """Load and validate a key file written by :func:`write_key_file`."""
    document = load_json_document(path, KEY_FILE_FORMAT, _KEY_FILE_VERSION)
    entries = document.get("keys")
    if not isinstance(entries, dict):
        raise KeyFileError(f"{path}: 'keys' must be an object")
    keys = {
        parse_index_field(path, name): parse_key_field(path, f"keys.{name}", value)
        for name, value in entries.items()
    }
    return KeyStore(keys)


def load_json_document(
    path: str | os.PathLike[str], file_format: str, version: int
) -> dict[str, object]:
    """Read a private JSON file and check its ``format`` and ``version``."""
    raw = read_private_file(path)
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # The decoder's message can quote the text, which may hold keys.
        raise KeyFileError(f"{path} is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(document, dict):
        raise KeyFileError(f"{path}: the top level must be a JSON object")
    if document.get("format") != file_format:
        raise KeyFileError(f"{path}: not an '{file_format}' file")
    if document.get("version") != version:
        raise KeyFileError(f"{path}: unsupported version, expected {version}")
    return document


def parse_index_field(path: str | os.PathLike[str], name: str) -> int:
    if not _INDEX_NAME.fullmatch(name):
        raise KeyFileError(f"{path}: key index must be 1..8")
    return int(name)


def parse_key_field(path: str | os.PathLike[str], field: str, value: object) -> bytes:
    if not isinstance(value, str) or not _HEX_KEY.fullmatch(value):
        raise KeyFileError(f"{path}: {field} must be 16 hex digits")
    return bytes.fromhex(value)


def parse_key_material(text: str) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """Parse ``iscl card init`` key input into (auth keys, enc keys).

    One key per line, ``auth.N = <16 hex digits>`` or ``enc.N = ...`` with
    N in 1..8; ``#`` starts a comment; blank lines are ignored.  Errors name
    the line number, never its text.
    """
    found: dict[str, dict[int, bytes]] = {"auth": {}, "enc": {}}
    for number, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        kind, index, key = _parse_key_line(number, content)
        if index in found[kind]:
            raise ConfigError(f"line {number}: {kind}.{index} is given twice")
        found[kind][index] = key
    return found["auth"], found["enc"]


def _parse_key_line(number: int, content: str) -> tuple[str, int, bytes]:
    match = _KEY_LINE.fullmatch(content)
    if match is None:
        raise ConfigError(
            f"line {number}: expected 'auth.N = <16 hex digits>' "
            "or 'enc.N = <16 hex digits>'"
        )
    kind, digits, value = match.groups()
    index = int(digits)
    if index not in KEY_INDEXES:
        raise ConfigError(f"line {number}: key index must be 1..8")
    if not _HEX_KEY.fullmatch(value):
        raise ConfigError(f"line {number}: {kind}.{index} must be 16 hex digits")
    return kind, index, bytes.fromhex(value)
