"""Fuzz cases with one fault inside a request: a bad field (``id``, ``mode``, ``deadline_ms``,
``t_send_ns``, ``tensors``), a bad tensor descriptor (dtype, shape, bits, channels, quantization,
name, ``nbytes``, codec), a bad frame (lying or huge sizes, corrupt zstd), a v1.1 compact
request's frame or mode, and descriptors the bundle mode does not send.
:class:`edgesplit.wire.fuzz.FuzzGenerator` inherits these; docs/PROTOCOL.md §3.3 and §4 say the
answer each one is owed.
"""

from __future__ import annotations

import math

from .codec import DESCRIPTOR_KEYS
from .fuzz_cases import CaseBuilder, E, FuzzCase, ModeSpec, expect_error
from .kinds import PROTOCOL_VERSION
from .quantize import packed_nbytes


class RequestFaults(CaseBuilder):
    """Generators of malformed requests, tensors and descriptors (one fault each)."""

    # -- request fields ----------------------------------------------------------------------
    def bad_id(self) -> FuzzCase:
        h, p = self._valid_request(0)
        v = self._choice([-1, -(1 << 63), 1.5, "7", True, None, [1], "missing"])
        h = {k: x for k, x in h.items() if k != "id"} if v == "missing" else {**h, "id": v}
        return self._case("bad_id", f"id={v!r}", h, [p], expect_error(E.MALFORMED))  # no readable id: nil

    def bad_mode(self) -> FuzzCase:
        rid = self._id()
        h, p = self._valid_request(rid)
        v = self._choice([-1, 1 << 31, 1 << 40, 0.0, "0", True, None, "missing"])
        h = {k: x for k, x in h.items() if k != "mode"} if v == "missing" else {**h, "mode": v}
        return self._case("bad_mode", f"mode={v!r}", h, [p], expect_error(E.MALFORMED), rid)

    def bad_deadline(self) -> FuzzCase:
        rid = self._id()
        h, p = self._valid_request(rid)
        v = self._choice([-1, -0.001, math.nan, math.inf, -math.inf, "5", True, [5], {}])
        return self._case(
            "bad_deadline", f"deadline_ms={v!r}", {**h, "deadline_ms": v}, [p], expect_error(E.MALFORMED), rid
        )

    def bad_t_send(self) -> FuzzCase:
        rid = self._id()
        h, p = self._valid_request(rid)
        v = self._choice([-1, 1.5, "now", True, [0]])
        return self._case("bad_t_send", f"t_send_ns={v!r}", {**h, "t_send_ns": v}, [p], expect_error(E.MALFORMED), rid)

    def bad_tensors(self) -> FuzzCase:
        rid = self._id()
        h, p, _ = self._full(rid)
        d = h["tensors"][0]
        k = int(self.rng.integers(6))
        if k == 0:
            t, frames, what = self._choice(["z", {}, 5, True]), [p], "not a list"
        elif k == 1:
            t, frames, what = [], [p], "empty list, one frame"
        elif k == 2:
            t, frames, what = [self._choice([1, None, "z", [d]])], [p], "descriptor not a map"
        elif k == 3:
            t, frames, what = [d, d], [p], "two descriptors, one frame"
        elif k == 4:
            t, frames, what = [d], [p, p], "one descriptor, two frames"
        else:  # well-formed message, but v1 requests carry exactly one tensor
            t, frames, what = [d, d], [p, p], "two tensors"
        return self._case("bad_tensors", what, {**h, "tensors": t}, frames, expect_error(E.MALFORMED), rid)

    def missing_desc_key(self) -> FuzzCase:
        rid = self._id()
        h, p, _ = self._full(rid)
        key = self._choice(DESCRIPTOR_KEYS)
        d = {k: v for k, v in h["tensors"][0].items() if k != key}
        return self._case("missing_desc_key", f"no '{key}'", {**h, "tensors": [d]}, [p], expect_error(E.MALFORMED), rid)

    # -- descriptors -------------------------------------------------------------------------
    def _consistent(
        self, rid: int, m: ModeSpec, shape: list[int], bits: int, channels: int | None, dtype: str = "uint8", **extra
    ) -> tuple[dict, bytes]:
        """A full request whose descriptor is self-consistent (nbytes = packed size = frame
        length) for ``shape``/``bits``, so only its fit to the bundle mode is wrong."""
        n = packed_nbytes(math.prod(shape), bits)
        d = {
            **self._descs[m.id],
            "shape": list(shape),
            "bits": bits,
            "channels": channels,
            "dtype": dtype,
            "nbytes": n,
            **extra,
        }
        h = {"v": PROTOCOL_VERSION, "kind": "request", "id": rid, "mode": m.id, "tensors": [d]}
        return h, bytes(n)

    def wrong_dtype(self) -> FuzzCase:
        rid = self._id()
        m = self._mode()
        C, hh, w = self.t.wire_shape
        k = int(self.rng.integers(4))
        if k == 0:
            dt = self._choice(["int8", "float64", "complex64", "", "UINT8", "bfloat16"])
            h, p, _ = self._full(rid, m, dtype=dt)
            return self._case("wrong_dtype", f"dtype {dt!r}", h, [p], expect_error(E.UNSUPPORTED), rid)
        if k == 1:
            dt = self._choice([8, None, ["uint8"], True])
            h, p, _ = self._full(rid, m, dtype=dt)
            return self._case("wrong_dtype", f"dtype {dt!r}", h, [p], expect_error(E.MALFORMED), rid)
        if k == 2:  # float32 needs bits=32
            h, p, _ = self._full(rid, m, dtype="float32")
            return self._case("wrong_dtype", f"float32 at {m.bits} bits", h, [p], expect_error(E.MALFORMED), rid)
        # a well-formed float tensor, but the mode sends packed codes: disagrees with the mode
        dt, bits = self._choice([("float32", 32), ("float16", 16)])
        h, p = self._consistent(rid, m, [m.channels, hh, w], bits, m.channels, dtype=dt, scale=1.0, zero_point=0)
        return self._case(
            "wrong_dtype", f"{dt} tensor for a {m.bits}-bit mode", h, [p], expect_error(E.UNKNOWN_MODE), rid
        )

    def wrong_shape(self) -> FuzzCase:
        rid = self._id()
        m = self._mode()
        C, hh, w = self.t.wire_shape
        c = m.channels
        k = int(self.rng.integers(9))
        d = int(self.rng.integers(1, 4))
        if k < 6:
            shape, ch, what = [
                ([c, hh + d, w], c, "taller"),
                ([c, hh, w + d], c, "wider"),
                ([1, 1, c, hh, w], c, "5-d"),
                ([hh, w], None, "2-d"),
                ([c * hh * w], None, "flat"),
                ([0, c, hh, w], c, "zero rows"),
            ][k]
            h, p = self._consistent(rid, m, shape, m.bits, ch)
            return self._case("wrong_shape", what, h, [p], expect_error(E.MALFORMED), rid)
        if k == 6:  # more channels than the wire tensor has, consistently described
            h, p = self._consistent(rid, m, [C + d, hh, w], m.bits, C + d)
            return self._case("wrong_shape", f"{C + d} channels of {C}", h, [p], expect_error(E.UNKNOWN_MODE), rid)
        shape = self._choice([[], [1] * 9, [c, -hh, w], [c, float(hh), w], [c, str(hh), w], "8x8"])
        h, p, _ = self._full(rid, m, shape=shape)
        return self._case("wrong_shape", f"shape {shape!r}", h, [p], expect_error(E.MALFORMED), rid)

    def wrong_bits(self) -> FuzzCase:
        rid = self._id()
        m = self._mode()
        C, hh, w = self.t.wire_shape
        k = int(self.rng.integers(3))
        if k == 0:
            b = self._choice([0, 1, 3, 5, 7, 9, 12, 16, 32])
            h, p, _ = self._full(rid, m, bits=b, zero_point=0)
            return self._case("wrong_bits", f"bits={b}", h, [p], expect_error(E.UNSUPPORTED), rid)
        if k == 1:
            b = self._choice(["8", 8.0, True, None])
            h, p, _ = self._full(rid, m, bits=b)
            return self._case("wrong_bits", f"bits={b!r}", h, [p], expect_error(E.MALFORMED), rid)
        b = self._choice([x for x in (2, 4, 6, 8) if x != m.bits])
        h, p = self._consistent(rid, m, [m.channels, hh, w], b, m.channels, zero_point=0)
        return self._case("wrong_bits", f"{b} bits for a {m.bits}-bit mode", h, [p], expect_error(E.UNKNOWN_MODE), rid)

    def wrong_channels(self) -> FuzzCase:
        rid = self._id()
        m = self._mode()
        C, hh, w = self.t.wire_shape
        k = int(self.rng.integers(3))
        if k == 0 or (k == 2 and m.channels < 2):
            ch = m.channels + self._choice([-1, 1, 5])
            h, p, _ = self._full(rid, m, channels=ch)
            return self._case(
                "wrong_channels", f"channels={ch} for shape[-3]={m.channels}", h, [p], expect_error(E.MALFORMED), rid
            )
        if k == 1:
            ch = self._choice([-1, "8", 8.5, True])
            h, p, _ = self._full(rid, m, channels=ch)
            return self._case("wrong_channels", f"channels={ch!r}", h, [p], expect_error(E.MALFORMED), rid)
        c = int(self.rng.integers(1, m.channels))  # a consistent subset the mode does not send
        h, p = self._consistent(rid, m, [c, hh, w], m.bits, c)
        return self._case(
            "wrong_channels", f"{c} channels for a {m.channels}-channel mode", h, [p], expect_error(E.UNKNOWN_MODE), rid
        )

    def bad_quant(self) -> FuzzCase:
        rid = self._id()
        m = self._mode()
        if self.rng.random() < 0.5:
            s = self._choice([0, 0.0, -1.0, math.nan, math.inf, "0.1", None, True])
            h, p, _ = self._full(rid, m, scale=s)
            return self._case("bad_quant", f"scale={s!r}", h, [p], expect_error(E.MALFORMED), rid)
        zp = self._choice([-1, 1 << m.bits, 1.5, None, "0"])
        h, p, _ = self._full(rid, m, zero_point=zp)
        return self._case("bad_quant", f"zero_point={zp!r} at {m.bits} bits", h, [p], expect_error(E.MALFORMED), rid)

    def wrong_name(self) -> FuzzCase:
        rid = self._id()
        name = self._choice(["x", "", self.t.wire_name.upper() + "_", "z" * 300, 5, None])
        if name == self.t.wire_name:
            name += "2"
        h, p, _ = self._full(rid, name=name)
        return self._case("wrong_name", f"name={str(name)[:12]!r}", h, [p], expect_error(E.MALFORMED), rid)

    def lying_nbytes(self) -> FuzzCase:
        rid = self._id()
        m = self._mode()
        h, p, _ = self._full(rid, m)
        n = len(p)
        k = int(self.rng.integers(4))
        if k == 0:  # the descriptor lies about the frame it came with
            lie = max(0, n + self._choice([-1, 1, -n, 7, n, 1 << 20]))
            return self._case(
                "lying_nbytes",
                f"nbytes={lie}, frame {n}",
                {**h, "tensors": [{**h["tensors"][0], "nbytes": lie}]},
                [p],
                expect_error(E.MALFORMED),
                rid,
            )
        if k == 1:  # frame and nbytes agree, but not with the shape
            frame = p[: n - int(self.rng.integers(1, n))] if self.rng.random() < 0.5 else p + self._random_bytes(1, 64)
            return self._case(
                "lying_nbytes",
                f"frame {len(frame)} for {n}",
                {**h, "tensors": [{**h["tensors"][0], "nbytes": len(frame)}]},
                [frame],
                expect_error(E.MALFORMED),
                rid,
            )
        if k == 2:
            v = self._choice([-1, 1.5, str(n), None])
            return self._case(
                "lying_nbytes",
                f"nbytes={v!r}",
                {**h, "tensors": [{**h["tensors"][0], "nbytes": v}]},
                [p],
                expect_error(E.MALFORMED),
                rid,
            )
        return self._case(
            "lying_nbytes",
            "empty frame",
            {**h, "tensors": [{**h["tensors"][0], "nbytes": n}]},
            [b""],
            expect_error(E.MALFORMED),
            rid,
        )

    def huge_declared(self) -> FuzzCase:
        rid = self._id()
        m = self._mode()
        C, hh, w = self.t.wire_shape
        lim = self.t.limits
        k = int(self.rng.integers(4))
        if k < 2:  # a small frame claiming a tensor far over max_frame_bytes (raw, or zstd)
            rows = self._choice([1 << 20, 1 << 40, (1 << 62) // (m.channels * hh * w)])
            frame = self._payload(m)
            codec = "raw" if k == 0 else "zstd"
            h, _, _ = self._full(rid, m, shape=[rows, m.channels, hh, w], nbytes=len(frame), codec=codec)
            return self._case(
                "huge_declared", f"{rows} rows claimed ({codec})", h, [frame], expect_error(E.TOO_LARGE), rid
            )
        if k == 2:  # consistent, but more rows than the server batches
            rows = lim.max_batch + 1 + int(self.rng.integers(0, 4))
            h, p = self._consistent(rid, m, [rows, m.channels, hh, w], m.bits, m.channels)
            if len(p) > lim.max_frame_bytes:
                return self.huge_declared()
            return self._case(
                "huge_declared", f"{rows} rows > max_batch {lim.max_batch}", h, [p], expect_error(E.TOO_LARGE), rid
            )
        dims = [1 << 40, 1 << 40, m.channels, hh, w]
        h, _, _ = self._full(rid, m, shape=dims, nbytes=len(self._payload(m)))
        return self._case("huge_declared", "2^80 rows", h, [self._payload(m)], expect_error(E.TOO_LARGE), rid)

    def oversized_frame(self) -> FuzzCase:
        """A real frame over ``max_frame_bytes`` (but under libzmq's 2x cut-off): expensive, so
        this class has a tiny weight."""
        rid = self._id()
        h, _, _ = self._compact(rid)
        n = self.t.limits.max_frame_bytes + int(self.rng.integers(1, 1025))
        return self._case("oversized_frame", f"{n}-byte frame", h, [bytes(n)], expect_error(E.TOO_LARGE), rid)

    def unknown_codec(self) -> FuzzCase:
        rid = self._id()
        if self.rng.random() < 0.6:
            c = self._choice(["lz4", "gzip", "", "RAW", "zstd2"])
            h, p, _ = self._full(rid, codec=c)
            return self._case("unknown_codec", f"codec {c!r}", h, [p], expect_error(E.UNSUPPORTED), rid)
        # not a string at all: a type error (PROTOCOL.md §4: "all keys present with the types above")
        c = self._choice([1, None, ["raw"], True])
        h, p, _ = self._full(rid, codec=c)
        return self._case("unknown_codec", f"codec {c!r}", h, [p], expect_error(E.MALFORMED), rid)

    def corrupt_zstd(self) -> FuzzCase:
        """Well-formed zstd descriptors whose frame does not decode to the declared size: these
        pass every check up to decoding, so they are queued and refused by the compute thread."""
        rid = self._id()
        m = self._mode()
        p = self._payload(m)
        k = int(self.rng.integers(3))
        frame, what = self._random_bytes(1, 600), "random bytes"
        try:
            import zstandard
        except ImportError:  # the server then has no zstd either: UNSUPPORTED
            h, _, _ = self._full(rid, m, codec="zstd", nbytes=len(frame))
            return self._case(
                "corrupt_zstd",
                "zstd without zstandard",
                h,
                [frame],
                frozenset({int(E.UNSUPPORTED), int(E.MALFORMED), int(E.OVERLOADED)}),
                rid,
            )
        if k == 1:
            wrong = p + p[: int(self.rng.integers(1, len(p)))] if self.rng.random() < 0.5 else p[: len(p) // 2]
            frame, what = zstandard.ZstdCompressor(level=1).compress(wrong), f"frame of {len(wrong)} bytes for {len(p)}"
        elif k == 2:
            full = zstandard.ZstdCompressor(level=1).compress(p)
            frame, what = full[: max(1, len(full) - int(self.rng.integers(1, 8)))], "truncated frame"
        h, _, _ = self._full(rid, m, codec="zstd", nbytes=len(frame))
        return self._case("corrupt_zstd", what, h, [frame], expect_error(E.MALFORMED, E.OVERLOADED), rid)

    # -- compact requests (v1.1) ---------------------------------------------------------------
    def compact_wrong(self) -> FuzzCase:
        rid = self._id()
        h, p, m = self._compact(rid)
        n = len(p)
        k = int(self.rng.integers(5))
        if k == 0:
            frame = p[: n - int(self.rng.integers(1, n + 1))]
            return self._case("compact_wrong", f"frame {len(frame)} of {n}", h, [frame], expect_error(E.MALFORMED), rid)
        if k == 1:
            frame = p + self._random_bytes(1, 64)
            return self._case(
                "compact_wrong",
                f"frame {len(frame)} of {n}",
                {**h, "tensors": None},
                [frame],
                expect_error(E.MALFORMED),
                rid,
            )
        if k == 2:
            return self._case("compact_wrong", "two frames", h, [p, p], expect_error(E.MALFORMED), rid)
        if k == 3:
            return self._case("compact_wrong", "no frame", h, [], expect_error(E.MALFORMED), rid)
        mode = self._choice([max(x.id for x in self.t.modes) + 1, 97, (1 << 31) - 1])
        return self._case("compact_wrong", f"mode {mode}", {**h, "mode": mode}, [p], expect_error(E.UNKNOWN_MODE), rid)

    def unknown_mode(self) -> FuzzCase:
        rid = self._id()
        h, p, _ = self._full(rid)
        mode = self._choice([max(x.id for x in self.t.modes) + 1, 64, (1 << 31) - 1])
        return self._case("unknown_mode", f"mode {mode}", {**h, "mode": mode}, [p], expect_error(E.UNKNOWN_MODE), rid)
