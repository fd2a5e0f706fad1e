"""The wire codec by bundle mode: the uniform codes of :mod:`edgesplit.wire.codec` (PROTOCOL.md
§4.1-4.3) or, for a mode whose ``codec`` is ``"ans"``, the entropy coder of
:mod:`edgesplit.wire.ans_codec` (§4.4) with the mode's table set. What agents, benchmarks and
evaluation call so that one line serves both kinds of mode."""

from __future__ import annotations

from typing import Any

import numpy as np

from .ans_codec import ANS_CODEC
from .ans_codec import decode as ans_decode
from .ans_codec import encode as ans_encode
from .ans_tables import ans_available
from .codec import QuantMode, decode, encode, supported_codecs
from .errors import ErrorCode, WireError


def tail_codecs() -> list[str]:
    """What a head-tail server decodes: :func:`supported_codecs` and, with the ``entropy`` extra,
    the entropy-coded ``"ans"`` of PROTOCOL.md §4.4 (for the modes of a bundle's ``cdf`` file)."""
    return supported_codecs() + ([ANS_CODEC] if ans_available() else [])


def encode_mode(
    x: np.ndarray, mode: QuantMode, *, tables: Any = None, codec: str = "raw", name: str = "wire", auto_margin: int = 0
) -> tuple[dict[str, Any], bytes]:
    """:func:`encode` for a bundle mode of either kind: an ``"ans"`` mode (``mode.codec``, PROTOCOL.md
    §4.4) codes its first ``mode.channels`` channels with ``tables`` (its table set; ``codec`` and
    ``auto_margin`` do not apply), any other mode quantizes and packs as :func:`encode` does."""
    if getattr(mode, "codec", "raw") != ANS_CODEC:
        return encode(x, mode, codec=codec, name=name, auto_margin=auto_margin)
    if tables is None:
        raise WireError(
            ErrorCode.UNSUPPORTED, f"mode {getattr(mode, 'id', '?')} is 'ans'-coded: its table set is needed"
        )
    c = int(mode.channels)
    return ans_encode(x if x.shape[-3] == c else x[..., :c, :, :], tables, scale=mode.scale, name=name)


def decode_any(d: dict[str, Any], payload, *, tables: Any = None, full_channels: int | None = None) -> np.ndarray:
    """:func:`decode`, or for an ``"ans"`` descriptor the §4.4 decoder with ``tables``."""
    if d.get("codec") == ANS_CODEC:
        return ans_decode(d, payload, tables, full_channels=full_channels)
    return decode(d, payload, full_channels=full_channels)
