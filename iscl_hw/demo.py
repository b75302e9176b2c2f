"""``iscl demo``: two ISCL peers on 127.0.0.1, each with its own virtual card,
authenticate each other with real APDUs and move a DICOM file.

Keys are drawn at random for the run and live only in a temporary
directory; the trace shows APDUs and frames, never keys or payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from iscl_hw import aio, eventloop
from iscl_hw.card import ApduCard, Card
from iscl_hw.constants import KEY_INDEXES
from iscl_hw.demo_hsm import token_peers
from iscl_hw.errors import ConfigError, IsclError, LineClosed
from iscl_hw.filexfer import DEFAULT_CHUNK_SIZE, Manifest, receive_file, send_file
from iscl_hw.keyfile import load_key_file, write_key_file
from iscl_hw.settings import KeyProvider, Settings
from softcard.cardfile import create_card_file
from softcard.emulator import SoftCard

if TYPE_CHECKING:
    from iscl_hw.pcsc import VpcdSlot

__all__ = ["BACKENDS", "default_dicom_file", "run_demo"]

#: Where the demo's two cards live.
BACKENDS = ("softcard", "pcsc", "pkcs11")

log = logging.getLogger(__name__)

_DEFAULT_DICOM = "examples_overlay.dcm"
# How long a card that just left a vpcd reader may still show in pcscd.
_STALE_CARD_WAIT = 1.0


def default_dicom_file() -> Path:
    """A DICOM file shipped inside the pydicom wheel (no download)."""
    import pydicom.data

    path = Path(pydicom.data.__file__).parent / "test_files" / _DEFAULT_DICOM
    if not path.is_file():
        raise FileNotFoundError(f"pydicom does not ship {_DEFAULT_DICOM}")
    return path


@dataclass
class _Peer:
    name: str
    card_path: Path
    key_path: Path


def _make_peers(directory: Path) -> list[_Peer]:
    """Card and key files for both peers, sharing freshly drawn keys."""
    auth_keys = {index: os.urandom(8) for index in KEY_INDEXES}
    enc_keys = {index: os.urandom(8) for index in KEY_INDEXES}
    peers = []
    for name in ("server", "client"):
        peer = _Peer(name, directory / f"{name}.card", directory / f"{name}.keys")
        create_card_file(peer.card_path, auth_keys)
        write_key_file(peer.key_path, enc_keys)
        peers.append(peer)
    return peers


class _TraceFilter(logging.Filter):
    """Shows handshake and disconnection frames; data frames only in --trace."""

    def __init__(self, everything: bool) -> None:
        super().__init__()
        self.everything = everything
        self.transfer = False

    def filter(self, record: logging.LogRecord) -> bool:
        return self.everything or not self.transfer


@contextlib.contextmanager
def _tracing(out: TextIO, everything: bool) -> Iterator[_TraceFilter]:
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("    %(message)s"))
    trace_filter = _TraceFilter(everything)
    handler.addFilter(trace_filter)
    loggers = [logging.getLogger("iscl_hw.card"), logging.getLogger("iscl_hw.core")]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
    try:
        yield trace_filter
    finally:
        for logger, (level, propagate) in zip(loggers, saved, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


@contextlib.contextmanager
def _softcards(server: _Peer, client: _Peer, out: TextIO) -> Iterator[list[Card]]:
    print("\n[1] opening both virtual cards (SELECT by AID)", file=out)
    server_card = ApduCard(SoftCard.from_file(server.card_path), name="server card")
    try:
        client_card = ApduCard(SoftCard.from_file(client.card_path), name="client card")
    except BaseException:
        server_card.close()
        raise
    try:
        yield [server_card, client_card]
    finally:
        server_card.close()
        client_card.close()


@contextlib.contextmanager
def _pcsc_cards(server: _Peer, client: _Peer, out: TextIO) -> Iterator[list[Card]]:
    """Both cards served through the two vpcd readers of one pcscd; a pcscd
    is started as a child (and stopped at the end) when none runs.  vpcd
    readers that already have a card (another ``iscl card serve``) are not
    used: with fewer than two free the demo stops and says which."""
    from iscl_hw import pcsc
    from softcard.profiles import open_card
    from softcard.vpcd import ACCEPT_WAIT, VpcdCardBridge

    if not pcsc.vpcd_installed():
        raise ConfigError(
            "the pcsc backend needs vsmartcard-vpcd (apt-get install "
            "--no-install-recommends pcscd vsmartcard-vpcd)"
        )
    with contextlib.ExitStack() as stack:
        if not pcsc.pcscd_running():
            child = stack.enter_context(pcsc.PcscdChild())
            print(f"  started pcscd (PID {child.pid}); stopped at the end", file=out)
        slots = _free_vpcd_slots(pcsc.vpcd_slots(settle=_STALE_CARD_WAIT))
        print("\n[1] both cards into the vpcd readers (SELECT by AID)", file=out)
        cards: list[Card] = []
        for peer, slot in zip((server, client), slots, strict=True):
            bridge = VpcdCardBridge(
                open_card(peer.card_path),
                "127.0.0.1",
                slot.port,
                accept_timeout=ACCEPT_WAIT,
            )
            bridge.start()
            stack.callback(bridge.stop)
            # Only once vpcd took our card is the card in that reader ours.
            if not bridge.wait_accepted(ACCEPT_WAIT + 1):
                reason = bridge.failure or "it did not take the card"
                raise ConfigError(f"vpcd reader {slot.reader!r}: {reason}")
            card = pcsc.PcscCard(slot.reader, name=f"{peer.name} card")
            stack.callback(card.close)
            print(f"  {peer.name} card in {slot.reader!r}, T={card.protocol}", file=out)
            cards.append(card)
        yield cards


def _free_vpcd_slots(slots: list[VpcdSlot]) -> list[VpcdSlot]:
    """The two vpcd slots the demo may use, or a ConfigError saying why not."""
    free = [slot for slot in slots if not slot.has_card]
    if len(free) >= 2:
        return free[:2]
    taken = [slot for slot in slots if slot.has_card]
    if taken:
        names = ", ".join(f"{s.reader!r} (port {s.port})" for s in taken)
        raise ConfigError(
            f"the pcsc demo needs two free vpcd readers, but {names} already "
            f"{'has' if len(taken) == 1 else 'have'} a card (another 'iscl card "
            "serve'?); stop it, or run the demo with --backend softcard"
        )
    raise ConfigError(
        "the running pcscd lacks the vpcd readers; restart it after installing "
        "vsmartcard-vpcd (systemctl restart pcscd)"
    )


async def _run(
    source: Path,
    directory: Path,
    chunk_size: int,
    out: TextIO,
    trace: _TraceFilter,
    backend: str = "softcard",
) -> int:
    server, client = _make_peers(directory)
    print(f"  card and key files (0600, random keys): {directory}", file=out)
    received_dir = directory / "received"
    received_dir.mkdir()
    settings = Settings()
    print(
        f"  protection: {settings.encryption.name} + {settings.mac.name}, "
        f"key index {settings.encryption_key_index}, "
        f"authentication key {settings.auth_key_index}",
        file=out,
    )

    with _open_backend(backend, directory, server, client, out) as sides:
        return await _exchange(
            source,
            sides,
            received_dir,
            settings,
            chunk_size,
            out,
            trace,
        )


@contextlib.contextmanager
def _open_backend(
    backend: str, directory: Path, server: _Peer, client: _Peer, out: TextIO
) -> Iterator[_Sides]:
    """Both peers' cards and encryption keys, from ``backend``."""
    if backend == "pkcs11":
        peers = [(p.name, p.card_path, p.key_path) for p in (server, client)]
        with token_peers(directory, peers, out) as tokens:
            (server_card, server_keys), (client_card, client_keys) = tokens
            yield _Sides(server_card, client_card, server_keys, client_keys)
        return
    opener = _pcsc_cards if backend == "pcsc" else _softcards
    with opener(server, client, out) as (server_card, client_card):
        yield _Sides(
            server_card,
            client_card,
            load_key_file(server.key_path),
            load_key_file(client.key_path),
        )


@dataclass(frozen=True)
class _Sides:
    server_card: Card
    client_card: Card
    server_keys: KeyProvider
    client_keys: KeyProvider


async def _exchange(
    source: Path,
    sides: _Sides,
    received_dir: Path,
    settings: Settings,
    chunk_size: int,
    out: TextIO,
    trace: _TraceFilter,
) -> int:
    outcome: asyncio.Future[tuple[Manifest, Path]] = (
        asyncio.get_running_loop().create_future()
    )

    async def handle(channel: aio.AsyncChannel) -> None:
        try:
            outcome.set_result(await receive_file(channel, received_dir))
        except IsclError as exc:
            outcome.set_exception(exc)
            return
        with contextlib.suppress(LineClosed):
            await channel.recv()

    listener = await aio.start_server(
        handle,
        "127.0.0.1",
        0,
        card=sides.server_card,
        keys=sides.server_keys,
        settings=settings,
    )
    port = listener.sockets[0].getsockname()[1]
    try:
        print(
            f"\n[2] line connection and mutual authentication (127.0.0.1:{port})",
            file=out,
        )
        started = time.perf_counter()
        channel = await aio.open_connection(
            "127.0.0.1",
            port,
            card=sides.client_card,
            keys=sides.client_keys,
            settings=settings,
        )
        handshake = time.perf_counter() - started
        print(
            f"  authenticated in {_ms(handshake)}; block length "
            f"{channel.connection.block_length}",
            file=out,
        )

        print(
            f"\n[3] sending {source.name} ({source.stat().st_size} bytes) in "
            f"messages of up to {chunk_size} bytes",
            file=out,
        )
        trace.transfer = True
        started = time.perf_counter()
        manifest = await send_file(channel, source, chunk_size=chunk_size)
        received_manifest, received_path = await asyncio.wait_for(outcome, 30)
        transfer = time.perf_counter() - started
        trace.transfer = False
        rate = manifest.size / transfer / 1e6 if transfer else 0.0
        print(
            f"  {manifest.chunks + 1} messages in {_ms(transfer)} ({rate:.1f} MB/s)",
            file=out,
        )

        print("\n[4] line disconnection", file=out)
        started = time.perf_counter()
        await channel.disconnect()
        print(f"  closed in {_ms(time.perf_counter() - started)}", file=out)
    finally:
        listener.close()
        await listener.wait_closed()

    return _report(source, received_path, received_manifest, out)


def _report(source: Path, received: Path, manifest: Manifest, out: TextIO) -> int:
    original = hashlib.sha256(source.read_bytes()).hexdigest()
    arrived = hashlib.sha256(received.read_bytes()).hexdigest()
    print("\n[5] result", file=out)
    print(f"  sent     SHA-256 {original}", file=out)
    print(f"  received SHA-256 {arrived}", file=out)
    if original != arrived or manifest.sha256 != original:
        print("  MISMATCH: the file did not arrive intact", file=out)
        return 1
    print(f"  identical: the file arrived intact; {_dicom_summary(received)}", file=out)
    return 0


def _dicom_summary(path: Path) -> str:
    """What the file is, without a word of its patient data."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError):
        return "it is not a DICOM file"
    sop_class = getattr(dataset.get("SOPClassUID"), "name", "unknown SOP class")
    return f"it reads as DICOM ({sop_class})"


def run_demo(
    file: Path | None = None,
    *,
    trace: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    out: TextIO = sys.stdout,
    backend: str = "softcard",
) -> int:
    """Run the demo; returns the exit code (0 only if the file matches).

    ``backend`` "softcard" uses the cards in process; "pcsc" serves them
    through the two vpcd readers of one pcscd (started if none runs);
    "pkcs11" puts both peers' keys in SoftHSM2 tokens."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown card backend {backend!r}")
    eventloop.loop_name()  # a bad ISCL_EVENT_LOOP fails before the banner
    source = file or default_dicom_file()
    if not source.is_file():
        raise FileNotFoundError(f"{source} is not a readable file")
    where = {
        "pcsc": "two virtual IC cards behind pcscd",
        "pkcs11": "keys in two SoftHSM2 tokens",
    }.get(backend, "two virtual IC cards")
    print(f"ISCL demo: two peers, {where}, one DICOM file", file=out)
    with (
        tempfile.TemporaryDirectory(prefix="iscl-demo-") as directory,
        _tracing(out, trace) as trace_filter,
    ):
        return eventloop.run(
            _run(source, Path(directory), chunk_size, out, trace_filter, backend)
        )
