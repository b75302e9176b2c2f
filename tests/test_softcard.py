from __future__ import annotations

import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from iscl_hw.card import ISCL_AID, ApduCard
from iscl_hw.crypto import des_ecb_encrypt
from iscl_hw.errors import (
    AuthenticationBlocked,
    CardError,
    KeyFileError,
    PinRefused,
    StatusWordError,
    VerificationFailed,
)
from softcard.cardfile import (
    create_card_file,
    load_card_file,
    new_card_state,
    save_card_file,
)
from softcard.emulator import SoftCard

KEY1 = bytes.fromhex("133457799BBCDFF1")
KEY2 = bytes.fromhex("0E329232EA6D0D73")
CHALLENGE = bytes.fromhex("0123456789ABCDEF")
SELECT = "00A4040007F06973636C0001"
PIN = b"1234"


def sw_of(answer: bytes) -> str:
    return answer[-2:].hex().upper()


def send(card: SoftCard, hex_form: str) -> bytes:
    return card.transmit(bytes.fromhex(hex_form.replace(" ", "")))


def fresh_card(*, pin: bytes | None = None, select: bool = True) -> SoftCard:
    card = SoftCard(new_card_state({1: KEY1, 2: KEY2}, pin=pin))
    if select:
        assert sw_of(send(card, SELECT)) == "9000"
    return card


def ext_auth(key_ref: int, response: bytes) -> str:
    return f"008200{key_ref:02X}08" + response.hex()


def int_auth(key_ref: int, challenge: bytes, le: str = "08") -> str:
    return f"008800{key_ref:02X}08" + challenge.hex() + le


def get_challenge(card: SoftCard) -> bytes:
    answer = send(card, "0084000008")
    assert sw_of(answer) == "9000"
    return answer[:-2]


CH = CHALLENGE.hex()

# (command, expected SW) on a selected card without PIN, keys 1 and 2.
STATUS_TABLE = [
    ("0084000008", "9000"),  # GET CHALLENGE
    ("0084000001", "9000"),
    ("0084000000", "9000"),  # Le 00 = 256
    ("0084010008", "6A86"),  # wrong P1
    ("0084000108", "6A86"),  # wrong P2
    ("00840000", "6700"),  # no Le
    ("008400000101", "6700"),  # data present
    ("00840000000200", "6700"),  # extended Le 512
    (int_auth(1, CHALLENGE), "9000"),
    (int_auth(1, CHALLENGE, ""), "9000"),  # no Le
    (int_auth(1, CHALLENGE, "00"), "9000"),
    (int_auth(1, CHALLENGE, "10"), "6700"),  # Le 16
    ("0088010108" + CH + "08", "6A86"),  # P1 01
    (int_auth(3, CHALLENGE), "6A88"),  # no key 3
    (int_auth(0, CHALLENGE), "6A88"),
    (int_auth(9, CHALLENGE), "6A88"),
    ("0088000107" + CH[:14] + "08", "6700"),  # 7 bytes of data
    ("0088000108" + CH + "0808", "6700"),  # inconsistent Lc
    ("0088000108", "6700"),  # Lc without data
    ("0088000100", "6700"),  # Le only, no data
    (ext_auth(1, CHALLENGE), "6985"),  # no challenge
    (ext_auth(1, CHALLENGE) + "08", "6700"),  # Le present
    ("0082000100", "6700"),  # no data
    ("0082000107" + CH[:14], "6700"),
    ("0082010108" + CH, "6A86"),
    (ext_auth(5, CHALLENGE), "6A88"),
    ("0020008004" + PIN.hex(), "6A88"),  # no PIN on this card
    ("00CA000000", "6D00"),  # unknown INS
    ("80840000 08", "6E00"),  # CLA 80
    ("0C84000008", "6E00"),  # CLA with secure messaging
    ("008400", "6700"),  # malformed: < 4 bytes
    ("", "6700"),
    ("00A4040007F06973636C0002", "6A82"),  # another AID
    ("00A4000007F06973636C0001", "6A86"),  # select by FID
    ("00A40400", "6700"),  # SELECT without AID
    ("00A4040C07F06973636C0001", "9000"),
    ("00A4040007F06973636C000100", "9000"),  # with Le
]


@pytest.mark.parametrize(("command", "expected"), STATUS_TABLE)
def test_status_words(command: str, expected: str) -> None:
    card = fresh_card()
    answer = send(card, command)
    assert sw_of(answer) == expected


@pytest.mark.parametrize(
    "command",
    ["0084000008", int_auth(1, CHALLENGE), ext_auth(1, CHALLENGE), "0020008000"],
)
def test_commands_before_select(command: str) -> None:
    card = fresh_card(select=False)
    assert sw_of(send(card, command)) == "6985"
    assert sw_of(send(card, "00CA000000")) == "6D00"


def test_get_challenge_lengths() -> None:
    card = fresh_card()
    assert len(send(card, "0084000008")) == 10
    assert len(send(card, "0084000000")) == 258
    assert len(send(card, "0084000001")) == 3
    first, second = get_challenge(card), get_challenge(card)
    assert first != second


def test_internal_authenticate_matches_openssl() -> None:
    # Independent computation of DES-ECB with the openssl command line.
    result = subprocess.run(
        [
            "openssl", "enc", "-des-ecb", "-nopad", "-K", KEY1.hex(),
            "-provider", "legacy", "-provider", "default",
        ],
        input=CHALLENGE,
        capture_output=True,
        check=True,
    )  # fmt: skip
    assert result.stdout == bytes.fromhex("85E813540F0AB405")
    answer = send(fresh_card(), int_auth(1, CHALLENGE))
    assert answer == result.stdout + b"\x90\x00"


def test_internal_authenticate_second_key() -> None:
    answer = send(fresh_card(), int_auth(2, CHALLENGE))
    assert answer[:-2] == des_ecb_encrypt(KEY2, CHALLENGE)


def test_external_authenticate_success_and_challenge_forgotten() -> None:
    card = fresh_card()
    challenge = get_challenge(card)
    response = des_ecb_encrypt(KEY1, challenge)
    assert sw_of(send(card, ext_auth(1, response))) == "9000"
    assert sw_of(send(card, ext_auth(1, response))) == "6985"


def test_challenge_forgotten_after_failed_attempt() -> None:
    card = fresh_card()
    challenge = get_challenge(card)
    assert sw_of(send(card, ext_auth(1, bytes(8)))) == "63C2"
    right = des_ecb_encrypt(KEY1, challenge)
    assert sw_of(send(card, ext_auth(1, right))) == "6985"


def test_challenge_forgotten_after_malformed_attempt() -> None:
    card = fresh_card()
    challenge = get_challenge(card)
    assert sw_of(send(card, ext_auth(1, bytes(8)) + "08")) == "6700"
    right = des_ecb_encrypt(KEY1, challenge)
    assert sw_of(send(card, ext_auth(1, right))) == "6985"


def test_internal_authenticate_keeps_challenge() -> None:
    card = fresh_card()
    challenge = get_challenge(card)
    assert sw_of(send(card, int_auth(2, CHALLENGE))) == "9000"
    right = des_ecb_encrypt(KEY1, challenge)
    assert sw_of(send(card, ext_auth(1, right))) == "9000"


def test_challenge_of_other_length_unusable() -> None:
    card = fresh_card()
    answer = send(card, "0084000010")
    assert sw_of(answer) == "9000"
    for response in (answer[:8], des_ecb_encrypt(KEY1, answer[:8])):
        send(card, "0084000010")
        assert sw_of(send(card, ext_auth(1, response))) == "6985"
    assert card.state.keys[1].remaining == 3


def test_select_forgets_challenge() -> None:
    card = fresh_card()
    challenge = get_challenge(card)
    send(card, SELECT)
    right = des_ecb_encrypt(KEY1, challenge)
    assert sw_of(send(card, ext_auth(1, right))) == "6985"


def test_counter_blocks_and_success_resets() -> None:
    card = fresh_card()
    for expected in ("63C2", "63C1"):
        get_challenge(card)
        assert sw_of(send(card, ext_auth(1, bytes(8)))) == expected
    challenge = get_challenge(card)
    assert sw_of(send(card, ext_auth(1, des_ecb_encrypt(KEY1, challenge)))) == "9000"
    assert card.state.keys[1].remaining == 3
    for expected in ("63C2", "63C1", "6983"):
        get_challenge(card)
        assert sw_of(send(card, ext_auth(1, bytes(8)))) == expected
    assert card.state.keys[1].remaining == 0
    challenge = get_challenge(card)
    assert sw_of(send(card, ext_auth(1, des_ecb_encrypt(KEY1, challenge)))) == "6983"
    assert sw_of(send(card, int_auth(1, CHALLENGE))) == "6983"
    # Key 2 has its own counter.
    challenge = get_challenge(card)
    assert sw_of(send(card, ext_auth(2, des_ecb_encrypt(KEY2, challenge)))) == "9000"


def test_counters_persist_in_card_file(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    create_card_file(path, {1: KEY1, 2: KEY2}, max_retries=4)
    card = SoftCard.from_file(path)
    send(card, SELECT)
    get_challenge(card)
    assert sw_of(send(card, ext_auth(2, bytes(8)))) == "63C3"
    assert load_card_file(path).keys[2].remaining == 3
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    reopened = SoftCard.from_file(path)
    send(reopened, SELECT)
    challenge = get_challenge(reopened)
    right = des_ecb_encrypt(KEY2, challenge)
    assert sw_of(send(reopened, ext_auth(2, right))) == "9000"
    assert load_card_file(path).keys[2].remaining == 4


def test_blocked_key_persists(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    create_card_file(path, {1: KEY1}, max_retries=1)
    card = SoftCard.from_file(path)
    send(card, SELECT)
    get_challenge(card)
    assert sw_of(send(card, ext_auth(1, bytes(8)))) == "6983"
    card = SoftCard.from_file(path)
    send(card, SELECT)
    assert sw_of(send(card, int_auth(1, CHALLENGE))) == "6983"


def test_unwritable_card_file_gives_memory_failure(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    create_card_file(path, {1: KEY1})
    card = SoftCard.from_file(path)
    send(card, SELECT)
    get_challenge(card)
    path.unlink()
    path.mkdir()  # os.replace onto a directory fails
    assert sw_of(send(card, ext_auth(1, bytes(8)))) == "6581"


def test_pin_flow() -> None:
    card = fresh_card(pin=PIN)
    assert sw_of(send(card, int_auth(1, CHALLENGE))) == "6982"
    get_challenge(card)
    assert sw_of(send(card, ext_auth(1, bytes(8)))) == "6982"
    assert sw_of(send(card, "00200080")) == "63C3"
    assert sw_of(send(card, "0020008004" + b"0000".hex())) == "63C2"
    assert sw_of(send(card, "0020018004" + PIN.hex())) == "6A86"
    assert sw_of(send(card, "0020008104" + PIN.hex())) == "6A88"
    assert sw_of(send(card, "0020008004" + PIN.hex() + "00")) == "6700"
    assert sw_of(send(card, "0020008004" + PIN.hex())) == "9000"
    assert card.state.pin is not None and card.state.pin.remaining == 3
    assert sw_of(send(card, "00200080")) == "9000"
    assert sw_of(send(card, int_auth(1, CHALLENGE))) == "9000"
    send(card, SELECT)  # a new selection drops the verified state
    assert sw_of(send(card, int_auth(1, CHALLENGE))) == "6982"


def test_pin_blocks(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    create_card_file(path, {1: KEY1}, pin=PIN, max_retries=2)
    card = SoftCard.from_file(path)
    send(card, SELECT)
    assert sw_of(send(card, "0020008004" + b"9999".hex())) == "63C1"
    assert sw_of(send(card, "0020008004" + b"9999".hex())) == "6983"
    assert sw_of(send(card, "0020008004" + PIN.hex())) == "6983"
    assert sw_of(send(card, "00200080")) == "6983"
    state = load_card_file(path)
    assert state.pin is not None and state.pin.remaining == 0


def test_card_file_has_no_pin(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    create_card_file(path, {1: KEY1}, pin=b"86427531")
    text = path.read_text()
    assert "86427531" not in text
    assert b"86427531".hex() not in text.lower()
    assert KEY1.hex().upper() in text


def test_card_file_mode_and_refusals(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    old_umask = os.umask(0)
    try:
        create_card_file(path, {1: KEY1})
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(KeyFileError, match="exists"):
        create_card_file(path, {1: KEY2})
    create_card_file(path, {1: KEY2}, overwrite=True)
    assert load_card_file(path).keys[1].key == KEY2
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600") as info:
        load_card_file(path)
    assert KEY2.hex() not in str(info.value).lower()
    with pytest.raises(KeyFileError):
        SoftCard.from_file(path)
    path.chmod(0o620)
    with pytest.raises(KeyFileError, match="group or other"):
        load_card_file(path)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda d: d.replace('"iscl-softcard"', '"other"'), "not an"),
        (lambda d: d.replace('"remaining": 3', '"remaining": 9', 1), "remaining"),
        (lambda d: d.replace('"max_retries": 3', '"max_retries": 0', 1), "max_retries"),
        (lambda d: d.replace('"1": {', '"9": {'), "1..8"),
        (lambda d: d.replace(KEY1.hex().upper(), "XYZ"), "16 hex digits"),
        (lambda d: d[:-5], "not valid JSON"),
    ],
)
def test_card_file_validation(tmp_path: Path, mutate: object, problem: str) -> None:
    path = tmp_path / "card.json"
    create_card_file(path, {1: KEY1})
    text = path.read_text()
    assert callable(mutate)
    path.write_text(mutate(text))
    with pytest.raises(KeyFileError, match=problem) as info:
        load_card_file(path)
    assert KEY1.hex() not in str(info.value).lower()


def test_repr_has_no_key() -> None:
    state = new_card_state({1: KEY1}, pin=PIN)
    text = repr(state) + repr(SoftCard(state))
    for secret in (KEY1.hex(), KEY1.hex().upper(), repr(KEY1), PIN.decode()):
        assert secret not in text
    assert state.pin is not None
    assert state.pin.salt.hex() not in text
    assert "remaining=3" in text


def test_save_card_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    state = new_card_state({1: KEY1, 8: KEY2}, pin=PIN, max_retries=5)
    state.keys[8].remaining = 2
    save_card_file(path, state)
    loaded = load_card_file(path)
    assert loaded == state
    assert loaded.aid == ISCL_AID


def test_apdu_card_over_softcard() -> None:
    soft = SoftCard(new_card_state({1: KEY1, 2: KEY2}, pin=PIN))
    card = ApduCard(soft, pin=PIN, name="local")
    assert card.internal_authenticate(1, CHALLENGE) == des_ecb_encrypt(KEY1, CHALLENGE)
    challenge = card.get_challenge()
    card.external_authenticate(2, des_ecb_encrypt(KEY2, challenge))
    card.get_challenge()
    with pytest.raises(VerificationFailed) as info:
        card.external_authenticate(2, bytes(8))
    assert info.value.retries_left == 2
    with pytest.raises(StatusWordError, match="conditions of use"):
        card.external_authenticate(2, bytes(8))
    card.close()


def test_apdu_card_wrong_pin_and_blocked() -> None:
    soft = SoftCard(new_card_state({1: KEY1}, pin=PIN, max_retries=1))
    with pytest.raises(AuthenticationBlocked):
        ApduCard(soft, pin=b"0000", allow_last_pin_try=True)
    with pytest.raises(AuthenticationBlocked):
        ApduCard(soft, pin=PIN)  # reported without a try


def test_apdu_card_keeps_the_last_pin_try() -> None:
    """Wrong PINs at every restart (a bad PIN file under a service manager)
    stop one try short of blocking the card."""
    soft = SoftCard(new_card_state({1: KEY1}, pin=PIN, max_retries=3))
    for _ in range(2):
        with pytest.raises(VerificationFailed):
            ApduCard(soft, pin=b"0000")
    for pin in (b"0000", PIN):
        with pytest.raises(VerificationFailed, match="one PIN try left"):
            ApduCard(soft, pin=pin)
    assert soft.state.pin is not None and soft.state.pin.remaining == 1
    ApduCard(soft, pin=PIN, allow_last_pin_try=True)
    assert soft.state.pin.remaining == 3


def test_apdu_card_refusals_are_typed() -> None:
    """A wrong PIN is PinRefused (and says the tries left); a PIN given for
    a card without one is not sent at all."""
    soft = SoftCard(new_card_state({1: KEY1}, pin=PIN, max_retries=3))
    with pytest.raises(PinRefused, match=r"VERIFY refused the PIN, .* 2 tries left"):
        ApduCard(soft, pin=b"0000")
    with pytest.raises(PinRefused, match="1 try left"):
        ApduCard(soft, pin=b"0000", allow_last_pin_try=True)

    no_pin = SoftCard(new_card_state({1: KEY1}))
    with pytest.raises(CardError, match="has no PIN, but a PIN was given"):
        ApduCard(no_pin, pin=PIN)


def test_transmit_is_thread_safe() -> None:
    card = fresh_card()
    errors: list[str] = []

    def worker() -> None:
        for _ in range(200):
            answer = send(card, int_auth(1, CHALLENGE))
            if answer[:-2] != bytes.fromhex("85E813540F0AB405"):
                errors.append(answer.hex())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_atr_and_reset() -> None:
    card = fresh_card()
    assert SoftCard.ATR == bytes.fromhex("3B80800101")
    assert card.reset() == SoftCard.ATR
    assert sw_of(send(card, "0084000008")) == "6985"
