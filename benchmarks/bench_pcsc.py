"""Benchmarks of the PC/SC path: pyscard -> pcscd -> vpcd -> soft card.

    .venv/bin/python benchmarks/bench_pcsc.py [--apdus N] [--handshakes N]
                                              [--profile NAME]

Reports:
- the median (and p90, p99) APDU round trip of N GET CHALLENGE commands
  through the quirk layer, pcscd, the vpcd reader and a soft card served by
  a VpcdCardBridge thread of this process (target: median < 0.5 ms);
- the median (and p90) full ISCL handshake (TCP connect, line connection,
  mutual authentication) with both peers' cards behind pcscd, with both
  peers in this process and with the server peer in a process of its own,
  as two sites are, on the asyncio driver and on the blocking driver
  (target: median < 5 ms);
- the same handshake with in-process virtual cards and no pcscd, as a
  reference for how fast this machine is at the time.

Starts a private ``pcscd --foreground`` when none runs and stops it (by
PID) at the end; with a system pcscd it needs the vpcd readers.  Runs on
uvloop when it is installed; ``ISCL_EVENT_LOOP=asyncio`` runs on asyncio's
own loop (see ``iscl_hw.eventloop``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench_core import time_handshakes

from iscl_hw import aio, eventloop, sync
from iscl_hw.card import ApduCard
from iscl_hw.constants import KEY_INDEXES
from iscl_hw.errors import IsclError
from iscl_hw.keyfile import KeyStore
from iscl_hw.pcsc import (
    VPCD_PORTS,
    VPCD_READERS,
    PcscCard,
    PcscdChild,
    PcscError,
    pcscd_running,
    vpcd_slots,
)
from softcard.cardfile import CARD_PROFILES, create_card_file, new_card_state
from softcard.emulator import SoftCard
from softcard.profiles import ProfiledCard
from softcard.vpcd import VpcdCardBridge


def open_card(reader: str) -> PcscCard:
    """The card in ``reader``, once it is there: with a pcscd that was
    already running, the reader may still show the card of the run before
    for a moment (pcscd polls vpcd about three times a second), and a card
    still powering up can fail its first command ("Transaction failed")."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return PcscCard(reader, card_timeout=5)
        except PcscError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@contextlib.contextmanager
def private_readers() -> Iterator[None]:
    """pcscd with both vpcd readers free for the benchmark's cards: a
    private ``pcscd --foreground`` when none runs, else the running one
    once it shows no card in them (cards of another program there would
    be measured, and that program disturbed)."""
    if not pcscd_running():
        with PcscdChild() as child:
            print(f"started pcscd, PID {child.pid}")
            yield
        return
    taken = [slot.reader for slot in vpcd_slots(settle=1.0) if slot.has_card]
    if taken:
        many = len(taken) > 1
        raise SystemExit(
            f"bench_pcsc: vpcd reader{'s' if many else ''} "
            f"{', '.join(map(repr, taken))} {'have' if many else 'has'} a card "
            "(another 'iscl card serve', or a server using it); stop that "
            "first: the benchmark needs both readers"
        )
    yield


def _ms(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000


@contextlib.contextmanager
def cards(
    profile: str, processes: bool = False, auth: dict[int, bytes] | None = None
) -> Iterator[tuple[PcscCard, PcscCard, KeyStore]]:
    """Both cards in the vpcd readers of a pcscd (started if none runs),
    served by bridge threads of this process or, with ``processes``, by two
    ``iscl card serve`` processes (as a card sits outside the engine's
    process in a real reader)."""
    auth = auth or {index: os.urandom(8) for index in KEY_INDEXES}
    keys = KeyStore({index: os.urandom(8) for index in KEY_INDEXES})
    with contextlib.ExitStack() as stack:
        stack.enter_context(private_readers())
        opened = []
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for reader, port in zip(VPCD_READERS, VPCD_PORTS, strict=True):
            if processes:
                stack.enter_context(_serve_process(directory, auth, profile, port))
            else:
                soft = ProfiledCard(
                    SoftCard(new_card_state(auth, profile=profile)), profile
                )
                bridge = VpcdCardBridge(soft, "127.0.0.1", port)
                bridge.start()
                stack.callback(bridge.stop)
            card = open_card(reader)
            stack.callback(card.close)
            opened.append(card)
        yield opened[0], opened[1], keys


@contextlib.contextmanager
def _serve_process(
    directory: Path, auth: dict[int, bytes], profile: str, port: int
) -> Iterator[None]:
    path = directory / f"card-{port}.json"
    create_card_file(path, auth, profile=profile)
    command = [sys.executable, "-m", "iscl_hw", "card", "serve", str(path)]
    child = subprocess.Popen([*command, "--vpcd", f"127.0.0.1:{port}"])
    try:
        yield
    finally:
        child.terminate()
        child.wait(10)


def bench_apdus(card: PcscCard, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        card.get_challenge()
        times.append(time.perf_counter() - started)
    return times


# -- the peers in two processes, as two sites are -------------------------------


def serve_peer(reader: str, driver: str) -> None:
    """Server peer of the two-process handshakes: the card in ``reader``,
    the encryption keys as JSON on standard input; prints its port, serves
    until standard input closes.  ``driver`` "aio" serves with
    ``aio.start_server``; "sync" accepts one connection at a time with the
    blocking driver."""
    enc = {
        int(i): bytes.fromhex(k) for i, k in json.loads(sys.stdin.readline()).items()
    }
    card = open_card(reader)
    try:
        if driver == "sync":
            _serve_blocking(card, KeyStore(enc))
        else:
            eventloop.run(_serve_async(card, KeyStore(enc)))
    finally:
        card.close()


async def _serve_async(card: PcscCard, keys: KeyStore) -> None:
    async def handle(channel: aio.AsyncChannel) -> None:
        with contextlib.suppress(IsclError):
            await channel.recv_message()

    server = await aio.start_server(handle, "127.0.0.1", 0, card=card, keys=keys)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    server.close()
    await server.wait_closed()


def _serve_blocking(card: PcscCard, keys: KeyStore) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        print(listener.getsockname()[1], flush=True)
        while True:
            readable, _, _ = select.select([listener, sys.stdin], [], [])
            if sys.stdin in readable:
                return  # standard input closed: the run is over
            sock, _ = listener.accept()
            with sock, contextlib.suppress(IsclError):
                with sync.accept(sock, card=card, keys=keys) as channel:
                    channel.recv_message()


def two_process_handshakes(
    profile: str, count: int, driver: str = "aio"
) -> list[float]:
    """Handshakes with the server peer in a process of its own and both cards
    served by ``iscl card serve`` processes; both peers on ``driver``."""
    auth = {index: os.urandom(8) for index in KEY_INDEXES}
    enc = {index: os.urandom(8) for index in KEY_INDEXES}
    with contextlib.ExitStack() as stack:
        stack.enter_context(private_readers())
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for port in VPCD_PORTS:
            stack.enter_context(_serve_process(directory, auth, profile, port))
        client_card = open_card(VPCD_READERS[1])
        stack.callback(client_card.close)
        server = subprocess.Popen(
            [sys.executable, __file__, "serve-peer", VPCD_READERS[0], driver],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdin is not None and server.stdout is not None
        server.stdin.write(json.dumps({i: k.hex() for i, k in enc.items()}) + "\n")
        server.stdin.flush()
        try:
            port = int(server.stdout.readline())
            keys = KeyStore(enc)
            handshakes = _blocking_handshakes if driver == "sync" else _async_handshakes
            handshakes(port, client_card, keys, 10)
            return handshakes(port, client_card, keys, count)
        finally:
            server.stdin.close()
            server.wait(10)


def _async_handshakes(
    port: int, card: PcscCard, keys: KeyStore, count: int
) -> list[float]:
    async def run() -> list[float]:
        times = []
        for _ in range(count):
            started = time.perf_counter()
            channel = await aio.open_connection("127.0.0.1", port, card=card, keys=keys)
            times.append(time.perf_counter() - started)
            await channel.close()
        return times

    return eventloop.run(run())


def _blocking_handshakes(
    port: int, card: PcscCard, keys: KeyStore, count: int
) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        channel = sync.connect("127.0.0.1", port, card=card, keys=keys)
        times.append(time.perf_counter() - started)
        channel.close()
    return times


def reference_handshakes(count: int) -> list[float]:
    """Handshakes with in-process virtual cards and no pcscd: what this
    machine does without the PC/SC path, to read the figures above by."""
    auth = {index: os.urandom(8) for index in KEY_INDEXES}
    keys = KeyStore({index: os.urandom(8) for index in KEY_INDEXES})
    server, client = (ApduCard(SoftCard(new_card_state(auth))) for _ in range(2))
    eventloop.run(time_handshakes(server, client, keys, 10))
    return eventloop.run(time_handshakes(server, client, keys, count))


def _report(what: str, shakes: list[float]) -> None:
    print(
        f"{what}: median {statistics.median(shakes) * 1000:.2f} ms, "
        f"p90 {_ms(shakes, 90):.2f} ms"
    )


def main() -> None:
    if sys.argv[1:2] == ["serve-peer"]:
        serve_peer(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--apdus", type=int, default=1000)
    parser.add_argument("--handshakes", type=int, default=200)
    parser.add_argument("--profile", default="plain", choices=CARD_PROFILES)
    parser.add_argument(
        "--bridges",
        choices=["threads", "processes"],
        default="threads",
        help="serve the soft cards from this process or from two "
        "'iscl card serve' processes",
    )
    parser.add_argument(
        "--peers",
        choices=["one", "two", "both"],
        default="both",
        help="both ISCL peers in this process (one), or the server peer in a "
        "process of its own and both cards served by 'iscl card serve' (two, "
        "as two sites are)",
    )
    args = parser.parse_args()
    count = args.handshakes
    print(f"event loop: {eventloop.loop_name()} (ISCL_EVENT_LOOP chooses)")
    if args.peers in ("one", "both"):
        processes = args.bridges == "processes"
        print(f"cards served by {args.bridges}")
        with cards(args.profile, processes) as (server, client, keys):
            bench_apdus(client, 50)  # warm-up
            apdus = bench_apdus(client, args.apdus)
            print(
                f"GET CHALLENGE x{args.apdus} ({args.profile}, T={client.protocol}): "
                f"median {statistics.median(apdus) * 1000:.3f} ms, "
                f"p90 {_ms(apdus, 90):.3f} ms, p99 {_ms(apdus, 99):.3f} ms "
                "(target median < 0.5 ms)"
            )
            eventloop.run(time_handshakes(server, client, keys, 10))  # warm-up
            shakes = eventloop.run(time_handshakes(server, client, keys, count))
        _report(f"handshake x{count}, both cards behind pcscd, one process", shakes)
    if args.peers in ("two", "both"):
        for driver, name in (("aio", "asyncio driver"), ("sync", "blocking driver")):
            shakes = two_process_handshakes(args.profile, count, driver)
            _report(
                f"handshake x{count}, both cards behind pcscd, peers in two "
                f"processes, {name} (target median < 5 ms)",
                shakes,
            )
    _report(
        f"reference: handshake x{count}, in-process virtual cards, no pcscd",
        reference_handshakes(count),
    )


if __name__ == "__main__":
    main()
