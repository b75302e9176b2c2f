"""``iscl serve`` and ``iscl tunnel``: the DICOM gateways of :mod:`iscl_hw.gateway`.

``iscl serve`` accepts ISCL connections (port 2761, "dicom-iscl"),
authenticates each peer with the site's card or token and relays the
decrypted stream to a plain DICOM SCP.  ``iscl tunnel`` accepts plain TCP
from local DICOM software and carries each connection over its own ISCL
connection.  The site comes from ``--config`` (docs/siteconfig.md), or from
``--card`` and ``--keys`` for a software card with default settings; the
addresses on the command line win over the site file's.

SIGTERM or Ctrl-C stops accepting and lets transfers finish for the site's
``limits.stop_grace``; a second one closes what remains at once.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Final

from iscl_hw import gateway
from iscl_hw.cli_transfer import (
    _add_backend_options,
    _address,
    _listen_address,
    _run,
    _site_for,
    _Stopper,
)
from iscl_hw.errors import IsclError
from iscl_hw.oslimits import ensure_open_files
from iscl_hw.siteconfig import Address, SiteConfig, SiteRole, open_backend

__all__ = ["cmd_serve", "cmd_tunnel", "register"]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 2
EXIT_INTERRUPTED: Final = 130

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``iscl serve`` and ``iscl tunnel``."""
    serve = subparsers.add_parser(
        "serve",
        help="server gateway: ISCL in, plain DICOM out",
        description="Accepts ISCL connections, authenticates each peer with the "
        "site's card or token, and relays the decrypted stream to the plain "
        "DICOM service at --forward.",
    )
    serve.add_argument(
        "--listen",
        type=_listen_address,
        metavar="HOST:PORT",
        help="where ISCL peers connect",
    )
    serve.add_argument(
        "--forward", type=_address, metavar="HOST:PORT", help="the plain DICOM SCP"
    )
    serve.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="expect a PROXY protocol header (v1 or v2) from a load balancer",
    )
    _add_common(serve)
    serve.set_defaults(func=cmd_serve)

    tunnel = subparsers.add_parser(
        "tunnel",
        help="client gateway: plain DICOM in, ISCL out",
        description="Accepts plain TCP from local DICOM software and carries "
        "each connection over its own ISCL connection to --connect.",
    )
    tunnel.add_argument(
        "--listen",
        type=_listen_address,
        metavar="HOST:PORT",
        help="where local DICOM software connects (keep it on 127.0.0.1)",
    )
    tunnel.add_argument(
        "--connect", type=_address, metavar="HOST:PORT", help="the ISCL server gateway"
    )
    _add_common(tunnel)
    tunnel.set_defaults(func=cmd_tunnel)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--message-size",
        type=int,
        metavar="BYTES",
        default=gateway.GatewayLimits().message_size,
        help="largest ISCL message the gateway sends (default 262144)",
    )
    _add_backend_options(parser)


def _fail(command: str, message: str) -> int:
    print(f"iscl {command}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _pick(given: Address | None, configured: Address | None, what: str) -> Address:
    address = given or configured
    if address is None:
        raise IsclError(f"{what} is neither on the command line nor in the site file")
    return address


def _limits(site: SiteConfig, message_size: int) -> gateway.GatewayLimits:
    # Each relayed connection holds two sockets: ISCL and plain TCP.
    ensure_open_files(site.limits.max_connections, 2, "gateway")
    return gateway.GatewayLimits(
        max_connections=site.limits.max_connections,
        max_handshakes=site.limits.max_handshakes_per_peer,
        stop_grace=site.limits.stop_grace,
        message_size=message_size,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Handle ``iscl serve``."""
    try:
        site = _site_for(args, SiteRole.SERVER)
        listen = _pick(args.listen, site.listen, "--listen")
        forward = _pick(args.forward, site.forward, "--forward")
        limits = _limits(site, args.message_size)
    except IsclError as exc:
        return _fail("serve", str(exc))

    async def main(stopper: _Stopper) -> int:
        with open_backend(site) as (card, keys):
            server = await gateway.start_server_gateway(
                (listen.host, listen.port),
                (forward.host, forward.port),
                card=card,
                keys=keys,
                settings=site.settings(),
                timeouts=site.timeouts(),
                limits=limits,
                limiter=site.limits.limiter(),
                proxy_protocol=args.proxy_protocol,
            )
            host, port = server.address
            print(
                f"iscl serve: ISCL on {host}:{port}, relayed to {forward}", flush=True
            )
            return await _serve_until_stopped(server, stopper)

    return _run_gateway("serve", main)


def cmd_tunnel(args: argparse.Namespace) -> int:
    """Handle ``iscl tunnel``."""
    try:
        site = _site_for(args, SiteRole.CLIENT)
        listen = _pick(args.listen, site.listen, "--listen")
        connect = _pick(args.connect, site.connect, "--connect")
        limits = _limits(site, args.message_size)
    except IsclError as exc:
        return _fail("tunnel", str(exc))

    async def main(stopper: _Stopper) -> int:
        with open_backend(site) as (card, keys):
            tunnel = await gateway.start_tunnel_gateway(
                (listen.host, listen.port),
                (connect.host, connect.port),
                card=card,
                keys=keys,
                settings=site.settings(),
                timeouts=site.timeouts(),
                limits=limits,
            )
            host, port = tunnel.address
            print(
                f"iscl tunnel: plain TCP on {host}:{port}, carried over ISCL to "
                f"{connect}",
                flush=True,
            )
            if not _is_loopback(host):
                log.warning(
                    "tunnel: plain (unencrypted) DICOM is accepted on %s from the "
                    "network; anyone who reaches it sends with this site's card",
                    host,
                )
            return await _serve_until_stopped(tunnel, stopper)

    return _run_gateway("tunnel", main)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def _serve_until_stopped(gate: gateway.Gateway, stopper: _Stopper) -> int:
    """Serve until the first signal, then stop gracefully; a second signal
    closes everything at once (exit 130)."""
    try:
        await gate.serve(None, stopper.requested)
    except asyncio.CancelledError:
        log.warning("second signal: connections closed without waiting")
        return EXIT_INTERRUPTED
    return EXIT_OK


def _run_gateway(command: str, main: Callable[[_Stopper], Awaitable[int]]) -> int:
    try:
        return _run(main, cancel_at=2)
    except IsclError as exc:
        return _fail(command, str(exc))
    except OSError as exc:
        return _fail(command, f"cannot listen: {exc.strerror or exc}")
