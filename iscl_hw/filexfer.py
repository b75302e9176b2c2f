"""A file over ISCL: our own small framing on top of whole messages.

ISCL moves messages of at most the maximum message length (1 MiB by
default).  A file larger than one message goes as a manifest message
followed by chunk messages.  This framing is ours, not part of ISCL:

* manifest: ``b"IFXM"`` then UTF-8 JSON ``{"name", "size", "sha256",
  "chunks"}``;
* chunk: ``b"IFXD"``, the chunk number (u32, big-endian), the bytes.

The receiver checks the count, the order, the size and the SHA-256 before
it hands the file over, and writes nothing under the final name until all
of it has arrived.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from iscl_hw.errors import IsclError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FileTransferError",
    "Manifest",
    "receive_file",
    "send_file",
]

MANIFEST_MAGIC = b"IFXM"
CHUNK_MAGIC = b"IFXD"
_CHUNK_HEADER = struct.Struct(">4sI")
DEFAULT_CHUNK_SIZE = 65536


class FileTransferError(IsclError):
    """The messages did not make up the file the manifest announced."""


class _MessageChannel(Protocol):
    async def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes: ...


@dataclass(frozen=True)
class Manifest:
    name: str
    size: int
    sha256: str
    chunks: int

    def encode(self) -> bytes:
        body = {"name": self.name, "size": self.size, "sha256": self.sha256}
        body["chunks"] = self.chunks
        return MANIFEST_MAGIC + json.dumps(body).encode()

    @classmethod
    def decode(cls, message: bytes) -> Manifest:
        if not message.startswith(MANIFEST_MAGIC):
            raise FileTransferError("first message is not a file manifest")
        try:
            body = json.loads(message[len(MANIFEST_MAGIC) :])
            manifest = cls(
                str(body["name"]),
                int(body["size"]),
                str(body["sha256"]),
                int(body["chunks"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise FileTransferError("file manifest is malformed") from exc
        if manifest.size < 0 or manifest.chunks < 0:
            raise FileTransferError("file manifest has a negative size")
        return manifest


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


async def send_file(
    channel: _MessageChannel, path: Path, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Manifest:
    """Send ``path`` as a manifest and chunk messages."""
    data = path.read_bytes()
    manifest = Manifest(
        path.name,
        len(data),
        hashlib.sha256(data).hexdigest(),
        chunk_count(len(data), chunk_size),
    )
    await channel.send(manifest.encode())
    for number in range(manifest.chunks):
        start = number * chunk_size
        piece = data[start : start + chunk_size]
        await channel.send(_CHUNK_HEADER.pack(CHUNK_MAGIC, number) + piece)
    return manifest


async def receive_file(
    channel: _MessageChannel, directory: Path, *, max_size: int = 1 << 32
) -> tuple[Manifest, Path]:
    """Receive one file into ``directory``; returns its manifest and path.

    The name from the peer is reduced to its last component; an existing
    file is not replaced.
    """
    manifest = Manifest.decode(await channel.recv())
    if manifest.size > max_size:
        raise FileTransferError(f"file of {manifest.size} bytes is over {max_size}")
    target = directory / _safe_name(manifest.name)
    digest = hashlib.sha256()
    received = 0
    fd, temp_name = tempfile.mkstemp(dir=directory, prefix=".iscl-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            for number in range(manifest.chunks):
                piece = _chunk_data(await channel.recv(), number)
                received += len(piece)
                if received > manifest.size:
                    raise FileTransferError("file is longer than its manifest says")
                digest.update(piece)
                out.write(piece)
        _check_complete(manifest, received, digest.hexdigest())
        os.link(temp_name, target)
    finally:
        os.unlink(temp_name)
    return manifest, target


def _chunk_data(message: bytes, number: int) -> bytes:
    if len(message) < _CHUNK_HEADER.size:
        raise FileTransferError(f"chunk {number} is too short")
    magic, got = _CHUNK_HEADER.unpack_from(message)
    if magic != CHUNK_MAGIC or got != number:
        raise FileTransferError(f"expected chunk {number}, got something else")
    return message[_CHUNK_HEADER.size :]


def _check_complete(manifest: Manifest, received: int, sha256: str) -> None:
    if received != manifest.size:
        raise FileTransferError(
            f"received {received} bytes, the manifest says {manifest.size}"
        )
    if sha256 != manifest.sha256:
        raise FileTransferError("SHA-256 of the received file does not match")


def _safe_name(name: str) -> str:
    base = os.path.basename(name.replace("\\", "/"))
    if base in ("", ".", ".."):
        return "received.bin"
    return base
