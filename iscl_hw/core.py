"""The ISCL protocol core: one I/O-free state machine per connection.

Theory of operation
-------------------
A :class:`Connection` is fed bytes (:meth:`receive_data`, ``b""`` for end
of stream) and card answers (:meth:`card_answer`, :meth:`card_failed`); it
hands out events (:meth:`next_event`) and bytes to write
(:meth:`data_to_send`).  It never touches a socket, a card or a clock, so
the blocking API, the asyncio driver and every card backend share it.

Four phases follow each other (public record, LEADTOOLS "Protocols"):

1. LINE_CONNECTION: the server sends its version and maximum block; the
   client answers with the smaller block.
2. MUTUAL_AUTHENTICATION, three-pass-four-way, driven by the server:
   request (key index, authentication data), pass 1 (server challenge),
   pass 2 (client answer and challenge), pass 3 (server answer),
   completion (client verdict).  Card work is asked for with
   :class:`CardRequest` events.
3. MESSAGES, in both directions at once.  Each direction has its own
   transmission state (``_tx`` for ours, ``_rx`` for the peer's) and its
   own CBC chain, so the two never wait for each other.
4. DISCONNECTION, from either side, which the peer may refuse.

Fatal conditions raise from :meth:`next_event`: the connection is then in
the ERROR phase, and the driver writes what :meth:`data_to_send` still holds
(a NAK, where the protocol answers one) and closes the transport.
Integrity failures write nothing: the line is dropped at once (PS3.15 B.2).
"""

from __future__ import annotations

import collections
import enum
import logging
from dataclasses import dataclass

from iscl_hw import crypto
from iscl_hw.constants import (
    ACK,
    CHALLENGE_LENGTH,
    MIN_BLOCK_LENGTH,
    NAK,
    UNIQUE_SESSION_KEYS,
    EncryptionMethod,
    ErrorCode,
    MacMethod,
    MessageId,
    MutualAuthMethod,
)
from iscl_hw.errors import (
    CardError,
    ConfigError,
    ConnectionLost,
    IntegrityError,
    IsclError,
    LocalProtocolError,
    PeerAuthenticationFailed,
    PeerRejectedAuthentication,
    RemoteProtocolError,
)
from iscl_hw.events import (
    AWAITING_CARD,
    NEED_DATA,
    Authenticated,
    CardOperation,
    CardRequest,
    CloseRefused,
    ConnectionClosed,
    Event,
    LineConnected,
    MessageReceived,
    MessageSent,
    SendRefused,
    Sentinel,
    ThroughModeReceived,
)
from iscl_hw.secure import (
    ChainState,
    MessageKey,
    Protection,
    SoftwareKey,
    body_length,
    mac_field_length,
)
from iscl_hw.settings import ChainStart, KeyProvider, Settings
from iscl_hw.wire import Frame, FrameDecoder, encode_frame, pack_u32, unpack_u32

__all__ = ["Connection", "Phase", "Role"]

log = logging.getLogger(__name__)


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class Phase(enum.Enum):
    LINE_CONNECTION = "line connection"
    MUTUAL_AUTHENTICATION = "mutual authentication"
    MESSAGES = "messages"
    DISCONNECTION = "disconnection"
    CLOSED = "closed"
    ERROR = "error"


class _Step(enum.Enum):
    """Where the handshake stands; WAIT_* steps wait for a message,
    CARD_* steps for a card answer."""

    WAIT_LINE_RQ = enum.auto()
    WAIT_LINE_RP = enum.auto()
    WAIT_AUTH_RQ = enum.auto()
    WAIT_AUTH_RP = enum.auto()
    WAIT_PASS1 = enum.auto()
    WAIT_PASS2 = enum.auto()
    WAIT_PASS3 = enum.auto()
    WAIT_COMPLETION = enum.auto()
    CARD_SERVER_CHALLENGE = enum.auto()
    CARD_SERVER_EXPECT = enum.auto()
    CARD_SERVER_EXTERNAL = enum.auto()
    CARD_SERVER_ANSWER = enum.auto()
    CARD_CLIENT_ANSWER = enum.auto()
    CARD_CLIENT_EARLY_CHALLENGE = enum.auto()
    CARD_CLIENT_CHALLENGE = enum.auto()
    CARD_CLIENT_EXPECT = enum.auto()
    CARD_CLIENT_EXTERNAL = enum.auto()
    DONE = enum.auto()


# The message each waiting step accepts (a table, as in h11's _state.py).
_HANDSHAKE_EXPECTS = {
    _Step.WAIT_LINE_RQ: MessageId.LINE_CONNECTION_CHECK_RQ,
    _Step.WAIT_LINE_RP: MessageId.LINE_CONNECTION_CHECK_RP,
    _Step.WAIT_AUTH_RQ: MessageId.MUTUAL_AUTH_RQ,
    _Step.WAIT_AUTH_RP: MessageId.MUTUAL_AUTH_RP,
    _Step.WAIT_PASS1: MessageId.MUTUAL_AUTH_PASS1_NOTIF,
    _Step.WAIT_PASS2: MessageId.MUTUAL_AUTH_PASS2_NOTIF,
    _Step.WAIT_PASS3: MessageId.MUTUAL_AUTH_PASS3_NOTIF,
    _Step.WAIT_COMPLETION: MessageId.MUTUAL_AUTH_COMPLETION_NOTIF,
}

# The span from GET CHALLENGE to EXTERNAL AUTHENTICATE, during which the
# card's last challenge belongs to this connection.
_SPAN_STEPS = frozenset(
    {
        _Step.CARD_SERVER_CHALLENGE,
        _Step.CARD_SERVER_EXPECT,
        _Step.WAIT_PASS2,
        _Step.CARD_SERVER_ANSWER,
        _Step.CARD_SERVER_EXTERNAL,
        _Step.CARD_CLIENT_EARLY_CHALLENGE,
        _Step.CARD_CLIENT_CHALLENGE,
        _Step.CARD_CLIENT_EXPECT,
        _Step.WAIT_PASS3,
        _Step.CARD_CLIENT_EXTERNAL,
    }
)

# Also in the span of a client that took its card first (see
# Connection._client_card_first).
_EARLY_CLIENT_SPAN_STEPS = frozenset({_Step.WAIT_PASS1, _Step.CARD_CLIENT_ANSWER})

# A side whose card fails tells the peer with a NAK in the message it was
# building, padded to that message's size.
_CARD_FAILURE_REPORTS = {
    _Step.CARD_CLIENT_EARLY_CHALLENGE: (MessageId.MUTUAL_AUTH_RP, 0),
    _Step.CARD_SERVER_CHALLENGE: (MessageId.MUTUAL_AUTH_PASS1_NOTIF, 8),
    _Step.CARD_CLIENT_ANSWER: (MessageId.MUTUAL_AUTH_PASS2_NOTIF, 16),
    _Step.CARD_CLIENT_CHALLENGE: (MessageId.MUTUAL_AUTH_PASS2_NOTIF, 16),
    _Step.CARD_SERVER_EXPECT: (MessageId.MUTUAL_AUTH_PASS3_NOTIF, 8),
    _Step.CARD_SERVER_ANSWER: (MessageId.MUTUAL_AUTH_PASS3_NOTIF, 8),
    _Step.CARD_CLIENT_EXPECT: (MessageId.MUTUAL_AUTH_COMPLETION_NOTIF, 0),
    _Step.CARD_CLIENT_EXTERNAL: (MessageId.MUTUAL_AUTH_COMPLETION_NOTIF, 0),
}

# Messages a peer sends as the sender of its own transmissions, and as the
# receiver of ours.
_FROM_PEER_SENDER = frozenset(
    {
        MessageId.MESSAGE_TRANSMISSION_RQ,
        MessageId.RNDNO_FOR_SESSION_KEY_RQ,
        MessageId.MESSAGE_TRANSMISSION_NOTIF,
        MessageId.MAC_TRANSMISSION_NOTIF,
        MessageId.THROUGH_MODE_TRANSMISSION_NOTIF,
    }
)
_FROM_PEER_RECEIVER = frozenset(
    {MessageId.MESSAGE_TRANSMISSION_RP, MessageId.RNDNO_FOR_SESSION_KEY_RP}
)


class _Rx(enum.Enum):
    IDLE = enum.auto()
    WAIT_RANDOM = enum.auto()
    DATA = enum.auto()
    MAC = enum.auto()


class _Tx(enum.Enum):
    IDLE = enum.auto()
    WAIT_RP = enum.auto()
    WAIT_RANDOM_RP = enum.auto()


@dataclass
class _Outgoing:
    send_id: int
    data: bytes
    through: bool = False
    disconnect: bool = False


@dataclass
class _Sealed:
    """A message sealed before the peer accepted its transmission request,
    and what to roll back if the peer refuses it."""

    send_id: int
    protection: Protection
    random: bytes  # the session-key random number (key index 0x10), else b""
    body: bytes
    mac: bytes
    iv_before: bytes


@dataclass
class _Incoming:
    protection: Protection
    key_index: int
    length: int
    body_length: int
    mac_length: int
    body: bytearray


class Connection:
    """One ISCL connection, client or server, with no I/O of its own."""

    def __init__(self, role: Role, settings: Settings, keys: KeyProvider) -> None:
        self.role = role
        self.settings = settings
        self._keys = keys
        self._order = settings.byte_order
        self._decoder = FrameDecoder(self._order, settings.max_block_length)
        self._out: list[bytes] = []
        self._events: collections.deque[Event] = collections.deque()
        self._phase = Phase.LINE_CONNECTION
        self._error: IsclError | None = None
        self._error_raised = False
        self._eof = False
        self._card_pending: CardRequest | None = None

        self.block_length = settings.max_block_length
        self.peer_version: int | None = None
        self.auth_key_index = settings.auth_key_index
        self.peer_auth_data: bytes | None = None
        #: Whole frames received from the peer (0: it has said nothing ISCL).
        self.frames_received = 0
        self.peer_encryption: int | None = None
        self.peer_mac: int | None = None
        self.peer_requested_length: int | None = None
        self.peer_max_message_length: int | None = None

        self._server_challenge = b""
        self._client_challenge = b""
        self._own_answer = b""
        self._peer_answer = b""
        self._expected_answer = b""
        self._client_span_early = False
        self._unsent_pass3: bytes | None = None

        self._tx = _Tx.IDLE
        self._tx_queue: collections.deque[_Outgoing] = collections.deque()
        self._tx_current: _Outgoing | None = None
        self._tx_protection: Protection | None = None
        self._tx_sealed: _Sealed | None = None
        self._tx_seal_error: IsclError | None = None
        self._tx_chain = ChainState()
        self._next_send_id = 1
        self._rx = _Rx.IDLE
        self._rx_current: _Incoming | None = None
        self._rx_chain = ChainState()

        if role is Role.SERVER:
            self._step = _Step.WAIT_LINE_RP
            self._write(
                MessageId.LINE_CONNECTION_CHECK_RQ,
                pack_u32(self._order, settings.version, settings.max_block_length),
            )
        else:
            self._step = _Step.WAIT_LINE_RQ

    def __repr__(self) -> str:
        return f"<Connection {self.role.value} {self._phase.value}>"

    # -- public state ------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def card_span_open(self) -> bool:
        """True from GET CHALLENGE until EXTERNAL AUTHENTICATE is over: the
        driver keeps the card for this connection alone meanwhile."""
        if self._phase is not Phase.MUTUAL_AUTHENTICATION:
            return False
        return self._step in _SPAN_STEPS or (
            self._client_span_early and self._step in _EARLY_CLIENT_SPAN_STEPS
        )

    @property
    def sending(self) -> bool:
        """Our messages (or a disconnection request) are still queued or in
        transmission."""
        return self._tx is not _Tx.IDLE or bool(self._tx_queue)

    @property
    def receiving(self) -> bool:
        """A message from the peer is partly received."""
        return self._rx is not _Rx.IDLE or self._decoder.buffered > 0

    def not_iscl_hint(self) -> str:
        """See :meth:`FrameDecoder.not_iscl_hint`."""
        return self._decoder.not_iscl_hint()

    # -- bytes in and out ----------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` means the transport reached its end."""
        if data:
            self._decoder.feed(data)
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    # -- events --------------------------------------------------------------

    def next_event(self) -> Event | Sentinel:
        """The next event, NEED_DATA or AWAITING_CARD.

        Raises the error that ended the connection, once; later calls raise
        LocalProtocolError.
        """
        if self._error is not None:
            if not self._error_raised:
                self._error_raised = True
                raise self._error
            raise LocalProtocolError(f"connection already failed: {self._error}")
        try:
            return self._next_event()
        except IsclError as exc:
            self._fail(exc)
            self._error_raised = True
            raise

    def _next_event(self) -> Event | Sentinel:
        while not self._events:
            if self._card_pending is not None:
                return AWAITING_CARD
            if self._phase is Phase.CLOSED:
                return NEED_DATA
            frame = self._decoder.next_frame()
            if frame is None:
                if self._eof:
                    raise ConnectionLost(
                        f"peer closed the connection during {self._phase.value}"
                        + self._decoder.not_iscl_hint()
                    )
                return NEED_DATA
            self.frames_received += 1
            self._log_frame("<<", frame.message_id, len(frame.payload), frame.option)
            self._dispatch(frame)
        return self._events.popleft()

    def _fail(self, exc: IsclError) -> None:
        self._error = exc
        self._phase = Phase.ERROR
        self._card_pending = None
        self._expected_answer = b""
        self._discard_session_keys()
        if isinstance(exc, IntegrityError | ConnectionLost):
            self._out.clear()

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    def _write(
        self,
        message_id: MessageId,
        payload: bytes = b"",
        *,
        option: int = 0,
        err_no: int = 0,
    ) -> bytes:
        self._log_frame(">>", message_id, len(payload), option)
        frame = encode_frame(
            self._order, message_id, payload, option=option, err_no=err_no
        )
        self._out.append(frame)
        return frame

    def _log_frame(
        self, direction: str, message_id: MessageId, length: int, option: int
    ) -> None:
        log.debug(
            "%s %s %s length=%d option=0x%08X",
            self.role.value,
            direction,
            message_id.name,
            length,
            option,
        )

    def _dispatch(self, frame: Frame) -> None:
        message_id = frame.message_id
        if self._phase in (Phase.LINE_CONNECTION, Phase.MUTUAL_AUTHENTICATION):
            self._handshake_message(frame)
        elif message_id in _FROM_PEER_SENDER:
            self._peer_sender_message(frame)
        elif message_id in _FROM_PEER_RECEIVER:
            self._peer_receiver_message(frame)
        elif message_id is MessageId.LINE_DISCONNECTION_RQ:
            self._on_disconnection_request()
        elif message_id is MessageId.LINE_DISCONNECTION_RP:
            self._on_disconnection_response(frame)
        else:
            raise _unexpected(message_id, self._phase.value)

    # -- card answers ----------------------------------------------------------

    def card_answer(self, data: bytes = b"") -> None:
        """The answer to the pending CardRequest (empty for EXTERNAL
        AUTHENTICATE, which answers by status word only).  A failure it
        causes is raised by the next :meth:`next_event`."""
        request = self._take_card_request()
        try:
            _CARD_STEPS[self._step](self, request, data)
        except IsclError as exc:
            self._fail(exc)

    def card_failed(self, error: CardError) -> None:
        """The pending CardRequest failed on the card.  The peer is told
        where the protocol has a place for it; the next :meth:`next_event`
        raises ``error``."""
        request = self._take_card_request()
        log.warning(
            "%s: card %s failed: %s", self.role.value, request.operation.value, error
        )
        self._report_card_failure()
        self._fail(error)

    def _take_card_request(self) -> CardRequest:
        request = self._card_pending
        if request is None:
            raise LocalProtocolError("no card request is pending")
        self._card_pending = None
        return request

    def _ask_card(
        self,
        step: _Step,
        operation: CardOperation,
        data: bytes = b"",
        *,
        ahead: bool = False,
    ) -> None:
        self._step = step
        request = CardRequest(operation, self.auth_key_index, data, ahead)
        self._card_pending = request
        self._emit(request)

    def _report_card_failure(self) -> None:
        if self._step is _Step.CARD_SERVER_EXTERNAL:
            self._take_back_pass3()
            return
        message_id, size = _CARD_FAILURE_REPORTS[self._step]
        self._nak(message_id, ErrorCode.LOCAL_ICCARD, bytes(size))

    def _take_back_pass3(self) -> None:
        # A card that answered before the driver took pass 3 (one called
        # inline) leaves room for the NAK; once pass 3 is out there is none,
        # and the peer sees the connection close.
        unsent = self._unsent_pass3
        self._unsent_pass3 = None
        if unsent is None or not any(frame is unsent for frame in self._out):
            return
        self._out = [frame for frame in self._out if frame is not unsent]
        self._nak(
            MessageId.MUTUAL_AUTH_PASS3_NOTIF,
            ErrorCode.LOCAL_ICCARD,
            bytes(CHALLENGE_LENGTH),
        )

    def _nak(
        self, message_id: MessageId, code: ErrorCode, payload: bytes = b""
    ) -> None:
        self._write(message_id, payload, option=NAK, err_no=code)

    # -- line connection and mutual authentication ---------------------------

    def _handshake_message(self, frame: Frame) -> None:
        expected = _HANDSHAKE_EXPECTS.get(self._step)
        if frame.message_id is not expected:
            raise _unexpected(frame.message_id, self._phase.value)
        _MESSAGE_STEPS[self._step](self, frame)

    def _on_line_rq(self, frame: Frame) -> None:
        version, peer_block = unpack_u32(self._order, frame.payload, 2)
        self.peer_version = version
        if version != self.settings.version:
            self._refuse_line(ErrorCode.BAD_VERSION)
            raise RemoteProtocolError(
                f"server speaks version 0x{version:08X}, not "
                f"0x{self.settings.version:08X} (V1.00)",
                ErrorCode.BAD_VERSION,
            )
        if peer_block < MIN_BLOCK_LENGTH:
            self._refuse_line(ErrorCode.BAD_COMMBLOCK_LENGTH)
            raise RemoteProtocolError(
                f"server block length {peer_block} is below our minimum "
                f"{MIN_BLOCK_LENGTH}",
                ErrorCode.BAD_COMMBLOCK_LENGTH,
            )
        self._set_block_length(min(peer_block, self.settings.max_block_length))
        self._write(
            MessageId.LINE_CONNECTION_CHECK_RP,
            pack_u32(self._order, self.settings.version, self.block_length),
            option=ACK,
        )
        self._step = _Step.WAIT_AUTH_RQ

    def _refuse_line(self, code: ErrorCode) -> None:
        ours = pack_u32(
            self._order, self.settings.version, self.settings.max_block_length
        )
        self._nak(MessageId.LINE_CONNECTION_CHECK_RP, code, ours)

    def _on_line_rp(self, frame: Frame) -> None:
        version, block = unpack_u32(self._order, frame.payload, 2)
        self.peer_version = version
        _check_ack(frame, "line connection check")
        if version != self.settings.version:
            raise RemoteProtocolError(
                f"client speaks version 0x{version:08X}", ErrorCode.BAD_VERSION
            )
        if not MIN_BLOCK_LENGTH <= block <= self.settings.max_block_length:
            raise RemoteProtocolError(
                f"client chose block length {block}, outside "
                f"{MIN_BLOCK_LENGTH}..{self.settings.max_block_length}",
                ErrorCode.BAD_COMMBLOCK_LENGTH,
            )
        self._set_block_length(block)
        auth_data = self.settings.auth_data
        self._write(
            MessageId.MUTUAL_AUTH_RQ,
            pack_u32(
                self._order,
                MutualAuthMethod.THREE_PASS_FOUR_WAY,
                self.auth_key_index,
                len(auth_data),
            )
            + auth_data,
        )
        self._step = _Step.WAIT_AUTH_RP

    def _set_block_length(self, block: int) -> None:
        self.block_length = block
        self._decoder.block_length = block
        self._phase = Phase.MUTUAL_AUTHENTICATION
        self._emit(LineConnected(block, self.peer_version or 0))

    def _on_auth_rq(self, frame: Frame) -> None:
        method, key_index, length = unpack_u32(self._order, frame.payload, 3)
        auth_data = frame.payload[12:]
        if length != len(auth_data):
            raise RemoteProtocolError(
                f"authentication data length field {length} does not match "
                f"{len(auth_data)} bytes",
                ErrorCode.BAD_LENGTH,
            )
        if method != MutualAuthMethod.THREE_PASS_FOUR_WAY:
            self._nak(MessageId.MUTUAL_AUTH_RP, ErrorCode.BAD_MUTUAL_AUTH_METHOD)
            raise RemoteProtocolError(
                f"mutual authentication method 0x{method:X} is not 3-pass/4-way",
                ErrorCode.BAD_MUTUAL_AUTH_METHOD,
            )
        if key_index not in self.settings.accepted_auth_key_indexes:
            self._nak(MessageId.MUTUAL_AUTH_RP, ErrorCode.BAD_OPTION)
            raise RemoteProtocolError(
                f"server asks for authentication key {key_index}, which this "
                "client does not accept",
                ErrorCode.BAD_OPTION,
            )
        self.auth_key_index = key_index
        self.peer_auth_data = auth_data
        if self._client_card_first(auth_data):
            self._client_span_early = True
            self._ask_card(
                _Step.CARD_CLIENT_EARLY_CHALLENGE, CardOperation.GET_CHALLENGE
            )
            return
        self._answer_auth_rq()

    def _client_card_first(self, server_auth_data: bytes) -> bool:
        # Two sites that each serve and connect with one card could wait on
        # each other for ever: each server holds its card for the other's
        # client, which waits for its own card.  Both sides take the two
        # cards of a connection in one order, that of their authentication
        # data: the client takes its card before the server's (its GET
        # CHALLENGE before it answers the request) when its data sorts
        # first; otherwise, and when both are equal, after pass 1.
        return self.settings.auth_data < server_auth_data

    def _answer_auth_rq(self) -> None:
        own = self.settings.auth_data
        self._write(
            MessageId.MUTUAL_AUTH_RP,
            pack_u32(self._order, len(own)) + own,
            option=ACK,
        )
        self._step = _Step.WAIT_PASS1

    def _card_client_early_challenge(self, request: CardRequest, data: bytes) -> None:
        self._client_challenge = _challenge(data)
        self._answer_auth_rq()

    def _on_auth_rp(self, frame: Frame) -> None:
        if frame.option == NAK and frame.err_no == ErrorCode.LOCAL_ICCARD:
            # A client that takes its card first reports its card here.
            _check_card_result(frame, "GET CHALLENGE")
        _check_ack(frame, "mutual authentication request")
        (length,) = unpack_u32(self._order, frame.payload, 1)
        auth_data = frame.payload[4:]
        if length != len(auth_data):
            raise RemoteProtocolError(
                f"authentication data length field {length} does not match "
                f"{len(auth_data)} bytes",
                ErrorCode.BAD_LENGTH,
            )
        self.peer_auth_data = auth_data
        self._ask_card(_Step.CARD_SERVER_CHALLENGE, CardOperation.GET_CHALLENGE)

    def _card_server_challenge(self, request: CardRequest, data: bytes) -> None:
        self._server_challenge = _challenge(data)
        self._write(
            MessageId.MUTUAL_AUTH_PASS1_NOTIF, self._server_challenge, option=ACK
        )
        self._ask_expected_answer(_Step.CARD_SERVER_EXPECT, self._server_challenge)

    def _ask_expected_answer(self, step: _Step, own_challenge: bytes) -> None:
        # The answer a peer holding the key will send, asked of our own card
        # while the peer works on it (off the handshake's critical path), so
        # that its answer is checked on the host before EXTERNAL
        # AUTHENTICATE: a peer without the key never reaches the card's
        # retry counter.
        self._ask_card(
            step, CardOperation.INTERNAL_AUTHENTICATE, own_challenge, ahead=True
        )

    def _peer_answer_matches(self) -> bool:
        expected = self._expected_answer
        return len(expected) == CHALLENGE_LENGTH and crypto.constant_time_equal(
            expected, self._peer_answer
        )

    def _card_server_expect(self, request: CardRequest, data: bytes) -> None:
        self._expected_answer = _challenge(data)
        self._step = _Step.WAIT_PASS2

    def _on_pass1(self, frame: Frame) -> None:
        _check_card_result(frame, "GET CHALLENGE")
        self._server_challenge = frame.payload
        self._ask_card(
            _Step.CARD_CLIENT_ANSWER,
            CardOperation.INTERNAL_AUTHENTICATE,
            self._server_challenge,
        )

    def _card_client_answer(self, request: CardRequest, data: bytes) -> None:
        self._own_answer = _challenge(data)
        if self._client_span_early:
            self._send_pass2()
            return
        self._ask_card(_Step.CARD_CLIENT_CHALLENGE, CardOperation.GET_CHALLENGE)

    def _card_client_challenge(self, request: CardRequest, data: bytes) -> None:
        self._client_challenge = _challenge(data)
        self._send_pass2()

    def _send_pass2(self) -> None:
        self._write(
            MessageId.MUTUAL_AUTH_PASS2_NOTIF,
            self._own_answer + self._client_challenge,
            option=ACK,
        )
        self._ask_expected_answer(_Step.CARD_CLIENT_EXPECT, self._client_challenge)

    def _card_client_expect(self, request: CardRequest, data: bytes) -> None:
        self._expected_answer = _challenge(data)
        self._step = _Step.WAIT_PASS3

    def _on_pass2(self, frame: Frame) -> None:
        _check_card_result(frame, "INTERNAL AUTHENTICATE or GET CHALLENGE")
        self._peer_answer = frame.payload[:CHALLENGE_LENGTH]
        self._client_challenge = frame.payload[CHALLENGE_LENGTH:]
        if not self._peer_answer_matches():
            self._nak(
                MessageId.MUTUAL_AUTH_PASS3_NOTIF,
                ErrorCode.REMOTE_ICCARD,
                bytes(CHALLENGE_LENGTH),
            )
            raise PeerAuthenticationFailed("client's answer to our challenge is wrong")
        self._ask_card(
            _Step.CARD_SERVER_ANSWER,
            CardOperation.INTERNAL_AUTHENTICATE,
            self._client_challenge,
        )

    def _card_server_answer(self, request: CardRequest, data: bytes) -> None:
        self._unsent_pass3 = self._write(
            MessageId.MUTUAL_AUTH_PASS3_NOTIF, _challenge(data), option=ACK
        )
        # The card's own check of an answer the host has already matched
        # runs while pass 3 travels; the connection is authenticated only
        # once it has passed (see _take_back_pass3 for a failure).
        self._ask_card(
            _Step.CARD_SERVER_EXTERNAL,
            CardOperation.EXTERNAL_AUTHENTICATE,
            self._peer_answer,
            ahead=True,
        )

    def _card_server_external(self, request: CardRequest, data: bytes) -> None:
        self._unsent_pass3 = None
        self._step = _Step.WAIT_COMPLETION

    def _on_pass3(self, frame: Frame) -> None:
        if frame.option == NAK:
            raise _peer_verdict("server", frame)
        _check_card_result(frame, "EXTERNAL or INTERNAL AUTHENTICATE")
        self._peer_answer = frame.payload
        if not self._peer_answer_matches():
            self._nak(MessageId.MUTUAL_AUTH_COMPLETION_NOTIF, ErrorCode.REMOTE_ICCARD)
            raise PeerAuthenticationFailed("server's answer to our challenge is wrong")
        self._ask_card(
            _Step.CARD_CLIENT_EXTERNAL,
            CardOperation.EXTERNAL_AUTHENTICATE,
            self._peer_answer,
        )

    def _card_client_external(self, request: CardRequest, data: bytes) -> None:
        self._write(MessageId.MUTUAL_AUTH_COMPLETION_NOTIF, option=ACK)
        self._authenticated()

    def _on_completion(self, frame: Frame) -> None:
        if frame.option != ACK:
            raise _peer_verdict("client", frame)
        self._authenticated()

    def _authenticated(self) -> None:
        self._step = _Step.DONE
        self._phase = Phase.MESSAGES
        if self.settings.allow_through_mode:
            self._decoder.through_mode_limit = self.settings.max_message_length
        if self.settings.chain_start is ChainStart.CHALLENGES:
            server_to_client, client_to_server = (
                self._client_challenge,
                self._server_challenge,
            )
            if self.role is Role.SERVER:
                self._tx_chain.restart_at(server_to_client)
                self._rx_chain.restart_at(client_to_server)
            else:
                self._tx_chain.restart_at(client_to_server)
                self._rx_chain.restart_at(server_to_client)
        self._server_challenge = self._client_challenge = b""
        self._own_answer = self._peer_answer = self._expected_answer = b""
        self._emit(Authenticated(self.auth_key_index, self.peer_auth_data or b""))
        self._pump()

    # -- our transmissions ---------------------------------------------------

    def send_message(self, data: bytes) -> int:
        """Queue a secured message; returns the id its MessageSent or
        SendRefused event will carry."""
        self._check_can_send(len(data))
        protection = self._own_protection()
        if protection.needs_key:
            self._own_key()
        return self._queue(_Outgoing(self._new_send_id(), bytes(data)))

    def send_through(self, data: bytes) -> int:
        """Queue an unsecured (through mode) message."""
        self._check_can_send(len(data))
        if not data:
            raise LocalProtocolError("a through-mode message cannot be empty")
        return self._queue(_Outgoing(self._new_send_id(), bytes(data), through=True))

    def request_disconnection(self) -> None:
        """Ask the peer to close once everything queued before is sent."""
        if self._phase is not Phase.MESSAGES:
            raise LocalProtocolError(f"cannot disconnect during {self._phase.value}")
        self._queue(_Outgoing(0, b"", disconnect=True))

    def _check_can_send(self, length: int) -> None:
        if self._phase is not Phase.MESSAGES or any(
            o.disconnect for o in self._tx_queue
        ):
            raise LocalProtocolError(f"cannot send during {self._phase.value}")
        limit = self.settings.max_message_length
        if self.peer_max_message_length is not None:
            limit = min(limit, self.peer_max_message_length)
        if length > limit:
            raise LocalProtocolError(
                f"message of {length} bytes exceeds the maximum message length {limit}",
                ErrorCode.LOCAL_SMALL_LENGTH,
            )

    def _new_send_id(self) -> int:
        send_id = self._next_send_id
        self._next_send_id += 1
        return send_id

    def _queue(self, outgoing: _Outgoing) -> int:
        self._tx_queue.append(outgoing)
        self._pump()
        return outgoing.send_id

    def _pump(self) -> None:
        while self._tx is _Tx.IDLE and self._tx_queue and self._phase is Phase.MESSAGES:
            outgoing = self._tx_queue.popleft()
            if outgoing.disconnect:
                self._phase = Phase.DISCONNECTION
                self._write(MessageId.LINE_DISCONNECTION_RQ)
            elif outgoing.through:
                self._write(MessageId.THROUGH_MODE_TRANSMISSION_NOTIF, outgoing.data)
                self._emit(MessageSent(outgoing.send_id, len(outgoing.data)))
            else:
                self._start_transmission(outgoing)

    def _start_transmission(self, outgoing: _Outgoing) -> None:
        settings = self.settings
        self._tx_current = outgoing
        self._tx = _Tx.WAIT_RP
        self._write(
            MessageId.MESSAGE_TRANSMISSION_RQ,
            pack_u32(
                self._order,
                settings.encryption,
                settings.encryption_key_index,
                settings.mac,
                len(outgoing.data),
            ),
        )

    def _on_transmission_rp(self, frame: Frame) -> None:
        outgoing = self._expect_tx(_Tx.WAIT_RP, frame)
        (length,) = unpack_u32(self._order, frame.payload, 1)
        if frame.option == NAK:
            self._refused(outgoing, frame.err_no, length)
            return
        _check_ack(frame, "message transmission request")
        if length != len(outgoing.data):
            raise RemoteProtocolError(
                f"peer acknowledged length {length}, we asked for {len(outgoing.data)}",
                ErrorCode.BAD_LENGTH,
            )
        if self._tx_seal_error is not None:
            raise self._tx_seal_error
        sealed = self._tx_sealed
        if sealed is not None:
            protection, random = sealed.protection, sealed.random
        else:
            protection, random = self._new_tx_protection()
        self._tx_protection = protection
        if self.settings.encryption_key_index == UNIQUE_SESSION_KEYS:
            self._tx = _Tx.WAIT_RANDOM_RP
            self._write(MessageId.RNDNO_FOR_SESSION_KEY_RQ, random)
            return
        self._transmit(outgoing)

    def _new_tx_protection(self) -> tuple[Protection, bytes]:
        """Our protection for the next message, and its session-key random
        number (b"" unless key index 0x10)."""
        if self.settings.encryption_key_index != UNIQUE_SESSION_KEYS:
            return self._own_protection(self._own_key_if_needed()), b""
        random = self.settings.random_bytes(CHALLENGE_LENGTH)
        protection = self._own_protection()
        if protection.needs_key:
            protection = _with_key(protection, self._session_key(random))
        return protection, random

    def seal_ahead(self) -> None:
        """Encrypt and MAC the message whose transmission request is out,
        before the peer answers it.

        A driver calls this once that request is written, so our encryption
        runs while the peer is still decrypting our previous message; the
        frames are written only when the peer accepts.  If it refuses, the
        chain goes back to where it was.  Optional: without it the message
        is sealed when the acceptance arrives.  A failure here waits for
        the peer's answer: an acceptance then fails the connection with it.
        """
        outgoing = self._tx_current
        if (
            self._tx is not _Tx.WAIT_RP
            or outgoing is None
            or outgoing.through
            or self._tx_sealed is not None
            or self._tx_seal_error is not None
        ):
            return
        try:
            protection, random = self._new_tx_protection()
            iv_before = self._tx_chain.iv
            body, mac = protection.seal(outgoing.data, self._tx_chain)
        except IsclError as exc:
            self._tx_seal_error = exc
            return
        self._tx_sealed = _Sealed(
            outgoing.send_id, protection, random, body, mac, iv_before
        )

    def _unseal(self) -> None:
        """Forget a refused message's sealing; roll its chain back."""
        sealed, self._tx_sealed = self._tx_sealed, None
        self._tx_seal_error = None
        if sealed is not None:
            self._tx_chain.iv = sealed.iv_before
        if self.settings.encryption_key_index == UNIQUE_SESSION_KEYS:
            _discard_key(sealed.protection if sealed else self._tx_protection)
        self._tx_protection = None

    def _on_random_rp(self, frame: Frame) -> None:
        outgoing = self._expect_tx(_Tx.WAIT_RANDOM_RP, frame)
        if frame.option == NAK:
            self._refused(outgoing, frame.err_no or ErrorCode.RECEIVED_NAK, None)
            return
        _check_ack(frame, "random number for session key request")
        self._transmit(outgoing)

    def _expect_tx(self, state: _Tx, frame: Frame) -> _Outgoing:
        if self._tx is not state or self._tx_current is None:
            raise _unexpected(frame.message_id, "no matching request of ours")
        return self._tx_current

    def _refused(self, outgoing: _Outgoing, err_no: int, length: int | None) -> None:
        if err_no == ErrorCode.LOCAL_SMALL_LENGTH:
            code = ErrorCode.PEER_SMALL_LENGTH
            self.peer_max_message_length = length
        else:
            code = _error_code(err_no) or ErrorCode.RECEIVED_NAK
            length = None
        log.info(
            "%s: peer refused message %d: %s",
            self.role.value,
            outgoing.send_id,
            code.name,
        )
        self._unseal()
        self._tx = _Tx.IDLE
        self._tx_current = None
        self._emit(SendRefused(outgoing.send_id, code, length))
        self._pump()

    def _transmit(self, outgoing: _Outgoing) -> None:
        assert self._tx_protection is not None
        sealed, self._tx_sealed = self._tx_sealed, None
        if sealed is not None and sealed.send_id == outgoing.send_id:
            body, mac = sealed.body, sealed.mac
        else:
            body, mac = self._tx_protection.seal(outgoing.data, self._tx_chain)
        block = self.block_length
        for start in range(0, len(body), block):
            self._write(
                MessageId.MESSAGE_TRANSMISSION_NOTIF, body[start : start + block]
            )
        if mac:
            self._write(MessageId.MAC_TRANSMISSION_NOTIF, mac)
        self._tx = _Tx.IDLE
        self._tx_current = None
        if self.settings.encryption_key_index == UNIQUE_SESSION_KEYS:
            _discard_key(self._tx_protection)
        self._tx_protection = None
        self._emit(MessageSent(outgoing.send_id, len(outgoing.data)))
        self._pump()

    def _own_protection(self, key: MessageKey | None = None) -> Protection:
        settings = self.settings
        return Protection(
            settings.encryption,
            settings.mac,
            key,
            settings.padding,
            settings.iv_policy,
            settings.mac_key_policy,
        )

    def _own_key(self) -> MessageKey:
        index = self.settings.encryption_key_index
        if index == UNIQUE_SESSION_KEYS:
            index = self.settings.session_key_base_index
        return self._key(index)

    def _own_key_if_needed(self) -> MessageKey | None:
        return self._own_key() if self._own_protection().needs_key else None

    def _key(self, index: int) -> MessageKey:
        try:
            key = self._keys.get(index)
        except ConfigError as exc:
            raise LocalProtocolError(
                f"encryption key {index} is not available"
            ) from exc
        return SoftwareKey(key) if isinstance(key, bytes) else key

    def _session_key(self, random: bytes) -> MessageKey:
        return self._key(self.settings.session_key_base_index).derive(random)

    # -- the peer's transmissions ----------------------------------------------

    def _peer_sender_message(self, frame: Frame) -> None:
        handler = _RX_HANDLERS.get((self._rx, frame.message_id))
        if handler is None:
            if self._rx is _Rx.WAIT_RANDOM:
                raise RemoteProtocolError(
                    f"expected RNDNO_FOR_SESSION_KEY_RQ, got {frame.message_id.name}",
                    ErrorCode.RND_NO_FOR_SESSION_KEY_EXPECTED,
                )
            raise _unexpected(
                frame.message_id, f"peer transmission state {self._rx.name}"
            )
        handler(self, frame)

    def _on_transmission_rq(self, frame: Frame) -> None:
        encryption, key_index, mac, length = unpack_u32(self._order, frame.payload, 4)
        self.peer_encryption = encryption
        self.peer_mac = mac
        self.peer_requested_length = length

        if length > self.settings.max_message_length:
            self._refuse_transmission(
                ErrorCode.LOCAL_SMALL_LENGTH,
                self.settings.max_message_length,
                f"{length} bytes is over our maximum",
            )
            return
        reason = self.settings.refusal_of(encryption, mac)
        if reason is None:
            reason = self._key_refusal(key_index, encryption, mac)
        if reason is not None:
            self._refuse_transmission(ErrorCode.MSG_TRANSMISSION, length, reason)
            return

        protection = Protection(
            EncryptionMethod(encryption),
            MacMethod(mac),
            None,
            self.settings.padding,
            self.settings.iv_policy,
            self.settings.mac_key_policy,
        )
        if protection.needs_key and key_index != UNIQUE_SESSION_KEYS:
            protection = _with_key(protection, self._key(key_index))
        self._rx_current = _Incoming(
            protection,
            key_index,
            length,
            body_length(length, protection.encryption, protection.padding),
            mac_field_length(protection.encryption, protection.mac, protection.padding),
            bytearray(),
        )
        self._write(
            MessageId.MESSAGE_TRANSMISSION_RP, pack_u32(self._order, length), option=ACK
        )
        if key_index == UNIQUE_SESSION_KEYS:
            self._rx = _Rx.WAIT_RANDOM
        else:
            self._rx = _Rx.DATA
            self._check_incoming_complete()

    def _key_refusal(self, key_index: int, encryption: int, mac: int) -> str | None:
        needs_key = encryption == EncryptionMethod.DES_CBC or mac == MacMethod.DESMAC
        if key_index == UNIQUE_SESSION_KEYS:
            key_index = self.settings.session_key_base_index
        elif key_index not in range(1, 9):
            return f"encryption key index 0x{key_index:X} is not 1..8 or 0x10"
        if needs_key and key_index not in self._keys:
            return f"no encryption key {key_index}"
        return None

    def _refuse_transmission(self, code: ErrorCode, length: int, reason: str) -> None:
        log.warning("%s: refusing peer's message: %s", self.role.value, reason)
        self._nak(
            MessageId.MESSAGE_TRANSMISSION_RP, code, pack_u32(self._order, length)
        )

    def _on_random_rq(self, frame: Frame) -> None:
        incoming = self._incoming()
        if incoming.protection.needs_key:
            key = self._session_key(frame.payload)
            incoming.protection = _with_key(incoming.protection, key)
        self._write(MessageId.RNDNO_FOR_SESSION_KEY_RP, option=ACK)
        self._rx = _Rx.DATA
        self._check_incoming_complete()

    def _on_data(self, frame: Frame) -> None:
        incoming = self._incoming()
        if len(incoming.body) + len(frame.payload) > incoming.body_length:
            raise RemoteProtocolError(
                f"data notifications exceed the announced {incoming.body_length} bytes",
                ErrorCode.BAD_LENGTH,
            )
        incoming.body += frame.payload
        self._check_incoming_complete()

    def _check_incoming_complete(self) -> None:
        incoming = self._incoming()
        if len(incoming.body) < incoming.body_length:
            return
        if incoming.mac_length:
            self._rx = _Rx.MAC
        else:
            self._deliver(b"")

    def _on_mac(self, frame: Frame) -> None:
        incoming = self._incoming()
        if len(frame.payload) != incoming.mac_length:
            raise IntegrityError(
                f"MAC notification of {len(frame.payload)} bytes, expected "
                f"{incoming.mac_length}",
                ErrorCode.BAD_LENGTH,
            )
        self._deliver(frame.payload)

    def _deliver(self, mac_field: bytes) -> None:
        incoming = self._incoming()
        try:
            data = incoming.protection.open(
                bytes(incoming.body), mac_field, self._rx_chain
            )
        finally:
            if incoming.key_index == UNIQUE_SESSION_KEYS:
                _discard_key(incoming.protection)
        self._rx = _Rx.IDLE
        self._rx_current = None
        self._emit(
            MessageReceived(
                data,
                incoming.protection.encryption,
                incoming.protection.mac,
                incoming.key_index,
            )
        )

    def _incoming(self) -> _Incoming:
        assert self._rx_current is not None
        return self._rx_current

    def _on_through(self, frame: Frame) -> None:
        # The decoder refuses through mode unless the policy allows it.
        log.warning("%s: accepted a through-mode (unsecured) message", self.role.value)
        self._emit(ThroughModeReceived(frame.payload))

    def _peer_receiver_message(self, frame: Frame) -> None:
        if frame.message_id is MessageId.MESSAGE_TRANSMISSION_RP:
            self._on_transmission_rp(frame)
        else:
            self._on_random_rp(frame)

    # -- line disconnection ----------------------------------------------------

    def _on_disconnection_request(self) -> None:
        if self._rx is not _Rx.IDLE:
            raise _unexpected(
                MessageId.LINE_DISCONNECTION_RQ, "the peer's own transmission"
            )
        if self.settings.refuse_disconnection or (
            self._phase is Phase.MESSAGES and self.sending
        ):
            self._nak(MessageId.LINE_DISCONNECTION_RP, ErrorCode.PEER_REFUSE_CLOSE)
            return
        self._write(MessageId.LINE_DISCONNECTION_RP, option=ACK)
        self._closed(by_peer=True)

    def _on_disconnection_response(self, frame: Frame) -> None:
        if self._phase is not Phase.DISCONNECTION:
            raise _unexpected(frame.message_id, self._phase.value)
        if frame.option == NAK:
            self._phase = Phase.MESSAGES
            self._emit(CloseRefused())
            self._pump()
            return
        _check_ack(frame, "line disconnection request")
        self._closed(by_peer=False)

    def _discard_session_keys(self) -> None:
        """A message cut short leaves its session key behind: destroy it."""
        if self.settings.encryption_key_index == UNIQUE_SESSION_KEYS:
            _discard_key(self._tx_protection)
            if self._tx_sealed is not None:
                _discard_key(self._tx_sealed.protection)
        incoming = self._rx_current
        if incoming is not None and incoming.key_index == UNIQUE_SESSION_KEYS:
            _discard_key(incoming.protection)

    def _closed(self, by_peer: bool) -> None:
        self._phase = Phase.CLOSED
        self._tx_queue.clear()
        self._discard_session_keys()
        self._emit(ConnectionClosed(by_peer))


def _discard_key(protection: Protection | None) -> None:
    """Destroy a one-message session key where it lives (a token object)."""
    if protection is not None and protection.key is not None:
        protection.key.discard()


def _with_key(protection: Protection, key: MessageKey) -> Protection:
    return Protection(
        protection.encryption,
        protection.mac,
        key,
        protection.padding,
        protection.iv_policy,
        protection.mac_key_policy,
    )


def _challenge(data: bytes) -> bytes:
    if len(data) != CHALLENGE_LENGTH:
        raise CardError(f"card answered {len(data)} bytes, expected {CHALLENGE_LENGTH}")
    return data


def _unexpected(message_id: MessageId, where: str) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"unexpected {message_id.name} during {where}", ErrorCode.BAD_MSGID
    )


def _error_code(value: int) -> ErrorCode | None:
    try:
        return ErrorCode(value)
    except ValueError:
        return None


def _err_no_text(err_no: int) -> str:
    code = _error_code(err_no)
    return f" (peer error {code.value} {code.name})" if code and code.value else ""


def _peer_verdict(peer: str, frame: Frame) -> IsclError:
    """What a NAK in pass 3 or the completion notice means: the peer's card
    failed (it says LOCAL_ICCARD), or the peer refused our answer."""
    if frame.err_no == ErrorCode.LOCAL_ICCARD:
        return RemoteProtocolError(
            f"{peer}'s card failed before it could check our answer"
            + _err_no_text(frame.err_no),
            ErrorCode.REMOTE_ICCARD,
        )
    return PeerRejectedAuthentication(
        f"{peer} refused our answer to its challenge" + _err_no_text(frame.err_no)
    )


def _check_ack(frame: Frame, what: str) -> None:
    if frame.option == NAK:
        raise RemoteProtocolError(
            f"peer refused the {what}" + _err_no_text(frame.err_no),
            ErrorCode.RECEIVED_NAK,
        )
    if frame.option != ACK:
        raise RemoteProtocolError(
            f"{frame.message_id.name} with Option 0x{frame.option:08X}, "
            "neither ACK nor NAK",
            ErrorCode.BAD_OPTION,
        )


def _check_card_result(frame: Frame, what: str) -> None:
    if frame.option != ACK:
        raise RemoteProtocolError(
            f"peer's card failed ({what})" + _err_no_text(frame.err_no),
            ErrorCode.REMOTE_ICCARD,
        )


_MESSAGE_STEPS = {
    _Step.WAIT_LINE_RQ: Connection._on_line_rq,
    _Step.WAIT_LINE_RP: Connection._on_line_rp,
    _Step.WAIT_AUTH_RQ: Connection._on_auth_rq,
    _Step.WAIT_AUTH_RP: Connection._on_auth_rp,
    _Step.WAIT_PASS1: Connection._on_pass1,
    _Step.WAIT_PASS2: Connection._on_pass2,
    _Step.WAIT_PASS3: Connection._on_pass3,
    _Step.WAIT_COMPLETION: Connection._on_completion,
}

_CARD_STEPS = {
    _Step.CARD_SERVER_CHALLENGE: Connection._card_server_challenge,
    _Step.CARD_SERVER_EXPECT: Connection._card_server_expect,
    _Step.CARD_SERVER_EXTERNAL: Connection._card_server_external,
    _Step.CARD_SERVER_ANSWER: Connection._card_server_answer,
    _Step.CARD_CLIENT_ANSWER: Connection._card_client_answer,
    _Step.CARD_CLIENT_EARLY_CHALLENGE: Connection._card_client_early_challenge,
    _Step.CARD_CLIENT_CHALLENGE: Connection._card_client_challenge,
    _Step.CARD_CLIENT_EXPECT: Connection._card_client_expect,
    _Step.CARD_CLIENT_EXTERNAL: Connection._card_client_external,
}

_RX_HANDLERS = {
    (_Rx.IDLE, MessageId.MESSAGE_TRANSMISSION_RQ): Connection._on_transmission_rq,
    (_Rx.IDLE, MessageId.THROUGH_MODE_TRANSMISSION_NOTIF): Connection._on_through,
    (_Rx.WAIT_RANDOM, MessageId.RNDNO_FOR_SESSION_KEY_RQ): Connection._on_random_rq,
    (_Rx.DATA, MessageId.MESSAGE_TRANSMISSION_NOTIF): Connection._on_data,
    (_Rx.MAC, MessageId.MAC_TRANSMISSION_NOTIF): Connection._on_mac,
}
