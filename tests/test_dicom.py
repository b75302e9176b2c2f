"""DICOM over ISCL in process: a pynetdicom SCU and SCP on ISCL lines, on
127.0.0.1, with soft cards; a man in the middle that flips bits or cuts
the line; resource accounting."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
from helpers import CardPair, flip_bit, make_cards, make_keys, random_keys
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event

from iscl_hw import dicom
from iscl_hw.constants import HEADER_LENGTH, MessageId
from iscl_hw.core import Phase
from iscl_hw.errors import (
    ConnectionLost,
    IntegrityError,
    PeerRejectedAuthentication,
    RemoteProtocolError,
)
from iscl_hw.keyfile import KeyStore
from iscl_hw.ratelimit import FailureLimiter
from iscl_hw.settings import Settings

VERIFICATION = "1.2.840.10008.1.1"  # PS3.4 A.4
GUARD = 10.0  # seconds: the longest a step may take before the test fails
SMALL_MESSAGES = Settings(max_message_length=65536)


def sample_files() -> list[str]:
    """Files shipped with pydicom, small to large, the largest included."""
    local = Path(pydicom.data.__file__).parent / "test_files"
    largest = max(local.glob("*.dcm"), key=lambda p: p.stat().st_size)
    names = [
        "rtplan.dcm",  # implicit VR
        "JPEG2000.dcm",  # compressed transfer syntax
        "MR_small.dcm",
        "CT_small.dcm",
        "waveform_ecg.dcm",
        largest.name,
    ]
    return [pydicom_file(name) for name in names]


def pydicom_file(name: str) -> str:
    """A file shipped with pydicom (never downloaded)."""
    path = pydicom.data.get_testdata_file(name, download=False)
    assert isinstance(path, str), name
    return path


def read(name: str) -> Dataset:
    return pydicom.dcmread(pydicom_file(name))


# -- SCP and SCU ---------------------------------------------------------------------


@dataclass
class Scp:
    server: dicom.IsclAssociationServer
    stored: list[tuple[Dataset, Dataset]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    peer_auth: list[bytes] = field(default_factory=list)
    lines: list[dicom.IsclLine] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])


@contextlib.contextmanager
def scp(
    cards: CardPair,
    keys: KeyStore,
    datasets: Sequence[Dataset] = (),
    *,
    max_pdu: int | None = None,
    require_called_aet: bool = False,
    **options: Any,
) -> Iterator[Scp]:
    """A storage and verification SCP over ISCL on 127.0.0.1 port 0."""
    ae = AE(ae_title="ISCL-SCP")
    ae.require_called_aet = require_called_aet
    ae.add_supported_context(VERIFICATION)
    for sop_class, syntax in {(d.SOPClassUID, transfer_syntax(d)) for d in datasets}:
        ae.add_supported_context(sop_class, syntax)
    if max_pdu is not None:
        ae.maximum_pdu_size = max_pdu
    holder: list[Scp] = []

    def on_echo(event: Event) -> int:
        line = dicom.line_for(event.assoc)
        assert line is not None
        holder[0].peer_auth.append(line.peer_auth_data)
        return 0x0000

    def on_store(event: Event) -> int:
        holder[0].stored.append((event.dataset, event.file_meta))
        return 0x0000

    def on_open(event: Event) -> None:
        line = dicom.line_for(event.assoc)
        assert line is not None and line.established
        holder[0].lines.append(line)
        holder[0].events.append("open")

    def note(name: str) -> Callable[[Event], None]:
        return lambda event: holder[0].events.append(name)

    handlers = [
        (evt.EVT_C_ECHO, on_echo),
        (evt.EVT_C_STORE, on_store),
        (evt.EVT_CONN_OPEN, on_open),
        (evt.EVT_ABORTED, note("aborted")),
        (evt.EVT_RELEASED, note("released")),
    ]
    server = dicom.start_server(
        ae,
        ("127.0.0.1", 0),
        card=cards.server,
        keys=keys,
        evt_handlers=handlers,
        **options,
    )
    holder.append(Scp(server))
    try:
        yield holder[0]
    finally:
        server.shutdown()


def transfer_syntax(ds: Dataset) -> str:
    return str(ds.file_meta.TransferSyntaxUID)


def scu(datasets: Sequence[Dataset] = ()) -> AE:
    ae = AE(ae_title="ISCL-SCU")
    ae.acse_timeout = GUARD
    ae.dimse_timeout = GUARD
    ae.add_requested_context(VERIFICATION)
    for sop_class, syntax in {(d.SOPClassUID, transfer_syntax(d)) for d in datasets}:
        ae.add_requested_context(sop_class, syntax)
    return ae


def connect(
    ae: AE, port: int, cards: CardPair, keys: KeyStore, **options: Any
) -> Association:
    return dicom.associate(
        ae, "127.0.0.1", port, card=cards.client, keys=keys, **options
    )


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + GUARD
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def wait_aborted(assoc: Association) -> None:
    wait_for(lambda: assoc.is_aborted, "the association to be aborted")


def assert_whole_pdus_only(caplog: pytest.LogCaptureFixture) -> None:
    """pynetdicom read end of stream at a PDU boundary: it logged no PDU
    cut short (transport.py READ_PDU_EXC_A/D/E)."""
    cut = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("pynetdicom")
        and ("entire PDU" in r.getMessage() or "shorter than" in r.getMessage())
    ]
    assert cut == []


def assert_same_dataset(sent: Dataset, got: Dataset) -> None:
    assert [e.tag for e in got] == [e.tag for e in sent]
    for elem in sent:
        assert got[elem.tag] == elem, f"{elem.tag} {elem.keyword} differs"


# -- a man in the middle ---------------------------------------------------------


class Mitm:
    """Relays one TCP connection to ``port``, frame by frame.

    ``flip`` = (sender, n): flips one bit of the n-th (0-based) data block
    (MESSAGE_TRANSMISSION_NOTIF) that ``sender`` ("client" or "server")
    sends.  ``cut_after`` = n: resets both connections once n frames have
    crossed.  Every frame's ID is recorded in ``frames``.
    """

    def __init__(
        self,
        port: int,
        *,
        flip: tuple[str, int] | None = None,
        cut_after: int | None = None,
    ) -> None:
        self._upstream = port
        self._flip = flip
        self._cut_after = cut_after
        self.frames: list[tuple[str, int]] = []
        self.flipped = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="mitm")
        self._thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(GUARD)
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        server = socket.create_connection(("127.0.0.1", self._upstream))
        self._sockets = [client, server]
        pumps = [
            threading.Thread(target=self._pump, args=("client", client, server)),
            threading.Thread(target=self._pump, args=("server", server, client)),
        ]
        for pump in pumps:
            pump.start()
        for pump in pumps:
            pump.join()
        for sock in self._sockets:
            sock.close()

    def _pump(self, sender: str, src: socket.socket, dst: socket.socket) -> None:
        buffer = bytearray()
        data_blocks = 0
        try:
            while chunk := src.recv(65536):
                buffer += chunk
                while len(buffer) >= HEADER_LENGTH:
                    (length,) = struct.unpack_from(">I", buffer, 8)
                    if len(buffer) < HEADER_LENGTH + length:
                        break
                    frame = bytes(buffer[: HEADER_LENGTH + length])
                    del buffer[: HEADER_LENGTH + length]
                    (message_id,) = struct.unpack_from(">I", frame, 4)
                    if message_id == MessageId.MESSAGE_TRANSMISSION_NOTIF:
                        if self._flip == (sender, data_blocks):
                            frame = flip_bit(frame, 0)
                            self.flipped = True
                        data_blocks += 1
                    with self._lock:
                        self.frames.append((sender, message_id))
                        cut = self._cut_after is not None and (
                            len(self.frames) >= self._cut_after
                        )
                    if cut:
                        self._reset()
                        return
                    dst.sendall(frame)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            self._reset()

    def _reset(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                sock.shutdown(socket.SHUT_RDWR)

    def ids(self, sender: str) -> list[int]:
        with self._lock:
            return [m for s, m in self.frames if s == sender]

    def close(self) -> None:
        self._thread.join(GUARD)
        assert not self._thread.is_alive()
        self.listener.close()


@contextlib.contextmanager
def mitm(port: int, **options: Any) -> Iterator[Mitm]:
    relay = Mitm(port, **options)
    try:
        yield relay
    finally:
        relay.close()


# -- verification ----------------------------------------------------------------


def test_c_echo_and_release_close_the_lines() -> None:
    cards, keys = make_cards(), make_keys()
    with scp(cards, keys) as server, mitm(server.port) as relay:
        assoc = connect(scu(), relay.port, cards, keys)
        assert assoc.is_established
        line = dicom.line_for(assoc)
        assert line is not None
        assert line.peer_auth_data == b"iscl"
        status = assoc.send_c_echo()
        assert status.Status == 0x0000
        assoc.release()
        assert assoc.is_released
        # release() returns once the line is closed and its thread is gone.
        assert line.closed
        assert line.error is None
        assert line.connection is not None
        assert line.connection.phase is Phase.CLOSED
        wait_for(lambda: not server.server.lines, "the server's line to close")
        assert server.peer_auth == [b"iscl"]
        assert server.events == ["open", "released"]
    # Line disconnection ran after the last DICOM message.
    client_ids = relay.ids("client")
    server_ids = relay.ids("server")
    assert MessageId.LINE_DISCONNECTION_RQ in client_ids + server_ids
    assert MessageId.LINE_DISCONNECTION_RP in client_ids + server_ids
    for ids in (client_ids, server_ids):
        tail = ids[ids.index(MessageId.MAC_TRANSMISSION_NOTIF) :]
        assert MessageId.MESSAGE_TRANSMISSION_NOTIF in tail  # DICOM went secured
    assert relay.frames[-1][1] in (
        MessageId.LINE_DISCONNECTION_RQ,
        MessageId.LINE_DISCONNECTION_RP,
    )


def test_several_associations_at_once() -> None:
    cards, keys = make_cards(), make_keys()
    with scp(cards, keys) as server:
        results: list[int] = []

        def one() -> None:
            assoc = connect(scu(), server.port, cards, keys)
            try:
                for _ in range(3):
                    results.append(assoc.send_c_echo().Status)
            finally:
                assoc.release()

        threads = [threading.Thread(target=one) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(GUARD)
        assert results == [0] * 15
        assert server.events.count("open") == 5


def test_dicom_rejection_over_a_good_line_is_reported_the_pynetdicom_way() -> None:
    cards, keys = make_cards(), make_keys()
    with scp(cards, keys, require_called_aet=True) as server:
        assoc = connect(scu(), server.port, cards, keys, ae_title="SOMEONE-ELSE")
        assert assoc.is_rejected
        line = dicom.line_for(assoc)
        assert line is not None and line.closed
        assert line.error is None
        assert line.connection is not None
        assert line.connection.phase is Phase.CLOSED


def test_shutdown_ends_a_stalled_handshake_at_once() -> None:
    cards, keys = make_cards(), make_keys()
    with scp(cards, keys) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as silent:
            silent.settimeout(GUARD)
            header = silent.recv(HEADER_LENGTH)  # LINE_CONNECTION_CHECK_RQ
            assert struct.unpack_from(">I", header, 4) == (
                MessageId.LINE_CONNECTION_CHECK_RQ,
            )
            wait_for(lambda: len(server.server.lines) == 1, "the handshake")
            started = time.monotonic()
            server.server.shutdown()
            assert time.monotonic() - started < 2.0
            assert not server.server.lines
            while silent.recv(4096):  # the server dropped us
                pass
        assert server.events == []


# -- storage ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scu_settings", "scp_settings", "max_pdu"),
    [
        pytest.param(None, None, None, id="defaults"),
        # Whole datasets in one PDU, carried in several ISCL messages.
        pytest.param(SMALL_MESSAGES, SMALL_MESSAGES, 0, id="pdu-over-messages"),
        # The SCU learns the SCP's smaller maximum from its NAK and splits.
        pytest.param(None, SMALL_MESSAGES, 0, id="peer-refuses-length"),
    ],
)
def test_c_store_of_pydicom_files(
    scu_settings: Settings | None, scp_settings: Settings | None, max_pdu: int | None
) -> None:
    cards, keys = make_cards(), make_keys()
    datasets = [pydicom.dcmread(path) for path in sample_files()]
    sizes = [os.path.getsize(path) for path in sample_files()]
    assert sizes[-1] == max(sizes) > 300_000
    with scp(cards, keys, datasets, max_pdu=max_pdu, settings=scp_settings) as server:
        assoc = connect(scu(datasets), server.port, cards, keys, settings=scu_settings)
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                assert status.Status == 0x0000, ds.filename
        finally:
            assoc.release()
        assert len(server.stored) == len(datasets)
        for sent, (got, meta) in zip(datasets, server.stored, strict=True):
            assert meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
            assert_same_dataset(sent, got)
        line = dicom.line_for(assoc)
        assert line is not None and line.error is None


# -- authentication --------------------------------------------------------------


@pytest.mark.parametrize("wrong", ["client", "server"])
def test_wrong_card_key_fails_the_association_cleanly(wrong: str) -> None:
    if wrong == "client":
        cards = make_cards(client_keys=random_keys())
    else:
        cards = make_cards(server_keys=random_keys())
    keys = make_keys()
    with scp(cards, keys) as server:
        started = time.monotonic()
        # The server checks the client's answer first, with its own card:
        # whichever card is wrong, the server refuses the client.
        with pytest.raises(PeerRejectedAuthentication, match="refused our answer"):
            connect(scu(), server.port, cards, keys)
        assert time.monotonic() - started < GUARD
        # No association was made on the SCP for a peer that failed.
        wait_for(lambda: not server.server.lines, "the server's line to close")
        assert server.events == []
        assert not server.server.active_associations
    # No card's retry counter moved (the host-side check came first).
    assert all(n == 3 for side in cards.counters().values() for n in side.values())


def test_failed_handshakes_get_a_peer_refused() -> None:
    cards = make_cards()
    impostor = make_cards(client_keys=random_keys())
    keys = make_keys()
    limiter = FailureLimiter(max_failures=2, window=60.0, cooldown=60.0)
    with scp(cards, keys, limiter=limiter) as server:
        for _ in range(2):
            with pytest.raises(PeerRejectedAuthentication):
                connect(scu(), server.port, impostor, keys)
        wait_for(lambda: limiter.blocked("127.0.0.1"), "the limiter")
        # Now even the right card is refused from this address.
        with pytest.raises(ConnectionLost):
            connect(scu(), server.port, cards, keys)
        assert server.events == []


def test_no_listener_raises_connection_lost() -> None:
    cards, keys = make_cards(), make_keys()
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionLost):
        connect(scu(), port, cards, keys)


def test_tls_args_are_refused() -> None:
    cards, keys = make_cards(), make_keys()
    with pytest.raises(TypeError):
        dicom.associate(
            scu(),
            "127.0.0.1",
            1,
            card=cards.client,
            keys=keys,
            tls_args=(None, ""),
        )


# -- tampering and dropped peers ----------------------------------------------------


def test_tampered_store_aborts_both_sides(caplog: pytest.LogCaptureFixture) -> None:
    cards, keys = make_cards(), make_keys()
    ct = read("CT_small.dcm")
    # Client data blocks: 0 A-ASSOCIATE-RQ, 1 the C-STORE command, then the
    # dataset's; block 3 is inside the dataset.
    with (
        scp(cards, keys, [ct]) as server,
        mitm(server.port, flip=("client", 3)) as relay,
    ):
        assoc = connect(scu([ct]), relay.port, cards, keys)
        line = dicom.line_for(assoc)
        status = assoc.send_c_store(ct)
        assert relay.flipped
        assert status == Dataset()  # pynetdicom's answer when aborted
        wait_for(lambda: assoc.is_aborted, "the SCU to see the abort")
        wait_for(lambda: "aborted" in server.events, "the SCP to see the abort")
        assert server.stored == []
        assert line is not None and line.wait_closed(GUARD)
        assert isinstance(line.error, ConnectionLost)
        # The SCP's line ended on the MAC check.
        (server_line,) = server.lines
        assert server_line.wait_closed(GUARD)
        assert isinstance(server_line.error, IntegrityError)
    assert_whole_pdus_only(caplog)


def test_tampered_response_aborts_the_scu(caplog: pytest.LogCaptureFixture) -> None:
    cards, keys = make_cards(), make_keys()
    # Server data blocks: 0 A-ASSOCIATE-AC, 1 the C-ECHO response.
    with scp(cards, keys) as server, mitm(server.port, flip=("server", 1)) as relay:
        assoc = connect(scu(), relay.port, cards, keys)
        line = dicom.line_for(assoc)
        assert assoc.send_c_echo() == Dataset()
        assert relay.flipped
        wait_for(lambda: assoc.is_aborted, "the SCU to see the abort")
        assert line is not None and line.wait_closed(GUARD)
        assert isinstance(line.error, IntegrityError)
        wait_for(lambda: "aborted" in server.events, "the SCP to see the abort")
    assert_whole_pdus_only(caplog)


def test_dropped_peer_aborts_both_sides(caplog: pytest.LogCaptureFixture) -> None:
    cards, keys = make_cards(), make_keys()
    ct = read("CT_small.dcm")
    with scp(cards, keys, [ct]) as server:
        # The handshake is 8 frames; cut during the C-STORE.
        with mitm(server.port, cut_after=30) as relay:
            assoc = connect(scu([ct]), relay.port, cards, keys)
            line = dicom.line_for(assoc)
            assert assoc.send_c_store(ct) == Dataset()
            wait_for(lambda: assoc.is_aborted, "the SCU to see the abort")
            wait_for(lambda: "aborted" in server.events, "the SCP to see the abort")
            assert line is not None and line.wait_closed(GUARD)
            assert isinstance(line.error, ConnectionLost)
        assert server.stored == []
    assert_whole_pdus_only(caplog)


def test_abort_closes_the_lines() -> None:
    cards, keys = make_cards(), make_keys()
    with scp(cards, keys) as server:
        assoc = connect(scu(), server.port, cards, keys)
        line = dicom.line_for(assoc)
        assert assoc.send_c_echo().Status == 0
        assoc.abort()
        assert line is not None and line.closed
        assert line.error is None  # the A-ABORT went through, then the line closed
        wait_for(lambda: "aborted" in server.events, "the SCP to see the abort")
        wait_for(lambda: not server.server.lines, "the server's line to close")


def test_server_shutdown_aborts_its_associations() -> None:
    cards, keys = make_cards(), make_keys()
    with scp(cards, keys) as server:
        assoc = connect(scu(), server.port, cards, keys)
        line = dicom.line_for(assoc)
        server.server.shutdown()
        assert not server.server.lines
        wait_for(lambda: assoc.is_aborted, "the SCU to see the abort")
        assert line is not None and line.wait_closed(GUARD)


# -- PDU framing -------------------------------------------------------------------


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BxL", pdu_type, len(body)) + body


def test_pdu_splitter_cuts_at_pdu_boundaries_and_at_the_limit() -> None:
    splitter = dicom._PduSplitter()
    a, b = pdu(4, b"a" * 10), pdu(4, b"b" * 25)
    stream = a + b
    pieces: list[bytes] = []
    for i in range(len(stream)):  # one byte at a time
        pieces += splitter.feed(stream[i : i + 1], limit=12)
    assert pieces == [a[:12], a[12:], b[:12], b[12:24], b[24:]]
    assert splitter.pending == 0


def test_pdu_assembler_delivers_whole_pdus_only() -> None:
    assembler = dicom._PduAssembler(max_length=100)
    a, b = pdu(1, b"x" * 40), pdu(7, b"\0" * 4)
    assert assembler.feed(a[:30]) == []
    assert assembler.feed(a[30:] + b[:3]) == [a]
    assert assembler.pending == 3
    assert assembler.feed(b[3:]) == [b]
    with pytest.raises(RemoteProtocolError):
        assembler.feed(pdu(4, b"")[:2] + struct.pack(">L", 1000))


# -- resources ----------------------------------------------------------------------


def open_fds() -> set[str]:
    return {
        f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}"
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    }


def thread_names() -> list[str]:
    return sorted(t.name for t in threading.enumerate())


def test_no_leaked_threads_or_file_descriptors() -> None:
    cards, keys = make_cards(), make_keys()
    impostor = make_cards(client_keys=random_keys())
    ct = read("CT_small.dcm")

    def session() -> None:
        with scp(
            cards, keys, [ct], limiter=FailureLimiter(max_failures=1000)
        ) as server:
            for _ in range(2):
                assoc = connect(scu([ct]), server.port, cards, keys)
                assert assoc.send_c_store(ct).Status == 0
                assoc.release()
                assoc = connect(scu(), server.port, cards, keys)
                assoc.abort()
                with pytest.raises(PeerRejectedAuthentication):
                    connect(scu(), server.port, impostor, keys)
                with mitm(server.port, flip=("client", 1)) as relay:
                    assoc = connect(scu([ct]), relay.port, cards, keys)
                    assert assoc.send_c_store(ct) == Dataset()
                    wait_aborted(assoc)
            # One association left open: shutdown must end it.
            connect(scu(), server.port, cards, keys)

    threads = thread_names()
    session()  # warm-up: pynetdicom's and asyncio's lazy imports
    wait_for(lambda: thread_names() == threads, "threads to end")
    fds = open_fds()
    session()
    deadline = time.monotonic() + GUARD
    while (thread_names(), open_fds()) != (threads, fds):
        if time.monotonic() > deadline:
            assert thread_names() == threads
            assert open_fds() == fds
        time.sleep(0.05)
