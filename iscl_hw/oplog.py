"""Operator logging: plain or JSON-lines records, and the audit trail.

:func:`configure_logging` sets up the root logger from a site file's
``[logging]`` section (:class:`~iscl_hw.siteconfig.LoggingConfig`): one
handler, to standard error or a file, writing either plain lines or JSON
lines (one object per record: ``time``, ``level``, ``logger``, ``message``
and every ``extra`` field of the record).

The audit logger ``iscl.audit`` gets one record per authentication, success
or failure (:func:`audit_authentication`): the peer's address, the key
index, the outcome and, for a failure, the reason.  Its records are always
emitted (the logger's level is INFO whatever the site's level), go to the
site's log like any other record, and, with ``audit_file``, also to that
file as JSON lines.  They carry no key, PIN or message data: reasons are
the engine's error messages, which never do.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final, TextIO

from iscl_hw.errors import CardError, ConfigError, IsclError

if TYPE_CHECKING:
    from iscl_hw.siteconfig import LoggingConfig

__all__ = [
    "AUDIT_LOGGER",
    "JsonLinesFormatter",
    "audit_authentication",
    "configure_logging",
    "format_peer",
    "reset_logging",
]

AUDIT_LOGGER: Final = "iscl.audit"
_HANDLER_NAME: Final = "iscl-oplog"
_PLAIN_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from
# ``extra=`` and goes into its JSON object.
_RECORD_ATTRIBUTES: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None))
) | {"message", "asctime", "taskName"}
_CORE_FIELDS: Final = ("time", "level", "logger", "message")

_audit = logging.getLogger(AUDIT_LOGGER)


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, object] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key in _RECORD_ATTRIBUTES or key.startswith("_"):
                continue
            entry[f"extra_{key}" if key in _CORE_FIELDS else key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=repr)


def _our_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]


def reset_logging() -> None:
    """Remove and close the handlers :func:`configure_logging` installed."""
    for logger in (logging.getLogger(), _audit):
        for handler in _our_handlers(logger):
            logger.removeHandler(handler)
            handler.close()


def _open_log(path: Path, what: str) -> logging.FileHandler:
    try:
        return logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot open the {what} {path}: {exc.strerror}") from None


def configure_logging(config: LoggingConfig, stream: TextIO | None = None) -> None:
    """Log as the site's ``[logging]`` section says.

    Replaces the handler an earlier call installed and the plain
    ``StreamHandler`` of ``logging.basicConfig`` (the ``iscl`` command line's
    default); other handlers (a test's capture, a trace) stay.  ``stream``
    is where records go without ``file`` (standard error by default).
    Raises ConfigError if a log file cannot be opened; nothing changes then.
    """
    handler: logging.Handler
    if config.file is not None:
        handler = _open_log(config.file, "log file")
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    audit_handler: logging.Handler | None = None
    if config.audit_file is not None:
        try:
            audit_handler = _open_log(config.audit_file, "audit log file")
        except ConfigError:
            handler.close()
            raise
        audit_handler.setFormatter(JsonLinesFormatter())
        audit_handler.set_name(_HANDLER_NAME)

    reset_logging()
    root = logging.getLogger()
    for old in [h for h in root.handlers if type(h) is logging.StreamHandler]:
        root.removeHandler(old)
    formatter = (
        JsonLinesFormatter() if config.json else logging.Formatter(_PLAIN_FORMAT)
    )
    handler.setFormatter(formatter)
    handler.set_name(_HANDLER_NAME)
    root.addHandler(handler)
    if config.level is not None:
        root.setLevel(config.level)
    _audit.setLevel(logging.INFO)
    if audit_handler is not None:
        _audit.addHandler(audit_handler)


def format_peer(peer: object) -> str:
    """``host:port`` (``[v6]:port``) of a socket address; other values as text."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = str(peer[0]), peer[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(peer)


def audit_authentication(
    peer: object,
    key_index: int | None,
    error: IsclError | None = None,
    *,
    role: str | None = None,
) -> None:
    """Record one authentication: ``peer`` (a socket address or text), the
    authentication key index (None if the handshake did not get that far),
    and the error that failed it (None: it succeeded).  ``role`` is this
    side's role.  A failure of our own card (or its reader) is told apart
    from the peer's."""
    ok = error is None
    reason = None if error is None else str(error)
    our_card = isinstance(error, CardError)
    where = format_peer(peer)
    fields: dict[str, object] = {
        "event": "authentication",
        "peer": where,
        "key_index": key_index,
        "outcome": "success" if ok else "failure",
        "reason": reason,
    }
    if not ok:
        fields["failed_on"] = "our card" if our_card else "peer or line"
    if role is not None:
        fields["role"] = role
    key = "?" if key_index is None else str(key_index)
    if ok:
        _audit.info(
            "authentication succeeded: peer %s, key %s", where, key, extra=fields
        )
    else:
        _audit.warning(
            "authentication failed%s: peer %s, key %s: %s",
            " (our card)" if our_card else "",
            where,
            key,
            reason or "no reason given",
            extra=fields,
        )
