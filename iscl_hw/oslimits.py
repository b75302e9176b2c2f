"""Operating-system limits a server needs: enough open files for its
connections.

A process starts with the soft limit its shell or service manager gave it
(often 1024), which a server with ``max_connections`` of 256 relays, two
sockets each, can exhaust.  Out of file descriptors, asyncio's loop logs
every failed accept with a traceback and uvloop drops the connection
without a word; so the limit is raised, within the hard limit, before the
server starts, and a limit that stays too low is said once, up front.
"""

from __future__ import annotations

import logging

try:
    import resource
except ImportError:  # Windows: no such limit to raise
    resource = None  # type: ignore[assignment]

__all__ = ["ensure_open_files"]

log = logging.getLogger(__name__)

# Descriptors besides the connections: listening sockets, the card reader
# or token, log files, the event loop's own.
RESERVE = 64


def ensure_open_files(connections: int, per_connection: int, what: str) -> int:
    """Raise the soft open-file limit to what ``connections`` connections
    of ``per_connection`` descriptors each need, within the hard limit;
    warn when that is not enough.  Returns the soft limit in force."""
    if resource is None:
        return -1
    needed = connections * per_connection + RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.debug("cannot raise the open-file limit: %s", exc)
        else:
            log.info("%s: open-file limit raised from %d to %d", what, soft, target)
            soft = target
    if soft < needed:
        log.warning(
            "%s: the open-file limit is %d, but %d connections need about %d; "
            "raise it (ulimit -n, or LimitNOFILE= in a systemd unit) or lower "
            "limits.max_connections",
            what,
            soft,
            connections,
            needed,
        )
    return soft
