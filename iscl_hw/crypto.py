"""DES, DES-CBC, DES CBC-MAC and MD5 as ISCL uses them.

Single DES (FIPS 46-3) runs as TripleDES with the key ``K || K || K``:
encrypt-decrypt-encrypt with one key equals one DES encryption, and the
24-byte key is the only form ``cryptography`` accepts without a warning.

No function here logs, and no exception message or ``repr`` contains, key
material or message data.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from typing import Final

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, modes

__all__ = [
    "BLOCK_SIZE",
    "MAC_KEY_VARIANT_MASK",
    "MD5_DIGEST_SIZE",
    "AlreadyFinalized",
    "CbcDecryptor",
    "CbcEncryptor",
    "CbcMac",
    "InvalidMac",
    "Md5Stream",
    "Padding",
    "PaddingError",
    "cbc_mac",
    "check_key",
    "constant_time_equal",
    "des_cbc_decrypt",
    "des_cbc_encrypt",
    "des_ecb_decrypt",
    "des_ecb_encrypt",
    "fix_parity",
    "key_variant",
    "md5",
    "pad",
    "padded_length",
    "unpad",
]

BLOCK_SIZE: Final = 8
MD5_DIGEST_SIZE: Final = 16

# XOR mask that turns a session key into the separate DESMAC key.  Each
# byte has four bits set, so the variant keeps the key's DES parity.
MAC_KEY_VARIANT_MASK: Final = bytes.fromhex("F0F0F0F0F0F0F0F0")


class Padding(enum.Enum):
    """Block padding to the 8-byte DES block."""

    #: PKCS #5 (RFC 8018 section 6.1.1): 1..8 bytes, each the pad length.
    PKCS5 = "pkcs5"
    #: ISO/IEC 9797-1 method 1: zeros to a block multiple, nothing if
    #: aligned, one zero block for empty data.  For MACs only: not removable.
    ISO9797_M1 = "iso9797-1-m1"
    #: ISO/IEC 9797-1 method 2: 0x80, then zeros to a block multiple.
    ISO9797_M2 = "iso9797-1-m2"


class PaddingError(ValueError):
    """Padded data is malformed.  The message never includes the data."""


# The two names below follow cryptography.exceptions, hence no Error suffix.
class AlreadyFinalized(Exception):
    """A streaming object was used after ``finalize()`` or ``verify()``."""


class InvalidMac(Exception):
    """A MAC did not match."""


# ---------------------------------------------------------------- padding


def _pad_suffix(n: int, padding: Padding) -> bytes:
    """The bytes that ``padding`` appends to ``n`` bytes of data."""
    fill = -n % BLOCK_SIZE
    if padding is Padding.PKCS5:
        fill = fill or BLOCK_SIZE
        return bytes((fill,)) * fill
    if padding is Padding.ISO9797_M2:
        return b"\x80" + bytes(-(n + 1) % BLOCK_SIZE)
    if padding is Padding.ISO9797_M1:
        return bytes(BLOCK_SIZE if n == 0 else fill)
    raise TypeError("padding must be a Padding member")


def padded_length(n: int, padding: Padding) -> int:
    """Length of ``pad()`` applied to ``n`` bytes."""
    if n < 0:
        raise ValueError("length must not be negative")
    return n + len(_pad_suffix(n, padding))


def pad(data: bytes, padding: Padding) -> bytes:
    """Return ``data`` padded to a multiple of :data:`BLOCK_SIZE`."""
    return b"".join((data, _pad_suffix(len(data), padding)))


def unpad(data: bytes, padding: Padding) -> bytes:
    """Remove PKCS #5 or ISO/IEC 9797-1 method 2 padding.

    Raises :class:`PaddingError` if the padding is malformed, and
    :class:`ValueError` for method 1, whose padding cannot be told apart
    from trailing zero data.
    """
    if padding is Padding.ISO9797_M1:
        raise ValueError("cannot remove ISO/IEC 9797-1 method 1 padding")
    if not isinstance(padding, Padding):
        raise TypeError("padding must be a Padding member")
    if not data or len(data) % BLOCK_SIZE:
        raise PaddingError("padded data is not a non-empty block multiple")
    if padding is Padding.PKCS5:
        return data[: len(data) - _pkcs5_length(data[-BLOCK_SIZE:])]
    return data[: len(data) - _m2_length(data[-BLOCK_SIZE:])]


def _pkcs5_length(last_block: bytes) -> int:
    count = last_block[-1]
    if not 1 <= count <= BLOCK_SIZE or last_block[-count:] != bytes((count,)) * count:
        raise PaddingError("invalid PKCS #5 padding")
    return count


def _m2_length(last_block: bytes) -> int:
    kept = last_block.rstrip(b"\x00")
    if not kept or kept[-1] != 0x80:
        raise PaddingError("invalid ISO/IEC 9797-1 method 2 padding")
    return BLOCK_SIZE - len(kept) + 1


# ------------------------------------------------------------------- keys


def check_key(key: bytes) -> bytes:
    """Return ``key`` if it is an 8-byte DES key (parity is not checked)."""
    if not isinstance(key, bytes):
        raise TypeError(f"DES key must be bytes, not {type(key).__name__}")
    if len(key) != BLOCK_SIZE:
        raise ValueError(f"DES key must be {BLOCK_SIZE} bytes, not {len(key)}")
    return key


def _check_iv(iv: bytes) -> bytes:
    if not isinstance(iv, bytes):
        raise TypeError(f"IV must be bytes, not {type(iv).__name__}")
    if len(iv) != BLOCK_SIZE:
        raise ValueError(f"IV must be {BLOCK_SIZE} bytes, not {len(iv)}")
    return iv


def _check_aligned(data: bytes) -> None:
    if len(data) % BLOCK_SIZE:
        raise ValueError(f"data length must be a multiple of {BLOCK_SIZE}")


# FIPS 46-3: the low bit of each key byte makes the byte's parity odd.
_ODD_PARITY: Final = bytes((b & 0xFE) | (~(b >> 1).bit_count() & 1) for b in range(256))


def fix_parity(key: bytes) -> bytes:
    """Return ``key`` with each byte's low bit set for odd parity."""
    return check_key(key).translate(_ODD_PARITY)


#: The 4 weak and 12 semi-weak DES keys (FIPS 74, 3.6), with odd parity.
_WEAK_KEYS: Final = frozenset(
    bytes.fromhex(k)
    for k in (
        "0101010101010101 FEFEFEFEFEFEFEFE E0E0E0E0F1F1F1F1 1F1F1F1F0E0E0E0E "
        "011F011F010E010E 1F011F010E010E01 01E001E001F101F1 E001E001F101F101 "
        "01FE01FE01FE01FE FE01FE01FE01FE01 1FE01FE00EF10EF1 E01FE01FF10EF10E "
        "1FFE1FFE0EFE0EFE FE1FFE1FFE0EFE0E E0FEE0FEF1FEF1FE FEE0FEE0FEF1FEF1"
    ).split()
)


def is_weak_key(key: bytes) -> bool:
    """True for a DES weak or semi-weak key (parity bits ignored)."""
    return fix_parity(check_key(key)) in _WEAK_KEYS


def key_variant(key: bytes, mask: bytes) -> bytes:
    """Return ``key`` XOR ``mask``, byte by byte."""
    check_key(key)
    if not isinstance(mask, bytes):
        raise TypeError(f"mask must be bytes, not {type(mask).__name__}")
    if len(mask) != BLOCK_SIZE:
        raise ValueError(f"mask must be {BLOCK_SIZE} bytes, not {len(mask)}")
    value = int.from_bytes(key, "big") ^ int.from_bytes(mask, "big")
    return value.to_bytes(BLOCK_SIZE, "big")


def _des(key: bytes) -> TripleDES:
    return TripleDES(check_key(key) * 3)


def _cbc_encryptor(key: bytes, iv: bytes) -> CipherContext:
    return Cipher(_des(key), modes.CBC(_check_iv(iv))).encryptor()


def _cbc_decryptor(key: bytes, iv: bytes) -> CipherContext:
    return Cipher(_des(key), modes.CBC(_check_iv(iv))).decryptor()


# -------------------------------------------------------------- one-shot


def des_ecb_encrypt(key: bytes, data: bytes) -> bytes:
    """DES in ECB mode (FIPS 81); ``data`` must be block aligned."""
    _check_aligned(data)
    context = Cipher(_des(key), modes.ECB()).encryptor()
    return context.update(data) + context.finalize()


def des_ecb_decrypt(key: bytes, data: bytes) -> bytes:
    """Inverse of :func:`des_ecb_encrypt`."""
    _check_aligned(data)
    context = Cipher(_des(key), modes.ECB()).decryptor()
    return context.update(data) + context.finalize()


def des_cbc_encrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    """DES in CBC mode (FIPS 81) without padding; ``data`` block aligned."""
    _check_aligned(data)
    context = _cbc_encryptor(key, iv)
    return context.update(data) + context.finalize()


def des_cbc_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    """Inverse of :func:`des_cbc_encrypt`."""
    _check_aligned(data)
    context = _cbc_decryptor(key, iv)
    return context.update(data) + context.finalize()


def cbc_mac(
    key: bytes,
    data: bytes,
    padding: Padding = Padding.ISO9797_M1,
    iv: bytes = bytes(BLOCK_SIZE),
) -> bytes:
    """8-byte DES CBC-MAC of ``data``.

    ISO/IEC 9797-1 MAC algorithm 1 with output transformation 1 (the same
    as ISO 8731-1 and the FIPS 113 Data Authentication Algorithm).
    """
    mac = CbcMac(key, padding=padding, iv=iv)
    mac.update(data)
    return mac.finalize()


def md5(data: bytes) -> bytes:
    """MD5 digest of ``data`` (RFC 1321)."""
    return hashlib.md5(data).digest()


def constant_time_equal(a: bytes, b: bytes) -> bool:
    """Compare two byte strings in time independent of their contents."""
    return hmac.compare_digest(a, b)


# ------------------------------------------------------------- streaming


class _CbcStream:
    """Shared state of the streaming DES-CBC classes.

    The ``cryptography`` context buffers a partial block itself; this class
    only tracks the stream position and the block that continues the chain.
    """

    __slots__ = ("_context", "_next_iv", "_pending")

    def __init__(self, context: CipherContext, iv: bytes) -> None:
        self._context: CipherContext | None = context
        self._next_iv = iv
        self._pending = 0

    @property
    def next_iv(self) -> bytes:
        """The last whole ciphertext block so far, or the start IV."""
        return self._next_iv

    def _live(self) -> CipherContext:
        if self._context is None:
            raise AlreadyFinalized("context was already finalized")
        return self._context

    def finalize(self) -> bytes:
        """End the stream, which must end on a block boundary."""
        context = self._live()
        self._context = None
        if self._pending:
            raise ValueError(f"data length is not a multiple of {BLOCK_SIZE}")
        return context.finalize()


class CbcEncryptor(_CbcStream):
    """Streaming DES-CBC encryption without padding.

    ``update()`` takes pieces of any size and returns the whole blocks
    encrypted so far.  ``next_iv`` is the last ciphertext block returned.
    """

    __slots__ = ()

    def __init__(self, key: bytes, iv: bytes) -> None:
        super().__init__(_cbc_encryptor(key, iv), iv)

    def update(self, data: bytes) -> bytes:
        """Encrypt ``data``; return the ciphertext of each completed block."""
        out = self._live().update(data)
        self._pending = (self._pending + len(data)) % BLOCK_SIZE
        if out:
            self._next_iv = out[-BLOCK_SIZE:]
        return out


class CbcDecryptor(_CbcStream):
    """Streaming DES-CBC decryption without padding.

    ``update()`` takes pieces of any size and returns the plaintext of each
    completed block.  ``next_iv`` is the last whole ciphertext block taken.
    """

    __slots__ = ("_tail",)

    def __init__(self, key: bytes, iv: bytes) -> None:
        super().__init__(_cbc_decryptor(key, iv), iv)
        self._tail = b""

    def update(self, data: bytes) -> bytes:
        """Decrypt ``data``; return the plaintext of each completed block."""
        out = self._live().update(data)
        self._track(data)
        return out

    def _track(self, data: bytes) -> None:
        # _tail holds the ciphertext bytes of the incomplete block.
        total = len(self._tail) + len(data)
        if total < BLOCK_SIZE:
            self._tail += bytes(data)
        else:
            end = len(data) - total % BLOCK_SIZE
            if end >= BLOCK_SIZE:
                self._next_iv = bytes(data[end - BLOCK_SIZE : end])
            else:  # the block straddles _tail and data
                self._next_iv = self._tail + bytes(data[:end])
            self._tail = bytes(data[end:])
        self._pending = len(self._tail)


class CbcMac:
    """Streaming form of :func:`cbc_mac`.

    Implemented as DES-CBC encryption that keeps only the last ciphertext
    block (ISO/IEC 9797-1 MAC algorithm 1, output transformation 1).
    """

    __slots__ = ("_context", "_last", "_length", "_padding")

    def __init__(
        self,
        key: bytes,
        padding: Padding = Padding.ISO9797_M1,
        iv: bytes = bytes(BLOCK_SIZE),
    ) -> None:
        if not isinstance(padding, Padding):
            raise TypeError("padding must be a Padding member")
        self._context: CipherContext | None = _cbc_encryptor(key, iv)
        self._padding = padding
        self._length = 0
        self._last = b""

    def _live(self) -> CipherContext:
        if self._context is None:
            raise AlreadyFinalized("MAC was already finalized")
        return self._context

    def update(self, data: bytes) -> None:
        """Add ``data`` to the MAC input."""
        out = self._live().update(data)
        self._length += len(data)
        if out:
            self._last = out[-BLOCK_SIZE:]

    def finalize(self) -> bytes:
        """Pad, finish and return the 8-byte MAC."""
        self.update(_pad_suffix(self._length, self._padding))
        context = self._live()
        self._context = None
        context.finalize()
        return self._last

    def verify(self, tag: bytes) -> None:
        """Finish and raise :class:`InvalidMac` unless the MAC equals ``tag``."""
        if not constant_time_equal(self.finalize(), tag):
            raise InvalidMac("MAC does not match")


class Md5Stream:
    """Streaming MD5 (RFC 1321)."""

    __slots__ = ("_done", "_hash")

    def __init__(self) -> None:
        self._hash = hashlib.md5()
        self._done = False

    def _check(self) -> None:
        if self._done:
            raise AlreadyFinalized("digest was already finalized")

    def update(self, data: bytes) -> None:
        """Add ``data`` to the digest input."""
        self._check()
        self._hash.update(data)

    def finalize(self) -> bytes:
        """Return the 16-byte digest."""
        self._check()
        self._done = True
        return self._hash.digest()
