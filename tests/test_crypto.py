from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from iscl_hw import crypto
from iscl_hw.crypto import (
    BLOCK_SIZE,
    MAC_KEY_VARIANT_MASK,
    AlreadyFinalized,
    CbcDecryptor,
    CbcEncryptor,
    CbcMac,
    InvalidMac,
    Md5Stream,
    Padding,
    PaddingError,
)

VECTORS = Path(__file__).parent / "vectors"
KEY = bytes.fromhex("0123456789abcdef")
IV = bytes.fromhex("1234567890abcdef")
CHUNK_SIZES = [1, 3, 7, 8, 13]


def load(name: str) -> list[dict[str, Any]]:
    with (VECTORS / name).open(encoding="utf-8") as f:
        vectors: list[dict[str, Any]] = json.load(f)["vectors"]
    return vectors


def vector_id(vector: dict[str, Any]) -> str:
    fields = ("mode", "key", "iv")
    text = "-".join(str(vector[f]) for f in fields if f in vector)
    data = vector.get("message", vector.get("plaintext", ""))
    return f"{text}-{len(data) // 2}B"


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


FIPS81 = load("fips81_des.json")
DES_CBC = load("des_cbc.json")
CBCMAC = load("cbcmac_des.json")
MD5 = load("md5_rfc1321.json")


def openssl_des(mode: str, key: str, iv: str | None, data: bytes) -> bytes:
    """Run the OpenSSL command line as an independent DES implementation."""
    # scripts/test.sh installs openssl, so its absence is a failure.
    assert shutil.which("openssl") is not None, "no openssl command"
    args = ["openssl", "enc", f"-des-{mode}", "-nopad", "-K", key]
    args += ["-iv", iv] if iv else []
    args += ["-provider", "legacy", "-provider", "default"]
    done = subprocess.run(args, input=data, capture_output=True, check=False)
    assert done.returncode == 0, "openssl has no legacy provider"
    return done.stdout


# ------------------------------------------------------- DES known answers


@pytest.mark.parametrize("vector", FIPS81, ids=vector_id)
def test_fips81_encrypt(vector: dict[str, Any]) -> None:
    key = bytes.fromhex(vector["key"])
    plaintext = bytes.fromhex(vector["plaintext"])
    if vector["mode"] == "ECB":
        ciphertext = crypto.des_ecb_encrypt(key, plaintext)
    else:
        ciphertext = crypto.des_cbc_encrypt(key, bytes.fromhex(vector["iv"]), plaintext)
    assert ciphertext.hex() == vector["ciphertext"]


@pytest.mark.parametrize("vector", FIPS81, ids=vector_id)
def test_fips81_decrypt(vector: dict[str, Any]) -> None:
    key = bytes.fromhex(vector["key"])
    ciphertext = bytes.fromhex(vector["ciphertext"])
    if vector["mode"] == "ECB":
        plaintext = crypto.des_ecb_decrypt(key, ciphertext)
    else:
        plaintext = crypto.des_cbc_decrypt(key, bytes.fromhex(vector["iv"]), ciphertext)
    assert plaintext == b"Now is the time for all "
    assert plaintext.hex() == vector["plaintext"]


@pytest.mark.parametrize("vector", FIPS81, ids=vector_id)
def test_fips81_matches_openssl(vector: dict[str, Any]) -> None:
    plaintext = bytes.fromhex(vector["plaintext"])
    out = openssl_des(vector["mode"].lower(), vector["key"], vector["iv"], plaintext)
    assert out.hex() == vector["ciphertext"]


def test_fips81_single_block_value() -> None:
    # The first ECB block, as also quoted in the middleware notes.
    assert crypto.des_ecb_encrypt(KEY, b"Now is t").hex() == "3fa40e8a984d4815"


@pytest.mark.parametrize("vector", DES_CBC, ids=vector_id)
def test_des_cbc_vectors(vector: dict[str, Any]) -> None:
    key, iv = bytes.fromhex(vector["key"]), bytes.fromhex(vector["iv"])
    plaintext = bytes.fromhex(vector["plaintext"])
    ciphertext = bytes.fromhex(vector["ciphertext"])
    assert crypto.des_cbc_encrypt(key, iv, plaintext) == ciphertext
    assert crypto.des_cbc_decrypt(key, iv, ciphertext) == plaintext


def test_ecb_is_cbc_with_zero_iv_per_block() -> None:
    block = bytes.fromhex("4e6f772069732074")
    assert crypto.des_ecb_encrypt(KEY, block) == crypto.des_cbc_encrypt(
        KEY, bytes(8), block
    )


@pytest.mark.parametrize(
    "function",
    [crypto.des_ecb_encrypt, crypto.des_ecb_decrypt],
)
@pytest.mark.parametrize("length", [1, 7, 9, 15])
def test_ecb_rejects_unaligned(
    function: Callable[[bytes, bytes], bytes], length: int
) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        function(KEY, bytes(length))


@pytest.mark.parametrize(
    "function",
    [crypto.des_cbc_encrypt, crypto.des_cbc_decrypt],
)
@pytest.mark.parametrize("length", [1, 7, 9, 15])
def test_cbc_rejects_unaligned(
    function: Callable[[bytes, bytes, bytes], bytes], length: int
) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        function(KEY, IV, bytes(length))


@pytest.mark.parametrize("iv", [b"", bytes(7), bytes(9), bytes(16)])
def test_cbc_rejects_bad_iv_length(iv: bytes) -> None:
    with pytest.raises(ValueError, match="IV must be 8 bytes"):
        crypto.des_cbc_encrypt(KEY, iv, bytes(8))


def test_cbc_rejects_iv_of_wrong_type() -> None:
    with pytest.raises(TypeError, match="IV must be bytes"):
        crypto.des_cbc_encrypt(KEY, "12345678", bytes(8))  # type: ignore[arg-type]


def test_empty_input_gives_empty_output() -> None:
    assert crypto.des_ecb_encrypt(KEY, b"") == b""
    assert crypto.des_cbc_encrypt(KEY, IV, b"") == b""
    assert crypto.des_cbc_decrypt(KEY, IV, b"") == b""


def test_no_warning_from_cryptography() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        crypto.des_ecb_encrypt(KEY, bytes(8))
        crypto.des_cbc_decrypt(KEY, IV, bytes(16))
        crypto.cbc_mac(KEY, b"abc")
        CbcEncryptor(KEY, IV).update(bytes(8))


# ------------------------------------------------------------------- MD5


@pytest.mark.parametrize("vector", MD5, ids=lambda v: repr(v["message"][:16]))
def test_md5_rfc1321(vector: dict[str, Any]) -> None:
    message = vector["message"].encode("ascii")
    assert crypto.md5(message).hex() == vector["digest"]


@pytest.mark.parametrize("size", CHUNK_SIZES)
@pytest.mark.parametrize("vector", MD5, ids=lambda v: repr(v["message"][:16]))
def test_md5_stream(vector: dict[str, Any], size: int) -> None:
    stream = Md5Stream()
    for piece in chunks(vector["message"].encode("ascii"), size):
        stream.update(piece)
    digest = stream.finalize()
    assert len(digest) == crypto.MD5_DIGEST_SIZE
    assert digest.hex() == vector["digest"]


def test_md5_stream_after_finalize() -> None:
    stream = Md5Stream()
    stream.finalize()
    with pytest.raises(AlreadyFinalized):
        stream.update(b"a")
    with pytest.raises(AlreadyFinalized):
        stream.finalize()


# --------------------------------------------------------------- CBC-MAC

PADDINGS = {"mac_m1": Padding.ISO9797_M1, "mac_m2": Padding.ISO9797_M2}


def mac_cases() -> list[Any]:
    return [
        pytest.param(v, field, id=f"{vector_id(v)}-{field}")
        for v in CBCMAC
        for field in PADDINGS
    ]


def test_cbcmac_vectors_cover_required_lengths() -> None:
    zero_iv = [v for v in CBCMAC if v["iv"] == "00" * 8]
    for key in {v["key"] for v in zero_iv}:
        lengths = {len(v["message"]) // 2 for v in zero_iv if v["key"] == key}
        assert {0, 7, 8, 15, 16, 100} <= lengths
    assert len({v["key"] for v in zero_iv}) >= 2


@pytest.mark.parametrize(("vector", "field"), mac_cases())
def test_cbc_mac_vectors(vector: dict[str, Any], field: str) -> None:
    key, iv = bytes.fromhex(vector["key"]), bytes.fromhex(vector["iv"])
    message = bytes.fromhex(vector["message"])
    mac = crypto.cbc_mac(key, message, padding=PADDINGS[field], iv=iv)
    assert mac.hex() == vector[field]


@pytest.mark.parametrize("size", CHUNK_SIZES)
@pytest.mark.parametrize(("vector", "field"), mac_cases())
def test_cbc_mac_stream_vectors(vector: dict[str, Any], field: str, size: int) -> None:
    key, iv = bytes.fromhex(vector["key"]), bytes.fromhex(vector["iv"])
    mac = CbcMac(key, padding=PADDINGS[field], iv=iv)
    for piece in chunks(bytes.fromhex(vector["message"]), size):
        mac.update(piece)
    assert mac.finalize().hex() == vector[field]


def test_cbc_mac_published_check_value() -> None:
    # DES_cbc_cksum check value of the SSLeay/OpenSSL DES self-test: the
    # 28 characters and their terminating NUL, zero padded, IV fedcba9876543210.
    message = b"7654321 Now is the time for \x00"
    iv = bytes.fromhex("fedcba9876543210")
    assert crypto.cbc_mac(KEY, message, iv=iv).hex() == "1d269397f7fe62b4"


@pytest.mark.parametrize("padding", list(Padding))
@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 16, 100])
def test_cbc_mac_is_last_cbc_block(padding: Padding, length: int) -> None:
    message = bytes(range(length))
    ciphertext = crypto.des_cbc_encrypt(KEY, bytes(8), crypto.pad(message, padding))
    assert crypto.cbc_mac(KEY, message, padding) == ciphertext[-8:]


def test_cbc_mac_default_is_method_1_with_zero_iv() -> None:
    message = b"Now is the time for all good men"
    expected = crypto.cbc_mac(KEY, message, Padding.ISO9797_M1, bytes(8))
    assert crypto.cbc_mac(KEY, message) == expected


def test_cbc_mac_method_1_ignores_trailing_zeros() -> None:
    # The known weakness of method 1, and why the two methods differ.
    m1, m2 = Padding.ISO9797_M1, Padding.ISO9797_M2
    assert crypto.cbc_mac(KEY, b"abc", m1) == crypto.cbc_mac(KEY, b"abc\0\0", m1)
    assert crypto.cbc_mac(KEY, b"abc", m2) != crypto.cbc_mac(KEY, b"abc\0\0", m2)
    assert crypto.cbc_mac(KEY, b"", m1) == crypto.cbc_mac(KEY, bytes(8), m1)


def test_cbc_mac_verify() -> None:
    tag = crypto.cbc_mac(KEY, b"payload")
    good = CbcMac(KEY)
    good.update(b"payload")
    good.verify(tag)
    bad = CbcMac(KEY)
    bad.update(b"payload")
    with pytest.raises(InvalidMac):
        bad.verify(bytes([tag[0] ^ 1]) + tag[1:])


@pytest.mark.parametrize("tag_length", [0, 4, 7, 9])
def test_cbc_mac_verify_wrong_length(tag_length: int) -> None:
    mac = CbcMac(KEY)
    tag = crypto.cbc_mac(KEY, b"")
    with pytest.raises(InvalidMac):
        mac.verify((tag * 2)[:tag_length])


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.update(b"x"),
        lambda m: m.finalize(),
        lambda m: m.verify(bytes(8)),
    ],
    ids=["update", "finalize", "verify"],
)
def test_cbc_mac_after_finalize(call: Callable[[CbcMac], object]) -> None:
    mac = CbcMac(KEY)
    mac.finalize()
    with pytest.raises(AlreadyFinalized):
        call(mac)


def test_cbc_mac_after_verify() -> None:
    mac = CbcMac(KEY)
    mac.verify(crypto.cbc_mac(KEY, b""))
    with pytest.raises(AlreadyFinalized):
        mac.update(b"")


def test_cbc_mac_rejects_bad_padding_argument() -> None:
    with pytest.raises(TypeError):
        CbcMac(KEY, padding="iso9797-1-m1")  # type: ignore[arg-type]


# -------------------------------------------------------- streaming CBC


def encrypt_in_chunks(data: bytes, size: int) -> tuple[bytes, list[bytes]]:
    encryptor = CbcEncryptor(KEY, IV)
    out, ivs = [], []
    for piece in chunks(data, size):
        out.append(encryptor.update(piece))
        ivs.append(encryptor.next_iv)
    out.append(encryptor.finalize())
    return b"".join(out), ivs


def decrypt_in_chunks(data: bytes, size: int) -> tuple[bytes, list[bytes]]:
    decryptor = CbcDecryptor(KEY, IV)
    out, ivs = [], []
    for piece in chunks(data, size):
        out.append(decryptor.update(piece))
        ivs.append(decryptor.next_iv)
    out.append(decryptor.finalize())
    return b"".join(out), ivs


def expected_ivs(ciphertext: bytes, size: int) -> list[bytes]:
    """IV after each chunk: the last whole ciphertext block so far."""
    ivs = []
    for end in range(size, len(ciphertext) + size, size):
        whole = min(end, len(ciphertext)) // 8 * 8
        ivs.append(ciphertext[whole - 8 : whole] if whole else IV)
    return ivs


@pytest.mark.parametrize("size", CHUNK_SIZES)
@pytest.mark.parametrize("length", [0, 8, 16, 24, 104])
def test_cbc_encryptor_matches_one_shot(size: int, length: int) -> None:
    plaintext = bytes(range(length))
    ciphertext = crypto.des_cbc_encrypt(KEY, IV, plaintext)
    streamed, ivs = encrypt_in_chunks(plaintext, size)
    assert streamed == ciphertext
    assert ivs == expected_ivs(ciphertext, size)


@pytest.mark.parametrize("size", CHUNK_SIZES)
@pytest.mark.parametrize("length", [0, 8, 16, 24, 104])
def test_cbc_decryptor_matches_one_shot(size: int, length: int) -> None:
    plaintext = bytes(range(length))
    ciphertext = crypto.des_cbc_encrypt(KEY, IV, plaintext)
    streamed, ivs = decrypt_in_chunks(ciphertext, size)
    assert streamed == plaintext
    assert ivs == expected_ivs(ciphertext, size)


@pytest.mark.parametrize("size", CHUNK_SIZES)
@pytest.mark.parametrize("vector", DES_CBC, ids=vector_id)
def test_streams_on_openssl_vectors(vector: dict[str, Any], size: int) -> None:
    key, iv = bytes.fromhex(vector["key"]), bytes.fromhex(vector["iv"])
    plaintext = bytes.fromhex(vector["plaintext"])
    encryptor, decryptor = CbcEncryptor(key, iv), CbcDecryptor(key, iv)
    ciphertext = b"".join(encryptor.update(p) for p in chunks(plaintext, size))
    ciphertext += encryptor.finalize()
    assert ciphertext.hex() == vector["ciphertext"]
    recovered = b"".join(decryptor.update(c) for c in chunks(ciphertext, size))
    assert recovered + decryptor.finalize() == plaintext


def test_streams_return_whole_blocks_at_once() -> None:
    encryptor, decryptor = CbcEncryptor(KEY, IV), CbcDecryptor(KEY, IV)
    assert encryptor.update(b"Now is ") == b""
    assert encryptor.next_iv == IV
    first = encryptor.update(b"th")
    assert first.hex() == "e5c7cdde872bf27c"
    assert encryptor.next_iv == first
    assert decryptor.update(first[:5]) == b""
    assert decryptor.next_iv == IV
    assert decryptor.update(first[5:]) == b"Now is t"
    assert decryptor.next_iv == first


def test_next_iv_continues_the_chain() -> None:
    plaintext = bytes(range(64))
    head = CbcEncryptor(KEY, IV)
    first = head.update(plaintext[:40]) + head.finalize()
    tail = CbcEncryptor(KEY, head.next_iv)
    second = tail.update(plaintext[40:]) + tail.finalize()
    assert first + second == crypto.des_cbc_encrypt(KEY, IV, plaintext)


@pytest.mark.parametrize("cls", [CbcEncryptor, CbcDecryptor])
def test_stream_finalize_rejects_partial_block(
    cls: type[CbcEncryptor | CbcDecryptor],
) -> None:
    stream = cls(KEY, IV)
    stream.update(bytes(12))
    with pytest.raises(ValueError, match="multiple of 8"):
        stream.finalize()
    with pytest.raises(AlreadyFinalized):
        stream.update(bytes(4))


@pytest.mark.parametrize("cls", [CbcEncryptor, CbcDecryptor])
def test_stream_after_finalize(cls: type[CbcEncryptor | CbcDecryptor]) -> None:
    stream = cls(KEY, IV)
    assert stream.finalize() == b""
    with pytest.raises(AlreadyFinalized):
        stream.update(bytes(8))
    with pytest.raises(AlreadyFinalized):
        stream.finalize()


def test_streams_accept_memoryview() -> None:
    plaintext = bytes(range(24))
    encryptor = CbcEncryptor(KEY, IV)
    ciphertext = encryptor.update(memoryview(plaintext)[:13])  # type: ignore[arg-type]
    ciphertext += encryptor.update(memoryview(plaintext)[13:])  # type: ignore[arg-type]
    assert ciphertext == crypto.des_cbc_encrypt(KEY, IV, plaintext)
    decryptor = CbcDecryptor(KEY, IV)
    view = memoryview(ciphertext)
    recovered = b"".join(
        decryptor.update(view[start : start + 3])  # type: ignore[arg-type]
        for start in range(0, len(ciphertext), 3)
    )
    assert recovered + decryptor.finalize() == plaintext
    assert decryptor.next_iv == ciphertext[-8:]
    assert isinstance(decryptor.next_iv, bytes)


def test_large_message_streams() -> None:
    message = bytes(range(256)) * 4096  # 1 MiB
    ciphertext = crypto.des_cbc_encrypt(KEY, IV, message)
    encryptor, decryptor = CbcEncryptor(KEY, IV), CbcDecryptor(KEY, IV)
    mac = CbcMac(KEY, Padding.ISO9797_M2)
    out, back = [], []
    for piece in chunks(message, 8160):
        out.append(encryptor.update(piece))
        mac.update(piece)
    out.append(encryptor.finalize())
    assert b"".join(out) == ciphertext
    for piece in chunks(ciphertext, 8160):
        back.append(decryptor.update(piece))
    back.append(decryptor.finalize())
    assert b"".join(back) == message
    assert mac.finalize() == crypto.cbc_mac(KEY, message, Padding.ISO9797_M2)


# ---------------------------------------------------------------- padding


@pytest.mark.parametrize("padding", [Padding.PKCS5, Padding.ISO9797_M2])
@pytest.mark.parametrize("length", range(18))
def test_padding_round_trip(padding: Padding, length: int) -> None:
    data = bytes([0x80]) * length  # bytes that look like padding
    padded = crypto.pad(data, padding)
    assert len(padded) % BLOCK_SIZE == 0
    assert len(data) < len(padded) <= len(data) + BLOCK_SIZE
    assert padded.startswith(data)
    assert len(padded) == crypto.padded_length(length, padding)
    assert crypto.unpad(padded, padding) == data


PADDING_LAYOUTS = [
    (Padding.PKCS5, b"", "0808080808080808"),
    (Padding.PKCS5, b"\x01" * 7, "0101010101010101"),
    (Padding.PKCS5, b"\x01" * 5, "0101010101030303"),
    (Padding.PKCS5, b"\x01" * 8, "0101010101010101" + "0808080808080808"),
    (Padding.ISO9797_M2, b"", "8000000000000000"),
    (Padding.ISO9797_M2, b"\x01" * 7, "0101010101010180"),
    (Padding.ISO9797_M2, b"\x01" * 5, "0101010101800000"),
    (Padding.ISO9797_M2, b"\x01" * 8, "0101010101010101" + "8000000000000000"),
    (Padding.ISO9797_M1, b"", "0000000000000000"),
    (Padding.ISO9797_M1, b"\x01" * 7, "0101010101010100"),
    (Padding.ISO9797_M1, b"\x01" * 5, "0101010101000000"),
    (Padding.ISO9797_M1, b"\x01" * 8, "0101010101010101"),
    (Padding.ISO9797_M1, b"\x01" * 9, "0101010101010101" + "0100000000000000"),
]


@pytest.mark.parametrize(("padding", "data", "padded"), PADDING_LAYOUTS)
def test_padding_layout(padding: Padding, data: bytes, padded: str) -> None:
    assert crypto.pad(data, padding).hex() == padded


@pytest.mark.parametrize(
    ("n", "pkcs5", "m1", "m2"),
    [(0, 8, 8, 8), (1, 8, 8, 8), (7, 8, 8, 8), (8, 16, 8, 16), (9, 16, 16, 16)],
)
def test_padded_length(n: int, pkcs5: int, m1: int, m2: int) -> None:
    assert crypto.padded_length(n, Padding.PKCS5) == pkcs5
    assert crypto.padded_length(n, Padding.ISO9797_M1) == m1
    assert crypto.padded_length(n, Padding.ISO9797_M2) == m2


def test_padded_length_rejects_negative() -> None:
    with pytest.raises(ValueError):
        crypto.padded_length(-1, Padding.PKCS5)


def test_iso9797_m1_cannot_be_removed() -> None:
    with pytest.raises(ValueError, match="cannot remove") as info:
        crypto.unpad(bytes(8), Padding.ISO9797_M1)
    assert not isinstance(info.value, PaddingError)


BAD_PKCS5 = [
    "",
    "01",
    "01010101010101",
    "010101010101010101",
    "0000000000000000",
    "0101010101010109",
    "01010101010101ff",
    "0101010101020303",
    "0101010101010802",
    "0707070707070708",
    "0808080808080808" + "0808080808080807",
]

BAD_M2 = [
    "",
    "80",
    "01010101010180",
    "018000000000000000",
    "0000000000000000",
    "0000000000000000" + "0000000000000000",
    "0101010101010101",
    "8000000000000001",
    "0101010101018001",
    "7f00000000000000",
    "8100000000000000",
]


@pytest.mark.parametrize("data", BAD_PKCS5)
def test_invalid_pkcs5_padding(data: str) -> None:
    with pytest.raises(PaddingError) as info:
        crypto.unpad(bytes.fromhex(data), Padding.PKCS5)
    assert data not in str(info.value) or not data


@pytest.mark.parametrize("data", BAD_M2)
def test_invalid_iso9797_m2_padding(data: str) -> None:
    with pytest.raises(PaddingError) as info:
        crypto.unpad(bytes.fromhex(data), Padding.ISO9797_M2)
    assert data not in str(info.value) or not data


def test_valid_edge_paddings() -> None:
    full = bytes([8]) * 8
    assert crypto.unpad(full, Padding.PKCS5) == b""
    assert crypto.unpad(b"\x80" + bytes(7), Padding.ISO9797_M2) == b""
    assert crypto.unpad(bytes(7) + b"\x80", Padding.ISO9797_M2) == bytes(7)
    assert crypto.unpad(bytes(7) + b"\x01", Padding.PKCS5) == bytes(7)


def test_padding_error_is_value_error() -> None:
    assert issubclass(PaddingError, ValueError)


def test_pad_rejects_non_padding() -> None:
    with pytest.raises(TypeError):
        crypto.pad(b"", "pkcs5")  # type: ignore[arg-type]


# ------------------------------------------------------------------- keys


@pytest.mark.parametrize("length", [0, 7, 9, 16, 24])
def test_check_key_rejects_length(length: int) -> None:
    key = bytes(range(0xA0, 0xA0 + length))
    with pytest.raises(ValueError) as info:
        crypto.check_key(key)
    assert_no_key_in(str(info.value), key)


@pytest.mark.parametrize(
    "key", [bytearray(KEY), KEY.hex(), None, 0x0123456789ABCDEF, memoryview(KEY)]
)
def test_check_key_rejects_type(key: object) -> None:
    with pytest.raises(TypeError) as info:
        crypto.check_key(key)  # type: ignore[arg-type]
    assert_no_key_in(str(info.value), KEY)


def assert_no_key_in(text: str, key: bytes) -> None:
    assert key.hex() not in text.lower() or not key
    assert repr(key) not in text or not key


@pytest.mark.parametrize("length", [16, 24])
def test_functions_refuse_multi_des_keys(length: int) -> None:
    key = bytes(range(length))
    with pytest.raises(ValueError):
        crypto.des_ecb_encrypt(key, bytes(8))
    with pytest.raises(ValueError):
        crypto.cbc_mac(key, b"")
    with pytest.raises(ValueError):
        CbcEncryptor(key, IV)


def test_check_key_returns_key() -> None:
    assert crypto.check_key(KEY) is KEY


def test_no_key_in_repr() -> None:
    key = bytes.fromhex("a1b2c3d4e5f60718")
    for obj in (CbcMac(key), CbcEncryptor(key, IV), CbcDecryptor(key, IV)):
        text = repr(obj)
        assert key.hex() not in text.lower()
        assert not hasattr(obj, "__dict__")


@pytest.mark.parametrize(
    ("key", "fixed"),
    [
        ("0000000000000000", "0101010101010101"),
        ("ffffffffffffffff", "fefefefefefefefe"),
        ("0123456789abcdef", "0123456789abcdef"),
        ("0022446688aaccee", "0123456789abcdef"),
        ("133457799bbcdff1", "133457799bbcdff1"),
        ("123456789abcdef0", "133457799bbcdff1"),
    ],
)
def test_fix_parity(key: str, fixed: str) -> None:
    assert crypto.fix_parity(bytes.fromhex(key)).hex() == fixed


def test_fix_parity_all_bytes() -> None:
    for value in range(256):
        fixed = crypto.fix_parity(bytes([value]) * 8)[0]
        assert fixed.bit_count() % 2 == 1
        assert fixed & 0xFE == value & 0xFE


def test_des_ignores_parity_bits() -> None:
    key = bytes.fromhex("0022446688aaccee")
    block = b"Now is t"
    assert crypto.des_ecb_encrypt(key, block) == crypto.des_ecb_encrypt(
        crypto.fix_parity(key), block
    )


def test_key_variant() -> None:
    variant = crypto.key_variant(KEY, MAC_KEY_VARIANT_MASK)
    assert variant.hex() == "f1d3b597795b3d1f"
    assert crypto.key_variant(variant, MAC_KEY_VARIANT_MASK) == KEY
    assert crypto.fix_parity(variant) == variant
    assert crypto.cbc_mac(variant, b"x") != crypto.cbc_mac(KEY, b"x")


@pytest.mark.parametrize("mask", [bytes(7), bytes(9)])
def test_key_variant_rejects_bad_mask_length(mask: bytes) -> None:
    with pytest.raises(ValueError):
        crypto.key_variant(KEY, mask)


def test_key_variant_rejects_bad_mask_type() -> None:
    with pytest.raises(TypeError):
        crypto.key_variant(KEY, "F0" * 8)  # type: ignore[arg-type]


def test_constant_time_equal() -> None:
    assert crypto.constant_time_equal(b"abc", b"abc")
    assert not crypto.constant_time_equal(b"abc", b"abd")
    assert not crypto.constant_time_equal(b"abc", b"abcd")


def test_weak_des_keys_fips74() -> None:
    # FIPS 74 section 3.6: the four weak keys, two semi-weak pairs' members.
    for weak in (
        "0101010101010101",
        "FEFEFEFEFEFEFEFE",
        "1F1F1F1F0E0E0E0E",
        "E0E0E0E0F1F1F1F1",
        "01FE01FE01FE01FE",
        "E0FEE0FEF1FEF1FE",
    ):
        assert crypto.is_weak_key(bytes.fromhex(weak))
    assert crypto.is_weak_key(bytes(8))  # parity bits are ignored
    assert not crypto.is_weak_key(bytes.fromhex("0123456789ABCDEF"))
