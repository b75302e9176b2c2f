"""The event loop iscl's commands run on (``iscl_hw.eventloop``): uvloop when
installed (the test extra installs it), asyncio's own on request, clear
errors for a bad choice; and the asyncio driver working on both loops."""

from __future__ import annotations

import asyncio
import io
import sys

import pytest
import uvloop
from helpers import make_cards, make_keys, random_keys, serving
from test_card_worker import BlockingCard

from iscl_hw import aio, cli, demo, eventloop
from iscl_hw.errors import ConfigError, PeerRejectedAuthentication
from iscl_hw.events import MessageReceived

LOOPS = ["uvloop", "asyncio"]


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def test_auto_takes_uvloop_when_it_is_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(eventloop.ENV, raising=False)
    assert eventloop.loop_name() == "uvloop"
    assert isinstance(eventloop.run(_running_loop()), uvloop.Loop)


def test_asyncio_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.ENV, "asyncio")
    assert eventloop.loop_name() == "asyncio"
    loop = eventloop.run(_running_loop())
    assert not isinstance(loop, uvloop.Loop)
    assert isinstance(loop, asyncio.BaseEventLoop)


def test_without_uvloop_auto_falls_back_and_uvloop_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import raises ImportError
    monkeypatch.setenv(eventloop.ENV, "auto")
    assert eventloop.loop_name() == "asyncio"

    monkeypatch.setenv(eventloop.ENV, "uvloop")
    main = _running_loop()
    with pytest.raises(ConfigError, match=r"uvloop is not installed.*iscl\[fast\]"):
        eventloop.run(main)
    assert main.cr_frame is None  # closed: no "never awaited" warning


def test_an_unknown_choice_is_a_config_error_and_the_cli_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(eventloop.ENV, "Trio")
    with pytest.raises(ConfigError, match="ISCL_EVENT_LOOP='Trio' is not one of"):
        eventloop.loop_name()

    assert cli.main(["demo"]) == 2
    shown = capsys.readouterr()
    assert "ISCL_EVENT_LOOP='Trio'" in shown.err
    assert shown.out == ""  # refused before the demo's banner


@pytest.mark.parametrize("given", ["", " UVLOOP ", "Auto"])
def test_choice_is_trimmed_and_case_blind(
    monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    monkeypatch.setenv(eventloop.ENV, given)
    assert eventloop.loop_name() == "uvloop"


async def _talk(client_card: object, server_card: object, count: int) -> list[bytes]:
    keys = make_keys()

    async def echo(channel: aio.AsyncChannel) -> None:
        for _ in range(count):
            message = await channel.recv_message()
            assert isinstance(message, MessageReceived)
            await channel.send(message.data[::-1])
        await channel.recv_message()

    async with serving(echo, server_card, keys) as port:
        channel = await aio.open_connection(
            "127.0.0.1",
            port,
            card=client_card,  # type: ignore[arg-type]
            keys=keys,
        )
        answers = []
        for i in range(count):
            await channel.send(b"message %d " % i * 1000)
            answers.append(await channel.recv())
        await channel.close()
        return answers


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("blocking", [False, True], ids=["inline", "worker"])
def test_handshake_and_messages_on_each_loop(
    monkeypatch: pytest.MonkeyPatch, loop: str, blocking: bool
) -> None:
    """Inline soft cards, and cards whose calls run on a worker thread
    (answers handed back with call_soon_threadsafe), on both loops."""
    monkeypatch.setenv(eventloop.ENV, loop)
    cards = make_cards()
    client, server = cards.client, cards.server
    if blocking:
        client, server = BlockingCard(client), BlockingCard(server, delay=0.003)

    answers = eventloop.run(_talk(client, server, 5))

    assert answers == [(b"message %d " % i * 1000)[::-1] for i in range(5)]


@pytest.mark.parametrize("loop", LOOPS)
def test_wrong_key_is_refused_on_each_loop(
    monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    monkeypatch.setenv(eventloop.ENV, loop)
    cards = make_cards(client_keys=random_keys())
    with pytest.raises(PeerRejectedAuthentication):
        eventloop.run(_talk(cards.client, cards.server, 1))


@pytest.mark.parametrize("loop", LOOPS)
def test_demo_on_each_loop(monkeypatch: pytest.MonkeyPatch, loop: str) -> None:
    monkeypatch.setenv(eventloop.ENV, loop)
    out = io.StringIO()
    assert demo.run_demo(out=out) == 0
    assert "the file arrived intact" in out.getvalue()
