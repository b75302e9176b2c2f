"""The PC/SC backend through the real pcscd, vpcd readers and soft cards.

Needs pcscd, vsmartcard-vpcd and pyscard (scripts/test.sh installs them);
skips with the reason otherwise.  See tests/pcsc_env.py for who owns pcscd.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import make_keys, random_keys, serving
from pcsc_env import PcscEnv, pcsc_env, profiled_card

from iscl_hw import aio, cli_pcsc, demo
from iscl_hw.apdu import (
    INS_EXTERNAL_AUTHENTICATE,
    INS_GET_CHALLENGE,
    INS_INTERNAL_AUTHENTICATE,
    gen_select_aid_apdu,
)
from iscl_hw.card import ISCL_AID, ApduCard
from iscl_hw.cli_serve import cmd_card_serve
from iscl_hw.crypto import des_ecb_encrypt
from iscl_hw.endpoint import Timeouts
from iscl_hw.errors import (
    CardError,
    CardRemoved,
    ConfigError,
    IsclError,
    PinRefused,
    StatusWordError,
)
from iscl_hw.keyfile import KeyStore
from iscl_hw.pcsc import (
    VPCD_PORTS,
    VPCD_READERS,
    NoCard,
    NoReader,
    PcscCard,
    PcscCardRemoved,
    PcscContext,
    PcscError,
    PcscServiceLost,
    PcscTimeout,
    ReaderBusy,
    ReaderSelector,
    format_duration,
    list_readers,
    open_reader,
)
from iscl_hw.transport import ApduLink
from softcard.cardfile import create_card_file, new_card_state
from softcard.emulator import SoftCard
from softcard.profiles import ProfiledCard

__all__ = ["pcsc_env"]  # the fixture, imported for pytest

SERVER_SLOT, CLIENT_SLOT = 0, 1
Popen = subprocess.Popen[bytes]
SERVER_READER, CLIENT_READER = VPCD_READERS


# ------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def _restore_trace_loggers() -> Iterator[None]:
    """``--trace`` sets loggers to DEBUG, not propagating, with a handler on a
    captured stream."""
    names = ("iscl_hw.transport", "iscl_hw.card", "iscl_hw.pcsc")
    saved = {
        name: (logging.getLogger(name).level, logging.getLogger(name).propagate)
        for name in names
    }
    yield
    for name, (level, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = propagate
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


# ------------------------------------------------------- a stalled reader


def soft_card(auth: dict[int, bytes]) -> ApduCard:
    """An in-process card (no pcscd) for the servers of the stall tests."""
    return ApduCard(SoftCard(new_card_state(auth)), name="in-process card")


class Gate:
    """The card in ``slot`` stops answering (as a stopped process would) at
    its first GET CHALLENGE or INTERNAL AUTHENTICATE, until opened."""

    def __init__(self, env: PcscEnv, slot: int) -> None:
        self.reached = threading.Event()
        self.opened = threading.Event()

        def hook(command: bytes) -> None:
            stall = (INS_GET_CHALLENGE, INS_INTERNAL_AUTHENTICATE)
            if len(command) > 1 and command[1] in stall and not self.opened.is_set():
                self.reached.set()
                self.opened.wait(30)

        env.slots[slot].holder.hook = hook

    def open(self) -> None:
        self.opened.set()


async def loop_lag(stop: asyncio.Event) -> float:
    """The longest the event loop kept this task waiting past a 10 ms tick."""
    loop = asyncio.get_running_loop()
    worst, last = 0.0, loop.time()
    while not stop.is_set():
        await asyncio.sleep(0.01)
        now = loop.time()
        worst, last = max(worst, now - last - 0.01), now
    return worst


async def race_stalled(
    stalled: PcscCard,
    healthy: PcscCard,
    auth: dict[int, bytes],
    enc: dict[int, bytes],
    reached: Callable[[], bool],
    limit: float,
) -> dict[str, float]:
    """A handshake with the ``stalled`` card and, once its card hangs, one
    with the ``healthy`` card on the same loop (each to a server with its own
    in-process card).  The first must fail with PcscTimeout after ``limit``;
    returns how long things took."""
    loop = asyncio.get_running_loop()
    timings: dict[str, float] = {}
    stop = asyncio.Event()
    lag = asyncio.create_task(loop_lag(stop))
    async with (
        serving(echo, soft_card(auth), make_keys(enc)) as stalled_port,
        serving(echo, soft_card(auth), make_keys(enc)) as healthy_port,
    ):
        started = loop.time()
        first = asyncio.create_task(
            aio.open_connection(
                "127.0.0.1",
                stalled_port,
                card=stalled,
                keys=make_keys(enc),
                timeouts=Timeouts(card=limit),
            )
        )
        assert await asyncio.to_thread(reached)
        begun = loop.time()
        channel = await aio.open_connection(
            "127.0.0.1", healthy_port, card=healthy, keys=make_keys(enc)
        )
        timings["other handshake"] = loop.time() - begun
        await channel.send(b"meanwhile")
        assert await channel.recv() == b"elihwnaem"
        await channel.close()
        timings["other connection"] = loop.time() - begun
        with pytest.raises(PcscTimeout, match=re.escape(stalled.name)):
            await first
        timings["stalled fails"] = loop.time() - started
        stop.set()
        timings["loop lag"] = await lag
    return timings


def test_stalled_reader_stalls_only_its_own_connection(pcsc_env: PcscEnv) -> None:
    """A card that stops answering mid-handshake holds its own connection
    (until Timeouts.card), not the event loop and not the others."""
    auth, enc = random_keys(), random_keys()
    pcsc_env.put(SERVER_SLOT, profiled_card(auth))
    pcsc_env.put(CLIENT_SLOT, profiled_card(auth))
    stalled = PcscCard(SERVER_READER, card_timeout=2)
    healthy = PcscCard(CLIENT_READER, card_timeout=2)
    gate = Gate(pcsc_env, SERVER_SLOT)
    try:
        timings = asyncio.run(
            race_stalled(
                stalled, healthy, auth, enc, lambda: gate.reached.wait(5), limit=1.0
            )
        )
        print("stall timings (s):", {k: round(v, 4) for k, v in timings.items()})
        assert timings["other handshake"] < 0.5
        assert timings["loop lag"] < 0.25
        assert 1.0 <= timings["stalled fails"] < 3.0
        # The hung call returns; the transaction its span held ends then, and
        # the same card serves the next handshake.
        gate.open()

        async def again() -> bytes:
            async with serving(echo, soft_card(auth), make_keys(enc)) as port:
                channel = await aio.open_connection(
                    "127.0.0.1", port, card=stalled, keys=make_keys(enc)
                )
                await channel.send(b"again")
                answer = await channel.recv()
                await channel.close()
                return answer

        assert asyncio.run(again()) == b"niaga"
    finally:
        gate.open()
        stalled.close()
        healthy.close()
        pcsc_env.slots[SERVER_SLOT].holder.hook = None


def test_end_span_and_close_do_not_wait_for_a_hung_call(pcsc_env: PcscEnv) -> None:
    pcsc_env.put(SERVER_SLOT, profiled_card({1: bytes(8)}))
    card = PcscCard(SERVER_READER, card_timeout=2)
    gate = Gate(pcsc_env, SERVER_SLOT)
    worker = threading.Thread(target=lambda: card.get_challenge(), daemon=True)
    try:
        card.begin_span()
        worker.start()
        assert gate.reached.wait(5)
        started = time.monotonic()
        card.end_span()  # deferred: the hung GET CHALLENGE holds the card
        card.close()
        assert time.monotonic() - started < 0.1
        gate.open()
        worker.join(5)
        assert not worker.is_alive()
        with pytest.raises(PcscError, match="closed"):
            card.get_challenge()
    finally:
        gate.open()
        card.close()
        pcsc_env.slots[SERVER_SLOT].holder.hook = None
    # Both deferred steps ran: the reader is free for an exclusive connection.
    from smartcard import scard

    with PcscContext() as other:
        result, handle, _ = scard.SCardConnect(
            other.handle,
            SERVER_READER,
            scard.SCARD_SHARE_EXCLUSIVE,
            scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
        )
        assert result == 0
        scard.SCardDisconnect(handle, scard.SCARD_LEAVE_CARD)


def serve_process(card_path: Path, port: int, log: Path, *extra: str) -> Popen:
    """``iscl card serve`` as a child process, its standard error to ``log``."""
    command = [sys.executable, "-m", "iscl_hw.cli_serve", str(card_path)]
    command += ["--vpcd", f"127.0.0.1:{port}", *extra]
    with open(log, "w") as err:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)


def end_process(process: Popen) -> None:
    """Let a stopped child go on, then end it (by its PID)."""
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_stopped_card_serve_process(
    pcsc_env: PcscEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tester's case: `iscl card serve` in a reader, SIGSTOPped.  A second
    serve onto its slot fails; with the first stopped, another connection
    still completes at once, and probe and list give up after --timeout."""
    auth, enc = random_keys(), random_keys()
    path = tmp_path / "card.json"
    create_card_file(path, auth)
    pcsc_env.put(CLIENT_SLOT, profiled_card(auth))
    pcsc_env.remove(SERVER_SLOT)
    pcsc_env.wait_card(SERVER_SLOT, present=False)
    port = VPCD_PORTS[SERVER_SLOT]
    first = serve_process(path, port, tmp_path / "first.err", "--no-reconnect")
    second: Popen | None = None
    stalled: PcscCard | None = None
    healthy = PcscCard(CLIENT_READER, card_timeout=2)
    try:
        pcsc_env.wait_card(SERVER_SLOT)
        stalled = PcscCard(SERVER_READER, card_timeout=2)

        # vpcd takes one card per slot: a second serve onto it fails clearly.
        started = time.monotonic()
        second = serve_process(path, port, tmp_path / "second.err")
        assert second.wait(15) == 2
        taken = time.monotonic() - started
        err = (tmp_path / "second.err").read_text()
        assert "another card is already in that reader" in err, err
        assert err.count("error:") == 1

        os.kill(first.pid, signal.SIGSTOP)
        timings = asyncio.run(
            race_stalled(stalled, healthy, auth, enc, lambda: True, limit=1.0)
        )
        timings["second serve refused"] = taken
        for command in (
            ["probe", "--reader", SERVER_READER, "--wait", "0.5"],
            ["list"],
        ):
            args = _parse([*command, "--timeout", "1"])
            started = time.monotonic()
            assert args.func(args) == 2
            timings[command[0]] = time.monotonic() - started
            err = capsys.readouterr().err
            assert "no answer within" in err and SERVER_READER in err, err
        print(
            "stopped-serve timings (s):", {k: round(v, 3) for k, v in timings.items()}
        )
        assert timings["other handshake"] < 0.5
        assert timings["loop lag"] < 0.25
        assert timings["probe"] < 3 and timings["list"] < 3
    finally:
        end_process(first)
        if second is not None:
            end_process(second)
        if stalled is not None:
            stalled.close()
        healthy.close()
        pcsc_env.wait_card(SERVER_SLOT, present=False)
        pcsc_env.insert(SERVER_SLOT)


# --------------------------------------------------------- vpcd slots, demo


def test_serve_onto_an_occupied_slot_fails(
    pcsc_env: PcscEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "card.json"
    create_card_file(path, {1: bytes(8)})
    args = argparse.Namespace(
        card_file=path, vpcd=("127.0.0.1", VPCD_PORTS[CLIENT_SLOT]), no_reconnect=False
    )
    started = time.monotonic()
    assert cmd_card_serve(args) == 2
    assert time.monotonic() - started < 6
    err = capsys.readouterr().err
    assert "did not take the card" in err and str(VPCD_PORTS[CLIENT_SLOT]) in err
    # The session's card is still the one in that reader.
    pcsc_env.put(CLIENT_SLOT, profiled_card({1: bytes(8)}))
    card = PcscCard(CLIENT_READER, card_timeout=2)
    try:
        assert len(card.get_challenge()) == 8
    finally:
        card.close()


def test_demo_refuses_vpcd_readers_that_have_a_card(pcsc_env: PcscEnv) -> None:
    # The session's cards sit in both readers, as `iscl card serve` would.
    started = time.monotonic()
    with pytest.raises(ConfigError, match="already have a card") as raised:
        demo.run_demo(backend="pcsc", out=io.StringIO())
    assert all(reader in str(raised.value) for reader in VPCD_READERS)
    pcsc_env.remove(SERVER_SLOT)
    try:
        pcsc_env.wait_card(SERVER_SLOT, present=False)
        with pytest.raises(ConfigError, match=f"'{CLIENT_READER}' .* already has"):
            demo.run_demo(backend="pcsc", out=io.StringIO())
    finally:
        pcsc_env.insert(SERVER_SLOT)
    assert time.monotonic() - started < 5


def test_demo_over_pcscd_in_free_readers(pcsc_env: PcscEnv) -> None:
    for slot in (SERVER_SLOT, CLIENT_SLOT):
        pcsc_env.remove(slot)
    try:
        for slot in (SERVER_SLOT, CLIENT_SLOT):
            pcsc_env.wait_card(slot, present=False)
        # Twice in a row: the second run starts while pcscd may still show
        # the first run's cards (it polls vpcd about three times a second).
        for _ in range(2):
            out = io.StringIO()
            assert demo.run_demo(backend="pcsc", out=out) == 0
            text = out.getvalue()
            assert "identical" in text
            assert all(repr(reader) in text for reader in VPCD_READERS)
    finally:
        for slot in (SERVER_SLOT, CLIENT_SLOT):
            # The demo's cards leave first (pcscd sees it at its next poll).
            pcsc_env.wait_card(slot, present=False)
            pcsc_env.insert(slot)


# ------------------------------------------------------------ small fixes


def test_failed_transmit_waits_for_the_removal_to_show(
    pcsc_env: PcscEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pcscd may fail a command (0x80100016) before its reader state shows
    the card gone: that is still a removal, not a generic failure."""
    from smartcard import scard

    pcsc_env.put(SERVER_SLOT, profiled_card({1: bytes(8)}))
    pulled = False

    def failing(handle: object, protocol: int, command: list[int]) -> object:
        if pulled:
            pcsc_env.remove(SERVER_SLOT)
        return 0x80100016, []

    with PcscContext() as context:
        link = open_reader(context, ReaderSelector(name=SERVER_READER))
        try:
            monkeypatch.setattr(scard, "SCardTransmit", failing)
            started = time.monotonic()
            with pytest.raises(PcscError, match="0x80100016") as raised:
                link.transmit(bytes.fromhex("0084000008"))
            assert not isinstance(raised.value, PcscCardRemoved)  # still in
            assert 0.5 <= time.monotonic() - started < 2
            pulled = True
            with pytest.raises(PcscCardRemoved, match=SERVER_READER):
                link.transmit(bytes.fromhex("0084000008"))
        finally:
            monkeypatch.undo()
            link.close()
            pcsc_env.insert(SERVER_SLOT)


@pytest.mark.parametrize("pcscd_gone", [False, True])
def test_an_odd_transmit_failure_is_service_lost_when_pcscd_is_gone(
    pcsc_env: PcscEnv, monkeypatch: pytest.MonkeyPatch, pcscd_gone: bool
) -> None:
    """pcscd dying mid-command has failed it with 0x8010006A ("Access
    denied"): when pcscd no longer answers, that is PcscServiceLost, which
    the engine knows to re-establish the context for; otherwise the code
    stays as it came."""
    from smartcard import scard

    pcsc_env.put(SERVER_SLOT, profiled_card({1: bytes(8)}))
    status_change = scard.SCardGetStatusChange

    def gone(*args: object) -> object:
        return 0x8010001D, []

    with PcscContext() as context:
        link = open_reader(context, ReaderSelector(name=SERVER_READER))
        try:
            monkeypatch.setattr(scard, "SCardTransmit", lambda *a: (0x8010006A, []))
            if pcscd_gone:
                monkeypatch.setattr(scard, "SCardGetStatusChange", gone)
            with pytest.raises(PcscError, match="0x8010006A") as raised:
                link.transmit(bytes.fromhex("0084000008"))
            assert isinstance(raised.value, PcscServiceLost) is pcscd_gone
            assert raised.value.reader == SERVER_READER
        finally:
            monkeypatch.undo()
            assert scard.SCardGetStatusChange is status_change
            link.close()


def test_trace_lines_are_printed_once(
    pcsc_env: PcscEnv,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    pcsc_env.put(CLIENT_SLOT, profiled_card({1: bytes(8)}))
    caplog.set_level(logging.DEBUG)  # a root handler, as --log-level DEBUG has
    args = _parse(["probe", "--reader", CLIENT_READER, "--trace"])
    assert args.func(args) == 0
    err = capsys.readouterr().err
    assert "trace" in err and "GET CHALLENGE" in err
    trace = {"iscl_hw.transport", "iscl_hw.card", "iscl_hw.pcsc"}
    assert not [record for record in caplog.records if record.name in trace]


def test_wrong_reader_name_fails_without_waiting(
    pcsc_env: PcscEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    args = _parse(["probe", "--reader", "no-such-reader", "--wait", "5"])
    assert args.func(args) == 2
    assert "no-such-reader" in capsys.readouterr().err
    with pytest.raises(NoReader):
        PcscCard("no-such-reader", card_timeout=5)
    assert time.monotonic() - started < 1


def test_pcsc_codes_are_logged_in_hex(
    pcsc_env: PcscEnv,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from smartcard import scard

    pcsc_env.put(SERVER_SLOT, profiled_card({1: bytes(8)}))
    caplog.set_level(logging.INFO, logger="iscl_hw.pcsc")
    with PcscContext() as context:
        link = open_reader(context, ReaderSelector(name=SERVER_READER))
        link.begin_transaction()
        with monkeypatch.context() as patch:
            patch.setattr(scard, "SCardEndTransaction", lambda *_: 0x80100069)
            link.end_transaction()
        link.close()
    assert "(0x80100069)" in caplog.text
    assert str(0x80100069) not in caplog.text


def test_durations_read_well(pcsc_env: PcscEnv) -> None:
    assert format_duration(0.3) == "300 ms"
    assert format_duration(2) == "2 s"
    from smartcard import scard

    pcsc_env.put(SERVER_SLOT, profiled_card({1: bytes(8)}))
    with PcscContext() as other:
        result, handle, _ = scard.SCardConnect(
            other.handle,
            SERVER_READER,
            scard.SCARD_SHARE_EXCLUSIVE,
            scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
        )
        assert result == 0
        try:
            infos = {info.name: info for info in list_readers()}
            with pytest.raises(ReaderBusy, match="for 300 ms"):
                PcscCard(SERVER_READER, card_timeout=2, busy_wait=0.3)
        finally:
            scard.SCardDisconnect(handle, scard.SCARD_LEAVE_CARD)
    note = infos[SERVER_READER].note
    assert "held by another process (sharing violation)" in note
    assert " 0 s" not in note


def test_serve_failure_is_printed_once(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    create_card_file(path, {1: bytes(8)})
    import socket

    with socket.socket() as probe_port:
        probe_port.bind(("127.0.0.1", 0))
        port = probe_port.getsockname()[1]
    command = [sys.executable, "-m", "iscl_hw.cli_serve", str(path)]
    command += ["--vpcd", f"127.0.0.1:{port}", "--no-reconnect"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=20)
    assert done.returncode == 2
    assert done.stderr.count("cannot connect to vpcd") == 1, done.stderr


def test_probe_prints_what_it_found_before_the_card_left(
    pcsc_env: PcscEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    pcsc_env.put(CLIENT_SLOT, profiled_card({1: bytes(8)}))
    remove_on(pcsc_env, CLIENT_SLOT, INS_INTERNAL_AUTHENTICATE)
    try:
        args = _parse(["probe", "--reader", CLIENT_READER])
        assert args.func(args) == 2
        out = capsys.readouterr()
        assert "SELECT F06973636C0001: ok" in out.out
        assert "GET CHALLENGE: 8 bytes" in out.out
        assert "key 1" not in out.out
        assert CLIENT_READER in out.err and "error:" in out.err
    finally:
        pcsc_env.insert(CLIENT_SLOT)


# -- probe's PIN handling, over an in-process soft card (no pcscd) -----------------


def _selected_link(card: SoftCard) -> ApduLink:
    link = ApduLink(card, name="soft")
    assert link.exchange(gen_select_aid_apdu(ISCL_AID), "SELECT").sw == 0x9000
    return link


def test_probe_never_spends_the_last_pin_try() -> None:
    """A wrong PIN probed again and again: the card keeps its last try, and
    each probe reports the PIN as not verified (an error exit)."""
    card = SoftCard(new_card_state({1: os.urandom(8)}, pin=b"1234", max_retries=3))
    lines: list[str] = []
    for _ in range(4):
        line, verified = cli_pcsc._pin_state(_selected_link(card), lambda: b"0000")
        lines.append(line)
        assert not verified
    assert lines[0].startswith("PIN: wrong") and lines[1].startswith("PIN: wrong")
    assert lines[2].startswith("PIN: not sent: the card has one try left")
    assert lines[3] == lines[2]
    assert card.state.pin is not None and card.state.pin.remaining == 1

    # The right PIN still works with that last try left untouched.
    line, verified = cli_pcsc._pin_state(_selected_link(card), lambda: b"1234")
    assert line.startswith("PIN: not sent") and not verified


def test_probe_pin_states() -> None:
    no_pin = SoftCard(new_card_state({1: os.urandom(8)}))
    assert cli_pcsc._pin_state(_selected_link(no_pin), None) == ("PIN: none", True)
    assert cli_pcsc._pin_state(_selected_link(no_pin), lambda: b"1234") == (
        "PIN: none on this card, so the PIN given was not sent",
        False,
    )
    with_pin = SoftCard(new_card_state({1: os.urandom(8)}, pin=b"1234"))
    link = _selected_link(with_pin)
    assert cli_pcsc._pin_state(link, None) == (
        "PIN: set, 3 tries left, not verified",
        True,
    )
    assert cli_pcsc._pin_state(link, lambda: b"1234") == ("PIN: verified", True)
    assert cli_pcsc._pin_state(link, lambda: b"1234") == (
        "PIN: verified already",
        True,
    )


# ------------------------------------------------------------ the card's PIN


def _pin_card(auth: dict[int, bytes], pin: bytes) -> tuple[SoftCard, ProfiledCard]:
    soft = SoftCard(new_card_state(auth, pin=pin, max_retries=5))
    return soft, ProfiledCard(soft, "plain")


def _tries_left(soft: SoftCard) -> int:
    assert soft.state.pin is not None
    return soft.state.pin.remaining


def _select_from_another_program() -> None:
    """What `iscl card probe` does to a card a server holds: SELECT on a
    connection of its own, which ends the card's PIN verification."""
    with PcscContext() as context:
        link = open_reader(context, ReaderSelector(name=SERVER_READER))
        try:
            answer = link.transmit(gen_select_aid_apdu(ISCL_AID).encode())
            assert answer[-2:] == b"\x90\x00"
        finally:
            link.close()


def test_a_card_that_lost_its_pin_verification_is_verified_again(
    pcsc_env: PcscEnv,
) -> None:
    auth = {1: os.urandom(8)}
    soft, card = _pin_card(auth, b"1234")
    pcsc_env.put(SERVER_SLOT, card)
    pcsc = PcscCard(SERVER_READER, pin=lambda: b"1234", card_timeout=5)
    try:
        challenge = os.urandom(8)
        expected = des_ecb_encrypt(auth[1], challenge)
        assert pcsc.internal_authenticate(1, challenge) == expected

        # Outside a span the operation is run again once the card is back.
        _select_from_another_program()
        assert pcsc.internal_authenticate(1, challenge) == expected

        # Inside a span the PC/SC transaction keeps other programs out; a
        # card that forgets anyway (here: told so behind pcscd's back) took
        # the span's challenge with it: this span fails, the next works.
        pcsc.begin_span()
        pcsc.get_challenge()
        soft.transmit(gen_select_aid_apdu(ISCL_AID).encode())
        with pytest.raises(StatusWordError, match="6982"):
            pcsc.internal_authenticate(1, challenge)
        pcsc.end_span()
        pcsc.begin_span()
        pcsc.get_challenge()
        assert pcsc.internal_authenticate(1, challenge) == expected
        pcsc.end_span()
        assert _tries_left(soft) == 5
    finally:
        pcsc.close()
        pcsc_env.put(SERVER_SLOT, profiled_card({1: bytes(8)}))


class _ForgetsBeforeChallenge:
    """A card that answers 6982 to the next GET CHALLENGE once armed (as one
    needing its PIN for GET CHALLENGE does after another program's SELECT)."""

    def __init__(self, card: ProfiledCard) -> None:
        self.card = card
        self.armed = False
        self.ATR = card.ATR

    def reset(self) -> bytes:
        return self.card.reset()

    def transmit(self, command: bytes) -> bytes:
        if self.armed and command[1] == INS_GET_CHALLENGE:
            self.armed = False
            return b"\x69\x82"
        return self.card.transmit(command)


def _blocked_while(action: Callable[[], object], seconds: float) -> bool:
    """Whether another program's GET CHALLENGE on the server reader waits
    (for a PC/SC transaction) at least ``seconds`` before ``action`` runs."""
    answered = threading.Event()

    def other_program() -> None:
        with PcscContext() as context:
            link = open_reader(context, ReaderSelector(name=SERVER_READER))
            try:
                link.transmit(bytes.fromhex("0084000008"))
            finally:
                link.close()
        answered.set()

    thread = threading.Thread(target=other_program)
    thread.start()
    blocked = not answered.wait(seconds)
    action()
    thread.join(10)
    assert answered.is_set()
    return blocked


def test_a_span_reopened_after_6982_keeps_its_transaction(pcsc_env: PcscEnv) -> None:
    _, plain = _pin_card({1: os.urandom(8)}, b"1234")
    card = _ForgetsBeforeChallenge(plain)
    pcsc_env.put(SERVER_SLOT, card)
    pcsc = PcscCard(SERVER_READER, pin=lambda: b"1234", card_timeout=5)
    try:
        pcsc.begin_span()
        card.armed = True
        assert len(pcsc.get_challenge()) == 8  # selected, verified, run again
        assert not card.armed
        assert _blocked_while(pcsc.end_span, 0.5)
    finally:
        pcsc.close()
        pcsc_env.put(SERVER_SLOT, profiled_card({1: bytes(8)}))


def test_a_pin_the_card_refused_is_never_sent_again(pcsc_env: PcscEnv) -> None:
    """A card swapped for one with another PIN (or a PIN file changed): the
    reopen spends one try, and no later use sends the PIN again."""
    auth = {1: os.urandom(8)}
    _, first = _pin_card(auth, b"1234")
    pcsc_env.put(SERVER_SLOT, first)
    pcsc = PcscCard(SERVER_READER, pin=lambda: b"1234", card_timeout=5)
    try:
        pcsc.internal_authenticate(1, bytes(8))
        other_soft, other = _pin_card(auth, b"5678")
        pcsc_env.remove(SERVER_SLOT)
        pcsc_env.wait_card(SERVER_SLOT, present=False)
        pcsc_env.put(SERVER_SLOT, other)

        with pytest.raises(PinRefused, match="4 tries left"):
            pcsc.internal_authenticate(1, bytes(8))
        assert _tries_left(other_soft) == 4
        for attempt in (
            lambda: pcsc.internal_authenticate(1, bytes(8)),
            pcsc.begin_span,
            pcsc.get_challenge,
        ):
            with pytest.raises(PinRefused, match="does not send it again"):
                attempt()
        assert _tries_left(other_soft) == 4
        assert "5678" not in repr(pcsc) and "1234" not in repr(pcsc)
    finally:
        pcsc.close()
        pcsc_env.put(SERVER_SLOT, profiled_card({1: bytes(8)}))


@pytest.mark.parametrize("aid", ["00", "", "00" * 17])
def test_probe_refuses_an_aid_of_the_wrong_length(
    aid: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _parse(["probe", "--reader-index", "0", "--aid", aid])
    assert args.func(args) == 2
    assert "bad AID: an AID is 5..16 bytes" in capsys.readouterr().err


def test_a_pin_prompt_without_a_terminal_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_terminal(prompt: str = "") -> str:
        raise EOFError

    monkeypatch.setattr("getpass.getpass", no_terminal)
    with pytest.raises(IsclError, match="the prompt found no terminal"):
        cli_pcsc.pin_from_prompt()()


@pytest.mark.parametrize(
    "option",
    [["--wait", "-1"], ["--wait", "nan"], ["--wait", "inf"], ["--timeout", "0"]],
)
def test_probe_seconds_are_checked_as_the_site_file_checks_them(
    option: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        _parse(["probe", "--reader-index", "0", *option])
    assert f"argument {option[0]}: a number of seconds" in capsys.readouterr().err


def test_probe_takes_a_zero_wait() -> None:
    assert _parse(["probe", "--wait", "0"]).wait == 0.0
