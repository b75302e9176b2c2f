"""SoftHSM2 tokens for the tests, made with :mod:`iscl_hw.softhsm`.

SoftHSM reads ``SOFTHSM2_CONF`` when the module is initialised, and a
process keeps the module it loaded (python-pkcs11 caches it), so one pytest
process has one SoftHSM configuration: the session fixture :func:`hsm`
makes one session-scoped directory, points ``SOFTHSM2_CONF`` at it once,
and each test takes its own token (a distinct label) in it with
:meth:`HsmSession.token` or the :func:`hsm_token` fixture.  Request
``hsm`` before anything loads libsofthsm2; a module loaded with another
configuration makes it fail (``use_config`` refuses).

What SoftHSM 2.6.1 does with tokens made in the same process (measured):

* A token made by :func:`~iscl_hw.softhsm.init_token` is at once visible to
  python-pkcs11's ``lib.get_token(token_label=...)``, whether python-pkcs11
  loaded the module before the token was made or after.  After each
  C_InitToken SoftHSM offers a new uninitialised slot, so one process can
  make any number of tokens; earlier tokens and their keys stay usable.
* Tokens move slots.  While the module stays initialised a new token keeps
  the slot ID it was initialised in (0, then 1, ...).  Once the module is
  initialised again (a new process, or ``init_token``'s own C_Initialize /
  C_Finalize when nothing else had the module initialised), SoftHSM puts
  each token in a slot whose ID it derives from the token's serial (e.g.
  1896564382) and the free slot gets a small ID.  Find tokens by label,
  never by slot ID.
* A token another process makes in the same directory (``iscl hsm init``
  in a subprocess) is NOT visible to a process that already initialised the
  module: SoftHSM reads the token directory only at C_Initialize.  Tests
  that make tokens in a subprocess therefore use their own directory and
  look at those tokens from a subprocess too.

This module is the same object whether imported as ``hsm_env`` (tests/ on
``sys.path``, the project's style) or as ``tests.hsm_env``, and the session
state lives in it, not in the fixture: pytest runs a session fixture
imported into several test modules once per module.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from iscl_hw import softhsm
from iscl_hw.errors import ConfigError

__all__ = [
    "SO_PIN",
    "USER_PIN",
    "HsmSession",
    "HsmToken",
    "hsm",
    "hsm_token",
    "make_token",
    "unavailable_reason",
]

for _name in ("hsm_env", "tests.hsm_env"):
    sys.modules.setdefault(_name, sys.modules[__name__])

SO_PIN = b"so-pin-8642"
USER_PIN = b"user-pin-1357"


@dataclass(frozen=True)
class HsmToken:
    """A SoftHSM token: where its configuration and module are, its PINs."""

    conf: Path
    module: Path
    label: str
    pin: bytes = field(repr=False)
    so_pin: bytes = field(default=SO_PIN, repr=False)

    def lib(self) -> Any:
        """The python-pkcs11 ``lib`` of the module (loaded once a process)."""
        import pkcs11

        return pkcs11.lib(str(self.module))

    def token(self) -> Any:
        """The python-pkcs11 ``Token`` with this label."""
        return self.lib().get_token(token_label=self.label)

    def open(self, rw: bool = False) -> Any:
        """A python-pkcs11 session logged in with the user PIN (``with`` it)."""
        return self.token().open(user_pin=self.pin.decode(), rw=rw)


def unavailable_reason() -> str | None:
    """Why the SoftHSM tests cannot run here, or None."""
    if importlib.util.find_spec("pkcs11") is None:
        return "python-pkcs11 is not installed (pip install -e '.[pkcs11]')"
    try:
        softhsm.find_module()
    except ConfigError as exc:
        return str(exc)
    return None


def make_token(
    tmp_path: Path, label: str, so_pin: bytes = SO_PIN, pin: bytes = USER_PIN
) -> HsmToken:
    """Make token ``label`` in the SoftHSM directory ``tmp_path``.

    Within one process every call must name the same directory (in tests:
    ``hsm.directory``); another one is refused once the module is loaded.
    """
    module = softhsm.find_module()
    conf = softhsm.write_config(tmp_path)
    softhsm.use_config(conf)
    softhsm.init_token(module, label, so_pin, pin)
    return HsmToken(conf=conf, module=module, label=label, pin=pin, so_pin=so_pin)


@dataclass
class HsmSession:
    """The test process's SoftHSM directory; hands out fresh tokens."""

    directory: Path
    conf: Path
    module: Path
    _numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def token(
        self, prefix: str = "test", so_pin: bytes = SO_PIN, pin: bytes = USER_PIN
    ) -> HsmToken:
        """A new token labelled ``<prefix>-<n>``, unique in the session."""
        with self._lock:
            label = f"{prefix}-{next(self._numbers)}"
            return make_token(self.directory, label, so_pin, pin)


_session: HsmSession | None = None
_session_lock = threading.Lock()


def session_for(factory: pytest.TempPathFactory) -> HsmSession:
    """The process's :class:`HsmSession`, made on first use."""
    global _session
    with _session_lock:
        if _session is None:
            directory = factory.mktemp("softhsm")
            conf = softhsm.write_config(directory)
            softhsm.use_config(conf)
            _session = HsmSession(directory, conf, softhsm.find_module())
        return _session


@pytest.fixture(scope="session")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> HsmSession:
    """The session's SoftHSM directory; skips with the reason when absent."""
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI provides SoftHSM2, but: {reason}")
        pytest.skip(reason)
    return session_for(tmp_path_factory)


@pytest.fixture
def hsm_token(hsm: HsmSession) -> HsmToken:
    """A fresh token of the session for one test."""
    return hsm.token()
