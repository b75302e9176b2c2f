from __future__ import annotations

import argparse
import io
import json
import os
import stat
from pathlib import Path

import pytest

from iscl_hw import cli_card
from iscl_hw.errors import ConfigError, KeyFileError
from iscl_hw.keyfile import (
    KeyStore,
    load_key_file,
    parse_key_material,
    read_private_file,
    write_key_file,
    write_private_file,
)
from softcard.cardfile import load_card_file

AUTH1 = "133457799BBCDFF1"
AUTH2 = "0E329232EA6D0D73"
ENC1 = "A1A2A3A4A5A6A7A8"
ENC2 = "0F1E2D3C4B5A6978"
SECRETS = (AUTH1, AUTH2, ENC1, ENC2)

MATERIAL = f"""\
# ISCL keys for the test site
auth.1 = {AUTH1}
auth.2={AUTH2.lower()}   # trailing comment

enc.1 = {ENC1}
\tenc.2 =  {ENC2}
"""


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text.upper()


def test_parse_key_material() -> None:
    auth, enc = parse_key_material(MATERIAL)
    assert auth == {1: bytes.fromhex(AUTH1), 2: bytes.fromhex(AUTH2)}
    assert enc == {1: bytes.fromhex(ENC1), 2: bytes.fromhex(ENC2)}


def test_parse_empty_material() -> None:
    assert parse_key_material("# nothing\n\n") == ({}, {})


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        (f"auth.1 = {AUTH1}\nmac.1 = {ENC1}\n", 2, "expected 'auth.N"),
        (f"auth.9 = {AUTH1}\n", 1, "1..8"),
        (f"auth.0 = {AUTH1}\n", 1, "1..8"),
        (f"\n\nenc.3 = {ENC1}00\n", 3, "16 hex digits"),
        (f"enc.3 = {ENC1[:-1]}\n", 1, "16 hex digits"),
        (f"enc.3 = {ENC1[:-1]}G\n", 1, "16 hex digits"),
        ("enc.3 =\n", 1, "16 hex digits"),
        (f"auth.1 = {AUTH1}\nauth.1 = {AUTH2}\n", 2, "twice"),
        (f"{AUTH1}\n", 1, "expected"),
        (f"auth.1 = {AUTH1} {ENC1}\n", 1, "expected"),
        (f"AUTH.1 = {AUTH1}\n", 1, "expected"),
        (f"auth.1234 = {AUTH1}\n", 1, "expected"),
    ],
)
def test_parse_errors_name_line_not_key(text: str, line: int, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        parse_key_material(text)
    message = str(info.value)
    assert message.startswith(f"line {line}:")
    assert_no_secret(message)


def test_key_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys = {1: bytes.fromhex(ENC1), 8: bytes.fromhex(ENC2)}
    write_key_file(path, keys)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    store = load_key_file(path)
    assert store.indexes == (1, 8)
    assert store.get(8) == bytes.fromhex(ENC2)
    assert 1 in store and 2 not in store and len(store) == 2
    with pytest.raises(ConfigError, match="index 2"):
        store.get(2)
    assert_no_secret(repr(store))
    assert repr(store) == "KeyStore(indexes=[1, 8])"


def test_key_file_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    write_key_file(path, {1: bytes.fromhex(ENC1)})
    with pytest.raises(KeyFileError, match="already exists"):
        write_key_file(path, {1: bytes.fromhex(ENC2)})
    assert load_key_file(path).get(1) == bytes.fromhex(ENC1)
    write_key_file(path, {1: bytes.fromhex(ENC2)}, overwrite=True)
    assert load_key_file(path).get(1) == bytes.fromhex(ENC2)
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o602])
def test_key_file_permissions_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "keys.json"
    write_key_file(path, {1: bytes.fromhex(ENC1)})
    path.chmod(mode)
    with pytest.raises(KeyFileError, match=f"mode {mode:04o}"):
        load_key_file(path)


def test_private_file_under_permissive_umask(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    old_umask = os.umask(0)
    try:
        write_private_file(path, b"data", overwrite=False)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_private_file(path) == b"data"


def test_a_private_file_of_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its owner could put a PIN or keys of their choosing in it."""
    path = tmp_path / "card.pin"
    write_private_file(path, b"1234\n", overwrite=False)
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)  # nobody
    else:
        real = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: real + 1)
    with pytest.raises(KeyFileError, match="belongs to another user"):
        read_private_file(path)


def test_read_private_file_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        read_private_file(tmp_path / "missing")
    with pytest.raises(KeyFileError, match="regular file"):
        read_private_file(tmp_path)


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"format": "iscl-keys", "version": 2, "keys": {}}, "version"),
        ({"format": "other", "version": 1, "keys": {}}, "not an"),
        ({"format": "iscl-keys", "version": 1, "keys": []}, "object"),
        ({"format": "iscl-keys", "version": 1, "keys": {"9": ENC1}}, "1..8"),
        ({"format": "iscl-keys", "version": 1, "keys": {"1": ENC1[:-2]}}, "16 hex"),
        ([ENC1], "top level"),
    ],
)
def test_key_file_validation(tmp_path: Path, document: object, problem: str) -> None:
    path = tmp_path / "keys.json"
    write_private_file(path, json.dumps(document).encode(), overwrite=False)
    with pytest.raises(KeyFileError, match=problem) as info:
        load_key_file(path)
    assert_no_secret(str(info.value))


def test_invalid_json_message_has_no_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    write_private_file(path, f'{{"keys": {{"1": "{ENC1}"'.encode(), overwrite=False)
    with pytest.raises(KeyFileError, match="not valid JSON") as info:
        load_key_file(path)
    assert_no_secret(str(info.value))


def test_key_store_validates() -> None:
    with pytest.raises(ConfigError):
        KeyStore({9: bytes(8)})
    with pytest.raises(ConfigError):
        KeyStore({1: bytes(7)})


# ------------------------------------------------------------ iscl card


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="iscl")
    cli_card.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result = args.func(args)
    assert isinstance(result, int)
    return result


def test_card_init_from_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    card, keys = tmp_path / "card.json", tmp_path / "keys.json"
    monkeypatch.setattr("sys.stdin", io.StringIO(MATERIAL))
    monkeypatch.setenv("TEST_ISCL_PIN", "2468")
    argv = ["card", "init", str(card), "--key-file", str(keys)]
    assert run_cli([*argv, "--pin-env", "TEST_ISCL_PIN", "--max-retries", "5"]) == 0
    out = capsys.readouterr()
    assert "authentication keys 1, 2" in out.out
    assert "encryption keys 1, 2" in out.out
    assert "PIN set" in out.out
    assert_no_secret(out.out + out.err)
    assert "2468" not in out.out
    state = load_card_file(card)
    assert state.keys[2].key == bytes.fromhex(AUTH2)
    assert state.keys[1].max_retries == 5 and state.pin is not None
    assert load_key_file(keys).get(2) == bytes.fromhex(ENC2)
    assert stat.S_IMODE(card.stat().st_mode) == 0o600

    assert run_cli(["card", "info", str(card)]) == 0
    info = capsys.readouterr().out
    assert "key 1: 5/5 tries left" in info
    assert "PIN: set" in info
    assert_no_secret(info)

    monkeypatch.setattr("sys.stdin", io.StringIO(MATERIAL))
    assert run_cli(argv) == 2
    assert "--force" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(MATERIAL))
    assert run_cli([*argv, "--force"]) == 0
    assert load_card_file(card).pin is None


def test_card_init_from_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    material, pin_file = tmp_path / "material.txt", tmp_path / "pin"
    material.write_text(MATERIAL)
    pin_file.write_bytes(b"97531\n")
    card, keys = tmp_path / "card.json", tmp_path / "keys.json"
    argv = ["card", "init", str(card), "--key-file", str(keys)]
    argv += ["--keys-from", str(material), "--pin-file", str(pin_file)]
    # Key material or a PIN file others can read is refused, as a key file.
    material.chmod(0o644)
    pin_file.chmod(0o600)
    assert run_cli(argv) == 2
    assert "key material: " in capsys.readouterr().err
    material.chmod(0o600)
    pin_file.chmod(0o644)
    assert run_cli(argv) == 2
    assert "PIN file: " in capsys.readouterr().err
    assert not card.exists()
    pin_file.chmod(0o600)
    assert run_cli(argv) == 0
    assert "97531" not in capsys.readouterr().out
    pin = load_card_file(card).pin
    assert pin is not None and pin.matches(b"97531")
    assert load_key_file(keys).indexes == (1, 2)


def test_card_init_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    card, keys = tmp_path / "card.json", tmp_path / "keys.json"
    argv = ["card", "init", str(card), "--key-file", str(keys)]
    bad = f"auth.1 = {AUTH1}\nenc.1 = {ENC1}x\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(bad))
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert "line 2" in err
    assert_no_secret(err)
    assert not card.exists() and not keys.exists()

    monkeypatch.setattr("sys.stdin", io.StringIO(f"auth.1 = {AUTH1}\n"))
    assert run_cli(argv) == 2
    assert "enc.N" in capsys.readouterr().err

    monkeypatch.delenv("TEST_ISCL_NO_PIN", raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO(MATERIAL))
    assert run_cli([*argv, "--pin-env", "TEST_ISCL_NO_PIN"]) == 2
    assert "TEST_ISCL_NO_PIN" in capsys.readouterr().err

    monkeypatch.setattr("sys.stdin", io.StringIO(MATERIAL))
    assert run_cli([*argv, "--max-retries", "16"]) == 2
    assert "max retries" in capsys.readouterr().err
    assert not card.exists() and not keys.exists()


def test_card_init_has_no_pin_or_key_option() -> None:
    parser = argparse.ArgumentParser(prog="iscl")
    cli_card.register(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit):
        parser.parse_args(["card", "init", "c", "--key-file", "k", "--pin", "1234"])


def test_card_info_refuses_unsafe_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = tmp_path / "card.json"
    card.write_text("{}")
    card.chmod(0o644)
    assert run_cli(["card", "info", str(card)]) == 2
    assert "chmod 600" in capsys.readouterr().err


@pytest.mark.parametrize("iterations", [0, 10**12])
def test_a_card_file_pin_iterations_out_of_range_is_refused(
    tmp_path: Path, iterations: int
) -> None:
    """10**12 PBKDF2 rounds would make the card's first VERIFY hang."""
    from softcard.cardfile import create_card_file

    card = tmp_path / "card.json"
    create_card_file(card, {1: os.urandom(8)}, pin=b"2468")
    data = json.loads(card.read_text())
    data["pin"]["iterations"] = iterations
    card.write_text(json.dumps(data))
    card.chmod(0o600)
    with pytest.raises(KeyFileError, match=r"pin\.iterations must be 1\.\.1000000"):
        load_card_file(card)
