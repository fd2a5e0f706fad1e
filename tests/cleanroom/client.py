"""A clean-room head-tail client for `edgesplit serve`, written from docs/PROTOCOL.md and
docs/BUNDLE.md alone (stdlib, numpy, pyzmq, msgpack, onnxruntime, and Pillow for the JPEG decode
BUNDLE.md §5 names). It imports nothing from edgesplit: it is the check that the two documents are
enough to interoperate.

    python tests/cleanroom/client.py --bundle models/cifar10-resnet20-bottlefit \
        --server tcp://127.0.0.1:5599 --frames 200
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import msgpack
import numpy as np
import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cr_bundle import Bundle, load_frames  # noqa: E402
from cr_codec import (  # noqa: E402
    ans_encode,
    ans_values,
    header_self_check,
    pack_codes,
    packed_length,
    quantize,
    self_check,
)

ERROR_CODES = {
    "MALFORMED": 1,
    "UNSUPPORTED_VERSION": 2,
    "UNKNOWN_BUNDLE": 3,
    "NOT_READY": 4,
    "UNKNOWN_MODE": 5,
    "TOO_LARGE": 6,
    "OVERLOADED": 7,
    "DEADLINE_EXCEEDED": 8,
    "INTERNAL": 9,
    "UNSUPPORTED": 10,
    "SHUTTING_DOWN": 11,
}


class ServerError(RuntimeError):
    """An `error` message (§3.5): `code` is authoritative, `id` may be nil."""

    def __init__(self, header: dict):
        super().__init__(f"{header.get('name')} ({header.get('code')}): {header.get('message')}")
        self.code = header.get("code")
        self.id = header.get("id")


def _check_int(value, low: int, high: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"welcome.{what} {value!r} outside [{low}, {high}] (MALFORMED, §3.2)")
    return value


class Session:
    """One DEALER connection (§1) and its session state: welcome, credits, ids, pings."""

    def __init__(self, endpoint: str, bundle: Bundle, timeout_s: float = 10.0):
        self.endpoint, self.bundle, self.timeout_s = endpoint, bundle, timeout_s
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)  # §1's recommended agent options
        self.socket.setsockopt(zmq.RECONNECT_IVL, 100)
        self.socket.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        self.socket.setsockopt(zmq.TCP_KEEPALIVE, 1)
        self.socket.connect(endpoint)
        self.welcome: dict | None = None
        self.handshakes = 0  # welcomes received: tells a request sent before a re-hello from one after
        self.ids = itertools.count(1)  # §3.3: unique among outstanding requests
        self.backlog: list[tuple[dict, list[bytes]]] = []  # answers read while awaiting a welcome or pong

    def close(self) -> None:
        self.socket.close(0)

    def send(self, header: dict, frames: list[bytes] = ()) -> None:
        self.socket.send_multipart([msgpack.packb(header, use_bin_type=True), *frames])

    def receive(self, timeout_s: float | None = None) -> tuple[dict, list[bytes]]:
        """The next message: one kept while awaiting a welcome or pong, else the socket's next."""
        return self.backlog.pop(0) if self.backlog else self._read(timeout_s)

    def _read(self, timeout_s: float | None = None) -> tuple[dict, list[bytes]]:
        """The socket's next message that is not a ping (pings are answered at once, §3.6, §12)."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.socket.poll(int(left * 1000) + 1):
                raise TimeoutError("no answer within the timeout (§8)")
            parts = self.socket.recv_multipart()
            header = msgpack.unpackb(parts[0], raw=False)
            if not isinstance(header, dict) or header.get("v") != 1:
                raise ValueError(f"not a v1 header: {header!r}")
            if header.get("kind") == "ping":
                self.send({"v": 1, "kind": "pong", "nonce": header["nonce"]})
                continue
            return header, parts[1:]

    def _await(self, wanted) -> dict:
        """The next message `wanted` accepts. Answers to requests read meanwhile (NOT_READY for
        requests sent before a re-hello, say: §3.1, requests in flight are still answered) are
        kept for `receive`."""
        while True:
            header, frames = self._read()
            if wanted(header):
                return header
            self.backlog.append((header, frames))

    def hello(self, max_inflight: int = 64, bundle_hash: str | None = None) -> dict:
        """§3.1-3.2: open (or replace) the session and check the welcome's ranges."""
        codecs = ["raw"] + (["ans"] if self.bundle.tables else [])
        self.send(
            {
                "v": 1,
                "kind": "hello",
                "bundle": bundle_hash or self.bundle.hash,
                "agent": f"cleanroom:{os.getpid()}",
                "caps": {"codecs": codecs, "bits": [2, 4, 6, 8], "max_inflight": max_inflight},
            }
        )
        # The answer to a hello is a welcome or an error with id nil (§3.5).
        header = self._await(lambda h: h["kind"] == "welcome" or (h["kind"] == "error" and h.get("id") is None))
        if header["kind"] == "error":
            raise ServerError(header)
        if header["kind"] != "welcome" or header["bundle"] != (bundle_hash or self.bundle.hash):
            raise ValueError(f"expected a welcome for our bundle, got {header!r}")
        _check_int(header["credits"], 1, 2**20, "credits")
        _check_int(header["heartbeat_ms"], 0, 2**31, "heartbeat_ms")
        for key in ("max_header_bytes", "max_frame_bytes", "max_frames", "max_batch"):
            _check_int(header["limits"][key], 1, 2**40, f"limits.{key}")
        header["features"] = header.get("features") or []  # absent or nil: a v1.0 server
        self.welcome = header
        self.handshakes += 1
        return header

    def ping(self, nonce: int) -> dict:
        self.send({"v": 1, "kind": "ping", "nonce": nonce})
        return self._await(lambda h: h["kind"] == "pong" and h.get("nonce") == nonce)

    def bye(self) -> None:
        self.send({"v": 1, "kind": "bye", "reason": "cleanroom client done"})
        self.welcome = None


def encode_rows(bundle: Bundle, mode: dict, z: np.ndarray) -> tuple[bytes, dict]:
    """BUNDLE.md §6 for rows z [n, C', h, w]: the payload and its full §4/§4.4 descriptor.

    n == 1 is sent as one frame `[c, h, w]`; more rows as a batch `[n, c, h, w]`."""
    channels = mode["channels"]
    rows = z[:, :channels]
    shape = list(rows.shape[1:]) if len(rows) == 1 else list(rows.shape)
    scale = mode["quant"]["scale"]
    if mode.get("codec") == "ans":
        tables, tag = bundle.tables[mode["id"]]
        values = np.stack([ans_values(row, scale, tables) for row in rows])
        payload = ans_encode(values, tables, tag)
        dtype, bits, zero_point, codec = "int32", 32, 0, "ans"
    else:
        bits, zero_point = mode["bits"], mode["quant"]["zero_point"]
        payload = pack_codes(quantize(rows, scale, zero_point, bits), bits)
        assert len(payload) == packed_length(rows.size, bits)
        dtype, codec = "uint8", "raw"
    descriptor = {
        "name": bundle.wire_name,
        "shape": shape,
        "dtype": dtype,
        "bits": bits,
        "scale": scale,
        "zero_point": zero_point,
        "channels": channels,
        "codec": codec,
        "nbytes": len(payload),
    }
    return payload, descriptor


def compact_allowed(session: Session, mode: dict) -> bool:
    """§3.3.1: compact only while the current welcome lists the feature (and `ans` for ans modes)."""
    welcome = session.welcome
    if "compact_requests" not in welcome["features"]:
        return False
    return mode.get("codec") != "ans" or "ans" in welcome["codecs"]


def request_header(session: Session, mode: dict, descriptor: dict | None, **extra) -> dict:
    header = {"v": 1, "kind": "request", "id": next(session.ids), "mode": mode["id"], **extra}
    if descriptor is not None:
        header["tensors"] = [descriptor]
    return header


def parse_result(header: dict, frames: list[bytes], rows: int, classes: int) -> np.ndarray:
    """§3.4: one raw float32 output of shape [K] (one frame) or [n, K] (a batch)."""
    (out,) = header["outputs"]
    expected = [classes] if rows == 1 and len(out["shape"]) == 1 else [rows, classes]
    if out["dtype"] != "float32" or out["bits"] != 32 or out["codec"] != "raw" or out["shape"] != expected:
        raise ValueError(f"unexpected result descriptor {out!r}")
    if out["nbytes"] != len(frames[0]) or len(frames) != 1:
        raise ValueError("result frame length differs from nbytes")
    return np.frombuffer(frames[0], dtype="<f4").reshape(rows, classes)


def run_mode(session: Session, mode_id: int, z: np.ndarray, form: str, rows: int = 1, window: int = 16):
    """Send every frame of z in mode `mode_id` and return (logits [N, K] in frame order, bytes sent).

    form: "full" (descriptor always sent) or "compact" (§3.3.1; one row per request).
    Keeps at most min(window, credits) requests outstanding (§7); answers are matched by id. A
    request answered NOT_READY (the session expired or the server restarted, §6) is sent once
    more after a new hello, as the reference agent does."""
    bundle = session.bundle
    mode = bundle.modes[mode_id]
    if form == "compact" and (rows != 1 or not compact_allowed(session, mode)):
        raise ValueError("compact requests: one row, and only when the welcome offers them")
    window = min(window, session.welcome["credits"])
    rows = min(rows, session.welcome["limits"]["max_batch"])
    starts = list(range(0, len(z), rows))
    logits = np.zeros((len(z), len(bundle.classes)), dtype=np.float32)
    outstanding: dict[int, tuple[int, int, bool]] = {}  # id -> (first row, handshake it went under, resent)
    sent_bytes = 0

    def send(start: int, resent: bool) -> None:
        nonlocal sent_bytes
        payload, descriptor = encode_rows(bundle, mode, z[start : start + rows])
        compact = form == "compact" and compact_allowed(session, mode)  # the current welcome decides
        header = request_header(session, mode, None if compact else descriptor)
        session.send(header, [payload])
        sent_bytes += len(payload) if not resent else 0
        outstanding[header["id"]] = (start, session.handshakes, resent)

    pending = list(reversed(starts))
    while pending or outstanding:
        while pending and len(outstanding) < window:
            send(pending.pop(), False)
        header, frames = session.receive()
        if header.get("id") not in outstanding:
            if header["kind"] == "error" and header.get("id") is None:
                raise ServerError(header)  # §3.5: about the connection, not a request; not expected here
            continue  # §6: a late answer to something already finished is ignored
        start, handshake, resent = outstanding.pop(header["id"])
        if header["kind"] == "error":
            if header["code"] != ERROR_CODES["NOT_READY"] or resent:
                raise ServerError(header)
            if handshake == session.handshakes:  # the first NOT_READY of this session: hello again
                session.hello()
            send(start, True)
            continue
        count = min(rows, len(z) - start)
        logits[start : start + count] = parse_result(header, frames, count, len(bundle.classes))
    return logits, sent_bytes


def refusal(session: Session, header: dict, frames: list[bytes] = ()) -> tuple[int, bool]:
    """Send one message that must be refused: (its error code, whether the error's `id` is the
    message's own `id`, nil when it had none: §3.5)."""
    session.send(header, list(frames))
    answer, _ = session.receive()
    if answer["kind"] != "error":
        raise AssertionError(f"expected an error, got {answer!r}")
    return answer["code"], answer.get("id") == header.get("id")


def probe_errors(endpoint: str, bundle: Bundle, z: np.ndarray) -> dict[str, tuple]:
    """The documented refusals and session rules: per case (code, id as §3.5 says) or an observation."""
    out: dict[str, tuple] = {}
    mode = bundle.modes[bundle.default_mode]
    payload, descriptor = encode_rows(bundle, mode, z[:1])

    def full(m=mode, desc=descriptor, **extra):
        return request_header(session, m, desc, **extra)

    session = Session(endpoint, bundle)
    try:
        out["request_before_hello"] = refusal(session, full(), [payload])  # §6: NOT_READY with its id
        pong = session.ping(12345)  # §3.6: answered on any session state
        out["ping_without_session"] = (pong["kind"], pong.get("nonce") == 12345)
        try:
            session.hello(bundle_hash="0" * 64)
        except ServerError as exc:
            out["unknown_bundle"] = (exc.code, exc.id is None)  # §3.1: UNKNOWN_BUNDLE, id nil
        session.hello()
        bad_mode = dict(mode, id=max(bundle.modes) + 1)
        out["unknown_mode_full"] = refusal(session, full(bad_mode), [payload])  # §3.3 step 7
        if "compact_requests" in session.welcome["features"]:
            out["unknown_mode_compact"] = refusal(session, full(bad_mode, None), [payload])
            # §3.3.1: a compact frame whose length is not the implied one is MALFORMED.
            out["compact_wrong_length"] = refusal(session, full(desc=None), [payload + bytes(4)])
        lying = dict(descriptor, nbytes=descriptor["nbytes"] + 1)  # §4: nbytes must be the frame's
        out["lying_nbytes"] = refusal(session, full(desc=lying), [payload])
        if mode.get("codec") != "ans":  # §3.3 step 7: bits other than the mode's
            other = dict(descriptor, bits=8 if mode["bits"] != 8 else 4)
            other["nbytes"] = packed_length(int(np.prod(descriptor["shape"])), other["bits"])
            out["bits_not_the_modes"] = refusal(session, full(desc=other), [bytes(other["nbytes"])])
        else:  # §4.4: an ans descriptor's values are fixed (bits 32) [MALFORMED]
            out["ans_bits_not_32"] = refusal(session, full(desc=dict(descriptor, bits=16)), [payload])
        rows = session.welcome["limits"]["max_batch"] + 1  # §3.3 step 3: more rows than max_batch
        big_payload, big = encode_rows(bundle, mode, np.repeat(z[:1], rows, axis=0))
        out["batch_over_max"] = refusal(session, full(desc=big), [big_payload])
        out["deadline_zero"] = refusal(session, full(deadline_ms=0), [payload])  # §3.3: always refused
        out["reserved_kind"] = refusal(session, {"v": 1, "kind": "scatter", "id": 77})  # §3: UNSUPPORTED
        out["version_2"] = refusal(session, {"v": 2, "kind": "request", "id": 78})  # §9, §3.5
        no_id = {"v": 1, "kind": "request", "mode": mode["id"], "tensors": [descriptor]}
        out["request_without_id"] = refusal(session, no_id, [payload])  # §3.5: MALFORMED, id nil
        session.hello()  # §3.1: a second hello replaces the session
        out["after_second_hello"] = ("result", len(run_mode(session, mode["id"], z[:2], "full")[0]))
        heartbeat_ms = session.welcome["heartbeat_ms"]
        if 0 < heartbeat_ms <= 500:  # §8: silent (pings unread) for 3 intervals, nothing in flight
            time.sleep(3.5 * heartbeat_ms / 1000)
            out["expired_after_silence"] = refusal(session, full(), [payload])
            session.hello()
        session.bye()  # §3.6: the server forgets the session; the next request is NOT_READY
        out["request_after_bye"] = refusal(session, full(), [payload])
    finally:
        session.close()
    # §1/§6: a new connection is a new routing id, hence no session until hello.
    session = Session(endpoint, bundle)
    try:
        out["new_connection"] = refusal(session, full(), [payload])
        session.hello()
        out["new_connection_after_hello"] = ("result", len(run_mode(session, mode["id"], z[:2], "full")[0]))
    finally:
        session.close()
    return out


def head_outputs(bundle: Bundle, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every head the modes name, run before connecting: a session must not sit silent (§12)."""
    roles = {mode.get("head", "head") for mode in bundle.modes.values()} | {"head"}
    return {role: bundle.head_output(images, role) for role in sorted(roles)}


def run_forms(session: Session, mode_id: int, z: np.ndarray, rows: int = 8) -> dict[str, tuple]:
    """One mode in every request form: full one frame each, full batches of `rows`, and compact
    when the welcome allows it. Each form: (logits [N, K], payload bytes sent)."""
    forms = {"full": run_mode(session, mode_id, z, "full")}
    forms[f"full_batch{rows}"] = run_mode(session, mode_id, z, "full", rows=rows)
    if compact_allowed(session, session.bundle.modes[mode_id]):
        forms["compact"] = run_mode(session, mode_id, z, "compact")
    return forms


def evaluate(bundle_dir: str, endpoint: str, shard: str, frames: int) -> dict:
    """Every mode, in every form the welcome allows: top-1, bytes, and whether the forms agree."""
    bundle = Bundle(bundle_dir)
    jpegs, labels = load_frames(shard, frames)
    heads = head_outputs(bundle, np.stack([bundle.preprocess(j) for j in jpegs]))
    session = Session(endpoint, bundle)
    report: dict = {"bundle": bundle.hash, "frames": frames, "modes": {}}
    try:
        welcome = session.hello()
        report["features"], report["codecs"] = welcome["features"], welcome["codecs"]
        for mode_id, mode in sorted(bundle.modes.items()):
            forms = run_forms(session, mode_id, heads[mode.get("head", "head")])
            entry = {}
            for form, (logits, sent) in forms.items():
                top1 = float(np.mean(logits.argmax(1) == labels))
                entry[form] = {"top1": top1, "bytes_per_frame": sent / frames}
            first = forms["full"][0]
            entry["forms_agree_top1"] = all(np.array_equal(f[0].argmax(1), first.argmax(1)) for f in forms.values())
            entry["forms_max_abs_diff"] = max(float(np.abs(f[0] - first).max()) for f in forms.values())
            report["modes"][mode["name"]] = entry
        report["ping"] = session.ping(7).get("nonce") == 7
        session.bye()
    finally:
        session.close()
    report["errors"] = probe_errors(endpoint, bundle, heads["head"])
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--server", default="tcp://127.0.0.1:5555")
    parser.add_argument("--data", default="/work/shared/data/cifar10-jpeg/test-00000.tar.gz")
    parser.add_argument("--frames", type=int, default=200)
    args = parser.parse_args(argv)
    self_check()
    header_self_check()
    print(json.dumps(evaluate(args.bundle, args.server, args.data, args.frames), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
