"""Fetching a fleet group's bundle over the agent's own connection (docs/PROTOCOL.md §14.2–14.4).

:class:`UpdateFetcher` rides on the :class:`~edgesplit.edge.connection.ServerConnection` of the
agent that currently sends frames: it claims the update messages before the session sees them
(:meth:`claim`), asks its group's offer after each welcome that lists ``"bundle_updates"`` and every
``poll_s``, and fetches the archive one chunk at a time: at most one ``bundle_get`` outstanding,
each chunk checked (id, range, length, SHA-256) before a byte of it is written, the accepted bytes
kept on disk as a prefix of the archive so that a drop, a server restart or the agent's own restart
resumes where it stopped. A finished archive is handed to the caller (:attr:`ready`); what it
is worth (its hash against the offer's, manifest hash, files, signature) is
:mod:`edgesplit.edge.ota_stage`'s to say, in a worker thread.

Inference first: chunks are small (``chunk_bytes``), one at a time, optionally paced to ``kbps``,
and only while the session is up; receiving one costs a hash and an append.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..wire import ota as O
from ..wire import protocol as P
from ..wire.errors import ErrorCode, ProtocolError
from ..wire.messages import ErrorReply

Say = Callable[..., None]  # Reporter.say(msg, level, **fields)
MAX_FAILURES = 5  # bad or missing chunks in a row before a download is abandoned until the next poll


@dataclass
class FetchFigures:
    queries: int = 0
    chunks: int = 0
    bytes_received: int = 0  # chunk payload bytes accepted
    bad_chunks: int = 0
    resumed_from: int = 0  # bytes already on disk when the last download (re)started
    downloads: int = 0  # archives completed (their hash is checked when staged)
    overloaded: int = 0  # gets the server refused OVERLOADED (its update budget), retried


class UpdateFetcher:
    """The update side channel of one agent process (one group). Single-threaded, like the agent."""

    def __init__(
        self,
        group: str,
        ota_dir: Path,
        say: Say,
        *,
        poll_s: float = 300.0,
        chunk_bytes: int = 16384,
        kbps: float | None = None,
        max_bytes: int = 256 << 20,
        timeout_s: float = 10.0,
    ):
        if not O.valid_group(group):
            raise ValueError(f"ota group must be 1-64 characters of A-Z a-z 0-9 . _ -, got {group!r}")
        self.group, self.say = group, say
        self.dir = Path(ota_dir) / "download"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.poll_ns, self.chunk_bytes = int(poll_s * 1e9), int(chunk_bytes)
        self.kbps, self.max_bytes, self.timeout_ns = kbps, int(max_bytes), int(timeout_s * 1e9)
        self.current = ""  # the bundle hash the agent runs (the manager keeps it up to date)
        self.skip: Callable[[str], bool] = lambda h: False  # the manager: rejected, or already staged
        self.paused = False  # the manager is staging or trying a bundle: no new download
        self.ready: tuple[O.Offer, Path] | None = None  # a complete archive matching its offer
        self.offer: O.Offer | None = None
        self.figures = FetchFigures()
        self.agent: Any = None
        self._welcome: Any = None
        self._limits = P.DEFAULT_LIMITS
        self._next_id = O.OTA_ID_BASE
        self._query: tuple[int, int] | None = None  # (id, sent at)
        self._get: tuple[int, int, int, int] | None = None  # (id, offset, length, sent at)
        self._next_query_ns = 0
        self._next_get_ns = 0
        self._failures = 0
        self._have = 0

    # -- the connection it rides on --------------------------------------------------------------
    def attach(self, agent: Any) -> None:
        """Ride on ``agent``'s connection from now on (the one new frames go to)."""
        if self.agent is not None and self.agent is not agent:
            self.agent.conn.side = None
        self.agent, self._welcome = agent, None
        self._query = self._get = None  # answers to the old connection are late now
        agent.conn.side = self.claim

    def _send(self, header: dict) -> None:
        self.agent.conn.send(P.pack(header))

    def _take_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    # -- time ------------------------------------------------------------------------------------
    def tick(self, now_ns: int) -> None:
        """Queries and gets that are due. Call each turn of the frame loop."""
        if self.agent is None:
            return
        w = self.agent.session.welcome
        if w is None or O.FEATURE_BUNDLE_UPDATES not in w.features:
            self._welcome = w
            return
        if w is not self._welcome:  # a new session: ask at once, and resume any download
            self._welcome, self._next_query_ns, self._get = w, now_ns, None
        if self._query is not None and now_ns - self._query[1] > self.timeout_ns:
            self._query = None
            self._next_query_ns = now_ns
        if self._query is None and now_ns >= self._next_query_ns and not self.paused and self.ready is None:
            rid = self._take_id()
            self._send(O.bundle_query(rid, self.group, self.current))
            self._query = (rid, now_ns)
            self._next_query_ns = now_ns + self.poll_ns
            self.figures.queries += 1
        if self._get is not None and now_ns - self._get[3] > self.timeout_ns:
            self._get = None
            self._chunk_failed(f"no answer to bundle_get within {self.timeout_ns / 1e9:.0f} s", now_ns)
        if self.offer is not None and self._get is None and not self.paused and now_ns >= self._next_get_ns:
            length = min(self.chunk_bytes, self.offer.chunk_bytes, self.offer.size - self._have)
            rid = self._take_id()
            self._send(O.bundle_get(rid, self.offer.bundle or "", self._have, length))
            self._get = (rid, self._have, length, now_ns)

    # -- what arrives ----------------------------------------------------------------------------
    def claim(self, parts: list, now_ns: int) -> bool:
        """The connection's side hook: True when ``parts`` was an update message (handled here),
        False to hand it to the session."""
        if not O.might_be_ota(parts[0]):
            return False
        try:
            msg = P.parse(parts, self._limits, (O.FEATURE_BUNDLE_UPDATES,))
        except ProtocolError:
            return False  # the session reports bad messages
        h = msg.header
        if msg.kind == P.Kind.ERROR:
            mine = {x[0] for x in (self._query, self._get) if x is not None}
            if h.get("id") not in mine:
                return h.get("id") is not None and h["id"] >= O.OTA_ID_BASE  # a late answer to an update message
            self._on_error(ErrorReply.from_header(h), now_ns)
            return True
        if msg.kind == O.OtaKind.OFFER:
            if self._query is not None and h["id"] == self._query[0]:
                self._query = None
                self._on_offer(O.Offer.from_header(h), now_ns)
            return True
        if msg.kind == O.OtaKind.CHUNK:
            if self._get is not None and h["id"] == self._get[0]:
                self._on_chunk(h, msg.frames[0], now_ns)
            return True
        return False

    def _on_error(self, e: ErrorReply, now_ns: int) -> None:
        if self._query is not None and e.rid == self._query[0]:
            self._query = None
            self._next_query_ns = now_ns + int(1e9)  # NOT_READY, SHUTTING_DOWN: ask again shortly
            return
        self._get = None
        if e.code == ErrorCode.UNKNOWN_BUNDLE:  # the group's bundle changed meanwhile: ask again
            self.say(f"update: {e.message}", logging.INFO, event="ota_offer_gone")
            self.offer, self._next_query_ns = None, now_ns
        elif e.code == ErrorCode.MALFORMED:
            self._abandon(f"the server refused a bundle_get: {e.message}", now_ns)
        else:  # OVERLOADED (the server's update budget), NOT_READY, SHUTTING_DOWN: later
            self.figures.overloaded += e.code == ErrorCode.OVERLOADED
            self._next_get_ns = now_ns + int((0.25 if e.code == ErrorCode.OVERLOADED else 1.0) * 1e9)

    def _on_offer(self, offer: O.Offer, now_ns: int) -> None:
        if offer.bundle is None or offer.bundle == self.current or self.skip(offer.bundle):
            return
        same = self.offer is not None and (self.offer.bundle, self.offer.sha256) == (offer.bundle, offer.sha256)
        if same and self.offer is not None and self.offer.size == offer.size:
            return  # already fetching it
        why = None
        if offer.archive != O.ARCHIVE_FORMAT:
            why = f"archive format {offer.archive!r} is not one this agent reads ({O.ARCHIVE_FORMAT})"
        elif offer.size > self.max_bytes:
            why = f"the archive is {offer.size} bytes, over this agent's limit of {self.max_bytes} (ota_max_bytes)"
        part = self.dir / f"{offer.bundle}-{offer.sha256[:16]}.part"
        for old in self.dir.glob("*.part"):
            if old != part:
                old.unlink(missing_ok=True)  # a download of an offer no longer current
        have = part.stat().st_size if part.is_file() else 0
        if have > offer.size:
            part.unlink()
            have = 0
        free = shutil.disk_usage(self.dir).free
        if why is None and offer.size - have > free:
            why = f"not enough space in {self.dir}: {offer.size - have} bytes to fetch, {free} free"
        if why is not None:
            self.say(f"update to {offer.bundle[:16]} refused: {why}", logging.WARNING, event="ota_refused", reason=why)
            return
        self.offer, self._have, self._failures = offer, have, 0
        self.figures.resumed_from = have
        self.say(
            f"update: group {offer.group} offers bundle {offer.bundle[:16]} ({offer.size} bytes)"
            + (f", resuming at byte {have}" if have else ""),
            logging.INFO,
            event="ota_download",
            bundle=offer.bundle,
            size=offer.size,
            resume_from=have,
        )

    def _on_chunk(self, h: dict, frame: Any, now_ns: int) -> None:
        offer = self.offer
        assert self._get is not None
        _, offset, length, _ = self._get
        self._get = None
        if offer is None:
            return
        data = bytes(frame)
        want = min(length, offer.size - offset)
        problem = None
        if h["bundle"] != offer.bundle or h["offset"] != offset or h["size"] != offer.size:
            problem = f"chunk names bundle {h['bundle'][:16]} offset {h['offset']} size {h['size']}"
        elif len(data) != want:
            problem = f"chunk at offset {offset} has {len(data)} bytes, expected {want}"
        elif hashlib.sha256(data).hexdigest() != h["sha256"]:
            problem = f"chunk at offset {offset} does not match its SHA-256 (damaged on the way)"
        if problem is not None:
            self.figures.bad_chunks += 1
            self.say(
                f"update: {problem}: discarded, asking again", logging.WARNING, event="ota_bad_chunk", reason=problem
            )
            self._chunk_failed(problem, now_ns)
            return
        part = self.dir / f"{offer.bundle}-{offer.sha256[:16]}.part"
        try:
            with open(part, "ab") as f:
                f.write(data)
        except OSError as e:
            part.unlink(missing_ok=True)
            reason = "no space left on the device" if e.errno == errno.ENOSPC else str(e)
            self._abandon(f"cannot store the download: {reason}", now_ns)
            return
        self._have += len(data)
        self._failures = 0
        self.figures.chunks += 1
        self.figures.bytes_received += len(data)
        if self.kbps:
            self._next_get_ns = now_ns + int(len(data) * 8 / (self.kbps * 1000) * 1e9)
        if self._have == offer.size:
            self._complete(offer, part, now_ns)

    def _complete(self, offer: O.Offer, part: Path, now_ns: int) -> None:
        """Every byte is here: hand the archive over (its hash is checked by the staging worker,
        off the frame loop)."""
        done = part.with_suffix(".tar.gz")
        os.replace(part, done)
        self.figures.downloads += 1
        self.offer, self.ready = None, (offer, done)
        name = offer.bundle or ""
        self.say(f"update: bundle {name[:16]} downloaded", logging.INFO, event="ota_downloaded", bundle=name)

    def _chunk_failed(self, why: str, now_ns: int) -> None:
        self._failures += 1
        if self._failures >= MAX_FAILURES:
            self._abandon(f"{self._failures} chunks failed in a row, the last: {why}", now_ns)

    def _abandon(self, why: str, now_ns: int) -> None:
        """Give the download up until the next poll (the prefix on disk stays unless removed)."""
        bundle = (self.offer.bundle if self.offer is not None else None) or "?"
        self.say(f"update to {bundle[:16]} abandoned: {why}", logging.WARNING, event="ota_abandoned", reason=why)
        self.offer, self._get, self._failures = None, None, 0
        self._next_query_ns = now_ns + self.poll_ns

    def clear_downloads(self) -> None:
        """Forget finished and partial archives (after staging, or a refusal)."""
        self.ready = None
        for f in self.dir.glob("*"):
            f.unlink(missing_ok=True)
