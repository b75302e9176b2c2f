"""The vpcd bridge, driven by a fake vpcd listening on 127.0.0.1."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from iscl_hw.cli_serve import add_serve_command, cmd_card_serve, parse_host_port
from iscl_hw.crypto import des_ecb_encrypt
from softcard.cardfile import create_card_file, new_card_state
from softcard.emulator import SoftCard
from softcard.profiles import PROFILE_ATRS, wrap_card
from softcard.vpcd import VpcdCardBridge

KEY1 = bytes.fromhex("133457799BBCDFF1")
PIN = b"2468"
SELECT = bytes.fromhex("00A4040007F06973636C0001")
GET_CHALLENGE = bytes.fromhex("0084000008")
TIMEOUT = 5.0


class VpcdLink:
    """vpcd's end of one card connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(TIMEOUT)

    def close(self) -> None:
        self.sock.close()

    def send_frame(self, body: bytes) -> None:
        self.sock.sendall(len(body).to_bytes(2, "big") + body)

    def recv_exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {size} bytes")
            data += chunk
        return data

    def recv_frame(self) -> bytes:
        return self.recv_exact(int.from_bytes(self.recv_exact(2), "big"))

    def control(self, byte: int) -> None:
        self.send_frame(bytes((byte,)))

    def atr(self) -> bytes:
        self.control(0x04)
        return self.recv_frame()

    def apdu(self, command: bytes) -> bytes:
        self.send_frame(command)
        return self.recv_frame()

    def closed_by_card(self) -> bool:
        """True once the card's side has closed the connection."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


class FakeVpcd:
    """A listening socket standing in for vpcd inside pcscd."""

    def __init__(self, port: int = 0) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(1)
        self.listener.settimeout(TIMEOUT)
        self.port: int = self.listener.getsockname()[1]
        self.links: list[VpcdLink] = []

    def accept(self) -> VpcdLink:
        sock, _address = self.listener.accept()
        link = VpcdLink(sock)
        self.links.append(link)
        return link

    def close(self) -> None:
        for link in self.links:
            link.close()
        self.listener.close()


@pytest.fixture
def vpcd() -> Iterator[FakeVpcd]:
    fake = FakeVpcd()
    yield fake
    fake.close()


def new_card() -> SoftCard:
    return SoftCard(new_card_state({1: KEY1}))


@contextlib.contextmanager
def bridged(
    vpcd: FakeVpcd, card: object | None = None, **options: object
) -> Iterator[tuple[VpcdCardBridge, VpcdLink]]:
    bridge = VpcdCardBridge(
        card if card is not None else new_card(),  # type: ignore[arg-type]
        "127.0.0.1",
        vpcd.port,
        **options,  # type: ignore[arg-type]
    )
    bridge.start()
    try:
        link = vpcd.accept()
        assert bridge.connected.wait(TIMEOUT)
        yield bridge, link
    finally:
        bridge.stop()
    assert not bridge.running


def authenticate(link: VpcdLink) -> None:
    assert link.apdu(SELECT) == b"\x90\x00"
    answer = link.apdu(GET_CHALLENGE)
    assert len(answer) == 10 and answer[-2:] == b"\x90\x00"
    response = des_ecb_encrypt(KEY1, answer[:-2])
    assert link.apdu(bytes.fromhex("0082000108") + response) == b"\x90\x00"


# ------------------------------------------------------------- protocol


def test_atr_and_apdu_round_trip(vpcd: FakeVpcd) -> None:
    with bridged(vpcd) as (_bridge, link):
        assert link.atr() == SoftCard.ATR
        link.control(0x01)  # power on: no answer
        assert link.atr() == SoftCard.ATR
        authenticate(link)
        assert link.atr() == SoftCard.ATR  # ATR requests between APDUs


@pytest.mark.parametrize("control", [0x00, 0x02])
def test_power_off_and_reset_drop_card_state(vpcd: FakeVpcd, control: int) -> None:
    with bridged(vpcd) as (_bridge, link):
        assert link.apdu(SELECT) == b"\x90\x00"
        assert link.apdu(GET_CHALLENGE)[-2:] == b"\x90\x00"
        link.control(control)
        link.control(0x01)
        assert link.apdu(GET_CHALLENGE) == b"\x69\x85"  # not selected any more


def test_pin_state_dropped_by_reset_and_verify_redacted_in_trace(
    vpcd: FakeVpcd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="softcard.vpcd")
    card = SoftCard(new_card_state({1: KEY1}, pin=PIN))
    internal = bytes.fromhex("0088000108") + bytes(8) + b"\x08"
    with bridged(vpcd, card) as (_bridge, link):
        assert link.apdu(SELECT) == b"\x90\x00"
        assert link.apdu(bytes.fromhex("0020008004") + PIN) == b"\x90\x00"
        assert link.apdu(internal)[-2:] == b"\x90\x00"
        link.control(0x02)
        assert link.apdu(SELECT) == b"\x90\x00"
        assert link.apdu(internal) == b"\x69\x82"  # PIN to verify again
    text = caplog.text
    assert "VERIFY 00 20 00 80 data=<redacted>" in text
    for shown in (PIN.hex(), PIN.hex().upper(), PIN.decode()):
        assert shown not in text


def test_unknown_control_byte_ignored(vpcd: FakeVpcd) -> None:
    with bridged(vpcd) as (_bridge, link):
        link.control(0x03)
        assert link.atr() == SoftCard.ATR


def test_profiled_card_over_vpcd(vpcd: FakeVpcd) -> None:
    card = wrap_card(new_card(), "t0-getresponse")
    with bridged(vpcd, card) as (_bridge, link):
        assert link.atr() == PROFILE_ATRS["t0-getresponse"]
        assert link.apdu(SELECT) == b"\x90\x00"
        assert link.apdu(GET_CHALLENGE) == b"\x61\x08"
        answer = link.apdu(bytes.fromhex("00C0000008"))
        assert len(answer) == 10 and answer[-2:] == b"\x90\x00"


def test_large_answer(vpcd: FakeVpcd) -> None:
    with bridged(vpcd) as (_bridge, link):
        assert link.apdu(SELECT) == b"\x90\x00"
        answer = link.apdu(bytes.fromhex("0084000000"))
        assert len(answer) == 258 and answer[-2:] == b"\x90\x00"


# ----------------------------------------------------------- robustness


class ExplodingCard:
    ATR = bytes.fromhex("3B00")

    def __init__(self) -> None:
        self.resets = 0

    def reset(self) -> bytes:
        self.resets += 1
        return self.ATR

    def transmit(self, command: bytes) -> bytes:
        if command[1] == 0xEE:
            raise RuntimeError("card bug")
        if command[1] == 0xEF:
            return b"\x90"  # too short to be an answer
        return b"\x90\x00"


def test_card_exception_becomes_6f00(
    vpcd: FakeVpcd, caplog: pytest.LogCaptureFixture
) -> None:
    card = ExplodingCard()
    with bridged(vpcd, card) as (_bridge, link):
        assert link.apdu(bytes.fromhex("00EE0000")) == b"\x6f\x00"
        assert link.apdu(bytes.fromhex("00EF0000")) == b"\x6f\x00"
        assert link.apdu(bytes.fromhex("00A40000")) == b"\x90\x00"
        link.control(0x00)
        assert link.atr() == card.ATR
        assert card.resets == 2  # connection start, power off
    assert "card failed (RuntimeError); answering 6F00" in caplog.text


def test_empty_frame_closes_the_connection(
    vpcd: FakeVpcd, caplog: pytest.LogCaptureFixture
) -> None:
    with bridged(vpcd) as (bridge, link):
        link.sock.sendall(b"\x00\x00")
        assert link.closed_by_card()
        bridge.stop()
        assert not bridge.running
    assert "empty frame" in caplog.text


def test_short_read_ends_the_session(
    vpcd: FakeVpcd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="softcard.vpcd")
    with bridged(vpcd) as (bridge, link):
        link.sock.sendall(b"\x00\x0a\x00\x84")
        link.sock.shutdown(socket.SHUT_WR)
        assert link.closed_by_card()
        deadline = time.monotonic() + TIMEOUT
        while bridge.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not bridge.running  # no reconnect: the bridge ends
        assert not bridge.connected.is_set()
    assert "ended: short read" in caplog.text


def test_stop_closes_the_socket_and_is_idempotent(vpcd: FakeVpcd) -> None:
    card = new_card()
    bridge = VpcdCardBridge(card, "127.0.0.1", vpcd.port)
    with bridge:
        link = vpcd.accept()
        assert link.atr() == SoftCard.ATR
    assert link.closed_by_card()
    assert not bridge.running and not bridge.connected.is_set()
    bridge.stop()
    bridge.stop()
    with pytest.raises(RuntimeError, match="already started"):
        bridge.start()


def test_remove_and_insert(vpcd: FakeVpcd) -> None:
    with bridged(vpcd) as (bridge, link):
        assert link.apdu(SELECT) == b"\x90\x00"
        bridge.remove()
        assert not bridge.connected.is_set()
        assert link.closed_by_card()
        assert bridge.running  # the card is out, not gone
        bridge.insert()
        second = vpcd.accept()
        assert bridge.connected.wait(TIMEOUT)
        assert second.atr() == SoftCard.ATR
        assert second.apdu(GET_CHALLENGE) == b"\x69\x85"  # a fresh power-up
        authenticate(second)


def test_reconnect_after_vpcd_restart() -> None:
    first = FakeVpcd()
    port = first.port
    bridge = VpcdCardBridge(
        new_card(), "127.0.0.1", port, reconnect=True, max_backoff=0.1
    )
    second: FakeVpcd | None = None
    try:
        bridge.start()
        link = first.accept()
        authenticate(link)
        first.close()  # pcscd stops: listener and connection gone
        time.sleep(0.3)  # a few refused attempts
        assert bridge.running
        second = FakeVpcd(port)
        again = second.accept()
        assert bridge.connected.wait(TIMEOUT)
        assert again.apdu(GET_CHALLENGE) == b"\x69\x85"
        authenticate(again)
    finally:
        bridge.stop()
        first.close()
        if second is not None:
            second.close()
    assert not bridge.running


def test_without_reconnect_a_refused_connection_ends_the_bridge() -> None:
    fake = FakeVpcd()
    port = fake.port
    fake.close()
    bridge = VpcdCardBridge(new_card(), "127.0.0.1", port)
    bridge.start()
    deadline = time.monotonic() + TIMEOUT
    while bridge.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not bridge.running
    assert isinstance(bridge.failure, ConnectionRefusedError)
    with pytest.raises(ConnectionRefusedError):
        VpcdCardBridge(new_card(), "127.0.0.1", port).run_forever()


# --------------------------------------------------------------- latency


class RecordingBridge(VpcdCardBridge):
    armed: ClassVar[list[int]] = []

    @staticmethod
    def _arm_quickack(sock: socket.socket) -> None:
        VpcdCardBridge._arm_quickack(sock)
        RecordingBridge.armed.append(
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK)
        )


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="Linux only")
def test_quickack_rearmed_after_every_header(vpcd: FakeVpcd) -> None:
    RecordingBridge.armed = []
    with RecordingBridge(new_card(), "127.0.0.1", vpcd.port) as bridge:
        link = vpcd.accept()
        assert bridge.connected.wait(TIMEOUT)
        for _ in range(5):
            assert link.atr() == SoftCard.ATR
        assert link.apdu(SELECT) == b"\x90\x00"
        sock = bridge._sock
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert RecordingBridge.armed == [1] * 7  # after connect + 6 headers


def test_split_frames_cost_well_under_44_ms(vpcd: FakeVpcd) -> None:
    """vpcd 0.8 writes the length and the body in two sends, with Nagle on."""
    with bridged(vpcd) as (_bridge, link):
        assert link.apdu(SELECT) == b"\x90\x00"
        times = []
        for _ in range(40):
            start = time.perf_counter()
            link.sock.send(len(GET_CHALLENGE).to_bytes(2, "big"))
            link.sock.send(GET_CHALLENGE)
            assert len(link.recv_frame()) == 10
            times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.010


# ------------------------------------------------------------------ CLI


def card_file(tmp_path: Path, profile: str = "plain") -> Path:
    path = tmp_path / "card.json"
    create_card_file(path, {1: KEY1}, profile=profile)
    return path


def test_serve_command_registers_under_card(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="iscl")
    card = parser.add_subparsers(dest="command").add_parser("card")
    add_serve_command(card.add_subparsers(dest="card_command"))
    args = parser.parse_args(["card", "serve", "x.json", "--vpcd", "[::1]:35964"])
    assert args.func is cmd_card_serve
    assert args.vpcd == ("::1", 35964) and not args.no_reconnect
    args = parser.parse_args(["card", "serve", "x.json"])
    assert args.vpcd == ("127.0.0.1", 35963)
    for bad in ("localhost", "h:0", "h:x", ":1", "h:70000"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_host_port(bad)


def test_serve_reports_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeVpcd()
    port = fake.port
    fake.close()
    missing = argparse.Namespace(
        card_file=tmp_path / "none.json", vpcd=("127.0.0.1", port), no_reconnect=True
    )
    assert cmd_card_serve(missing) == 2
    assert "iscl card serve: error:" in capsys.readouterr().err
    refused = argparse.Namespace(
        card_file=card_file(tmp_path), vpcd=("127.0.0.1", port), no_reconnect=True
    )
    assert cmd_card_serve(refused) == 2
    assert "cannot connect to vpcd" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_process_stops_cleanly_on_signal(
    vpcd: FakeVpcd, tmp_path: Path, signum: signal.Signals
) -> None:
    path = card_file(tmp_path, "wrong-le")
    command = [sys.executable, "-m", "iscl_hw.cli_serve", str(path)]
    command += ["--vpcd", f"127.0.0.1:{vpcd.port}", "--log-level", "INFO"]
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    try:
        link = vpcd.accept()
        assert link.atr() == PROFILE_ATRS["wrong-le"]
        assert link.apdu(SELECT) == b"\x90\x00"
        assert link.apdu(bytes.fromhex("0084000000")) == b"\x6c\x08"
        process.send_signal(signum)
        assert process.wait(TIMEOUT) == 0
        assert link.closed_by_card()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.stderr is not None
    err = process.stderr.read()
    process.stderr.close()
    assert "profile wrong-le" in err and signum.name in err
    assert KEY1.hex() not in err.lower()
