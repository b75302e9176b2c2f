from __future__ import annotations

import asyncio
import threading
import time

import pytest
from helpers import CLIENT, ConnectionPair, make_cards, parse_frame

from iscl_hw.arbiter import CardArbiter
from iscl_hw.constants import NAK, ErrorCode, MessageId
from iscl_hw.errors import CardBusy, CardError, RemoteProtocolError
from iscl_hw.events import CardOperation, CardRequest

GET_CHALLENGE = CardRequest(CardOperation.GET_CHALLENGE, 1)


def internal(challenge: bytes) -> CardRequest:
    return CardRequest(CardOperation.INTERNAL_AUTHENTICATE, 1, challenge)


def external(answer: bytes) -> CardRequest:
    return CardRequest(CardOperation.EXTERNAL_AUTHENTICATE, 1, answer)


def waiting(arbiter: CardArbiter, count: int) -> None:
    """Block until ``count`` acquirers are queued (bounded, not a sleep-sync:
    it polls the state the test needs)."""
    deadline = time.monotonic() + 10
    while f"waiting={count}>" not in repr(arbiter):
        assert time.monotonic() < deadline, repr(arbiter)
        time.sleep(0.001)


@pytest.fixture
def cards():  # type: ignore[no-untyped-def]
    return make_cards()


def test_for_card_is_one_arbiter_per_card(cards) -> None:  # type: ignore[no-untyped-def]
    arbiter = CardArbiter.for_card(cards.server)
    assert CardArbiter.for_card(cards.server) is arbiter
    assert CardArbiter.for_card(arbiter) is arbiter
    assert CardArbiter.for_card(cards.client) is not arbiter


def test_span_is_exclusive_and_release_needs_the_owner(cards) -> None:  # type: ignore[no-untyped-def]
    arbiter = CardArbiter(cards.server, span_wait=0.0)
    a, b = object(), object()
    arbiter.acquire(a)
    assert arbiter.holds(a) and not arbiter.holds(b)
    with pytest.raises(CardBusy):
        arbiter.acquire(b)
    arbiter.release(b)  # not the owner: no effect
    assert arbiter.holds(a)
    arbiter.release(a)
    arbiter.acquire(b)
    assert arbiter.holds(b)
    assert "waiting=0>" in repr(arbiter)


def test_sync_waiter_gets_the_span_when_released(cards) -> None:  # type: ignore[no-untyped-def]
    arbiter = CardArbiter(cards.server, span_wait=30.0)
    a, b = object(), object()
    arbiter.acquire(a)
    got = threading.Event()

    def wait_for_span() -> None:
        arbiter.acquire(b)
        got.set()

    thread = threading.Thread(target=wait_for_span)
    thread.start()
    try:
        waiting(arbiter, 1)
        assert not got.is_set()
        assert arbiter.holds(a)
        arbiter.release(a)
        assert got.wait(30)
        assert arbiter.holds(b)
    finally:
        arbiter.release(a)
        thread.join()
    arbiter.release(b)
    assert "waiting=0>" in repr(arbiter)


@pytest.mark.parametrize("release_from_thread", [False, True])
def test_async_waiter_gets_the_span_when_released(
    cards,  # type: ignore[no-untyped-def]
    release_from_thread: bool,
) -> None:
    arbiter = CardArbiter(cards.server, span_wait=30.0)
    a, b = object(), object()

    async def scenario() -> None:
        arbiter.acquire(a)
        task = asyncio.create_task(arbiter.acquire_async(b))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not task.done()
        assert "waiting=1>" in repr(arbiter)
        if release_from_thread:
            await asyncio.to_thread(arbiter.release, a)
        else:
            arbiter.release(a)
        await task
        assert arbiter.holds(b)
        arbiter.release(b)

    asyncio.run(scenario())
    assert "waiting=0>" in repr(arbiter)


def test_sync_waiter_woken_by_async_holder(cards) -> None:  # type: ignore[no-untyped-def]
    arbiter = CardArbiter(cards.server, span_wait=30.0)
    a, b = object(), object()

    async def scenario() -> None:
        await arbiter.acquire_async(a)
        thread_task = asyncio.create_task(asyncio.to_thread(arbiter.acquire, b))
        await asyncio.to_thread(waiting, arbiter, 1)
        assert arbiter.holds(a)
        arbiter.release(a)
        await thread_task
        assert arbiter.holds(b)
        arbiter.release(b)

    asyncio.run(scenario())


def test_card_busy_after_span_wait(cards) -> None:  # type: ignore[no-untyped-def]
    arbiter = CardArbiter(cards.server, span_wait=0.05)
    holder = object()
    arbiter.acquire(holder)
    with pytest.raises(CardBusy, match="stayed busy"):
        arbiter.acquire(object())

    async def scenario() -> None:
        with pytest.raises(CardBusy, match="stayed busy"):
            await arbiter.acquire_async(object())

    asyncio.run(scenario())
    assert arbiter.holds(holder)
    assert "waiting=0>" in repr(arbiter)


def test_max_waiting_bound(cards) -> None:  # type: ignore[no-untyped-def]
    arbiter = CardArbiter(cards.server, span_wait=30.0, max_waiting=2)
    holder, first, second = object(), object(), object()

    async def scenario() -> None:
        arbiter.acquire(holder)
        tasks = [
            asyncio.create_task(arbiter.acquire_async(first)),
            asyncio.create_task(arbiter.acquire_async(second)),
        ]
        for _ in range(10):
            await asyncio.sleep(0)
        assert "waiting=2>" in repr(arbiter)
        # A third waiter is refused at once, not after span_wait.
        with pytest.raises(CardBusy, match="already wait"):
            arbiter.acquire(object())
        with pytest.raises(CardBusy, match="already wait"):
            await arbiter.acquire_async(object())
        arbiter.release(holder)
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        (winner,) = done
        owner = first if winner is tasks[0] else second
        assert arbiter.holds(owner)
        arbiter.release(owner)
        await asyncio.gather(*tasks)
        arbiter.release(second if owner is first else first)

    asyncio.run(scenario())
    assert "waiting=0>" in repr(arbiter)


def test_max_waiting_zero_still_takes_a_free_span(cards) -> None:  # type: ignore[no-untyped-def]
    arbiter = CardArbiter(cards.server, span_wait=30.0, max_waiting=0)
    owner = object()
    arbiter.acquire(owner)
    assert arbiter.holds(owner)


# -- card operations through the arbiter -----------------------------------------------


def test_span_operations_need_the_span(cards) -> None:  # type: ignore[no-untyped-def]
    arbiter = CardArbiter(cards.server, span_wait=0.0)
    owner = object()
    before = list(cards.server_apdus.commands)
    with pytest.raises(CardError):
        arbiter.run(owner, GET_CHALLENGE)
    with pytest.raises(CardError):
        arbiter.run(owner, external(bytes(8)))
    assert cards.server_apdus.commands == before  # the card was not asked
    assert len(arbiter.run(owner, internal(bytes(8)))) == 8  # needs no span


def test_reflected_challenge_is_refused(cards) -> None:  # type: ignore[no-untyped-def]
    arbiter = CardArbiter(cards.server, span_wait=0.0)
    owner, intruder = object(), object()
    arbiter.acquire(owner)
    challenge = arbiter.run(owner, GET_CHALLENGE)
    asked = len(cards.server_apdus.commands)
    with pytest.raises(CardError):
        arbiter.run(intruder, internal(challenge))
    assert len(cards.server_apdus.commands) == asked  # refused before the card
    # Any other challenge is answered for the intruder ...
    other = bytes(b ^ 1 for b in challenge)
    assert len(arbiter.run(intruder, internal(other))) == 8
    # ... and the owner may use its own challenge (its host-side check).
    answer = arbiter.run(owner, internal(challenge))
    arbiter.run(owner, external(answer))
    arbiter.release(owner)
    # Once the span is over, the old challenge is just a value.
    assert arbiter.run(intruder, internal(challenge)) == answer


def test_reflection_through_the_protocol() -> None:
    """A rogue server sends one client connection the challenge the client's
    card has outstanding for another connection: the card must not answer."""
    cards = make_cards()
    arbiter = CardArbiter(cards.client, span_wait=0.0)
    held: list[bytes] = []

    def hold_pass2(sender: str, raw: bytes, index: int) -> bytes:
        if parse_frame(raw).message_id is MessageId.MUTUAL_AUTH_PASS2_NOTIF:
            held.append(raw)
            return b""  # the rogue server keeps pass 2 to itself
        return raw

    first = ConnectionPair(cards=cards, client_arbiter=arbiter, hook=hold_pass2)
    first.run()
    assert arbiter.holds(first.client.endpoint)
    client_challenge = parse_frame(held[0]).payload[8:]

    def reflect(sender: str, raw: bytes, index: int) -> bytes:
        frame = parse_frame(raw)
        if frame.message_id is MessageId.MUTUAL_AUTH_PASS1_NOTIF:
            return raw[:32] + client_challenge
        return raw

    second = ConnectionPair(
        cards=make_cards(cards.client_keys), client_arbiter=arbiter, hook=reflect
    )
    internal_before = cards.client_apdus.commands.count("INTERNAL AUTHENTICATE")
    second.run()
    assert isinstance(second.client.error, CardError)
    nak = second.frames(CLIENT)[-1]
    assert nak.message_id is MessageId.MUTUAL_AUTH_PASS2_NOTIF
    assert (nak.option, nak.err_no) == (NAK, ErrorCode.LOCAL_ICCARD)
    assert isinstance(second.server.error, RemoteProtocolError)
    assert cards.client_apdus.commands.count("INTERNAL AUTHENTICATE") == internal_before
    assert arbiter.holds(first.client.endpoint)  # the first span is untouched


def test_busy_card_fails_the_handshake_and_tells_the_peer() -> None:
    cards = make_cards()
    arbiter = CardArbiter(cards.server, span_wait=0.0)
    arbiter.acquire(object())  # another connection holds the server card
    pair = ConnectionPair(cards=cards, server_arbiter=arbiter)
    pair.run()
    assert isinstance(pair.server.error, CardBusy)
    nak = pair.frames()[-1]
    assert nak.message_id is MessageId.MUTUAL_AUTH_PASS1_NOTIF
    assert (nak.option, nak.err_no) == (NAK, ErrorCode.LOCAL_ICCARD)
    assert isinstance(pair.client.error, RemoteProtocolError)
    assert pair.client.error.code is ErrorCode.REMOTE_ICCARD


def test_a_span_begun_after_its_owner_left_is_ended() -> None:
    """A begin_span that returns after its connection gave up (a card
    timeout) must not leave the next owner inside a stale span."""
    from iscl_hw.card import Card

    calls: list[str] = []
    gives_up = True

    class SlowBegin(Card):
        name = "slow"

        def begin_span(self) -> None:
            calls.append("begin")
            if gives_up:
                arbiter.release(first)  # the owner's timeout, meanwhile

        def end_span(self) -> None:
            calls.append("end")

        def get_challenge(self) -> bytes:
            return bytes(8)

        def internal_authenticate(self, key_ref: int, challenge: bytes) -> bytes:
            raise NotImplementedError

        def external_authenticate(self, key_ref: int, response: bytes) -> None:
            raise NotImplementedError

        def close(self) -> None:
            return

    card = SlowBegin()
    arbiter = CardArbiter(card)
    first, second = object(), object()
    arbiter.acquire(first)
    with pytest.raises(CardError, match="given up"):
        arbiter.run(first, CardRequest(CardOperation.GET_CHALLENGE))
    assert calls == ["begin", "end"]

    gives_up = False
    arbiter.acquire(second)
    arbiter.run(second, CardRequest(CardOperation.GET_CHALLENGE))
    assert calls == ["begin", "end", "begin"]


class SpanRecordingCard:
    """A card recording each command and its span's begin and end; its
    EXTERNAL AUTHENTICATE fails when ``refuse`` is set."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.refuse = False

    def for_connection(self) -> SpanRecordingCard:
        return self

    def begin_span(self) -> None:
        self.calls.append("begin")

    def end_span(self) -> None:
        self.calls.append("end")

    def get_challenge(self) -> bytes:
        self.calls.append("GET CHALLENGE")
        return bytes(range(8))

    def internal_authenticate(self, key_ref: int, challenge: bytes) -> bytes:
        self.calls.append("INTERNAL AUTHENTICATE")
        return bytes(8)

    def external_authenticate(self, key_ref: int, response: bytes) -> None:
        self.calls.append("EXTERNAL AUTHENTICATE")
        if self.refuse:
            raise CardError("wrong answer (test)")


@pytest.mark.parametrize("refuse", [False, True])
@pytest.mark.parametrize("handed_over", [False, True])
def test_external_authenticate_ends_the_card_span_once(
    refuse: bool, handed_over: bool
) -> None:
    """EXTERNAL AUTHENTICATE is a span's last command: the card's end of
    the span follows it (at once, or handed to ``end_span_with``), passed
    or failed, while the span stays the owner's until release, which does
    not end the card's span a second time."""
    card = SpanRecordingCard()
    card.refuse = refuse
    arbiter = CardArbiter(card, span_wait=0.0)  # type: ignore[arg-type]
    owner, other = object(), object()
    handed: list[object] = []
    arbiter.acquire(owner)
    arbiter.run(owner, GET_CHALLENGE)
    arbiter.run(owner, internal(bytes(8)))

    try:
        arbiter.run(
            owner,
            external(bytes(8)),
            end_span_with=handed.append if handed_over else None,
        )
    except CardError:
        assert refuse
    else:
        assert not refuse

    ended_at_once = ["begin", "GET CHALLENGE", "INTERNAL AUTHENTICATE"]
    ended_at_once += ["EXTERNAL AUTHENTICATE"]
    if handed_over:
        assert card.calls == ended_at_once
        assert len(handed) == 1
        handed[0]()  # type: ignore[operator]
    assert card.calls == [*ended_at_once, "end"]
    assert arbiter.holds(owner)
    with pytest.raises(CardBusy):
        arbiter.acquire(other)
    arbiter.release(owner)
    assert card.calls == [*ended_at_once, "end"]
    arbiter.acquire(other)
