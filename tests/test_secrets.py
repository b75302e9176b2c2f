"""No key, derived key or PIN in any log line, exception, event or repr."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Iterable

import pytest
from helpers import (
    CLIENT,
    SIDES,
    ConnectionPair,
    make_card,
    make_cards,
    make_keys,
    random_keys,
)

import iscl_hw
from iscl_hw import aio, crypto, secure
from iscl_hw.arbiter import CardArbiter
from iscl_hw.card import ApduCard
from iscl_hw.constants import UNIQUE_SESSION_KEYS, EncryptionMethod, MacMethod
from iscl_hw.crypto import Padding
from iscl_hw.errors import ConfigError, IsclError
from iscl_hw.keyfile import KeyStore
from iscl_hw.secure import Protection
from iscl_hw.settings import IvPolicy, MacKeyPolicy, Settings
from softcard.cardfile import new_card_state

PIN = b"Qv7!pZ2k-pin"

COMBOS = [
    (EncryptionMethod.DES_CBC, MacMethod.MD5),
    (EncryptionMethod.DES_CBC, MacMethod.DESMAC),
    (EncryptionMethod.DES_CBC, MacMethod.NONE),
    (EncryptionMethod.NONE, MacMethod.DESMAC),
    (EncryptionMethod.NONE, MacMethod.MD5),
    (EncryptionMethod.NONE, MacMethod.NONE),
]
RELAXED = {
    "require_encryption": False,
    "allow_no_mac": True,
    "allow_unencrypted_md5": True,
    "allow_through_mode": True,
}


def encodings(secret: bytes) -> set[str]:
    """Every spelling of ``secret`` a log line or message might use."""
    forms = {
        secret.hex(),
        secret.hex().upper(),
        secret.hex(" "),
        secret.hex(" ").upper(),
        secret.hex(":"),
        secret.hex(":").upper(),
        repr(secret),
        repr(secret)[2:-1],
        str(list(secret)),
        base64.b64encode(secret).decode()[: len(secret) * 4 // 3],
    }
    if secret.isascii() and secret.decode().isprintable():
        forms.add(secret.decode())
    # Spellings that short may match by chance; keys are 8 random bytes.
    return {f for f in forms if len(f) >= 8}


def assert_no_secret(texts: Iterable[str], secrets: Iterable[bytes]) -> None:
    haystack = "\n".join(texts)
    assert haystack
    for secret in secrets:
        for form in encodings(secret):
            assert form not in haystack, f"a secret appears in the output as {form!r}"


class Recorder:
    """Collects the str and repr of everything a scenario produced, and every
    session key the core derived."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.texts: list[str] = []
        self.derived: list[bytes] = []
        real = secure.derive_session_key

        def derive(base: bytes, random: bytes) -> bytes:
            key = real(base, random)
            self.derived.append(key)
            return key

        monkeypatch.setattr(secure, "derive_session_key", derive)

    def add(self, *objects: object) -> None:
        for obj in objects:
            self.texts += [str(obj), repr(obj)]
            if isinstance(obj, BaseException):
                cause = obj.__cause__ or obj.__context__
                if cause is not None:
                    self.add(cause)

    def add_pair(self, pair: ConnectionPair) -> None:
        for side in pair.sides:
            self.add(
                *side.events,
                *side.card_requests,
                side.conn,
                side.endpoint,
                side.arbiter,
            )
            if side.error is not None:
                self.add(side.error)


def run_scenarios(recorder: Recorder) -> tuple[list[bytes], list[bytes]]:
    """Handshakes, every method and key index, failures; returns the
    (authentication, encryption) keys used."""
    auth_keys, enc_keys = random_keys(), random_keys()
    wrong_auth = random_keys()
    keys = KeyStore(enc_keys)
    pinned = make_cards(auth_keys, pin=PIN)  # PIN hashing is slow: make once

    for encryption, mac in COMBOS:
        for key_index in (1, 5, UNIQUE_SESSION_KEYS):
            for mac_key_policy in MacKeyPolicy:
                settings = Settings(
                    encryption=encryption,
                    mac=mac,
                    encryption_key_index=key_index,
                    session_key_base_index=3,
                    iv_policy=IvPolicy.PER_MESSAGE,
                    padding=Padding.ISO9797_M2,
                    mac_key_policy=mac_key_policy,
                    **RELAXED,  # type: ignore[arg-type]
                )
                pair = ConnectionPair(
                    cards=pinned,
                    keys=keys,
                    client_settings=settings,
                    server_settings=settings,
                ).handshake()
                for side in SIDES:
                    pair.send(side, b"patient data " * 20)
                pair.client.conn.send_through(b"through mode")
                pair.run()
                pair.client.conn.request_disconnection()
                pair.run()
                recorder.add_pair(pair)

    # Failures: wrong authentication key, refused and tampered messages, a
    # missing key, a blocked card.
    failed = ConnectionPair(
        cards=make_cards(auth_keys, client_keys=wrong_auth), keys=keys
    )
    failed.run()
    assert failed.server.error is not None
    recorder.add_pair(failed)

    refused = ConnectionPair(
        cards=make_cards(auth_keys),
        keys=keys,
        client_settings=Settings(encryption=EncryptionMethod.NONE),
    ).handshake()
    refused.send(CLIENT, b"refused")
    refused.client.conn.send_through(b"through refused")
    refused.run()
    recorder.add_pair(refused)

    tampered = ConnectionPair(
        cards=make_cards(auth_keys), keys=keys, server_keys=make_keys()
    ).handshake()
    tampered.send(CLIENT, b"fails its MAC")
    tampered.run()
    assert tampered.server.error is not None
    recorder.add_pair(tampered)

    blocked = make_cards(auth_keys)
    blocked.server_soft.state.keys[1].remaining = 0
    pair = ConnectionPair(cards=blocked, keys=keys)
    pair.run()
    recorder.add_pair(pair)

    try:
        KeyStore({1: enc_keys[1]}).get(2)
    except ConfigError as exc:
        recorder.add(exc)
    try:
        KeyStore({1: enc_keys[1][:7]})
    except ConfigError as exc:
        recorder.add(exc)

    # A card with a PIN, through the real asyncio driver.
    asyncio.run(driver_scenario(auth_keys, keys, recorder))
    return list(auth_keys.values()) + list(wrong_auth.values()), list(enc_keys.values())


async def driver_scenario(
    auth_keys: dict[int, bytes], keys: KeyStore, recorder: Recorder
) -> None:
    server_card, _, _ = make_card(auth_keys, pin=PIN, name="server")
    client_card, _, _ = make_card(auth_keys, pin=PIN, name="client")

    async def handler(channel: aio.AsyncChannel) -> None:
        await channel.send(await channel.recv())
        recorder.add(channel, channel.connection)

    server = await aio.start_server(
        handler, "127.0.0.1", 0, card=server_card, keys=keys
    )
    try:
        port = server.sockets[0].getsockname()[1]
        async with await aio.open_connection(
            "127.0.0.1", port, card=client_card, keys=keys
        ) as channel:
            await channel.send(b"over the socket")
            recorder.add(await channel.recv_message(), channel)

        def blocking() -> None:
            with iscl_hw.connect("127.0.0.1", port, card=client_card, keys=keys) as ch:
                ch.send(b"blocking")
                ch.recv()
                recorder.add(ch, ch.connection)

        await asyncio.to_thread(blocking)
    finally:
        server.close()
        await server.wait_closed()


def derived_keys(base_keys: list[bytes], session_keys: list[bytes]) -> list[bytes]:
    keys = base_keys + session_keys
    mask = crypto.MAC_KEY_VARIANT_MASK
    return session_keys + [crypto.key_variant(k, mask) for k in keys]


def test_no_secret_in_logs_exceptions_events(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    recorder = Recorder(monkeypatch)
    auth, enc = run_scenarios(recorder)
    assert len(recorder.derived) > 20
    secrets = [*auth, *enc, *derived_keys(enc, recorder.derived), PIN]

    log_texts = [caplog.text]
    for record in caplog.records:
        log_texts.append(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            recorder.add(record.exc_info[1])
        for arg in record.args if isinstance(record.args, tuple) else ():
            log_texts += [str(arg), repr(arg)]
    # The DEBUG trace was really captured (frames and APDUs), so its
    # silence about keys means something.
    assert "MUTUAL_AUTH_PASS2_NOTIF" in caplog.text
    assert "INTERNAL AUTHENTICATE" in caplog.text
    assert "VERIFY" in caplog.text
    assert_no_secret(log_texts + recorder.texts, secrets)


def test_repr_of_key_holders() -> None:
    auth_keys, enc_keys = random_keys(), random_keys()
    keys = KeyStore(enc_keys)
    state = new_card_state(auth_keys, pin=PIN)
    card, soft, _ = make_card(auth_keys, pin=PIN)
    objects: list[object] = [
        keys,
        state,
        state.keys[1],
        state.pin,
        soft,
        card,
        CardArbiter(card),
        Settings(),
        Settings(auth_data=b"AE title", random_bytes=lambda n: enc_keys[1][:n]),
    ]
    for mac in MacMethod:
        for key in (enc_keys[2], None):
            objects.append(
                Protection(
                    EncryptionMethod.DES_CBC,
                    mac,
                    key,
                    Padding.PKCS5,
                    IvPolicy.CHAINED,
                    MacKeyPolicy.SAME,
                )
            )
    texts = [text for obj in objects for text in (repr(obj), str(obj))]
    assert "indexes=[1, 2, 3, 4, 5, 6, 7, 8]" in repr(keys)
    assert_no_secret(
        texts, [*auth_keys.values(), *enc_keys.values(), PIN, state.pin.digest]
    )


def test_secret_search_finds_what_it_looks_for() -> None:
    key = bytes.fromhex("0123456789ABCDEF")
    for text in (
        "key=0123456789abcdef",
        "key 01 23 45 67 89 AB CD EF",
        f"raw {key!r}",
        "b64 ASNFZ4mrze8=",
        f"as list {list(key)}",
    ):
        with pytest.raises(AssertionError):
            assert_no_secret([text], [key])
    with pytest.raises(AssertionError):
        assert_no_secret(["entered Qv7!pZ2k-pin"], [PIN])


def test_isclerror_messages_from_the_card_layer_carry_no_pin() -> None:
    wrong = b"wrong-pin-123"
    soft_keys = random_keys()
    _, soft, _ = make_card(soft_keys, pin=PIN)
    with pytest.raises(IsclError) as info:
        ApduCard(soft, pin=wrong)
    assert_no_secret([str(info.value), repr(info.value)], [wrong, PIN])
