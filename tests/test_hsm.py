"""The PKCS#11 backend on a real SoftHSM2 token.

Token cryptography is checked against FIPS 81 and against the software path
(the ``cryptography`` library) for the same keys; whole connections run
token to token and token to virtual card over TCP.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscl_hw import aio, crypto, softhsm
from iscl_hw.constants import UNIQUE_SESSION_KEYS, EncryptionMethod, MacMethod
from iscl_hw.errors import (
    CardError,
    ConfigError,
    LineClosed,
    PeerAuthenticationFailed,
    PeerRejectedAuthentication,
    TransmissionRefused,
)
from iscl_hw.hsm import (
    KeyKind,
    MechanismUnavailable,
    Token,
    TokenCard,
    TokenConfig,
    TokenError,
    TokenKey,
    TokenKeys,
    TokenLoggedOut,
    key_label,
)
from iscl_hw.keyfile import KeyStore
from iscl_hw.secure import SoftwareKey
from iscl_hw.settings import Settings
from tests.helpers import make_card, random_keys, serving, settle
from tests.hsm_env import HsmSession, HsmToken, hsm  # noqa: F401

# FIPS 81 Appendix B and C.
FIPS_KEY = bytes.fromhex("0123456789ABCDEF")
FIPS_IV = bytes.fromhex("1234567890ABCDEF")
FIPS_PLAIN = b"Now is the time for all "
FIPS_CBC = bytes.fromhex("E5C7CDDE872BF27C43E934008C389C0F683788499A7C05F6")

AUTH = random_keys()
ENC = random_keys()


def open_token(t: HsmToken, **options: object) -> Token:
    return Token(
        TokenConfig(str(t.module), label=t.label, pin=t.pin, **options)  # type: ignore[arg-type]
    )


def provisioned(t: HsmToken, auth: dict[int, bytes], enc: dict[int, bytes]) -> Token:
    token = open_token(t)
    for index, key in auth.items():
        token.import_key(KeyKind.AUTH, index, key)
    for index, key in enc.items():
        token.import_key(KeyKind.ENC, index, key)
    return token


@pytest.fixture(scope="module")
def server_token(hsm: HsmSession) -> Iterator[Token]:  # noqa: F811
    token = provisioned(hsm.token("server"), AUTH, ENC)
    yield token
    token.close()


@pytest.fixture(scope="module")
def client_token(hsm: HsmSession) -> Iterator[Token]:  # noqa: F811
    token = provisioned(hsm.token("client"), AUTH, ENC)
    yield token
    token.close()


# -- token cryptography -------------------------------------------------------


def test_token_des_cbc_matches_fips81(hsm: HsmSession) -> None:  # noqa: F811
    token = provisioned(hsm.token(), {}, {1: FIPS_KEY})
    with token:
        key = TokenKeys(token).get(1)
        assert key.cbc_encrypt(FIPS_IV, FIPS_PLAIN) == FIPS_CBC
        assert key.cbc_decrypt(FIPS_IV, FIPS_CBC) == FIPS_PLAIN


@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 15, 16, 17, 100, 4096])
def test_token_results_equal_the_software_path(
    server_token: Token, length: int
) -> None:
    data, iv, random = os.urandom(length), os.urandom(8), os.urandom(8)
    token_key = TokenKeys(server_token).get(2)
    soft_key = SoftwareKey(ENC[2])
    padded = crypto.pad(data, crypto.Padding.PKCS5)

    assert token_key.cbc_encrypt(iv, padded) == soft_key.cbc_encrypt(iv, padded)
    assert token_key.cbc_decrypt(iv, padded) == soft_key.cbc_decrypt(iv, padded)
    assert token_key.cbc_mac(data) == crypto.cbc_mac(ENC[2], data)
    assert token_key.mac_variant().cbc_mac(data) == soft_key.mac_variant().cbc_mac(data)

    token_session, soft_session = token_key.derive(random), soft_key.derive(random)
    assert token_session.cbc_encrypt(iv, padded) == soft_session.cbc_encrypt(iv, padded)
    assert token_session.mac_variant().cbc_mac(
        data
    ) == soft_session.mac_variant().cbc_mac(data)
    token_session.discard()


def test_session_key_derivation_is_parity_of_des_ecb(server_token: Token) -> None:
    random = os.urandom(8)
    expected = crypto.fix_parity(crypto.des_ecb_encrypt(ENC[3], random))
    derived = TokenKeys(server_token).get(3).derive(random)
    block = os.urandom(8)
    assert derived.cbc_encrypt(bytes(8), block) == crypto.des_ecb_encrypt(
        expected, block
    )
    derived.discard()


def test_listing_shows_check_values_not_keys(server_token: Token) -> None:
    listed = server_token.list_keys()
    labels = [k.label for k in listed]
    assert key_label(KeyKind.AUTH, 1) in labels
    assert key_label(KeyKind.ENC, 8, mac_variant=True) in labels
    by_label = {k.label: k for k in listed}
    kcv = crypto.des_ecb_encrypt(ENC[5], bytes(8)).hex()[:6].upper()
    assert by_label["iscl-enc-5"].check_value == kcv
    text = repr(listed) + repr(server_token)
    for key in [*AUTH.values(), *ENC.values()]:
        assert key.hex() not in text.lower()


def test_a_label_is_never_overwritten(server_token: Token) -> None:
    with pytest.raises(ConfigError, match="already holds iscl-auth-1"):
        server_token.import_key(KeyKind.AUTH, 1, os.urandom(8))


def test_keys_are_sensitive_and_not_extractable(server_token: Token) -> None:
    from pkcs11 import Attribute, ObjectClass

    with server_token.session() as pooled:
        for obj in pooled.session.get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY}
        ):
            if obj.label and obj.label.startswith("iscl-"):
                assert obj[Attribute.SENSITIVE] is True
                assert obj[Attribute.EXTRACTABLE] is False


# -- the card -----------------------------------------------------------------


def test_card_answers_and_checks_in_the_token(server_token: Token) -> None:
    card = TokenCard(server_token)
    view = card.for_connection()
    challenge = view.get_challenge()
    answer = crypto.des_ecb_encrypt(AUTH[4], challenge)
    view.external_authenticate(4, answer)

    other = os.urandom(8)
    assert card.internal_authenticate(4, other) == crypto.des_ecb_encrypt(
        AUTH[4], other
    )


def test_a_challenge_answers_once(server_token: Token) -> None:
    view = TokenCard(server_token).for_connection()
    challenge = view.get_challenge()
    answer = crypto.des_ecb_encrypt(AUTH[1], challenge)
    view.external_authenticate(1, answer)
    with pytest.raises(CardError, match="without a challenge"):
        view.external_authenticate(1, answer)


def test_wrong_answer_is_refused(server_token: Token) -> None:
    view = TokenCard(server_token).for_connection()
    view.get_challenge()
    with pytest.raises(CardError, match="wrong"):
        view.external_authenticate(1, os.urandom(8))


def test_wrong_answer_is_refused_after_the_host_check(server_token: Token) -> None:
    view = TokenCard(server_token).for_connection()
    challenge = view.get_challenge()
    right = view.internal_authenticate(3, challenge)  # the host-side check
    assert right == crypto.des_ecb_encrypt(AUTH[3], challenge)
    with pytest.raises(CardError, match="wrong"):
        view.external_authenticate(3, bytes(a ^ 1 for a in right))


def test_own_challenge_is_never_answered(server_token: Token) -> None:
    card = TokenCard(server_token)
    challenge = card.for_connection().get_challenge()
    with pytest.raises(CardError, match="its own challenge"):
        card.internal_authenticate(1, challenge)
    with pytest.raises(CardError, match="its own challenge"):
        card.for_connection().internal_authenticate(1, challenge)


def test_connections_have_their_own_challenges(server_token: Token) -> None:
    card = TokenCard(server_token)
    first, second = card.for_connection(), card.for_connection()
    c1, c2 = first.get_challenge(), second.get_challenge()
    second.external_authenticate(2, crypto.des_ecb_encrypt(AUTH[2], c2))
    first.external_authenticate(2, crypto.des_ecb_encrypt(AUTH[2], c1))


# -- start-up failures --------------------------------------------------------


def test_wrong_pin_is_a_clear_error(hsm: HsmSession) -> None:  # noqa: F811
    t = hsm.token()
    config = TokenConfig(str(t.module), label=t.label, pin=b"not-the-pin")
    with pytest.raises(TokenError, match="PIN was refused") as raised:
        Token(config)
    assert "not-the-pin" not in str(raised.value)
    assert "not-the-pin" not in repr(config)


def test_unknown_token_is_a_clear_error(hsm: HsmSession) -> None:  # noqa: F811
    t = hsm.token()
    with pytest.raises(TokenError, match="no PKCS#11 token with label 'absent'"):
        Token(TokenConfig(str(t.module), label="absent", pin=t.pin))


def test_missing_mechanism_fails_before_any_connection(
    hsm: HsmSession,  # noqa: F811
) -> None:
    t = hsm.token()
    allowed = frozenset({"DES3_ECB", "DES3_ECB_ENCRYPT_DATA"})
    with pytest.raises(MechanismUnavailable) as raised:
        open_token(t, allowed_mechanisms=allowed)
    message = str(raised.value)
    assert t.label in message
    assert "DES3_CBC" in message


def test_missing_key_object_refuses_the_message(
    hsm: HsmSession,  # noqa: F811
) -> None:
    partial = provisioned(hsm.token("partial"), AUTH, {1: ENC[1]})
    soft_card, _, _ = make_card(AUTH)

    async def scenario() -> None:
        async with serving(
            echo_handler, TokenCard(partial), TokenKeys(partial)
        ) as port:
            channel = await aio.open_connection(
                "127.0.0.1",
                port,
                card=soft_card,
                keys=KeyStore(ENC),
                settings=Settings(encryption_key_index=3),
            )
            async with channel:
                with pytest.raises(TransmissionRefused):
                    await channel.send(b"x")
            await settle()

    with partial:
        asyncio.run(scenario())


# -- whole connections --------------------------------------------------------


async def echo_handler(channel: aio.AsyncChannel) -> None:
    try:
        while True:
            await channel.send(await channel.recv())
    except LineClosed:
        pass


COMBOS = [
    (EncryptionMethod.DES_CBC, MacMethod.MD5, 1),
    (EncryptionMethod.DES_CBC, MacMethod.DESMAC, 2),
    (EncryptionMethod.DES_CBC, MacMethod.NONE, 3),
    (EncryptionMethod.NONE, MacMethod.DESMAC, 4),
    (EncryptionMethod.DES_CBC, MacMethod.MD5, UNIQUE_SESSION_KEYS),
    (EncryptionMethod.DES_CBC, MacMethod.DESMAC, UNIQUE_SESSION_KEYS),
    (EncryptionMethod.NONE, MacMethod.DESMAC, UNIQUE_SESSION_KEYS),
]


def relaxed(encryption: EncryptionMethod, mac: MacMethod, index: int) -> Settings:
    return Settings(
        encryption=encryption,
        mac=mac,
        encryption_key_index=index,
        session_key_base_index=5,
        require_encryption=False,
        allow_no_mac=True,
    )


@pytest.mark.parametrize("peer", ["token", "software"])
@pytest.mark.parametrize(
    ("encryption", "mac", "index"),
    COMBOS,
    ids=[f"{e.name}-{m.name}-key{i:X}" for e, m, i in COMBOS],
)
def test_transfer_with_every_setting(
    server_token: Token,
    client_token: Token,
    peer: str,
    encryption: EncryptionMethod,
    mac: MacMethod,
    index: int,
) -> None:
    """Token server; the client is a second token, or a virtual card with
    software keys (so the token's bytes must equal the software path's)."""
    settings = relaxed(encryption, mac, index)
    messages = [b"", b"a", os.urandom(1000), os.urandom(70_000)]
    if peer == "token":
        card, keys = TokenCard(client_token), TokenKeys(client_token)
    else:
        soft_card, _, _ = make_card(AUTH)
        card, keys = soft_card, KeyStore(ENC)

    async def scenario() -> None:
        async with serving(
            echo_handler,
            TokenCard(server_token),
            TokenKeys(server_token),
            settings=settings,
        ) as port:
            channel = await aio.open_connection(
                "127.0.0.1", port, card=card, keys=keys, settings=settings
            )
            async with channel:
                for message in messages:
                    if not message:
                        continue
                    await channel.send(message)
                    echoed = await channel.recv_message()
                    assert echoed.data == message
            await settle()

    asyncio.run(scenario())


def test_wrong_authentication_key_fails_the_handshake(
    server_token: Token,
    hsm: HsmSession,  # noqa: F811
) -> None:
    wrong = {i: os.urandom(8) for i in AUTH}
    stranger = provisioned(hsm.token("stranger"), wrong, ENC)

    async def scenario() -> None:
        async with serving(
            echo_handler, TokenCard(server_token), TokenKeys(server_token)
        ) as port:
            with pytest.raises((PeerAuthenticationFailed, PeerRejectedAuthentication)):
                await aio.open_connection(
                    "127.0.0.1",
                    port,
                    card=TokenCard(stranger),
                    keys=TokenKeys(stranger),
                )
            await settle()

    with stranger:
        asyncio.run(scenario())


def test_logout_mid_transfer_ends_the_connection_then_logs_in_again(
    server_token: Token,
    hsm: HsmSession,  # noqa: F811
) -> None:
    client_token = provisioned(hsm.token("logout"), AUTH, ENC)

    async def scenario() -> None:
        async with serving(
            echo_handler, TokenCard(server_token), TokenKeys(server_token)
        ) as port:
            channel = await aio.open_connection(
                "127.0.0.1",
                port,
                card=TokenCard(client_token),
                keys=TokenKeys(client_token),
            )
            await channel.send(b"before")
            assert await channel.recv() == b"before"

            # What another part of the process does: log the token out
            # (C_Logout ends the login of every session of the process).
            _log_out_behind_its_back(client_token)
            with pytest.raises(TokenLoggedOut, match="not logged in"):
                await channel.send(b"during")
            await channel.abort()

            again = await aio.open_connection(
                "127.0.0.1",
                port,
                card=TokenCard(client_token),
                keys=TokenKeys(client_token),
            )
            async with again:
                await again.send(b"after")
                assert await again.recv() == b"after"
            await settle()

    with client_token:
        asyncio.run(scenario())


def _log_out_behind_its_back(token: Token) -> None:
    handle = token._sessions[0].session.handle  # type: ignore[attr-defined]
    rv = softhsm.functions(token.config.module).call("C_Logout", handle)
    assert rv == 0


def test_a_lost_login_is_not_taken_for_a_missing_key(
    hsm: HsmSession,  # noqa: F811
) -> None:
    """Private key objects vanish with the login: a session that has not
    used a key yet then finds none.  That is TokenLoggedOut, and the next
    operation logs in again, not a missing key for ever."""
    t = hsm.token()
    provisioned(t, {1: AUTH[1]}, {}).close()
    with open_token(t) as token:  # no session holds a copy of a key yet
        _log_out_behind_its_back(token)
        block = os.urandom(8)
        with pytest.raises(TokenLoggedOut, match="not logged in"):
            token.ecb("iscl-auth-1", block)
        assert token.ecb("iscl-auth-1", block) == crypto.des_ecb_encrypt(AUTH[1], block)
        # Looking a key up, or listing them, is no different.
        _log_out_behind_its_back(token)
        with pytest.raises(TokenLoggedOut, match="not logged in"):
            token.has_key("iscl-auth-1")
        assert token.has_key("iscl-auth-1")
        _log_out_behind_its_back(token)
        with pytest.raises(TokenLoggedOut, match="not logged in"):
            token.list_keys()
        assert [key.label for key in token.list_keys()] == ["iscl-auth-1"]


def test_hundred_concurrent_handshakes_on_one_token(
    server_token: Token, client_token: Token
) -> None:
    waits: list[float] = []

    async def one(port: int) -> None:
        started = time.monotonic()
        channel = await aio.open_connection(
            "127.0.0.1",
            port,
            card=TokenCard(client_token),
            keys=TokenKeys(client_token),
        )
        waits.append(time.monotonic() - started)
        async with channel:
            await channel.send(b"ping")
            assert await channel.recv() == b"ping"

    async def scenario() -> None:
        async with serving(
            echo_handler,
            TokenCard(server_token),
            TokenKeys(server_token),
            max_handshakes_per_peer=100,
        ) as port:
            await asyncio.gather(*(one(port) for _ in range(100)))
            await settle()

    asyncio.run(scenario())
    assert len(waits) == 100
    # Correctness bound, not a speed target (that is in the benchmark): a
    # shared span would make the last of 100 wait for all the others.
    assert max(waits) < 10


# -- commands -----------------------------------------------------------------


def test_import_key_and_list_commands(
    hsm: HsmSession,  # noqa: F811
    tmp_path: object,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pathlib import Path

    from iscl_hw import cli

    t = hsm.token("cli")
    monkeypatch.setenv("TEST_TOKEN_PIN", t.pin.decode())
    key_file = Path(str(tmp_path)) / "enc3.hex"
    key_file.write_text(ENC[3].hex() + "\n")
    token_args = ["--label", t.label, "--pin-env", "TEST_TOKEN_PIN"]
    import_enc3 = ["hsm", "import-key", *token_args, "--kind", "enc", "--index", "3"]
    assert cli.main([*import_enc3, "--key-file", str(key_file)]) == 2
    assert "key file: " in capsys.readouterr().err  # readable by others: refused
    key_file.chmod(0o600)

    assert (
        cli.main(
            [
                "hsm",
                "import-key",
                *token_args,
                "--kind",
                "enc",
                "--index",
                "3",
                "--key-file",
                str(key_file),
            ]
        )
        == 0
    )
    assert cli.main(["hsm", "list", *token_args]) == 0
    out = capsys.readouterr().out
    kcv = crypto.des_ecb_encrypt(ENC[3], bytes(8)).hex()[:6].upper()
    assert f"stored iscl-enc-3 (check value {kcv})" in out
    assert "iscl-enc-3-mac" in out
    assert "DES3_CBC" in out
    assert ENC[3].hex() not in out.lower()

    # A second import of the same label is refused, and a bad key is named.
    assert (
        cli.main(
            [
                "hsm",
                "import-key",
                *token_args,
                "--kind",
                "enc",
                "--index",
                "3",
                "--key-file",
                str(key_file),
            ]
        )
        == 2
    )
    key_file.write_text("0123")
    assert (
        cli.main(
            [
                "hsm",
                "import-key",
                *token_args,
                "--kind",
                "auth",
                "--index",
                "1",
                "--key-file",
                str(key_file),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "already holds iscl-enc-3" in err
    assert "16 hex digits" in err

    monkeypatch.setenv("TEST_TOKEN_PIN", "wrong-pin")
    assert cli.main(["hsm", "list", *token_args]) == 2
    err = capsys.readouterr().err
    assert "PIN was refused" in err
    assert "wrong-pin" not in err


def test_native_des_way_is_named_when_it_cannot_run(
    hsm: HsmSession,  # noqa: F811
) -> None:
    """With triple DES forbidden, single DES must run natively; SoftHSM2 runs
    it only with OpenSSL's legacy provider, which this process does not
    load, so the self-test fails and the error says so."""
    t = hsm.token()
    allowed = frozenset({"DES_ECB", "DES_CBC", "DES_ECB_ENCRYPT_DATA"})
    with pytest.raises(MechanismUnavailable) as raised:
        open_token(t, allowed_mechanisms=allowed)
    message = str(raised.value)
    assert "DES3 with K||K||K needs DES3_ECB, DES3_CBC" in message
    assert "native DES: MechanismInvalid from the token" in message


# -- found by a new-user test -------------------------------------------------


def test_every_session_finds_the_keys(hsm: HsmSession) -> None:  # noqa: F811
    """A session's copy of a key is not found as the key by another session."""
    token = provisioned(hsm.token(), {1: AUTH[1]}, {})
    with token:
        block = os.urandom(8)
        expected = crypto.des_ecb_encrypt(AUTH[1], block)
        with token.session():  # holds the first session
            assert token.ecb("iscl-auth-1", block) == expected
        assert token.ecb("iscl-auth-1", block) == expected
        assert [k.label for k in token.list_keys()] == ["iscl-auth-1"]


def test_threads_share_one_token(server_token: Token) -> None:
    """Calls into one module are serialised: SoftHSM2, initialised by
    python-pkcs11 without OS locking, crashes on concurrent calls."""
    import threading

    keys = TokenKeys(server_token)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(40):
                random, data = os.urandom(8), os.urandom(32)
                derived = keys.get(5).derive(random)
                soft = SoftwareKey(ENC[5]).derive(random)
                assert derived.cbc_encrypt(bytes(8), data) == soft.cbc_encrypt(
                    bytes(8), data
                )
                derived.discard()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_failed_start_logs_out(hsm: HsmSession) -> None:  # noqa: F811
    from pkcs11 import Attribute, ObjectClass

    t = hsm.token()
    provisioned(t, {1: AUTH[1]}, {}).close()
    with pytest.raises(MechanismUnavailable):
        open_token(t, allowed_mechanisms=frozenset())
    public = t.token().open()
    try:
        query = {Attribute.CLASS: ObjectClass.SECRET_KEY}
        assert list(public.get_objects(query)) == []
    finally:
        public.close()


def _open_session_handles(module: Path) -> list[int]:
    """Handles of the sessions this process has open (SoftHSM2 numbers them
    from 1 and never reuses one, so the first few hundred cover a test)."""
    functions = softhsm.functions(module)
    info = softhsm.CkSessionInfo()
    return [
        handle
        for handle in range(1, 512)
        if functions.call("C_GetSessionInfo", handle, ctypes.byref(info)) == 0
    ]


def test_no_session_is_left_open_by_a_refused_or_shared_login(
    hsm: HsmSession,  # noqa: F811
) -> None:
    """A refused PIN and a login another Token already made each used to
    leave the session python-pkcs11 opened for C_Login behind."""
    t = hsm.token()
    before = _open_session_handles(t.module)
    with pytest.raises(TokenError, match="PIN was refused"):
        Token(TokenConfig(str(t.module), label=t.label, pin=b"not-the-pin"))
    assert _open_session_handles(t.module) == before

    first = provisioned(t, {1: AUTH[1]}, {})
    second = open_token(t)
    second.close()
    block = os.urandom(8)  # a private key object: only while logged in
    assert first.ecb("iscl-auth-1", block) == crypto.des_ecb_encrypt(AUTH[1], block)
    first.close()
    assert _open_session_handles(t.module) == before


def test_weak_keys_are_refused(server_token: Token) -> None:
    with pytest.raises(ConfigError, match="weak"):
        server_token.import_key(KeyKind.AUTH, 1, bytes(8))


def test_pin_must_be_utf8_and_stays_out_of_the_error() -> None:
    pin = b"\xffsecret-4242"
    with pytest.raises(ConfigError, match="UTF-8") as raised:
        TokenConfig("/nonexistent.so", label="x", pin=pin)
    assert "secret-4242" not in repr(raised.value) + str(raised.value)
    with pytest.raises(ConfigError, match="sessions"):
        TokenConfig("/nonexistent.so", label="x", pin=b"1", sessions=100_000)
    config = TokenConfig(
        "/nonexistent.so", label="x", pin=b"1", allowed_mechanisms=["CKM_DES3_CBC"]
    )
    assert config.allowed_mechanisms == frozenset({"DES3_CBC"})


def test_demo_with_keys_in_softhsm(tmp_path: object) -> None:
    """The demo makes its own SoftHSM2 directory, so it runs in a process of
    its own (SOFTHSM2_CONF is fixed once a process loads the module)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    done = subprocess.run(
        [sys.executable, "-m", "iscl_hw", "demo", "--backend", "pkcs11"],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "DES runs as DES3 with K||K||K" in done.stdout
    assert "identical: the file arrived intact" in done.stdout


# -- the core's known-answer vectors, run in the token ------------------------


def _vectors(name: str) -> list[dict[str, str]]:
    import json
    from pathlib import Path

    path = Path(__file__).parent / "vectors" / name
    vectors: list[dict[str, str]] = json.loads(path.read_text())["vectors"]
    return vectors


DES_CBC_VECTORS = _vectors("des_cbc.json")
CBCMAC_VECTORS = [
    v for v in _vectors("cbcmac_des.json") if v["iv"] == "00" * 8 and "mac_m1" in v
]
VECTOR_KEYS = sorted(
    {v["key"] for v in DES_CBC_VECTORS} | {v["key"] for v in CBCMAC_VECTORS}
)


@pytest.fixture(scope="module")
def vector_token(hsm: HsmSession) -> Iterator[Token]:  # noqa: F811
    enc = {i + 1: bytes.fromhex(k) for i, k in enumerate(VECTOR_KEYS)}
    token = provisioned(hsm.token("vectors"), {}, enc)
    yield token
    token.close()


def _token_key(token: Token, key_hex: str) -> TokenKey:
    return TokenKeys(token).get(VECTOR_KEYS.index(key_hex) + 1)


def test_token_des_cbc_on_the_openssl_vectors(vector_token: Token) -> None:
    for vector in DES_CBC_VECTORS:
        plaintext = bytes.fromhex(vector["plaintext"])
        if not plaintext:
            continue  # a token refuses an empty encryption; no message is empty
        key = _token_key(vector_token, vector["key"])
        iv, ciphertext = (
            bytes.fromhex(vector["iv"]),
            bytes.fromhex(vector["ciphertext"]),
        )
        assert key.cbc_encrypt(iv, plaintext) == ciphertext, vector
        assert key.cbc_decrypt(iv, ciphertext) == plaintext, vector


def test_token_cbc_mac_on_the_vectors(vector_token: Token) -> None:
    assert len(CBCMAC_VECTORS) >= 10
    for vector in CBCMAC_VECTORS:
        key = _token_key(vector_token, vector["key"])
        assert key.cbc_mac(bytes.fromhex(vector["message"])).hex() == vector["mac_m1"]


# -- finding, sharing and waiting ---------------------------------------------


def test_token_found_by_serial_and_login_shared(server_token: Token) -> None:
    """A second Token on the same token (found by serial) meets the login of
    the first: "user already logged in" counts as success."""
    serial = server_token._token.serial if server_token._token else b""
    assert isinstance(serial, bytes) and serial
    config = server_token.config
    second = Token(TokenConfig(config.module, serial=serial.decode(), pin=config.pin))
    with second:
        block = os.urandom(8)
        assert second.ecb("iscl-auth-2", block) == crypto.des_ecb_encrypt(
            AUTH[2], block
        )


def test_a_shared_login_still_needs_the_right_pin(
    hsm: HsmSession,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The module checks no PIN once the process is logged in: a second
    Token with a wrong PIN must still be refused, and leave no session."""
    t = hsm.token()
    before = _open_session_handles(t.module)
    with open_token(t):
        wrong = TokenConfig(str(t.module), label=t.label, pin=b"not-the-pin")
        with pytest.raises(TokenError, match="PIN was refused") as raised:
            Token(wrong)
        assert "not-the-pin" not in str(raised.value)
        open_token(t).close()  # the right PIN shares the login
        # The same module under another name is named, not loaded twice.
        other_name = tmp_path / "module.so"
        other_name.symlink_to(t.module)
        with pytest.raises(ConfigError, match="this process loaded that file as"):
            Token(TokenConfig(str(other_name), label=t.label, pin=b"not-the-pin"))
    assert _open_session_handles(t.module) == before


# python-pkcs11 finalises the key search that met the closed session in a
# __del__, which raises SessionHandleInvalid again ("Exception ignored").
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_logout_that_fails_on_one_session_still_ends_the_login(
    hsm: HsmSession,  # noqa: F811
) -> None:
    """A's first session goes invalid (an HSM expiring sessions); its reset
    must still end its login through another session, or a third Token
    with any PIN would share the login B keeps alive."""
    t = hsm.token()
    provisioned(t, {1: AUTH[1]}, {}).close()
    first, second = open_token(t), open_token(t)
    try:
        handle = first._sessions[0].session.handle  # type: ignore[attr-defined]
        assert softhsm.functions(t.module).call("C_CloseSession", handle) == 0
        with pytest.raises(TokenLoggedOut):
            first.ecb("iscl-auth-1", bytes(8))
        wrong = TokenConfig(str(t.module), label=t.label, pin=b"not-the-pin")
        with pytest.raises(TokenError, match="PIN was refused"):
            Token(wrong)
    finally:
        second.close()
        first.close()


def test_a_full_pool_waits_a_bounded_time(hsm: HsmSession) -> None:  # noqa: F811
    import threading

    from iscl_hw.errors import CardBusy

    token = provisioned(hsm.token(), {1: AUTH[1]}, {})
    config = token.config
    token.close()
    narrow = Token(
        TokenConfig(
            config.module,
            label=config.label,
            pin=config.pin,
            sessions=1,
            session_wait=0.2,
        )
    )
    with narrow:
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with narrow.session():
                held.set()
                release.wait(5)

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait(5)
        started = time.monotonic()
        with pytest.raises(CardBusy, match=r"no free session within 0\.2 s"):
            narrow.random(8)
        assert 0.15 < time.monotonic() - started < 2
        release.set()
        holder.join()
        assert len(narrow.random(8)) == 8


def test_hsm_commands_take_the_token_from_a_site_file(
    hsm: HsmSession,  # noqa: F811
    tmp_path: object,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pathlib import Path

    from iscl_hw import cli

    t = hsm.token("site")
    provisioned(t, {2: AUTH[2]}, {}).close()
    monkeypatch.setenv("SITE_TOKEN_PIN", t.pin.decode())
    site = Path(str(tmp_path)) / "site.toml"
    site.write_text(
        '[site]\nrole = "server"\nlisten = "127.0.0.1:0"\n\n'
        f'[card]\ntype = "pkcs11"\nmodule = "{t.module}"\n'
        f'label = "{t.label}"\npin_env = "SITE_TOKEN_PIN"\n'
    )
    assert cli.main(["hsm", "list", "--config", str(site)]) == 0
    out = capsys.readouterr().out
    assert "iscl-auth-2" in out
    assert f"token {t.label}: single DES runs as" in out
    assert cli.main(["hsm", "list"]) == 2
    assert "name the token" in capsys.readouterr().err
