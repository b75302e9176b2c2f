"""The ``iscl`` command line, and ``iscl demo`` end to end."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from iscl_hw import cli, demo
from iscl_hw.keyfile import read_private_file


def _encodings(key: bytes) -> list[str]:
    hex_lower = key.hex()
    return [
        hex_lower,
        hex_lower.upper(),
        key.hex(" "),
        key.hex(" ").upper(),
        repr(key),
        base64.b64encode(key).decode(),
    ]


@pytest.fixture
def demo_keys(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every key the demo draws, read from its files before they vanish."""
    keys: list[bytes] = []
    make_peers = demo._make_peers

    def recording(directory: Path) -> list[demo._Peer]:
        peers = make_peers(directory)
        for peer in peers:
            for path in (peer.card_path, peer.key_path):
                document = json.loads(read_private_file(path))
                keys.extend(
                    bytes.fromhex(value)
                    for value in _hex_values(document)
                    if len(value) == 16
                )
        return peers

    monkeypatch.setattr(demo, "_make_peers", recording)
    return keys


def _hex_values(document: object) -> list[str]:
    if isinstance(document, dict):
        return [v for item in document.values() for v in _hex_values(item)]
    if isinstance(document, list):
        return [v for item in document for v in _hex_values(item)]
    if isinstance(document, str):
        try:
            bytes.fromhex(document)
        except ValueError:
            return []
        return [document]
    return []


def test_demo_moves_the_dicom_file_and_shows_the_handshake(
    demo_keys: list[bytes],
) -> None:
    out = io.StringIO()

    assert demo.run_demo(out=out) == 0

    text = out.getvalue()
    assert "identical: the file arrived intact; it reads as DICOM" in text
    for step in ("GET CHALLENGE", "INTERNAL AUTHENTICATE", "EXTERNAL AUTHENTICATE"):
        assert step in text
    assert "MUTUAL_AUTH_COMPLETION_NOTIF" in text
    assert "LINE_DISCONNECTION_RP" in text
    assert len(demo_keys) == 32  # 8 auth + 8 enc keys, in two files each
    for key in demo_keys:
        for shown in _encodings(key):
            assert shown not in text


def test_demo_trace_shows_data_frames_but_no_payload(
    tmp_path: Path, demo_keys: list[bytes]
) -> None:
    source = tmp_path / "note.txt"
    marker = b"patient name MARKER-7f3a"
    source.write_bytes(marker * 4000)
    out = io.StringIO()

    assert demo.run_demo(source, trace=True, chunk_size=9000, out=out) == 0

    text = out.getvalue()
    assert "MESSAGE_TRANSMISSION_NOTIF" in text
    assert "it is not a DICOM file" in text
    assert "MARKER" not in text
    for key in demo_keys:
        for shown in _encodings(key):
            assert shown not in text


def test_demo_refuses_a_missing_file_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["demo", "--file", str(tmp_path / "absent.dcm")])

    assert code == 2
    captured = capsys.readouterr()
    assert "absent.dcm" in captured.err
    assert "line connection" not in captured.out


@pytest.mark.parametrize("value", ["0", "-5", "abc", "99999999"])
def test_chunk_size_is_checked(value: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--chunk-size", value])
    assert exit_info.value.code == 2


def test_log_level_is_checked() -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--log-level", "bogus", "demo"])
    assert exit_info.value.code == 2


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "iscl_hw", "--version"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0
    assert done.stdout.startswith("iscl ")


def test_the_demo_needs_no_optional_backend() -> None:
    """`pip install .` brings neither python-pkcs11, pyscard nor pynetdicom:
    the command line must build and the demo run without them."""
    import subprocess
    import sys

    optional = ("pkcs11", "smartcard", "pynetdicom")
    blocked = f"import sys; [sys.modules.__setitem__(m, None) for m in {optional}]"
    code = f"{blocked}; from iscl_hw.cli import main; sys.exit(main(['demo']))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "identical: the file arrived intact" in done.stdout


def test_the_pcsc_demo_without_pyscard_says_so() -> None:
    """Without the pcsc extra the pcsc demo names the missing package at
    once; it neither blames pcscd nor starts one."""
    import subprocess
    import sys

    blocked = "import sys; sys.modules['smartcard'] = None"
    code = f"{blocked}; from iscl_hw.cli import main; sys.exit(main(['demo', "
    code += "'--backend', 'pcsc']))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "pyscard is not installed; install the 'pcsc' extra" in done.stderr
    assert "started pcscd" not in done.stdout
    assert "did not answer" not in done.stderr
