"""Settings of one ISCL endpoint.

Every choice the public record leaves open is a field here, so a site can
match a real peer; the defaults and their reasons are in
``docs/protocol.md``.  Keys are not settings: they come from a key provider.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from iscl_hw.constants import (
    AUTH_DATA_MAX,
    AUTH_DATA_MIN,
    DEFAULT_MAX_BLOCK_LENGTH,
    DEFAULT_MAX_MESSAGE_LENGTH,
    KEY_INDEXES,
    MIN_BLOCK_LENGTH,
    UNIQUE_SESSION_KEYS,
    VERSION_V1_00,
    EncryptionMethod,
    MacMethod,
)
from iscl_hw.crypto import Padding
from iscl_hw.errors import ConfigError
from iscl_hw.wire import ByteOrder

if TYPE_CHECKING:
    from iscl_hw.secure import MessageKey

__all__ = ["ChainStart", "IvPolicy", "KeyProvider", "MacKeyPolicy", "Settings"]

log = logging.getLogger(__name__)

_U32_MAX = 0xFFFFFFFF


class IvPolicy(enum.Enum):
    """How each direction's DES-CBC chain runs over messages (not public)."""

    #: One chain per direction from its start (see ChainStart), continued
    #: over the MAC and over later messages (LEADTOOLS' build flags).
    CHAINED = "chained"
    #: Every message starts again at the chain's start, continued over its
    #: MAC; a message can then be repeated within a session undetected.
    PER_MESSAGE = "per-message"


class ChainStart(enum.Enum):
    """Where each direction's DES-CBC chain starts after authentication."""

    #: At the challenge the receiving side issued in this handshake
    #: (client to server: the server's challenge; server to client: the
    #: client's), so a message recorded in another session does not decrypt
    #: to the same plaintext and fails its MAC.
    CHALLENGES = "challenges"
    #: At zero, as LEADTOOLS does; messages can then be replayed from one
    #: session into another.
    ZERO = "zero"


class MacKeyPolicy(enum.Enum):
    """Which key DESMAC uses (not public)."""

    #: The encryption key XOR F0F0F0F0F0F0F0F0, so the CBC-MAC never equals
    #: a ciphertext block of the same message.
    VARIANT = "variant"
    #: The encryption key itself, as LEADTOOLS' "default key".  Forgeable
    #: when the CBC chain starts at zero (docs/protocol.md).
    SAME = "same"


class KeyProvider(Protocol):
    """Encryption keys 1..8: 8 DES key bytes, or a key that stays in a token.
    ``get`` raises ConfigError if the key is absent."""

    def get(self, index: int) -> bytes | MessageKey: ...

    def __contains__(self, index: object) -> bool: ...


def _check_index(name: str, value: int, allowed: range | tuple[int, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, not {value}")


@dataclass(frozen=True)
class Settings:
    """One endpoint's protocol settings (the same class for both roles)."""

    byte_order: ByteOrder = ByteOrder.BIG
    version: int = VERSION_V1_00
    max_block_length: int = DEFAULT_MAX_BLOCK_LENGTH
    max_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH

    # Mutual authentication.  The server requests auth_key_index; a client
    # answers only for an index it accepts.
    auth_key_index: int = 1
    accepted_auth_key_indexes: frozenset[int] = frozenset(KEY_INDEXES)
    auth_data: bytes = b"iscl"

    # What this side sends.
    encryption: EncryptionMethod = EncryptionMethod.DES_CBC
    mac: MacMethod = MacMethod.MD5
    encryption_key_index: int = 1
    session_key_base_index: int = 1
    padding: Padding = Padding.PKCS5
    iv_policy: IvPolicy = IvPolicy.CHAINED
    chain_start: ChainStart = ChainStart.CHALLENGES
    mac_key_policy: MacKeyPolicy = MacKeyPolicy.VARIANT

    # What this side accepts as a receiver.
    require_encryption: bool = True
    allow_no_mac: bool = False
    allow_unencrypted_md5: bool = False
    allow_through_mode: bool = False
    refuse_disconnection: bool = False

    random_bytes: Callable[[int], bytes] = field(default=os.urandom, repr=False)

    def __post_init__(self) -> None:
        if not MIN_BLOCK_LENGTH <= self.max_block_length <= _U32_MAX:
            raise ConfigError(
                f"max_block_length must be {MIN_BLOCK_LENGTH}..{_U32_MAX}, "
                f"not {self.max_block_length}"
            )
        if not 1 <= self.max_message_length <= _U32_MAX - 8:
            raise ConfigError("max_message_length must be 1..4294967287")
        if not AUTH_DATA_MIN <= len(self.auth_data) <= AUTH_DATA_MAX:
            raise ConfigError(
                f"auth_data must be {AUTH_DATA_MIN}..{AUTH_DATA_MAX} bytes, "
                f"not {len(self.auth_data)}"
            )
        _check_index("auth_key_index", self.auth_key_index, KEY_INDEXES)
        for index in self.accepted_auth_key_indexes:
            _check_index("accepted_auth_key_indexes", index, KEY_INDEXES)
        _check_index(
            "encryption_key_index",
            self.encryption_key_index,
            (*KEY_INDEXES, UNIQUE_SESSION_KEYS),
        )
        _check_index("session_key_base_index", self.session_key_base_index, KEY_INDEXES)
        if self.padding is Padding.ISO9797_M1:
            raise ConfigError("padding method 1 cannot be removed; use PKCS5 or M2")
        self._warn_relaxed()

    def _warn_relaxed(self) -> None:
        if not self.require_encryption:
            log.warning("policy: unencrypted (DESMAC only) messages are accepted")
        if self.allow_no_mac:
            log.warning("policy: messages without a MAC are accepted")
        if self.allow_unencrypted_md5:
            log.warning("policy: unencrypted MD5 (no integrity) is accepted")
        if self.allow_through_mode:
            log.warning("policy: through-mode (unsecured) messages are accepted")

    def refusal_of(self, encryption: int, mac: int) -> str | None:
        """Why this side, as a receiver, refuses the methods, or None."""
        if encryption not in EncryptionMethod._value2member_map_:
            return f"unknown encryption method 0x{encryption:X}"
        if mac not in MacMethod._value2member_map_:
            return f"unknown MAC method 0x{mac:X}"
        if mac == MacMethod.NONE and not self.allow_no_mac:
            return "a message without a MAC"
        if encryption == EncryptionMethod.NONE:
            if mac == MacMethod.MD5 and not self.allow_unencrypted_md5:
                return "unencrypted MD5, which gives no integrity"
            if self.require_encryption:
                return "an unencrypted message"
        return None
