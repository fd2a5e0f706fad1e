"""The client side of split training (docs/PROTOCOL.md §15) as a state machine: a
:class:`~edgesplit.wire.client_session.ClientSession` extended for ``train_fwd`` and ``train_bwd``.
No sockets, no threads, no clock of its own (the driver passes ``now_ns``), like the session it
extends; :class:`~edgesplit.families.sfprompt.wire_link.WireBody` is its driver.

What it adds to the client session:

- the handshake: a ``hello`` with ``serving: "u-shaped"``; a ``welcome`` for the package that
  does not list ``"split_training"`` is reported as :class:`Refused` (UNSUPPORTED, ``rid`` None),
  and the session stops saying hello and closes with ``bye`` (§15.2: the server cannot train);
  the welcome's ``train`` terms are kept (:attr:`SplitTrainSession.welcome_header`);
- :meth:`SplitTrainSession.step`: one training message, tracked by its **step id** (chosen by the
  caller, not taken from the request id sequence); made while there is no session, it is held and
  goes out after the next welcome;
- :meth:`SplitTrainSession.resend`: the same message again under the same step id, for a step that
  timed out or was lost with its session (§15.5: the server answers a retransmit again and never
  runs it twice; a ``train_bwd`` it no longer holds gets UNKNOWN_STEP).

A step's answer is an :class:`Answered` (the ``result``) or a :class:`Refused` (its error, e.g.
UNKNOWN_STEP) with ``rid`` = the step id. Heartbeats, the silence deadline, reconnects with
backoff, ``bye`` and NOT_READY (re-handshake, then resend once) are the client session's, unchanged.
"""

from __future__ import annotations

from typing import Any

from . import protocol as P
from . import split_train as S
from .client_session import ClientSession
from .errors import ErrorCode
from .session_events import Event, Outstanding, Refused, Send


class SplitTrainSession(ClientSession):
    """One split-training client's session with one body server, for one body package."""

    def __init__(self, package_hash: str, agent_name: str, **kwargs: Any):
        kwargs.setdefault("max_inflight", 4)  # what the hello asks; one step is in flight at a time
        super().__init__(package_hash, agent_name, **kwargs)
        self.welcome_header: dict[str, Any] | None = None  # the latest accepted welcome, ``train`` included

    @property
    def train_terms(self) -> dict[str, Any] | None:
        """``welcome.train`` (§15.2): tokens, max_pending, replay, ttl_ms."""
        return None if self.welcome_header is None else self.welcome_header.get("train")

    # -- what to send --------------------------------------------------------------------------
    def hello(self, now_ns: int) -> list:
        super().hello(now_ns)  # the handshake state and the retry schedule
        return P.pack(S.hello(self.bundle_hash, self.agent_name, "u-shaped", max_inflight=self.max_inflight))

    def step(
        self, kind: str, step_id: int, desc: dict, payload: Any, now_ns: int, *, grad: bool = True
    ) -> tuple[Outstanding, list | None]:
        """A ``train_fwd`` (``grad``: a ``train_bwd`` will follow) or ``train_bwd`` carrying
        ``payload`` (encoded as ``desc`` says). Returns its record and the parts to send now, or
        None while there is no session (held until the next welcome)."""
        if kind == S.TRAIN_FWD:
            header = S.train_fwd(step_id, desc, grad)
        elif kind == S.TRAIN_BWD:
            header = S.train_bwd(step_id, desc)
        else:
            raise ValueError(f"a training message is {S.TRAIN_FWD} or {S.TRAIN_BWD}, not {kind!r}")
        req = Outstanding(step_id, -1, [P.pack_header(header), payload], now_ns, False, desc, None, tag=kind)
        return req, self._track(req, now_ns)

    def resend(self, req: Outstanding, now_ns: int) -> list | None:
        """``req`` again, the same bytes under the same step id: the parts to send now, or None
        while there is no session (held until the next welcome)."""
        req.resent = False  # a new try may again be resent once after a NOT_READY
        return self._track(req, now_ns)

    def _track(self, req: Outstanding, now_ns: int) -> list | None:
        req.t_send_ns = now_ns
        self.outstanding[req.rid] = req
        if self.handshaking or self.welcome is None:
            if req.rid not in self._resend_after_welcome:
                self._resend_after_welcome.append(req.rid)
            return None
        self.last_send_ns = now_ns
        return req.parts

    # -- what arrives --------------------------------------------------------------------------
    def _on_welcome(self, h: dict, now_ns: int) -> list[Event]:
        if h["bundle"] == self.bundle_hash and S.FEATURE_SPLIT_TRAINING not in (h.get("features") or ()):
            self.handshaking = False  # this server cannot train: no more hellos, no session
            self.welcome = None
            return [
                Refused(
                    None,
                    ErrorCode.UNSUPPORTED,
                    f"{self.peer} does not offer split training (features {h.get('features')})",
                    None,
                ),
                Send(P.pack(P.bye("no split training"))),
            ]
        events = super()._on_welcome(h, now_ns)
        if self.welcome is not None and self.welcome.bundle == h["bundle"]:
            self.welcome_header = h
        return events
