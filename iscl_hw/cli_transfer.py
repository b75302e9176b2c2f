"""``iscl send`` and ``iscl receive``: files between two sites over ISCL.

``iscl receive --listen ADDR --dir DIR`` accepts ISCL connections and
stores the files they carry in DIR; ``iscl send FILE... --to HOST:PORT``
connects, authenticates and sends each file.  The card backend, settings,
timeouts, limits and logging come from the site file (``--config``), or,
for the software card, from ``--card CARDFILE --keys KEYFILE`` with the
default settings.

Files travel in the framing of :mod:`iscl_hw.filexfer` (a manifest
message, then chunk messages).  On top of it the receiver answers, in a
reply message ``b"IFXA"`` + JSON ``{"status": ...}`` (our convention, not
ISCL):

* after the manifest, ``accepted``, or ``refused`` with a ``reason`` (a
  name with a path in it, a hidden or existing file, a file over the size
  limit); the sender then sends the chunks, or goes on to its next file;
* after the last chunk, ``stored`` with the ``name`` and ``sha256`` it
  stored, or ``failed`` with a ``reason``.

So ``iscl send`` exits 0 only when the receiver confirmed every file with
the SHA-256 the sender computed.

The receiver writes a file into DIR under its name only once all of it has
arrived and its size and SHA-256 match the manifest.  Until then the data
sits in an unnamed file in DIR (Linux ``O_TMPFILE``), which vanishes with
the process however it ends, even by SIGKILL; where ``O_TMPFILE`` is not
available, a hidden ``.iscl-*.part`` file that is removed on every failure.
A name from the peer is never a path: one with a separator, ``..``, a
leading dot or control characters is refused, as is an existing file.

Ctrl-C or SIGTERM: ``send`` abandons its connection (exit 130); ``receive``
stops accepting, gives transfers under way ``limits.stop_grace`` seconds
to finish (30 by default), abandons the rest and exits 0; a second signal
abandons them at once (exit 130).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import hashlib
import json
import os
import re
import signal
import stat
import struct
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final

from iscl_hw import aio, eventloop
from iscl_hw.card import Card
from iscl_hw.cli_config import add_config_option, load_for_args
from iscl_hw.errors import ConnectionLost, IsclError, LineClosed
from iscl_hw.filexfer import (
    CHUNK_MAGIC,
    DEFAULT_CHUNK_SIZE,
    MANIFEST_MAGIC,
    FileTransferError,
    Manifest,
    send_file,
)
from iscl_hw.oplog import audit_authentication, configure_logging, format_peer
from iscl_hw.oslimits import ensure_open_files
from iscl_hw.settings import KeyProvider
from iscl_hw.siteconfig import (
    Address,
    PinSpec,
    SiteConfig,
    SiteRole,
    SoftcardBackend,
    open_backend,
    parse_address,
)

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

__all__ = ["REPLY_MAGIC", "cmd_receive", "cmd_send", "register"]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 2
EXIT_INTERRUPTED: Final = 130

REPLY_MAGIC: Final = b"IFXA"
_CHUNK_HEADER: Final = struct.Struct(">4sI")  # as iscl_hw.filexfer frames chunks
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")
_NAME_MAX: Final = 255


class _UsageError(IsclError):
    """A command-line input problem."""


class _Refused(FileTransferError):
    """The receiver refused a file before its data; the line stays usable."""


class _StreamBroken(FileTransferError):
    """The chunks of a file did not arrive as announced, or could not be
    written: the rest of the connection cannot be read in step."""


class _NotStored(FileTransferError):
    """A file arrived whole but was not stored; the next one may follow."""


# -- parser -------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``send`` and ``receive``; each sets ``func`` to its handler."""
    send = subparsers.add_parser(
        "send",
        help="send files to an 'iscl receive' over ISCL",
        description="Connects as ISCL client, authenticates and sends each file; "
        "exit 0 only if the receiver confirmed every file's SHA-256.",
    )
    send.add_argument("files", nargs="+", type=Path, metavar="FILE")
    send.add_argument(
        "--to",
        type=_address,
        metavar="HOST:PORT",
        help="the receiver (default: connect of a client site file)",
    )
    _add_backend_options(send)
    send.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        metavar="N",
        help=f"file bytes per ISCL message (default {DEFAULT_CHUNK_SIZE})",
    )
    _add_quiet(send)
    send.set_defaults(func=cmd_send)

    receive = subparsers.add_parser(
        "receive",
        help="accept ISCL connections and store the files they send",
        description="Runs until Ctrl-C or SIGTERM (or, with --once, until the "
        "first sender hangs up).  Prints each stored file and its SHA-256.",
    )
    receive.add_argument(
        "--listen",
        type=_listen_address,
        metavar="HOST:PORT",
        help="where to accept ISCL (default: listen of a server site file; "
        "port 0 takes a free port)",
    )
    receive.add_argument(
        "--dir", required=True, type=Path, metavar="DIR", help="where files go"
    )
    receive.add_argument(
        "--once", action="store_true", help="stop after the first connection"
    )
    _add_backend_options(receive)
    _add_quiet(receive)
    receive.set_defaults(func=cmd_receive)


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except IsclError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _listen_address(text: str) -> Address:
    try:
        return parse_address(text, allow_port_zero=True)
    except IsclError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_backend_options(parser: argparse.ArgumentParser) -> None:
    add_config_option(parser)
    simple = parser.add_argument_group(
        "software card without a site file (default settings)"
    )
    simple.add_argument("--card", type=Path, metavar="CARDFILE", help="card file")
    simple.add_argument("--keys", type=Path, metavar="KEYFILE", help="key file")
    pin = simple.add_mutually_exclusive_group()
    pin.add_argument("--pin-env", metavar="VAR", help="the card's PIN from $VAR")
    pin.add_argument("--pin-file", type=Path, metavar="PATH", help="the card's PIN")


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no progress bar (there is none when standard error is not a terminal)",
    )


def _site_for(args: argparse.Namespace, role: SiteRole) -> SiteConfig:
    config = load_for_args(args)
    simple = [args.card, args.keys, args.pin_env, args.pin_file]
    if config is not None:
        if any(value is not None for value in simple):
            raise _UsageError("give --config, or --card and --keys, not both")
        configure_logging(config.logging)
        return config
    if args.card is None or args.keys is None:
        raise _UsageError("give --config FILE, or --card CARDFILE and --keys KEYFILE")
    backend = SoftcardBackend(
        args.card, args.keys, PinSpec(args.pin_env, args.pin_file)
    )
    return SiteConfig(path=None, name=role.value, role=role, backend=backend)


def _fail(command: str, message: str) -> int:
    print(f"iscl {command}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _progress_wanted(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


# -- progress -----------------------------------------------------------------


class _Bars:
    """Progress bars on standard error (rich), or nothing at all."""

    def __init__(self, enabled: bool) -> None:
        self._progress: Progress | None = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )

    def __enter__(self) -> _Bars:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop drawing (again: harmless), so other output is not overdrawn."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def add(self, description: str, total: int) -> TaskID | None:
        if self._progress is None:
            return None
        return self._progress.add_task(description, total=total)

    def advance(self, task: TaskID | None, amount: int) -> None:
        if self._progress is not None and task is not None:
            self._progress.advance(task, amount)

    def remove(self, task: TaskID | None) -> None:
        if self._progress is not None and task is not None:
            self._progress.remove_task(task)


# -- signals ------------------------------------------------------------------


class _Stopper:
    """Counts SIGINT/SIGTERM: the first sets ``requested``; the one numbered
    ``cancel_at`` cancels the main task."""

    def __init__(self, task: asyncio.Task[int], cancel_at: int) -> None:
        self.task = task
        self.cancel_at = cancel_at
        self.count = 0
        self.requested = asyncio.Event()

    def signal(self) -> None:
        self.count += 1
        self.requested.set()
        if self.count >= self.cancel_at:
            self.task.cancel()


def _run(main: Callable[[_Stopper], Awaitable[int]], cancel_at: int) -> int:
    """Run ``main`` in a new event loop, SIGINT and SIGTERM going to its
    stopper; the previous signal handlers are restored afterwards."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGINT, signal.SIGTERM)
    saved = {sig: signal.getsignal(sig) for sig in signals} if in_main_thread else {}

    async def with_signals() -> int:
        task = asyncio.current_task()
        assert task is not None
        stopper = _Stopper(task, cancel_at)
        loop = asyncio.get_running_loop()
        for sig in saved:
            loop.add_signal_handler(sig, stopper.signal)
        try:
            return await main(stopper)
        finally:
            for sig in saved:
                loop.remove_signal_handler(sig)

    try:
        return eventloop.run(with_signals())
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# -- send ---------------------------------------------------------------------


def cmd_send(args: argparse.Namespace) -> int:
    """Handle ``iscl send``."""
    try:
        site = _site_for(args, SiteRole.CLIENT)
        target = args.to
        if target is None and site.role is SiteRole.CLIENT:
            target = site.connect
        if target is None:
            raise _UsageError("give --to HOST:PORT (or connect in a client site file)")
        files = _check_sources(args.files)
        limit = site.settings().max_message_length - _CHUNK_HEADER.size
        if not 1 <= args.chunk_size <= limit:
            raise _UsageError(f"--chunk-size must be 1..{limit}")
        bars = _Bars(_progress_wanted(args))
        with open_backend(site) as (card, keys):

            async def main(stopper: _Stopper) -> int:
                return await _send(
                    stopper, site, card, keys, target, files, args.chunk_size, bars
                )

            return _run(main, cancel_at=1)
    except (IsclError, OSError) as exc:
        return _fail("send", str(exc))


def _check_sources(paths: list[Path]) -> list[Path]:
    for path in paths:
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            raise _UsageError(f"{path}: {exc.strerror or type(exc).__name__}") from None
        if not stat.S_ISREG(mode):
            raise _UsageError(f"{path} is not a regular file")
    names = [path.name for path in paths]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise _UsageError(f"two files share the name {twice[0]!r}")
    return paths


async def _send(
    stopper: _Stopper,
    site: SiteConfig,
    card: Card,
    keys: KeyProvider,
    target: Address,
    files: list[Path],
    chunk_size: int,
    bars: _Bars,
) -> int:
    timeouts = site.timeouts()
    try:
        channel = await aio.open_connection(
            target.host,
            target.port,
            card=card,
            keys=keys,
            settings=site.settings(),
            timeouts=timeouts,
        )
    except asyncio.CancelledError:
        if stopper.count:
            print("iscl send: interrupted while connecting", file=sys.stderr)
            return EXIT_INTERRUPTED
        raise
    except IsclError as exc:
        if not _not_reached(exc):
            audit_authentication(str(target), None, exc, role="client")
        raise
    audit_authentication(
        channel.peer_address, channel.connection.auth_key_index, role="client"
    )
    refused = 0
    try:
        with bars:
            for number, path in enumerate(files):
                try:
                    await _send_one(
                        channel, path, chunk_size, timeouts.transmission, bars
                    )
                except _Refused as exc:
                    print(f"iscl send: {exc}", file=sys.stderr)
                    refused += 1
                except IsclError as exc:
                    _not_sent(files[number + 1 :])
                    if isinstance(exc, FileTransferError):
                        raise
                    raise FileTransferError(f"{path.name}: {exc}") from exc
        await channel.close()
    except asyncio.CancelledError:
        await channel.abort()
        if stopper.count:
            print("iscl send: interrupted; the connection was dropped", file=sys.stderr)
            return EXIT_INTERRUPTED
        raise
    except BaseException:
        await channel.abort()
        raise
    return EXIT_ERROR if refused else EXIT_OK


def _not_sent(paths: list[Path]) -> None:
    """Name the files a failed connection left unsent."""
    if paths:
        names = ", ".join(path.name for path in paths)
        print(f"iscl send: not sent (the connection ended): {names}", file=sys.stderr)


def _not_reached(exc: IsclError) -> bool:
    """The peer was never reached (no authentication was attempted)."""
    return isinstance(exc, ConnectionLost) and isinstance(exc.__cause__, OSError)


class _SendingChannel:
    """The channel as :func:`send_file` sees it: after the manifest it waits
    for the receiver's answer; chunks count towards the progress bar."""

    def __init__(
        self,
        channel: aio.AsyncChannel,
        timeout: float,
        progressed: Callable[[int], None],
    ) -> None:
        self._channel = channel
        self._timeout = timeout
        self._progressed = progressed
        self._name = ""

    async def send(self, data: bytes) -> None:
        if data.startswith(CHUNK_MAGIC):
            self._check_not_given_up()
        try:
            await self._channel.send(data)
        except IsclError as exc:
            # A receiver that failed mid-file (its disk full) said why
            # before it closed: that is the reason, not the closed line.
            self._check_not_given_up(exc)
            raise
        if data.startswith(MANIFEST_MAGIC):
            self._name = name = Manifest.decode(data).name
            reply = await _await_reply(self._channel, self._timeout, name)
            if reply["status"] != "accepted":
                reason = reply.get("reason") or "no reason given"
                raise _Refused(f"{name}: the receiver refused it: {reason}")
        elif data.startswith(CHUNK_MAGIC):
            self._progressed(len(data) - _CHUNK_HEADER.size)

    def _check_not_given_up(self, cause: IsclError | None = None) -> None:
        """Raise with the receiver's reason if it answered mid-file."""
        early = self._channel.recv_nowait()
        if early is None:
            return
        reply = _parse_reply(early, self._name)
        reason = reply.get("reason") or "no reason given"
        raise FileTransferError(
            f"{self._name}: the receiver gave up on it: {reason}"
        ) from cause

    async def recv(self) -> bytes:
        return await self._channel.recv()


async def _send_one(
    channel: aio.AsyncChannel, path: Path, chunk_size: int, timeout: float, bars: _Bars
) -> None:
    task = bars.add(path.name, path.stat().st_size)
    sending = _SendingChannel(channel, timeout, lambda n: bars.advance(task, n))
    try:
        manifest = await send_file(sending, path, chunk_size=chunk_size)
        reply = await _await_reply(channel, timeout, manifest.name)
    finally:
        bars.remove(task)
    if reply["status"] != "stored":
        reason = reply.get("reason") or "no reason given"
        raise FileTransferError(f"{path.name}: the receiver did not store it: {reason}")
    if reply.get("sha256") != manifest.sha256:
        raise FileTransferError(
            f"{path.name}: the receiver stored it with another SHA-256"
        )
    print(
        f"sent {path} ({manifest.size} bytes), SHA-256 {manifest.sha256}; "
        f"stored by the receiver as {reply.get('name')}",
        flush=True,
    )


async def _await_reply(
    channel: aio.AsyncChannel, timeout: float, name: str
) -> dict[str, object]:
    try:
        message = await asyncio.wait_for(channel.recv(), timeout)
    except TimeoutError:
        raise FileTransferError(
            f"{name}: no answer from the receiver within {timeout:g} s"
        ) from None
    except LineClosed:
        raise FileTransferError(
            f"{name}: the receiver closed the line without an answer"
        ) from None
    return _parse_reply(message, name)


def _parse_reply(message: bytes, name: str) -> dict[str, object]:
    if not message.startswith(REPLY_MAGIC):
        raise FileTransferError(f"{name}: the receiver's answer is not a reply")
    try:
        reply = json.loads(message[len(REPLY_MAGIC) :])
    except ValueError:
        reply = None
    if not isinstance(reply, dict) or not isinstance(reply.get("status"), str):
        raise FileTransferError(f"{name}: the receiver's reply is malformed")
    return reply


# -- receive ------------------------------------------------------------------


def cmd_receive(args: argparse.Namespace) -> int:
    """Handle ``iscl receive``."""
    try:
        site = _site_for(args, SiteRole.SERVER)
        listen = args.listen
        if listen is None and site.role is SiteRole.SERVER:
            listen = site.listen
        if listen is None:
            raise _UsageError(
                "give --listen HOST:PORT (or listen in a server site file)"
            )
        directory: Path = args.dir
        if not directory.is_dir():
            raise _UsageError(f"{directory} is not a directory")
        bars = _Bars(_progress_wanted(args))
        with open_backend(site) as (card, keys):

            async def main(stopper: _Stopper) -> int:
                return await _receive(
                    stopper, site, card, keys, listen, directory, args.once, bars
                )

            return _run(main, cancel_at=2)
    except (IsclError, OSError) as exc:
        return _fail("receive", str(exc))


class _Receiver:
    """What the connections of one ``iscl receive`` share."""

    def __init__(
        self, directory: Path, max_size: int, reply_timeout: float, bars: _Bars
    ) -> None:
        self.directory = directory
        self.max_size = max_size
        self.reply_timeout = reply_timeout
        self.bars = bars
        self.active: set[asyncio.Task[object]] = set()
        self.failures = 0
        self.finished = 0

    async def handle(self, channel: aio.AsyncChannel) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.active.add(task)
        peer = format_peer(channel.peer_address)
        ok = False
        try:
            ok = await self.receive_files(channel, peer)
        except IsclError as exc:
            _warn(peer, str(exc))
        except asyncio.CancelledError:
            # Abandoned by a stop: drop the line rather than ask the sender,
            # who is mid-file, for a disconnection it would refuse.
            await channel.abort()
            raise
        finally:
            self.active.discard(task)
            self.failures += not ok
            self.finished += 1

    async def receive_files(self, channel: aio.AsyncChannel, peer: str) -> bool:
        """Files until the sender hangs up; True if every one was stored."""
        ok = True
        while True:
            try:
                message = await channel.recv()
            except LineClosed:
                return ok
            try:
                manifest = Manifest.decode(message)
            except FileTransferError as exc:
                _warn(peer, str(exc))
                await _reply(channel, "failed", reason=str(exc))
                return False
            refusal = _refusal(manifest, self.directory, self.max_size)
            if refusal is not None:
                _warn(peer, f"refused {_shown(manifest.name)}: {refusal}")
                await _reply(channel, "refused", reason=refusal)
                ok = False
                continue
            await _reply(channel, "accepted")
            try:
                target = await self.receive_body(channel, manifest)
            except _NotStored as exc:
                _warn(peer, f"{_shown(manifest.name)}: {exc}")
                await _reply(channel, "failed", reason=str(exc))
                ok = False
                continue
            except _StreamBroken as exc:
                _warn(peer, f"{_shown(manifest.name)}: {exc}")
                with contextlib.suppress(IsclError):
                    await _reply(channel, "failed", reason=str(exc))
                # The sender is mid-file and would refuse a disconnection;
                # it has our reason and sees the line drop.
                await channel.abort()
                return False
            await _reply(channel, "stored", name=target.name, sha256=manifest.sha256)
            print(
                f"received {target} ({manifest.size} bytes) from {peer}, "
                f"SHA-256 {manifest.sha256}",
                flush=True,
            )

    async def receive_body(self, channel: aio.AsyncChannel, manifest: Manifest) -> Path:
        """The chunks of ``manifest``'s file, stored under its name once whole."""
        target = self.directory / manifest.name
        digest = hashlib.sha256()
        received = 0
        task = self.bars.add(manifest.name, manifest.size)
        try:
            with _IncomingFile(self.directory) as incoming:
                for number in range(manifest.chunks):
                    try:
                        message = await channel.recv()
                    except LineClosed:
                        raise _StreamBroken("the sender hung up mid-file") from None
                    except IsclError as exc:
                        raise _StreamBroken(str(exc)) from exc
                    piece = _chunk_data(message, number)
                    received += len(piece)
                    if received > manifest.size:
                        raise _StreamBroken("the file is longer than its manifest says")
                    digest.update(piece)
                    incoming.write(piece)
                    self.bars.advance(task, len(piece))
                if received != manifest.size:
                    raise _NotStored(
                        f"received {received} bytes, the manifest says {manifest.size}"
                    )
                if digest.hexdigest() != manifest.sha256:
                    raise _NotStored("the SHA-256 does not match the manifest's")
                incoming.commit(target)
        finally:
            self.bars.remove(task)
        return target


async def _receive(
    stopper: _Stopper,
    site: SiteConfig,
    card: Card,
    keys: KeyProvider,
    listen: Address,
    directory: Path,
    once: bool,
    bars: _Bars,
) -> int:
    limits = site.limits
    # A connection's socket and the file it writes.
    ensure_open_files(limits.max_connections, 2, "receive")
    timeouts = site.timeouts()
    receiver = _Receiver(directory, limits.max_file_size, timeouts.transmission, bars)

    async def handle(channel: aio.AsyncChannel) -> None:
        try:
            await receiver.handle(channel)
        finally:
            if once:
                stopper.requested.set()

    server = await aio.start_server(
        handle,
        listen.host,
        listen.port,
        card=card,
        keys=keys,
        settings=site.settings(),
        timeouts=timeouts,
        limiter=limits.limiter(),
        max_connections=limits.max_connections,
        max_handshakes_per_peer=limits.max_handshakes_per_peer,
    )
    bound = format_peer(server.sockets[0].getsockname())
    print(f"listening on {bound}; files go to {directory}", flush=True)
    try:
        with bars:
            await stopper.requested.wait()
            server.close()
            await _finish(receiver, limits.stop_grace)
    except asyncio.CancelledError:
        if not stopper.count:
            raise
        server.close()
        await _abandon(receiver, receiver.active)
        return EXIT_INTERRUPTED
    finally:
        server.close()
    if once and receiver.failures:
        return EXIT_ERROR
    return EXIT_OK


async def _finish(receiver: _Receiver, grace: float) -> None:
    """Give transfers under way ``grace`` seconds, then abandon them."""
    if not receiver.active:
        return
    print(
        f"iscl receive: stopping; {len(receiver.active)} transfer(s) under way get "
        f"{grace:g} s to finish",
        file=sys.stderr,
    )
    _, pending = await asyncio.wait(set(receiver.active), timeout=grace)
    await _abandon(receiver, pending)


async def _abandon(receiver: _Receiver, tasks: set[asyncio.Task[object]]) -> None:
    if not tasks:
        return
    receiver.bars.close()
    pending = set(tasks)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    print(
        f"iscl receive: abandoned {len(pending)} transfer(s); nothing of them was kept",
        file=sys.stderr,
    )


async def _reply(channel: aio.AsyncChannel, status: str, **fields: object) -> None:
    body = json.dumps({"status": status, **fields}).encode()
    await channel.send(REPLY_MAGIC + body)


def _warn(peer: str, message: str) -> None:
    print(f"iscl receive: {peer}: {message}", file=sys.stderr, flush=True)


def _shown(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:77] + "...")


def _name_refusal(name: str) -> str | None:
    """Why a file name from the peer is not written, or None."""
    if name in ("", ".", ".."):
        return "is empty or names a directory"
    if "/" in name or "\\" in name:
        return "contains a path separator (path traversal refused)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains control characters"
    if name.startswith("."):
        return "starts with a dot (hidden files are not written)"
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid text"
    if len(encoded) > _NAME_MAX:
        return f"is longer than {_NAME_MAX} bytes"
    return None


def _refusal(manifest: Manifest, directory: Path, max_size: int) -> str | None:
    """Why a file is refused before its data, or None."""
    name_problem = _name_refusal(manifest.name)
    if name_problem is not None:
        return f"the file name {name_problem}"
    if manifest.size > max_size:
        return f"the file is {manifest.size} bytes, over this receiver's {max_size}"
    if (manifest.size == 0) != (
        manifest.chunks == 0
    ) or manifest.chunks > manifest.size:
        return "the manifest's chunk count does not fit its size"
    if not _SHA256_HEX.fullmatch(manifest.sha256):
        return "the manifest's SHA-256 is malformed"
    if os.path.lexists(directory / manifest.name):
        return f"{manifest.name} exists in the receiving directory; not replaced"
    return None


def _chunk_data(message: bytes, number: int) -> bytes:
    if len(message) < _CHUNK_HEADER.size:
        raise _StreamBroken(f"chunk {number} is too short")
    magic, got = _CHUNK_HEADER.unpack_from(message)
    if magic != CHUNK_MAGIC or got != number:
        raise _StreamBroken(f"expected chunk {number}, got something else")
    return message[_CHUNK_HEADER.size :]


class _IncomingFile:
    """A file being received into ``directory``, named only by :meth:`commit`.

    With ``O_TMPFILE`` the data is in an unnamed inode of the directory's
    file system, which the kernel frees when the process ends however it
    ends; otherwise in a hidden temporary file removed on exit from the
    ``with`` block.  Mode 0600: received files may hold patient data.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._temp: Path | None = None
        self._fd = self._open_unnamed(directory)
        if self._fd < 0:
            fd, name = tempfile.mkstemp(dir=directory, prefix=".iscl-", suffix=".part")
            self._fd, self._temp = fd, Path(name)

    @staticmethod
    def _open_unnamed(directory: Path) -> int:
        flag = getattr(os, "O_TMPFILE", 0)
        if not flag or not os.path.isdir("/proc/self/fd"):
            return -1
        try:
            return os.open(directory, flag | os.O_WRONLY, 0o600)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                return -1
            raise _StreamBroken(
                f"cannot write in {directory}: {exc.strerror or exc}"
            ) from None

    def __enter__(self) -> _IncomingFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        os.close(self._fd)
        if self._temp is not None:
            self._temp.unlink(missing_ok=True)

    def write(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise _StreamBroken(f"cannot write: {exc.strerror or exc}") from None

    def commit(self, target: Path) -> None:
        """Give the whole file its name; never replaces an existing file."""
        try:
            os.fsync(self._fd)
            directory_fd = os.open(target.parent, os.O_RDONLY)
            try:
                if self._temp is None:
                    os.link(
                        f"/proc/self/fd/{self._fd}",
                        target.name,
                        dst_dir_fd=directory_fd,
                        follow_symlinks=True,
                    )
                else:
                    os.link(self._temp, target.name, dst_dir_fd=directory_fd)
                os.fsync(directory_fd)
            finally:
                os.close(directory_fd)
        except FileExistsError:
            raise _NotStored(
                f"{target.name} appeared in the receiving directory; not replaced"
            ) from None
        except OSError as exc:
            raise _NotStored(f"cannot store it: {exc.strerror or exc}") from None
