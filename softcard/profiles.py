"""Card profiles: a software card that behaves like an awkward real card.

A card file's ``profile`` field picks one of these behaviours, each with its
own ATR, so a reader-side APDU layer can be tested against the quirks real
IC cards have:

``plain``
    The :class:`~softcard.emulator.SoftCard` as it is: answers carry their
    data directly, short and extended APDUs are accepted.
``t0-getresponse``
    A T=0 card: every answer that has data is held back and announced with
    ``61 xx`` (xx = bytes waiting, ``00`` for 256 or more); the data comes out
    through GET RESPONSE ``00 C0 00 00 Le``, in several rounds when Le is
    smaller than what waits (``61 xx`` again for the rest).  A GET RESPONSE
    larger than what waits returns what waits (Le is a maximum, ISO/IEC
    7816-4 5.1).  Any other command drops data still waiting; GET RESPONSE
    with nothing waiting answers 6985.  Extended APDUs are refused, as on
    ``no-extended`` (T=0 carries only short APDUs).
``wrong-le``
    A card that wants the exact Le: a case 2 or 4 command whose Le differs
    from the length of the answer gets ``6C xx`` (xx = that length, no data)
    and must be sent again with Le = xx.  Its GET CHALLENGE gives 8 bytes
    only, so GET CHALLENGE with any other Le gets ``6C 08``.
``no-extended``
    A card without extended length fields: any extended APDU gets 6700
    (wrong length).  A card that does not know extended APDUs reads the
    first body byte 00 as a short Lc or Le that does not match the APDU's
    size, and wrong length is what such cards answer; 6D00 would claim the
    instruction is unknown, which is not the case.

vpcd passes APDUs through unchanged and does no T=0 transmission handling,
so ``t0-getresponse`` emulates T=0 behaviour at the APDU level (ISO/IEC
7816-3 12.2 as the host sees it through a PC/SC reader), not at the TPDU
level.

ATRs (ISO/IEC 7816-3 8.2; historical bytes per ISO/IEC 7816-4 8.1.1):

=================  ==========================================================
profile            ATR
=================  ==========================================================
plain              ``3B 85 80 01 80 73 80 21 40 16``
t0-getresponse     ``3B 03 80 31 80``
wrong-le           ``3B 88 81 31 FE 45 80 73 80 21 40 82 90 00 83``
no-extended        ``3B 85 80 01 80 73 80 21 00 56``
=================  ==========================================================

* ``3B`` TS, direct convention.  T0 = ``8K`` / ``0K``: TD1 present or not,
  K historical bytes.  ``80 01``: TD1 says T=0 and TD2 follows, TD2 says
  T=1 (both offered, as the plain SoftCard's ``3B 80 80 01 01``).  No TD1
  (``t0-getresponse``) means T=0 only, and a T=0-only ATR has no TCK.
  ``81 31 FE 45`` (``wrong-le``): TD1 says T=1 only, TD2 (T=1) brings TA3 =
  IFSC 254 and TB3 = BWI 4, CWI 5.  The last byte is TCK, chosen so that
  T0 .. TCK XOR to 00.
* Historical bytes: category indicator ``80`` (COMPACT-TLV objects follow).
  ``73 80 21 40``: card capabilities, 3 bytes: selection by full DF name
  (``80``); data coding ``21``; third byte (software functions table 3)
  ``40`` = b7, extended Lc and Le fields supported, or ``00`` = not
  supported.  ``31 80``: card service data, application selection by full
  DF name (no capabilities object, so no extended length either).
  ``82 90 00``: status indicator, SW 9000.

The plain SoftCard used in process keeps its own ATR ``3B 80 80 01 01``
(no historical bytes); through :func:`open_card` a plain card announces
extended length support, which it has.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from functools import reduce
from types import MappingProxyType
from typing import Final, Protocol

from iscl_hw.apdu import (
    CLA_ISO,
    INS_GET_CHALLENGE,
    INS_GET_RESPONSE,
    ApduFormatError,
    CommandApdu,
)
from iscl_hw.constants import CHALLENGE_LENGTH
from softcard.cardfile import CARD_PROFILES, StrPath
from softcard.emulator import SoftCard

__all__ = [
    "PROFILE_ATRS",
    "ProfiledCard",
    "VirtualCard",
    "open_card",
    "wrap_card",
]

_log = logging.getLogger(__name__)

_SW_OK: Final = b"\x90\x00"
_SW_WRONG_LENGTH: Final = b"\x67\x00"
_SW_CONDITIONS: Final = b"\x69\x85"
_SW_WRONG_P1P2: Final = b"\x6a\x86"
_SHORT_MAX_LE: Final = 256


class VirtualCard(Protocol):
    """What a reader needs from a card: an ATR, a reset and APDUs."""

    @property
    def ATR(self) -> bytes: ...  # noqa: N802 - the ISO name

    def reset(self) -> bytes: ...

    def transmit(self, command: bytes) -> bytes: ...


class _Layer(Protocol):
    def reset(self) -> None: ...

    def transmit(self, command: bytes) -> bytes: ...


def _atr(text: str) -> bytes:
    return bytes.fromhex(text.replace("|", ""))


def _with_tck(atr: bytes) -> bytes:
    """Append TCK: the XOR of T0 .. the last historical byte, with TCK, is 00."""
    return atr + bytes((reduce(lambda acc, byte: acc ^ byte, atr[1:], 0),))


PROFILE_ATRS: Final[Mapping[str, bytes]] = MappingProxyType(
    {
        # TS T0 interface bytes | historical bytes (| TCK, computed)
        "plain": _with_tck(_atr("3B 85 80 01 | 80 73 80 21 40")),
        "t0-getresponse": _atr("3B 03 | 80 31 80"),
        "wrong-le": _with_tck(_atr("3B 88 81 31 FE 45 | 80 73 80 21 40 82 90 00")),
        "no-extended": _with_tck(_atr("3B 85 80 01 | 80 73 80 21 00")),
    }
)


def _decode(raw: bytes) -> CommandApdu | None:
    try:
        return CommandApdu.decode(raw)
    except ApduFormatError:
        return None


def _split(response: bytes) -> tuple[bytes, bytes]:
    return response[:-2], response[-2:]


class _SoftCardLayer:
    """The innermost layer: the card itself."""

    def __init__(self, card: SoftCard) -> None:
        self._card = card

    def reset(self) -> None:
        self._card.reset()

    def transmit(self, command: bytes) -> bytes:
        return self._card.transmit(command)


class _RefuseExtended:
    """Answers 6700 to every extended-length APDU."""

    def __init__(self, inner: _Layer) -> None:
        self._inner = inner

    def reset(self) -> None:
        self._inner.reset()

    def transmit(self, command: bytes) -> bytes:
        apdu = _decode(command)
        if apdu is not None and apdu.extended:
            return _SW_WRONG_LENGTH
        return self._inner.transmit(command)


class _ExactLe:
    """Answers 6Cxx when Le is not the exact length of the answer."""

    _FIXED_LE: Final = {INS_GET_CHALLENGE: CHALLENGE_LENGTH}

    def __init__(self, inner: _Layer) -> None:
        self._inner = inner

    def reset(self) -> None:
        self._inner.reset()

    def transmit(self, command: bytes) -> bytes:
        apdu = _decode(command)
        if apdu is None or apdu.le is None or apdu.cla != CLA_ISO:
            return self._inner.transmit(command)
        fixed = self._FIXED_LE.get(apdu.ins)
        if fixed is not None and fixed != apdu.le:
            return self._resend_with_le(apdu, fixed)
        response = self._inner.transmit(command)
        data, _sw = _split(response)
        if data and len(data) != apdu.le:
            return bytes((0x6C, len(data) % _SHORT_MAX_LE))
        return response

    def _resend_with_le(self, apdu: CommandApdu, le: int) -> bytes:
        # The card works out its answer (errors such as 6985 come out as
        # they are) and then refuses to hand it over with the wrong Le.
        probe = CommandApdu(apdu.cla, apdu.ins, apdu.p1, apdu.p2, apdu.data, le)
        response = self._inner.transmit(probe.encode())
        data, _sw = _split(response)
        if not data:
            return response
        return bytes((0x6C, len(data) % _SHORT_MAX_LE))


class _T0Responses:
    """Holds answer data back behind 61xx until GET RESPONSE asks for it."""

    def __init__(self, inner: _Layer) -> None:
        self._inner = inner
        self._pending = b""
        self._final_sw = _SW_OK

    def reset(self) -> None:
        self._pending = b""
        self._inner.reset()

    def transmit(self, command: bytes) -> bytes:
        apdu = _decode(command)
        if apdu is not None and (apdu.cla, apdu.ins) == (CLA_ISO, INS_GET_RESPONSE):
            return self._get_response(apdu)
        self._pending = b""
        data, sw = _split(self._inner.transmit(command))
        if not data:
            return sw
        self._pending, self._final_sw = data, sw
        return self._announce()

    def _announce(self) -> bytes:
        return bytes((0x61, min(len(self._pending), _SHORT_MAX_LE) % _SHORT_MAX_LE))

    def _get_response(self, apdu: CommandApdu) -> bytes:
        if apdu.p1 != 0 or apdu.p2 != 0:
            return _SW_WRONG_P1P2
        if apdu.le is None or apdu.data:
            return _SW_WRONG_LENGTH
        if not self._pending:
            return _SW_CONDITIONS
        chunk, self._pending = self._pending[: apdu.le], self._pending[apdu.le :]
        if self._pending:
            return chunk + self._announce()
        return chunk + self._final_sw


_LayerFactory = Callable[[_Layer], _Layer]

_PROFILE_LAYERS: Final[Mapping[str, tuple[_LayerFactory, ...]]] = {
    # Outermost first.
    "plain": (),
    "t0-getresponse": (_RefuseExtended, _T0Responses),
    "wrong-le": (_ExactLe,),
    "no-extended": (_RefuseExtended,),
}
assert set(_PROFILE_LAYERS) == set(CARD_PROFILES) == set(PROFILE_ATRS)


class ProfiledCard:
    """A :class:`SoftCard` behind the APDU-level quirks of one profile.

    ``transmit`` and ``reset`` are serialised by a lock, so one card may
    serve several threads one APDU at a time.
    """

    def __init__(self, card: SoftCard, profile: str) -> None:
        if profile not in _PROFILE_LAYERS:
            raise ValueError(f"unknown card profile {profile!r}")
        self.profile: Final = profile
        self.card: Final = card
        self._lock = threading.Lock()
        layer: _Layer = _SoftCardLayer(card)
        for factory in reversed(_PROFILE_LAYERS[profile]):
            layer = factory(layer)
        self._layer = layer

    def __repr__(self) -> str:
        return f"<ProfiledCard {self.profile} {self.card!r}>"

    @property
    def ATR(self) -> bytes:  # noqa: N802 - the ISO name
        return PROFILE_ATRS[self.profile]

    def reset(self) -> bytes:
        """Power-cycle: forget selection, security state and held answers."""
        with self._lock:
            self._layer.reset()
        return self.ATR

    def transmit(self, command: bytes) -> bytes:
        """Process one raw command APDU the way this profile's card would."""
        with self._lock:
            return self._layer.transmit(command)


def wrap_card(card: SoftCard, profile: str | None = None) -> ProfiledCard:
    """Put ``card`` behind ``profile`` (default: the one in its card state)."""
    return ProfiledCard(card, profile if profile is not None else card.state.profile)


def open_card(path: StrPath) -> ProfiledCard:
    """Load a card file and apply the profile it names.

    Counter changes are saved back to the file, as with
    :meth:`SoftCard.from_file`.
    """
    card = SoftCard.from_file(path)
    _log.debug("card file %s: profile %s", path, card.state.profile)
    return wrap_card(card)
