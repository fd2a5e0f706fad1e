"""The bundle-update keys of the agent's configuration: their ranges and the rules between them
(checked by :func:`edgesplit.edge.service_config.validate` with every other key). Kept apart from
the update machinery so that checking a config file imports none of it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

OTA_RANGES: dict[str, tuple[float, bool, float | None]] = {
    "ota_poll_s": (0, False, None),
    "ota_chunk_bytes": (1024, True, 8 << 20),
    "ota_kbps": (0, False, None),
    "ota_max_bytes": (4096, True, 1 << 40),
    "ota_health_frames": (1, True, 100000),
    "ota_max_error_rate": (0, True, 1),
}


def ota_dir(values: dict[str, Any]) -> Path | None:
    """Where updates live: ``ota_dir``, else ``$STATE_DIRECTORY/ota`` under systemd."""
    if values.get("ota_dir"):
        return Path(values["ota_dir"])
    state = os.environ.get("STATE_DIRECTORY")
    return Path(state.split(":")[0]) / "ota" if state else None


def check_ota(values: dict[str, Any], where: str) -> str | None:
    """The rules between the update keys: the problem, or None."""
    if values.get("ota_group") is None:
        for key in ("ota_pubkey", "ota_dir", "ota_kbps"):
            if values.get(key) is not None:
                return f"{where}: '{key}' is for bundle updates: it needs 'ota_group'"
        return None
    if values.get("ota_pubkey") is None:
        return f"{where}: 'ota_group' needs 'ota_pubkey' (the pinned publisher key)"
    if ota_dir(values) is None:
        return f"{where}: 'ota_group' needs 'ota_dir' (or STATE_DIRECTORY, which systemd sets)"
    if values.get("edvit"):
        return f"{where}: 'ota_group' is not available with 'edvit'"
    return None
