"""The demo's ``pkcs11`` backend: both peers' keys in SoftHSM2 tokens.

Makes a SoftHSM2 directory inside the demo's temporary directory, one token
per peer with a random PIN that only this process knows, and imports the
peer's keys from its card and key files (then unused).  The tokens go with
the temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from iscl_hw import softhsm
from iscl_hw.card import Card
from iscl_hw.constants import KEY_INDEXES
from iscl_hw.errors import ConfigError
from iscl_hw.keyfile import load_key_file
from iscl_hw.settings import KeyProvider
from softcard.cardfile import load_card_file

__all__ = ["token_peers"]


@contextlib.contextmanager
def token_peers(
    directory: Path, peers: list[tuple[str, Path, Path]], out: TextIO
) -> Iterator[list[tuple[Card, KeyProvider]]]:
    """For each (name, card file, key file): a token card and its keys."""
    try:
        from iscl_hw.hsm import KeyKind, Token, TokenCard, TokenConfig, TokenKeys
    except ImportError as exc:
        raise ConfigError(
            "the pkcs11 backend needs python-pkcs11: pip install 'iscl[pkcs11]'"
        ) from exc
    module = softhsm.find_module()
    softhsm.use_config(softhsm.write_config(directory / "softhsm"))
    print(f"\n[1] making a SoftHSM2 token per peer ({module})", file=out)

    tokens: list[Token] = []
    try:
        for name, card_path, key_path in peers:
            label = f"iscl-demo-{name}-{os.getpid()}"
            pin = secrets.token_hex(8).encode()
            softhsm.init_token(module, label, secrets.token_hex(8).encode(), pin)
            token = Token(TokenConfig(str(module), label=label, pin=pin))
            tokens.append(token)
            auth = load_card_file(card_path).keys
            enc = load_key_file(key_path)
            for index in KEY_INDEXES:
                token.import_key(KeyKind.AUTH, index, auth[index].key)
                token.import_key(KeyKind.ENC, index, enc.get(index))
            print(
                f"  token {label!r}: 8 authentication and 8 encryption keys "
                f"imported (sensitive, not extractable); DES runs as "
                f"{token.way.name}",
                file=out,
            )
        yield [(TokenCard(t), TokenKeys(t)) for t in tokens]
    finally:
        for token in tokens:
            token.close()
