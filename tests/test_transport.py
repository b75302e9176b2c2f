"""The APDU quirk layer (iscl_hw.transport) over a scripted fake connection."""

from __future__ import annotations

import logging

import pytest

from iscl_hw import apdu
from iscl_hw.apdu import CommandApdu
from iscl_hw.card import ApduCard
from iscl_hw.errors import CardCommunicationError, StatusWordError
from iscl_hw.transport import (
    ApduLink,
    ExtendedLengthUnsupported,
    parse_atr,
)
from softcard.cardfile import CARD_PROFILES, new_card_state
from softcard.emulator import SoftCard
from softcard.profiles import PROFILE_ATRS, ProfiledCard


class FakeConnection:
    """Answers from a script (hex strings) and records every raw command."""

    def __init__(self, *answers: str | bytes) -> None:
        self.answers = [
            a if isinstance(a, bytes) else bytes.fromhex(a) for a in answers
        ]
        self.sent: list[bytes] = []

    def transmit(self, command: bytes) -> bytes:
        self.sent.append(command)
        if not self.answers:
            raise AssertionError(f"unexpected command {command.hex()}")
        return self.answers.pop(0)


def hexes(raw: list[bytes]) -> list[str]:
    return [r.hex().upper() for r in raw]


GET_CHALLENGE = apdu.gen_get_challenge_apdu(8)


# ------------------------------------------------------------------ 61xx


def test_61xx_chain_of_several_rounds() -> None:
    conn = FakeConnection("6104", "AABBCCDD6102", "EEFF6101", "119000")
    resp = ApduLink(conn).exchange(GET_CHALLENGE)
    assert resp.data == bytes.fromhex("AABBCCDDEEFF11")
    assert resp.sw == 0x9000
    assert hexes(conn.sent) == [
        "0084000008",
        "00C0000004",
        "00C0000002",
        "00C0000001",
    ]


def test_61xx_sw2_00_means_256() -> None:
    first, second = bytes(range(256)), b"\x01\x02"
    conn = FakeConnection("6100", first + b"\x61\x02", second + b"\x90\x00")
    resp = ApduLink(conn).exchange(apdu.gen_get_challenge_apdu(256))
    assert resp.data == first + second
    # Le 256 goes out as a short Le of 00, GET RESPONSE in the clear (CLA 00).
    assert hexes(conn.sent) == ["0084000000", "00C0000000", "00C0000002"]


def test_61xx_keeps_final_status_word() -> None:
    conn = FakeConnection("6102", "0102 6283".replace(" ", ""))
    resp = ApduLink(conn).exchange(GET_CHALLENGE)
    assert (resp.data, resp.sw) == (b"\x01\x02", 0x6283)


def test_61xx_rounds_are_bounded() -> None:
    conn = FakeConnection(*(["6101"] + ["0061 01".replace(" ", "")] * 10))
    with pytest.raises(CardCommunicationError, match="after 4 rounds"):
        ApduLink(conn, max_rounds=4).exchange(GET_CHALLENGE)
    assert len(conn.sent) == 5


def test_max_rounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_rounds"):
        ApduLink(FakeConnection(), max_rounds=0)


# ------------------------------------------------------------------ 6Cxx


def test_6cxx_resends_once_with_le() -> None:
    conn = FakeConnection("6C08", "01020304050607089000")
    resp = ApduLink(conn).exchange(apdu.gen_get_challenge_apdu(16))
    assert resp.data == bytes(range(1, 9))
    assert hexes(conn.sent) == ["0084000010", "0084000008"]


def test_6c00_means_256() -> None:
    conn = FakeConnection("6C00", bytes(256) + b"\x90\x00")
    ApduLink(conn).exchange(apdu.gen_get_challenge_apdu(8))
    assert hexes(conn.sent)[1] == "0084000000"


def test_6cxx_only_once() -> None:
    conn = FakeConnection("6C08", "6C04")
    resp = ApduLink(conn).exchange(GET_CHALLENGE)
    assert resp.sw == 0x6C04
    assert len(conn.sent) == 2
    with pytest.raises(StatusWordError, match="6C04"):
        resp.check("GET CHALLENGE")


def test_6cxx_case4_keeps_data() -> None:
    command = apdu.gen_internal_authenticate_apdu(1, bytes(8), 256)
    conn = FakeConnection("6C08", "11223344556677889000")
    ApduLink(conn).exchange(command)
    assert hexes(conn.sent) == [
        "0088000108000000000000000000",
        "0088000108000000000000000008",
    ]


def test_6cxx_then_61xx() -> None:
    conn = FakeConnection("6C08", "6108", "01020304050607089000")
    resp = ApduLink(conn).exchange(apdu.gen_get_challenge_apdu(4))
    assert resp.data == bytes(range(1, 9))
    assert hexes(conn.sent) == ["0084000004", "0084000008", "00C0000008"]


def test_case3_is_not_given_an_le() -> None:
    command = apdu.gen_external_authenticate_apdu(1, bytes(8))
    conn = FakeConnection("6C08")
    resp = ApduLink(conn).exchange(command)
    assert resp.sw == 0x6C08  # returned, not re-sent with an Le
    assert hexes(conn.sent) == ["00820001080000000000000000"]


# ---------------------------------------------------------- Le and cases


def test_le_absent_versus_le_00() -> None:
    absent = CommandApdu(0, 0xCA, 0, 0)
    le_00 = CommandApdu(0, 0xCA, 0, 0, le=256)
    conn = FakeConnection("9000", "9000")
    link = ApduLink(conn)
    link.exchange(absent)
    link.exchange(le_00)
    assert hexes(conn.sent) == ["00CA0000", "00CA000000"]
    assert CommandApdu.decode(conn.sent[0]).le is None
    assert CommandApdu.decode(conn.sent[1]).le == 256


def test_extended_le_0000_means_65536() -> None:
    command = CommandApdu(0, 0xCA, 0, 0, le=65536)
    conn = FakeConnection("9000")
    ApduLink(conn, extended_length=True).exchange(command)
    assert hexes(conn.sent) == ["00CA0000000000"]


DATA = bytes(range(5))
BIG = bytes(300)
CASES = [
    # (case, command, expected encoding)
    ("1", CommandApdu(0, 0xCA, 1, 2), "00CA0102"),
    ("2S", CommandApdu(0, 0xCA, 1, 2, le=16), "00CA010210"),
    ("3S", CommandApdu(0, 0xDA, 1, 2, DATA), "00DA0102050001020304"),
    ("4S", CommandApdu(0, 0x88, 1, 2, DATA, 8), "0088010205000102030408"),
    ("2E", CommandApdu(0, 0xCA, 1, 2, le=300), "00CA010200012C"),
    (
        "3E",
        CommandApdu(0, 0xDA, 1, 2, BIG),
        "00DA010200012C" + BIG.hex().upper(),
    ),
    (
        "4E",
        CommandApdu(0, 0x88, 1, 2, BIG, 1000),
        "0088010200012C" + BIG.hex().upper() + "03E8",
    ),
    (
        "4E forced",
        CommandApdu(0, 0x88, 1, 2, DATA, 8, extended=True),
        "00880102000005000102030400 08".replace(" ", ""),
    ),
]


@pytest.mark.parametrize(
    ("case", "command", "encoded"), CASES, ids=[c[0] for c in CASES]
)
def test_every_case_goes_out_as_encoded(
    case: str, command: CommandApdu, encoded: str
) -> None:
    conn = FakeConnection("9000")
    ApduLink(conn, extended_length=True).exchange(command)
    assert hexes(conn.sent) == [encoded]
    assert command.case == int(case[0])
    assert CommandApdu.decode(conn.sent[0]) == command


@pytest.mark.parametrize(
    ("case", "command", "encoded"), CASES, ids=[c[0] for c in CASES]
)
def test_extended_refused_before_sending_unless_announced(
    case: str, command: CommandApdu, encoded: str
) -> None:
    conn = FakeConnection("9000")
    link = ApduLink(conn, name="reader X")
    if not command.extended:
        link.exchange(command)
        assert hexes(conn.sent) == [encoded]
        return
    with pytest.raises(ExtendedLengthUnsupported, match="reader X"):
        link.exchange(command)
    assert conn.sent == []


# --------------------------------------------------------- broken answers


@pytest.mark.parametrize("answer", ["", "90"])
def test_short_response_is_an_error_not_indexerror(answer: str) -> None:
    with pytest.raises(CardCommunicationError, match="too short"):
        ApduLink(FakeConnection(answer)).exchange(GET_CHALLENGE)


def test_short_response_during_get_response() -> None:
    with pytest.raises(CardCommunicationError, match="too short"):
        ApduLink(FakeConnection("6104", "61")).exchange(GET_CHALLENGE)


def test_transport_oserror_becomes_card_error() -> None:
    class Broken:
        def transmit(self, command: bytes) -> bytes:
            raise ConnectionResetError(104, "Connection reset by peer")

    with pytest.raises(CardCommunicationError, match="reset by peer"):
        ApduLink(Broken(), name="c").exchange(GET_CHALLENGE)


def test_transport_non_bytes_is_refused() -> None:
    class Wrong:
        def transmit(self, command: bytes) -> bytes:
            return [0x90, 0x00]  # type: ignore[return-value]

    with pytest.raises(CardCommunicationError, match="not bytes"):
        ApduLink(Wrong()).exchange(GET_CHALLENGE)


# ------------------------------------------------------------------- trace


def test_trace_redacts_pin_and_shows_time(caplog: pytest.LogCaptureFixture) -> None:
    conn = FakeConnection("9000", "6102", "AABB9000")
    link = ApduLink(conn, name="tr")
    with caplog.at_level(logging.DEBUG, logger="iscl_hw.transport"):
        link.exchange(apdu.gen_verify_apdu(b"271828"))
        link.exchange(GET_CHALLENGE)
    assert "271828" not in caplog.text
    assert b"271828".hex() not in caplog.text.lower()
    assert "VERIFY" in caplog.text and "redacted" in caplog.text
    assert "GET RESPONSE" in caplog.text and "AABB" in caplog.text
    assert caplog.text.count(" ms)") == 3


def test_no_trace_above_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="iscl_hw.transport"):
        ApduLink(FakeConnection("9000")).exchange(GET_CHALLENGE)
    assert caplog.text == ""


# -------------------------------------------------------------------- ATR


def test_parse_atr_of_the_plain_softcard() -> None:
    info = parse_atr(SoftCard.ATR)
    assert info.protocols == (0, 1)
    assert info.default_protocol == 0
    assert info.historical == b""
    assert not info.extended_length


@pytest.mark.parametrize(
    ("profile", "protocols", "extended"),
    [
        ("plain", (0, 1), True),
        ("t0-getresponse", (0,), False),
        ("wrong-le", (1,), True),
        ("no-extended", (0, 1), False),
    ],
)
def test_parse_atr_of_each_profile(
    profile: str, protocols: tuple[int, ...], extended: bool
) -> None:
    info = parse_atr(PROFILE_ATRS[profile])
    assert info.protocols == protocols
    assert info.extended_length is extended


def test_parse_atr_status_indicator_category_00() -> None:
    # Category 00: compact-TLV, then a 3-byte status indicator.
    info = parse_atr(bytes.fromhex("3B 08 00 73 00 00 40 00 90 00".replace(" ", "")))
    assert info.extended_length
    assert info.protocols == (0,)


@pytest.mark.parametrize("raw", ["", "3B", "00 80", "3B 80", "3B 85 80 01 80"])
def test_parse_atr_rejects_garbage(raw: str) -> None:
    with pytest.raises(ValueError, match="ATR"):
        parse_atr(bytes.fromhex(raw.replace(" ", "")))


# ------------------------------------ ApduCard over each profile, in process


@pytest.mark.parametrize("profile", CARD_PROFILES)
def test_apdu_card_works_with_each_profile(profile: str) -> None:
    keys = {1: bytes.fromhex("0123456789ABCDEF")}
    soft = SoftCard(new_card_state(keys, profile=profile))
    card = ApduCard(ProfiledCard(soft, profile), name=profile)
    challenge = card.get_challenge()
    assert len(challenge) == 8
    assert len(card.internal_authenticate(1, challenge)) == 8
