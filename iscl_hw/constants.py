"""ISCL V1.00 wire constants.

Every value here is from the public record (LEADTOOLS ``Ltdic.h`` and
``ltdicerrors.h``, see ``docs/protocol.md``) unless marked "our choice".
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "ACK",
    "AUTH_DATA_MAX",
    "AUTH_DATA_MIN",
    "CHALLENGE_LENGTH",
    "DEFAULT_MAX_BLOCK_LENGTH",
    "DEFAULT_MAX_MESSAGE_LENGTH",
    "HEADER_LENGTH",
    "ISCL_PORT",
    "KEY_INDEXES",
    "KEY_LENGTH",
    "MIN_BLOCK_LENGTH",
    "NAK",
    "UNIQUE_SESSION_KEYS",
    "VERSION_V1_00",
    "EncryptionMethod",
    "ErrorCode",
    "MacMethod",
    "MessageId",
    "MutualAuthMethod",
]

# Ltdic.h: 32-byte header of eight unsigned 32-bit words.
HEADER_LENGTH: Final = 32

# PS3.15 B.2 / IANA: "dicom-iscl".
ISCL_PORT: Final = 2761

# Ltdic.h DICOM_ISCL_MAX_PACKET_SIZE: 8192 minus the 32-byte header.
DEFAULT_MAX_BLOCK_LENGTH: Final = 8160

# Ltdic.h DICOM_ISCL_MAX_MESSAGE_SIZE.
DEFAULT_MAX_MESSAGE_LENGTH: Final = 1048576

# Ltdic.h: authentication data is 1..128 bytes.
AUTH_DATA_MIN: Final = 1
AUTH_DATA_MAX: Final = 128

# Our choice: the largest other payload we send is MUTUAL_AUTH_RQ with
# 128 bytes of authentication data and three u32 fields (140 bytes),
# rounded up to the DES block size.  A peer offering less could not carry
# it if it applied the block limit to every message.
MIN_BLOCK_LENGTH: Final = 144

# Challenges, responses and DES keys are 64-bit values (Ltdic.h, iOS headers).
CHALLENGE_LENGTH: Final = 8
KEY_LENGTH: Final = 8

# Our choice (the encoding is not public): 0x00010000 reads as "1.00".
VERSION_V1_00: Final = 0x00010000

ACK: Final = 0x00000000
NAK: Final = 0xFFFFFFFF

# Key pair ids 1..8 and UNIQUE_SESSION_KEYS (Ltdic.h).
KEY_INDEXES: Final = range(1, 9)
UNIQUE_SESSION_KEYS: Final = 0x10


class MessageId(enum.IntEnum):
    """Message identifiers, "values specified in ISCL standard" (Ltdic.h)."""

    LINE_CONNECTION_CHECK_RQ = 0x00110001
    LINE_CONNECTION_CHECK_RP = 0x00110003
    MUTUAL_AUTH_RQ = 0x00120001
    MUTUAL_AUTH_RP = 0x00120003
    MUTUAL_AUTH_PASS1_NOTIF = 0x00130002
    MUTUAL_AUTH_PASS2_NOTIF = 0x00140002
    MUTUAL_AUTH_PASS3_NOTIF = 0x00150002
    MUTUAL_AUTH_COMPLETION_NOTIF = 0x00160002
    MESSAGE_TRANSMISSION_RQ = 0x00200001
    MESSAGE_TRANSMISSION_NOTIF = 0x00200002
    MESSAGE_TRANSMISSION_RP = 0x00200003
    RNDNO_FOR_SESSION_KEY_RQ = 0x00210001
    RNDNO_FOR_SESSION_KEY_RP = 0x00210003
    MAC_TRANSMISSION_NOTIF = 0x00230002
    THROUGH_MODE_TRANSMISSION_NOTIF = 0x00260002
    LINE_DISCONNECTION_RQ = 0x00FF0001
    LINE_DISCONNECTION_RP = 0x00FF0003


class MutualAuthMethod(enum.IntEnum):
    THREE_PASS_FOUR_WAY = 0x00000000


class EncryptionMethod(enum.IntEnum):
    NONE = 0x00000000
    DES_CBC = 0x00001212


class MacMethod(enum.IntEnum):
    NONE = 0x00000000
    MD5 = 0x00001441
    DESMAC = 0x00004001


class ErrorCode(enum.IntEnum):
    """ISCL error codes (ltdicerrors.h)."""

    OK = 0
    BAD_OPTION = 100
    BAD_LENGTH = 101
    LOCAL_ICCARD = 102
    REMOTE_ICCARD = 103
    BAD_MSGID = 104
    BAD_VERSION = 105
    BAD_MUTUAL_AUTH_METHOD = 106
    BAD_COMMBLOCK_LENGTH = 107
    RECEIVED_NAK = 108
    MSG_TRANSMISSION = 109
    PEER_SMALL_LENGTH = 110
    LOCAL_SMALL_LENGTH = 111
    DECRYPT = 112
    BAD_MAC = 113
    RND_NO_FOR_SESSION_KEY_EXPECTED = 114
    PEER_REFUSE_CLOSE = 115
