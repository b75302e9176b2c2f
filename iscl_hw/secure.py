"""Protection of one ISCL message: DES-CBC, the MAC and its encryption.

Public record (PS3.15 B.2, LEADTOOLS): privacy is DES-CBC; integrity is
DESMAC (ISO 8730) or MD5 encrypted with DES; the MAC is encrypted "with the
same mode as the data"; padding always adds 1..8 bytes.  Our choices (MAC
over the plaintext, the padding, the IV policy, the DESMAC key variant and
the session-key derivation) are in ``docs/protocol.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from iscl_hw import crypto
from iscl_hw.constants import EncryptionMethod, ErrorCode, MacMethod
from iscl_hw.crypto import BLOCK_SIZE, Padding
from iscl_hw.errors import IntegrityError
from iscl_hw.settings import IvPolicy, MacKeyPolicy

__all__ = [
    "ChainState",
    "MessageKey",
    "Protection",
    "SoftwareKey",
    "body_length",
    "derive_session_key",
    "mac_field_length",
]

_ZERO_IV = bytes(BLOCK_SIZE)
_MAC_LENGTHS = {MacMethod.NONE: 0, MacMethod.MD5: 16, MacMethod.DESMAC: 8}


class MessageKey(Protocol):
    """A DES key that protects messages, held in software or in a token.

    Every operation a message needs runs through it, so a token key never
    leaves the token.
    """

    def cbc_encrypt(self, iv: bytes, data: bytes) -> bytes:
        """DES-CBC of block-aligned ``data``."""
        ...

    def cbc_decrypt(self, iv: bytes, data: bytes) -> bytes:
        """Inverse of :meth:`cbc_encrypt`."""
        ...

    def cbc_mac(self, data: bytes) -> bytes:
        """DESMAC: ISO/IEC 9797-1 MAC algorithm 1, padding method 1."""
        ...

    def mac_variant(self) -> MessageKey:
        """This key XOR F0F0F0F0F0F0F0F0 (MacKeyPolicy.VARIANT)."""
        ...

    def derive(self, random: bytes) -> MessageKey:
        """The session key for ``random`` with this key as the base (0x10)."""
        ...

    def discard(self) -> None:
        """Destroy a derived key once its message is done (a token object)."""
        ...


class SoftwareKey:
    """A :class:`MessageKey` held in memory, computed with ``cryptography``.

    ``variant`` is the DESMAC key of :meth:`mac_variant`; a derived session
    key carries the variant derived from its base's variant (see
    ``docs/protocol.md``, so that a token can derive both).
    """

    __slots__ = ("_key", "_variant")

    def __init__(self, key: bytes, variant: bytes | None = None) -> None:
        self._key = crypto.check_key(key)
        if variant is None:
            variant = crypto.key_variant(key, crypto.MAC_KEY_VARIANT_MASK)
        self._variant = crypto.check_key(variant)

    def __repr__(self) -> str:
        return "<SoftwareKey>"

    def cbc_encrypt(self, iv: bytes, data: bytes) -> bytes:
        return crypto.des_cbc_encrypt(self._key, iv, data)

    def cbc_decrypt(self, iv: bytes, data: bytes) -> bytes:
        return crypto.des_cbc_decrypt(self._key, iv, data)

    def cbc_mac(self, data: bytes) -> bytes:
        return crypto.cbc_mac(self._key, data, Padding.ISO9797_M1)

    def mac_variant(self) -> SoftwareKey:
        return SoftwareKey(self._variant)

    def derive(self, random: bytes) -> SoftwareKey:
        return SoftwareKey(
            derive_session_key(self._key, random),
            derive_session_key(self._variant, random),
        )

    def discard(self) -> None:
        return


@dataclass
class ChainState:
    """The DES-CBC chain of one direction.

    ``start`` is where a chain begins (the first message's with
    IvPolicy.CHAINED, every message's with PER_MESSAGE); ``iv`` is where the
    next message continues.
    """

    start: bytes = _ZERO_IV
    iv: bytes = _ZERO_IV

    def restart_at(self, iv: bytes) -> None:
        self.start = self.iv = iv


@dataclass(frozen=True)
class Protection:
    """How one message is protected: methods, key and our policies."""

    encryption: EncryptionMethod
    mac: MacMethod
    key: MessageKey | None
    padding: Padding
    iv_policy: IvPolicy
    mac_key_policy: MacKeyPolicy

    def __repr__(self) -> str:
        return (
            f"Protection({self.encryption.name}, {self.mac.name}, "
            f"key={'<set>' if self.key else None})"
        )

    @property
    def needs_key(self) -> bool:
        return self.encryption is EncryptionMethod.DES_CBC or (
            self.mac is MacMethod.DESMAC
        )

    def seal(self, data: bytes, chain: ChainState) -> tuple[bytes, bytes]:
        """The body (ciphertext or plaintext) and the MAC field of ``data``."""
        mac = self._compute_mac(data)
        if self.encryption is EncryptionMethod.NONE:
            return data, mac

        key = self._key()
        iv = self._start_iv(chain)
        body = key.cbc_encrypt(iv, crypto.pad(data, self.padding))
        iv = body[-BLOCK_SIZE:]
        if mac:
            mac = key.cbc_encrypt(iv, crypto.pad(mac, self.padding))
            iv = mac[-BLOCK_SIZE:]
        chain.iv = iv
        return body, mac

    def open(self, body: bytes, mac_field: bytes, chain: ChainState) -> bytes:
        """The plaintext of a whole received message, or IntegrityError.

        A padding failure and a MAC failure take the same path and raise
        the same class; only ``code`` tells them apart, for the local log.
        """
        if self.encryption is EncryptionMethod.NONE:
            self._verify_mac(body, mac_field, padding_ok=True)
            return body

        key = self._key()
        padded = key.cbc_decrypt(self._start_iv(chain), body)
        mac_padded = b""
        if mac_field:
            mac_padded = key.cbc_decrypt(body[-BLOCK_SIZE:], mac_field)
        chain.iv = (mac_field or body)[-BLOCK_SIZE:]

        data, padding_ok = self._unpad(padded)
        if self.mac is MacMethod.NONE:
            if not padding_ok:
                raise IntegrityError(
                    "message failed its padding check", ErrorCode.DECRYPT
                )
            return data
        received, mac_padding_ok = self._unpad(mac_padded)
        self._verify_mac(data, received, padding_ok and mac_padding_ok)
        return data

    def _unpad(self, padded: bytes) -> tuple[bytes, bool]:
        try:
            return crypto.unpad(padded, self.padding), True
        except crypto.PaddingError:
            return padded, False

    def _verify_mac(self, data: bytes, received: bytes, padding_ok: bool) -> None:
        expected = self._compute_mac(data)
        mac_ok = crypto.constant_time_equal(expected, received)
        if not padding_ok:
            raise IntegrityError(
                "message failed its integrity check", ErrorCode.DECRYPT
            )
        if not mac_ok:
            raise IntegrityError(
                "message failed its integrity check", ErrorCode.BAD_MAC
            )

    def _compute_mac(self, data: bytes) -> bytes:
        if self.mac is MacMethod.MD5:
            return crypto.md5(data)
        if self.mac is MacMethod.DESMAC:
            return self._mac_key().cbc_mac(data)
        return b""

    def _mac_key(self) -> MessageKey:
        key = self._key()
        if self.mac_key_policy is MacKeyPolicy.VARIANT:
            return key.mac_variant()
        return key

    def _key(self) -> MessageKey:
        if self.key is None:
            raise ValueError("this protection needs a key")
        return self.key

    def _start_iv(self, chain: ChainState) -> bytes:
        if self.iv_policy is IvPolicy.PER_MESSAGE:
            return chain.start
        return chain.iv


def body_length(length: int, encryption: EncryptionMethod, padding: Padding) -> int:
    """Bytes of data notifications carrying a ``length``-byte message."""
    if encryption is EncryptionMethod.NONE:
        return length
    return crypto.padded_length(length, padding)


def mac_field_length(
    encryption: EncryptionMethod, mac: MacMethod, padding: Padding
) -> int:
    """Bytes of the MAC transmission notification (0: none is sent)."""
    raw = _MAC_LENGTHS[mac]
    if raw == 0 or encryption is EncryptionMethod.NONE:
        return raw
    return crypto.padded_length(raw, padding)


def derive_session_key(base_key: bytes, random: bytes) -> bytes:
    """Key for UNIQUE_SESSION_KEYS (0x10): parity(DES-ECB(K_base, R)).

    Our choice, after the ISO/IEC 11770-2 key-derivation pattern; the ISCL
    derivation is not public.  A token computes the same value with
    DES3_ECB_ENCRYPT_DATA on K‖K‖K, which sets the parity too.
    """
    return crypto.fix_parity(crypto.des_ecb_encrypt(base_key, random))
