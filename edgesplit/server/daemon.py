"""The server daemon: one ROUTER socket, many agents, dynamic batching, one tail engine per bundle.

Threads and sockets (a pyzmq socket never leaves the thread that made it):

- **I/O thread** owns the ROUTER socket and the PULL end of an inproc wake-up pipe. It receives and
  validates every message, answers handshakes, heartbeats and errors itself, queues valid
  requests in the :class:`~edgesplit.server.batcher.Batcher`, and forwards finished replies from
  the pipe to the ROUTER. It never runs a model, so a slow tail never delays ingress.
- **compute thread** owns the PUSH end of the pipe. It takes due batches from the batcher,
  dequantizes each request straight into one stacked array, runs the tail once, appends one
  reply per request (``[identity, header, logits]``) to a deque and then sends one empty
  message down the pipe to wake the I/O thread: one socket call per batch, not three per reply
  (every pyzmq call drops and retakes the GIL, and two threads trading the GIL on each frame
  cost more than the work itself).

Every failure is answered with an error message carrying a code; nothing a peer sends can stop
the daemon. SIGINT/SIGTERM (or :meth:`Server.stop`) drain: new requests get SHUTTING_DOWN,
queued ones are computed and answered, every session gets ``bye``, sockets close, exit 0.

In-process use (tests, benchmarks, ``edgesplit demo``)::

    with Server([bundle], "tcp://127.0.0.1:0") as srv:   # port 0: any free port
        agent = Agent(bundle, srv.endpoint).connect()
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket as _socket
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import zmq

from ..bundle import Bundle, BundleError
from ..wire import codec, protocol as P
from ..wire.codec import ErrorCode, WireError
from ..wire.protocol import Kind, Limits, ProtocolError
from ..wire.transport import bind_router, context
from .batcher import Batcher, Item

log = logging.getLogger("edgesplit.server")

# Plain ints: pyzmq's enum constants cost an enum construction per use on the hot path.
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)


@dataclass
class Session:
    identity: bytes
    bundle: str          # bundle hash
    agent: str
    credits: int
    inflight: int = 0
    last_seen: float = 0.0
    last_ping: float = 0.0


class TailRunner:
    """A bundle's tail engine plus what is needed to turn requests into its input batch."""

    def __init__(self, bundle: Bundle, backend: str = "ort", threads: int | None = None):
        from ..engine import create_engine

        self.bundle = bundle
        path, used = bundle.file("tail"), "ort"
        if backend == "torch":
            if bundle.has("tail_torch"):
                path, used = bundle.file("tail_torch"), "torch"
            else:
                log.warning("bundle '%s' has no tail_torch file; running its ONNX tail with ONNX Runtime", bundle.name)
        elif backend != "ort":
            used = backend
        self.backend = used
        self.engine = create_engine(path, backend=used, threads=threads)
        spec = bundle.wire_spec
        self.wire_name = spec["name"]
        self.wire_shape = tuple(int(s) for s in spec["shape"])  # (C, h, w)
        self.input_name = self.engine.inputs[0].name
        self.output_name = self.engine.outputs[0].name
        self.modes = {m.id: m for m in bundle.modes}

    def warmup(self) -> None:
        self.engine.run({self.input_name: np.zeros((1, *self.wire_shape), np.float32)})

    def check(self, mode_id: int, d: dict[str, Any], rid: int) -> tuple[int, bool]:
        """Validate a request tensor against the bundle; return (rows, single)."""
        mode = self.modes.get(mode_id)
        if mode is None:
            raise ProtocolError(ErrorCode.UNKNOWN_MODE,
                                f"bundle '{self.bundle.name}' has no mode {mode_id} (modes: {sorted(self.modes)})", rid)
        if d["name"] != self.wire_name:
            raise ProtocolError(ErrorCode.MALFORMED, f"tensor is named '{d['name']}', the bundle's wire tensor is '{self.wire_name}'", rid)
        shape = d["shape"]
        C, h, w = self.wire_shape
        if len(shape) not in (3, 4) or tuple(shape[-2:]) != (h, w):
            raise ProtocolError(ErrorCode.MALFORMED, f"tensor shape {shape} does not fit the wire tensor [N,<= {C},{h},{w}]", rid)
        if d["bits"] != mode.bits or d["channels"] != mode.channels or shape[-3] > C:
            raise ProtocolError(ErrorCode.UNKNOWN_MODE,
                                f"tensor ({d['channels']} channels, {d['bits']} bits) disagrees with mode {mode.id} "
                                f"'{mode.name}' ({mode.channels} channels, {mode.bits} bits)", rid)
        rows = shape[0] if len(shape) == 4 else 1
        if rows < 1:
            raise ProtocolError(ErrorCode.MALFORMED, "request tensor has zero rows", rid)
        return rows, len(shape) == 3

    def run(self, items: list[Item]) -> tuple[np.ndarray, list[int], dict[int, WireError]]:
        """Decode the items into one batch and run the tail. Returns (logits, row offsets, per-item
        decode errors by index); items that failed to decode get no rows."""
        C, h, w = self.wire_shape
        rows = sum(it.rows for it in items)
        c = items[0].desc["shape"][-3]
        x = (np.zeros if c < C else np.empty)((rows, C, h, w), np.float32)
        offsets, errors, r = [], {}, 0
        for i, it in enumerate(items):
            d = it.desc
            dst = x[r: r + it.rows, :c] if len(d["shape"]) == 4 else x[r, :c]
            try:
                codec.decode(d, it.payload, out=dst, validate=False)
            except WireError as e:
                errors[i] = e
                offsets.append(-1)
                continue
            offsets.append(r)
            r += it.rows
        if r == 0:
            return np.empty((0,), np.float32), offsets, errors
        out = self.engine.run({self.input_name: x[:r]})[self.output_name]
        return np.asarray(out, dtype=np.float32), offsets, errors


class Server:
    """The daemon, usable in-process: ``start()`` runs it in background threads, ``stop()`` drains."""

    def __init__(self, bundles: Iterable[Bundle | str | Path], bind: str = "tcp://127.0.0.1:5555", *,
                 backend: str = "ort", threads: int | None = None, max_batch: int = 32,
                 max_queue_delay_us: float = 2000.0, max_queue: int = 1024, credits: int = 64,
                 heartbeat_ms: int = 5000, limits: Limits | None = None, name: str | None = None):
        self.bundles: dict[str, Bundle] = {}
        for b in bundles:
            b = b if isinstance(b, Bundle) else Bundle.load(b)
            self.bundles[b.hash] = b
        if not self.bundles:
            raise ValueError("the server needs at least one bundle")
        self.bind = bind
        self.backend = backend
        self.threads = threads
        self.credits = int(credits)
        self.heartbeat_ms = int(heartbeat_ms)
        # The advertised per-request row limit is the server's batch size: a request never splits.
        self.limits = replace(limits or Limits(), max_batch=int(max_batch))
        self.name = name or f"{_socket.gethostname()}:{os.getpid()}"
        self.batcher = Batcher(max_batch, max_queue_delay_us, max_queue)
        self.runners: dict[str, TailRunner] = {}
        self.endpoint: str | None = None
        self.sessions: dict[bytes, Session] = {}
        self.counters: Counter = Counter()   # written by the I/O thread only
        self._ccounters: Counter = Counter()  # written by the compute thread only
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.failed = False  # set when a server thread died of a bug (serve_main then exits 1)
        self._io_thread: threading.Thread | None = None
        self._compute_thread: threading.Thread | None = None
        self._pipe = f"inproc://edgesplit-server-{id(self):x}"
        self._replies: deque[list] = deque()  # compute thread appends, I/O thread pops
        self._codecs = codec.supported_codecs()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "Server":
        """Load the tail engines, bind, and start the I/O and compute threads. Returns self once
        the socket is bound (``self.endpoint`` is the actual endpoint, port resolved)."""
        for h, b in self.bundles.items():
            if h not in self.runners:
                r = TailRunner(b, self.backend, self.threads)
                r.warmup()
                self.runners[h] = r
        self._io_thread = threading.Thread(target=self._io_main, name="edgesplit-io", daemon=True)
        self._io_thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("server I/O thread did not start")
        if self._startup_error is not None:
            raise self._startup_error
        log.info("serving %s on %s", ", ".join(f"{b.name}@{h[:12]}" for h, b in self.bundles.items()), self.endpoint)
        return self

    def request_stop(self) -> None:
        """Ask for a drain and exit; safe from a signal handler; returns at once."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the server threads to finish; True when they have."""
        if self._io_thread is None:
            return True
        self._io_thread.join(timeout)
        return not self._io_thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Drain (finish queued requests, answer them, say bye) and close the sockets."""
        self.request_stop()
        if not self.wait(timeout):
            log.error("server did not stop within %.0f s", timeout)
        for r in self.runners.values():
            r.engine.close()

    def __enter__(self) -> "Server":
        return self.start() if self._io_thread is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        c = self.counters + self._ccounters
        return {"sessions": len(self.sessions), "queued": len(self.batcher), **dict(c)}

    # -- I/O thread ----------------------------------------------------------------------------
    def _io_main(self) -> None:
        ctx = context()
        try:
            router, self.endpoint = bind_router(self.bind, limits=self.limits, ctx=ctx)
            pull = ctx.socket(zmq.PULL)
            pull.setsockopt(zmq.RCVHWM, 0)
            pull.bind(self._pipe)
        except BaseException as e:  # reported by start()
            self._startup_error = e
            self._ready.set()
            return
        self._compute_thread = threading.Thread(target=self._compute_main, name="edgesplit-compute", daemon=True)
        self._compute_thread.start()
        self._ready.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        draining = False
        # sessions are checked several times per heartbeat interval (ping after 1, expire after 3)
        housekeeping_s = min(0.5, self.heartbeat_ms / 4000.0) if self.heartbeat_ms > 0 else 0.5
        next_housekeeping = time.monotonic() + housekeeping_s
        try:
            while True:
                events = dict(poller.poll(min(100, max(1, int(housekeeping_s * 1000))) if not draining else 20))
                if pull in events:
                    self._forward_replies(router, pull)
                if router in events:
                    for _ in range(1024):  # bounded, so replies keep flowing under a flood
                        self._on_message(router, router.recv_multipart(_NOBLOCK), draining)
                        if not router.getsockopt(_EVENTS) & _POLLIN:
                            break
                now = time.monotonic()
                if now >= next_housekeeping:
                    self._housekeeping(router, now)
                    next_housekeeping = now + housekeeping_s
                if not draining and not self._compute_thread.is_alive():  # only a bug gets here
                    log.error("compute thread died; shutting down")
                    self.failed = True
                    self._stop.set()
                if self._stop.is_set() and not draining:
                    draining = True
                    log.info("draining: %d queued requests", len(self.batcher))
                    self.batcher.close()
                if draining and not self._compute_thread.is_alive():
                    self._forward_replies(router, pull)
                    for ident in list(self.sessions):
                        self._send(router, ident, P.bye("server shutting down"))
                    break
        except BaseException:  # pragma: no cover - a bug; keep the traceback in the log
            log.exception("I/O thread failed")
            self.failed = True
            self.batcher.close()
            raise
        finally:
            self.batcher.close()
            if self._compute_thread is not None:
                self._compute_thread.join(10)
            pull.close(0)
            router.close(1000)
            log.info("stopped: %s", self.stats())

    def _send(self, router: zmq.Socket, identity: bytes, header: dict, frames: Sequence = ()) -> bool:
        try:
            router.send_multipart([identity, *P.pack(header, frames)], _NOBLOCK, copy=False)
            return True
        except zmq.ZMQError as e:
            self._peer_unreachable(identity, e)
            return False

    def _peer_unreachable(self, identity: bytes, e: zmq.ZMQError) -> None:
        if e.errno == zmq.EHOSTUNREACH:
            self.sessions.pop(identity, None)
            self.counters["dropped_unreachable"] += 1
        else:  # EAGAIN: the peer's pipe is full (credits make this rare)
            self.counters["dropped_full"] += 1

    def _error(self, router: zmq.Socket, identity: bytes, req_id: int | None, code: ErrorCode, message: str) -> None:
        self.counters[f"error_{code.name}"] += 1
        self._send(router, identity, P.error(req_id, code, message))

    def _forward_replies(self, router: zmq.Socket, pull: zmq.Socket) -> None:
        while pull.getsockopt(_EVENTS) & _POLLIN:  # wake-up signals: one per batch
            pull.recv(_NOBLOCK)
        replies = self._replies
        while replies:
            parts = replies.popleft()
            identity = parts[0]
            s = self.sessions.get(identity)
            if s is not None and s.inflight > 0:
                s.inflight -= 1
            try:
                router.send_multipart(parts, _NOBLOCK, copy=False)
            except zmq.ZMQError as e:
                self._peer_unreachable(identity, e)

    def _on_message(self, router: zmq.Socket, parts: list[bytes], draining: bool) -> None:
        t_recv = time.perf_counter_ns()
        self.counters["messages"] += 1
        if len(parts) < 2:  # ROUTER always prepends the identity; an empty message carries nothing
            return
        identity = parts[0]
        try:
            msg = P.parse(parts[1:], self.limits)
            session = self.sessions.get(identity)
            if session is not None:
                session.last_seen = time.monotonic()
            kind = msg.kind
            if kind == Kind.REQUEST:
                self._on_request(router, identity, session, msg, t_recv, draining)
            elif kind == Kind.HELLO:
                self._on_hello(router, identity, msg, draining)
            elif kind == Kind.PING:
                self._send(router, identity, P.pong(msg.header["nonce"], time.time_ns()))
            elif kind == Kind.PONG:
                pass
            elif kind == Kind.BYE:
                self.sessions.pop(identity, None)
            elif kind == Kind.ERROR:
                log.info("agent %r reported error %s: %s", identity, msg.header.get("name"), msg.header.get("message"))
            else:
                raise ProtocolError(ErrorCode.MALFORMED, f"'{kind}' is not a message an agent sends to a server", msg.id)
        except ProtocolError as e:
            self._error(router, identity, e.req_id, e.code, e.message)
        except Exception as e:  # a bug: answer INTERNAL and keep serving
            log.exception("failed to handle a message")
            self._error(router, identity, None, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")

    def _on_hello(self, router: zmq.Socket, identity: bytes, msg: P.Message, draining: bool) -> None:
        h = msg.header
        if draining:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "server is shutting down")
        bundle = self.bundles.get(h["bundle"])
        if bundle is None:
            raise ProtocolError(ErrorCode.UNKNOWN_BUNDLE,
                                f"bundle {h['bundle'][:16]}... is not loaded here (loaded: "
                                f"{', '.join(f'{b.name}={k[:16]}...' for k, b in self.bundles.items())})")
        credits = max(1, min(self.credits, h["caps"]["max_inflight"]))
        old = self.sessions.get(identity)
        s = Session(identity, bundle.hash, h["agent"], credits, inflight=old.inflight if old else 0,
                    last_seen=time.monotonic(), last_ping=time.monotonic())
        self.sessions[identity] = s
        self.counters["sessions_opened"] += 1
        log.info("hello from %s (%s): bundle %s, %d credits", h["agent"], identity.hex(), bundle.name, credits)
        self._send(router, identity, P.welcome(bundle.hash, self.name, credits=credits, limits=self.limits,
                                               heartbeat_ms=self.heartbeat_ms, codecs=self._codecs))

    def _on_request(self, router: zmq.Socket, identity: bytes, session: Session | None, msg: P.Message,
                    t_recv: int, draining: bool) -> None:
        h = msg.header
        rid = h["id"]
        if session is None:
            raise ProtocolError(ErrorCode.NOT_READY, "no session: send hello first (or again, after a reconnect)", rid)
        if draining:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "server is shutting down", rid)
        if len(msg.frames) != 1:
            raise ProtocolError(ErrorCode.MALFORMED, f"a v1 request carries exactly one tensor, got {len(msg.frames)}", rid)
        d = h["tensors"][0]
        if d["codec"] not in self._codecs:
            raise ProtocolError(ErrorCode.UNSUPPORTED, f"codec '{d['codec']}' is not available on this server", rid)
        runner = self.runners[session.bundle]
        rows, single = runner.check(h["mode"], d, rid)
        if rows > self.batcher.max_batch:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"{rows} rows in one request, over max batch {self.batcher.max_batch}", rid)
        if session.inflight >= session.credits:
            raise ProtocolError(ErrorCode.OVERLOADED, f"credits exceeded: {session.inflight} requests in flight, {session.credits} allowed", rid)
        deadline = h.get("deadline_ms")
        item = Item(key=(session.bundle, h["mode"]), identity=identity, req_id=rid, desc=d, payload=msg.frames[0],
                    rows=rows, single=single, t_recv_ns=t_recv,
                    deadline_ns=None if deadline is None else t_recv + int(deadline * 1e6),
                    t_send_ns=h.get("t_send_ns"))
        if not self.batcher.put(item):
            raise ProtocolError(ErrorCode.OVERLOADED, f"server queue full ({self.batcher.max_queue} requests waiting)", rid)
        session.inflight += 1
        self.counters["requests"] += 1

    def _housekeeping(self, router: zmq.Socket, now: float) -> None:
        if self.heartbeat_ms <= 0:
            return
        hb = self.heartbeat_ms / 1000.0
        for ident, s in list(self.sessions.items()):
            idle = now - s.last_seen
            if idle > 3 * hb and s.inflight == 0:
                log.info("session %s (%s) timed out after %.1f s of silence", s.agent, ident.hex(), idle)
                del self.sessions[ident]
                self.counters["sessions_expired"] += 1
            elif idle > hb and now - s.last_ping > hb:
                s.last_ping = now
                self._send(router, ident, P.ping(int(now * 1e6), time.time_ns()))

    # -- compute thread ------------------------------------------------------------------------
    def _compute_main(self) -> None:
        push = context().socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)
        push.connect(self._pipe)
        try:
            while True:
                batch = self.batcher.next_batch()  # None: closed and drained
                if batch is None:
                    return
                try:
                    self._run_batch(batch)
                except Exception as e:  # never let one batch kill the daemon
                    log.exception("batch failed")
                    for it in batch:
                        if not it.answered:
                            self._push_error(it, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
                push.send(b"")  # wake the I/O thread: this batch's replies are in the deque
        finally:
            push.close(1000)

    def _push(self, identity: bytes, header: dict, frames: Sequence = ()) -> None:
        self._replies.append([identity, *P.pack(header, frames)])

    def _push_error(self, it: Item, code: ErrorCode, message: str) -> None:
        self._ccounters[f"error_{code.name}"] += 1
        self._push(it.identity, P.error(it.req_id, code, message))
        it.answered = True

    def _run_batch(self, batch: list[Item]) -> None:
        t0 = time.perf_counter_ns()
        live = []
        for it in batch:
            if it.deadline_ns is not None and t0 >= it.deadline_ns:
                late = (t0 - it.deadline_ns) / 1e6
                self._push_error(it, ErrorCode.DEADLINE_EXCEEDED,
                                 f"deadline passed {late:.3f} ms before compute could start (queued {(t0 - it.t_recv_ns) / 1e6:.3f} ms)")
            else:
                live.append(it)
        if not live:
            return
        runner = self.runners[live[0].key[0]]
        try:
            logits, offsets, errors = runner.run(live)
        except Exception as e:
            log.exception("tail failed")
            for it in live:
                self._push_error(it, ErrorCode.INTERNAL, f"tail failed: {type(e).__name__}: {e}")
            return
        t1 = time.perf_counter_ns()
        self.batcher.note_compute(live[0].key, (t1 - t0) / 1e9)
        rows = sum(it.rows for i, it in enumerate(live) if i not in errors)
        compute_us = (t1 - t0) / 1e3
        self._ccounters["batches"] += 1
        self._ccounters["rows"] += rows
        for i, it in enumerate(live):
            if i in errors:
                self._push_error(it, errors[i].code, errors[i].message)
                continue
            r = offsets[i]
            out = logits[r] if it.single else logits[r: r + it.rows]
            desc, payload = codec.encode_float(out, name=runner.output_name)
            t_reply = time.perf_counter_ns()
            header = P.result(it.req_id, [desc], queue_us=(t0 - it.t_recv_ns) / 1e3, compute_us=compute_us,
                              batch_size=rows, server_us=(t_reply - it.t_recv_ns) / 1e3, t_send_ns=it.t_send_ns)
            self._push(it.identity, header, [payload])
            it.answered = True
            self._ccounters["results"] += 1


# ---------------------------------------------------------------------------------------------
# CLI entry: `edgesplit serve ...` and `python -m edgesplit.server.daemon ...`


def build_parser(prog: str = "edgesplit serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run the split-computing server daemon: accept agents over ZeroMQ (ROUTER), batch their "
                    "requests and run each bundle's tail. Stops cleanly on SIGINT/SIGTERM (finishes queued "
                    "requests, tells agents bye, exits 0).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bundle", action="append", required=True, metavar="PATH",
                   help="bundle directory or tar (repeat to serve several bundles; agents pick one by hash)")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555",
                   help="ZeroMQ endpoint to bind; tcp port 0 picks a free port (printed at start)")
    p.add_argument("--backend", default="ort", choices=("ort", "torch"),
                   help="tail engine: ONNX Runtime, or torch (uses the bundle's tail_torch file when present)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for the tail engine (unset: the engine's own default)")
    p.add_argument("--max-batch", type=int, default=32, help="most frames run in one tail call")
    p.add_argument("--max-queue-delay-us", type=float, default=2000.0,
                   help="longest a request waits for others to batch with (0: run what is queued at once)")
    p.add_argument("--max-queue", type=int, default=1024, help="requests waiting beyond this are refused with OVERLOADED")
    p.add_argument("--credits", type=int, default=64, help="most requests in flight per agent (flow control)")
    p.add_argument("--heartbeat-ms", type=int, default=5000,
                   help="heartbeat interval advertised to agents; silent sessions expire after 3 intervals (0: off)")
    p.add_argument("--max-frame-bytes", type=int, default=P.DEFAULT_LIMITS.max_frame_bytes, help="largest tensor frame accepted")
    p.add_argument("--name", default=None, help="server name sent in welcome (unset: host:pid)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def serve_main(args_list: list[str] | None = None) -> int:
    """Run the daemon until SIGINT/SIGTERM. Returns the process exit code."""
    args = build_parser().parse_args(args_list)
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        limits = Limits(max_frame_bytes=args.max_frame_bytes, max_batch=args.max_batch)
        server = Server(args.bundle, args.bind, backend=args.backend, threads=args.threads, max_batch=args.max_batch,
                        max_queue_delay_us=args.max_queue_delay_us, max_queue=args.max_queue, credits=args.credits,
                        heartbeat_ms=args.heartbeat_ms, limits=limits, name=args.name)
        server.start()
    except (BundleError, OSError, ValueError, RuntimeError) as e:
        print(f"edgesplit serve: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # engine errors and the like: one clear line, not a traceback
        print(f"edgesplit serve: {type(e).__name__}: {e}", file=sys.stderr)
        return 1

    def _on_signal(signum, frame):
        log.info("received %s, draining", signal.Signals(signum).name)
        server.request_stop()

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    print(f"edgesplit serve: listening on {server.endpoint}", flush=True)
    try:
        while not server.wait(0.5):
            pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    server.stop()
    return 1 if server.failed else 0


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
