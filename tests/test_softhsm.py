"""SoftHSM2 tokens: iscl_hw.softhsm, ``iscl hsm init`` and the test fixture.

Needs softhsm2 and python-pkcs11 (the README's test command installs both);
outside CI the SoftHSM tests skip with the reason when softhsm2 is absent.
See tests/hsm_env.py for why one process has one SoftHSM directory.
"""

from __future__ import annotations

import ctypes
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pkcs11
import pytest
from hsm_env import SO_PIN, USER_PIN, HsmSession, HsmToken, hsm, hsm_token

from iscl_hw import cli, softhsm
from iscl_hw.errors import ConfigError

__all__ = ["hsm", "hsm_token"]  # the fixtures, imported for pytest


def _run(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


# ------------------------------------------------------------- in process


def test_token_is_usable_with_the_user_pin(hsm_token: HsmToken) -> None:
    token = hsm_token.token()
    assert token.label == hsm_token.label
    assert token.flags & pkcs11.TokenFlag.USER_PIN_INITIALIZED
    with hsm_token.open(rw=True) as session:
        session.generate_key(pkcs11.KeyType.AES, 128, label="k1", store=True)
        key = session.get_key(label="k1")
        assert key.key_length == 128
        data = key.encrypt(bytes(16), mechanism=pkcs11.Mechanism.AES_ECB)
        assert len(data) == 16


def test_several_tokens_in_one_process(hsm: HsmSession) -> None:
    first = hsm.token("many")
    with first.open(rw=True) as session:
        session.generate_key(pkcs11.KeyType.AES, 128, label="only-first", store=True)
    others = [hsm.token("many") for _ in range(3)]
    labels = {t.label for t in [first, *others]}
    assert len(labels) == 4
    lib = first.lib()
    for made in others:
        with lib.get_token(token_label=made.label).open(
            user_pin=made.pin.decode()
        ) as s:
            assert list(s.get_objects({pkcs11.Attribute.LABEL: "only-first"})) == []
    with first.open() as session:
        assert session.get_key(label="only-first").key_length == 128
    assert labels <= set(softhsm.token_labels(hsm.module))


def test_duplicate_label_is_refused(hsm: HsmSession, hsm_token: HsmToken) -> None:
    with pytest.raises(ConfigError, match=repr(hsm_token.label)) as info:
        softhsm.init_token(hsm.module, hsm_token.label, b"other-so", b"other-user")
    assert "other-so" not in str(info.value)
    assert softhsm.token_labels(hsm.module).count(hsm_token.label) == 1


def test_wrong_user_pin(hsm_token: HsmToken) -> None:
    with pytest.raises(pkcs11.exceptions.PinIncorrect):
        hsm_token.token().open(user_pin="wrong-pin-0000")


def test_wrong_so_pin_length_names_no_pin(hsm: HsmSession) -> None:
    with pytest.raises(ConfigError, match=r"SO PIN must have 4\.\.255") as info:
        softhsm.init_token(hsm.module, "short-so", b"s1", USER_PIN)
    assert "s1" not in str(info.value) and USER_PIN.decode() not in str(info.value)
    assert "short-so" not in softhsm.token_labels(hsm.module)


@pytest.mark.parametrize("label", ["", "x" * 33, "trailing ", " leading"])
def test_bad_labels(hsm: HsmSession, label: str) -> None:
    with pytest.raises(ConfigError, match="label"):
        softhsm.init_token(hsm.module, label, SO_PIN, USER_PIN)


def test_other_config_is_refused_once_loaded(
    hsm: HsmSession, hsm_token: HsmToken, tmp_path: Path
) -> None:
    hsm_token.lib()  # python-pkcs11 has the module loaded and initialised
    softhsm.use_config(hsm.conf)  # the same configuration is fine
    other = softhsm.write_config(tmp_path / "other")
    with pytest.raises(ConfigError, match="already loaded"):
        softhsm.use_config(other)
    assert os.environ[softhsm.CONF_ENV] == str(hsm.conf)


def test_cli_init_in_process(
    hsm: HsmSession, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TEST_HSM_SO", "cli-so-pin-97531")
    monkeypatch.setenv("TEST_HSM_USER", "cli-user-pin-24680")
    argv = ["hsm", "init", "--label", "in-process", "--dir", str(hsm.directory)]
    argv += ["--so-pin-env", "TEST_HSM_SO", "--pin-env", "TEST_HSM_USER"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert f"export SOFTHSM2_CONF={hsm.conf}" in out
    assert "cli-so-pin" not in out + err and "cli-user-pin" not in out + err
    lib = pkcs11.lib(str(hsm.module))
    with lib.get_token(token_label="in-process").open(user_pin="cli-user-pin-24680"):
        pass
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert "'in-process' already exists" in err
    assert "cli-so-pin" not in out + err and "cli-user-pin" not in out + err


def test_cli_prompts_twice(
    hsm: HsmSession, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = iter(["prompt-so-1", "prompt-so-2"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    argv = ["hsm", "init", "--label", "prompted", "--dir", str(hsm.directory)]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert "the two SO PINs differ" in err
    assert "prompt-so" not in out + err


# ----------------------------------------------------------- subprocesses


def test_cli_init_in_a_subprocess(tmp_path: Path) -> None:
    so_pin, user_pin = "sub-so-pin-11223", "sub-user-pin-44556"
    pin_file = tmp_path / "user.pin"
    pin_file.write_text(user_pin + "\n")
    pin_file.chmod(0o600)
    directory = tmp_path / "hsm dir"  # a space: the export line is quoted
    env = {**os.environ, "TEST_HSM_SO": so_pin}
    env.pop(softhsm.CONF_ENV, None)
    argv = ["-m", "iscl_hw", "hsm", "init", "--label", "cli-token"]
    argv += ["--dir", str(directory), "--so-pin-env", "TEST_HSM_SO"]
    argv += ["--pin-file", str(pin_file)]
    done = _run(*argv, env=env)
    assert done.returncode == 0, done.stderr
    conf = directory / "softhsm2.conf"
    assert f"export SOFTHSM2_CONF='{conf}'" in done.stdout
    assert "token label: cli-token" in done.stdout
    for pin in (so_pin, user_pin):
        assert pin not in done.stdout + done.stderr + " ".join(argv)
    assert stat.S_IMODE((directory / "tokens").stat().st_mode) == 0o700

    check = textwrap.dedent(
        """
        import os, sys, pkcs11
        lib = pkcs11.lib(sys.argv[1])
        with lib.get_token(token_label="cli-token").open(user_pin=sys.argv[2]):
            print("opened")
        """
    )
    env_check = {**os.environ, softhsm.CONF_ENV: str(conf)}
    module = str(softhsm.find_module())
    opened = _run("-c", check, module, user_pin, env=env_check)
    assert opened.stdout.strip() == "opened", opened.stderr

    again = _run(*argv, env=env)
    assert again.returncode == 2
    assert "'cli-token' already exists" in again.stderr
    assert so_pin not in again.stderr + again.stdout


# --------------------------------------------------------- module, config


def test_missing_module_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv(softhsm.MODULE_ENV, str(tmp_path / "nope.so"))
    with pytest.raises(ConfigError, match=r"ISCL_PKCS11_MODULE=.*nope\.so: no such"):
        softhsm.find_module()
    monkeypatch.delenv(softhsm.MODULE_ENV)
    monkeypatch.setattr(softhsm, "_MODULE_PATHS", (str(tmp_path / "absent.so"),))
    with pytest.raises(ConfigError, match=r"libsofthsm2\.so not found; install"):
        softhsm.find_module()
    monkeypatch.setenv("TEST_HSM_PIN", "never-used-1234")
    argv = ["hsm", "init", "--label", "x", "--dir", str(tmp_path / "d")]
    argv += ["--so-pin-env", "TEST_HSM_PIN", "--pin-env", "TEST_HSM_PIN"]
    assert cli.main(argv) == 2
    assert "libsofthsm2.so not found" in capsys.readouterr().err
    assert cli.main([*argv, "--module", str(tmp_path / "nope.so")]) == 2
    assert "nope.so: no such file" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_unloadable_module_is_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.so"
    bogus.write_bytes(b"not an ELF file")
    with pytest.raises(ConfigError, match="cannot load PKCS#11 module"):
        softhsm.init_token(bogus, "x", SO_PIN, USER_PIN)


def test_write_config(tmp_path: Path) -> None:
    conf = softhsm.write_config(tmp_path / "a")
    tokens = tmp_path / "a" / "tokens"
    assert conf == tmp_path / "a" / "softhsm2.conf"
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o700
    text = conf.read_text()
    assert f"directories.tokendir = {tokens}\n" in text
    assert "objectstore.backend = file\n" in text and "log.level = ERROR\n" in text
    conf.write_text(text + "# edited\n")
    assert softhsm.write_config(tmp_path / "a") == conf  # kept as it is
    assert conf.read_text().endswith("# edited\n")
    conf.write_text("directories.tokendir = /elsewhere\n")
    with pytest.raises(ConfigError, match="another token directory"):
        softhsm.write_config(tmp_path / "a")


def test_call_error_names_function_and_code() -> None:
    error = softhsm.Pkcs11CallError("C_InitToken", 0xA0)
    assert str(error) == "C_InitToken failed: CKR_PIN_INCORRECT (0x000000A0)"
    assert (error.function, error.rv) == ("C_InitToken", 0xA0)
    assert "CKR_?" in str(softhsm.Pkcs11CallError("C_Login", 0x80001234))


def test_structures_match_the_module(hsm: HsmSession) -> None:
    """Every CK_FUNCTION_LIST slot holds the function the module exports
    under that name, and CK_TOKEN_INFO has the spec's size."""
    dll = ctypes.CDLL(str(hsm.module))
    table = ctypes.POINTER(softhsm.CkFunctionList)()
    dll.C_GetFunctionList.argtypes = (ctypes.c_void_p,)
    assert dll.C_GetFunctionList(ctypes.byref(table)) == 0
    for name in softhsm._FUNCTIONS:
        exported = ctypes.cast(getattr(dll, name), ctypes.c_void_p).value
        assert getattr(table.contents, name) == exported, name
    assert len(softhsm._FUNCTIONS) == 68
    ulong = ctypes.sizeof(ctypes.c_ulong)
    size = 96 + 11 * ulong + 4 + 16  # text fields, CK_ULONGs, versions, utcTime
    assert ctypes.sizeof(softhsm.CkTokenInfo) == -(-size // ulong) * ulong


def test_cli_init_that_fails_leaves_no_configuration(tmp_path: Path) -> None:
    """A user PIN the token refuses (too short) or that is not UTF-8 (from
    the environment, as bytes): a clean error, and no half-made directory."""
    base = {k: v for k, v in os.environ.items() if k != softhsm.CONF_ENV}
    for user_pin, error in (
        (b"1", "the user PIN must have"),
        (b"\xff\xfe1234", "the user PIN must be UTF-8 text"),
    ):
        directory = tmp_path / "hsm"
        env: dict[str | bytes, str | bytes] = {**base, "SO": "so-pin-13579"}
        env[b"USER_PIN"] = user_pin
        argv = ["-m", "iscl_hw", "hsm", "init", "--label", "t", "--dir", str(directory)]
        argv += ["--so-pin-env", "SO", "--pin-env", "USER_PIN"]
        done = _run(*argv, env=env)  # type: ignore[arg-type]
        assert done.returncode == 2, done.stderr
        assert error in done.stderr and "Traceback" not in done.stderr
        assert not (directory / "softhsm2.conf").exists()
        assert not (directory / "tokens").exists()


def test_cli_init_that_fails_removes_only_what_it_made(tmp_path: Path) -> None:
    """An empty tokens/ that was there before stays; a --dir the run made
    goes with its configuration."""
    base = {k: v for k, v in os.environ.items() if k != softhsm.CONF_ENV}
    env = {**base, "SO": "so-pin-13579", "USER_PIN": "1"}  # too short
    kept = tmp_path / "kept"
    (kept / "tokens").mkdir(parents=True)
    linked = tmp_path / "linked"  # a link left dangling where the conf goes
    linked.mkdir()
    (linked / "softhsm2.conf").symlink_to(tmp_path / "victim.conf")
    for directory in (kept, tmp_path / "new" / "a" / "hsm", linked):
        argv = ["-m", "iscl_hw", "hsm", "init", "--label", "t", "--dir", str(directory)]
        argv += ["--so-pin-env", "SO", "--pin-env", "USER_PIN"]
        done = _run(*argv, env=env)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
    assert sorted(p.name for p in kept.iterdir()) == ["tokens"]
    assert not (tmp_path / "new").exists()
    assert (linked / "softhsm2.conf").is_symlink()
    assert not (tmp_path / "victim.conf").exists()
