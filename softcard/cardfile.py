"""The software card's state on disk: keys, retry counters and PIN hash.

A card file is JSON, mode 0600, written atomically::

    {
      "format": "iscl-softcard", "version": 1, "aid": "F06973636C0001",
      "keys": {"1": {"key": "<16 hex>", "max_retries": 3, "remaining": 3}},
      "pin": null | {"salt": "<hex>", "hash": "<hex>", "iterations": 100000,
                     "max_retries": 3, "remaining": 3},
      "profile": "plain"
    }

``profile`` names how the card behaves on a reader (see
:mod:`softcard.profiles`): ``plain``, ``t0-getresponse``, ``wrong-le`` or
``no-extended``.  It is optional: a file without it is a ``plain`` card.

The PIN is kept only as a salted PBKDF2-HMAC-SHA256 hash.  The iteration
count is modest on purpose: the authentication keys sit in the same file
in clear, so the hash guards nothing the file does not already reveal; the
PIN's protection is the card's retry counter.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from iscl_hw.card import ISCL_AID
from iscl_hw.constants import KEY_INDEXES, KEY_LENGTH
from iscl_hw.errors import ConfigError, KeyFileError
from iscl_hw.keyfile import (
    load_json_document,
    parse_index_field,
    parse_key_field,
    write_private_file,
)

__all__ = [
    "CARD_FILE_FORMAT",
    "CARD_PROFILES",
    "DEFAULT_PROFILE",
    "CardState",
    "KeySlot",
    "PinRecord",
    "create_card_file",
    "load_card_file",
    "save_card_file",
]

CARD_FILE_FORMAT: Final = "iscl-softcard"
_VERSION: Final = 1
# Ten times the default: still well under a second per VERIFY here.
MAX_PIN_ITERATIONS: Final = 1_000_000
PIN_ITERATIONS: Final = 100_000
_SALT_LENGTH: Final = 16
# 63Cx carries the retries left in one nibble (ISO/IEC 7816-4 5.6).
_MAX_RETRIES_LIMIT: Final = 15
DEFAULT_PROFILE: Final = "plain"
#: Card behaviours a card file may ask for (implemented in softcard.profiles).
CARD_PROFILES: Final = ("plain", "t0-getresponse", "wrong-le", "no-extended")

StrPath: TypeAlias = str | os.PathLike[str]


@dataclass
class KeySlot:
    """One authentication key with its retry counter."""

    key: bytes = field(repr=False)
    max_retries: int = 3
    remaining: int = 3

    @property
    def blocked(self) -> bool:
        return self.remaining == 0


@dataclass
class PinRecord:
    """A PIN's salted hash and retry counter (never the PIN)."""

    salt: bytes = field(repr=False)
    digest: bytes = field(repr=False)
    iterations: int = PIN_ITERATIONS
    max_retries: int = 3
    remaining: int = 3

    @classmethod
    def new(cls, pin: bytes, max_retries: int) -> PinRecord:
        salt = secrets.token_bytes(_SALT_LENGTH)
        digest = _hash_pin(pin, salt, PIN_ITERATIONS)
        return cls(salt, digest, PIN_ITERATIONS, max_retries, max_retries)

    @property
    def blocked(self) -> bool:
        return self.remaining == 0

    def matches(self, pin: bytes) -> bool:
        return hmac.compare_digest(
            _hash_pin(pin, self.salt, self.iterations), self.digest
        )


def _hash_pin(pin: bytes, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", pin, salt, iterations)


@dataclass
class CardState:
    """Everything a software card remembers across power cycles."""

    keys: dict[int, KeySlot]
    aid: bytes = ISCL_AID
    pin: PinRecord | None = None
    version: int = _VERSION
    profile: str = DEFAULT_PROFILE


def _check_max_retries(max_retries: int) -> None:
    if not 1 <= max_retries <= _MAX_RETRIES_LIMIT:
        raise ConfigError(f"max retries must be 1..{_MAX_RETRIES_LIMIT}")


def _check_profile(profile: str) -> None:
    if profile not in CARD_PROFILES:
        raise ConfigError(f"card profile must be one of {', '.join(CARD_PROFILES)}")


def new_card_state(
    auth_keys: Mapping[int, bytes],
    *,
    pin: bytes | None = None,
    max_retries: int = 3,
    aid: bytes = ISCL_AID,
    profile: str = DEFAULT_PROFILE,
) -> CardState:
    """Build a fresh card state with full retry counters."""
    _check_max_retries(max_retries)
    _check_profile(profile)
    if not auth_keys:
        raise ConfigError("a card needs at least one authentication key")
    keys = {}
    for index, key in sorted(auth_keys.items()):
        if index not in KEY_INDEXES:
            raise ConfigError(f"key index must be 1..8, got {index}")
        if not isinstance(key, bytes) or len(key) != KEY_LENGTH:
            raise ConfigError(f"authentication key {index} must be 8 bytes")
        keys[index] = KeySlot(key, max_retries, max_retries)
    if pin is not None and not 1 <= len(pin) <= 255:
        raise ConfigError("a PIN is 1..255 bytes")
    record = PinRecord.new(pin, max_retries) if pin is not None else None
    return CardState(keys, aid, record, profile=profile)


def create_card_file(
    path: StrPath,
    auth_keys: Mapping[int, bytes],
    *,
    pin: bytes | None = None,
    max_retries: int = 3,
    overwrite: bool = False,
    aid: bytes = ISCL_AID,
    profile: str = DEFAULT_PROFILE,
) -> None:
    """Write a new card file; refuse to replace one unless ``overwrite``."""
    state = new_card_state(
        auth_keys, pin=pin, max_retries=max_retries, aid=aid, profile=profile
    )
    write_private_file(path, _encode(state), overwrite)


def save_card_file(path: StrPath, state: CardState) -> None:
    """Replace the card file with ``state`` (atomically, mode 0600)."""
    write_private_file(path, _encode(state), overwrite=True)


def _encode(state: CardState) -> bytes:
    document: dict[str, object] = {
        "format": CARD_FILE_FORMAT,
        "version": state.version,
        "aid": state.aid.hex().upper(),
        "keys": {
            str(index): {
                "key": slot.key.hex().upper(),
                "max_retries": slot.max_retries,
                "remaining": slot.remaining,
            }
            for index, slot in sorted(state.keys.items())
        },
        "pin": None if state.pin is None else _encode_pin(state.pin),
        "profile": state.profile,
    }
    return json.dumps(document, indent=2).encode() + b"\n"


def _encode_pin(pin: PinRecord) -> dict[str, object]:
    return {
        "salt": pin.salt.hex(),
        "hash": pin.digest.hex(),
        "iterations": pin.iterations,
        "max_retries": pin.max_retries,
        "remaining": pin.remaining,
    }


def load_card_file(path: StrPath) -> CardState:
    """Load and validate a card file; raise :class:`KeyFileError` if unsafe."""
    document = load_json_document(path, CARD_FILE_FORMAT, _VERSION)
    aid = _hex_field(path, "aid", document.get("aid"))
    if not 5 <= len(aid) <= 16:
        raise KeyFileError(f"{path}: aid must be 5..16 bytes")
    entries = document.get("keys")
    if not isinstance(entries, dict) or not entries:
        raise KeyFileError(f"{path}: 'keys' must be a non-empty object")
    keys = {
        parse_index_field(path, name): _decode_slot(path, name, entry)
        for name, entry in entries.items()
    }
    pin_entry = document.get("pin")
    pin = None if pin_entry is None else _decode_pin(path, pin_entry)
    profile = _profile_field(path, document.get("profile", DEFAULT_PROFILE))
    return CardState(dict(sorted(keys.items())), aid, pin, _VERSION, profile)


def _profile_field(path: StrPath, value: object) -> str:
    if not isinstance(value, str) or value not in CARD_PROFILES:
        raise KeyFileError(f"{path}: profile must be one of {', '.join(CARD_PROFILES)}")
    return value


def _decode_slot(path: StrPath, name: str, entry: object) -> KeySlot:
    if not isinstance(entry, dict):
        raise KeyFileError(f"{path}: keys.{name} must be an object")
    key = parse_key_field(path, f"keys.{name}.key", entry.get("key"))
    max_retries, remaining = _counters(path, f"keys.{name}", entry)
    return KeySlot(key, max_retries, remaining)


def _decode_pin(path: StrPath, entry: object) -> PinRecord:
    if not isinstance(entry, dict):
        raise KeyFileError(f"{path}: 'pin' must be an object or null")
    salt = _hex_field(path, "pin.salt", entry.get("salt"))
    digest = _hex_field(path, "pin.hash", entry.get("hash"))
    if len(digest) != hashlib.sha256().digest_size or not salt:
        raise KeyFileError(f"{path}: pin.salt or pin.hash has a wrong length")
    iterations = _int_field(path, "pin.iterations", entry.get("iterations"))
    if not 1 <= iterations <= MAX_PIN_ITERATIONS:
        raise KeyFileError(
            f"{path}: pin.iterations must be 1..{MAX_PIN_ITERATIONS} "
            f"(a VERIFY would take too long), got {iterations}"
        )
    max_retries, remaining = _counters(path, "pin", entry)
    return PinRecord(salt, digest, iterations, max_retries, remaining)


def _counters(path: StrPath, where: str, entry: dict[str, object]) -> tuple[int, int]:
    max_retries = _int_field(path, f"{where}.max_retries", entry.get("max_retries"))
    remaining = _int_field(path, f"{where}.remaining", entry.get("remaining"))
    if not 1 <= max_retries <= _MAX_RETRIES_LIMIT:
        raise KeyFileError(f"{path}: {where}.max_retries must be 1..15")
    if not 0 <= remaining <= max_retries:
        raise KeyFileError(f"{path}: {where}.remaining must be 0..max_retries")
    return max_retries, remaining


def _int_field(path: StrPath, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise KeyFileError(f"{path}: {name} must be an integer")
    return value


def _hex_field(path: StrPath, name: str, value: object) -> bytes:
    try:
        if not isinstance(value, str):
            raise ValueError(name)
        return bytes.fromhex(value)
    except ValueError:
        raise KeyFileError(f"{path}: {name} must be a hex string") from None
