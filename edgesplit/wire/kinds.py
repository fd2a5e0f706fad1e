"""The vocabulary of wire protocol v1 that every wire module shares: versions, message kinds,
features and what a receiver accepts (docs/PROTOCOL.md §2, §3). :mod:`edgesplit.wire.protocol`
re-exports all of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

PROTOCOL_VERSION = 1  # the major version: the "v" of every header
PROTOCOL_REVISION = (1, 4)  # major.minor of docs/PROTOCOL.md; minor revisions add optional keys only
SUPPORTED_VERSIONS = (1,)
# Features a server may list in welcome.features (v1.1). A peer relies on one only when advertised.
FEATURE_COMPACT_REQUESTS = "compact_requests"
SERVER_FEATURES = (FEATURE_COMPACT_REQUESTS,)  # what `edgesplit serve` offers
# v1.2 (PROTOCOL.md §13, ED-ViT): a worker offers scatter (and scatter_jpeg when it decodes JPEG
# inputs); a server that fuses ED-ViT features offers fused_requests. `edgesplit serve` offers none.
FEATURE_SCATTER = "scatter"
FEATURE_SCATTER_JPEG = "scatter_jpeg"
FEATURE_FUSED_REQUESTS = "fused_requests"


class Kind:
    HELLO = "hello"
    WELCOME = "welcome"
    REQUEST = "request"
    RESULT = "result"
    ERROR = "error"
    PING = "ping"
    PONG = "pong"
    BYE = "bye"
    SCATTER = "scatter"  # v1.2, only with feature "scatter"; else one of RESERVED_KINDS
    GATHER = "gather"


KINDS = (Kind.HELLO, Kind.WELCOME, Kind.REQUEST, Kind.RESULT, Kind.ERROR, Kind.PING, Kind.PONG, Kind.BYE)
# Kinds outside the v1.0 core: UNSUPPORTED unless the receiver takes part in the feature that
# defines them (v1.2: scatter and gather, feature "scatter"; v1.4: train_fwd and train_bwd, feature
# "split_training", edgesplit.wire.split_train; model_update stays undefined).
RESERVED_KINDS = ("scatter", "gather", "train_fwd", "train_bwd", "model_update")


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts. The server advertises its limits in ``welcome``."""

    max_header_bytes: int = 64 * 1024  # frame 0, checked before unpacking
    max_frame_bytes: int = 8 << 20  # each tensor frame, and each tensor after zstd decompression
    max_frames: int = 16  # tensor frames per message
    max_batch: int = 256  # leading-axis rows in one request tensor

    def to_wire(self) -> dict[str, int]:
        return asdict(self)


DEFAULT_LIMITS = Limits()
