from __future__ import annotations

import logging

import pytest

from iscl_hw import apdu
from iscl_hw.apdu import ApduFormatError, CommandApdu, ResponseApdu
from iscl_hw.card import ISCL_AID, ApduCard
from iscl_hw.errors import (
    AuthenticationBlocked,
    CardCommunicationError,
    CardError,
    LocalProtocolError,
    StatusWordError,
    VerificationFailed,
    WrongCardAnswer,
)

DATA = bytes(range(1, 9))

# (apdu, encoding, case): ISO/IEC 7816-4 5.1 Table 1.
ENCODINGS = [
    (CommandApdu(0, 0x84, 0, 0), "00840000", 1),
    (CommandApdu(0, 0x84, 0, 0, le=8), "0084000008", 2),
    (CommandApdu(0, 0x84, 0, 0, le=256), "0084000000", 2),
    (CommandApdu(0, 0x82, 0, 1, DATA), "0082000108" + DATA.hex(), 3),
    (CommandApdu(0, 0x88, 0, 1, DATA, 8), "0088000108" + DATA.hex() + "08", 4),
    (CommandApdu(0, 0x88, 0, 1, DATA, 256), "0088000108" + DATA.hex() + "00", 4),
    (CommandApdu(0, 0x84, 0, 0, le=8, extended=True), "00840000000008", 2),
    (CommandApdu(0, 0x84, 0, 0, le=65536), "00840000000000", 2),
    (CommandApdu(0, 0x84, 0, 0, le=257), "00840000000101", 2),
    (
        CommandApdu(0, 0x82, 0, 1, DATA, extended=True),
        "0082000100" + "0008" + DATA.hex(),
        3,
    ),
    (
        CommandApdu(0, 0x88, 0, 1, DATA, 65536, extended=True),
        "0088000100" + "0008" + DATA.hex() + "0000",
        4,
    ),
]


@pytest.mark.parametrize(("command", "hex_form", "case"), ENCODINGS)
def test_encode_decode_round_trip(
    command: CommandApdu, hex_form: str, case: int
) -> None:
    raw = bytes.fromhex(hex_form)
    assert command.encode() == raw
    assert command.case == case
    assert CommandApdu.decode(raw) == command


def test_le_absent_differs_from_le_00() -> None:
    assert CommandApdu.decode(bytes.fromhex("00840000")).le is None
    assert CommandApdu.decode(bytes.fromhex("0084000000")).le == 256


def test_extended_chosen_for_long_data() -> None:
    command = CommandApdu(0, 0xD6, 0, 0, bytes(300), le=256)
    assert command.extended
    raw = command.encode()
    assert raw[4:7] == bytes.fromhex("00012C")
    assert raw[-2:] == bytes.fromhex("0100")
    assert CommandApdu.decode(raw) == command


def test_forced_extended_case_1_is_bare_header() -> None:
    command = CommandApdu(0, 0x84, 0, 0, extended=True)
    assert command.encode() == bytes.fromhex("00840000")
    assert not command.extended


@pytest.mark.parametrize(
    ("hex_form", "problem"),
    [
        ("", "too short"),
        ("008400", "too short"),
        ("0082000108" + "0102", "inconsistent Lc"),
        ("00820001020102030405", "inconsistent Lc"),
        ("008400000000", "truncated"),
        ("00840000000000" + "01", "Lc of 0000"),
        ("0082000100000801020304", "inconsistent Lc"),
    ],
)
def test_decode_malformed(hex_form: str, problem: str) -> None:
    with pytest.raises(ApduFormatError, match=problem):
        CommandApdu.decode(bytes.fromhex(hex_form))


def test_apdu_format_error_is_a_communication_error() -> None:
    assert issubclass(ApduFormatError, CardCommunicationError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cla": 256},
        {"ins": -1},
        {"le": 0},
        {"le": 65537},
        {"data": bytes(65536)},
    ],
)
def test_construction_validates(kwargs: dict[str, int | bytes]) -> None:
    fields: dict[str, object] = {"cla": 0, "ins": 0x84, "p1": 0, "p2": 0}
    fields.update(kwargs)
    with pytest.raises(ValueError):
        CommandApdu(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", [b"", b"\x90"])
def test_response_parse_too_short(raw: bytes) -> None:
    with pytest.raises(CardCommunicationError, match="too short"):
        ResponseApdu.parse(raw)


def test_response_parse() -> None:
    resp = ResponseApdu.parse(bytes.fromhex("01029000"))
    assert resp == ResponseApdu(b"\x01\x02", 0x90, 0x00)
    assert resp.sw == 0x9000
    assert resp.encode() == bytes.fromhex("01029000")
    resp.check("GET CHALLENGE")


def test_check_63c2_keeps_retries() -> None:
    with pytest.raises(VerificationFailed) as info:
        ResponseApdu.from_sw(0x63C2).check("EXTERNAL AUTHENTICATE")
    assert info.value.retries_left == 2
    assert (info.value.sw1, info.value.sw2) == (0x63, 0xC2)
    assert "EXTERNAL AUTHENTICATE" in str(info.value)
    assert "2 tries left" in str(info.value)


def test_check_6300_has_no_retry_count() -> None:
    with pytest.raises(VerificationFailed) as info:
        ResponseApdu.from_sw(0x6300).check("VERIFY")
    assert info.value.retries_left is None


def test_check_6983_is_blocked() -> None:
    with pytest.raises(AuthenticationBlocked) as info:
        ResponseApdu.from_sw(0x6983).check("EXTERNAL AUTHENTICATE")
    assert info.value.sw == 0x6983
    assert "blocked" in str(info.value)


@pytest.mark.parametrize(
    ("sw", "meaning"),
    [
        (0x6700, "wrong length"),
        (0x6982, "security status"),
        (0x6985, "conditions of use"),
        (0x6A82, "not found"),
        (0x6A86, "P1-P2"),
        (0x6A88, "referenced data"),
        (0x6D00, "INS not supported"),
        (0x6E00, "CLA not supported"),
        (0x6581, "memory failure"),
        (0x6F00, "no precise diagnosis"),
        (0x6ABC, "unknown status word"),
    ],
)
def test_check_other_status_words(sw: int, meaning: str) -> None:
    with pytest.raises(StatusWordError, match=meaning) as info:
        ResponseApdu.from_sw(sw).check("SELECT")
    assert type(info.value) is StatusWordError
    assert info.value.sw == sw
    assert "SELECT" in str(info.value)


def test_builders() -> None:
    challenge = bytes(range(8))
    assert apdu.gen_select_aid_apdu(ISCL_AID).encode() == bytes.fromhex(
        "00A4040007F06973636C0001"
    )
    assert apdu.gen_get_challenge_apdu().encode() == bytes.fromhex("0084000008")
    assert apdu.gen_internal_authenticate_apdu(3, challenge).encode() == (
        bytes.fromhex("0088000308") + challenge + b"\x08"
    )
    external = apdu.gen_external_authenticate_apdu(3, challenge)
    assert external.encode() == bytes.fromhex("0082000308") + challenge
    assert external.case == 3
    assert apdu.gen_verify_apdu(b"1234").encode() == bytes.fromhex("002000800431323334")


def test_parsers_check_length() -> None:
    with pytest.raises(WrongCardAnswer, match="7 bytes, expected 8"):
        apdu.parse_get_challenge_resp(ResponseApdu(bytes(7), 0x90, 0), 8)
    with pytest.raises(WrongCardAnswer):
        apdu.parse_internal_authenticate_resp(ResponseApdu(bytes(9), 0x90, 0))
    with pytest.raises(WrongCardAnswer):
        apdu.parse_external_authenticate_resp(ResponseApdu(b"\x01", 0x90, 0))
    assert apdu.parse_get_challenge_resp(ResponseApdu(bytes(8), 0x90, 0)) == bytes(8)
    with pytest.raises(VerificationFailed):
        apdu.parse_external_authenticate_resp(ResponseApdu.from_sw(0x63C1))


def test_trace_redacts_verify() -> None:
    raw = apdu.gen_verify_apdu(b"SECRETPIN").encode()
    text = apdu.format_apdu_for_trace(raw)
    assert b"SECRETPIN".hex().upper() not in text.upper()
    assert "redacted" in text
    assert "SECRETPIN" not in repr(CommandApdu.decode(raw))
    assert b"SECRETPIN".hex() not in repr(CommandApdu.decode(raw)).lower()


def test_trace_redacts_unknown_commands_and_malformed() -> None:
    key_like = bytes.fromhex("0123456789ABCDEF")
    raw = CommandApdu(0x80, 0xD8, 0, 1, key_like).encode()  # e.g. PUT KEY
    assert "0123456789ABCDEF" not in apdu.format_apdu_for_trace(raw).upper()
    malformed = bytes.fromhex("00D8000109") + key_like
    assert "0123456789ABCDEF" not in apdu.format_apdu_for_trace(malformed).upper()


def test_trace_shows_challenge() -> None:
    raw = apdu.gen_external_authenticate_apdu(1, bytes.fromhex("A1B2C3D4E5F60718"))
    text = apdu.format_apdu_for_trace(raw.encode())
    assert "EXTERNAL AUTHENTICATE" in text
    assert "A1B2C3D4E5F60718" in text


# ------------------------------------------------------- ApduCard


class ScriptedTransport:
    """Answers from a script and records what was sent."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = [bytes.fromhex(a) for a in answers]
        self.sent: list[bytes] = []
        self.closed = False

    def transmit(self, command: bytes) -> bytes:
        self.sent.append(command)
        return self.answers.pop(0)

    def close(self) -> None:
        self.closed = True


def test_apdu_card_selects_and_verifies(caplog: pytest.LogCaptureFixture) -> None:
    transport = ScriptedTransport(["9000", "63C3", "9000"])
    with caplog.at_level(logging.DEBUG, logger="iscl_hw.card"):
        card = ApduCard(transport, pin=b"4711", name="test")
    assert transport.sent == [
        bytes.fromhex("00A4040007F06973636C0001"),
        bytes.fromhex("00200080"),  # tries left, using none
        bytes.fromhex("0020008004") + b"4711",
    ]
    assert "VERIFY" in caplog.text
    assert b"4711".hex() not in caplog.text
    assert "4711" not in caplog.text
    assert "ms)" in caplog.text
    card.close()
    assert transport.closed
    with pytest.raises(LocalProtocolError, match="closed"):
        card.get_challenge()


def test_apdu_card_follows_61xx_and_6cxx() -> None:
    transport = ScriptedTransport(["9000", "6C08", "0102030461 04", "050607089000"])
    card = ApduCard(transport)
    assert card.get_challenge() == bytes(range(1, 9))
    assert transport.sent[1:] == [
        bytes.fromhex("0084000008"),
        bytes.fromhex("0084000008"),
        bytes.fromhex("00C0000004"),
    ]


def test_apdu_card_validates_before_sending() -> None:
    transport = ScriptedTransport(["9000"])
    card = ApduCard(transport)
    with pytest.raises(LocalProtocolError):
        card.internal_authenticate(9, bytes(8))
    with pytest.raises(LocalProtocolError):
        card.internal_authenticate(0, bytes(8))
    with pytest.raises(LocalProtocolError):
        card.external_authenticate(1, bytes(7))
    assert len(transport.sent) == 1


def test_apdu_card_select_refused() -> None:
    with pytest.raises(StatusWordError, match="SELECT"):
        ApduCard(ScriptedTransport(["6A82"]))


def test_apdu_card_short_answer() -> None:
    transport = ScriptedTransport(["9000", "90"])
    card = ApduCard(transport)
    with pytest.raises(CardCommunicationError):
        card.get_challenge()


@pytest.mark.parametrize(
    ("status", "verifies"),
    [("63C3", True), ("63C2", True), ("6700", True), ("9000", True), ("63C1", False)],
)
def test_the_last_pin_try_is_never_spent(status: str, verifies: bool) -> None:
    """VERIFY without data first: with one try left (63C1) the PIN is not
    sent; a card that does not report its tries is verified as before."""
    transport = ScriptedTransport(["9000", status, "9000"])
    if verifies:
        ApduCard(transport, pin=b"4711")
        assert transport.sent[-1] == bytes.fromhex("0020008004") + b"4711"
    else:
        with pytest.raises(VerificationFailed, match="one PIN try left"):
            ApduCard(transport, pin=b"4711")
        assert len(transport.sent) == 2
        ApduCard(
            ScriptedTransport(["9000", status, "9000"]),
            pin=b"4711",
            allow_last_pin_try=True,
        )


def test_a_pin_is_not_sent_to_a_card_without_one() -> None:
    transport = ScriptedTransport(["9000", "6A88"])
    with pytest.raises(CardError, match="has no PIN, but a PIN was given"):
        ApduCard(transport, pin=b"4711")
    assert len(transport.sent) == 2  # SELECT and the status query only


def test_a_blocked_pin_is_reported_before_a_try() -> None:
    transport = ScriptedTransport(["9000", "6983"])
    with pytest.raises(AuthenticationBlocked):
        ApduCard(transport, pin=b"4711")
    assert len(transport.sent) == 2
