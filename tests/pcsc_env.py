"""A real PC/SC stack for the tests: pcscd, the two vpcd readers, soft cards.

Where no pcscd runs (CI, containers), the session starts its own
``pcscd --foreground`` as a child process and owns it: it can stop and
start it, and it ends it by PID when the session ends, tests failed or
not (a fixture finalizer, and ``atexit`` for an interrupted run).  Where a
pcscd already runs (systemd on a Debian desktop) it is used once it has
the vpcd readers; tests that must restart pcscd skip there.

The cards are :class:`softcard.vpcd.VpcdCardBridge` threads of the test
process connected to 127.0.0.1 (vpcd's ports 35963 and 35964), one per
reader slot, each in front of a :class:`SwappableCard` so a test can put
a card of another profile into a slot (remove, swap, insert).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from iscl_hw.pcsc import (
    VPCD_PORTS,
    VPCD_READERS,
    PcscContext,
    PcscdChild,
    PcscUnavailable,
    pcscd_binary,
    pcscd_running,
    vpcd_installed,
)
from softcard.cardfile import new_card_state
from softcard.emulator import SoftCard
from softcard.profiles import ProfiledCard, VirtualCard
from softcard.vpcd import VpcdCardBridge

__all__ = [
    "PcscEnv",
    "Slot",
    "SwappableCard",
    "pcsc_env",
    "profiled_card",
    "unavailable_reason",
]

_WAIT: float = 10.0
_POLL: float = 0.01


def unavailable_reason() -> str | None:
    """Why the PC/SC tests cannot run here, or None."""
    if importlib.util.find_spec("smartcard") is None:
        return "pyscard is not installed (pip install -e '.[pcsc]')"
    if pcscd_binary() is None:
        return "pcscd is not installed (scripts/test.sh installs it as root)"
    if not vpcd_installed():
        return "vsmartcard-vpcd is not installed (scripts/test.sh installs it)"
    return None


def profiled_card(auth_keys: dict[int, bytes], profile: str = "plain") -> ProfiledCard:
    """A fresh in-memory soft card behind ``profile``."""
    return ProfiledCard(SoftCard(new_card_state(auth_keys, profile=profile)), profile)


class SwappableCard:
    """A VirtualCard that forwards to whichever card is in it now."""

    def __init__(self, card: VirtualCard) -> None:
        self.card = card
        #: Called with each command before the card sees it (fault injection).
        self.hook: Callable[[bytes], None] | None = None

    @property
    def ATR(self) -> bytes:  # noqa: N802 - the ISO name
        return self.card.ATR

    def reset(self) -> bytes:
        return self.card.reset()

    def transmit(self, command: bytes) -> bytes:
        hook = self.hook
        if hook is not None:
            hook(command)
        return self.card.transmit(command)


@dataclass
class Slot:
    """One vpcd reader slot with its bridge."""

    reader: str
    port: int
    holder: SwappableCard
    bridge: VpcdCardBridge


@dataclass
class PcscEnv:
    """The PC/SC stack of the session."""

    owns_pcscd: bool
    child: PcscdChild | None
    slots: list[Slot] = field(default_factory=list)
    log_path: Path | None = None

    # -- cards ------------------------------------------------------------------

    def card_present(self, reader: str) -> bool:
        try:
            with PcscContext() as context:
                state, _atr = context.states([reader])[reader]
        except (PcscUnavailable, KeyError):
            return False
        return bool(state & 0x20)

    def wait_card(self, slot: int, present: bool = True, wait: float = _WAIT) -> None:
        reader = self.slots[slot].reader
        deadline = time.monotonic() + wait
        while self.card_present(reader) != present:
            if time.monotonic() > deadline:
                state = "in" if present else "out of"
                raise AssertionError(f"no card went {state} {reader} in {wait} s")
            time.sleep(_POLL)

    def put(self, slot: int, card: VirtualCard) -> None:
        """Put ``card`` into ``slot``.  A card with another ATR is swapped
        the slow way (the old one pulled out, pcscd sees the new one come
        in); one with the same ATR is swapped at once and reset."""
        entry = self.slots[slot]
        entry.holder.hook = None
        if card.ATR == entry.holder.card.ATR and self.card_present(entry.reader):
            card.reset()
            entry.holder.card = card
            return
        entry.bridge.remove()
        self.wait_card(slot, present=False)
        entry.holder.card = card
        entry.bridge.insert()
        self.wait_card(slot)

    def remove(self, slot: int) -> None:
        self.slots[slot].bridge.remove()

    def insert(self, slot: int) -> None:
        self.slots[slot].holder.hook = None
        self.slots[slot].bridge.insert()
        self.wait_card(slot)

    # -- pcscd ------------------------------------------------------------------

    def restart_pcscd(self) -> None:
        """Stop the owned pcscd and start a new one (the bridges reconnect)."""
        if self.child is None:
            pytest.skip("pcscd is the system's, not this run's: cannot restart it")
        self.child.stop()
        self.child.start()
        for index in range(len(self.slots)):
            self.wait_card(index)

    def close(self) -> None:
        for slot in self.slots:
            slot.bridge.stop()
        if self.child is not None:
            self.child.stop()


def _dummy_card() -> ProfiledCard:
    return profiled_card({1: bytes(8)})


def _start(tmp: Path) -> PcscEnv:
    if pcscd_running():
        with PcscContext() as context:
            readers = context.readers()
        missing = [r for r in VPCD_READERS if r not in readers]
        if missing:
            pytest.skip(
                f"the running pcscd lacks {missing}: restart it after installing "
                "vsmartcard-vpcd (sudo systemctl restart pcscd)"
            )
        env = PcscEnv(owns_pcscd=False, child=None)
    else:
        log_path = tmp / "pcscd.log"
        child = PcscdChild(log_path=log_path)
        child.start()
        atexit.register(child.stop)
        env = PcscEnv(owns_pcscd=True, child=child, log_path=log_path)
    try:
        _plug_cards(env)
    except BaseException:
        env.close()
        raise
    return env


def _plug_cards(env: PcscEnv) -> None:
    for reader, port in zip(VPCD_READERS, VPCD_PORTS, strict=True):
        holder = SwappableCard(_dummy_card())
        bridge = VpcdCardBridge(holder, "127.0.0.1", port, reconnect=True)
        env.slots.append(Slot(reader, port, holder, bridge))
        bridge.start()
    for index in range(len(env.slots)):
        env.wait_card(index)


_LOCK = threading.Lock()


@pytest.fixture(scope="session")
def pcsc_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PcscEnv]:
    """The session's PC/SC stack; skips with the reason when not installed."""
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI provides pcscd and vpcd, but: {reason}")
        pytest.skip(reason)
    with _LOCK:
        env = _start(tmp_path_factory.mktemp("pcscd"))
    try:
        yield env
    finally:
        env.close()
