"""The camera's session with one ED-ViT worker (docs/PROTOCOL.md §13): a
:class:`~edgesplit.wire.client_session.ClientSession` extended for scatter/gather. No sockets, no
threads, no clock of its own (the driver passes ``now_ns``), like the session it extends.

What it adds to the client session:

- the handshake: a ``hello`` naming the sub-models this camera will ask of the worker; a
  ``welcome`` is accepted only if it offers ``"scatter"`` and holds every sub-model asked (else it is
  reported as :class:`Refused` naming the difference and the session keeps handshaking, with the
  client session's backoff, until a later welcome passes);
- :meth:`scatter`: one frame to the worker, tracked by frame id (the id space is the camera's, the
  same for a frame on every worker) with the sub-models still pending;
- gathers checked against the camera's bundle and the frame: a valid one is :class:`Gathered`
  (decoded features), one that fails validation, names a sub-model not scattered, repeats one
  already answered, or is not the bundle's feature tensor (the wrong bundle or shape) is
  :class:`BadGather` with the reason (that sub-model is missing from the frame); an ``error`` about
  a frame is :class:`ScatterRefused` (one sub-model, or all still pending); anything about a frame
  no longer outstanding is :class:`LateGather` (counted, dropped).

The frame deadline is the driver's: at its cut-off it calls :meth:`abandon` for a frame still
outstanding, so what comes later is late. Heartbeats, the silence deadline, ``bye`` and link
events are the client session's, unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgpack

from ..wire import protocol as P
from ..wire import scatter_messages as S
from ..wire.client_session import ClientSession
from ..wire.codec import decode
from ..wire.errors import ErrorCode, ProtocolError, WireError
from ..wire.kinds import FEATURE_SCATTER, FEATURE_SCATTER_JPEG, Kind
from ..wire.messages import ErrorReply
from ..wire.session_events import (
    BadGather,
    Event,
    Gathered,
    LateGather,
    Outstanding,
    Refused,
    ScatterRefused,
    Send,
)

SCATTER_FEATURES = frozenset({FEATURE_SCATTER})


def _peek(parts: list) -> tuple[Any, Any, Any]:
    """The ``kind``, ``id`` and ``submodel`` of a message that did not validate (to tell a bad
    gather apart, and free its sub-model when it names one)."""
    try:
        h = msgpack.unpackb(parts[0], raw=False, strict_map_key=False)
    except Exception:
        return None, None, None
    return (h.get("kind"), h.get("id"), h.get("submodel")) if isinstance(h, dict) else (None, None, None)


class ScatterSession(ClientSession):
    """One camera session with one worker, for one ED-ViT bundle."""

    def __init__(
        self,
        bundle_hash: str,
        camera_name: str,
        features: Mapping[int, tuple[str, int]],
        *,
        submodels: Iterable[int] | None = None,
        **kwargs: Any,
    ):
        """``features``: every sub-model of the bundle -> (its feature tensor's name, its length D),
        what a gather must carry. ``submodels``: the sub-models this camera asks of this worker
        (None: whatever it holds)."""
        kwargs.setdefault("retry_not_ready", False)  # a frame is never resent: it has a deadline
        super().__init__(bundle_hash, camera_name, **kwargs)
        self.expected = dict(features)
        self.asked = None if submodels is None else tuple(sorted(submodels))
        self.worker_submodels: tuple[int, ...] = ()  # what the latest accepted welcome listed
        self.scatter_jpeg = False
        self._pending: dict[int, set[int]] = {}  # frame id -> sub-models not yet answered
        self._scattered: dict[int, frozenset[int]] = {}  # frame id -> sub-models asked
        self.bad_gathers = 0
        self.late_gathers = 0

    # -- state ---------------------------------------------------------------------------------
    @property
    def live(self) -> bool:
        """A session is up and a credit is free: a frame may be scattered now."""
        return self.welcome is not None and not self.handshaking and len(self.outstanding) < self.window

    # -- what to send --------------------------------------------------------------------------
    def hello(self, now_ns: int) -> list:
        super().hello(now_ns)  # the handshake state and the retry schedule
        return P.pack(
            S.worker_hello(
                self.bundle_hash, self.agent_name, self.asked, codecs=self.codecs, max_inflight=self.max_inflight
            )
        )

    def scatter(
        self, frame_id: int, deadline_ms: float, submodels: Iterable[int], desc: dict, payload: Any, now_ns: int
    ) -> list:
        """The parts of one frame's scatter, to send now (the driver checked :attr:`live`)."""
        subs = tuple(sorted(submodels))
        parts = [P.pack_header(S.scatter(frame_id, deadline_ms, subs, desc)), payload]
        self.outstanding[frame_id] = Outstanding(frame_id, -1, parts, now_ns, False, desc, deadline_ms)
        self._pending[frame_id] = set(subs)
        self._scattered[frame_id] = frozenset(subs)
        self.last_send_ns = now_ns
        return parts

    def abandon(self, rid: int) -> Outstanding | None:
        self._pending.pop(rid, None)
        self._scattered.pop(rid, None)
        return super().abandon(rid)

    def close(self) -> list[Outstanding]:
        self._pending.clear()
        self._scattered.clear()
        return super().close()

    # -- what arrives --------------------------------------------------------------------------
    def receive(self, parts: list, now_ns: int) -> list[Event]:
        try:
            msg = P.parse(parts, self.limits, SCATTER_FEATURES)
        except ProtocolError as e:
            kind, fid, sid = _peek(parts)
            if kind != Kind.GATHER:
                return super().receive(parts, now_ns)  # reported as the client session does
            self.last_recv_ns = now_ns
            fid = fid if type(fid) is int else None
            sid = sid if type(sid) is int and fid in self._scattered and sid in self._scattered[fid] else None
            return [self._bad(fid, sid, "invalid", f"invalid gather: {e.message}")]
        kind, h = msg.kind, msg.header
        if kind == Kind.GATHER:
            self.last_recv_ns = now_ns
            return [self._on_gather(h, msg.frames)]
        if kind == Kind.ERROR and h.get("id") is not None:
            self.last_recv_ns = now_ns
            return self._on_scatter_error(h, now_ns)
        if kind == Kind.WELCOME:
            self.last_recv_ns = now_ns
            refusal = self._check_welcome(h)
            if refusal is not None:
                return [refusal]
            self.worker_submodels = tuple(h["submodels"])
            self.scatter_jpeg = FEATURE_SCATTER_JPEG in h["features"]
            return self._on_welcome(h, now_ns)
        return super().receive(parts, now_ns)

    def _check_welcome(self, h: dict) -> Refused | None:
        if h["bundle"] != self.bundle_hash:
            return None  # the client session reports it (UNKNOWN_BUNDLE)
        if FEATURE_SCATTER not in h["features"]:
            return Refused(None, ErrorCode.UNSUPPORTED, f"{self.peer} does not offer 'scatter'", None)
        held = set(h["submodels"])
        lacking = sorted(set(self.asked or ()) - held)
        if lacking:
            return Refused(
                None,
                ErrorCode.UNKNOWN_SUBMODEL,
                f"{self.peer} does not hold sub-model(s) {lacking} (it holds {sorted(held)})",
                None,
            )
        unknown = sorted(held - set(self.expected))
        if unknown:
            return Refused(
                None,
                ErrorCode.UNKNOWN_SUBMODEL,
                f"{self.peer} lists sub-model(s) {unknown} that the bundle does not have",
                None,
            )
        return None

    def _finish_if_done(self, fid: int) -> bool:
        if self._pending.get(fid):
            return False
        self._pending.pop(fid, None)
        self._scattered.pop(fid, None)
        self.outstanding.pop(fid, None)
        return True

    def _bad(self, fid: int | None, sid: int | None, kind: str, reason: str) -> BadGather:
        self.bad_gathers += 1
        done = False
        if fid is not None and sid is not None and fid in self._pending and sid in self._pending[fid]:
            self._pending[fid].discard(sid)
            done = self._finish_if_done(fid)
        return BadGather(fid, sid, kind, reason, done)

    def _on_gather(self, h: dict, frames: list) -> Event:
        fid, sid = h["id"], h["submodel"]
        pending = self._pending.get(fid)
        if pending is None or fid not in self.outstanding:
            self.late_gathers += 1
            return LateGather(fid, sid)
        if sid not in self._scattered[fid]:
            return self._bad(
                fid, sid, "not_scattered", f"sub-model {sid} was not scattered to {self.peer} for frame {fid}"
            )
        if sid not in pending:
            return self._bad(fid, None, "duplicate", f"a second answer for frame {fid}, sub-model {sid}")
        d = h["outputs"][0]
        name, dim = self.expected[sid]
        if d["name"] != name or list(d["shape"]) != [dim]:
            return self._bad(
                fid,
                sid,
                "wrong_features",
                f"sub-model {sid}'s features are {d['name']!r} {list(d['shape'])}, the bundle's are {name!r} [{dim}] "
                "(the worker serves another bundle or shape)",
            )
        try:
            feats = decode(d, frames[0], validate=False)
        except WireError as e:
            return self._bad(fid, sid, "undecodable", f"sub-model {sid}'s features do not decode: {e.message}")
        pending.discard(sid)
        return Gathered(fid, sid, feats, S.GatherTimings.from_header(h), self._finish_if_done(fid))

    def _on_scatter_error(self, h: dict, now_ns: int) -> list[Event]:
        e = ErrorReply.from_header(h)
        fid, sid = e.rid, h.get("submodel")
        assert fid is not None
        pending = self._pending.get(fid)
        if pending is None or fid not in self.outstanding:
            self.late_gathers += 1
            return [LateGather(fid, sid)]
        if sid is not None:
            if sid not in pending:
                return [self._bad(fid, None, "duplicate", f"an error for frame {fid}, sub-model {sid}, not pending")]
            pending.discard(sid)
            return [ScatterRefused(fid, sid, (sid,), e.code, e.message, self._finish_if_done(fid))]
        refused = tuple(sorted(pending))
        pending.clear()
        self._finish_if_done(fid)
        out: list[Event] = [ScatterRefused(fid, None, refused, e.code, e.message, True)]
        if e.code == ErrorCode.NOT_READY and not self.handshaking:
            self.welcome = None  # the worker lost our session (restart, expiry): handshake again
            out.append(Send(self.hello(now_ns)))
        return out
