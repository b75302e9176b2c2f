"""Benchmarks of the engine on the virtual card, over loopback TCP.

    .venv/bin/python benchmarks/bench_core.py [--handshakes N] [--megabytes N]

Reports, in one run:
- the median and p90 of full handshakes (TCP connect, line connection,
  mutual authentication with real APDUs to two in-process virtual cards);
- secured throughput (1 MiB messages, DES-CBC + MD5 and DES-CBC + DESMAC)
  beside the raw single-core DES-CBC speed of `cryptography` measured in the
  same process, and through the protocol core alone (no sockets).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time

from iscl_hw import aio, crypto, eventloop
from iscl_hw.card import ApduCard, Card
from iscl_hw.constants import KEY_INDEXES, MacMethod
from iscl_hw.core import Connection, Role
from iscl_hw.endpoint import Endpoint, Timeouts
from iscl_hw.errors import IsclError
from iscl_hw.events import MessageReceived
from iscl_hw.keyfile import KeyStore
from iscl_hw.settings import KeyProvider, Settings
from softcard.cardfile import new_card_state
from softcard.emulator import SoftCard

MIB = 1 << 20


def make_cards() -> tuple[ApduCard, ApduCard, KeyStore]:
    auth = {index: os.urandom(8) for index in KEY_INDEXES}
    keys = KeyStore({index: os.urandom(8) for index in KEY_INDEXES})
    server = ApduCard(SoftCard(new_card_state(auth)), name="server card")
    client = ApduCard(SoftCard(new_card_state(auth)), name="client card")
    return server, client, keys


async def time_handshakes(
    server_card: Card,
    client_card: Card,
    keys: KeyProvider,
    count: int,
    client_keys: KeyProvider | None = None,
) -> list[float]:
    """Seconds per full handshake (TCP connect to authenticated), ``count``
    times over one server."""

    async def handle(channel: aio.AsyncChannel) -> None:
        with contextlib.suppress(IsclError):
            await channel.recv_message()

    server = await aio.start_server(handle, "127.0.0.1", 0, card=server_card, keys=keys)
    port = server.sockets[0].getsockname()[1]
    times = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            channel = await aio.open_connection(
                "127.0.0.1", port, card=client_card, keys=client_keys or keys
            )
            times.append(time.perf_counter() - started)
            await channel.close()
    finally:
        server.close()
        await server.wait_closed()
    return times


async def bench_handshakes(count: int) -> list[float]:
    server_card, client_card, keys = make_cards()
    return await time_handshakes(server_card, client_card, keys, count)


async def bench_throughput(
    megabytes: int,
    settings: Settings,
    sides: tuple[Card, Card, KeyProvider, KeyProvider] | None = None,
) -> float:
    """MB/s of 1 MiB messages client to server; ``sides`` is (server card,
    client card, server keys, client keys), virtual cards by default."""
    if sides is None:
        made = make_cards()
        sides = (made[0], made[1], made[2], made[2])
    server_card, client_card, server_keys, client_keys = sides
    done = asyncio.Event()

    async def handle(channel: aio.AsyncChannel) -> None:
        for _ in range(megabytes):
            await channel.recv()
        done.set()
        await channel.recv_message()

    server = await aio.start_server(
        handle, "127.0.0.1", 0, card=server_card, keys=server_keys, settings=settings
    )
    port = server.sockets[0].getsockname()[1]
    payload = os.urandom(MIB)
    try:
        channel = await aio.open_connection(
            "127.0.0.1", port, card=client_card, keys=client_keys, settings=settings
        )
        started = time.perf_counter()
        for _ in range(megabytes):
            await channel.send(payload)
        await done.wait()
        elapsed = time.perf_counter() - started
        await channel.close()
    finally:
        server.close()
        await server.wait_closed()
    return megabytes * MIB / elapsed / 1e6


def bench_core_only(megabytes: int) -> float:
    """Both protocol cores in one thread, bytes handed over in memory."""
    server_card, client_card, keys = make_cards()
    timeouts = Timeouts()
    ends = {}
    for role, card in ((Role.SERVER, server_card), (Role.CLIENT, client_card)):
        from iscl_hw.arbiter import CardArbiter

        ends[role] = Endpoint(
            Connection(role, Settings(), keys), CardArbiter(card), timeouts
        )

    def pump() -> None:
        moved = True
        while moved:
            moved = False
            for role, other in ((Role.SERVER, Role.CLIENT), (Role.CLIENT, Role.SERVER)):
                end = ends[role]
                while (request := end.advance()) is not None:
                    end.arbiter.acquire(end)
                    end.run_card(request)
                data = end.conn.data_to_send()
                if data:
                    ends[other].conn.receive_data(data)
                    moved = True

    pump()
    payload = os.urandom(MIB)
    client, server = ends[Role.CLIENT], ends[Role.SERVER]
    started = time.perf_counter()
    for _ in range(megabytes):
        client.conn.send_message(payload)
        pump()
        message = server.messages.popleft()
        assert isinstance(message, MessageReceived) and len(message.data) == MIB
    return megabytes * MIB / (time.perf_counter() - started) / 1e6


def raw_des_cbc(megabytes: int) -> float:
    key, iv, data = os.urandom(8), bytes(8), os.urandom(MIB)
    started = time.perf_counter()
    for _ in range(megabytes):
        crypto.des_cbc_encrypt(key, iv, data)
    return megabytes * MIB / (time.perf_counter() - started) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--handshakes", type=int, default=300)
    parser.add_argument("--megabytes", type=int, default=16)
    args = parser.parse_args()
    print(f"event loop: {eventloop.loop_name()} (ISCL_EVENT_LOOP chooses)")

    times = eventloop.run(bench_handshakes(args.handshakes))
    times.sort()
    print(
        f"handshake over TCP, virtual cards: median "
        f"{statistics.median(times) * 1000:.2f} ms, p90 "
        f"{times[int(len(times) * 0.9)] * 1000:.2f} ms ({len(times)} runs)"
    )
    raw = raw_des_cbc(args.megabytes)
    print(f"raw DES-CBC (cryptography, one core):   {raw:6.1f} MB/s")
    core = bench_core_only(args.megabytes)
    print(
        f"protocol core only, DES-CBC + MD5:      {core:6.1f} MB/s "
        f"(both ends: encrypt and decrypt)"
    )
    for mac in (MacMethod.MD5, MacMethod.DESMAC):
        rate = eventloop.run(bench_throughput(args.megabytes, Settings(mac=mac)))
        print(f"over TCP, DES-CBC + {mac.name:6}:            {rate:6.1f} MB/s")


if __name__ == "__main__":
    main()
