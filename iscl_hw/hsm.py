"""PKCS#11 token backend: the card operations and message keys inside an HSM.

:class:`Token` opens a PKCS#11 module (python-pkcs11), finds the token by
label or serial number, logs in, and keeps a pool of sessions.  The ISCL
keys are secret-key objects named by :func:`key_label`; they are created
sensitive and not extractable, and every operation on them runs in the
token:

- :class:`TokenCard` is the :class:`~iscl_hw.card.Card` of a token: GET
  CHALLENGE from the token's generator, INTERNAL AUTHENTICATE as DES-ECB
  of the challenge under the authentication key (our answer function,
  ``docs/protocol.md``), EXTERNAL AUTHENTICATE by computing the expected
  answer in the token and comparing in constant time.  Each connection
  gets its own view with its own challenge (:meth:`TokenCard.for_connection`),
  so concurrent handshakes need no lock across the network round trip.
- :class:`TokenKeys` is the :class:`~iscl_hw.settings.KeyProvider` of the
  encryption keys; its :class:`TokenKey` encrypts, decrypts, MACs and
  derives session keys in the token.

Single DES is run in one of two ways the token may offer
(:data:`DES_WAYS`): as two-key-free triple DES with K‖K‖K (works where the
token refuses single DES, as SoftHSM2 does without OpenSSL's legacy
provider), or as native DES.  At start-up each way's mechanisms are taken
from the token's list, filtered by the ``allowed_mechanisms`` setting, and
run once against the FIPS 81 examples; a way is used only if it gives the
published answers.  No token offers a DES CBC-MAC mechanism we can rely on
(SoftHSM2 has none), so DESMAC is the last block of a CBC encryption.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias, TypeVar

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11

from iscl_hw import crypto
from iscl_hw.card import Card, check_block, check_key_ref
from iscl_hw.constants import CHALLENGE_LENGTH, KEY_INDEXES
from iscl_hw.errors import (
    CardBusy,
    CardError,
    ConfigError,
    VerificationFailed,
)
from iscl_hw.softhsm import (
    CKR_OK,
    CKR_PIN_INCORRECT,
    CKR_PIN_INVALID,
    CKR_PIN_LEN_RANGE,
    CKR_PIN_LOCKED,
    CKR_USER_ALREADY_LOGGED_IN,
    CKR_USER_NOT_LOGGED_IN,
    CKU_USER,
    CkSessionInfo,
    Pkcs11CallError,
    functions,
)

__all__ = [
    "DES_WAYS",
    "DesWay",
    "KeyInfo",
    "KeyKind",
    "MechanismUnavailable",
    "Token",
    "TokenCard",
    "TokenConfig",
    "TokenError",
    "TokenKey",
    "TokenKeys",
    "TokenLoggedOut",
    "TokenRemoved",
    "key_label",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: python-pkcs11's stubs give SecretKey none of its encrypt/derive mixins.
_Key: TypeAlias = Any


# -- errors -------------------------------------------------------------------


class TokenError(CardError):
    """A PKCS#11 call failed; the message names the token and the call."""


class TokenLoggedOut(TokenError):
    """The token's login ended (C_Logout elsewhere in this process, or a
    session closed); the next connection logs in again."""


class TokenRemoved(TokenError):
    """The token or its device went away; the next connection looks for it
    again by label or serial number."""


class MechanismUnavailable(ConfigError):
    """The token offers no working way to run an operation ISCL needs."""


_LOGGED_OUT = (
    p11.UserNotLoggedIn,
    p11.KeyHandleInvalid,
    p11.ObjectHandleInvalid,
    p11.SessionClosed,
    p11.SessionHandleInvalid,
)
# CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS (PKCS#11 v2.40 5.6.1).
_USER_STATES: Final = frozenset({1, 3})
_REMOVED = (
    p11.DeviceRemoved,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
    p11.DeviceError,
)


# -- key objects --------------------------------------------------------------


class KeyKind(enum.Enum):
    """The two kinds of ISCL key a token holds."""

    AUTH = "auth"
    ENC = "enc"


def key_label(kind: KeyKind, index: int, *, mac_variant: bool = False) -> str:
    """Label of an ISCL key object: ``iscl-auth-N``, ``iscl-enc-N`` and, for
    the DESMAC key variant of encryption key N, ``iscl-enc-N-mac``.

    Our scheme (the ISCL standard names no token objects).  The variant is
    stored beside its key because PKCS#11 has no XOR derivation SoftHSM2
    offers.
    """
    check_key_ref(index)
    if mac_variant and kind is not KeyKind.ENC:
        raise ValueError("only encryption keys have a DESMAC variant")
    return f"iscl-{kind.value}-{index}" + ("-mac" if mac_variant else "")


def _parse_label(label: str) -> tuple[KeyKind, int, bool] | None:
    parts = label.split("-")
    if len(parts) not in (3, 4) or parts[0] != "iscl":
        return None
    try:
        kind, index = KeyKind(parts[1]), int(parts[2])
    except ValueError:
        return None
    variant = len(parts) == 4
    if index not in KEY_INDEXES or (
        variant and (parts[3], kind) != ("mac", KeyKind.ENC)
    ):
        return None
    return kind, index, variant


@dataclass(frozen=True)
class KeyInfo:
    """An ISCL key object as ``iscl hsm list`` shows it: never its value."""

    label: str
    kind: KeyKind
    index: int
    mac_variant: bool
    key_type: str
    check_value: str


# -- ways to run single DES ---------------------------------------------------


@dataclass(frozen=True)
class DesWay:
    """One way a token can run single DES: key type and three mechanisms."""

    name: str
    key_type: KeyType
    ecb: Mechanism
    cbc: Mechanism
    derive: Mechanism
    copies: int  # how many times K is repeated in the key object's value

    @property
    def mechanisms(self) -> tuple[str, ...]:
        return tuple(_mechanism_name(m) for m in (self.ecb, self.cbc, self.derive))

    def key_value(self, key: bytes) -> bytes:
        return crypto.check_key(key) * self.copies

    def derive_data(self, random: bytes) -> bytes:
        return random * self.copies


DES3_WAY: Final = DesWay(
    "DES3 with K||K||K",
    KeyType.DES3,
    Mechanism.DES3_ECB,
    Mechanism.DES3_CBC,
    Mechanism.DES3_ECB_ENCRYPT_DATA,
    3,
)
NATIVE_DES_WAY: Final = DesWay(
    "native DES",
    KeyType._DES,
    Mechanism._DES_ECB,
    Mechanism._DES_CBC,
    Mechanism.DES_ECB_ENCRYPT_DATA,
    1,
)
#: The ways, in order of preference.
DES_WAYS: Final = (DES3_WAY, NATIVE_DES_WAY)

# FIPS 81 Appendix B, Table B1 (ECB) and Table C1 (CBC).
_KAT_KEY: Final = bytes.fromhex("0123456789ABCDEF")
_KAT_IV: Final = bytes.fromhex("1234567890ABCDEF")
_KAT_PLAIN: Final = b"Now is the time for all "
_KAT_ECB: Final = bytes.fromhex("3FA40E8A984D4815")
_KAT_CBC: Final = bytes.fromhex("E5C7CDDE872BF27C43E934008C389C0F683788499A7C05F6")


def _derivation_param(data: bytes) -> tuple[bytes, ctypes.Array[ctypes.c_char]]:
    """Raw CK_KEY_DERIVATION_STRING_DATA {pData, ulLen} for ``data``.

    python-pkcs11 packs this structure only for the AES mechanisms.  The
    buffer is returned too: it must stay alive during the call.
    """
    buffer = ctypes.create_string_buffer(data, len(data))
    struct = (ctypes.c_void_p * 2)(ctypes.addressof(buffer), len(data))
    return bytes(struct), buffer


# -- configuration ------------------------------------------------------------

#: More sessions than this gain nothing: calls into one module are
#: serialised (see :func:`_load`).
MAX_SESSIONS: Final = 64


@dataclass(frozen=True)
class TokenConfig:
    """Where the token is and how to use it.  The PIN never shows in a repr.

    ``allowed_mechanisms`` (names such as ``"DES3_CBC"``), when set, limits
    the mechanisms iscl may use, for tokens whose policy forbids some.
    """

    module: str
    label: str | None = None
    serial: str | None = None
    pin: bytes = field(default=b"", repr=False)
    sessions: int = 4
    session_wait: float = 1.0
    allowed_mechanisms: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if (self.label is None) == (self.serial is None):
            raise ConfigError("give the token's label or its serial number, not both")
        if not isinstance(self.pin, bytes):
            raise ConfigError("the token PIN must be bytes")
        try:
            self.pin.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError("the token PIN must be UTF-8 text") from None
        if not 1 <= self.sessions <= MAX_SESSIONS:
            raise ConfigError(
                f"sessions must be 1..{MAX_SESSIONS}, not {self.sessions}"
            )
        if self.allowed_mechanisms is not None:
            if isinstance(self.allowed_mechanisms, str) or not all(
                isinstance(m, str) for m in self.allowed_mechanisms
            ):
                raise ConfigError("allowed_mechanisms must be mechanism names")
            names = frozenset(m.removeprefix("CKM_") for m in self.allowed_mechanisms)
            object.__setattr__(self, "allowed_mechanisms", names)
        if self.session_wait <= 0:
            raise ConfigError("session_wait must be positive")

    @property
    def token_name(self) -> str:
        return f"label {self.label!r}" if self.label else f"serial {self.serial!r}"


# -- the session pool ---------------------------------------------------------


class _Session:
    """One pooled PKCS#11 session and the key objects found through it."""

    def __init__(self, session: pkcs11.Session, generation: int) -> None:
        self.session = session
        self.generation = generation
        self.keys: dict[str, _Key] = {}
        self.busy = False

    def key(self, label: str) -> _Key:
        key = self.keys.get(label)
        if key is None:
            key = self.keys[label] = _session_copy(self._find(label))
        return key

    def _find(self, label: str) -> _Key:
        """The token object ``label`` (session objects, such as our copies,
        are not ISCL keys)."""
        query = {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.LABEL: label,
            Attribute.TOKEN: True,
        }
        found = list(self.session.get_objects(query))
        if not found:
            raise p11.NoSuchKey(label)
        if len(found) > 1:
            raise ConfigError(f"the token holds {len(found)} objects labelled {label}")
        return found[0]


def _session_copy(key: _Key) -> _Key:
    """A session-object copy of a token key, or the key itself.

    SoftHSM2 re-reads a private token object on every operation; its session
    copy (still sensitive, not extractable) halves the time of each one.
    """
    try:
        copy = key.copy({Attribute.TOKEN: False, Attribute.LABEL: ""})
    except p11.PKCS11Error as exc:
        log.debug("token key %s not copied: %s", key.label, type(exc).__name__)
        return key
    assert isinstance(copy, pkcs11.SecretKey)
    return copy


class Token:
    """A logged-in PKCS#11 token and its pool of sessions.

    Safe to share between threads and connections: an operation takes a
    session of its own for its duration, and waits at most
    ``config.session_wait`` for one.  When the login ends or the token goes
    away, the operation under way fails with :class:`TokenLoggedOut` or
    :class:`TokenRemoved`, and the next one opens the pool again.
    """

    def __init__(self, config: TokenConfig) -> None:
        self.config = config
        self.name = config.label or config.serial or "token"
        self._lib, self._calls = _load(config.module)
        self._functions = functions(config.module)
        # Logins are told apart by the module's file, however it is named.
        self._module = os.path.realpath(config.module)
        # The token's login while it is ours to end (not another Token's).
        self._own_login: tuple[str, bytes] | None = None
        self._state = threading.Condition()
        self._sessions: list[_Session] = []
        self._generation = 0
        self._closed = False
        self._token: pkcs11.Token | None = None
        with self._state:
            self._open_pool()
        try:
            self.way = self._choose_way()
            self._check_keys()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<Token {self.name!r} {self.way.name if hasattr(self, 'way') else ''}>"

    def __enter__(self) -> Token:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the pool -------------------------------------------------------------

    def _find_token(self) -> pkcs11.Token:
        config = self.config
        try:
            if config.label is not None:
                token = self._lib.get_token(token_label=config.label)
            else:
                token = self._lib.get_token(token_serial=(config.serial or "").encode())
            assert isinstance(token, pkcs11.Token)
            return token
        except p11.NoSuchToken:
            raise TokenRemoved(
                f"no PKCS#11 token with {config.token_name} in {config.module}"
            ) from None
        except p11.MultipleTokensReturned:
            raise ConfigError(
                f"several PKCS#11 tokens have {config.token_name}"
            ) from None

    def _open_pool(self) -> None:
        with self._calls:
            token = self._find_token()
            first = self._login(token)
            sessions = [first]
            try:
                while len(sessions) < self.config.sessions:
                    sessions.append(token.open(rw=True))
            except p11.PKCS11Error as exc:
                self._logout(sessions)
                for session in reversed(sessions):
                    _close_quietly(session)
                raise TokenError(
                    f"token {self.name!r}: opening {self.config.sessions} sessions "
                    f"failed ({type(exc).__name__})"
                ) from None
        self._token = token
        self._generation += 1
        self._sessions = [_Session(s, self._generation) for s in sessions]
        log.info("token %s: logged in, %d sessions", self.name, len(self._sessions))

    def _login(self, token: pkcs11.Token) -> pkcs11.Session:
        # C_Login on a session of our own, not through python-pkcs11's
        # open(user_pin=...), which leaves its session open when the login
        # is refused.
        session = token.open(rw=True)
        pin = self.config.pin
        rv = self._functions.call("C_Login", _handle(session), CKU_USER, pin, len(pin))
        login = (self._module, bytes(token.serial))
        if rv == CKR_OK:
            self._own_login = login
            _LOGINS.record(login, pin)
            return session
        if rv == CKR_USER_ALREADY_LOGGED_IN and _LOGINS.same_pin(login, pin):
            # Another Token object of this process logged in already; the
            # login is shared by every session of the process.
            return session
        _close_quietly(session)
        if rv == CKR_USER_ALREADY_LOGGED_IN:
            # The token checks no PIN once logged in: ours was checked
            # against the one the login was made with, and differs.
            rv = CKR_PIN_INCORRECT
        raise TokenError(f"token {self.name!r}: {_login_refusal(rv)}")

    def _require_login(self, pooled: _Session) -> None:
        """Raise (as the token would) when the login is gone: private key
        objects are then simply not found."""
        if not self._logged_in(pooled.session):
            raise p11.UserNotLoggedIn()

    def _logged_in(self, session: pkcs11.Session) -> bool:
        """Whether ``session`` is in a user state (C_GetSessionInfo)."""
        info = CkSessionInfo()
        with self._calls:
            rv = self._functions.call(
                "C_GetSessionInfo", _handle(session), ctypes.byref(info)
            )
        return rv == CKR_OK and info.state in _USER_STATES

    def _logout(self, sessions: list[pkcs11.Session]) -> None:
        """End our login (every session's), through one still open."""
        login, self._own_login = self._own_login, None
        if login is None:
            return
        for session in sessions:
            rv = self._functions.call("C_Logout", _handle(session))
            if rv in (CKR_OK, CKR_USER_NOT_LOGGED_IN):
                _LOGINS.forget(login)
                return
        # No session of ours could end it (all closed or invalid): another
        # Token's sessions may keep it alive, so its PIN stays on record.
        log.info("token %r: could not log out through our sessions", self.name)

    def _reset(self) -> None:
        """Forget the pool after a lost login or token; reopen at next use."""
        with self._state:
            self._generation += 1
            every = self._sessions
            idle = [s for s in every if not s.busy]
            self._sessions = [s for s in every if s.busy]
        with self._calls:
            self._logout([pooled.session for pooled in every])
            for pooled in idle:
                _close_quietly(pooled.session)

    @contextmanager
    def session(self, pinned: _Session | None = None) -> Iterator[_Session]:
        """A session of the pool (or ``pinned``) for one operation."""
        pooled = self._acquire(pinned)
        try:
            yield pooled
        finally:
            self._release(pooled)

    def _acquire(self, pinned: _Session | None) -> _Session:
        deadline = time.monotonic() + self.config.session_wait
        with self._state:
            while True:
                if self._closed:
                    raise TokenError(f"token {self.name!r} is closed")
                if pinned is not None and pinned.generation != self._generation:
                    raise TokenLoggedOut(
                        f"token {self.name!r}: the session of this key was closed"
                    )
                if not self._sessions and pinned is None:
                    self._open_pool()
                candidates = [pinned] if pinned else self._sessions
                for pooled in candidates:
                    if not pooled.busy:
                        pooled.busy = True
                        return pooled
                left = deadline - time.monotonic()
                if left <= 0 or not self._state.wait(left):
                    raise CardBusy(
                        f"token {self.name!r}: no free session within "
                        f"{self.config.session_wait:g} s"
                    )

    def _release(self, pooled: _Session) -> None:
        with self._state:
            pooled.busy = False
            stale = pooled.generation != self._generation
            if stale and pooled in self._sessions:
                self._sessions.remove(pooled)
            self._state.notify_all()
        if stale:
            with self._calls:
                _close_quietly(pooled.session)

    def run(
        self,
        what: str,
        operation: Callable[[_Session], _T],
        pinned: _Session | None = None,
    ) -> _T:
        """Run ``operation`` on a pooled session; PKCS#11 errors become
        typed errors naming the token and ``what``."""
        pooled = self._acquire(pinned)
        try:
            with self._calls:
                try:
                    return operation(pooled)
                except p11.NoSuchKey:
                    # Private objects vanish with the login (a C_Logout
                    # elsewhere in this process): asked before the lock lets
                    # another Token log in again.
                    self._require_login(pooled)
                    raise
        except p11.NoSuchKey:
            raise ConfigError(
                f"token {self.name!r}: no key object for {what}"
            ) from None
        except _LOGGED_OUT as exc:
            self._reset()
            raise TokenLoggedOut(
                f"token {self.name!r}: {what} failed, not logged in or "
                f"session closed ({type(exc).__name__})"
            ) from None
        except _REMOVED as exc:
            self._reset()
            raise TokenRemoved(
                f"token {self.name!r}: {what} failed, the token went away "
                f"({type(exc).__name__})"
            ) from None
        except p11.PKCS11Error as exc:
            raise TokenError(
                f"token {self.name!r}: {what} failed ({type(exc).__name__})"
            ) from None
        finally:
            self._release(pooled)

    def close(self) -> None:
        """Log out and close every session; later calls raise TokenError."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            sessions, self._sessions = self._sessions, []
        with self._calls:
            self._logout([pooled.session for pooled in sessions])
            for pooled in reversed(sessions):
                _close_quietly(pooled.session)

    # -- mechanisms -----------------------------------------------------------

    def mechanisms(self) -> frozenset[str]:
        """Names of the mechanisms the token lists and the settings allow."""
        if self._closed or self._token is None:
            raise TokenError(f"token {self.name!r} is closed")
        with self._calls:
            mechanisms = self._token.slot.get_mechanisms()
        listed = {_mechanism_name(m) for m in mechanisms if isinstance(m, Mechanism)}
        allowed = self.config.allowed_mechanisms
        return frozenset(listed if allowed is None else listed & allowed)

    def _choose_way(self) -> DesWay:
        usable = self.mechanisms()
        reasons = []
        for way in DES_WAYS:
            missing = [m for m in way.mechanisms if m not in usable]
            if missing:
                reasons.append(f"{way.name} needs {', '.join(missing)}")
                continue
            failure = self._self_test(way)
            if failure is None:
                log.info("token %s: single DES runs as %s", self.name, way.name)
                return way
            reasons.append(f"{way.name}: {failure}")
        raise MechanismUnavailable(
            f"token {self.name!r} offers no way to run single DES: "
            + "; ".join(reasons)
        )

    def _self_test(self, way: DesWay) -> str | None:
        """Run ``way`` on the FIPS 81 examples; the failure, or None."""

        def test(pooled: _Session) -> str | None:
            key: _Key = pooled.session.create_object(
                _key_template(way, _KAT_KEY, "iscl-self-test", token=False)
            )
            try:
                if key.encrypt(_KAT_PLAIN[:8], mechanism=way.ecb) != _KAT_ECB:
                    return f"{_mechanism_name(way.ecb)} gives a wrong answer"
                cbc = key.encrypt(
                    _KAT_PLAIN, mechanism=way.cbc, mechanism_param=_KAT_IV
                )
                if cbc != _KAT_CBC:
                    return f"{_mechanism_name(way.cbc)} gives a wrong answer"
                derived = _derive(key, way, _KAT_IV)
                try:
                    expected = crypto.des_ecb_encrypt(
                        crypto.fix_parity(crypto.des_ecb_encrypt(_KAT_KEY, _KAT_IV)),
                        _KAT_PLAIN[:8],
                    )
                    if derived.encrypt(_KAT_PLAIN[:8], mechanism=way.ecb) != expected:
                        return f"{_mechanism_name(way.derive)} derives a wrong key"
                finally:
                    derived.destroy()
            except p11.PKCS11Error as exc:
                return f"{type(exc).__name__} from the token"
            finally:
                key.destroy()
            return None

        return self.run(f"the self-test of {way.name}", test)

    def _check_keys(self) -> None:
        """Refuse key objects this token cannot use with the chosen way."""
        for info in self.list_keys():
            if info.key_type != self.way.key_type.name.lstrip("_"):
                raise MechanismUnavailable(
                    f"token {self.name!r}: key {info.label} is a {info.key_type} "
                    f"key, but this token runs single DES only as {self.way.name}"
                )

    # -- keys -----------------------------------------------------------------

    def list_keys(self) -> list[KeyInfo]:
        """Every ISCL key object, with its key check value (KCV: the first
        3 bytes of DES-ECB of zeros, computed in the token)."""

        def collect(pooled: _Session) -> list[KeyInfo]:
            self._require_login(pooled)  # else private objects are not listed
            found = []
            query = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TOKEN: True}
            # The search must end before the KCV encryptions start.
            objects: list[_Key] = list(pooled.session.get_objects(query))
            for obj in objects:
                parsed = _parse_label(obj.label or "")
                if parsed is None:
                    continue
                kind, index, variant = parsed
                way = _way_of(obj.key_type)
                kcv = (
                    obj.encrypt(bytes(8), mechanism=way.ecb).hex()[:6].upper()
                    if way
                    else "?"
                )
                name = (
                    obj.key_type.name.lstrip("_")
                    if isinstance(obj.key_type, KeyType)
                    else str(obj.key_type)
                )
                found.append(KeyInfo(obj.label, kind, index, variant, name, kcv))
            return sorted(found, key=lambda k: (k.kind.value, k.index, k.mac_variant))

        return self.run("listing key objects", collect)

    def import_key(self, kind: KeyKind, index: int, value: bytes) -> list[str]:
        """Store ``value`` as the ISCL key ``kind``/``index`` (and, for an
        encryption key, its DESMAC variant); returns the labels written.

        Refuses a label already present: replacing a key is deliberate
        (delete the object first)."""
        if crypto.is_weak_key(value):
            raise ConfigError(
                f"refusing a weak or semi-weak DES key for {key_label(kind, index)}"
            )
        values = {key_label(kind, index): value}
        if kind is KeyKind.ENC:
            variant = crypto.key_variant(value, crypto.MAC_KEY_VARIANT_MASK)
            values[key_label(kind, index, mac_variant=True)] = variant

        def store(pooled: _Session) -> list[str]:
            for label in values:
                if list(pooled.session.get_objects({Attribute.LABEL: label})):
                    raise ConfigError(f"token {self.name!r} already holds {label}")
            for label, key in values.items():
                pooled.session.create_object(
                    _key_template(self.way, key, label, token=True)
                )
            return list(values)

        return self.run(f"storing {key_label(kind, index)}", store)

    def has_key(self, label: str) -> bool:
        def find(pooled: _Session) -> bool:
            # Not found, or found among this session's copies, says nothing
            # about a login that has gone.
            self._require_login(pooled)
            try:
                pooled.key(label)
            except p11.NoSuchKey:
                return False
            return True

        return self.run(f"looking for {label}", find)

    # -- operations -----------------------------------------------------------

    def random(self, length: int) -> bytes:
        return self.run(
            "GET CHALLENGE", lambda p: bytes(p.session.generate_random(length * 8))
        )

    def ecb(self, label: str, block: bytes) -> bytes:
        return self.run(
            f"DES-ECB with {label}",
            lambda p: bytes(p.key(label).encrypt(block, mechanism=self.way.ecb)),
        )


# -- message keys -------------------------------------------------------------


class TokenKey:
    """A :class:`~iscl_hw.secure.MessageKey` whose value stays in the token.

    A key made by :meth:`derive` (index 0x10) is a session object derived on
    first use and destroyed by :meth:`discard` once its message is done.
    """

    def __init__(self, token: Token, label: str, random: bytes | None = None) -> None:
        self._token = token
        self._label = label
        self._random = random
        self._derived: tuple[_Session, _Key] | None = None
        self._variant: TokenKey | None = None

    def __repr__(self) -> str:
        kind = "session key from " if self._random is not None else ""
        return f"<TokenKey {kind}{self._label} in {self._token.name!r}>"

    def _run(self, what: str, operation: Callable[[_Key], bytes]) -> bytes:
        if self._random is None:
            return self._token.run(
                f"{what} with {self._label}", lambda p: operation(p.key(self._label))
            )
        if self._derived is None:
            self._derived = self._token.run(
                f"deriving a session key from {self._label}", self._derive_on
            )
        pooled, key = self._derived
        return self._token.run(
            f"{what} with a session key", lambda p: operation(key), pinned=pooled
        )

    def _derive_on(self, pooled: _Session) -> tuple[_Session, _Key]:
        assert self._random is not None
        return pooled, _derive(pooled.key(self._label), self._token.way, self._random)

    def cbc_encrypt(self, iv: bytes, data: bytes) -> bytes:
        cbc = self._token.way.cbc
        return self._run(
            "DES-CBC encryption",
            lambda k: k.encrypt(data, mechanism=cbc, mechanism_param=iv),
        )

    def cbc_decrypt(self, iv: bytes, data: bytes) -> bytes:
        cbc = self._token.way.cbc
        return self._run(
            "DES-CBC decryption",
            lambda k: k.decrypt(data, mechanism=cbc, mechanism_param=iv),
        )

    def cbc_mac(self, data: bytes) -> bytes:
        padded = crypto.pad(data, crypto.Padding.ISO9797_M1)
        return self.cbc_encrypt(bytes(crypto.BLOCK_SIZE), padded)[-crypto.BLOCK_SIZE :]

    def mac_variant(self) -> TokenKey:
        if self._variant is None:
            label = (
                self._label if self._label.endswith("-mac") else self._label + "-mac"
            )
            self._variant = TokenKey(self._token, label, self._random)
        return self._variant

    def derive(self, random: bytes) -> TokenKey:
        check_block("random number", random)
        return TokenKey(self._token, self._label, random)

    def discard(self) -> None:
        """Destroy a derived session key in the token; a no-op otherwise."""
        if self._variant is not None:
            self._variant.discard()
        derived, self._derived = self._derived, None
        if derived is None:
            return
        pooled, key = derived
        try:
            self._token.run("destroying a session key", lambda p: key.destroy(), pooled)
        except (TokenError, CardBusy) as exc:
            # The object is a session object: it goes when its session does.
            log.debug("token %s: session key not destroyed: %s", self._token.name, exc)


class TokenKeys:
    """The encryption keys 1..8 of a token, as a KeyProvider."""

    def __init__(self, token: Token) -> None:
        self._token = token

    def __repr__(self) -> str:
        return f"<TokenKeys of {self._token.name!r}>"

    def get(self, index: int) -> TokenKey:
        label = key_label(KeyKind.ENC, index)
        if not self._token.has_key(label):
            raise ConfigError(f"token {self._token.name!r} holds no {label}")
        return TokenKey(self._token, label)

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int) or index not in KEY_INDEXES:
            return False
        return self._token.has_key(key_label(KeyKind.ENC, index))


# -- the card -----------------------------------------------------------------


class TokenCard(Card):
    """The three card operations of ISCL, run in a token.

    Use :meth:`for_connection` (the drivers do) to get one view per
    connection: each keeps its own challenge on the host.  A challenge
    answers one EXTERNAL AUTHENTICATE; a challenge this token has out for
    any connection is never answered (a peer reflecting it back).
    """

    def __init__(self, token: Token, name: str | None = None) -> None:
        self.name = name or f"token {token.name}"
        self.token = token
        self._outstanding: dict[bytes, object] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<TokenCard {self.name!r}>"

    def for_connection(self) -> Card:
        return _TokenCardView(self)

    def get_challenge(self) -> bytes:
        raise CardError("use TokenCard.for_connection(): a challenge is per connection")

    def internal_authenticate(
        self, key_ref: int, challenge: bytes, asker: object = None
    ) -> bytes:
        """DES-ECB of ``challenge`` under authentication key ``key_ref``.

        A challenge this token has out is answered only for the connection
        that issued it (its host-side check of the peer's answer).
        """
        check_key_ref(key_ref)
        check_block("challenge", challenge)
        with self._lock:
            issuer = self._outstanding.get(challenge)
        if issuer is not None and issuer is not asker:
            log.warning("%s: refused to answer its own challenge", self.name)
            raise CardError(f"{self.name}: refused to answer its own challenge")
        return self.token.ecb(key_label(KeyKind.AUTH, key_ref), challenge)

    def external_authenticate(self, key_ref: int, response: bytes) -> None:
        raise CardError("use TokenCard.for_connection(): a challenge is per connection")

    def close(self) -> None:
        """The token is closed by its owner, not by a card."""
        return

    def _issue(self, challenge: bytes, issuer: object) -> None:
        with self._lock:
            self._outstanding[challenge] = issuer

    def _withdraw(self, challenge: bytes) -> None:
        with self._lock:
            self._outstanding.pop(challenge, None)


class _TokenCardView(Card):
    """One connection's use of a :class:`TokenCard`."""

    def __init__(self, card: TokenCard) -> None:
        self.name = card.name
        self._card = card
        self._challenge = b""
        # The token's answer to our own challenge, once the host-side check
        # asked for it: EXTERNAL AUTHENTICATE then compares with it.
        self._expected: tuple[int, bytes] | None = None

    def __repr__(self) -> str:
        return f"<TokenCard view {self.name!r}>"

    def get_challenge(self) -> bytes:
        self._forget()
        challenge = self._card.token.random(CHALLENGE_LENGTH)
        self._challenge = challenge
        self._card._issue(challenge, self)
        return challenge

    def internal_authenticate(self, key_ref: int, challenge: bytes) -> bytes:
        answer = self._card.internal_authenticate(key_ref, challenge, asker=self)
        if self._challenge and challenge == self._challenge:
            self._expected = (key_ref, answer)
        return answer

    def external_authenticate(self, key_ref: int, response: bytes) -> None:
        check_key_ref(key_ref)
        check_block("response", response)
        expected_for = self._expected
        challenge = self._forget()
        if not challenge:
            raise CardError(f"{self.name}: EXTERNAL AUTHENTICATE without a challenge")
        if expected_for is not None and expected_for[0] == key_ref:
            expected = expected_for[1]
        else:
            expected = self._card.token.ecb(key_label(KeyKind.AUTH, key_ref), challenge)
        if not crypto.constant_time_equal(expected, response):
            raise VerificationFailed(
                f"{self.name}: the peer's answer is wrong", 0x63, 0x00
            )

    def end_span(self) -> None:
        self._forget()

    def close(self) -> None:
        self._forget()

    def _forget(self) -> bytes:
        self._expected = None
        challenge, self._challenge = self._challenge, b""
        if challenge:
            self._card._withdraw(challenge)
        return challenge


# -- helpers ------------------------------------------------------------------

_LIBS: dict[str, tuple[Any, threading.RLock]] = {}
_LIBS_LOCK = threading.Lock()


def _load(module: str) -> tuple[Any, threading.RLock]:
    """The loaded PKCS#11 module and the lock every call into it takes.

    python-pkcs11 loads a module once per path and initialises it without
    CKF_OS_LOCKING_OK, so the module does no locking of its own: two
    threads calling it at once crash SoftHSM2.  Calls are serialised here.
    """
    with _LIBS_LOCK:
        loaded = _LIBS.get(module)
        if loaded is None:
            try:
                loaded = _LIBS[module] = (pkcs11.lib(module), threading.RLock())
            except (RuntimeError, OSError, p11.PKCS11Error) as exc:
                raise ConfigError(
                    f"cannot load PKCS#11 module {module}: "
                    + (_loaded_as(module) or str(exc))
                ) from None
        return loaded


def _loaded_as(module: str) -> str | None:
    """Why ``module`` cannot load when this process loaded its file under
    another name (a link, "//usr"): python-pkcs11 initialises a module once
    per name, and the second initialisation fails."""
    for name in _LIBS:
        with contextlib.suppress(OSError):
            if name != module and os.path.samefile(name, module):
                return f"this process loaded that file as {name}: use that name"
    return None


def _mechanism_name(mechanism: Mechanism) -> str:
    """The PKCS#11 name without CKM_ (python-pkcs11 writes single DES as
    ``_DES_CBC``; the standard and our settings say ``DES_CBC``)."""
    return mechanism.name.lstrip("_")


def _way_of(key_type: object) -> DesWay | None:
    return next((w for w in DES_WAYS if w.key_type == key_type), None)


def _key_template(
    way: DesWay, key: bytes, label: str, *, token: bool
) -> dict[Attribute, Any]:
    return {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: way.key_type,
        Attribute.VALUE: way.key_value(key),
        Attribute.LABEL: label,
        Attribute.TOKEN: token,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.ENCRYPT: True,
        Attribute.DECRYPT: True,
        Attribute.DERIVE: True,
        Attribute.SIGN: False,
        Attribute.VERIFY: False,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
    }


def _derive(base: _Key, way: DesWay, random: bytes) -> _Key:
    """parity(DES-ECB(K, R)) as a session key object of ``way``'s type."""
    param, _keepalive = _derivation_param(way.derive_data(random))
    derived = base.derive_key(
        way.key_type,
        64 * way.copies,
        capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
        mechanism=way.derive,
        mechanism_param=param,
        template={
            Attribute.VALUE_LEN: pkcs11.constants.DEFAULT,
            Attribute.TOKEN: False,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
            Attribute.DERIVE: False,
        },
    )
    assert isinstance(derived, pkcs11.SecretKey)
    return derived


class _Logins:
    """The PIN each token of this process was logged in with, as a keyed
    digest (the key lives and dies with the process), so that a second
    Token, which the module lets share that login without a PIN check, is
    held to the same PIN."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._digests: dict[tuple[str, bytes], bytes] = {}

    def _digest(self, pin: bytes) -> bytes:
        return hmac.new(self._key, pin, "sha256").digest()

    def record(self, login: tuple[str, bytes], pin: bytes) -> None:
        with self._lock:
            self._digests[login] = self._digest(pin)

    def forget(self, login: tuple[str, bytes]) -> None:
        with self._lock:
            self._digests.pop(login, None)

    def same_pin(self, login: tuple[str, bytes], pin: bytes) -> bool:
        """False if the login was made with another PIN; True also when it
        was made outside iscl (nothing to compare with)."""
        with self._lock:
            digest = self._digests.get(login)
        return digest is None or hmac.compare_digest(digest, self._digest(pin))


_LOGINS = _Logins()


def _handle(session: pkcs11.Session) -> int:
    """The session's CK_SESSION_HANDLE (python-pkcs11's stubs omit it)."""
    return int(session.handle)  # type: ignore[attr-defined]


def _login_refusal(rv: int) -> str:
    """Why C_Login failed, for the user (never with the PIN)."""
    if rv in (CKR_PIN_INCORRECT, CKR_PIN_INVALID, CKR_PIN_LEN_RANGE):
        return "the PIN was refused (C_Login)"
    if rv == CKR_PIN_LOCKED:
        return "the PIN is locked"
    return str(Pkcs11CallError("C_Login", rv))


def _close_quietly(session: pkcs11.Session) -> None:
    try:
        session.close()
    except p11.PKCS11Error as exc:
        log.debug("closing a PKCS#11 session: %s", type(exc).__name__)
