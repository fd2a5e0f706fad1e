"""Contract 2, the wire protocol (docs/PROTOCOL.md): tensor codec, message schemas, ZeroMQ transport.

Importing this package needs numpy, msgpack and pyzmq only (zstandard when the zstd codec is used).
"""

from .codec import (
    CODECS,
    PACKED_BITS,
    ErrorCode,
    WireError,
    check_descriptor,
    decode,
    encode,
    encode_float,
    pack_bits,
    unpack_bits,
)
from .protocol import (
    DEFAULT_LIMITS,
    FEATURE_COMPACT_REQUESTS,
    KINDS,
    PROTOCOL_REVISION,
    PROTOCOL_VERSION,
    RESERVED_KINDS,
    SERVER_FEATURES,
    Kind,
    Limits,
    Message,
    ProtocolError,
    compact_descriptor,
    pack,
    parse,
)

__all__ = [
    "CODECS",
    "PACKED_BITS",
    "ErrorCode",
    "WireError",
    "check_descriptor",
    "decode",
    "encode",
    "encode_float",
    "pack_bits",
    "unpack_bits",
    "DEFAULT_LIMITS",
    "KINDS",
    "PROTOCOL_VERSION",
    "RESERVED_KINDS",
    "Kind",
    "Limits",
    "Message",
    "ProtocolError",
    "pack",
    "parse",
    "FEATURE_COMPACT_REQUESTS",
    "PROTOCOL_REVISION",
    "SERVER_FEATURES",
    "compact_descriptor",
]
