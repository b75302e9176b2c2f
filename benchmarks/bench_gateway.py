"""Benchmarks of the gateways: DICOM through tunnel and server gateway.

    .venv/bin/python benchmarks/bench_gateway.py [--runs N] [--megabytes N]
        [--associations N] [--message-sizes 65536,262144] [--pdu N]

Each gateway runs in a process of its own (``gateway`` subcommand of this
file, keys handed over on standard input), the pynetdicom SCU and SCP in
this one, all on 127.0.0.1.  Reports:

- C-STORE of a generated dataset (10 MB by default) through both gateways
  with DES-CBC + MD5: median throughput of ``--runs`` runs, next to the same
  transfer through the same relay code forwarding raw TCP (no ISCL), straight
  to the SCP (no gateway), and 60% of the raw single-core DES-CBC speed of
  `cryptography` (the target);
- ``--associations`` associations at once (C-ECHO and a C-STORE each) through
  one gateway pair: how many succeeded, and each gateway's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_core import raw_des_cbc
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from iscl_hw import eventloop, gateway
from iscl_hw.card import ApduCard
from iscl_hw.constants import KEY_INDEXES
from iscl_hw.errors import LineClosed
from iscl_hw.keyfile import KeyStore
from softcard.cardfile import new_card_state
from softcard.emulator import SoftCard

MB = 1e6
LOCAL = "127.0.0.1"
Address = tuple[str, int]


# -- the gateway processes ---------------------------------------------------------


class RawLink:
    """Raw TCP as a :class:`gateway.Link`: the relay with ISCL taken out."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.send_limit = size

    async def send(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def recv(self) -> bytes:
        data = await self._reader.read(self.send_limit)
        if not data:
            raise LineClosed("raw peer closed")
        return data

    async def disconnect(self) -> None:
        self._writer.write_eof()

    async def abort(self) -> None:
        self._writer.close()


async def raw_gateway(
    listen: Address, to: Address, limits: gateway.GatewayLimits
) -> asyncio.Server:
    """Accept, connect onwards, relay with :class:`RawLink` on the far side."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        onward = await asyncio.open_connection(*to, limit=limits.plain_read_limit)
        link = RawLink(*onward, limits.message_size)
        try:
            # A connection still open at the stop is cut, not logged.
            with contextlib.suppress(asyncio.CancelledError):
                await gateway.Relay(link, reader, writer).run()
        finally:
            await link.abort()

    return await asyncio.start_server(serve, *listen, limit=limits.plain_read_limit)


def soft_card(auth: dict[int, bytes], name: str) -> ApduCard:
    return ApduCard(SoftCard(new_card_state(auth)), name=name)


async def run_gateway(args: argparse.Namespace) -> None:
    secrets = json.loads(sys.stdin.readline())
    auth = {int(i): bytes.fromhex(k) for i, k in secrets["auth"].items()}
    keys = KeyStore({int(i): bytes.fromhex(k) for i, k in secrets["enc"].items()})
    card = soft_card(auth, f"{args.role} card")
    limits = gateway.GatewayLimits(message_size=args.message_size, max_connections=1024)
    to = (LOCAL, args.to)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if args.raw:
        server = await raw_gateway((LOCAL, 0), to, limits)
        print("ready", server.sockets[0].getsockname()[1], flush=True)
        await stop.wait()
        server.close()
        return
    start = (
        gateway.start_server_gateway
        if args.role == "server"
        else gateway.start_tunnel_gateway
    )
    running = await start((LOCAL, 0), to, card=card, keys=keys, limits=limits)
    print("ready", running.address[1], flush=True)
    await running.serve(stop=stop)


@dataclass
class GatewayProcess:
    process: subprocess.Popen[str]
    port: int

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024


@contextlib.contextmanager
def gateway_process(
    role: str, to: int, secrets: str, message_size: int, raw: bool
) -> Iterator[GatewayProcess]:
    command = [sys.executable, __file__, "gateway", "--role", role, "--to", str(to)]
    command += ["--message-size", str(message_size)] + ["--raw"] * raw
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(secrets + "\n")
        process.stdin.close()
        word, port = process.stdout.readline().split()
        assert word == "ready"
        yield GatewayProcess(process, int(port))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def key_material() -> str:
    def hex_keys() -> dict[str, str]:
        return {str(i): os.urandom(8).hex() for i in KEY_INDEXES}

    return json.dumps({"auth": hex_keys(), "enc": hex_keys()})


@contextlib.contextmanager
def gateway_pair(
    scp_port: int, message_size: int, raw: bool
) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    secrets = key_material()
    with (
        gateway_process("server", scp_port, secrets, message_size, raw) as server,
        gateway_process("tunnel", server.port, secrets, message_size, raw) as tunnel,
    ):
        yield tunnel, server


# -- DICOM ---------------------------------------------------------------------------


def big_dataset(size: int) -> Dataset:
    """A Secondary Capture image of about ``size`` bytes of pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "Bench^Mark"
    ds.Rows = 2048
    ds.Columns = size // (2 * ds.Rows)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = os.urandom(ds.Rows * ds.Columns * 2)
    return ds


@contextlib.contextmanager
def scp(pdu: int) -> Iterator[int]:
    ae = AE(ae_title="BENCH-SCP")
    ae.add_supported_context(Verification)
    ae.add_supported_context(SecondaryCaptureImageStorage)
    ae.add_supported_context(CTImageStorage)
    ae.maximum_pdu_size = pdu
    ae.maximum_associations = 1024
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 120
    # pynetdicom listens with socketserver's backlog of 5: a burst of
    # connections would measure SYN retransmission, not the gateways.
    ThreadedAssociationServer.request_queue_size = 1024
    server = ae.start_server(
        (LOCAL, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda _: 0x0000)]
    )
    assert server is not None
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def scu(contexts: list[str], pdu: int) -> AE:
    ae = AE(ae_title="BENCH-SCU")
    for context in contexts:
        ae.add_requested_context(context)
    ae.maximum_pdu_size = pdu
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 120
    return ae


def time_stores(port: int, dataset: Dataset, runs: int, pdu: int) -> list[float]:
    """Seconds per C-STORE, each on an association of its own (set up
    untimed: the ISCL handshake is not part of the throughput)."""
    ae = scu([SecondaryCaptureImageStorage], pdu)
    times = []
    for _ in range(runs):
        assoc = ae.associate(LOCAL, port, ae_title="BENCH-SCP")
        assert assoc.is_established, "association refused"
        started = time.perf_counter()
        status = assoc.send_c_store(dataset)
        times.append(time.perf_counter() - started)
        assoc.release()
        assert status.Status == 0x0000, f"C-STORE status {status.Status:#06x}"
    return times


def one_association(port: int, dataset: Any, start: threading.Barrier) -> bool:
    ae = scu([Verification, CTImageStorage, SecondaryCaptureImageStorage], 16382)
    start.wait()
    assoc = ae.associate(LOCAL, port, ae_title="BENCH-SCP")
    if not assoc.is_established:
        return False
    try:
        echo = assoc.send_c_echo()
        store = assoc.send_c_store(dataset)
        return bool(echo and store and echo.Status == store.Status == 0x0000)
    finally:
        assoc.release()


def associations_at_once(port: int, count: int, dataset: Dataset) -> tuple[int, float]:
    """How many of ``count`` simultaneous associations succeeded; seconds."""
    start = threading.Barrier(count)
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        began = time.perf_counter()
        results = list(
            pool.map(lambda _: one_association(port, dataset, start), range(count))
        )
    return sum(results), time.perf_counter() - began


# -- report --------------------------------------------------------------------------


def rate(size: int, times: list[float]) -> float:
    return size / statistics.median(times) / MB


def bench_throughput(args: argparse.Namespace) -> None:
    dataset = big_dataset(int(args.megabytes * MB))
    size = len(dataset.PixelData)
    des = raw_des_cbc(32)
    print(f"raw DES-CBC (cryptography, one core): {des:6.1f} MB/s")
    print(f"target, 60% of it:                    {0.6 * des:6.1f} MB/s")
    print(
        f"C-STORE of {size / MB:.1f} MB, median of {args.runs} runs, "
        f"SCP maximum PDU {args.pdu}:"
    )
    with scp(args.pdu) as scp_port:
        direct = rate(size, time_stores(scp_port, dataset, args.runs, args.pdu))
        print(f"  straight to the SCP:                {direct:6.1f} MB/s")
        for message_size in args.message_sizes:
            for raw in (True, False):
                with gateway_pair(scp_port, message_size, raw) as (tunnel, _):
                    times = time_stores(tunnel.port, dataset, args.runs, args.pdu)
                what = "raw TCP relay" if raw else "ISCL DES-CBC + MD5"
                speed = rate(size, times)
                print(
                    f"  {what:19} {message_size:>8} B messages: {speed:6.1f} MB/s"
                    f" (runs {rate(size, [max(times)]):.1f}.."
                    f"{rate(size, [min(times)]):.1f})"
                    + ("" if raw else f", {speed / des:.0%} of raw DES")
                )


def bench_associations(args: argparse.Namespace) -> None:
    if args.association_megabytes:
        dataset = big_dataset(int(args.association_megabytes * MB))
        what = f"a {len(dataset.PixelData) / MB:.1f} MB image"
    else:
        path = get_testdata_file("CT_small.dcm", download=False)
        assert isinstance(path, str)
        dataset, what = dcmread(path), "CT_small.dcm"
    print(f"{args.associations} associations at once, C-ECHO + C-STORE of {what} each:")
    with scp(16382) as scp_port:
        ok, seconds = associations_at_once(scp_port, args.associations, dataset)
        print(f"  straight to the SCP: {ok} succeeded in {seconds:.1f} s")
    with (
        scp(16382) as scp_port,
        gateway_pair(scp_port, args.message_sizes[0], False) as (tunnel, server),
    ):
        ok, seconds = associations_at_once(tunnel.port, args.associations, dataset)
        print(
            f"  through the gateways, {args.message_sizes[0]} B messages: "
            f"{ok} succeeded in {seconds:.1f} s"
        )
        print(
            f"  peak RSS: tunnel gateway {tunnel.peak_rss_mb():.0f} MB, "
            f"server gateway {server.peak_rss_mb():.0f} MB (target < 200 MB each)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command")
    process = commands.add_parser("gateway", help="(internal) one gateway process")
    process.add_argument("--role", choices=["server", "tunnel"], required=True)
    process.add_argument("--to", type=int, required=True)
    process.add_argument("--message-size", type=int, required=True)
    process.add_argument("--raw", action="store_true")
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--megabytes", type=float, default=10.0)
    parser.add_argument("--associations", type=int, default=200)
    parser.add_argument(
        "--association-megabytes",
        type=float,
        default=0.0,
        help="size of each association's C-STORE (default: CT_small.dcm, 39 kB)",
    )
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument(
        "--message-sizes",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[gateway.GatewayLimits().message_size],
    )
    parser.add_argument("--pdu", type=int, default=16382, help="SCP maximum PDU")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.command == "gateway":
        eventloop.run(run_gateway(args))
        return
    if not args.skip_throughput:
        bench_throughput(args)
    bench_associations(args)


if __name__ == "__main__":
    main()
