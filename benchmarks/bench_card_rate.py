"""How many handshakes per second one server card can serve.

    .venv/bin/python benchmarks/bench_card_rate.py [--seconds S] [--clients N]

A server card is held from its GET CHALLENGE to its EXTERNAL AUTHENTICATE,
which spans one network round trip, so one card serves one handshake at a
time.  N clients (each with its own in-process virtual card) handshake
against one server for S seconds, for three server cards:

- the in-process virtual card;
- the virtual card behind pcscd and vpcd (as a reader would be);
- a SoftHSM2 token (each connection has its own challenge: no span).

Clients and server share one process and event loop here, so the figures
are a floor; over a WAN each span also holds the card for one round trip
(see docs/deployment.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pcsc import cards as pcsc_cards

from iscl_hw import aio, eventloop, softhsm
from iscl_hw.card import ApduCard, Card
from iscl_hw.constants import KEY_INDEXES
from iscl_hw.errors import IsclError
from iscl_hw.keyfile import KeyStore
from softcard.cardfile import new_card_state
from softcard.emulator import SoftCard

AUTH = {i: os.urandom(8) for i in KEY_INDEXES}
KEYS = KeyStore({i: os.urandom(8) for i in KEY_INDEXES})


def soft_card(name: str, auth: dict[int, bytes] = AUTH) -> ApduCard:
    return ApduCard(SoftCard(new_card_state(auth)), name=name)


async def rate(server_card: Card, clients: int, seconds: float) -> float:
    async def handle(channel: aio.AsyncChannel) -> None:
        with contextlib.suppress(IsclError):
            await channel.recv_message()

    server = await aio.start_server(
        handle,
        "127.0.0.1",
        0,
        card=server_card,
        keys=KEYS,
        max_handshakes_per_peer=clients,
    )
    port = server.sockets[0].getsockname()[1]
    done = 0
    deadline = time.monotonic() + seconds

    async def client(index: int) -> None:
        nonlocal done
        card = soft_card(f"client {index}")
        while time.monotonic() < deadline:
            channel = await aio.open_connection("127.0.0.1", port, card=card, keys=KEYS)
            done += 1
            await channel.abort()

    try:
        started = time.monotonic()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.monotonic() - started
    finally:
        server.close()
        await server.wait_closed()
    return done / elapsed


@contextlib.contextmanager
def token_card(directory: Path) -> Iterator[Card]:
    from iscl_hw.hsm import KeyKind, Token, TokenCard, TokenConfig

    module = softhsm.find_module()
    softhsm.use_config(softhsm.write_config(directory))
    softhsm.init_token(module, "rate", b"rate-so-pin", b"rate-pin")
    with Token(TokenConfig(str(module), label="rate", pin=b"rate-pin")) as token:
        for index, key in AUTH.items():
            token.import_key(KeyKind.AUTH, index, key)
        yield TokenCard(token)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()

    def report(name: str, value: float) -> None:
        print(f"{name:40} {value:7.0f} handshakes/s ({args.clients} clients)")

    report(
        "in-process virtual card",
        eventloop.run(rate(soft_card("server"), args.clients, args.seconds)),
    )
    with (
        tempfile.TemporaryDirectory() as directory,
        token_card(Path(directory)) as card,
    ):
        report("SoftHSM2 token", eventloop.run(rate(card, args.clients, args.seconds)))
    with pcsc_cards("plain", auth=AUTH) as (server, _client, _keys):
        report(
            "virtual card behind pcscd + vpcd",
            eventloop.run(rate(server, args.clients, args.seconds)),
        )


if __name__ == "__main__":
    main()
