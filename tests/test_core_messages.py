from __future__ import annotations

import dataclasses
import itertools
import os
import random

import pytest
from helpers import (
    CLIENT,
    SERVER,
    SIDES,
    ConnectionPair,
    craft,
    flip_bit,
    make_keys,
    parse_frame,
)

from iscl_hw import crypto
from iscl_hw.constants import (
    ACK,
    DEFAULT_MAX_MESSAGE_LENGTH,
    HEADER_LENGTH,
    MIN_BLOCK_LENGTH,
    NAK,
    UNIQUE_SESSION_KEYS,
    EncryptionMethod,
    ErrorCode,
    MacMethod,
    MessageId,
)
from iscl_hw.core import Phase
from iscl_hw.crypto import Padding
from iscl_hw.errors import IntegrityError, LocalProtocolError, RemoteProtocolError
from iscl_hw.events import (
    NEED_DATA,
    MessageReceived,
    MessageSent,
    SendRefused,
    ThroughModeReceived,
)
from iscl_hw.keyfile import KeyStore
from iscl_hw.secure import derive_session_key, mac_field_length
from iscl_hw.settings import ChainStart, IvPolicy, MacKeyPolicy, Settings
from iscl_hw.wire import ByteOrder, pack_u32

DES = EncryptionMethod.DES_CBC
PLAIN = EncryptionMethod.NONE
MD5 = MacMethod.MD5
DESMAC = MacMethod.DESMAC
NOMAC = MacMethod.NONE

# Every method combination some receiver policy accepts, with that policy.
COMBOS = {
    "des-md5": (DES, MD5, {}),
    "des-desmac": (DES, DESMAC, {}),
    "des-nomac": (DES, NOMAC, {"allow_no_mac": True}),
    "plain-desmac": (PLAIN, DESMAC, {"require_encryption": False}),
    "plain-md5": (
        PLAIN,
        MD5,
        {"require_encryption": False, "allow_unencrypted_md5": True},
    ),
    "plain-nomac": (PLAIN, NOMAC, {"require_encryption": False, "allow_no_mac": True}),
}
WITH_MAC = [name for name, (_, mac, _) in COMBOS.items() if mac is not NOMAC]

BLOCK = MIN_BLOCK_LENGTH  # a small communication block: many notifications
LENGTHS = [0, 1, 7, 8, 9, BLOCK - 1, BLOCK, BLOCK + 1, 1000, 3 * BLOCK + 5]
KEY_INDEXES = [*range(1, 9), UNIQUE_SESSION_KEYS]


def settings_for(combo: str, **changes: object) -> Settings:
    encryption, mac, policy = COMBOS[combo]
    values: dict[str, object] = {
        "encryption": encryption,
        "mac": mac,
        "max_block_length": BLOCK,
        **policy,
        **changes,
    }
    return Settings(**values)  # type: ignore[arg-type]


def secured_pair(combo: str, **changes: object) -> ConnectionPair:
    settings = settings_for(combo, **changes)
    return ConnectionPair(
        client_settings=settings, server_settings=settings
    ).handshake()


def payload(length: int, seed: int = 0) -> bytes:
    return random.Random(length * 1000 + seed).randbytes(length)


# -- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("iv_policy", list(IvPolicy))
@pytest.mark.parametrize("padding", [Padding.PKCS5, Padding.ISO9797_M2])
@pytest.mark.parametrize("key_index", KEY_INDEXES)
@pytest.mark.parametrize("combo", list(COMBOS))
def test_round_trip(
    combo: str, key_index: int, padding: Padding, iv_policy: IvPolicy
) -> None:
    pair = secured_pair(
        combo, encryption_key_index=key_index, padding=padding, iv_policy=iv_policy
    )
    messages = {
        side: [payload(n, seed) for n in LENGTHS] for seed, side in enumerate(SIDES)
    }
    for i in range(len(LENGTHS)):
        for side in SIDES:
            assert pair.send(side, messages[side][i]) == i + 1
    pair.run()

    encryption, mac, _ = COMBOS[combo]
    for side in SIDES:
        peer = SERVER if side == CLIENT else CLIENT
        assert pair[side].error is None
        assert pair[side].received == messages[peer]
        received = pair[side].of_type(MessageReceived)
        assert {(m.encryption, m.mac, m.key_index) for m in received} == {
            (encryption, mac, key_index)
        }
        assert pair[side].of_type(MessageSent) == [
            MessageSent(i + 1, n) for i, n in enumerate(LENGTHS)
        ]
        assert pair[side].conn.phase is Phase.MESSAGES
        assert pair[side].conn.peer_encryption == encryption
        assert pair[side].conn.peer_mac == mac

    data_frames = [
        f for f in pair.frames() if f.message_id is MessageId.MESSAGE_TRANSMISSION_NOTIF
    ]
    assert max(len(f.payload) for f in data_frames) == BLOCK
    mac_frames = [
        f for f in pair.frames() if f.message_id is MessageId.MAC_TRANSMISSION_NOTIF
    ]
    expected_mac = mac_field_length(encryption, mac, padding)
    assert len(mac_frames) == (2 * len(LENGTHS) if expected_mac else 0)
    assert {len(f.payload) for f in mac_frames} <= {expected_mac}
    randoms = [
        f.payload
        for f in pair.frames()
        if f.message_id is MessageId.RNDNO_FOR_SESSION_KEY_RQ
    ]
    if key_index == UNIQUE_SESSION_KEYS:
        assert len(randoms) == len(set(randoms)) == 2 * len(LENGTHS)
    else:
        assert randoms == []


@pytest.mark.parametrize("length", [8159, 8160, 8161, 3 * 8160 + 1])
def test_round_trip_around_the_default_block(length: int) -> None:
    pair = ConnectionPair().handshake()
    data = payload(length)
    pair.send(CLIENT, data)
    pair.run()
    assert pair.server.received == [data]
    sizes = [
        len(f.payload)
        for f in pair.frames(CLIENT)
        if f.message_id is MessageId.MESSAGE_TRANSMISSION_NOTIF
    ]
    padded = crypto.padded_length(length, Padding.PKCS5)
    assert sum(sizes) == padded
    assert all(size == 8160 for size in sizes[:-1])


def challenges(pair: ConnectionPair) -> dict[str, bytes]:
    """The challenges of the handshake as seen on the wire, by who issued
    them: PASS1 carries the server's, PASS2 the client's after its answer."""
    (pass1,) = [
        f.payload
        for f in pair.frames(SERVER)
        if f.message_id is MessageId.MUTUAL_AUTH_PASS1_NOTIF
    ]
    (pass2,) = [
        f.payload
        for f in pair.frames(CLIENT)
        if f.message_id is MessageId.MUTUAL_AUTH_PASS2_NOTIF
    ]
    return {SERVER: pass1, CLIENT: pass2[8:]}


def chain_start_iv(pair: ConnectionPair, sender: str, start: ChainStart) -> bytes:
    """Where ``sender``'s chain starts: zero, or the challenge its receiver
    issued in this handshake."""
    if start is ChainStart.ZERO:
        return bytes(8)
    receiver = SERVER if sender == CLIENT else CLIENT
    return challenges(pair)[receiver]


@pytest.mark.parametrize("chain_start", list(ChainStart))
@pytest.mark.parametrize("sender", SIDES)
@pytest.mark.parametrize("iv_policy", list(IvPolicy))
@pytest.mark.parametrize("mac", [MD5, DESMAC])
def test_wire_format_of_secured_messages(
    iv_policy: IvPolicy, mac: MacMethod, sender: str, chain_start: ChainStart
) -> None:
    """Recompute each message's body and MAC field from the documented rules
    (docs/protocol.md): MAC over the plaintext, encrypted after the body with
    the CBC chain continued; DESMAC keyed with the key variant; each
    direction's chain starting at the receiver's challenge (or at zero)."""
    keys = make_keys()
    settings = Settings(
        mac=mac, encryption_key_index=2, iv_policy=iv_policy, chain_start=chain_start
    )
    pair = ConnectionPair(
        keys=keys, client_settings=settings, server_settings=settings
    ).handshake()
    receiver = SERVER if sender == CLIENT else CLIENT
    messages = [b"first message", b"", b"x" * 20]
    for message in messages:
        pair.send(sender, message)
    pair.run()
    assert pair[receiver].received == messages

    start = chain_start_iv(pair, sender, chain_start)
    issued = challenges(pair)
    assert len(issued[CLIENT]) == len(issued[SERVER]) == 8
    assert issued[CLIENT] != issued[SERVER]
    if chain_start is ChainStart.CHALLENGES:
        assert start == issued[receiver] != bytes(8)

    key = keys.get(2)
    frames = pair.frames(sender)[4:]  # after the handshake
    iv = start
    for message in messages:
        rq, body, mac_field = frames[:3]
        frames = frames[3:]
        assert rq.message_id is MessageId.MESSAGE_TRANSMISSION_RQ
        assert rq.payload == pack_u32(ByteOrder.BIG, DES, 2, mac, len(message))
        assert body.message_id is MessageId.MESSAGE_TRANSMISSION_NOTIF
        assert mac_field.message_id is MessageId.MAC_TRANSMISSION_NOTIF
        if iv_policy is IvPolicy.PER_MESSAGE:
            iv = start
        padded = crypto.pad(message, Padding.PKCS5)
        assert body.payload == crypto.des_cbc_encrypt(key, iv, padded)
        if mac is MD5:
            digest = crypto.md5(message)
        else:
            mac_key = crypto.key_variant(key, crypto.MAC_KEY_VARIANT_MASK)
            digest = crypto.cbc_mac(mac_key, message)
        expected = crypto.des_cbc_encrypt(
            key, body.payload[-8:], crypto.pad(digest, Padding.PKCS5)
        )
        assert mac_field.payload == expected
        iv = mac_field.payload[-8:]
    assert frames == []


@pytest.mark.parametrize("chain_start", list(ChainStart))
def test_unique_session_keys_are_derived_per_message(chain_start: ChainStart) -> None:
    keys = make_keys()
    settings = Settings(
        encryption_key_index=UNIQUE_SESSION_KEYS,
        session_key_base_index=4,
        iv_policy=IvPolicy.PER_MESSAGE,
        chain_start=chain_start,
    )
    pair = ConnectionPair(
        keys=keys, client_settings=settings, server_settings=settings
    ).handshake()
    message = b"0123456789abcdef"
    pair.send(CLIENT, message)
    pair.send(CLIENT, message)
    pair.run()
    assert pair.server.received == [message, message]
    start = chain_start_iv(pair, CLIENT, chain_start)
    frames = pair.frames(CLIENT)[4:]
    bodies = []
    for i in range(2):
        rq, rnd, body, _ = frames[4 * i : 4 * i + 4]
        assert rq.payload[4:8] == pack_u32(ByteOrder.BIG, UNIQUE_SESSION_KEYS)
        assert rnd.message_id is MessageId.RNDNO_FOR_SESSION_KEY_RQ
        session_key = derive_session_key(keys.get(4), rnd.payload)
        assert session_key != keys.get(4)
        plain = crypto.des_cbc_decrypt(session_key, start, body.payload)
        assert crypto.unpad(plain, Padding.PKCS5) == message
        bodies.append(body.payload)
    assert bodies[0] != bodies[1]
    rps = [
        f
        for f in pair.frames(SERVER)
        if f.message_id is MessageId.RNDNO_FOR_SESSION_KEY_RP
    ]
    assert [f.option for f in rps] == [ACK, ACK]


# -- tampering -------------------------------------------------------------------------

TAMPER_LENGTH = 400  # three data notifications with the 144-byte block


def tamper_targets(combo: str) -> list[tuple[str, int, int]]:
    encryption, mac, _ = COMBOS[combo]
    body = (
        crypto.padded_length(TAMPER_LENGTH, Padding.PKCS5)
        if encryption is DES
        else TAMPER_LENGTH
    )
    targets = []
    for notification, start in enumerate(range(0, body, BLOCK)):
        size = min(BLOCK, body - start)
        targets += [("data", notification, off) for off in range(0, size, 8)]
    mac_length = mac_field_length(encryption, mac, Padding.PKCS5)
    targets += [("mac", 0, off) for off in range(0, mac_length, 8)]
    return targets


def tamper_hook(sender: str, target: tuple[str, int, int]):  # type: ignore[no-untyped-def]
    kind, notification, offset = target
    seen = {"data": 0, "mac": 0}
    wanted = {
        "data": MessageId.MESSAGE_TRANSMISSION_NOTIF,
        "mac": MessageId.MAC_TRANSMISSION_NOTIF,
    }

    def hook(name: str, raw: bytes, index: int) -> bytes:
        if name != sender or parse_frame(raw).message_id is not wanted[kind]:
            return raw
        seen[kind] += 1
        if seen[kind] - 1 != notification:
            return raw
        position = offset + (notification + offset // 8) % 8
        return flip_bit(raw, position, (offset // 8) % 8)

    return hook


@pytest.mark.parametrize("later", [False, True], ids=["first", "later"])
@pytest.mark.parametrize("sender", SIDES)
@pytest.mark.parametrize("combo", WITH_MAC)
def test_tampering_anywhere_is_detected(combo: str, sender: str, later: bool) -> None:
    targets = tamper_targets(combo)
    assert len(targets) > 50
    for target in targets:
        pair = secured_pair(combo)
        receiver = pair.server if sender == CLIENT else pair.client
        if later:
            pair.send(sender, b"an earlier message")
            pair.run()
            assert receiver.received == [b"an earlier message"]
        delivered = len(receiver.received)
        pair.hook = tamper_hook(sender, target)
        pair.send(sender, payload(TAMPER_LENGTH))
        pair.run()

        assert isinstance(receiver.error, IntegrityError), target
        assert receiver.error.code in (ErrorCode.BAD_MAC, ErrorCode.DECRYPT)
        assert len(receiver.received) == delivered, target
        assert receiver.output_after_error == b"", target
        assert receiver.conn.phase is Phase.ERROR


@pytest.mark.parametrize("combo", WITH_MAC)
def test_integrity_failure_drops_pending_output(combo: str) -> None:
    # The receiver has bytes of its own waiting to be written when the peer's
    # message fails its check: none of them leaves.
    pair = secured_pair(combo)
    client, server = pair.client.conn, pair.server.conn
    client.send_message(payload(TAMPER_LENGTH))
    server.receive_data(client.data_to_send())
    assert server.next_event() is NEED_DATA
    client.receive_data(server.data_to_send())
    assert isinstance(client.next_event(), MessageSent)
    secured = client.data_to_send()
    server.send_message(b"the receiver's own message")
    server.receive_data(flip_bit(secured, 3))
    with pytest.raises(IntegrityError):
        server.next_event()
    assert server.data_to_send() == b""
    assert server.phase is Phase.ERROR


def test_mac_field_of_wrong_size() -> None:
    pair = secured_pair("des-md5")

    def hook(name: str, raw: bytes, index: int) -> bytes:
        frame = parse_frame(raw)
        if name == CLIENT and frame.message_id is MessageId.MAC_TRANSMISSION_NOTIF:
            return craft(frame.message_id, frame.payload[:16])
        return raw

    pair.hook = hook
    pair.send(CLIENT, b"hello")
    pair.run()
    assert isinstance(pair.server.error, IntegrityError)
    assert pair.server.error.code is ErrorCode.BAD_LENGTH
    assert pair.server.received == []
    assert pair.server.output_after_error == b""


def test_different_key_values_fail_integrity() -> None:
    settings = Settings()
    pair = ConnectionPair(
        client_keys=make_keys(),
        server_keys=make_keys(),
        client_settings=settings,
        server_settings=settings,
    ).handshake()
    pair.send(CLIENT, b"hello")
    pair.run()
    assert isinstance(pair.server.error, IntegrityError)
    assert pair.server.received == []


# With the chain starting at zero, which messages' CBC chain starts where
# the CBC-MAC starts: (iv_policy, a message went before) -> forgeable.
FORGEABLE_FROM_ZERO = {
    (IvPolicy.PER_MESSAGE, False): True,
    (IvPolicy.PER_MESSAGE, True): True,
    (IvPolicy.CHAINED, False): True,  # the chain starts at zero
    (IvPolicy.CHAINED, True): False,
}


@pytest.mark.parametrize("block", range(7))
@pytest.mark.parametrize(("iv_policy", "later"), sorted(FORGEABLE_FROM_ZERO, key=str))
@pytest.mark.parametrize("chain_start", list(ChainStart))
@pytest.mark.parametrize("mac_key_policy", list(MacKeyPolicy))
def test_desmac_with_the_encryption_key_is_forgeable(
    mac_key_policy: MacKeyPolicy,
    chain_start: ChainStart,
    iv_policy: IvPolicy,
    later: bool,
    block: int,
) -> None:
    """With MacKeyPolicy.SAME and a chain starting at zero, the CBC-MAC equals
    the last ciphertext block of the data, so any earlier block can be changed
    and the message still passes: why VARIANT is the default.  A chain that
    starts at the receiver's challenge (the default) also defeats it."""
    pair = secured_pair(
        "des-desmac",
        iv_policy=iv_policy,
        mac_key_policy=mac_key_policy,
        chain_start=chain_start,
    )
    if later:
        pair.send(CLIENT, b"an earlier message")
        pair.run()
        assert pair.server.received == [b"an earlier message"]
    message = bytes(range(64))  # eight whole DES blocks
    pair.hook = tamper_hook(CLIENT, ("data", 0, 8 * block))
    pair.send(CLIENT, message)
    pair.run()

    forged = (
        mac_key_policy is MacKeyPolicy.SAME
        and chain_start is ChainStart.ZERO
        and FORGEABLE_FROM_ZERO[iv_policy, later]
    )
    if forged:
        assert pair.server.error is None
        delivered = pair.server.received[-1]
        assert len(delivered) == len(message)
        assert delivered != message  # altered, and accepted
    else:
        assert isinstance(pair.server.error, IntegrityError)
        assert pair.server.error.code is ErrorCode.BAD_MAC
        assert pair.server.received == ([b"an earlier message"] if later else [])


# -- receiver policy -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encryption", "mac", "receiver_policy"),
    [
        (DES, NOMAC, {}),
        (PLAIN, DESMAC, {}),
        (PLAIN, MD5, {}),
        (PLAIN, NOMAC, {}),
        (PLAIN, MD5, {"allow_unencrypted_md5": True}),  # still unencrypted
        (PLAIN, MD5, {"require_encryption": False}),  # MD5 needs its own flag
        (PLAIN, NOMAC, {"require_encryption": False}),
        (PLAIN, NOMAC, {"allow_no_mac": True}),
    ],
)
def test_policy_refusal_keeps_the_line_open(
    encryption: EncryptionMethod, mac: MacMethod, receiver_policy: dict[str, bool]
) -> None:
    sender_settings = Settings(encryption=encryption, mac=mac)
    pair = ConnectionPair(
        client_settings=sender_settings,
        server_settings=Settings(**receiver_policy),  # type: ignore[arg-type]
    ).handshake()
    send_id = pair.send(CLIENT, b"refused")
    pair.run()

    assert pair.client.of_type(SendRefused) == [
        SendRefused(send_id, ErrorCode.MSG_TRANSMISSION, None)
    ]
    assert pair.server.received == []
    assert pair.server.conn.peer_encryption == encryption
    assert pair.server.conn.peer_mac == mac
    assert pair.server.conn.peer_requested_length == len(b"refused")
    rp = pair.frames(SERVER)[-1]
    assert rp.message_id is MessageId.MESSAGE_TRANSMISSION_RP
    assert (rp.option, rp.err_no) == (NAK, ErrorCode.MSG_TRANSMISSION)
    assert not [
        f
        for f in pair.frames(CLIENT)
        if f.message_id is MessageId.MESSAGE_TRANSMISSION_NOTIF
    ]
    for side in pair.sides:
        assert side.error is None
        assert side.conn.phase is Phase.MESSAGES

    # Both directions still work, the refused one with acceptable methods.
    pair.send(SERVER, b"reply")
    pair.client.conn.settings = Settings()
    pair.send(CLIENT, b"accepted")
    pair.run()
    assert pair.client.received == [b"reply"]
    assert pair.server.received == [b"accepted"]


@pytest.mark.parametrize(
    ("encryption", "mac"), [(0x1234, MD5), (DES, 0x9999), (0xFFFFFFFF, 0)]
)
def test_unknown_methods_refused(encryption: int, mac: int) -> None:
    pair = ConnectionPair().handshake()
    pair.server.conn.receive_data(
        craft(
            MessageId.MESSAGE_TRANSMISSION_RQ,
            pack_u32(ByteOrder.BIG, encryption, 1, mac, 5),
        )
    )
    assert pair.server.conn.next_event() is NEED_DATA
    rp = parse_frame(pair.server.conn.data_to_send())
    assert (rp.option, rp.err_no) == (NAK, ErrorCode.MSG_TRANSMISSION)
    assert pair.server.conn.phase is Phase.MESSAGES


@pytest.mark.parametrize("key_index", [0, 9, 0x11, 0xFFFFFFFF])
def test_key_index_out_of_range_refused(key_index: int) -> None:
    pair = ConnectionPair().handshake()
    pair.server.conn.receive_data(
        craft(
            MessageId.MESSAGE_TRANSMISSION_RQ,
            pack_u32(ByteOrder.BIG, DES, key_index, MD5, 5),
        )
    )
    assert pair.server.conn.next_event() is NEED_DATA
    rp = parse_frame(pair.server.conn.data_to_send())
    assert (rp.option, rp.err_no) == (NAK, ErrorCode.MSG_TRANSMISSION)


def test_through_mode_refused_by_default() -> None:
    pair = ConnectionPair().handshake()
    send_id = pair.client.conn.send_through(b"unsecured")
    pair.run()
    assert pair.client.of_type(MessageSent) == [MessageSent(send_id, 9)]
    assert isinstance(pair.server.error, LocalProtocolError)
    assert pair.server.error.code is ErrorCode.MSG_TRANSMISSION
    assert pair.server.of_type(ThroughModeReceived) == []


def test_through_mode_accepted_when_allowed() -> None:
    pair = ConnectionPair(
        server_settings=Settings(allow_through_mode=True),
        client_settings=Settings(max_block_length=BLOCK),
    ).handshake()
    big = payload(10 * BLOCK)
    pair.client.conn.send_through(b"unsecured")
    pair.client.conn.send_through(big)
    pair.send(CLIENT, b"secured")
    pair.run()
    assert pair.server.events[2:] == [
        ThroughModeReceived(b"unsecured"),
        ThroughModeReceived(big),
        MessageReceived(b"secured", DES, MD5, 1),
    ]
    # Through mode is one frame, whatever the communication block.
    through = [
        f
        for f in pair.frames(CLIENT)
        if f.message_id is MessageId.THROUGH_MODE_TRANSMISSION_NOTIF
    ]
    assert [f.payload for f in through] == [b"unsecured", big]
    with pytest.raises(LocalProtocolError):
        pair.client.conn.send_through(b"")


THROUGH = MessageId.THROUGH_MODE_TRANSMISSION_NOTIF


@pytest.mark.parametrize("claimed", [1, DEFAULT_MAX_MESSAGE_LENGTH, 0xFFFFFFFF])
def test_refused_through_mode_fails_from_its_header(claimed: int) -> None:
    """Through mode refused: the header alone ends the connection, so a peer
    cannot make us buffer a message we would refuse anyway."""
    pair = ConnectionPair().handshake()
    server = pair.server.conn
    server.receive_data(craft(THROUGH, length=claimed))  # no payload follows
    with pytest.raises(LocalProtocolError) as info:
        server.next_event()
    assert info.value.code is ErrorCode.MSG_TRANSMISSION
    assert server.phase is Phase.ERROR
    assert server._decoder.buffered == HEADER_LENGTH  # only the header


@pytest.mark.parametrize("max_message_length", [1000, DEFAULT_MAX_MESSAGE_LENGTH])
def test_allowed_through_mode_is_limited_by_the_maximum_message_length(
    max_message_length: int,
) -> None:
    settings = Settings(allow_through_mode=True, max_message_length=max_message_length)
    pair = ConnectionPair(server_settings=settings).handshake()
    server = pair.server.conn
    data = payload(max_message_length)
    frame = craft(THROUGH, data)
    server.receive_data(frame[:HEADER_LENGTH])
    assert server.next_event() is NEED_DATA  # the header is accepted
    server.receive_data(frame[HEADER_LENGTH:])
    assert server.next_event() == ThroughModeReceived(data)
    assert server.next_event() is NEED_DATA

    server.receive_data(craft(THROUGH, length=max_message_length + 1))
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.code is ErrorCode.BAD_LENGTH
    assert server._decoder.buffered == HEADER_LENGTH


# -- lengths ---------------------------------------------------------------------------


def test_length_refusal_keeps_the_line_usable() -> None:
    pair = ConnectionPair(server_settings=Settings(max_message_length=1000))
    pair.handshake()
    send_id = pair.send(CLIENT, bytes(1001))
    pair.run()
    assert pair.client.of_type(SendRefused) == [
        SendRefused(send_id, ErrorCode.PEER_SMALL_LENGTH, 1000)
    ]
    assert pair.client.conn.peer_max_message_length == 1000
    assert pair.server.conn.peer_requested_length == 1001
    rp = pair.frames(SERVER)[-1]
    assert (rp.option, rp.err_no) == (NAK, ErrorCode.LOCAL_SMALL_LENGTH)
    assert rp.payload == pack_u32(ByteOrder.BIG, 1000)
    assert pair.server.error is None and pair.client.error is None

    pair.send(CLIENT, bytes(1000))  # exactly the maximum
    pair.run()
    assert pair.server.received == [bytes(1000)]
    # Now the sender knows the peer's maximum and refuses locally.
    with pytest.raises(LocalProtocolError) as info:
        pair.send(CLIENT, bytes(1001))
    assert info.value.code is ErrorCode.LOCAL_SMALL_LENGTH
    assert pair.client.conn.phase is Phase.MESSAGES


def test_own_maximum_is_enforced_locally() -> None:
    pair = ConnectionPair(client_settings=Settings(max_message_length=500))
    pair.handshake()
    with pytest.raises(LocalProtocolError) as info:
        pair.send(CLIENT, bytes(501))
    assert info.value.code is ErrorCode.LOCAL_SMALL_LENGTH
    with pytest.raises(LocalProtocolError):
        pair.client.conn.send_through(bytes(501))
    pair.send(CLIENT, bytes(500))
    pair.run()
    assert pair.server.received == [bytes(500)]


def test_default_maximum_message_length() -> None:
    pair = ConnectionPair(
        client_settings=Settings(max_message_length=2 * DEFAULT_MAX_MESSAGE_LENGTH)
    ).handshake()
    largest = os.urandom(DEFAULT_MAX_MESSAGE_LENGTH)
    pair.send(CLIENT, largest)
    over = pair.send(CLIENT, bytes(DEFAULT_MAX_MESSAGE_LENGTH + 1))
    pair.run()
    assert pair.server.received == [largest]
    assert pair.client.of_type(SendRefused) == [
        SendRefused(over, ErrorCode.PEER_SMALL_LENGTH, DEFAULT_MAX_MESSAGE_LENGTH)
    ]


# -- keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender_changes", "missing"),
    [
        ({"encryption_key_index": 3}, 3),
        ({"encryption_key_index": 3, "encryption": PLAIN, "mac": DESMAC}, 3),
        ({"encryption_key_index": UNIQUE_SESSION_KEYS}, 1),
    ],
)
def test_receiver_key_missing_is_refused(
    sender_changes: dict[str, object], missing: int
) -> None:
    keys = make_keys()
    receiver_keys = KeyStore({i: keys.get(i) for i in keys.indexes if i != missing})
    pair = ConnectionPair(
        client_keys=keys,
        server_keys=receiver_keys,
        client_settings=Settings(**sender_changes),  # type: ignore[arg-type]
        server_settings=Settings(require_encryption=False),
    ).handshake()
    send_id = pair.send(CLIENT, b"hello")
    pair.run()
    assert pair.client.of_type(SendRefused) == [
        SendRefused(send_id, ErrorCode.MSG_TRANSMISSION, None)
    ]
    assert pair.server.error is None
    # Another key still works.
    pair.client.conn.settings = Settings(encryption_key_index=2)
    pair.send(CLIENT, b"again")
    pair.run()
    assert pair.server.received == [b"again"]


def test_sender_key_missing_fails_locally() -> None:
    keys = make_keys()
    partial = KeyStore({i: keys.get(i) for i in (1, 2)})
    pair = ConnectionPair(
        client_keys=partial,
        server_keys=keys,
        client_settings=Settings(encryption_key_index=5),
    ).handshake()
    with pytest.raises(LocalProtocolError):
        pair.send(CLIENT, b"hello")
    assert pair.frames(CLIENT)[-1].message_id is MessageId.MUTUAL_AUTH_COMPLETION_NOTIF


# -- both directions at once, and byte at a time ---------------------------------------


@pytest.mark.parametrize("key_index", [1, UNIQUE_SESSION_KEYS])
def test_hundred_messages_each_way_at_once(key_index: int) -> None:
    settings = Settings(max_block_length=BLOCK, encryption_key_index=key_index)
    pair = ConnectionPair(
        client_settings=settings, server_settings=settings
    ).handshake()
    rng = random.Random(7)
    messages = {
        side: [rng.randbytes(rng.randrange(0, 700)) for _ in range(100)]
        for side in SIDES
    }
    for i in range(100):
        for side in SIDES:
            pair.send(side, messages[side][i])
    pair.run()
    assert pair.server.received == messages[CLIENT]
    assert pair.client.received == messages[SERVER]
    # The two directions really were interleaved on the wire.
    senders = [s for s, _ in pair.transcript[8:]]
    switches = sum(a != b for a, b in itertools.pairwise(senders))
    assert switches > 100


@pytest.mark.parametrize("chunk_size", [1, 3, 33])
def test_whole_exchange_in_small_pieces(chunk_size: int) -> None:
    settings = Settings(
        max_block_length=BLOCK, encryption_key_index=UNIQUE_SESSION_KEYS
    )
    pair = ConnectionPair(
        client_settings=settings,
        server_settings=dataclasses.replace(settings, allow_through_mode=True),
        chunk_size=chunk_size,
    ).handshake()
    messages = [payload(n) for n in (0, 9, 300)]
    for message in messages:
        pair.send(CLIENT, message)
        pair.send(SERVER, message[::-1])
    pair.client.conn.send_through(b"through")
    pair.run()
    assert pair.server.received == messages
    assert pair.client.received == [m[::-1] for m in messages]
    assert pair.server.of_type(ThroughModeReceived) == [ThroughModeReceived(b"through")]
    pair.client.conn.request_disconnection()
    pair.run()
    assert pair.client.endpoint.closed is not None
    assert pair.server.endpoint.closed is not None


# -- malformed transmissions -----------------------------------------------------------


def rq(length: int, key_index: int = 1) -> bytes:
    return craft(
        MessageId.MESSAGE_TRANSMISSION_RQ,
        pack_u32(ByteOrder.BIG, DES, key_index, MD5, length),
    )


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([craft(MessageId.MESSAGE_TRANSMISSION_NOTIF, bytes(8))], ErrorCode.BAD_MSGID),
        ([craft(MessageId.MAC_TRANSMISSION_NOTIF, bytes(24))], ErrorCode.BAD_MSGID),
        ([craft(MessageId.RNDNO_FOR_SESSION_KEY_RQ, bytes(8))], ErrorCode.BAD_MSGID),
        (
            [craft(MessageId.MESSAGE_TRANSMISSION_RP, bytes(4), option=ACK)],
            ErrorCode.BAD_MSGID,
        ),
        ([craft(MessageId.RNDNO_FOR_SESSION_KEY_RP, option=ACK)], ErrorCode.BAD_MSGID),
        ([craft(MessageId.LINE_DISCONNECTION_RP, option=ACK)], ErrorCode.BAD_MSGID),
        ([rq(5), rq(5)], ErrorCode.BAD_MSGID),
        ([rq(5), craft(MessageId.LINE_DISCONNECTION_RQ)], ErrorCode.BAD_MSGID),
        (
            [rq(5), craft(MessageId.MESSAGE_TRANSMISSION_NOTIF, bytes(16))],
            ErrorCode.BAD_LENGTH,
        ),
        (
            [rq(5), craft(MessageId.MAC_TRANSMISSION_NOTIF, bytes(24))],
            ErrorCode.BAD_MSGID,
        ),
        (
            [
                rq(5, UNIQUE_SESSION_KEYS),
                craft(MessageId.MESSAGE_TRANSMISSION_NOTIF, bytes(8)),
            ],
            ErrorCode.RND_NO_FOR_SESSION_KEY_EXPECTED,
        ),
    ],
)
def test_malformed_transmission(frames: list[bytes], code: ErrorCode) -> None:
    pair = ConnectionPair().handshake()
    conn = pair.server.conn
    conn.receive_data(b"".join(frames))
    with pytest.raises(RemoteProtocolError) as info:
        while True:
            assert conn.next_event() is not NEED_DATA
    assert info.value.code is code


@pytest.mark.parametrize(
    ("option", "length", "code"),
    [
        (ACK, 6, ErrorCode.BAD_LENGTH),  # acknowledges another length
        (1, 5, ErrorCode.BAD_OPTION),  # neither ACK nor NAK
    ],
)
def test_bad_transmission_response(option: int, length: int, code: ErrorCode) -> None:
    pair = ConnectionPair().handshake()
    conn = pair.client.conn
    conn.send_message(b"12345")
    assert (
        parse_frame(conn.data_to_send()).message_id is MessageId.MESSAGE_TRANSMISSION_RQ
    )
    conn.receive_data(
        craft(
            MessageId.MESSAGE_TRANSMISSION_RP,
            pack_u32(ByteOrder.BIG, length),
            option=option,
        )
    )
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.code is code


def test_session_random_refused_by_nak() -> None:
    settings = Settings(encryption_key_index=UNIQUE_SESSION_KEYS)
    pair = ConnectionPair(client_settings=settings).handshake()
    conn = pair.client.conn
    send_id = conn.send_message(b"12345")
    conn.data_to_send()
    conn.receive_data(
        craft(MessageId.MESSAGE_TRANSMISSION_RP, pack_u32(ByteOrder.BIG, 5), option=ACK)
        + craft(MessageId.RNDNO_FOR_SESSION_KEY_RP, option=NAK, err_no=0)
    )
    assert conn.next_event() == SendRefused(send_id, ErrorCode.RECEIVED_NAK, None)
    assert conn.phase is Phase.MESSAGES


# -- sealing ahead ---------------------------------------------------------------------


@pytest.mark.parametrize("iv_policy", list(IvPolicy))
@pytest.mark.parametrize("key_index", [1, UNIQUE_SESSION_KEYS])
@pytest.mark.parametrize("combo", list(COMBOS))
def test_sealed_ahead_messages_arrive_in_both_directions(
    combo: str, key_index: int, iv_policy: IvPolicy
) -> None:
    settings = settings_for(combo, encryption_key_index=key_index, iv_policy=iv_policy)
    pair = ConnectionPair(
        client_settings=settings, server_settings=settings, seal_ahead=True
    ).handshake()
    sent = {CLIENT: [payload(n, 1) for n in (1, 300, 0, 1000)]}
    sent[SERVER] = [payload(n, 2) for n in (999, 8, 1)]
    for name, messages in sent.items():
        for message in messages:
            pair.send(name, message)
    pair.run()
    assert pair.server.received == sent[CLIENT]
    assert pair.client.received == sent[SERVER]


@pytest.mark.parametrize("key_index", [1, UNIQUE_SESSION_KEYS])
def test_a_refused_message_sealed_ahead_rolls_its_chain_back(key_index: int) -> None:
    """The peer refuses a message already sealed; the next one must be sealed
    from the chain as it was, or its MAC fails at the peer."""
    client = Settings(encryption_key_index=key_index)
    server = Settings(max_message_length=500)
    pair = ConnectionPair(
        client_settings=client, server_settings=server, seal_ahead=True
    ).handshake()
    first, too_long, after = payload(100), payload(501), payload(400)
    pair.send(CLIENT, first)
    refused = pair.send(CLIENT, too_long)
    pair.send(CLIENT, after)
    events = pair.run()
    refusals = [e for e in events[CLIENT] if isinstance(e, SendRefused)]
    assert [r.send_id for r in refusals] == [refused]
    assert pair.server.received == [first, after]
