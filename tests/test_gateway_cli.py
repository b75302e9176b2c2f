"""``iscl serve`` and ``iscl tunnel`` as a site runs them: two processes on
127.0.0.1, each with its own software card, a plain echo service behind the
server gateway, plain TCP into the tunnel."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscl_hw.keyfile import write_key_file
from softcard.cardfile import create_card_file
from tests.helpers import random_keys

AUTH = random_keys()
ENC = random_keys()


class Gateway:
    """An ``iscl serve`` or ``iscl tunnel`` process; ``port`` from its first line."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "iscl_hw", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 30)
        first = self.process.stdout.readline() if ready else ""
        assert " on 127.0.0.1:" in first, first + self._stderr_if_done()
        self.port = int(first.split(" on 127.0.0.1:")[1].split(",")[0])

    def _stderr_if_done(self) -> str:
        if self.process.poll() is None or self.process.stderr is None:
            return ""
        return self.process.stderr.read()

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        _, err = self.process.communicate(timeout=30)
        return self.process.returncode, err


@pytest.fixture
def card_options(tmp_path: Path) -> Iterator[dict[str, list[str]]]:
    options = {}
    for side in ("server", "client"):
        card, keys = tmp_path / f"{side}.card", tmp_path / f"{side}.keys"
        create_card_file(card, AUTH)
        write_key_file(keys, ENC)
        options[side] = ["--card", str(card), "--keys", str(keys)]
    yield options


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A plain TCP echo service (the DICOM SCP's place)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):  # a reset from the gateway
                while chunk := conn.recv(65536):
                    conn.sendall(chunk)

    thread = threading.Thread(target=serve)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


def start_pair(
    card_options: dict[str, list[str]], echo_port: int
) -> tuple[Gateway, Gateway]:
    """A server gateway in front of the echo service, and a tunnel to it."""
    server = Gateway(
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--forward",
        f"127.0.0.1:{echo_port}",
        *card_options["server"],
    )
    tunnel = Gateway(
        "tunnel",
        "--listen",
        "127.0.0.1:0",
        "--connect",
        f"127.0.0.1:{server.port}",
        *card_options["client"],
    )
    return server, tunnel


def test_bytes_cross_both_gateways_and_sigterm_stops_them(
    card_options: dict[str, list[str]], echo_port: int
) -> None:
    server, tunnel = start_pair(card_options, echo_port)
    try:
        payload = os.urandom(300_000)
        with socket.create_connection(("127.0.0.1", tunnel.port), timeout=30) as plain:
            plain.sendall(payload)
            received = bytearray()
            while len(received) < len(payload):
                chunk = plain.recv(65536)
                assert chunk, "the tunnel closed early"
                received += chunk
        assert bytes(received) == payload
    finally:
        tunnel_code, tunnel_err = tunnel.stop()
        server_code, server_err = server.stop()
    assert (tunnel_code, server_code) == (0, 0), tunnel_err + server_err
    assert ENC[1].hex() not in (tunnel_err + server_err).lower()


def test_missing_forward_address_is_a_clear_error(
    card_options: dict[str, list[str]],
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "iscl_hw", "serve", "--listen", "127.0.0.1:0"]
        + card_options["server"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "--forward is neither on the command line nor in the site file" in (
        done.stderr
    )


def test_a_second_sigterm_closes_at_once_without_a_traceback(
    card_options: dict[str, list[str]], echo_port: int
) -> None:
    server, tunnel = start_pair(card_options, echo_port)
    try:
        with socket.create_connection(("127.0.0.1", tunnel.port), timeout=30) as plain:
            plain.sendall(b"held open")
            assert plain.recv(100) == b"held open"
            # A connection in flight makes the first SIGTERM wait (stop_grace).
            tunnel.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert tunnel.process.poll() is None
            code, err = tunnel.stop()
    finally:
        server.stop()
    assert code == 130, err
    assert "Traceback" not in err
    assert "second signal" in err


def test_probes_that_never_speak_iscl_do_not_lock_a_peer_out(
    card_options: dict[str, list[str]], echo_port: int
) -> None:
    """Health checks and port scans (connect, close) are not failed
    authentications: after many of them the real peer still gets in."""
    server, tunnel = start_pair(card_options, echo_port)
    try:
        for _ in range(8):
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", tunnel.port), timeout=30) as plain:
            plain.sendall(b"still welcome")
            assert plain.recv(100) == b"still welcome"
    finally:
        tunnel.stop()
        code, err = server.stop()
    assert code == 0
    assert "refusing 127.0.0.1" not in err
    assert "authentication failed" not in err
