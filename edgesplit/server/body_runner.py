"""An SFPrompt body on the server (docs/PROTOCOL.md §15): the package it loads, the forward pass
of a training step (kept for its backward pass), the backward pass to the body's input, and the
forward-only pass of U-shaped inference. Torch on purpose: the backward pass needs autograd
through the body's blocks (the body's weights are frozen; only the input gradient is computed).

The per-session step table implements §15.5: pending steps (forward done, backward awaited; at
most ``max_pending``, dropped after ``ttl_ms``), and the encoded answers of the last ``replay``
finished steps, so that a retransmitted ``train_fwd`` or ``train_bwd`` is answered with the same
bytes and nothing runs twice.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..families.sfprompt.model import build_body
from ..wire import protocol as P
from ..wire import split_train as S
from ..wire.errors import ErrorCode, ProtocolError

BODY_SCHEMA = "edgesplit-body/1"
M = ErrorCode.MALFORMED

Reply = tuple[dict[str, Any], list[bytes]]


class PackageError(ValueError):
    """A body package that is missing, malformed or does not match its hashes."""


@dataclass
class BodyPackage:
    root: Path
    hash: str  # sha256 of manifest.json: what a hello names
    name: str
    tokens: tuple[int, int]  # (T, D)
    blocks: tuple[int, int]
    body: torch.nn.Module

    @classmethod
    def load(cls, root: str | Path) -> BodyPackage:
        root = Path(root)
        try:
            raw = (root / "manifest.json").read_bytes()
            m = json.loads(raw)
        except (OSError, ValueError) as e:
            raise PackageError(f"{root}: no readable manifest.json ({e})") from None
        if not isinstance(m, dict) or m.get("schema") != BODY_SCHEMA or m.get("serving") != "u-shaped":
            raise PackageError(f"{root}: not a body package (schema {BODY_SCHEMA}, serving u-shaped)")
        try:
            f = m["files"]["body"]
            blob = (root / Path(f["path"]).name).read_bytes()
            tokens = (int(m["tokens"][0]), int(m["tokens"][1]))
            blocks = (int(m["blocks"][0]), int(m["blocks"][1]))
            vit = m["vit"]
        except (KeyError, TypeError, ValueError, IndexError, OSError) as e:
            raise PackageError(f"{root}: manifest lacks or mistypes a key ({type(e).__name__}: {e})") from None
        if hashlib.sha256(blob).hexdigest() != f.get("sha256"):
            raise PackageError(f"{root}: {f['path']} does not match the sha256 in manifest.json")
        body = build_body(vit, *blocks)
        import io

        body.load_state_dict(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True), strict=True)
        return cls(root, hashlib.sha256(raw).hexdigest(), str(m.get("name", root.name)), tokens, blocks, body)


@dataclass
class _Pending:
    t_in: torch.Tensor
    out: torch.Tensor
    digest: bytes
    fwd: Reply
    bits: int
    born_ns: int  # the caller's monotonic clock when its train_fwd ran


@dataclass
class _Finished:
    digest: bytes
    fwd: Reply
    bwd: Reply | None


@dataclass
class Steps:
    pending: OrderedDict[int, _Pending] = field(default_factory=OrderedDict)
    finished: OrderedDict[int, _Finished] = field(default_factory=OrderedDict)


def _digest(d: dict[str, Any], frame) -> bytes:
    return hashlib.sha256(P.pack_header(d) + bytes(frame)).digest()


class BodyRunner:
    """The body of one package and every session's step table (one thread calls it)."""

    def __init__(self, package: BodyPackage, *, max_pending: int = 8, replay: int = 32, ttl_ms: int = 60_000):
        self.package = package
        self.body = package.body.eval()
        self.max_pending, self.replay, self.ttl_ms = int(max_pending), int(replay), int(ttl_ms)
        self.steps: dict[bytes, Steps] = {}
        self.counters = {"train_fwd": 0, "train_bwd": 0, "retransmits": 0, "expired": 0, "requests": 0}

    def train_terms(self) -> dict[str, Any]:
        """``welcome.train`` (§15.2)."""
        return {
            "tokens": list(self.package.tokens),
            "max_pending": self.max_pending,
            "replay": self.replay,
            "ttl_ms": self.ttl_ms,
        }

    def _check_tokens(self, kind: str, d: dict[str, Any], rid: int) -> None:
        if tuple(d["shape"][1:]) != self.package.tokens:
            T, D = self.package.tokens
            raise ProtocolError(M, f"{kind}: tensor {d['shape']} is not [n, {T}, {D}] (the body's tokens)", rid)

    def _answer(self, rid: int, name: str, y: np.ndarray, bits: int, t0: float) -> Reply:
        d, payload = S.encode(y, bits, name)
        us = (time.perf_counter() - t0) * 1e6  # computed in place: no queue
        return P.result(rid, [d], queue_us=0.0, compute_us=us, batch_size=int(y.shape[0]), server_us=us), [payload]

    def train_fwd(self, sid: bytes, h: dict[str, Any], frame, now_ns: int) -> Reply:
        rid, d, grad = h["id"], h["tensors"][0], h["grad"]
        st = self.steps.setdefault(sid, Steps())
        digest = _digest(d, frame)
        old = st.pending.get(rid) or st.finished.get(rid)
        if old is not None:  # §15.5: a retransmit, answered again; nothing runs
            if old.digest != digest:
                raise ProtocolError(M, f"train_fwd: step id {rid} reused with other content", rid)
            self.counters["retransmits"] += 1
            return old.fwd
        self._check_tokens("train_fwd", d, rid)
        if grad and len(st.pending) >= self.max_pending:
            raise ProtocolError(
                ErrorCode.OVERLOADED,
                f"{len(st.pending)} steps await their train_bwd (max_pending {self.max_pending})",
                rid,
            )
        x = S.decode(d, frame, rid)
        t0 = time.perf_counter()
        t_in = torch.from_numpy(x).requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = self.body(t_in)
        reply = self._answer(rid, S.REPLY_NAMES[S.TRAIN_FWD], out.detach().numpy(), S.bits_of(d), t0)
        if grad:
            st.pending[rid] = _Pending(t_in, out, digest, reply, S.bits_of(d), now_ns)
        else:
            self._finish(st, rid, _Finished(digest, reply, None))
        self.counters["train_fwd"] += 1
        return reply

    def train_bwd(self, sid: bytes, h: dict[str, Any], frame, now_ns: int) -> Reply:
        rid, d = h["id"], h["tensors"][0]
        st = self.steps.setdefault(sid, Steps())
        done = st.finished.get(rid)
        if done is not None and done.bwd is not None:  # §15.5: never a second backward pass
            self.counters["retransmits"] += 1
            return done.bwd
        p = st.pending.get(rid)
        if p is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_STEP,
                f"train_bwd: step {rid} is not pending here (forward-only, evicted, expired or before a restart): "
                "redo it from train_fwd",
                rid,
            )
        if list(d["shape"]) != list(p.out.shape):
            raise ProtocolError(
                M, f"train_bwd: gradient {d['shape']} is not step {rid}'s body_out {list(p.out.shape)}", rid
            )
        g = S.decode(d, frame, rid)
        t0 = time.perf_counter()
        p.out.backward(torch.from_numpy(g))
        assert p.t_in.grad is not None
        reply = self._answer(rid, S.REPLY_NAMES[S.TRAIN_BWD], p.t_in.grad.numpy(), S.bits_of(d), t0)
        del st.pending[rid]
        self._finish(st, rid, _Finished(p.digest, p.fwd, reply))
        self.counters["train_bwd"] += 1
        return reply

    def _finish(self, st: Steps, rid: int, f: _Finished) -> None:
        st.finished[rid] = f
        while len(st.finished) > self.replay:
            st.finished.popitem(last=False)

    def infer(self, h: dict[str, Any], frame) -> Reply:
        """U-shaped inference (§15.6): a request's tokens -> the body's output, float32."""
        rid = h["id"]
        if h.get("tensors") is None or len(h["tensors"]) != 1:
            raise ProtocolError(M, "a U-shaped request is sent in full form with exactly one tensor", rid)
        d = h["tensors"][0]
        if h["mode"] != 0:
            raise ProtocolError(ErrorCode.UNKNOWN_MODE, f"a U-shaped body has one mode, 0; got {h['mode']}", rid)
        single = len(d["shape"]) == 2
        if single:
            d = {**d, "shape": [1, *d["shape"]]}
        S.check_tensor("request", d, P.DEFAULT_LIMITS, rid)
        self._check_tokens("request", d, rid)
        x = S.decode(d, frame, rid)
        t0 = time.perf_counter()
        with torch.no_grad():
            y = self.body(torch.from_numpy(x)).numpy()
        self.counters["requests"] += 1
        return self._answer(rid, S.REPLY_NAMES[S.TRAIN_FWD], y[0] if single else y, 32, t0)

    def expire(self, now_ns: int) -> None:
        """Drop pending steps older than ``ttl_ms`` (their train_bwd would get UNKNOWN_STEP)."""
        ttl_ns = self.ttl_ms * 1_000_000
        for st in self.steps.values():
            for rid in [r for r, p in st.pending.items() if now_ns - p.born_ns > ttl_ns]:
                del st.pending[rid]
                self.counters["expired"] += 1

    def forget(self, sid: bytes) -> None:
        self.steps.pop(sid, None)

    def pending(self, sid: bytes) -> int:
        st = self.steps.get(sid)
        return 0 if st is None else len(st.pending)
