"""``iscl send`` and ``iscl receive`` end to end, in subprocesses on
127.0.0.1, each with its own software card holding the same keys."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import resource
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from iscl_hw import aio, cli_transfer
from iscl_hw.card import ApduCard
from iscl_hw.errors import LineClosed
from iscl_hw.filexfer import CHUNK_MAGIC, FileTransferError, Manifest
from iscl_hw.keyfile import load_key_file, write_key_file
from softcard.cardfile import create_card_file
from softcard.emulator import SoftCard
from tests.helpers import random_keys

AUTH = random_keys()
ENC = random_keys()
START_TIMEOUT = 30.0


@dataclass
class Site:
    card: Path
    keys: Path

    def options(self) -> list[str]:
        return ["--card", str(self.card), "--keys", str(self.keys)]


@dataclass
class Sites:
    server: Site
    client: Site
    inbox: Path
    root: Path


@pytest.fixture
def sites(tmp_path: Path) -> Sites:
    made = {}
    for side in ("server", "client"):
        site = Site(tmp_path / f"{side}.card", tmp_path / f"{side}.keys")
        create_card_file(site.card, AUTH)
        write_key_file(site.keys, ENC)
        made[side] = site
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    return Sites(made["server"], made["client"], inbox, tmp_path)


def iscl(*args: str) -> list[str]:
    return [sys.executable, "-m", "iscl_hw", *args]


class Receiver:
    """``iscl receive`` in a subprocess, listening on a free port; with
    ``max_file_bytes``, its writes past that size fail (EFBIG), as on a full
    disk."""

    def __init__(self, *args: str, max_file_bytes: int | None = None) -> None:
        def limit() -> None:
            if max_file_bytes is not None:
                resource.setrlimit(
                    resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes)
                )

        self.process = subprocess.Popen(
            iscl("receive", "--listen", "127.0.0.1:0", *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=limit,
        )
        first = self.readline(START_TIMEOUT)
        assert first.startswith("listening on 127.0.0.1:"), first + self.stderr()
        self.port = int(first.split()[2].split(":")[1].rstrip(";"))

    def readline(self, timeout: float) -> str:
        stdout = self.process.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout)
        return stdout.readline() if ready else ""

    def stderr(self) -> str:
        if self.process.poll() is None:
            return ""
        assert self.process.stderr is not None
        return self.process.stderr.read()

    def finish(self, timeout: float = 20.0) -> tuple[int, str, str]:
        out, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, out, err

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, str, str]:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.finish()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate(timeout=20)


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    """Receivers a test starts; any still running at the end are killed."""
    started: list[Receiver] = []
    yield started
    for receiver in started:
        receiver.kill()


def start(
    receivers: list[Receiver], *args: str, max_file_bytes: int | None = None
) -> Receiver:
    receiver = Receiver(*args, max_file_bytes=max_file_bytes)
    receivers.append(receiver)
    return receiver


def send(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        iscl("send", *args), capture_output=True, text=True, timeout=timeout
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- files arrive intact ------------------------------------------------------


def test_files_arrive_intact_with_their_sha256(
    sites: Sites, receivers: list[Receiver]
) -> None:
    big = sites.root / "image.dcm"
    big.write_bytes(os.urandom(3_000_000))
    empty = sites.root / "empty.txt"
    empty.write_bytes(b"")
    receiver = start(
        receivers, "--dir", str(sites.inbox), "--once", *sites.server.options()
    )

    sent = send(
        str(big),
        str(empty),
        "--to",
        f"127.0.0.1:{receiver.port}",
        "--chunk-size",
        "100000",
        *sites.client.options(),
    )
    assert sent.returncode == 0, sent.stderr
    code, out, err = receiver.finish()
    assert code == 0, err

    for source in (big, empty):
        arrived = sites.inbox / source.name
        assert arrived.read_bytes() == source.read_bytes()
        assert arrived.stat().st_mode & 0o777 == 0o600
        digest = sha256(source)
        assert (
            f"received {arrived} ({source.stat().st_size} bytes) from 127.0.0.1:"
        ) in out
        assert f"SHA-256 {digest}" in out
        assert f"sent {source} ({source.stat().st_size} bytes), SHA-256 {digest}" in (
            sent.stdout
        )
    assert sorted(os.listdir(sites.inbox)) == ["empty.txt", "image.dcm"]
    # Not a terminal: no progress bar drawn.
    assert "\x1b[" not in sent.stderr + err


def test_an_existing_file_is_refused_and_kept(
    sites: Sites, receivers: list[Receiver]
) -> None:
    source = sites.root / "report.pdf"
    source.write_bytes(b"first version")
    receiver = start(receivers, "--dir", str(sites.inbox), *sites.server.options())
    to = f"127.0.0.1:{receiver.port}"
    assert send(str(source), "--to", to, *sites.client.options()).returncode == 0

    source.write_bytes(b"second version")
    again = send(str(source), "--to", to, *sites.client.options())
    assert again.returncode == 2
    assert "report.pdf: the receiver refused it: report.pdf exists in the " in (
        again.stderr
    )
    assert (sites.inbox / "report.pdf").read_bytes() == b"first version"

    code, _, err = receiver.stop()
    assert code == 0, err
    assert "refused 'report.pdf'" in err


def test_a_receiver_that_cannot_write_tells_the_sender_why(
    sites: Sites, receivers: list[Receiver]
) -> None:
    """The receiver's disk fills mid-file (here: a file size limit): the
    sender reports the receiver's reason, not a closed line, and nothing is
    left in the inbox."""
    source = sites.root / "big.dcm"
    source.write_bytes(os.urandom(2_000_000))
    receiver = start(
        receivers,
        "--dir",
        str(sites.inbox),
        "--once",
        *sites.server.options(),
        max_file_bytes=300_000,
    )

    after = sites.root / "after.txt"
    after.write_bytes(b"queued behind the big one")
    sent = send(
        str(source),
        str(after),
        "--to",
        f"127.0.0.1:{receiver.port}",
        "--chunk-size",
        "65536",
        *sites.client.options(),
    )

    assert sent.returncode == 2, sent.stdout + sent.stderr
    assert "big.dcm: the receiver gave up on it: cannot write: File too large" in (
        sent.stderr
    ), sent.stderr
    assert "not sent (the connection ended): after.txt" in sent.stderr
    assert os.listdir(sites.inbox) == []
    code, _, err = receiver.finish()
    assert code != 0 and "cannot write: File too large" in err, (code, err)
    # The sender was mid-file: the line is dropped, not a disconnection
    # asked for that the sender would refuse.
    assert "refused the line disconnection" not in err, err


def test_path_traversal_names_are_refused(
    sites: Sites, receivers: list[Receiver]
) -> None:
    receiver = start(
        receivers, "--dir", str(sites.inbox), "--once", *sites.server.options()
    )
    names = ["../escaped.txt", "sub/dir.txt", "..", "", ".hidden", "a\\b.txt", "x\ny"]
    data = b"payload"
    digest = hashlib.sha256(data).hexdigest()

    async def client() -> list[dict[str, object]]:
        replies = []
        card = ApduCard(SoftCard.from_file(sites.client.card), name="client")
        channel = await aio.open_connection(
            "127.0.0.1", receiver.port, card=card, keys=load_key_file(sites.client.keys)
        )
        async with channel:
            for name in [*names, "fine.txt"]:
                await channel.send(Manifest(name, len(data), digest, 1).encode())
                reply = json.loads((await channel.recv())[4:])
                replies.append(reply)
                if reply["status"] == "accepted":
                    chunk = CHUNK_MAGIC + (0).to_bytes(4, "big") + data
                    await channel.send(chunk)
                    replies.append(json.loads((await channel.recv())[4:]))
        return replies

    replies = asyncio.run(client())
    refusals = replies[: len(names)]
    assert [r["status"] for r in refusals] == ["refused"] * len(names)
    assert "path traversal refused" in str(refusals[0]["reason"])
    assert "path traversal refused" in str(refusals[1]["reason"])
    assert "names a directory" in str(refusals[2]["reason"])
    assert "hidden files" in str(refusals[4]["reason"])
    assert "control characters" in str(refusals[6]["reason"])
    assert replies[len(names) :] == [
        {"status": "accepted"},
        {"status": "stored", "name": "fine.txt", "sha256": digest},
    ]

    code, _, err = receiver.finish()
    assert code == 2, err  # --once: some files of the connection were refused
    assert os.listdir(sites.inbox) == ["fine.txt"]
    assert not (sites.root / "escaped.txt").exists()
    assert "refused '../escaped.txt': the file name contains a path separator" in err


def test_a_lying_manifest_is_not_stored(
    sites: Sites, receivers: list[Receiver]
) -> None:
    receiver = start(
        receivers, "--dir", str(sites.inbox), "--once", *sites.server.options()
    )

    async def client() -> list[dict[str, object]]:
        card = ApduCard(SoftCard.from_file(sites.client.card), name="client")
        channel = await aio.open_connection(
            "127.0.0.1", receiver.port, card=card, keys=load_key_file(sites.client.keys)
        )
        replies = []
        async with channel:
            await channel.send(Manifest("lie.bin", 4, "0" * 64, 1).encode())
            replies.append(json.loads((await channel.recv())[4:]))
            await channel.send(CHUNK_MAGIC + (0).to_bytes(4, "big") + b"data")
            replies.append(json.loads((await channel.recv())[4:]))
        return replies

    accepted, failed = asyncio.run(client())
    assert accepted == {"status": "accepted"}
    assert failed["status"] == "failed"
    assert "SHA-256 does not match" in str(failed["reason"])
    assert receiver.finish()[0] == 2
    assert os.listdir(sites.inbox) == []


# -- a receiver stopped mid-transfer keeps nothing ----------------------------


def _transfer_in_progress(pid: int, directory: Path) -> bool:
    """Whether process ``pid`` has a file open in ``directory``."""
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    for entry in entries:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{entry}")
        except OSError:
            continue
        if target.startswith(f"{directory}/"):
            return True
    return False


def _start_big_transfer(
    sites: Sites, receiver: Receiver
) -> tuple[subprocess.Popen[str], Path]:
    big = sites.root / "big.bin"
    big.write_bytes(os.urandom(96 * 1024 * 1024))
    sender = subprocess.Popen(
        iscl(
            "send",
            str(big),
            "--to",
            f"127.0.0.1:{receiver.port}",
            "--chunk-size",
            "16384",
            *sites.client.options(),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + START_TIMEOUT
    while not _transfer_in_progress(receiver.process.pid, sites.inbox):
        assert sender.poll() is None, sender.communicate()
        assert time.monotonic() < deadline, "the transfer never started"
        time.sleep(0.01)
    return sender, big


def test_a_receiver_killed_mid_transfer_leaves_no_file(
    sites: Sites, receivers: list[Receiver]
) -> None:
    receiver = start(receivers, "--dir", str(sites.inbox), *sites.server.options())
    sender, _ = _start_big_transfer(sites, receiver)

    receiver.process.kill()  # SIGKILL: no clean-up code runs
    receiver.process.communicate(timeout=20)
    _, err = sender.communicate(timeout=60)

    assert sender.returncode == 2
    assert "iscl send: error:" in err
    assert os.listdir(sites.inbox) == []


def test_sigterm_mid_transfer_abandons_it_cleanly(
    sites: Sites, receivers: list[Receiver]
) -> None:
    site = sites.root / "server.toml"
    site.write_text(
        textwrap.dedent(
            f"""
            [site]
            role = "server"
            listen = "127.0.0.1:0"
            [card]
            type = "softcard"
            card_file = "{sites.server.card.name}"
            key_file = "{sites.server.keys.name}"
            [limits]
            stop_grace = 0
            """
        )
    )
    receiver = start(receivers, "--dir", str(sites.inbox), "--config", str(site))
    sender, _ = _start_big_transfer(sites, receiver)

    code, _, err = receiver.stop(signal.SIGTERM)
    sender.communicate(timeout=60)

    assert code == 0, err
    assert "abandoned 1 transfer(s); nothing of them was kept" in err
    assert sender.returncode == 2
    assert os.listdir(sites.inbox) == []


def test_sigint_stops_an_idle_receiver(sites: Sites, receivers: list[Receiver]) -> None:
    receiver = start(receivers, "--dir", str(sites.inbox), *sites.server.options())
    code, _, err = receiver.stop(signal.SIGINT)
    assert code == 0, err
    assert err == ""


# -- site files, JSON logs and the audit trail --------------------------------


def _site_file(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body).lstrip(), encoding="utf-8")
    return path


def test_site_files_json_logs_and_audit_records(
    sites: Sites, receivers: list[Receiver]
) -> None:
    server_site = _site_file(
        sites.root / "server.toml",
        f"""
        [site]
        name = "receiving-site"
        role = "server"
        listen = "127.0.0.1:0"
        [card]
        type = "softcard"
        card_file = "{sites.server.card.name}"
        key_file = "{sites.server.keys.name}"
        [keys]
        auth_key_index = 3
        [protocol]
        mac = "desmac"
        [logging]
        level = "debug"
        json = true
        file = "logs/server.jsonl"
        audit_file = "logs/server-audit.jsonl"
        """,
    )
    (sites.root / "logs").mkdir()
    receiver = start(receivers, "--dir", str(sites.inbox), "--config", str(server_site))
    client_site = _site_file(
        sites.root / "client.toml",
        f"""
        [site]
        role = "client"
        connect = "127.0.0.1:{receiver.port}"
        [card]
        type = "softcard"
        card_file = "{sites.client.card.name}"
        key_file = "{sites.client.keys.name}"
        [keys]
        accepted_auth_key_indexes = [3]
        [protocol]
        mac = "desmac"
        [logging]
        level = "info"
        json = true
        audit_file = "logs/client-audit.jsonl"
        """,
    )
    source = sites.root / "study.dcm"
    source.write_bytes(os.urandom(200_000))

    sent = send(str(source), "--config", str(client_site))
    assert sent.returncode == 0, sent.stderr
    code, _, err = receiver.stop()
    assert code == 0, err
    assert (sites.inbox / "study.dcm").read_bytes() == source.read_bytes()

    server_log = [
        json.loads(line)
        for line in (sites.root / "logs/server.jsonl").read_text().splitlines()
    ]
    assert server_log, "the server logged nothing"
    assert all({"time", "level", "logger", "message"} <= set(r) for r in server_log)
    assert any(r["logger"] == "iscl.audit" for r in server_log)
    # The client logs JSON lines to standard error.
    client_log = [json.loads(line) for line in sent.stderr.splitlines()]
    assert any(r["logger"] == "iscl.audit" for r in client_log)

    (server_audit,) = [
        json.loads(line)
        for line in (sites.root / "logs/server-audit.jsonl").read_text().splitlines()
    ]
    assert server_audit["event"] == "authentication"
    assert server_audit["outcome"] == "success"
    assert server_audit["peer"].startswith("127.0.0.1:")
    assert server_audit["key_index"] == 3
    assert server_audit["role"] == "server"
    (client_audit,) = [
        json.loads(line)
        for line in (sites.root / "logs/client-audit.jsonl").read_text().splitlines()
    ]
    assert client_audit["outcome"] == "success"
    assert client_audit["peer"] == f"127.0.0.1:{receiver.port}"
    assert client_audit["key_index"] == 3
    assert client_audit["role"] == "client"

    # No key reached any output.
    everything = sent.stdout + sent.stderr + err
    for name in ("server.jsonl", "server-audit.jsonl", "client-audit.jsonl"):
        everything += (sites.root / "logs" / name).read_text()
    for key in [*AUTH.values(), *ENC.values()]:
        assert key.hex() not in everything.lower()


def test_a_failed_authentication_is_audited_by_the_sender(
    sites: Sites, receivers: list[Receiver]
) -> None:
    stranger_card = sites.root / "stranger.card"
    create_card_file(stranger_card, random_keys())
    receiver = start(receivers, "--dir", str(sites.inbox), *sites.server.options())
    client_site = _site_file(
        sites.root / "stranger.toml",
        f"""
        [site]
        role = "client"
        connect = "127.0.0.1:{receiver.port}"
        [card]
        type = "softcard"
        card_file = "stranger.card"
        key_file = "{sites.client.keys.name}"
        [logging]
        audit_file = "audit.jsonl"
        """,
    )
    source = sites.root / "x.txt"
    source.write_bytes(b"x")

    sent = send(str(source), "--config", str(client_site))
    assert sent.returncode == 2
    (record,) = [
        json.loads(line)
        for line in (sites.root / "audit.jsonl").read_text().splitlines()
    ]
    assert record["outcome"] == "failure"
    assert record["peer"] == f"127.0.0.1:{receiver.port}"
    assert record["reason"]
    assert os.listdir(sites.inbox) == []
    assert receiver.process.poll() is None  # it goes on serving


# -- usage --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["x"], "give --config FILE, or --card CARDFILE and --keys KEYFILE"),
        (["x", "--config", "s.toml", "--card", "c"], "give --config, or --card"),
        (["x", "--card", "c", "--keys", "k"], "give --to HOST:PORT"),
        (["missing", "--card", "c", "--keys", "k", "--to", "h:1"], "missing: No such"),
    ],
)
def test_send_usage_errors(
    tmp_path: Path,
    args: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from iscl_hw import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").write_bytes(b"x")
    (tmp_path / "s.toml").write_text(
        '[site]\nrole = "client"\nconnect = "h:1"\n'
        '[card]\ntype = "softcard"\ncard_file = "c"\nkey_file = "k"\n'
    )
    assert cli.main(["send", *args]) == 2
    assert message in capsys.readouterr().err


def test_receive_needs_a_directory(
    sites: Sites, capsys: pytest.CaptureFixture[str]
) -> None:
    from iscl_hw import cli

    missing = sites.root / "absent"
    args = ["receive", "--listen", "127.0.0.1:0", "--dir", str(missing)]
    code = cli.main([*args, *sites.server.options()])
    assert code == 2
    assert f"{missing} is not a directory" in capsys.readouterr().err


# -- pieces -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "refused"),
    [
        ("study.dcm", False),
        ("élève 1.txt", False),
        ("../x", True),
        ("/etc/passwd", True),
        ("a/b", True),
        ("a\\b", True),
        (".", True),
        ("..", True),
        (".bashrc", True),
        ("tab\there", True),
        ("x" * 256, True),
        ("\udcff", True),
    ],
)
def test_file_names(name: str, refused: bool) -> None:
    assert (cli_transfer._name_refusal(name) is not None) is refused


def test_an_incoming_file_has_no_name_until_committed(tmp_path: Path) -> None:
    with cli_transfer._IncomingFile(tmp_path) as incoming:
        incoming.write(b"partial")
        assert os.listdir(tmp_path) == []
    assert os.listdir(tmp_path) == []

    (tmp_path / "taken").write_bytes(b"old")
    with cli_transfer._IncomingFile(tmp_path) as incoming:
        incoming.write(b"whole")
        incoming.commit(tmp_path / "done")
        with pytest.raises(cli_transfer._NotStored, match="not replaced"):
            incoming.commit(tmp_path / "taken")
    assert (tmp_path / "done").read_bytes() == b"whole"
    assert (tmp_path / "taken").read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["done", "taken"]


def test_without_o_tmpfile_a_hidden_part_file_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        cli_transfer._IncomingFile, "_open_unnamed", staticmethod(lambda d: -1)
    )
    with cli_transfer._IncomingFile(tmp_path) as incoming:
        incoming.write(b"partial")
        (part,) = os.listdir(tmp_path)
        assert part.startswith(".iscl-") and part.endswith(".part")
    assert os.listdir(tmp_path) == []
    with cli_transfer._IncomingFile(tmp_path) as incoming:
        incoming.write(b"whole")
        incoming.commit(tmp_path / "done")
    assert os.listdir(tmp_path) == ["done"]


def test_a_reply_that_is_not_one_is_an_error() -> None:
    class Channel:
        def __init__(self, message: bytes | None) -> None:
            self.message = message

        async def recv(self) -> bytes:
            if self.message is None:
                raise LineClosed("closed")
            return self.message

    async def reply(message: bytes | None) -> str:
        try:
            await cli_transfer._await_reply(Channel(message), 1.0, "f")  # type: ignore[arg-type]
        except FileTransferError as exc:
            return str(exc)
        return "no error"

    assert asyncio.run(reply(b"IFXMxx")) == "f: the receiver's answer is not a reply"
    assert asyncio.run(reply(b"IFXA[]")) == "f: the receiver's reply is malformed"
    assert asyncio.run(reply(None)) == (
        "f: the receiver closed the line without an answer"
    )
