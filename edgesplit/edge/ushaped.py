"""The agent's part of U-shaped serving (SFPrompt; docs/PROTOCOL.md §15.2 and §15.6, BUNDLE.md §7.3):
head on this device, body on the server, tail on this device again, so labels and logits never
leave it. :class:`~edgesplit.edge.agent_core.Agent` composes a :class:`UShapedPart` when its bundle
is U-shaped; every other step of a frame (the head, the window, deadlines, fallback, results) is
the agent's as for any bundle.

What this part adds:

- the session (:func:`session_for`): the ``hello`` says ``serving: "u-shaped"``, and a ``welcome``
  for the bundle that does not list ``"u_shaped"`` is a server that cannot serve it (a server
  before v1.4 ignores ``serving``): reported as a refusal (UNSUPPORTED), no session, ``bye``;
- the request's tensor (:meth:`UShapedPart.encode`): the head's tokens ``[T, D]`` in the mode's
  dtype (float32, float16, or 8-bit codes whose scale is measured on this tensor), full form;
- the answer: the session checks each result's ``body_out`` (§15.6.1: the request's shape, in the
  mode's answer encoding when the ``welcome`` lists ``"u_shaped_answers"``, float32 otherwise); one
  that is not ends its frame MALFORMED and no tail runs on it. :meth:`UShapedPart.finish` runs the
  bundle's tail here on the body's output decoded to float32; the frame's ``tail_ms`` is the tail.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from ..bundle import Bundle, Mode
from ..engine.providers import OrtExecution, as_execution
from ..wire import protocol as P
from ..wire import split_train as S
from ..wire.client_session import ClientSession
from ..wire.errors import ErrorCode
from ..wire.session_events import Answered, Event, Refused, Send
from .connection import session_class
from .results import FrameResult

U_SHAPED = "u-shaped"
RESULT_NAME = S.REPLY_NAMES[S.TRAIN_FWD]  # "body_out"
FLOAT32 = ("float32", 32)  # the answer from a server without "u_shaped_answers", and the default


def session_for(bundle: Bundle, server: str | Sequence[str]) -> type[ClientSession]:
    """The session class an agent for ``bundle`` at ``server`` needs: the connection's
    (:func:`~edgesplit.edge.connection.session_class`), made U-shaped for a U-shaped bundle."""
    base = session_class(server)
    return base if bundle.serving != U_SHAPED else u_shaped_session(base, answer_encodings(bundle))


def answer_encodings(bundle: Bundle) -> dict[int, tuple[str, int]]:
    """Mode id -> the (dtype, bits) its results carry the body's output in from a server offering
    ``"u_shaped_answers"``: the mode's ``answer``, float32 when it states none (§15.6.1)."""
    return {m.id: (m.answer_dtype or FLOAT32[0], int(m.answer_bits or FLOAT32[1])) for m in bundle.modes}


def u_shaped_session(
    base: type[ClientSession], answers: dict[int, tuple[str, int]] | None = None
) -> type[ClientSession]:
    """``base`` with the U-shaped handshake of §15.2 and the answer checks of §15.6.1 (a subclass;
    ``base`` is unchanged). ``answers``: :func:`answer_encodings` of the bundle (None: every mode's
    answer is float32)."""

    class UShapedSession(base):  # type: ignore[valid-type,misc]
        answer_encoding: dict[int, tuple[str, int]] = dict(answers or {})
        compact_answers = False  # the current welcome lists "u_shaped_answers"

        def expected_answer(self, mode: int) -> tuple[str, int]:
            """The (dtype, bits) of ``body_out`` in a result to a request in ``mode`` on this session."""
            return self.answer_encoding.get(mode, FLOAT32) if self.compact_answers else FLOAT32

        def hello(self, now_ns: int) -> list:
            super().hello(now_ns)  # the handshake state and the retry schedule
            h = P.hello(self.bundle_hash, self.agent_name, codecs=self.codecs, max_inflight=self.max_inflight)
            h["serving"] = U_SHAPED
            return P.pack(h)

        def receive(self, parts: list, now_ns: int) -> list[Event]:
            events = super().receive(parts, now_ns)
            for i, ev in enumerate(events):
                if type(ev) is Answered:
                    why = self._answer_mismatch(ev)
                    if why is not None:  # a server fault: the frame fails, no tail runs on it
                        events[i] = Refused(ev.rid, ErrorCode.MALFORMED, why, ev.request)
            return events

        def _answer_mismatch(self, ev: Answered) -> str | None:
            """Why a result is not the answer its request must get (§15.6.1), or None."""
            req = ev.request
            dtype, bits = self.expected_answer(req.mode)
            want = (RESULT_NAME, list(req.desc["shape"]), dtype, bits, "raw")
            got = [(o["name"], list(o["shape"]), o["dtype"], o["bits"], o["codec"]) for o in ev.header["outputs"]]
            if got == [want]:
                return None
            return f"result does not match the mode's answer (PROTOCOL.md §15.6.1): expected [{want}], got {got}"

        def _on_welcome(self, h: dict, now_ns: int) -> list[Event]:
            features = h.get("features") or ()
            if h["bundle"] == self.bundle_hash and S.FEATURE_U_SHAPED not in features:
                self.handshaking = False  # this server cannot serve the bundle U-shaped: no more hellos
                self.welcome = None
                return [
                    Refused(
                        None,
                        ErrorCode.UNSUPPORTED,
                        f"{self.peer} does not offer U-shaped serving (features {h.get('features')})",
                        None,
                    ),
                    Send(P.pack(P.bye("no U-shaped serving"))),
                ]
            self.compact_answers = S.FEATURE_U_SHAPED_ANSWERS in features
            return super()._on_welcome(h, now_ns)

    UShapedSession.__name__ = UShapedSession.__qualname__ = f"UShaped{base.__name__}"
    return UShapedSession


class UShapedPart:
    """The tail of a U-shaped bundle on this device (ONNX Runtime), and the token tensor's wire form."""

    def __init__(self, bundle: Bundle, threads: int | OrtExecution | None = None):
        from ..engine import create_engine

        if bundle.serving != U_SHAPED:
            raise ValueError(f"bundle '{bundle.name}' is served {bundle.serving}, not U-shaped")
        self.bundle = bundle
        self.wire_name = bundle.wire_spec["name"]
        self.tokens = tuple(int(s) for s in bundle.wire_spec["shape"])  # (T, D)
        self.tail = create_engine(bundle.file("tail"), backend="ort", execution=as_execution(threads))
        self.tail.run1(np.zeros((1, *self.tokens), np.float32))  # ORT plans on its first run: not on a frame

    def encode(self, z: np.ndarray, mode: Mode, *, codec: str = "raw", **_: Any) -> tuple[dict, bytes]:
        """The head's tokens ``[T, D]`` (or ``[n, T, D]``) -> (descriptor, payload) in the mode's dtype."""
        if codec != "raw":
            raise ValueError(f"a U-shaped bundle's tokens travel raw (codec {codec!r} is for head-tail bundles)")
        return S.encode(z, int(mode.bits), self.wire_name)

    def finish(self, r: FrameResult, body_out: np.ndarray) -> np.ndarray:
        """A result's body output (decoded to float32 from its answer encoding) -> logits through
        the tail here (``r.tail_ms``); a body output that is not the bundle's tokens is refused
        (ValueError), never run."""
        t0 = time.perf_counter()
        single = body_out.ndim == 2
        x = body_out[None] if single else body_out
        if x.ndim != 3 or tuple(x.shape[1:]) != self.tokens:
            raise ValueError(f"body output {list(body_out.shape)} is not the tokens {list(self.tokens)}")
        logits = self.tail.run1(np.ascontiguousarray(x, np.float32))
        r.tail_ms = (time.perf_counter() - t0) * 1e3
        return logits[0] if single else logits


def u_shaped_part(bundle: Bundle, threads: int | OrtExecution | None, policy: Any, codec: str) -> UShapedPart | None:
    """The agent's U-shaped part for ``bundle``, or None when it is not U-shaped. A mode policy and
    a lossless codec other than raw are head-tail features (ValueError)."""
    if bundle.serving != U_SHAPED:
        return None
    if policy is not None:
        raise ValueError(f"bundle '{bundle.name}' is U-shaped: mode policies choose among head-tail modes only")
    if codec != "raw":
        raise ValueError(f"bundle '{bundle.name}' is U-shaped: its tokens travel raw, not with codec {codec!r}")
    return UShapedPart(bundle, threads)
