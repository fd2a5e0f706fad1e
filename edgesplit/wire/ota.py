"""Over-the-air bundle updates (docs/PROTOCOL.md §14, v1.3): the feature ``"bundle_updates"``, its
four kinds, their builders, validators and typed views.

``bundle_query`` (agent: my group, my bundle) is answered by ``bundle_offer`` (the group's current
bundle: hash, archive size and hash, chunk size, or none); ``bundle_get`` (a byte range of the
archive) by ``bundle_chunk`` (that range in one frame, with its SHA-256). The validators run only
for a receiver taking part in the feature (:data:`OTA_CHECKS`, composed into
:func:`edgesplit.wire.scatter.validators_for`); without it these kinds are unknown (MALFORMED),
as for any v1.2 peer.

This module checks the messages; what the bytes are worth (archive hash, manifest hash, the
publisher's signature) is the agent's business (edgesplit/edge/ota_stage.py).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Callable

from .errors import ErrorCode, ProtocolError
from .kinds import PROTOCOL_VERSION, Limits
from .validate import _get, _int, _no_frames, _str

FEATURE_BUNDLE_UPDATES = "bundle_updates"


class OtaKind:
    QUERY = "bundle_query"  # agent -> server
    OFFER = "bundle_offer"  # server -> agent
    GET = "bundle_get"  # agent -> server
    CHUNK = "bundle_chunk"  # server -> agent, one frame


OTA_KINDS = (OtaKind.QUERY, OtaKind.OFFER, OtaKind.GET, OtaKind.CHUNK)
AGENT_KINDS = (OtaKind.QUERY, OtaKind.GET)  # what a server accepts
# The reference agent numbers its update messages from here (its requests count up from 1), so an
# error's id says which of the two it answers (§14.1).
OTA_ID_BASE = 1 << 63
ARCHIVE_FORMAT = "tar.gz"
MAX_ARCHIVE_BYTES = 1 << 40
MIN_CHUNK_BYTES = 1024
MAX_GET_LENGTH = (1 << 31) - 1
GROUP_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
M = ErrorCode.MALFORMED

Validator = Callable[[dict, list, Limits], None]


def valid_group(group: str) -> bool:
    return isinstance(group, str) and GROUP_RE.fullmatch(group) is not None


def _hex64(h: dict, key: str, kind: str, rid: int | None) -> str:
    v = _get(h, key, kind, rid)
    if type(v) is not str or _HEX64.fullmatch(v) is None:
        raise ProtocolError(M, f"{kind}: '{key}' must be 64 lowercase hex characters (a SHA-256)", rid)
    return v


def _frame_len(f: Any) -> int:
    return len(f) if type(f) is bytes else memoryview(f).nbytes


# ---------------------------------------------------------------------------------------------
# Builders


def bundle_query(msg_id: int, group: str, bundle: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "kind": OtaKind.QUERY, "id": int(msg_id), "group": group, "bundle": bundle}


def bundle_offer(
    msg_id: int,
    group: str,
    bundle: str | None,
    *,
    size: int = 0,
    sha256: str = "",
    chunk_bytes: int = 0,
) -> dict[str, Any]:
    """The answer to a query; ``bundle=None``: nothing on offer for this group (no other keys)."""
    h: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": OtaKind.OFFER, "id": int(msg_id), "group": group}
    h["bundle"] = bundle
    if bundle is not None:
        h.update(size=int(size), sha256=sha256, chunk_bytes=int(chunk_bytes), archive=ARCHIVE_FORMAT)
    return h


def bundle_get(msg_id: int, bundle: str, offset: int, length: int) -> dict[str, Any]:
    return {
        "v": PROTOCOL_VERSION,
        "kind": OtaKind.GET,
        "id": int(msg_id),
        "bundle": bundle,
        "offset": int(offset),
        "length": int(length),
    }


def bundle_chunk(msg_id: int, bundle: str, offset: int, size: int, data: bytes) -> dict[str, Any]:
    """The header of a chunk carrying ``data`` (the frame that follows it)."""
    return {
        "v": PROTOCOL_VERSION,
        "kind": OtaKind.CHUNK,
        "id": int(msg_id),
        "bundle": bundle,
        "offset": int(offset),
        "size": int(size),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


# ---------------------------------------------------------------------------------------------
# Validators (header, frames, limits) -> None, raising ProtocolError with the message's id


def check_query(h: dict, frames: list, limits: Limits) -> None:
    rid = _int(h, "id", OtaKind.QUERY)
    _no_frames(OtaKind.QUERY, frames, rid)
    group = _get(h, "group", OtaKind.QUERY, rid)
    if not valid_group(group):
        raise ProtocolError(M, f"{OtaKind.QUERY}: 'group' must be 1 to 64 characters of A-Z a-z 0-9 . _ -", rid)
    _hex64(h, "bundle", OtaKind.QUERY, rid)


def check_offer(h: dict, frames: list, limits: Limits) -> None:
    rid = _int(h, "id", OtaKind.OFFER)
    _no_frames(OtaKind.OFFER, frames, rid)
    _str(h, "group", OtaKind.OFFER, 64, rid)
    if _get(h, "bundle", OtaKind.OFFER, rid) is None:
        return  # nothing on offer: the other keys are absent
    _hex64(h, "bundle", OtaKind.OFFER, rid)
    _int(h, "size", OtaKind.OFFER, 1, MAX_ARCHIVE_BYTES, rid)
    _hex64(h, "sha256", OtaKind.OFFER, rid)
    _int(h, "chunk_bytes", OtaKind.OFFER, MIN_CHUNK_BYTES, limits.max_frame_bytes, rid)
    _str(h, "archive", OtaKind.OFFER, 64, rid)


def check_get(h: dict, frames: list, limits: Limits) -> None:
    rid = _int(h, "id", OtaKind.GET)
    _no_frames(OtaKind.GET, frames, rid)
    _hex64(h, "bundle", OtaKind.GET, rid)
    _int(h, "offset", OtaKind.GET, 0, MAX_ARCHIVE_BYTES - 1, rid)
    _int(h, "length", OtaKind.GET, 1, MAX_GET_LENGTH, rid)


def check_chunk(h: dict, frames: list, limits: Limits) -> None:
    rid = _int(h, "id", OtaKind.CHUNK)
    if len(frames) != 1:
        raise ProtocolError(M, f"{OtaKind.CHUNK}: carries {len(frames)} frames, expected exactly one", rid)
    n = _frame_len(frames[0])
    if n > limits.max_frame_bytes:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"{OtaKind.CHUNK}: frame of {n} bytes, over the limit of {limits.max_frame_bytes}", rid
        )
    _hex64(h, "bundle", OtaKind.CHUNK, rid)
    offset = _int(h, "offset", OtaKind.CHUNK, 0, MAX_ARCHIVE_BYTES - 1, rid)
    size = _int(h, "size", OtaKind.CHUNK, 1, MAX_ARCHIVE_BYTES, rid)
    assert offset is not None and size is not None
    if n < 1 or offset + n > size:
        raise ProtocolError(M, f"{OtaKind.CHUNK}: {n} bytes at offset {offset} do not fit an archive of {size}", rid)
    _hex64(h, "sha256", OtaKind.CHUNK, rid)


# kind -> validator, for a receiver taking part in "bundle_updates" (edgesplit.wire.scatter composes it)
OTA_CHECKS: dict[str, Validator] = {
    OtaKind.QUERY: check_query,
    OtaKind.OFFER: check_offer,
    OtaKind.GET: check_get,
    OtaKind.CHUNK: check_chunk,
}


# ---------------------------------------------------------------------------------------------
# Typed views of what the agent receives


@dataclass(frozen=True)
class Offer:
    """A validated ``bundle_offer``; ``bundle`` None: nothing on offer for the group."""

    group: str
    bundle: str | None
    size: int = 0
    sha256: str = ""
    chunk_bytes: int = 0
    archive: str = ""

    @classmethod
    def from_header(cls, h: dict) -> "Offer":
        if h["bundle"] is None:
            return cls(h["group"], None)
        return cls(h["group"], h["bundle"], h["size"], h["sha256"], h["chunk_bytes"], h["archive"])


def might_be_ota(raw_header: Any) -> bool:
    """A cheap look at a received header frame, before the session parses it: could it be an
    update message, or an error about one (whose message names the kind)? False is certain; True
    means "parse it and look" (an error about a request that mentions these words comes back
    here and is handed on)."""
    return b"bundle_" in (raw_header if type(raw_header) is bytes else bytes(raw_header))
