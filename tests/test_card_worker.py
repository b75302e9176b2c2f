"""The asyncio driver with a card whose calls block (``blocking_io``, as a
PC/SC reader's): its operations run on the card's worker thread, a quick
answer is taken on the spot, a slow one is awaited without holding up the
loop, and the end of a span runs on the worker too."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable

import pytest
from helpers import craft, make_cards, make_keys, serving

from iscl_hw import aio, sync
from iscl_hw.aio import _CardJob
from iscl_hw.arbiter import CardArbiter
from iscl_hw.card import Card
from iscl_hw.constants import HEADER_LENGTH, VERSION_V1_00, MessageId
from iscl_hw.endpoint import Timeouts
from iscl_hw.errors import (
    CardCommunicationError,
    ConnectionLost,
    IsclError,
    PeerTimeout,
    RemoteProtocolError,
)
from iscl_hw.keyfile import KeyStore
from iscl_hw.ratelimit import FailureLimiter
from iscl_hw.settings import Settings
from iscl_hw.wire import ByteOrder, pack_u32

CALLS = ("get_challenge", "internal_authenticate", "external_authenticate")


class BlockingCard(Card):
    """A soft card behind a pretend slow reader: each call sleeps ``delay``
    and records the thread it ran on."""

    blocking_io = True

    def __init__(self, card: Card, delay: float = 0.0) -> None:
        self.name = card.name
        self._card = card
        self.delay = delay
        self.threads: list[tuple[str, int]] = []

    def _enter(self, call: str) -> None:
        self.threads.append((call, threading.get_ident()))
        if self.delay:
            time.sleep(self.delay)

    def get_challenge(self) -> bytes:
        self._enter("get_challenge")
        return self._card.get_challenge()

    def internal_authenticate(self, key_ref: int, challenge: bytes) -> bytes:
        self._enter("internal_authenticate")
        return self._card.internal_authenticate(key_ref, challenge)

    def external_authenticate(self, key_ref: int, response: bytes) -> None:
        self._enter("external_authenticate")
        self._card.external_authenticate(key_ref, response)

    def begin_span(self) -> None:
        self.threads.append(("begin_span", threading.get_ident()))

    def end_span(self) -> None:
        self.threads.append(("end_span", threading.get_ident()))

    def close(self) -> None:
        self._card.close()


async def _silent(channel: aio.AsyncChannel) -> None:
    try:
        await channel.recv()
    except IsclError:
        pass


async def _handshake(client: Card, server: Card, **options: object) -> int:
    """One handshake; returns the loop's thread ident."""
    keys = make_keys()
    async with serving(_silent, server, keys, **options) as port:
        await _connect(port, client, keys, **options)
    return threading.get_ident()


async def _connect(port: int, card: Card, keys: KeyStore, **options: object) -> None:
    channel = await aio.open_connection(
        "127.0.0.1",
        port,
        card=card,
        keys=keys,
        **options,  # type: ignore[arg-type]
    )
    await channel.close()


def test_every_card_call_and_span_end_runs_off_the_loop() -> None:
    cards = make_cards()
    client, server = BlockingCard(cards.client), BlockingCard(cards.server)

    loop_thread = asyncio.run(_handshake(client, server))

    for card in (client, server):
        # The end of the span is posted to the worker, not waited for.
        deadline = time.monotonic() + 5
        while "end_span" not in [c for c, _ in card.threads]:
            assert time.monotonic() < deadline, card.threads
            time.sleep(0.001)
        calls = [call for call, _ in card.threads]
        assert {"begin_span", "end_span", *CALLS} <= set(calls), calls
        assert calls.count("begin_span") == calls.count("end_span") == 1
        assert all(ident != loop_thread for _, ident in card.threads), card.threads


def test_span_ends_with_the_external_authenticate_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A handshake's span ends in the job of its EXTERNAL AUTHENTICATE, on
    the worker right after it, not as a job of its own."""
    posted: list[object] = []
    post = aio._CardWorker.post

    def counting_post(worker: aio._CardWorker, action: Callable[[], None]) -> None:
        posted.append(action)
        post(worker, action)

    monkeypatch.setattr(aio._CardWorker, "post", counting_post)
    cards = make_cards()
    client, server = BlockingCard(cards.client), BlockingCard(cards.server)

    asyncio.run(_handshake(client, server))

    assert posted == []
    for card in (client, server):
        deadline = time.monotonic() + 5
        while "end_span" not in [c for c, _ in card.threads]:
            assert time.monotonic() < deadline, card.threads
            time.sleep(0.001)
        calls = card.threads
        assert [c for c, _ in calls][-2:] == ["external_authenticate", "end_span"]
        assert calls[-1][1] == calls[-2][1]  # the same worker thread


def test_lone_handshake_takes_quick_answers_in_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop's only handshake (the server is a blocking one on another
    thread) waits for its quick card's answers in place: only the answer
    asked ahead goes through a future.  Two handshakes on one loop await
    every answer."""
    awaited: list[int] = []
    make_future = _CardJob.future

    def counting_future(job: _CardJob) -> asyncio.Future[bytes]:
        awaited.append(threading.get_ident())
        return make_future(job)

    monkeypatch.setattr(_CardJob, "future", counting_future)
    # Which path is chosen is under test, not how fast a thread wakes.
    monkeypatch.setattr(aio, "_WAIT_IN_PLACE", 5.0)
    cards, keys = make_cards(), make_keys()
    client = BlockingCard(cards.client)

    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            sock, _ = listener.accept()
            with sync.accept(sock, card=cards.server, keys=keys) as channel:
                with contextlib.suppress(IsclError):
                    channel.recv()

        server = threading.Thread(target=serve)
        server.start()
        port = listener.getsockname()[1]
        asyncio.run(_connect(port, client, keys))
        server.join(10)

    assert len(awaited) == 1  # the expected answer, asked ahead

    awaited.clear()
    asyncio.run(_handshake(BlockingCard(cards.client), BlockingCard(cards.server)))
    # 8 operations on two cards, all awaited.
    assert len(awaited) == 8


def test_slow_card_is_awaited_while_the_loop_runs_on() -> None:
    """Card calls of 30 ms (past the in-place wait): the handshake still
    completes, and a ticker task on the same loop is never held up for
    longer than the in-place wait plus scheduling."""
    cards = make_cards()
    client = BlockingCard(cards.client, delay=0.03)
    server = BlockingCard(cards.server, delay=0.03)
    lags: list[float] = []

    async def scenario() -> None:
        stop = asyncio.Event()

        async def ticker() -> None:
            while not stop.is_set():
                started = time.monotonic()
                await asyncio.sleep(0.001)
                lags.append(time.monotonic() - started - 0.001)

        keys = make_keys()
        ticking = asyncio.create_task(ticker())
        try:
            server_task = await aio.start_server(
                _silent, "127.0.0.1", 0, card=server, keys=keys
            )
            async with server_task:
                port = server_task.sockets[0].getsockname()[1]
                await _connect(port, client, keys)
        finally:
            stop.set()
            await ticking

    asyncio.run(scenario())
    # 8 card calls of 30 ms: the ticker ran all along.  Had the loop waited
    # for each call, 8 ticks would have lagged 30 ms or more; a busy machine
    # may delay one or two ticks on its own.
    assert len(lags) > 50
    assert len([lag for lag in lags if lag >= 0.025]) <= 2, sorted(lags)[-5:]


def test_card_past_its_time_fails_the_connection_with_a_card_error() -> None:
    cards = make_cards()
    client = BlockingCard(cards.client)
    server = BlockingCard(cards.server, delay=0.5)
    timeouts = Timeouts(card=0.1)

    started = time.monotonic()
    with pytest.raises(IsclError) as caught:
        asyncio.run(_handshake(client, server, timeouts=timeouts))

    # The client hears that the server's card failed; the server's own
    # connection ended with a CardCommunicationError (logged by the core).
    assert "ICCARD" in str(caught.value)
    assert time.monotonic() - started < 2


class FailingExternalCard(BlockingCard):
    """A blocking card whose EXTERNAL AUTHENTICATE fails (a card pulled out
    after it answered the client's challenge)."""

    def external_authenticate(self, key_ref: int, response: bytes) -> None:
        self._enter("external_authenticate")
        raise CardCommunicationError("card went away (test)")


def test_server_card_failing_after_pass3_closes_the_line_and_send_says_why() -> None:
    """The server's card check runs after pass 3 has left, so the client
    counts itself authenticated; the server closes instead of handing the
    connection over, the client's next calls raise the ConnectionLost that
    ended it, and the server card is free for the next connection."""
    cards, keys = make_cards(), make_keys()
    server = FailingExternalCard(cards.server)
    handled: list[aio.AsyncChannel] = []

    async def handler(channel: aio.AsyncChannel) -> None:
        handled.append(channel)

    async def run() -> tuple[BaseException, BaseException]:
        async with serving(handler, server, keys) as port:
            channel = await aio.open_connection(
                "127.0.0.1", port, card=BlockingCard(cards.client), keys=keys
            )
            with pytest.raises(ConnectionLost) as on_recv:
                await channel.recv()
            with pytest.raises(ConnectionLost) as on_send:
                await channel.send(b"never delivered")
            await channel.abort()
            return on_recv.value, on_send.value

    on_recv, on_send = asyncio.run(run())

    assert handled == []
    assert on_send is on_recv  # what ended the connection, not a misuse error
    assert "external_authenticate" in [call for call, _ in server.threads]
    arbiter = CardArbiter.for_card(server)
    arbiter.span_wait = 0  # CardBusy if the span were still held
    probe = object()
    arbiter.acquire(probe)
    arbiter.release(probe)


class BuggyCard(BlockingCard):
    """A card implementation with a bug: its INTERNAL AUTHENTICATE raises a
    RuntimeError, not a CardError."""

    blocking_io = False

    def internal_authenticate(self, key_ref: int, challenge: bytes) -> bytes:
        raise RuntimeError("bug in a card implementation (test)")


class BuggyBlockingCard(BuggyCard):
    blocking_io = True


@pytest.mark.parametrize("card_class", [BuggyCard, BuggyBlockingCard])
def test_a_card_raising_a_non_iscl_error_fails_cleanly(
    card_class: type[BuggyCard], caplog: pytest.LogCaptureFixture
) -> None:
    """Inline and on a worker thread: the handshake fails as for any card
    failure (the client hears LOCAL_ICCARD), the bug is logged with its
    traceback once, and it is not held against the peer."""
    cards, keys = make_cards(), make_keys()
    server = card_class(cards.server)

    async def run() -> list[BaseException]:
        errors: list[BaseException] = []
        limiter = FailureLimiter(max_failures=2)
        async with serving(_silent, server, keys, limiter=limiter) as port:
            for _ in range(4):
                try:
                    await aio.open_connection(
                        "127.0.0.1", port, card=cards.client, keys=keys
                    )
                except IsclError as exc:
                    errors.append(exc)
        return errors

    errors = asyncio.run(run())

    assert len(errors) == 4  # none refused by the limiter: all reached the card
    for error in errors:
        assert isinstance(error, RemoteProtocolError)
        assert "LOCAL_ICCARD" in str(error)
    bugs = [r for r in caplog.records if "raised RuntimeError" in r.getMessage()]
    assert len(bugs) == 4
    assert all(r.exc_info is not None for r in bugs)
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]


def test_job_answer_in_place_and_through_a_future() -> None:
    quick = _CardJob(lambda: b"answer")
    threading.Thread(target=quick.run).start()
    assert quick.wait_in_place(5)
    assert quick.result() == b"answer"

    async def late() -> bytes:
        gate = threading.Event()

        def work() -> bytes:
            gate.wait(5)
            return b"later"

        job = _CardJob(work)
        threading.Thread(target=job.run).start()
        assert not job.wait_in_place(0.01)
        future = job.future()
        gate.set()
        return await asyncio.wait_for(future, 5)

    assert asyncio.run(late()) == b"later"


def test_job_error_reaches_the_waiter_both_ways() -> None:
    def fail() -> bytes:
        raise CardCommunicationError("reader gone")

    in_place = _CardJob(fail)
    in_place.run()
    assert in_place.wait_in_place(0)
    with pytest.raises(CardCommunicationError, match="reader gone"):
        in_place.result()

    async def awaited() -> None:
        job = _CardJob(fail)
        future = job.future()  # asked for before the job ran
        await asyncio.to_thread(job.run)
        with pytest.raises(CardCommunicationError, match="reader gone"):
            await future

    asyncio.run(awaited())


def test_abandoned_job_never_reaches_the_card() -> None:
    ran: list[bool] = []

    def work() -> bytes:
        ran.append(True)
        return b""

    job = _CardJob(work)
    job.abandoned = True
    job.run()
    assert ran == []
    with pytest.raises(RuntimeError, match="not finished"):
        job.result()


def _two_sites(auth_data: tuple[bytes, bytes], connections: int) -> list[object]:
    """Sites A and B, each with one blocking card that its server and its
    clients share, each opening ``connections`` at once to the other.
    Returns every client's outcome (None for success, else the error)."""
    cards, keys = make_cards(), make_keys()
    site_cards = (BlockingCard(cards.client, 0.001), BlockingCard(cards.server, 0.001))
    ports: dict[int, int] = {}
    both_listening = threading.Barrier(2)
    both_done = threading.Barrier(2)
    outcomes: list[object] = []

    async def site(me: int) -> None:
        settings = Settings(auth_data=auth_data[me])
        card = site_cards[me]
        server = await aio.start_server(
            _silent, "127.0.0.1", 0, card=card, keys=keys, settings=settings
        )
        ports[me] = server.sockets[0].getsockname()[1]
        await asyncio.to_thread(both_listening.wait, 10)

        async def connect() -> object:
            try:
                channel = await aio.open_connection(
                    "127.0.0.1", ports[1 - me], card=card, keys=keys, settings=settings
                )
            except IsclError as exc:
                return exc
            await channel.close()
            return None

        results = await asyncio.gather(*(connect() for _ in range(connections)))
        outcomes.extend(results)
        await asyncio.to_thread(both_done.wait, 60)
        server.close()
        await server.wait_closed()

    threads = [threading.Thread(target=asyncio.run, args=(site(me),)) for me in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    return outcomes


def test_two_sites_each_serving_and_connecting_with_one_card() -> None:
    """Traffic both ways between two sites whose server and clients share
    one card each: the cards of every connection are taken in the order of
    the sites' authentication data, so no two connections each hold one
    card while waiting for the other's, and every handshake succeeds."""
    outcomes = _two_sites((b"site-a", b"site-b"), connections=6)
    assert len(outcomes) == 12
    assert [o for o in outcomes if o is not None] == []


def test_a_stalling_server_holds_an_early_client_card_no_longer_than_peer_answer() -> (
    None
):
    """A client whose auth data sorts first takes its card before the
    server's; a server that then never sends pass 1 holds that card no
    longer than ``peer_answer``, as any span is held, not the whole
    handshake limit."""
    cards, keys = make_cards(), make_keys()
    card = BlockingCard(cards.client)
    settings = Settings(auth_data=b"aaa")
    timeouts = Timeouts(handshake=10.0, peer_answer=0.3)

    async def scenario() -> float:
        async def stalling_server(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            writer.write(
                craft(
                    MessageId.LINE_CONNECTION_CHECK_RQ,
                    pack_u32(ByteOrder.BIG, VERSION_V1_00, 8160),
                )
            )
            await reader.readexactly(HEADER_LENGTH + 8)
            auth = b"zzz"
            writer.write(
                craft(MessageId.MUTUAL_AUTH_RQ, pack_u32(ByteOrder.BIG, 0, 1, 3) + auth)
            )
            await reader.read(4096)  # the response; then nothing, ever
            await asyncio.sleep(30)

        server = await asyncio.start_server(stalling_server, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            started = time.monotonic()
            with pytest.raises(PeerTimeout, match="peer answer limit"):
                await aio.open_connection(
                    "127.0.0.1",
                    port,
                    card=card,
                    keys=keys,
                    settings=settings,
                    timeouts=timeouts,
                )
            return time.monotonic() - started

    took = asyncio.run(scenario())
    assert took < 3, took
    assert [call for call, _ in card.threads][:2] == ["begin_span", "get_challenge"]
    # The span is over: another connection can take the card at once.
    arbiter = CardArbiter.for_card(card)
    probe = object()
    arbiter.acquire(probe)
    arbiter.release(probe)
