"""Benchmarks of the PKCS#11 backend on SoftHSM2, beside the software path.

    .venv/bin/python benchmarks/bench_hsm.py [--handshakes N] [--concurrent N]
                                             [--megabytes N]

Makes two SoftHSM2 tokens in a temporary directory (same keys) and reports,
in one run:
- the median and p90 of full handshakes over TCP with a token on each side;
- N handshakes started at once against one server token: how many succeed,
  and the longest and median time from connect to authenticated;
- secured throughput (1 MiB messages) with the keys in the tokens, beside
  the same transfer with software keys and virtual cards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import bench_throughput, time_handshakes

from iscl_hw import aio, eventloop, softhsm
from iscl_hw.constants import KEY_INDEXES, MacMethod
from iscl_hw.errors import IsclError
from iscl_hw.hsm import KeyKind, Token, TokenCard, TokenConfig, TokenKeys
from iscl_hw.settings import Settings

PIN = b"bench-pin"


def make_tokens(directory: Path) -> tuple[Token, Token]:
    module = softhsm.find_module()
    softhsm.use_config(softhsm.write_config(directory))
    auth = {i: os.urandom(8) for i in KEY_INDEXES}
    enc = {i: os.urandom(8) for i in KEY_INDEXES}
    tokens = []
    for label in ("bench-server", "bench-client"):
        softhsm.init_token(module, label, b"bench-so-pin", PIN)
        token = Token(TokenConfig(str(module), label=label, pin=PIN))
        for index in KEY_INDEXES:
            token.import_key(KeyKind.AUTH, index, auth[index])
            token.import_key(KeyKind.ENC, index, enc[index])
        tokens.append(token)
    return tokens[0], tokens[1]


async def concurrent_handshakes(
    server: Token, client: Token, count: int
) -> tuple[int, list[float]]:
    async def handle(channel: aio.AsyncChannel) -> None:
        try:
            await channel.recv_message()
        except IsclError:
            pass

    listener = await aio.start_server(
        handle,
        "127.0.0.1",
        0,
        card=TokenCard(server),
        keys=TokenKeys(server),
        max_handshakes_per_peer=count,
    )
    port = listener.sockets[0].getsockname()[1]
    card, keys = TokenCard(client), TokenKeys(client)

    async def one() -> float:
        started = time.perf_counter()
        channel = await aio.open_connection("127.0.0.1", port, card=card, keys=keys)
        elapsed = time.perf_counter() - started
        await channel.close()
        return elapsed

    try:
        results = await asyncio.gather(
            *(one() for _ in range(count)), return_exceptions=True
        )
    finally:
        listener.close()
        await listener.wait_closed()
    times = [r for r in results if isinstance(r, float)]
    return len(times), times


def ms(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * q))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--handshakes", type=int, default=300)
    parser.add_argument("--concurrent", type=int, default=100)
    parser.add_argument("--megabytes", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="iscl-bench-hsm-") as directory:
        server, client = make_tokens(Path(directory))
        print(f"SoftHSM2 tokens, single DES as {server.way.name}")

        times = eventloop.run(
            time_handshakes(
                TokenCard(server),
                TokenCard(client),
                TokenKeys(server),
                args.handshakes,
                client_keys=TokenKeys(client),
            )
        )
        print(
            f"handshake over TCP, SoftHSM2 both sides: median "
            f"{statistics.median(times) * 1000:.2f} ms, p90 {ms(times, 0.9):.2f} ms "
            f"({len(times)} runs)"
        )

        ok, waits = eventloop.run(
            concurrent_handshakes(server, client, args.concurrent)
        )
        print(
            f"{args.concurrent} concurrent handshakes, one token each side: {ok} "
            f"succeeded, longest {max(waits) * 1000:.0f} ms, median "
            f"{statistics.median(waits) * 1000:.0f} ms"
        )

        for mac in (MacMethod.MD5, MacMethod.DESMAC):
            settings = Settings(mac=mac)
            sides = (
                TokenCard(server),
                TokenCard(client),
                TokenKeys(server),
                TokenKeys(client),
            )
            token_rate = eventloop.run(
                bench_throughput(args.megabytes, settings, sides)
            )
            soft_rate = eventloop.run(bench_throughput(args.megabytes, settings))
            print(
                f"over TCP, DES-CBC + {mac.name:6}: keys in SoftHSM2 "
                f"{token_rate:5.1f} MB/s, software keys {soft_rate:5.1f} MB/s"
            )
        server.close()
        client.close()


if __name__ == "__main__":
    main()
