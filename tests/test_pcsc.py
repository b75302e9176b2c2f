"""The PC/SC backend through the real pcscd, vpcd readers and soft cards.

Needs pcscd, vsmartcard-vpcd and pyscard (scripts/test.sh installs them);
skips with the reason otherwise.  See tests/pcsc_env.py for who owns pcscd.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import make_keys, random_keys, serving
from pcsc_env import PcscEnv, pcsc_env, profiled_card

from iscl_hw import aio, cli_pcsc
from iscl_hw.apdu import INS_EXTERNAL_AUTHENTICATE, INS_GET_CHALLENGE
from iscl_hw.errors import CardError, CardRemoved, IsclError
from iscl_hw.keyfile import KeyStore
from iscl_hw.pcsc import (
    VPCD_READERS,
    NoCard,
    NoReader,
    PcscCard,
    PcscCardRemoved,
    PcscContext,
    PcscError,
    ReaderBusy,
    ReaderSelector,
    list_readers,
    open_reader,
)

__all__ = ["pcsc_env"]  # the fixture, imported for pytest

SERVER_SLOT, CLIENT_SLOT = 0, 1
SERVER_READER, CLIENT_READER = VPCD_READERS


# ------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def _restore_trace_loggers() -> Iterator[None]:
    """``--trace`` sets loggers to DEBUG with a handler on a captured stream."""
    names = ("iscl_hw.transport", "iscl_hw.card", "iscl_hw.pcsc")
    saved = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        for handler in list(logger.handlers):
            if handler.get_name() == "iscl-card-trace":
                logger.removeHandler(handler)


class Peers:
    """Both peers' cards in the two readers, with their keys."""

    def __init__(self, env: PcscEnv, profile: str = "plain") -> None:
        self.env = env
        self.auth = random_keys()
        enc = random_keys()
        self.server_keys: KeyStore = make_keys(enc)
        self.client_keys: KeyStore = make_keys(enc)
        env.put(SERVER_SLOT, profiled_card(self.auth, profile))
        env.put(CLIENT_SLOT, profiled_card(self.auth, profile))
        self.server = PcscCard(SERVER_READER, card_timeout=2)
        self.client = PcscCard(CLIENT_READER, card_timeout=2)

    def close(self) -> None:
        self.server.close()
        self.client.close()


@pytest.fixture
def peers(pcsc_env: PcscEnv) -> Iterator[Peers]:
    pair = Peers(pcsc_env)
    try:
        yield pair
    finally:
        pair.close()
        for slot in (SERVER_SLOT, CLIENT_SLOT):
            pcsc_env.insert(slot)


async def echo(channel: aio.AsyncChannel) -> None:
    while True:
        try:
            data = await channel.recv()
        except IsclError:
            return
        await channel.send(data[::-1])


async def talk(peers: Peers, messages: list[bytes]) -> list[bytes]:
    """Handshake (both cards behind pcscd), send ``messages``, close."""
    async with serving(echo, peers.server, peers.server_keys) as port:
        channel = await aio.open_connection(
            "127.0.0.1", port, card=peers.client, keys=peers.client_keys
        )
        answers = []
        for message in messages:
            await channel.send(message)
            answers.append(await channel.recv())
        await channel.close()
    return answers


def remove_on(env: PcscEnv, slot: int, ins: int) -> None:
    """Pull the card out of ``slot`` when the card sees command ``ins``."""
    entry = env.slots[slot]

    def hook(command: bytes) -> None:
        if len(command) > 1 and command[1] == ins:
            entry.holder.hook = None
            entry.bridge.remove()

    entry.holder.hook = hook


# --------------------------------------------------------------- handshake


def test_handshake_and_transfer_both_cards_behind_pcscd(peers: Peers) -> None:
    messages = [b"ping", bytes(range(256)) * 40]
    answers = asyncio.run(talk(peers, messages))
    assert answers == [m[::-1] for m in messages]
    assert peers.server.reader == SERVER_READER
    assert peers.client.reader == CLIENT_READER


@pytest.mark.parametrize("profile", ["t0-getresponse", "wrong-le", "no-extended"])
def test_awkward_profiles(pcsc_env: PcscEnv, profile: str) -> None:
    pair = Peers(pcsc_env, profile)
    try:
        expected_t = 1 if profile == "wrong-le" else 0
        assert pair.client.protocol == expected_t
        assert asyncio.run(talk(pair, [b"profile " + profile.encode()])) == [
            (b"profile " + profile.encode())[::-1]
        ]
    finally:
        pair.close()


def test_protocol_override(pcsc_env: PcscEnv) -> None:
    pcsc_env.put(SERVER_SLOT, profiled_card({1: bytes(8)}, "plain"))
    card = PcscCard(SERVER_READER, protocol=1, card_timeout=2)
    try:
        assert card.protocol == 1
        assert len(card.get_challenge()) == 8
    finally:
        card.close()
    pcsc_env.put(SERVER_SLOT, profiled_card({1: bytes(8)}, "t0-getresponse"))
    with pytest.raises(PcscError, match=SERVER_READER):
        PcscCard(SERVER_READER, protocol=1, card_timeout=0.5)


# ----------------------------------------------------------------- removal


@pytest.mark.parametrize(
    ("slot", "ins"),
    [
        (CLIENT_SLOT, INS_GET_CHALLENGE),
        (SERVER_SLOT, INS_GET_CHALLENGE),
        (CLIENT_SLOT, INS_EXTERNAL_AUTHENTICATE),
        (SERVER_SLOT, INS_EXTERNAL_AUTHENTICATE),
    ],
    ids=["client-challenge", "server-challenge", "client-extauth", "server-extauth"],
)
def test_card_removed_during_handshake(peers: Peers, slot: int, ins: int) -> None:
    remove_on(peers.env, slot, ins)
    with pytest.raises(IsclError) as raised:
        asyncio.run(talk(peers, [b"x"]))
    if slot == CLIENT_SLOT:
        assert isinstance(raised.value, CardRemoved)
        assert CLIENT_READER in str(raised.value)
    else:
        assert not isinstance(raised.value, CardRemoved)  # the peer's card left
    # The card comes back: the same PcscCard opens it again for the next span.
    peers.env.insert(slot)
    assert asyncio.run(talk(peers, [b"again"])) == [b"niaga"]


def test_card_removed_during_transfer_does_not_matter(peers: Peers) -> None:
    async def run() -> list[bytes]:
        async with serving(echo, peers.server, peers.server_keys) as port:
            channel = await aio.open_connection(
                "127.0.0.1", port, card=peers.client, keys=peers.client_keys
            )
            answers = []
            await channel.send(b"before")
            answers.append(await channel.recv())
            # Authenticated: no card operation follows, so pulling both
            # cards out changes nothing for this connection.
            peers.env.remove(SERVER_SLOT)
            peers.env.remove(CLIENT_SLOT)
            peers.env.wait_card(SERVER_SLOT, present=False)
            peers.env.wait_card(CLIENT_SLOT, present=False)
            for _ in range(5):
                await channel.send(b"after")
                answers.append(await channel.recv())
            await channel.close()
            return answers

    assert asyncio.run(run()) == [b"erofeb"] + [b"retfa"] * 5


def test_removed_card_gives_card_removed_then_no_card(pcsc_env: PcscEnv) -> None:
    """A card pulled out mid-span fails that span; outside a span the
    card is opened again once (here: there is none, then it is back)."""
    pcsc_env.put(SERVER_SLOT, profiled_card({1: bytes(8)}))
    card = PcscCard(SERVER_READER, card_timeout=2, reconnect_wait=0.2)
    try:
        card.begin_span()
        pcsc_env.remove(SERVER_SLOT)
        pcsc_env.wait_card(SERVER_SLOT, present=False)
        # Within a span the card's state is gone: no second try.
        with pytest.raises(PcscCardRemoved, match=SERVER_READER):
            card.get_challenge()
        card.end_span()
        # Outside one the card is looked for again, once.
        with pytest.raises(NoCard, match=SERVER_READER):
            card.get_challenge()
        pcsc_env.insert(SERVER_SLOT)
        assert len(card.get_challenge()) == 8
    finally:
        card.close()
        pcsc_env.insert(SERVER_SLOT)


# ---------------------------------------------------------------- readers


def test_reader_by_name_regex_and_index(pcsc_env: PcscEnv) -> None:
    with PcscContext() as context:
        readers = context.readers()
        for selector, expected in [
            (ReaderSelector.parse(CLIENT_READER), [CLIENT_READER]),
            (ReaderSelector.parse("re:Virtual PCD"), list(VPCD_READERS)),
            (ReaderSelector.parse("/01$/"), [CLIENT_READER]),
            (ReaderSelector.parse(f"#{readers.index(CLIENT_READER)}"), [CLIENT_READER]),
            (ReaderSelector.parse(None), readers),
        ]:
            assert selector.pick(readers) == expected, selector


def test_no_reader_is_named(pcsc_env: PcscEnv) -> None:
    started = time.monotonic()
    with pytest.raises(NoReader, match="no-such-reader"):
        PcscCard("no-such-reader", card_timeout=0.2)
    assert time.monotonic() - started < 2


def test_no_card_names_the_reader(pcsc_env: PcscEnv) -> None:
    pcsc_env.remove(SERVER_SLOT)
    try:
        pcsc_env.wait_card(SERVER_SLOT, present=False)
        with pytest.raises(NoCard, match=SERVER_READER):
            PcscCard(SERVER_READER, card_timeout=0.3)
    finally:
        pcsc_env.insert(SERVER_SLOT)


def test_sharing_violation_tries_next_reader_then_fails(pcsc_env: PcscEnv) -> None:
    pcsc_env.put(SERVER_SLOT, profiled_card({1: bytes(8)}))
    from smartcard import scard

    with PcscContext() as other:
        result, handle, _ = scard.SCardConnect(
            other.handle,
            SERVER_READER,
            scard.SCARD_SHARE_EXCLUSIVE,
            scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
        )
        assert result == 0
        try:
            card = PcscCard("re:^Virtual PCD", card_timeout=1)
            assert card.reader == CLIENT_READER  # skipped the held one
            card.close()
            started = time.monotonic()
            with pytest.raises(ReaderBusy, match=SERVER_READER):
                PcscCard(SERVER_READER, card_timeout=2, busy_wait=0.3)
            assert 0.3 <= time.monotonic() - started < 1.5
        finally:
            scard.SCardDisconnect(handle, scard.SCARD_LEAVE_CARD)


def test_span_holds_a_transaction(pcsc_env: PcscEnv) -> None:
    pcsc_env.put(SERVER_SLOT, profiled_card({1: bytes(8)}))
    card = PcscCard(SERVER_READER, card_timeout=2)
    try:
        card.begin_span()
        assert len(card.get_challenge()) == 8
        card.end_span()
        card.end_span()  # idempotent
        card.begin_span()
        card.end_span()
    finally:
        card.close()


# ------------------------------------------------------------------- pcscd


def test_pcscd_restarted_between_two_connections(
    pcsc_env: PcscEnv, peers: Peers
) -> None:
    if not pcsc_env.owns_pcscd:
        pytest.skip("pcscd is the system's (systemd), not this run's: not restarted")
    assert asyncio.run(talk(peers, [b"one"])) == [b"eno"]
    pcsc_env.restart_pcscd()
    # Both PcscCards find their context dead and re-establish it once.
    assert asyncio.run(talk(peers, [b"two"])) == [b"owt"]


_PEER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from iscl_hw import aio
    from iscl_hw.keyfile import KeyStore
    from iscl_hw.pcsc import PcscCard

    async def main() -> None:
        port, enc = int(sys.argv[1]), bytes.fromhex(sys.argv[2])
        keys = KeyStore({i: enc[8 * (i - 1) : 8 * i] for i in range(1, 9)})
        card = PcscCard(sys.argv[3], card_timeout=2)
        channel = await aio.open_connection("127.0.0.1", port, card=card, keys=keys)
        await channel.send(b"from another process")
        print((await channel.recv()).decode())
        await channel.close()
        card.close()

    asyncio.run(main())
    """
)


def test_two_processes_share_one_pcscd(pcsc_env: PcscEnv, tmp_path: Path) -> None:
    auth, enc = random_keys(), random_keys()
    pcsc_env.put(SERVER_SLOT, profiled_card(auth))
    pcsc_env.put(CLIENT_SLOT, profiled_card(auth))
    server = PcscCard(SERVER_READER, card_timeout=2)
    enc_hex = b"".join(enc[i] for i in range(1, 9)).hex()

    async def run() -> subprocess.CompletedProcess[str]:
        async with serving(echo, server, make_keys(enc)) as port:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _PEER_SCRIPT,
                str(port),
                enc_hex,
                CLIENT_READER,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                out, err = await asyncio.wait_for(process.communicate(), 20)
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            assert process.returncode is not None
            return subprocess.CompletedProcess(
                [], process.returncode, out.decode(), err.decode()
            )

    try:
        done = asyncio.run(run())
    finally:
        server.close()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ssecorp rehtona morf"


# --------------------------------------------------------------- commands


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="iscl card")
    cli_pcsc.register(parser.add_subparsers(dest="card_command", required=True))
    return parser.parse_args(argv)


def test_list_readers_and_command(
    pcsc_env: PcscEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    pcsc_env.put(SERVER_SLOT, profiled_card({1: bytes(8)}, "wrong-le"))
    infos = {info.name: info for info in list_readers()}
    info = infos[SERVER_READER]
    assert info.card and info.offered == (1,) and info.active == 1
    args = _parse(["list"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert SERVER_READER in out and "3B 88 81 31 FE 45" in out and "active T=1" in out


def test_probe_touches_no_retry_counter(
    pcsc_env: PcscEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    card = profiled_card({1: bytes(8), 3: bytes(8)}, "t0-getresponse")
    pcsc_env.put(CLIENT_SLOT, card)
    sent: list[int] = []
    pcsc_env.slots[CLIENT_SLOT].holder.hook = lambda command: sent.append(command[1])
    args = _parse(["probe", "--reader", CLIENT_READER, "--trace"])
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert "key 1: answers INTERNAL AUTHENTICATE" in out.out
    assert "key 3: answers INTERNAL AUTHENTICATE" in out.out
    assert "key 2: SW 6A88" in out.out
    assert "PIN: none" in out.out
    assert "GET RESPONSE" in out.err  # the trace shows the 61xx follow-ups
    assert INS_EXTERNAL_AUTHENTICATE not in sent
    assert all(
        slot.remaining == slot.max_retries for slot in card.card.state.keys.values()
    )


def test_probe_pin_from_env_is_never_printed(
    pcsc_env: PcscEnv,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from softcard.cardfile import new_card_state
    from softcard.emulator import SoftCard
    from softcard.profiles import ProfiledCard

    soft = SoftCard(new_card_state({1: bytes(8)}, pin=b"918273"))
    pcsc_env.put(CLIENT_SLOT, ProfiledCard(soft, "plain"))
    monkeypatch.setenv("TEST_CARD_PIN", "918273")
    args = _parse(
        ["probe", "--reader-index", "1", "--pin-env", "TEST_CARD_PIN", "--trace"]
    )
    if list_readers_names().index(CLIENT_READER) != 1:
        pytest.skip("the vpcd readers are not pcscd's readers #0 and #1")
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert "PIN: verified" in out.out
    assert "key 1: answers INTERNAL AUTHENTICATE" in out.out
    assert "918273" not in out.out + out.err
    assert b"918273".hex() not in (out.out + out.err).lower()


def list_readers_names() -> list[str]:
    with PcscContext() as context:
        return context.readers()


def test_probe_without_card_fails_cleanly(
    pcsc_env: PcscEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _parse(["probe", "--reader", "no-such-reader", "--wait", "0.1"])
    assert args.func(args) == 2
    assert "no-such-reader" in capsys.readouterr().err


def test_open_reader_connects_shared(pcsc_env: PcscEnv) -> None:
    pcsc_env.put(SERVER_SLOT, profiled_card({1: bytes(8)}))
    with PcscContext() as context:
        first = open_reader(context, ReaderSelector(name=SERVER_READER))
        second = open_reader(context, ReaderSelector(name=SERVER_READER))
        assert first.reader == second.reader == SERVER_READER
        first.close()
        second.close()
    assert isinstance(PcscCardRemoved("x"), CardError)


def test_card_put_back_between_uses_is_opened_again(pcsc_env: PcscEnv) -> None:
    """A client's INTERNAL AUTHENTICATE needs no card state, so a card that
    was taken out and put back since its last use just works."""
    key = bytes(range(8))
    pcsc_env.put(SERVER_SLOT, profiled_card({1: key}))
    card = PcscCard(SERVER_READER, card_timeout=2, reconnect_wait=1.0)
    try:
        first = card.internal_authenticate(1, bytes(8))
        pcsc_env.remove(SERVER_SLOT)
        pcsc_env.wait_card(SERVER_SLOT, present=False)
        pcsc_env.insert(SERVER_SLOT)
        pcsc_env.wait_card(SERVER_SLOT, present=True)

        assert card.internal_authenticate(1, bytes(8)) == first
    finally:
        card.close()
