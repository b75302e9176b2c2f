"""Card profiles: T=0 GET RESPONSE chains, 6Cxx, no extended length, ATRs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from iscl_hw.crypto import des_ecb_encrypt
from iscl_hw.errors import ConfigError, KeyFileError
from iscl_hw.keyfile import read_private_file, write_private_file
from softcard.cardfile import (
    CARD_PROFILES,
    create_card_file,
    load_card_file,
    new_card_state,
)
from softcard.emulator import SoftCard
from softcard.profiles import PROFILE_ATRS, ProfiledCard, open_card, wrap_card

KEY1 = bytes.fromhex("133457799BBCDFF1")
SELECT = "00A4040007F06973636C0001"
CHALLENGE = bytes.fromhex("0123456789ABCDEF")
EXTENDED_GET_CHALLENGE = "00840000000008"
EXTENDED_INT_AUTH = "0088000100000801234567 89ABCDEF0008"


def card_for(profile: str, *, select: bool = True) -> ProfiledCard:
    card = wrap_card(SoftCard(new_card_state({1: KEY1})), profile)
    if select:
        assert send(card, SELECT) == bytes.fromhex("9000")
    return card


def send(card: ProfiledCard, hex_form: str) -> bytes:
    return card.transmit(bytes.fromhex(hex_form.replace(" ", "")))


def sw_of(answer: bytes) -> str:
    return answer[-2:].hex().upper()


def get_response(card: ProfiledCard, le: int) -> bytes:
    return send(card, f"00C00000{le % 256:02X}")


# ----------------------------------------------------------------- ATRs


@dataclass
class ParsedAtr:
    protocols: list[int] = field(default_factory=list)
    interface: dict[str, int] = field(default_factory=dict)
    historical: bytes = b""
    tck: int | None = None


def parse_atr(atr: bytes) -> ParsedAtr:
    """ISO/IEC 7816-3 8.2, independently of the code under test."""
    assert atr[0] == 0x3B, "TS: direct convention"
    result = ParsedAtr()
    y, count = atr[1] >> 4, atr[1] & 0x0F
    pos, level = 2, 1
    while True:
        for bit, name in ((1, "TA"), (2, "TB"), (4, "TC")):
            if y & bit:
                result.interface[f"{name}{level}"] = atr[pos]
                pos += 1
        if not y & 8:
            break
        td = atr[pos]
        pos += 1
        result.interface[f"TD{level}"] = td
        result.protocols.append(td & 0x0F)
        y, level = td >> 4, level + 1
    result.historical = atr[pos : pos + count]
    pos += count
    if any(protocol != 0 for protocol in result.protocols):
        result.tck = atr[pos]
        pos += 1
        check = 0
        for byte in atr[1:pos]:
            check ^= byte
        assert check == 0, "TCK"
    assert pos == len(atr), "no bytes after the ATR"
    return result


def compact_tlv(historical: bytes) -> dict[int, bytes]:
    assert historical[0] == 0x80, "category indicator: COMPACT-TLV follows"
    objects, pos = {}, 1
    while pos < len(historical):
        tag, length = historical[pos] >> 4, historical[pos] & 0x0F
        objects[tag] = historical[pos + 1 : pos + 1 + length]
        pos += 1 + length
    assert pos == len(historical)
    return objects


def announces_extended(atr: bytes) -> bool:
    capabilities = compact_tlv(parse_atr(atr).historical).get(0x7)
    return (
        capabilities is not None
        and len(capabilities) >= 3
        and (capabilities[2] & 0x40 != 0)
    )


@pytest.mark.parametrize(
    ("profile", "protocols", "extended"),
    [
        ("plain", [0, 1], True),
        ("t0-getresponse", [], False),
        ("wrong-le", [1, 1], True),
        ("no-extended", [0, 1], False),
    ],
)
def test_atr_structure_and_capabilities(
    profile: str, protocols: list[int], extended: bool
) -> None:
    atr = PROFILE_ATRS[profile]
    parsed = parse_atr(atr)
    assert parsed.protocols == protocols
    assert (parsed.tck is None) == (protocols == [])  # T=0 only: no TCK
    assert announces_extended(atr) is extended
    assert card_for(profile, select=False).ATR == atr


def test_atr_bytes_are_the_documented_ones() -> None:
    assert {name: atr.hex(" ").upper() for name, atr in PROFILE_ATRS.items()} == {
        "plain": "3B 85 80 01 80 73 80 21 40 16",
        "t0-getresponse": "3B 03 80 31 80",
        "wrong-le": "3B 88 81 31 FE 45 80 73 80 21 40 82 90 00 83",
        "no-extended": "3B 85 80 01 80 73 80 21 00 56",
    }
    assert len(set(PROFILE_ATRS.values())) == len(PROFILE_ATRS)
    wrong_le = parse_atr(PROFILE_ATRS["wrong-le"])
    assert wrong_le.interface["TA3"] == 0xFE  # IFSC 254
    assert compact_tlv(wrong_le.historical)[0x8] == b"\x90\x00"


def test_reset_returns_the_profile_atr_and_forgets_selection() -> None:
    for profile in CARD_PROFILES:
        card = card_for(profile)
        assert card.reset() == PROFILE_ATRS[profile]
        assert sw_of(send(card, "0084000008")) == "6985"


# --------------------------------------------------------------- plain


def test_plain_answers_directly_and_accepts_extended() -> None:
    card = card_for("plain")
    answer = send(card, "0084000008")
    assert len(answer) == 10 and sw_of(answer) == "9000"
    answer = send(card, EXTENDED_GET_CHALLENGE)
    assert len(answer) == 10 and sw_of(answer) == "9000"
    answer = send(card, EXTENDED_INT_AUTH)
    assert answer == des_ecb_encrypt(KEY1, CHALLENGE) + b"\x90\x00"


# ------------------------------------------------------- t0-getresponse


def test_t0_holds_data_behind_61xx() -> None:
    card = card_for("t0-getresponse")
    assert send(card, "0084000008").hex().upper() == "6108"
    answer = get_response(card, 8)
    assert len(answer) == 10 and sw_of(answer) == "9000"
    challenge = answer[:-2]
    # The challenge handed out is the card's last challenge.
    response = des_ecb_encrypt(KEY1, challenge)
    assert send(card, "0082000108" + response.hex()).hex() == "9000"


def test_t0_case_4_and_responses_without_data() -> None:
    card = card_for("t0-getresponse")
    assert send(card, "0088000108" + CHALLENGE.hex() + "08").hex() == "6108"
    assert get_response(card, 8) == des_ecb_encrypt(KEY1, CHALLENGE) + b"\x90\x00"
    # No data: the status word comes at once.
    assert send(card, SELECT).hex() == "9000"
    assert send(card, "0082000108" + CHALLENGE.hex()).hex() == "6985"


def test_t0_several_rounds_with_256_bytes() -> None:
    card = card_for("t0-getresponse")
    assert send(card, "0084000000").hex().upper() == "6100"  # 256 waiting
    first = get_response(card, 100)
    assert len(first) == 102 and sw_of(first) == "619C"  # 156 left
    second = get_response(card, 100)
    assert len(second) == 102 and sw_of(second) == "6138"  # 56 left
    last = get_response(card, 256)  # Le larger than what waits
    assert len(last) == 58 and sw_of(last) == "9000"
    assert sw_of(get_response(card, 8)) == "6985"


def test_t0_256_bytes_in_one_get_response() -> None:
    card = card_for("t0-getresponse")
    assert send(card, "0084000000").hex().upper() == "6100"
    answer = get_response(card, 256)
    assert len(answer) == 258 and sw_of(answer) == "9000"


def test_t0_get_response_refusals() -> None:
    card = card_for("t0-getresponse")
    assert sw_of(get_response(card, 8)) == "6985"  # nothing waiting
    assert sw_of(send(card, "0084000008")) == "6108"
    assert sw_of(send(card, "00C0010008")) == "6A86"
    assert sw_of(send(card, "00C00000")) == "6700"  # no Le
    # Refusals leave the data waiting.
    assert sw_of(get_response(card, 8)) == "9000"


def test_t0_other_command_or_reset_drops_waiting_data() -> None:
    card = card_for("t0-getresponse")
    assert sw_of(send(card, "0084000008")) == "6108"
    assert sw_of(send(card, SELECT)) == "9000"
    assert sw_of(get_response(card, 8)) == "6985"
    assert sw_of(send(card, "0084000008")) == "6108"
    card.reset()
    assert sw_of(get_response(card, 8)) == "6985"


def test_t0_errors_pass_through_and_extended_refused() -> None:
    card = card_for("t0-getresponse", select=False)
    assert sw_of(send(card, "0084000008")) == "6985"
    assert sw_of(send(card, SELECT)) == "9000"
    assert send(card, EXTENDED_GET_CHALLENGE).hex() == "6700"


# ------------------------------------------------------------- wrong-le


def test_wrong_le_then_right_le() -> None:
    card = card_for("wrong-le")
    assert send(card, "0084000000").hex().upper() == "6C08"
    assert send(card, "0084000010").hex().upper() == "6C08"
    answer = send(card, "0084000008")
    assert len(answer) == 10 and sw_of(answer) == "9000"
    response = des_ecb_encrypt(KEY1, answer[:-2])
    assert send(card, "0082000108" + response.hex()).hex() == "9000"


def test_wrong_le_internal_authenticate() -> None:
    card = card_for("wrong-le")
    command = "0088000108" + CHALLENGE.hex()
    expected = des_ecb_encrypt(KEY1, CHALLENGE) + b"\x90\x00"
    assert send(card, command + "00").hex().upper() == "6C08"
    assert send(card, command + "08") == expected
    assert send(card, command) == expected  # case 3: no Le, nothing to check
    assert send(card, "0088000100000801234567 89ABCDEF0100").hex().upper() == "6C08"
    assert send(card, EXTENDED_INT_AUTH) == expected


def test_wrong_le_errors_are_not_hidden() -> None:
    card = card_for("wrong-le", select=False)
    assert sw_of(send(card, "0084000000")) == "6985"
    assert sw_of(send(card, SELECT + "00")) == "9000"  # no data: Le not checked
    assert sw_of(send(card, "0088000308" + CHALLENGE.hex() + "00")) == "6A88"


# ---------------------------------------------------------- no-extended


def test_no_extended_refuses_extended_apdus() -> None:
    card = card_for("no-extended")
    assert send(card, EXTENDED_GET_CHALLENGE).hex() == "6700"
    assert send(card, EXTENDED_INT_AUTH).hex() == "6700"
    answer = send(card, "0084000008")
    assert len(answer) == 10 and sw_of(answer) == "9000"


# ---------------------------------- every profile through a tolerant host


def host_transmit(card: ProfiledCard, hex_form: str) -> bytes:
    """What a host APDU layer does: 6Cxx once, then 61xx chains."""
    command = bytes.fromhex(hex_form)
    answer = card.transmit(command)
    if answer[-2] == 0x6C:
        answer = card.transmit(command[:-1] + answer[-1:])
    data = b""
    while answer[-2] == 0x61:
        data += answer[:-2]
        answer = card.transmit(bytes.fromhex("00C00000") + answer[-1:])
    return data + answer


@pytest.mark.parametrize("profile", CARD_PROFILES)
def test_mutual_authentication_on_every_profile(profile: str) -> None:
    card = card_for(profile, select=False)
    assert host_transmit(card, SELECT).hex() == "9000"
    challenge = host_transmit(card, "0084000008")
    assert len(challenge) == 10 and sw_of(challenge) == "9000"
    response = des_ecb_encrypt(KEY1, challenge[:-2])
    assert host_transmit(card, "0082000108" + response.hex()).hex() == "9000"
    answer = host_transmit(card, "0088000108" + CHALLENGE.hex() + "00")
    assert answer == des_ecb_encrypt(KEY1, CHALLENGE) + b"\x90\x00"


# ----------------------------------------------------------- card files


def test_open_card_applies_the_file_profile(tmp_path: Path) -> None:
    for profile in CARD_PROFILES:
        path = tmp_path / f"{profile}.json"
        create_card_file(path, {1: KEY1}, profile=profile)
        card = open_card(path)
        assert card.profile == profile
        assert card.ATR == PROFILE_ATRS[profile]
        assert load_card_file(path).profile == profile


def test_file_without_profile_is_plain(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    create_card_file(path, {1: KEY1})
    document = json.loads(read_private_file(path))
    del document["profile"]
    write_private_file(path, json.dumps(document).encode(), overwrite=True)
    assert load_card_file(path).profile == "plain"
    assert open_card(path).profile == "plain"


def test_profile_kept_when_counters_are_saved(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    create_card_file(path, {1: KEY1}, profile="wrong-le")
    card = open_card(path)
    assert sw_of(send(card, SELECT)) == "9000"
    assert sw_of(send(card, "0084000008")) == "9000"
    assert sw_of(send(card, "0082000108" + CHALLENGE.hex())) == "63C2"
    state = load_card_file(path)
    assert state.keys[1].remaining == 2 and state.profile == "wrong-le"


@pytest.mark.parametrize("value", ["t1", "", 3, None])
def test_unknown_profile_refused(tmp_path: Path, value: object) -> None:
    path = tmp_path / "card.json"
    create_card_file(path, {1: KEY1})
    document = json.loads(read_private_file(path))
    document["profile"] = value
    write_private_file(path, json.dumps(document).encode(), overwrite=True)
    with pytest.raises(KeyFileError, match="profile must be one of"):
        load_card_file(path)
    with pytest.raises(ConfigError, match="profile"):
        new_card_state({1: KEY1}, profile="t1")
    with pytest.raises(ValueError, match="profile"):
        wrap_card(SoftCard(new_card_state({1: KEY1})), "t1")
