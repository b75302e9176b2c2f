"""A software IC card answering the ISO/IEC 7816-4 APDUs ISCL uses.

Theory of operation: :meth:`SoftCard.transmit` takes raw command APDU bytes
and returns raw response bytes, under a lock, so one card can serve several
threads one APDU at a time.  Supported commands (CLA 00 only):

* SELECT by DF name, ``00 A4 04 00|0C Lc AID [Le]``: 9000 for the card's
  AID (no FCI returned), 6A82 for any other AID (selection unchanged).
  Selecting resets the security state (last challenge, PIN verified).
* GET CHALLENGE, ``00 84 00 00 Le``: Le random bytes (Le 1..256).  The
  challenge is remembered as the last one; EXTERNAL AUTHENTICATE can only
  use an 8-byte last challenge and answers 6985 after one of another length.
* INTERNAL AUTHENTICATE, ``00 88 00 P2 08 <8 bytes> [Le 08|00]``: the
  DES-ECB encryption of the data with authentication key P2.  The last
  challenge is left in place.
* EXTERNAL AUTHENTICATE, ``00 82 00 P2 08 <8 bytes>`` (no Le): compares the
  data with DES-ECB(key P2, last challenge) in constant time.  Every
  EXTERNAL AUTHENTICATE that reaches the card after SELECT forgets the last
  challenge first, whatever its outcome, so a challenge is never usable
  twice.  A wrong answer decrements key P2's counter (63Cx, or 6983 when it
  reaches zero and the key is blocked); a right one resets it.
* VERIFY, ``00 20 00 80 Lc PIN``: checks the PIN (63Cx / 6983 as above).
  Without data (case 1) it reports the tries left (63Cx) or 9000 if the PIN
  is already verified (ISO/IEC 7816-4 7.5.6).  When the card has a PIN,
  INTERNAL and EXTERNAL AUTHENTICATE answer 6982 until it is verified.

Status words, checked in this order: malformed APDU 6700, CLA other than
00 6E00, unknown INS 6D00, any command but SELECT before a successful
SELECT 6985 (our choice: "conditions of use not satisfied"), wrong P1 (or
P1-P2 of SELECT / GET CHALLENGE) 6A86, wrong Lc, data length, Le or case
6700, unknown key or PIN reference 6A88, PIN not verified 6982, blocked key
or PIN 6983, no usable last challenge 6985.  A retry counter that cannot be
written back to the card file gives 6581 (memory failure).

A card built with :meth:`SoftCard.from_file` writes its state back to the
card file atomically after every counter change.  Use one ``SoftCard`` per
card file per process: two instances on one file do not see each other's
counters.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from typing import Final

from iscl_hw.apdu import (
    CLA_ISO,
    INS_EXTERNAL_AUTHENTICATE,
    INS_GET_CHALLENGE,
    INS_INTERNAL_AUTHENTICATE,
    INS_SELECT,
    INS_VERIFY,
    ApduFormatError,
    CommandApdu,
)
from iscl_hw.constants import CHALLENGE_LENGTH
from iscl_hw.crypto import constant_time_equal, des_ecb_encrypt
from iscl_hw.errors import KeyFileError
from softcard.cardfile import (
    CardState,
    KeySlot,
    StrPath,
    load_card_file,
    save_card_file,
)

__all__ = ["SoftCard"]

_log = logging.getLogger(__name__)

SW_OK: Final = 0x9000
SW_MEMORY_FAILURE: Final = 0x6581
SW_WRONG_LENGTH: Final = 0x6700
SW_SECURITY_STATUS: Final = 0x6982
SW_BLOCKED: Final = 0x6983
SW_CONDITIONS: Final = 0x6985
SW_NOT_FOUND: Final = 0x6A82
SW_WRONG_P1P2: Final = 0x6A86
SW_REF_NOT_FOUND: Final = 0x6A88
SW_INS_NOT_SUPPORTED: Final = 0x6D00
SW_CLA_NOT_SUPPORTED: Final = 0x6E00

_PIN_REF: Final = 0x80


class _StatusWordError(Exception):
    """Ends a command early with a status word (internal to the emulator)."""

    def __init__(self, sw: int) -> None:
        super().__init__(f"SW {sw:04X}")
        self.sw = sw


def _sw(value: int) -> bytes:
    return value.to_bytes(2, "big")


def _retry_sw(remaining: int) -> int:
    return SW_BLOCKED if remaining == 0 else 0x63C0 | remaining


class SoftCard:
    """An in-process IC card; a transport for :class:`iscl_hw.card.ApduCard`."""

    #: ISO/IEC 7816-3 ATR: direct convention, T=1, no historical bytes.
    ATR: Final = bytes.fromhex("3B80800101")

    def __init__(self, state: CardState, *, path: StrPath | None = None) -> None:
        self._state = state
        self._path = path
        self._lock = threading.Lock()
        self._handlers: dict[int, Callable[[CommandApdu], bytes]] = {
            INS_SELECT: self._select,
            INS_GET_CHALLENGE: self._get_challenge,
            INS_INTERNAL_AUTHENTICATE: self._internal_authenticate,
            INS_EXTERNAL_AUTHENTICATE: self._external_authenticate,
            INS_VERIFY: self._verify,
        }
        self._selected = False
        self._last_challenge: bytes | None = None
        self._pin_verified = False

    @classmethod
    def from_file(cls, path: StrPath) -> SoftCard:
        """Load a card file; counter changes are saved back to it."""
        return cls(load_card_file(path), path=path)

    def __repr__(self) -> str:
        where = f" file={str(self._path)!r}" if self._path is not None else ""
        return f"<SoftCard keys={sorted(self._state.keys)}{where}>"

    @property
    def state(self) -> CardState:
        return self._state

    def reset(self) -> bytes:
        """Power-cycle the card: forget selection and security state."""
        with self._lock:
            self._selected = False
            self._last_challenge = None
            self._pin_verified = False
        return self.ATR

    def transmit(self, command: bytes) -> bytes:
        """Process one raw command APDU and return the raw response APDU."""
        with self._lock:
            try:
                return self._process(command) + _sw(SW_OK)
            except _StatusWordError as status:
                return _sw(status.sw)

    def _process(self, raw: bytes) -> bytes:
        try:
            command = CommandApdu.decode(raw)
        except ApduFormatError:
            raise _StatusWordError(SW_WRONG_LENGTH) from None
        if command.cla != CLA_ISO:
            raise _StatusWordError(SW_CLA_NOT_SUPPORTED)
        handler = self._handlers.get(command.ins)
        if handler is None:
            raise _StatusWordError(SW_INS_NOT_SUPPORTED)
        if command.ins != INS_SELECT and not self._selected:
            raise _StatusWordError(SW_CONDITIONS)
        return handler(command)

    # ---------------------------------------------------------- commands

    def _select(self, command: CommandApdu) -> bytes:
        # ISO/IEC 7816-4 7.1.1: P1 04 = by DF name; P2 00 / 0C = first or
        # only occurrence, with FCI / with no response data.
        if command.p1 != 0x04 or command.p2 not in (0x00, 0x0C):
            raise _StatusWordError(SW_WRONG_P1P2)
        if not command.data:
            raise _StatusWordError(SW_WRONG_LENGTH)
        if command.data != self._state.aid:
            raise _StatusWordError(SW_NOT_FOUND)
        self._selected = True
        self._last_challenge = None
        self._pin_verified = False
        return b""

    def _get_challenge(self, command: CommandApdu) -> bytes:
        if command.p1 != 0 or command.p2 != 0:
            raise _StatusWordError(SW_WRONG_P1P2)
        if command.case != 2 or command.le is None or command.le > 256:
            raise _StatusWordError(SW_WRONG_LENGTH)
        self._last_challenge = secrets.token_bytes(command.le)
        return self._last_challenge

    def _internal_authenticate(self, command: CommandApdu) -> bytes:
        self._check_auth_command(command, les=(None, 8, 256))
        slot = self._usable_key(command.p2)
        return des_ecb_encrypt(slot.key, command.data)

    def _external_authenticate(self, command: CommandApdu) -> bytes:
        challenge, self._last_challenge = self._last_challenge, None
        self._check_auth_command(command, les=(None,))
        slot = self._usable_key(command.p2)
        if challenge is None or len(challenge) != CHALLENGE_LENGTH:
            raise _StatusWordError(SW_CONDITIONS)
        expected = des_ecb_encrypt(slot.key, challenge)
        if constant_time_equal(expected, command.data):
            self._reset_counter(slot)
            return b""
        slot.remaining -= 1
        _log.info(
            "EXTERNAL AUTHENTICATE failed, key %d: %d tries left",
            command.p2,
            slot.remaining,
        )
        self._persist()
        raise _StatusWordError(_retry_sw(slot.remaining))

    def _verify(self, command: CommandApdu) -> bytes:
        if command.p1 != 0:
            raise _StatusWordError(SW_WRONG_P1P2)
        pin = self._state.pin
        if command.p2 != _PIN_REF or pin is None:
            raise _StatusWordError(SW_REF_NOT_FOUND)
        if command.le is not None:
            raise _StatusWordError(SW_WRONG_LENGTH)
        if pin.blocked:
            raise _StatusWordError(SW_BLOCKED)
        if not command.data:
            if self._pin_verified:
                return b""
            raise _StatusWordError(_retry_sw(pin.remaining))
        if pin.matches(command.data):
            self._pin_verified = True
            if pin.remaining != pin.max_retries:
                pin.remaining = pin.max_retries
                self._persist()
            return b""
        self._pin_verified = False
        pin.remaining -= 1
        _log.info("VERIFY failed: %d tries left", pin.remaining)
        self._persist()
        raise _StatusWordError(_retry_sw(pin.remaining))

    # ----------------------------------------------------------- helpers

    def _check_auth_command(
        self, command: CommandApdu, les: tuple[int | None, ...]
    ) -> None:
        if command.p1 != 0:
            raise _StatusWordError(SW_WRONG_P1P2)
        if len(command.data) != CHALLENGE_LENGTH or command.le not in les:
            raise _StatusWordError(SW_WRONG_LENGTH)

    def _usable_key(self, key_ref: int) -> KeySlot:
        slot = self._state.keys.get(key_ref)
        if slot is None:
            raise _StatusWordError(SW_REF_NOT_FOUND)
        if self._state.pin is not None and not self._pin_verified:
            raise _StatusWordError(SW_SECURITY_STATUS)
        if slot.blocked:
            raise _StatusWordError(SW_BLOCKED)
        return slot

    def _reset_counter(self, slot: KeySlot) -> None:
        if slot.remaining != slot.max_retries:
            slot.remaining = slot.max_retries
            self._persist()

    def _persist(self) -> None:
        if self._path is None:
            return
        try:
            save_card_file(self._path, self._state)
        except KeyFileError as exc:
            _log.error("cannot save card state: %s", exc)
            raise _StatusWordError(SW_MEMORY_FAILURE) from None
