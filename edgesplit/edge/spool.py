"""The agent's result spool: an ordered queue of JSON records on disk, bounded in bytes and in
records, that survives the agent's own restarts.

Layout of the spool directory: segment files ``NNNNNNNNNNNN.jsonl`` (one JSON object per line,
appended in order, a new segment every ``segment_records`` records) and ``cursor.json``
(``{"segment", "offset", "dropped"}``: where the oldest undelivered record starts, and how many
records were dropped for room over the spool's life). Delivery reads from the cursor and moves it
(written by rename, so it is never half-written); a segment wholly behind the cursor is deleted.

When full, the **oldest** records are dropped, and counted: a device that has been cut off for
long has to choose, and the records of now are what a reader acts on (and the newest records
cost the same disk as the oldest); the count, and the gap in the records' ``seq``, say that
something was lost. A last line cut off by a crash (power loss) is skipped and counted as dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

_CURSOR = "cursor.json"
_SUFFIX = ".jsonl"


class Spool:
    """Records in, records out in the same order; not thread-safe (the caller holds a lock)."""

    def __init__(self, directory: str | Path, max_bytes: int, max_records: int, segment_records: int = 1000):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.max_records = int(max_records)
        self.segment_records = max(1, int(segment_records))
        cur = self._read_cursor()
        self.dropped = int(cur.get("dropped", 0))
        # [segment number, records in it after the cursor, bytes after the cursor]; the first is the head
        self._segs: list[list[int]] = []
        self._offset = 0  # byte offset of the cursor in the head segment
        self._tail_records = 0  # records in the tail segment (all of them, for rotation)
        for path in sorted(self.dir.glob("*" + _SUFFIX)):
            n = int(path.stem)
            data = path.read_bytes()
            start = int(cur["offset"]) if n == cur.get("segment") else 0
            if cur.get("segment") is not None and n < cur["segment"]:
                path.unlink()  # delivered before a crash, not yet deleted
                continue
            if data and not data.endswith(b"\n"):  # cut off mid-line by a crash
                cut = data.rfind(b"\n") + 1
                with open(path, "r+b") as f:
                    f.truncate(cut)
                data = data[:cut]
                self.dropped += 1
            start = min(start, len(data))
            if not self._segs:
                self._offset = start
            rest = data[start:]
            self._segs.append([n, rest.count(b"\n"), len(rest)])
            self._tail_records = data.count(b"\n")

    # -- state ---------------------------------------------------------------------------------
    @property
    def records(self) -> int:
        return sum(s[1] for s in self._segs)

    @property
    def bytes(self) -> int:
        return sum(s[2] for s in self._segs)

    def __len__(self) -> int:
        return self.records

    def _path(self, n: int) -> Path:
        return self.dir / f"{n:012d}{_SUFFIX}"

    def _read_cursor(self) -> dict[str, Any]:
        try:
            cur = json.loads((self.dir / _CURSOR).read_text())
            return cur if isinstance(cur, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_cursor(self) -> None:
        head = self._segs[0][0] if self._segs else None
        tmp = self.dir / (_CURSOR + ".tmp")
        tmp.write_text(json.dumps({"segment": head, "offset": self._offset, "dropped": self.dropped}))
        os.replace(tmp, self.dir / _CURSOR)

    # -- in ------------------------------------------------------------------------------------
    def append(self, records: list[dict[str, Any]]) -> None:
        """Add records at the end; then drop the oldest while over either bound."""
        if not records:
            return
        i = 0
        while i < len(records):
            if not self._segs or self._tail_records >= self.segment_records:
                n = self._segs[-1][0] + 1 if self._segs else self._next_segment_number()
                self._segs.append([n, 0, 0])
                self._tail_records = 0
            seg = self._segs[-1]
            room = self.segment_records - self._tail_records
            chunk = records[i : i + room]
            data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in chunk)
            with open(self._path(seg[0]), "ab") as f:
                f.write(data)
            seg[1] += len(chunk)
            seg[2] += len(data)
            self._tail_records += len(chunk)
            i += len(chunk)
        over = False
        while self._segs and (self.records > self.max_records or self.bytes > self.max_bytes):
            self._advance(1, dropped=True)
            over = True
        if over:
            self._write_cursor()

    def _next_segment_number(self) -> int:
        cur = self._read_cursor().get("segment")
        return (cur + 1) if isinstance(cur, int) else 0

    # -- out -----------------------------------------------------------------------------------
    def peek(self, n: int) -> list[dict[str, Any]]:
        """Up to ``n`` of the oldest records, in order, without removing them."""
        out: list[dict[str, Any]] = []
        offset = self._offset
        for seg in self._segs:
            if len(out) >= n:
                break
            with open(self._path(seg[0]), "rb") as f:
                f.seek(offset)
                for _ in range(min(n - len(out), seg[1])):
                    out.append(json.loads(f.readline()))
            offset = 0
        return out

    def commit(self, n: int) -> None:
        """Remove the ``n`` oldest records (delivered), as :meth:`peek` returned them."""
        self._advance(n, dropped=False)
        self._write_cursor()

    def _advance(self, n: int, *, dropped: bool) -> None:
        while n > 0 and self._segs:
            head = self._segs[0]
            k = min(n, head[1])
            with open(self._path(head[0]), "rb") as f:
                f.seek(self._offset)
                skipped = sum(len(f.readline()) for _ in range(k))
            self._offset += skipped
            head[1] -= k
            head[2] -= skipped
            n -= k
            if dropped:
                self.dropped += k
            if head[1] == 0 and len(self._segs) > 1:  # the tail segment stays: appends go there
                self._path(head[0]).unlink(missing_ok=True)
                self._segs.pop(0)
                self._offset = 0
        if self._segs and self._segs[0][1] == 0 and len(self._segs) == 1:
            # everything delivered: the next record starts a fresh segment
            self._path(self._segs[0][0]).unlink(missing_ok=True)
            self._segs.clear()
            self._offset = 0
            self._tail_records = 0
