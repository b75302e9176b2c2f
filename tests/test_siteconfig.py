"""Site files (``iscl_hw.siteconfig``), ``iscl config check`` and the
operator logging helpers (``iscl_hw.oplog``)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscl_hw import aio, cli, oplog
from iscl_hw.card import ApduCard
from iscl_hw.cli_config import add_config_option, load_for_args
from iscl_hw.constants import UNIQUE_SESSION_KEYS, EncryptionMethod, MacMethod
from iscl_hw.crypto import Padding
from iscl_hw.endpoint import Timeouts
from iscl_hw.errors import ConfigError, PeerAuthenticationFailed
from iscl_hw.hsm import KeyKind, Token, TokenConfig
from iscl_hw.keyfile import KeyStore, write_key_file
from iscl_hw.settings import ChainStart, IvPolicy, MacKeyPolicy, Settings
from iscl_hw.siteconfig import (
    Address,
    LoggingConfig,
    PcscBackend,
    Pkcs11Backend,
    SiteConfig,
    SiteConfigError,
    SiteRole,
    SoftcardBackend,
    key_lines,
    load_site_config,
    open_backend,
    parse_address,
)
from iscl_hw.wire import ByteOrder
from softcard.cardfile import create_card_file
from tests.helpers import random_keys, settle
from tests.hsm_env import HsmSession, hsm  # noqa: F401

AUTH = random_keys()
ENC = random_keys()
PIN_VALUE = "4711-card-pin"


def write(directory: Path, text: str, name: str = "site.toml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(SiteConfigError) as caught:
        load_site_config(path)
    return [str(p) for p in caught.value.problems]


@pytest.fixture
def softcard_files(tmp_path: Path) -> Path:
    """A card file and a key file in tmp_path/cards (shared keys)."""
    cards = tmp_path / "cards"
    cards.mkdir()
    for side in ("server", "client"):
        create_card_file(cards / f"{side}.card", AUTH)
        write_key_file(cards / f"{side}.keys", ENC)
    return cards


SERVER_SITE = """
    # a server site with every section
    [site]
    name = "hospital-a"
    role = "server"
    listen = "127.0.0.1:0"
    forward = "127.0.0.1:11112"

    [card]
    type = "softcard"
    card_file = "cards/server.card"
    key_file = "cards/server.keys"

    [keys]
    auth_key_index = 2
    accepted_auth_key_indexes = [1, 2]
    encryption_key_index = "session"
    session_key_base_index = 3

    [protocol]
    byte_order = "little"
    max_block_length = 4096
    max_message_length = 65536
    auth_data = "hospital-a"
    encryption = "des-cbc"
    mac = "desmac"
    padding = "iso9797-1-m2"
    iv_policy = "chained"
    chain_start = "challenges"
    mac_key_policy = "variant"

    [policy]
    require_encryption = true
    allow_no_mac = false

    [limits]
    max_connections = 10
    max_handshakes_per_peer = 2
    stop_grace = 0
    max_failures = 3
    failure_window = 30
    failure_cooldown = 60.5
    max_file_size = 1000000

    [timeouts]
    handshake = 5
    peer_answer = 2.5
    transmission = 20
    disconnection = 4
    idle = 600
    card = "none"

    [logging]
    level = "info"
    json = true
    file = "logs/iscl.log"
    audit_file = "/var/log/iscl-audit.log"
"""


# -- happy paths --------------------------------------------------------------


def test_softcard_site_parses_into_typed_objects(
    tmp_path: Path, softcard_files: Path
) -> None:
    config = load_site_config(write(tmp_path, SERVER_SITE))

    assert config.name == "hospital-a"
    assert config.role is SiteRole.SERVER
    assert config.listen == Address("127.0.0.1", 0)
    assert config.forward == Address("127.0.0.1", 11112)
    assert config.connect is None
    assert config.backend == SoftcardBackend(
        tmp_path / "cards/server.card", tmp_path / "cards/server.keys"
    )

    settings = config.settings()
    assert settings.auth_key_index == 2
    assert settings.accepted_auth_key_indexes == frozenset({1, 2})
    assert settings.encryption_key_index == UNIQUE_SESSION_KEYS
    assert settings.session_key_base_index == 3
    assert settings.byte_order is ByteOrder.LITTLE
    assert settings.max_block_length == 4096
    assert settings.max_message_length == 65536
    assert settings.auth_data == b"hospital-a"
    assert settings.encryption is EncryptionMethod.DES_CBC
    assert settings.mac is MacMethod.DESMAC
    assert settings.padding is Padding.ISO9797_M2
    assert settings.iv_policy is IvPolicy.CHAINED
    assert settings.chain_start is ChainStart.CHALLENGES
    assert settings.mac_key_policy is MacKeyPolicy.VARIANT

    assert config.timeouts() == Timeouts(
        handshake=5,
        peer_answer=2.5,
        transmission=20,
        disconnection=4,
        idle=600,
        card=None,
    )
    limits = config.limits
    assert (limits.max_connections, limits.max_handshakes_per_peer) == (10, 2)
    assert (limits.stop_grace, limits.max_file_size) == (0.0, 1000000)
    limiter = limits.limiter()
    assert (limiter.max_failures, limiter.window, limiter.cooldown) == (3, 30, 60.5)
    assert config.logging == LoggingConfig(
        "INFO", True, tmp_path / "logs/iscl.log", Path("/var/log/iscl-audit.log")
    )


def test_defaults_are_the_settings_and_timeouts_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [site]
        role = "client"
        connect = "peer.example:2761"
        [card]
        type = "softcard"
        card_file = "c.card"
        key_file = "c.keys"
        """,
    )
    config = load_site_config(path)
    defaults = Settings()
    for name in (
        "byte_order",
        "version",
        "max_block_length",
        "max_message_length",
        "auth_key_index",
        "accepted_auth_key_indexes",
        "auth_data",
        "encryption",
        "mac",
        "encryption_key_index",
        "session_key_base_index",
        "padding",
        "iv_policy",
        "chain_start",
        "mac_key_policy",
        "require_encryption",
        "allow_no_mac",
        "allow_unencrypted_md5",
        "allow_through_mode",
        "refuse_disconnection",
    ):
        assert getattr(config.settings(), name) == getattr(defaults, name), name
    assert config.timeouts() == Timeouts()
    assert config.name == "site"  # the file's stem
    assert config.connect == Address("peer.example", 2761)
    assert config.logging.level is None  # the command line's --log-level


def test_softcard_backend_opens_and_two_sites_authenticate(
    tmp_path: Path, softcard_files: Path
) -> None:
    server = load_site_config(write(tmp_path, SERVER_SITE))
    client = load_site_config(
        write(
            tmp_path,
            """
            [site]
            role = "client"
            connect = "127.0.0.1:2761"
            [card]
            type = "softcard"
            card_file = "cards/client.card"
            key_file = "cards/client.keys"
            [keys]
            accepted_auth_key_indexes = [2]
            encryption_key_index = "session"
            session_key_base_index = 3
            [protocol]
            byte_order = "little"
            padding = "iso9797-1-m2"
            mac = "desmac"
            """,
            "client.toml",
        )
    )

    async def scenario() -> None:
        async def echo(channel: aio.AsyncChannel) -> None:
            await channel.send(await channel.recv())

        with (
            open_backend(server) as (server_card, server_keys),
            open_backend(client) as (client_card, client_keys),
        ):
            assert isinstance(server_card, ApduCard)
            assert isinstance(server_keys, KeyStore)
            listener = await aio.start_server(
                echo,
                "127.0.0.1",
                0,
                card=server_card,
                keys=server_keys,
                settings=server.settings(),
                timeouts=server.timeouts(),
            )
            port = listener.sockets[0].getsockname()[1]
            try:
                channel = await aio.open_connection(
                    "127.0.0.1",
                    port,
                    card=client_card,
                    keys=client_keys,
                    settings=client.settings(),
                    timeouts=client.timeouts(),
                )
                async with channel:
                    assert channel.connection.auth_key_index == 2
                    await channel.send(b"over session keys")
                    assert await channel.recv() == b"over session keys"
                await settle()
            finally:
                listener.close()

    asyncio.run(scenario())


def test_pkcs11_site_opens_the_token(
    tmp_path: Path,
    softcard_files: Path,
    hsm: HsmSession,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token_info = hsm.token("site")
    with Token(
        TokenConfig(str(token_info.module), label=token_info.label, pin=token_info.pin)
    ) as provisioning:
        for index in (1, 2):
            provisioning.import_key(KeyKind.AUTH, index, AUTH[index])
            provisioning.import_key(KeyKind.ENC, index, ENC[index])
    monkeypatch.setenv("ISCL_TEST_TOKEN_PIN", token_info.pin.decode())
    server = load_site_config(
        write(
            tmp_path,
            f"""
            [site]
            role = "server"
            listen = "127.0.0.1:0"
            [card]
            type = "pkcs11"
            module = "{token_info.module}"
            label = "{token_info.label}"
            pin_env = "ISCL_TEST_TOKEN_PIN"
            sessions = 2
            session_wait = 2
            allowed_mechanisms = ["CKM_DES3_ECB", "DES3_CBC", "DES3_ECB_ENCRYPT_DATA"]
            [keys]
            auth_key_index = 2
            """,
        )
    )
    assert isinstance(server.backend, Pkcs11Backend)
    assert server.backend.allowed_mechanisms == frozenset(
        {"DES3_ECB", "DES3_CBC", "DES3_ECB_ENCRYPT_DATA"}
    )
    client = load_site_config(
        write(
            tmp_path,
            """
            [site]
            role = "client"
            connect = "127.0.0.1:2761"
            [card]
            type = "softcard"
            card_file = "cards/client.card"
            key_file = "cards/client.keys"
            """,
            "client.toml",
        )
    )

    async def scenario() -> None:
        async def echo(channel: aio.AsyncChannel) -> None:
            await channel.send(await channel.recv())

        with (
            open_backend(server) as (token_card, token_keys),
            open_backend(client) as (client_card, client_keys),
        ):
            assert 1 in token_keys and 3 not in token_keys
            listener = await aio.start_server(
                echo,
                "127.0.0.1",
                0,
                card=token_card,
                keys=token_keys,
                settings=server.settings(),
            )
            port = listener.sockets[0].getsockname()[1]
            try:
                channel = await aio.open_connection(
                    "127.0.0.1", port, card=client_card, keys=client_keys
                )
                async with channel:
                    assert channel.connection.auth_key_index == 2
                    await channel.send(b"token site")
                    assert await channel.recv() == b"token site"
                await settle()
            finally:
                listener.close()

    asyncio.run(scenario())


def test_pcsc_site_parses_without_pyscard_or_pkcs11(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [site]
        role = "client"
        connect = "[::1]:2761"
        listen = "127.0.0.1:11112"
        [card]
        type = "pcsc"
        reader_regex = "^Virtual PCD"
        protocol = "T1"
        card_wait = 2
        aid = "F06973636C0001"
        pin_file = "secrets/card.pin"
        key_file = "site.keys"
        """,
    )
    config = load_site_config(path)
    backend = config.backend
    assert isinstance(backend, PcscBackend)
    assert backend.reader_regex == "^Virtual PCD"
    assert backend.protocol == 1
    assert backend.card_wait == 2.0
    assert backend.pin.file == tmp_path / "secrets/card.pin"
    assert backend.key_file == tmp_path / "site.keys"
    assert str(backend.selector()) == "readers matching /^Virtual PCD/"
    assert config.connect == Address("::1", 2761)
    assert str(config.connect) == "[::1]:2761"

    # Parsing imports neither pyscard nor python-pkcs11 (checked in a fresh
    # interpreter: this one may have loaded them for other tests).
    probe = (
        "import sys; from iscl_hw.siteconfig import load_site_config; "
        f"load_site_config({str(path)!r}); "
        "loaded = [m for m in ('smartcard', 'pkcs11') if m in sys.modules]; "
        "print(loaded)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


PCSC_SITE = """
[site]
role = "client"
connect = "127.0.0.1:2761"
[card]
type = "pcsc"
reader_regex = "^Virtual PCD"
protocol = "T1"
card_wait = 2
aid = "F06973636C0002"
pin_env = "SITE_CARD_PIN"
key_file = "site.keys"
"""


def test_card_probe_takes_the_reader_from_a_pcsc_site_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from iscl_hw import cli, cli_pcsc

    path = write(tmp_path, PCSC_SITE)
    monkeypatch.setenv("SITE_CARD_PIN", "4321")
    args = cli.build_parser().parse_args(["card", "probe", "--config", str(path)])
    options = cli_pcsc._probe_options(args)
    assert str(options.selector) == "readers matching /^Virtual PCD/"
    assert (options.protocol, options.wait) == (1, 2.0)
    assert options.aid == bytes.fromhex("F06973636C0002")
    assert options.pin is not None and options.pin() == b"4321"

    # What the command line names wins, option by option.
    overrides = ["--reader", "Other 00 00", "--wait", "0.5", "--aid", "A000000001"]
    args = cli.build_parser().parse_args(
        ["card", "probe", "--config", str(path), *overrides, "--pin-env", "OTHER_PIN"]
    )
    monkeypatch.setenv("OTHER_PIN", "9999")
    options = cli_pcsc._probe_options(args)
    assert str(options.selector) == "reader 'Other 00 00'"
    assert (options.protocol, options.wait) == (None, 0.5)
    assert options.aid == bytes.fromhex("A000000001")
    assert options.pin is not None and options.pin() == b"9999"

    # Without a site file: the defaults.
    args = cli.build_parser().parse_args(["card", "probe"])
    options = cli_pcsc._probe_options(args)
    assert (options.protocol, options.wait, options.pin) == (None, 5.0, None)


def test_card_probe_refuses_a_site_file_without_a_reader(
    tmp_path: Path, softcard_files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from iscl_hw import cli

    site = SERVER_SITE[: SERVER_SITE.index("    [logging]")]
    path = write(softcard_files.parent, site)
    assert cli.main(["card", "probe", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "its card is softcard, not pcsc" in err, err


def test_paths_are_relative_to_the_site_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site_dir = tmp_path / "etc" / "iscl"
    site_dir.mkdir(parents=True)
    path = write(
        site_dir,
        """
        [site]
        role = "client"
        connect = "127.0.0.1:2761"
        [card]
        type = "softcard"
        card_file = "../cards/a.card"
        key_file = "/abs/a.keys"
        pin_file = "~/pin"
        [logging]
        file = "log/iscl.log"
        """,
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    backend = load_site_config(Path("etc/iscl/site.toml")).backend
    assert isinstance(backend, SoftcardBackend)
    assert backend.card_file == tmp_path / "etc/iscl/../cards/a.card"
    assert backend.key_file == Path("/abs/a.keys")
    assert backend.pin.file == tmp_path / "home" / "pin"
    assert load_site_config(path).logging.file == site_dir / "log/iscl.log"


# -- errors name the line and the field ---------------------------------------

# Eight lines; what a test appends starts on line 9.
BASE = """\
[site]
role = "server"
listen = "0.0.0.0:2761"

[card]
type = "softcard"
card_file = "a.card"
key_file = "a.keys"
"""


# BASE with the card and key files of the softcard_files fixture.
SERVER_CARD_BASE = BASE.replace("a.card", "cards/server.card").replace(
    "a.keys", "cards/server.keys"
)


def test_the_briefs_example_error(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "\n[protocol]\nmax_block_length = 100\n")
    assert problems_of(path) == [
        f"{path}:11: protocol.max_block_length: must be 144..4294967295, got 100"
    ]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        # wrong type
        ('[keys]\nauth_key_index = "1"', "11: keys.auth_key_index: must be an integer"),
        (
            "[keys]\nauth_key_index = true",
            "11: keys.auth_key_index: must be an integer",
        ),
        # out of range
        ("[keys]\nauth_key_index = 9", "11: keys.auth_key_index: must be 1..8, got 9"),
        (
            "[keys]\naccepted_auth_key_indexes = [1, 12]",
            "11: keys.accepted_auth_key_indexes: must hold 1..8 only, got 12",
        ),
        (
            "[keys]\nencryption_key_index = 0",
            '11: keys.encryption_key_index: must be 1..8 or "session", got 0',
        ),
        # bad choice
        (
            '[protocol]\nmac = "sha1"',
            '11: protocol.mac: must be one of "md5", "desmac"',
        ),
        (
            '[protocol]\npadding = "iso9797-1-m1"',
            "11: protocol.padding: must be one of",
        ),
        # lengths
        (
            '[protocol]\nauth_data = "' + "x" * 129 + '"',
            "11: protocol.auth_data: must be 1..128 bytes, got 129",
        ),
        (
            '[protocol]\nauth_data_hex = "zz"',
            "11: protocol.auth_data_hex: must be hex digits",
        ),
        # seconds
        ("[timeouts]\nhandshake = 0", "11: timeouts.handshake: must be a number"),
        ("[timeouts]\nidle = nan", "11: timeouts.idle: must be a number"),
        ('[timeouts]\npeer_answer = "none"', "11: timeouts.peer_answer: must be"),
        ("[limits]\nstop_grace = -1", "11: limits.stop_grace: must be a number"),
        (
            "[limits]\nstop_grace = 1e9",
            "11: limits.stop_grace: must be a number of seconds >= 0 and <= 86400, "
            "got 1000000000.0",
        ),
        ("[timeouts]\nidle = 86401", "11: timeouts.idle: must be a number"),
        # logging
        ('[logging]\nlevel = "loud"', '11: logging.level: must be one of "debug"'),
        ('[logging]\njson = "yes"', "11: logging.json: must be true or false"),
        # unknown keys and sections
        ("[protocol]\nmacc = 1", "11: protocol.macc: unknown key; did you mean 'mac'?"),
        ("[limit]\nx = 1", "10: limit: unknown section; did you mean [limits]?"),
    ],
)
def test_each_error_names_its_line_and_field(
    tmp_path: Path, extra: str, expected: str
) -> None:
    path = write(tmp_path, BASE + "\n" + extra + "\n")
    found = problems_of(path)
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}:{expected}"), found


def test_syntax_errors_name_their_line(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + '\n[protocol]\nmac = "md5\n')
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:11: syntax: ")

    duplicate = write(tmp_path, BASE.replace("listen", 'role = "client"\nlisten'))
    assert problems_of(duplicate) == [
        f"{duplicate}:3: site.role: defined twice (first on line 2)"
    ]

    table = write(tmp_path, "protocol = 3\n" + BASE)
    assert problems_of(table) == [f"{table}:1: protocol: must be a table ([protocol])"]


def test_every_problem_is_reported_at_once_in_line_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [site]
        role = "relay"
        listen = "nowhere"

        [card]
        type = "pkcs11"
        card_file = "x.card"

        [keys]
        session_key_base_index = 0
        """,
    )
    assert problems_of(path) == [
        f'{path}:2: site.role: must be one of "server", "client", got \'relay\'',
        f"{path}:3: site.listen: expected HOST:PORT, got 'nowhere'",
        f"{path}:5: card.label: give the token's label (or its serial number)",
        f"{path}:5: card.pin_env: a token needs its user PIN: give pin_env, "
        "pin_file or pin_prompt",
        f'{path}:7: card.card_file: is a setting of type = "softcard", '
        'not of type = "pkcs11"',
        f"{path}:10: keys.session_key_base_index: must be 1..8, got 0",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", [": site: section is required", ": card: section is required"]),
        (
            '[site]\nname = "x"\n[card]\nkey_file = "k"\n',
            [
                ':1: site.role: is required ("server" or "client")',
                ':3: card.type: is required ("softcard", "pcsc" or "pkcs11")',
            ],
        ),
        (
            '[site]\nrole = "server"\n[card]\ntype = "softcard"\n',
            [
                ":1: site.listen: a server site needs the address it accepts ISCL on",
                ":3: card.card_file: is required",
                ":3: card.key_file: is required",
            ],
        ),
        (
            '[site]\nrole = "client"\nforward = "a:1"\n'
            '[card]\ntype = "pcsc"\nkey_file = "k"\nreader = "a"\nreader_index = 1\n',
            [
                ":1: site.connect: a client site needs the ISCL peer's address",
                ":3: site.forward: only a server site forwards; use connect",
                ":8: card.reader_index: choose the reader by one of reader, "
                "reader_index",
            ],
        ),
        (
            '[site]\nrole = "server"\nlisten = "a:1"\nconnect = "b:2"\n'
            '[card]\ntype = "pkcs11"\nlabel = "t"\nserial = "9"\npin_env = "P"\n'
            'pin_file = "p"\n',
            [
                ":4: site.connect: a server site does not connect; use listen",
                ":8: card.serial: give the token's label or its serial number, "
                "not both",
                ":10: card.pin_file: give one PIN source, not pin_env and pin_file",
            ],
        ),
        (
            '[site]\nrole = "client"\nconnect = "::1:2761"\n',
            [
                ":3: site.connect: write an IPv6 address as [ADDRESS]:PORT",
                ": card: section is required",
            ],
        ),
    ],
)
def test_missing_and_conflicting_fields(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    path = write(tmp_path, text)
    found = problems_of(path)
    assert len(found) == len(expected), found
    for problem, wanted in zip(found, expected, strict=True):
        assert problem.startswith(f"{path}{wanted}"), (problem, wanted)


def test_an_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    assert problems_of(tmp_path / "absent.toml") == [
        f"{tmp_path / 'absent.toml'}: file: cannot read: No such file or directory"
    ]
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    assert problems_of(binary) == [f"{binary}: file: not UTF-8 text (byte 0)"]


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (f'pin = "{PIN_VALUE}"', "card.pin"),
        ("pin = 4711", "card.pin"),
        (f'user_pin = "{PIN_VALUE}"', "card.user_pin"),
        (f'so_pin = "{PIN_VALUE}"', "card.so_pin"),
        (f'password = "{PIN_VALUE}"', "card.password"),
    ],
)
def test_a_literal_pin_is_refused_without_quoting_it(
    tmp_path: Path, extra: str, field: str
) -> None:
    path = write(tmp_path, BASE + extra + "\n")
    (problem,) = problems_of(path)
    assert problem == (
        f"{path}:9: {field}: a PIN must not be written in the site file; give "
        "pin_env (an environment variable), pin_file or pin_prompt"
    )
    assert PIN_VALUE not in problem and "4711" not in problem


@pytest.mark.parametrize(
    ("extra", "field", "line"),
    [
        ('[keys]\nenc.1 = "0123456789ABCDEF"', "keys.enc.1", 10),
        ('[keys]\nauth = { 2 = "0123456789ABCDEF" }', "keys.auth.2", 10),
        ('[keys]\n[keys.auth]\n3 = "0123456789ABCDEF"', "keys.auth.3", 11),
        ('[card.extra]\nkey = "0123456789ABCDEF"', "card.extra.key", 10),
        ('[keys]\nenc_key = "0123456789ABCDEF"', "keys.enc_key", 10),
        ('keys = "0123456789ABCDEF"', "card.keys", 9),
    ],
)
def test_literal_key_material_is_refused_without_quoting_it(
    tmp_path: Path, extra: str, field: str, line: int
) -> None:
    path = write(tmp_path, BASE + extra + "\n")
    found = problems_of(path)
    assert found == [
        f"{path}:{line}: {field}: key material must not be written in the site "
        "file; keys live in the card, the key file or the token"
    ], found
    assert "0123456789ABCDEF" not in "\n".join(found)


def test_a_pin_in_pin_env_is_refused_without_quoting_it(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + 'pin_env = "4711 1234"\n')
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:9: card.pin_env: must name an environment")
    assert "4711" not in problem


def test_key_lines_follow_tables_dotted_keys_and_skip_multiline_strings() -> None:
    text = textwrap.dedent(
        '''
        top = 1
        [a]
        b.c = 2
        "quoted key" = 3
        text = """
        fake = 4
        """
        [a.d]  # comment
        e = 5
        [[arr]]
        f = 6
        '''
    ).lstrip()
    assert key_lines(text) == {
        "top": 1,
        "a": 2,
        "a.b.c": 3,
        "a.quoted key": 4,
        "a.text": 5,
        "a.d": 8,
        "a.d.e": 9,
        "arr": 10,
        "arr.f": 11,
    }


@pytest.mark.parametrize(
    ("text", "zero", "expected"),
    [
        ("example.org:2761", False, Address("example.org", 2761)),
        ("[fe80::1]:104", False, Address("fe80::1", 104)),
        ("0.0.0.0:0", True, Address("0.0.0.0", 0)),
    ],
)
def test_addresses(text: str, zero: bool, expected: Address) -> None:
    assert parse_address(text, allow_port_zero=zero) == expected


@pytest.mark.parametrize("text", ["host", ":2761", "host:0", "host:70000", "a:b"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_address(text)


# -- --config and iscl config check -------------------------------------------


def test_config_option_and_load_for_args(tmp_path: Path, softcard_files: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_config_option(parser)
    add_config_option(parser)  # a second call adds nothing
    path = write(tmp_path, SERVER_SITE)
    args = parser.parse_args(["--config", str(path)])
    first = load_for_args(args)
    assert isinstance(first, SiteConfig)
    assert load_for_args(args) is first
    assert load_for_args(parser.parse_args([])) is None


def test_config_check_prints_a_summary_without_secrets(
    tmp_path: Path,
    softcard_files: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    create_card_file(softcard_files / "pin.card", AUTH, pin=PIN_VALUE.encode())
    monkeypatch.setenv("ISCL_TEST_PIN", PIN_VALUE)
    path = write(
        tmp_path,
        SERVER_SITE.replace("cards/server.card", "cards/pin.card").replace(
            'key_file = "cards/server.keys"',
            'key_file = "cards/server.keys"\n    pin_env = "ISCL_TEST_PIN"',
        ),
    )
    (tmp_path / "logs").mkdir()
    (tmp_path / "var-log").mkdir()
    path.write_text(
        path.read_text().replace("/var/log/iscl-audit.log", "var-log/audit.log")
    )

    assert cli.main(["config", "check", str(path), "--open"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith(f"{path}: valid\n")
    for expected in (
        "site      hospital-a, role server",
        "listen    127.0.0.1:0 (ISCL)",
        "forward   127.0.0.1:11112 (plain DICOM)",
        "backend   softcard: card file",
        "PIN from $ISCL_TEST_PIN",
        "keys      authentication key 2 (asked for as server), accepted 1, 2",
        "encryption session keys from base key 3",
        "sends     DES_CBC + DESMAC, padding iso9797-1-m2",
        "accepts   DES_CBC + MD5, DES_CBC + DESMAC",
        "limits    block 4096 bytes, message 65536 bytes, file 1000000 bytes; "
        "10 connections, 2 handshakes per peer, stop grace 0 s",
        "timeouts  handshake 5 s, peer answer 2.5 s",
        "idle 600 s, card none",
        "logging   level INFO, JSON lines",
        "opened    card 'hospital-a card'; encryption keys [1, 2, 3, 4, 5, 6, 7, 8]",
    ):
        assert expected in out, expected
    everything = out + err
    assert PIN_VALUE not in everything
    for key in [*AUTH.values(), *ENC.values()]:
        for shown in (key.hex(), key.hex().upper(), key.hex(" ")):
            assert shown not in everything


def test_config_check_fails_with_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path, BASE + "[protocol]\nmac = 5\n[limits]\nmax_connections = 0\n"
    )
    assert cli.main(["config", "check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f'iscl config check: {path}:10: protocol.mac: must be one of "md5", '
        '"desmac", "none", got an integer',
        f"iscl config check: {path}:12: limits.max_connections: must be "
        "1..1000000, got 0",
    ]


def test_config_check_names_missing_and_unsafe_files(
    tmp_path: Path, softcard_files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (softcard_files / "server.keys").chmod(0o644)
    path = write(
        tmp_path,
        """
        [site]
        role = "server"
        listen = "127.0.0.1:2761"
        [card]
        type = "softcard"
        card_file = "cards/missing.card"
        key_file = "cards/server.keys"
        [logging]
        file = "cards"
        audit_file = "nowhere/audit.log"
        """,
    )
    assert cli.main(["config", "check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out.startswith(f"{path}: INVALID\n")
    assert err.splitlines() == [
        f"iscl config check: {path}:6: card.card_file: "
        f"{softcard_files / 'missing.card'} does not exist",
        f"iscl config check: {path}:7: card.key_file: "
        f"{softcard_files / 'server.keys'} is accessible by group or other "
        f"(mode 0644); make it the file of the user iscl runs as, with "
        f"'chmod 600 {softcard_files / 'server.keys'}'",
        f"iscl config check: {path}:9: logging.file: {softcard_files} is not a "
        "regular file",
        f"iscl config check: {path}:10: logging.audit_file: directory "
        f"{tmp_path / 'nowhere'} does not exist",
    ]


def test_config_check_open_reports_a_missing_encryption_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    create_card_file(tmp_path / "a.card", AUTH)
    write_key_file(tmp_path / "a.keys", {1: ENC[1]})
    path = write(tmp_path, BASE + "[keys]\nencryption_key_index = 4\n")
    assert cli.main(["config", "check", str(path), "--open"]) == 2
    assert "encryption key 4 is not in the key file or token" in capsys.readouterr().err


def test_config_check_notes_an_unset_pin_variable(
    tmp_path: Path,
    softcard_files: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ISCL_TEST_UNSET_PIN", raising=False)
    path = write(
        tmp_path,
        SERVER_CARD_BASE + 'pin_env = "ISCL_TEST_UNSET_PIN"\n',
    )
    assert cli.main(["config", "check", str(path)]) == 0
    assert capsys.readouterr().err == (
        "iscl config check: note: $ISCL_TEST_UNSET_PIN is not set here; the site "
        "needs the PIN in it when it runs\n"
    )


# -- operator logging ---------------------------------------------------------


@pytest.fixture
def clean_logging() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    yield
    oplog.reset_logging()
    root.setLevel(level)


def test_json_lines_carry_extra_fields(clean_logging: None) -> None:
    stream = io.StringIO()
    oplog.configure_logging(LoggingConfig(level="DEBUG", json=True), stream=stream)
    logging.getLogger("iscl_hw.test").info(
        "moved %d bytes", 42, extra={"peer": "127.0.0.1:9", "message_id": 7}
    )
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("iscl_hw.test").exception("failed")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["level"] == "INFO"
    assert first["logger"] == "iscl_hw.test"
    assert first["message"] == "moved 42 bytes"
    assert first["peer"] == "127.0.0.1:9"
    assert first["message_id"] == 7
    assert first["time"].endswith("Z")
    assert second["level"] == "ERROR"
    assert "ValueError: boom" in second["exception"]


def test_plain_lines_and_the_level(clean_logging: None) -> None:
    stream = io.StringIO()
    oplog.configure_logging(LoggingConfig(level="WARNING"), stream=stream)
    logging.getLogger("iscl_hw.test").info("hidden")
    logging.getLogger("iscl_hw.test").warning("shown")
    assert stream.getvalue().endswith(" WARNING iscl_hw.test: shown\n")
    assert "hidden" not in stream.getvalue()


def test_audit_records_every_authentication(
    tmp_path: Path, clean_logging: None
) -> None:
    stream = io.StringIO()
    audit_file = tmp_path / "audit.jsonl"
    oplog.configure_logging(
        LoggingConfig(level="ERROR", audit_file=audit_file), stream=stream
    )
    oplog.audit_authentication(("10.0.0.7", 40000), 2, role="server")
    oplog.audit_authentication(
        ("::1", 40001, 0, 0),
        None,
        PeerAuthenticationFailed("the peer's answer is wrong"),
    )
    records = [json.loads(line) for line in audit_file.read_text().splitlines()]
    assert [r["outcome"] for r in records] == ["success", "failure"]
    assert records[0]["peer"] == "10.0.0.7:40000"
    assert records[0]["key_index"] == 2
    assert records[0]["role"] == "server"
    assert records[0]["reason"] is None
    assert records[1]["peer"] == "[::1]:40001"
    assert records[1]["key_index"] is None
    assert records[1]["reason"] == (
        "the peer's answer is wrong (ISCL error 103 REMOTE_ICCARD)"
    )
    assert records[1]["failed_on"] == "peer or line"
    assert all(r["event"] == "authentication" and r["time"] for r in records)
    # The site's log gets them too, whatever its level.
    lines = stream.getvalue().splitlines()
    assert "INFO iscl.audit: authentication succeeded: peer 10.0.0.7:40000" in lines[0]
    assert (
        "WARNING iscl.audit: authentication failed: peer [::1]:40001, key ?"
        in (lines[1])
    )


def test_configure_logging_replaces_its_own_handlers(
    tmp_path: Path, clean_logging: None
) -> None:
    log_file = tmp_path / "iscl.log"
    for _ in range(3):
        oplog.configure_logging(LoggingConfig(level="INFO", file=log_file))
    logging.getLogger("iscl_hw.test").info("once")
    for handler in logging.getLogger().handlers:
        handler.flush()
    assert log_file.read_text().count("once") == 1
    missing = tmp_path / "no" / "dir.log"
    with pytest.raises(
        ConfigError, match=f"cannot open the log file {missing}: No such"
    ):
        oplog.configure_logging(LoggingConfig(file=missing))
    assert os.path.exists(log_file)


def test_the_documented_examples_are_valid(tmp_path: Path) -> None:
    docs = Path(__file__).resolve().parent.parent / "docs" / "siteconfig.md"
    blocks = docs.read_text(encoding="utf-8").split("```toml\n")[1:]
    examples = [block.split("```", 1)[0] for block in blocks]
    server = load_site_config(write(tmp_path, examples[0], "server.toml"))
    client = load_site_config(write(tmp_path, examples[1], "client.toml"))
    assert server.role is SiteRole.SERVER and isinstance(server.backend, PcscBackend)
    assert client.role is SiteRole.CLIENT and isinstance(client.backend, Pkcs11Backend)
    assert server.settings().mac is MacMethod.DESMAC
    assert client.settings().accepted_auth_key_indexes == frozenset({1})
    softcard = examples[1].split("[card]")[0] + examples[2] + "\n[keys]\n"
    assert isinstance(
        load_site_config(write(tmp_path, softcard, "soft.toml")).backend,
        SoftcardBackend,
    )


def test_the_deployment_guide_site_files_parse() -> None:
    """The site files docs/deployment.md shows are valid."""
    import re

    guide = Path(__file__).parent.parent / "docs" / "deployment.md"
    blocks = re.findall(r"```toml\n(.*?)```", guide.read_text(), re.S)
    assert len(blocks) == 2
    from iscl_hw.siteconfig import parse_site_config

    roles = [parse_site_config(block).role.value for block in blocks]
    assert roles == ["server", "client"]


def test_config_check_into_a_closed_pipe_stops_quietly(tmp_path: Path) -> None:
    """``iscl config check FILE | head -1``: the reader leaves early; iscl
    stops with 141 (as SIGPIPE would) and no error on standard error."""
    docs = Path(__file__).resolve().parent.parent / "docs" / "siteconfig.md"
    example = docs.read_text(encoding="utf-8").split("```toml\n")[1].split("```")[0]
    path = write(tmp_path, example, "server.toml")
    command = [sys.executable, "-m", "iscl_hw", "config", "check", str(path)]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()  # before iscl has written anything
        err = process.stderr.read().decode()
        assert process.wait(60) == 141
    assert err == ""


def test_a_zero_failure_cooldown_is_shown_as_the_limiter_off(
    tmp_path: Path,
    softcard_files: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = write(
        tmp_path,
        SERVER_CARD_BASE + "[limits]\nfailure_cooldown = 0\n",
    )
    assert cli.main(["config", "check", str(path)]) == 0
    assert "block a peer for 0 s (so never: the limiter is off)" in (
        capsys.readouterr().out
    )

    with caplog.at_level(logging.WARNING, logger="iscl_hw.ratelimit"):
        load_site_config(path).limits.limiter()
    assert "a peer that keeps failing authentication is refused for under a second" in (
        caplog.text
    )


def test_config_check_holds_pin_files_to_the_private_file_rule(
    tmp_path: Path, softcard_files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pin = softcard_files / "card.pin"
    pin.write_text("2468\n")
    pin.chmod(0o644)
    path = write(tmp_path, SERVER_CARD_BASE + 'pin_file = "cards/card.pin"\n')
    assert cli.main(["config", "check", str(path)]) == 2
    assert "card.pin_file: " in capsys.readouterr().err
    pin.chmod(0o600)
    assert cli.main(["config", "check", str(path)]) == 0
