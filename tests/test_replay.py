"""Replay of recorded secured messages, across sessions and within one.

By default (ChainStart.CHALLENGES) each direction's DES-CBC chain starts at
the challenge its receiver issued in this handshake, so a message recorded
in one session fails its MAC in another.  With ChainStart.ZERO (LEADTOOLS'
behaviour) the same keys give the same ciphertext, and the replay passes.
"""

from __future__ import annotations

import pytest
from helpers import (
    CLIENT,
    SERVER,
    CardPair,
    ConnectionPair,
    make_cards,
    make_keys,
    parse_frame,
)

from iscl_hw.constants import UNIQUE_SESSION_KEYS, ErrorCode, MessageId
from iscl_hw.core import Phase
from iscl_hw.errors import IntegrityError
from iscl_hw.keyfile import KeyStore
from iscl_hw.settings import ChainStart, IvPolicy, Settings

#: The frames of a secured message after its transmission request.
PARTS = (
    MessageId.RNDNO_FOR_SESSION_KEY_RQ,
    MessageId.MESSAGE_TRANSMISSION_NOTIF,
    MessageId.MAC_TRANSMISSION_NOTIF,
)
OTHER = {CLIENT: SERVER, SERVER: CLIENT}


class MessageTap:
    """A ConnectionPair hook that records ``sender``'s secured messages (the
    frames after each MESSAGE_TRANSMISSION_RQ) and can deliver recorded
    frames in place of a later message's own."""

    def __init__(self, sender: str) -> None:
        self.sender = sender
        #: Per message, as sent: the RNDNO (if any), data and MAC frames.
        self.messages: list[list[bytes]] = []
        #: Message number (from 0) -> the frames to deliver instead.
        self.replace: dict[int, list[bytes]] = {}

    def __call__(self, name: str, raw: bytes, index: int) -> bytes:
        if name != self.sender:
            return raw
        message_id = parse_frame(raw).message_id
        if message_id is MessageId.MESSAGE_TRANSMISSION_RQ:
            self.messages.append([])
            return raw
        if message_id not in PARTS:
            return raw
        number = len(self.messages) - 1
        part = len(self.messages[number])
        self.messages[number].append(raw)
        substitutes = self.replace.get(number)
        return raw if substitutes is None else substitutes[part]


def session(
    cards: CardPair, keys: KeyStore, settings: Settings, tap: MessageTap
) -> ConnectionPair:
    return ConnectionPair(
        cards=cards,
        keys=keys,
        client_settings=settings,
        server_settings=settings,
        hook=tap,
    ).handshake()


def replay_into_new_session(
    settings: Settings, sender: str
) -> tuple[ConnectionPair, list[bytes]]:
    """Session A sends a message; session B, with the same cards and keys,
    gets A's recorded frames in place of its own first message's."""
    cards, keys = make_cards(), make_keys()
    recorded = b"session A: pay 100 to account 1"
    own = b"session B: pay 999 to account 2"
    assert len(recorded) == len(own)

    tap_a = MessageTap(sender)
    a = session(cards, keys, settings, tap_a)
    a.send(sender, recorded)
    a.run()
    assert a[OTHER[sender]].received == [recorded]
    assert a[OTHER[sender]].error is None
    (frames,) = tap_a.messages
    expected_parts = 3 if settings.encryption_key_index == UNIQUE_SESSION_KEYS else 2
    assert len(frames) == expected_parts

    tap_b = MessageTap(sender)
    tap_b.replace[0] = frames
    b = session(cards, keys, settings, tap_b)
    b.send(sender, own)
    b.run()
    assert len(tap_b.messages) == 1
    assert tap_b.messages[0] != frames  # B's own frames differed
    return b, [recorded, own]


@pytest.mark.parametrize("key_index", [1, UNIQUE_SESSION_KEYS])
@pytest.mark.parametrize("iv_policy", list(IvPolicy))
@pytest.mark.parametrize("sender", [CLIENT, SERVER])
def test_replay_from_another_session_is_rejected(
    sender: str, iv_policy: IvPolicy, key_index: int
) -> None:
    settings = Settings(encryption_key_index=key_index, iv_policy=iv_policy)
    assert settings.chain_start is ChainStart.CHALLENGES  # the default
    b, _ = replay_into_new_session(settings, sender)
    receiver = b[OTHER[sender]]
    assert isinstance(receiver.error, IntegrityError)
    assert receiver.error.code in (ErrorCode.BAD_MAC, ErrorCode.DECRYPT)
    assert receiver.received == []
    assert receiver.output_after_error == b""
    assert receiver.conn.phase is Phase.ERROR


@pytest.mark.parametrize("key_index", [1, UNIQUE_SESSION_KEYS])
@pytest.mark.parametrize("iv_policy", list(IvPolicy))
@pytest.mark.parametrize("sender", [CLIENT, SERVER])
def test_replay_from_another_session_passes_with_zero_chain_start(
    sender: str, iv_policy: IvPolicy, key_index: int
) -> None:
    """Why CHALLENGES is the default: with a chain starting at zero, A's
    message is delivered in B in place of what B's sender sent."""
    settings = Settings(
        encryption_key_index=key_index,
        iv_policy=iv_policy,
        chain_start=ChainStart.ZERO,
    )
    b, (recorded, _) = replay_into_new_session(settings, sender)
    receiver = b[OTHER[sender]]
    assert receiver.error is None
    assert receiver.received == [recorded]


def replay_within_session(iv_policy: IvPolicy) -> tuple[ConnectionPair, list[bytes]]:
    """The client sends three messages of one length; the third's frames are
    replaced by the first's."""
    settings = Settings(iv_policy=iv_policy)
    tap = MessageTap(CLIENT)
    pair = session(make_cards(), make_keys(), settings, tap)
    messages = [b"message number 1", b"message number 2", b"message number 3"]
    for message in messages[:2]:
        pair.send(CLIENT, message)
        pair.run()
    assert pair.server.received == messages[:2]
    tap.replace[2] = tap.messages[0]
    pair.send(CLIENT, messages[2])
    pair.run()
    assert len(tap.messages) == 3
    return pair, messages


def test_replay_within_a_session_passes_with_per_message_chains() -> None:
    """A documented weakness of IvPolicy.PER_MESSAGE: every message of a
    session starts at the same IV, so any of them can be delivered again."""
    pair, messages = replay_within_session(IvPolicy.PER_MESSAGE)
    assert pair.server.error is None
    assert pair.server.received == [messages[0], messages[1], messages[0]]


def test_replay_within_a_session_is_rejected_with_chained_messages() -> None:
    pair, messages = replay_within_session(IvPolicy.CHAINED)
    assert isinstance(pair.server.error, IntegrityError)
    assert pair.server.received == messages[:2]
    assert pair.server.conn.phase is Phase.ERROR


@pytest.mark.parametrize("sender", [CLIENT, SERVER])
def test_both_sides_must_agree_on_the_chain_start(sender: str) -> None:
    """ChainStart is not negotiated: a peer starting at zero is read as
    tampering by one expecting the challenges (and the other way round)."""
    pair = ConnectionPair(
        client_settings=Settings(chain_start=ChainStart.ZERO),
        server_settings=Settings(chain_start=ChainStart.CHALLENGES),
    ).handshake()
    pair.send(sender, b"hello")
    pair.run()
    receiver = pair[OTHER[sender]]
    assert isinstance(receiver.error, IntegrityError)
    assert receiver.received == []
