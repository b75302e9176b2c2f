"""SoftHSM2 tokens kept in a directory of the user's choosing.

SoftHSM reads its configuration file, named by ``SOFTHSM2_CONF``, when the
module is initialised, and a process keeps the module loaded and
initialised for good (python-pkcs11 caches it).  So :func:`use_config` must
run before anything loads the module, and it refuses a second, different
configuration once the module is in the process.

python-pkcs11 has no call for C_InitToken and C_InitPIN, nor C_Login on
an open session, so :func:`init_token` and :class:`~iscl_hw.hsm.Token`
call the module through ``ctypes`` (:func:`functions`; the structures
below follow PKCS#11 v2.40 on Unix: natively aligned, CK_ULONG is
``unsigned long``).  PINs never appear in messages, reprs or logs.

SoftHSM 2.6.1, as measured: a token made here is visible at once to
python-pkcs11 in the same process (SoftHSM offers a new free slot after
each C_InitToken, so a process can make several); a token made by another
process is seen only after the module is next initialised (SoftHSM reads
the token directory at C_Initialize); and a token's slot ID changes when
the module is next initialised (it is then derived from the serial), so
look tokens up by label, never by slot ID.
"""

from __future__ import annotations

import ctypes
import os
import sysconfig
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from iscl_hw.errors import ConfigError

__all__ = [
    "CONF_ENV",
    "MODULE_ENV",
    "Pkcs11CallError",
    "Pkcs11Functions",
    "find_module",
    "functions",
    "init_token",
    "token_labels",
    "use_config",
    "write_config",
]

CONF_ENV: Final = "SOFTHSM2_CONF"
MODULE_ENV: Final = "ISCL_PKCS11_MODULE"
CONF_NAME: Final = "softhsm2.conf"
TOKENS_DIR: Final = "tokens"
LABEL_SIZE: Final = 32

_MODULE_PATHS: Final = (
    "/usr/lib/softhsm/libsofthsm2.so",  # Debian, Ubuntu
    f"/usr/lib/{sysconfig.get_config_var('MULTIARCH') or 'x86_64-linux-gnu'}"
    "/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",  # Fedora, RHEL
    "/usr/lib64/softhsm/libsofthsm.so",
    "/usr/lib/pkcs11/libsofthsm2.so",  # Arch
    "/usr/local/lib/softhsm/libsofthsm2.so",  # source builds, FreeBSD
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",  # macOS Homebrew
    "/usr/local/opt/softhsm/lib/softhsm/libsofthsm2.so",
)

# CK_RV values and flags (PKCS#11 v2.40 section 3, pkcs11t.h).
CKR_OK: Final = 0x000
CKR_PIN_INCORRECT: Final = 0x0A0
CKR_PIN_INVALID: Final = 0x0A1
CKR_PIN_LEN_RANGE: Final = 0x0A2
CKR_PIN_LOCKED: Final = 0x0A4
CKR_USER_ALREADY_LOGGED_IN: Final = 0x100
CKR_USER_NOT_LOGGED_IN: Final = 0x101
CKR_CRYPTOKI_ALREADY_INITIALIZED: Final = 0x191
CKF_TOKEN_INITIALIZED: Final = 0x400
CKF_RW_SESSION: Final = 0x2
CKF_SERIAL_SESSION: Final = 0x4
CKU_SO: Final = 0
CKU_USER: Final = 1
_RV_NAMES: Final = {
    0x002: "CKR_HOST_MEMORY",
    0x003: "CKR_SLOT_ID_INVALID",
    0x005: "CKR_GENERAL_ERROR",
    0x006: "CKR_FUNCTION_FAILED",
    0x007: "CKR_ARGUMENTS_BAD",
    0x030: "CKR_DEVICE_ERROR",
    0x031: "CKR_DEVICE_MEMORY",
    0x032: "CKR_DEVICE_REMOVED",
    0x0A0: "CKR_PIN_INCORRECT",
    0x0A1: "CKR_PIN_INVALID",
    0x0A2: "CKR_PIN_LEN_RANGE",
    0x0A3: "CKR_PIN_EXPIRED",
    0x0A4: "CKR_PIN_LOCKED",
    0x0B3: "CKR_SESSION_HANDLE_INVALID",
    0x0B6: "CKR_SESSION_EXISTS",
    0x0B7: "CKR_SESSION_READ_ONLY_EXISTS",
    0x0E0: "CKR_TOKEN_NOT_PRESENT",
    0x0E2: "CKR_TOKEN_WRITE_PROTECTED",
    0x100: "CKR_USER_ALREADY_LOGGED_IN",
    0x101: "CKR_USER_NOT_LOGGED_IN",
    0x102: "CKR_USER_PIN_NOT_INITIALIZED",
    0x190: "CKR_CRYPTOKI_NOT_INITIALIZED",
}

# CK_FUNCTION_LIST: a CK_VERSION, then one pointer per function in this order.
_FUNCTIONS: Final = (
    "C_Initialize C_Finalize C_GetInfo C_GetFunctionList C_GetSlotList "
    "C_GetSlotInfo C_GetTokenInfo C_GetMechanismList C_GetMechanismInfo "
    "C_InitToken C_InitPIN C_SetPIN C_OpenSession C_CloseSession "
    "C_CloseAllSessions C_GetSessionInfo C_GetOperationState "
    "C_SetOperationState C_Login C_Logout C_CreateObject C_CopyObject "
    "C_DestroyObject C_GetObjectSize C_GetAttributeValue C_SetAttributeValue "
    "C_FindObjectsInit C_FindObjects C_FindObjectsFinal C_EncryptInit C_Encrypt "
    "C_EncryptUpdate C_EncryptFinal C_DecryptInit C_Decrypt C_DecryptUpdate "
    "C_DecryptFinal C_DigestInit C_Digest C_DigestUpdate C_DigestKey "
    "C_DigestFinal C_SignInit C_Sign C_SignUpdate C_SignFinal C_SignRecoverInit "
    "C_SignRecover C_VerifyInit C_Verify C_VerifyUpdate C_VerifyFinal "
    "C_VerifyRecoverInit C_VerifyRecover C_DigestEncryptUpdate "
    "C_DecryptDigestUpdate C_SignEncryptUpdate C_DecryptVerifyUpdate "
    "C_GenerateKey C_GenerateKeyPair C_WrapKey C_UnwrapKey C_DeriveKey "
    "C_SeedRandom C_GenerateRandom C_GetFunctionStatus C_CancelFunction "
    "C_WaitForSlotEvent"
).split()

_ULONG = ctypes.c_ulong
_PTR = ctypes.c_void_p
_BYTES = ctypes.c_char_p
_PULONG = ctypes.POINTER(ctypes.c_ulong)
# The prototypes of the functions used here (all return CK_RV).
_PROTOTYPES: Final[dict[str, tuple[Any, ...]]] = {
    "C_Initialize": (_PTR,),
    "C_Finalize": (_PTR,),
    "C_GetSlotList": (ctypes.c_ubyte, _PULONG, _PULONG),
    "C_GetTokenInfo": (_ULONG, _PTR),
    "C_InitToken": (_ULONG, _BYTES, _ULONG, _BYTES),
    "C_InitPIN": (_ULONG, _BYTES, _ULONG),
    "C_OpenSession": (_ULONG, _ULONG, _PTR, _PTR, _PULONG),
    "C_CloseSession": (_ULONG,),
    "C_GetSessionInfo": (_ULONG, _PTR),
    "C_Login": (_ULONG, _ULONG, _BYTES, _ULONG),
    "C_Logout": (_ULONG,),
}


class CkVersion(ctypes.Structure):
    _fields_ = (("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte))


class CkFunctionList(ctypes.Structure):
    _fields_ = (("version", CkVersion), *((name, _PTR) for name in _FUNCTIONS))


class CkSessionInfo(ctypes.Structure):
    _fields_ = (
        ("slotID", _ULONG),
        ("state", _ULONG),
        ("flags", _ULONG),
        ("ulDeviceError", _ULONG),
    )


class CkTokenInfo(ctypes.Structure):
    _fields_ = (
        ("label", ctypes.c_char * 32),
        ("manufacturerID", ctypes.c_char * 32),
        ("model", ctypes.c_char * 16),
        ("serialNumber", ctypes.c_char * 16),
        ("flags", _ULONG),
        ("ulMaxSessionCount", _ULONG),
        ("ulSessionCount", _ULONG),
        ("ulMaxRwSessionCount", _ULONG),
        ("ulRwSessionCount", _ULONG),
        ("ulMaxPinLen", _ULONG),
        ("ulMinPinLen", _ULONG),
        ("ulTotalPublicMemory", _ULONG),
        ("ulFreePublicMemory", _ULONG),
        ("ulTotalPrivateMemory", _ULONG),
        ("ulFreePrivateMemory", _ULONG),
        ("hardwareVersion", CkVersion),
        ("firmwareVersion", CkVersion),
        ("utcTime", ctypes.c_char * 16),
    )


class Pkcs11CallError(ConfigError):
    """A PKCS#11 function returned an error; ``rv`` is its CK_RV."""

    def __init__(self, function: str, rv: int, note: str = "") -> None:
        name = _RV_NAMES.get(rv, "CKR_?")
        super().__init__(f"{function} failed: {name} (0x{rv:08X}){note}")
        self.function = function
        self.rv = rv


# ------------------------------------------------------------ module, config


def find_module() -> Path:
    """The SoftHSM2 PKCS#11 module: ``$ISCL_PKCS11_MODULE`` or a known path."""
    override = os.environ.get(MODULE_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise ConfigError(f"{MODULE_ENV}={override}: no such file")
        return path
    for candidate in _MODULE_PATHS:
        if os.path.isfile(candidate):
            return Path(candidate)
    raise ConfigError(
        "SoftHSM2 PKCS#11 module libsofthsm2.so not found; install softhsm2 "
        f"(apt install softhsm2) or set {MODULE_ENV} to its path"
    )


def write_config(directory: Path) -> Path:
    """Create ``directory/tokens`` (0700) and ``directory/softhsm2.conf``.

    An existing configuration for the same token directory is kept as it
    is (a second token goes into the same directory); one naming another
    token directory is refused.  Returns the configuration path.
    """
    directory = Path(directory).absolute()
    tokens = directory / TOKENS_DIR
    if "\n" in str(tokens):
        raise ConfigError("the HSM directory name must not contain a newline")
    tokens.mkdir(mode=0o700, parents=True, exist_ok=True)
    tokens.chmod(0o700)
    conf = directory / CONF_NAME
    if conf.exists():
        found = _tokendir(conf)
        if found is None or Path(found) != tokens:
            raise ConfigError(f"{conf} exists and names another token directory")
        return conf
    # "x": never through a link left dangling in the configuration's place.
    with conf.open("x", encoding="utf-8") as handle:
        handle.write(
            f"directories.tokendir = {tokens}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n"
        )
    return conf


def _tokendir(conf: Path) -> str | None:
    for line in conf.read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "directories.tokendir":
            return value.strip()
    return None


_LOCK = threading.RLock()
_NOT_LOADED: Final = "<not loaded>"
#: The SOFTHSM2_CONF value (None: unset) the loaded module was initialised
#: with; _NOT_LOADED while this process has not loaded it.
_loaded_conf: str | None = _NOT_LOADED


def _module_mapped() -> bool:
    """Whether a SoftHSM library is mapped into this process (Linux)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any("libsofthsm" in line for line in maps)
    except OSError:
        return False


def _conf_in_force() -> str | None:
    """The configuration the loaded module uses; _NOT_LOADED if none is."""
    global _loaded_conf
    if _loaded_conf == _NOT_LOADED and _module_mapped():
        # Loaded by someone else (python-pkcs11): it read the variable as it
        # is now, unless it was changed behind this module's back.
        _loaded_conf = os.environ.get(CONF_ENV)
    return _loaded_conf


def use_config(conf_path: Path) -> None:
    """Set ``SOFTHSM2_CONF`` for the SoftHSM module this process will load.

    Refuses (ConfigError) when the module is already loaded with another
    configuration: SoftHSM keeps the one it was initialised with.
    """
    conf = str(Path(conf_path).absolute())
    if not os.path.isfile(conf):
        raise ConfigError(f"SoftHSM configuration {conf} does not exist")
    with _LOCK:
        current = _conf_in_force()
        if current != _NOT_LOADED and current != conf:
            used = current or "the default configuration"
            raise ConfigError(
                f"SoftHSM is already loaded in this process with {used}; "
                f"{CONF_ENV} must name {conf} before the module is loaded"
            )
        os.environ[CONF_ENV] = conf


# ----------------------------------------------------------------- tokens


class Pkcs11Functions:
    """A module's PKCS#11 functions called through its function list: the
    few that python-pkcs11 does not offer.  Loading the module's file again
    gives the instance python-pkcs11 already loaded, so its session handles
    are valid here."""

    def __init__(self, path: Path) -> None:
        try:
            self._dll = ctypes.CDLL(str(path))
            get_list = self._dll.C_GetFunctionList
        except (OSError, AttributeError) as exc:
            raise ConfigError(f"cannot load PKCS#11 module {path}: {exc}") from None
        table = ctypes.POINTER(CkFunctionList)()
        get_list.restype = _ULONG
        get_list.argtypes = (ctypes.POINTER(ctypes.POINTER(CkFunctionList)),)
        self._check("C_GetFunctionList", get_list(ctypes.byref(table)))
        self.table = table.contents

    def call(self, name: str, *args: Any) -> int:
        """Call ``name``; returns its CK_RV."""
        prototype = ctypes.CFUNCTYPE(_ULONG, *_PROTOTYPES[name])
        pointer = getattr(self.table, name)
        if not pointer:
            raise ConfigError(f"the PKCS#11 module has no {name}")
        return int(prototype(pointer)(*args))

    def check(self, name: str, *args: Any) -> None:
        self._check(name, self.call(name, *args))

    @staticmethod
    def _check(name: str, rv: int) -> None:
        if rv != CKR_OK:
            raise Pkcs11CallError(name, rv)

    def slots(self) -> list[int]:
        count = _ULONG(0)
        self.check("C_GetSlotList", 1, None, ctypes.byref(count))
        ids = (_ULONG * max(count.value, 1))()
        self.check("C_GetSlotList", 1, ids, ctypes.byref(count))
        return [int(slot) for slot in ids[: count.value]]

    def token_info(self, slot: int) -> CkTokenInfo:
        info = CkTokenInfo()
        self.check("C_GetTokenInfo", slot, ctypes.byref(info))
        return info


_modules: dict[Path, Pkcs11Functions] = {}


def functions(path: str | Path) -> Pkcs11Functions:
    """The function list of the module at ``path`` (loaded once)."""
    path = Path(path)
    with _LOCK:
        module = _modules.get(path)
        if module is None:
            module = _modules[path] = Pkcs11Functions(path)
        return module


@contextmanager
def _initialised(path: Path) -> Iterator[Pkcs11Functions]:
    """The module, C_Initialize'd; finalised afterwards only if this did it."""
    global _loaded_conf
    with _LOCK:
        _conf_in_force()
        path = Path(path)
        module = functions(path)
        rv = module.call("C_Initialize", None)
        if rv not in (CKR_OK, CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise Pkcs11CallError("C_Initialize", rv)
        if _loaded_conf == _NOT_LOADED:
            _loaded_conf = os.environ.get(CONF_ENV)
        try:
            yield module
        finally:
            if rv == CKR_OK:
                module.call("C_Finalize", None)


def _label(info: CkTokenInfo) -> str:
    return bytes(info.label).decode("utf-8", "replace").rstrip(" ")


def token_labels(module_path: Path) -> list[str]:
    """Labels of the initialised tokens the module offers now."""
    with _initialised(module_path) as module:
        infos = [module.token_info(slot) for slot in module.slots()]
    return [_label(i) for i in infos if i.flags & CKF_TOKEN_INITIALIZED]


def _padded_label(label: str) -> bytes:
    raw = label.encode("utf-8")
    if not raw or len(raw) > LABEL_SIZE:
        raise ConfigError(f"a token label has 1..{LABEL_SIZE} UTF-8 bytes")
    if label != label.strip(" ") or "\0" in label:
        raise ConfigError("a token label must not start or end with a space")
    return raw.ljust(LABEL_SIZE, b" ")


def init_token(module_path: Path, label: str, so_pin: bytes, user_pin: bytes) -> None:
    """Initialise a free SoftHSM slot as token ``label`` with both PINs.

    Call :func:`use_config` first.  Refuses a label an initialised token
    already has, and PINs outside the token's length bounds.
    """
    padded = _padded_label(label)
    if not so_pin or not user_pin:
        raise ConfigError("the SO PIN and the user PIN must not be empty")
    with _initialised(module_path) as module:
        free = None
        for slot in module.slots():
            info = module.token_info(slot)
            if not info.flags & CKF_TOKEN_INITIALIZED:
                free = slot if free is None else free
            elif _label(info) == label:
                raise ConfigError(f"a token labelled {label!r} already exists")
        if free is None:
            raise ConfigError("the PKCS#11 module offers no uninitialised token")
        _check_pin_lengths(module.token_info(free), so_pin, user_pin)
        module.check("C_InitToken", free, so_pin, len(so_pin), padded)
        _set_user_pin(module, free, label, so_pin, user_pin)


def _check_pin_lengths(info: CkTokenInfo, so_pin: bytes, user_pin: bytes) -> None:
    low, high = info.ulMinPinLen, info.ulMaxPinLen
    for name, pin in (("SO PIN", so_pin), ("user PIN", user_pin)):
        if not low <= len(pin) <= high:
            raise ConfigError(f"the {name} must have {low}..{high} bytes")


def _set_user_pin(
    module: Pkcs11Functions, slot: int, label: str, so_pin: bytes, user_pin: bytes
) -> None:
    session = _ULONG(0)
    flags = CKF_RW_SESSION | CKF_SERIAL_SESSION
    module.check("C_OpenSession", slot, flags, None, None, ctypes.byref(session))
    try:
        module.check("C_Login", session, CKU_SO, so_pin, len(so_pin))
        try:
            rv = module.call("C_InitPIN", session, user_pin, len(user_pin))
            if rv != CKR_OK:
                note = f"; token {label!r} is initialised but has no user PIN"
                raise Pkcs11CallError("C_InitPIN", rv, note)
        finally:
            module.call("C_Logout", session)
    finally:
        module.call("C_CloseSession", session)
