"""Codec "ans" (PROTOCOL.md §4.4): integer tables, exact round trips on real bottleneck tensors,
the size bound, and a MALFORMED answer (never a crash or a hang) for every malformed class."""

from __future__ import annotations

import json

import constriction  # the entropy extra, which tools/setup.sh installs: missing, this fails
import numpy as np
import pytest

from edgesplit.wire import ans_codec as A
from edgesplit.wire import ans_tables as T
from edgesplit.wire.errors import ErrorCode, WireError

RNG = np.random.default_rng(14)


def laplace_tables(name="t", channels=4, rng=RNG) -> T.TableSet:
    offs, freqs = [], []
    for _ in range(channels):
        n = int(rng.integers(2, 40))
        x = np.arange(n)
        freqs.append(T.quantize_pmf(np.exp(-np.abs(x - n / 2) / rng.uniform(0.5, 4))))
        offs.append(-(n // 2))
    return T.make_table_set(name, offs, freqs)


def expect(code, fn, *args, **kw) -> WireError:
    with pytest.raises(WireError) as e:
        fn(*args, **kw)
    assert e.value.code == code, e.value
    return e.value


# -- the tables: the documented integer formula is what constriction codes with -------------------


def _decode_at(model, quantile: int) -> int:
    # Words [q, 1] make the stack's state 2**32 + q, whose low 24 bits are the quantile the first
    # decode looks up: so this reads the model's table one boundary at a time.
    return int(constriction.stream.stack.AnsCoder(np.array([quantile, 1], np.uint32)).decode(model, 1)[0])


def test_coder_cdf_is_constrictions_table_at_every_boundary():
    for _ in range(20):
        n = int(RNG.integers(2, 300))
        f = T.quantize_pmf(RNG.dirichlet(np.full(n, 0.3)))  # many zeros and near-zeros
        ts = T.make_table_set("x", [0], [f])
        cdf = T.coder_cdf(f)
        assert cdf[0] == 0 and cdf[-1] == 1 << 24 and np.all(np.diff(cdf) >= 1)
        model = ts.models()[0]
        for s in range(n):
            assert _decode_at(model, int(cdf[s])) == s
            assert _decode_at(model, int(cdf[s + 1]) - 1) == s


def test_quantize_pmf_sums_and_keeps_order():
    f = T.quantize_pmf([0.5, 0.25, 0.125, 0.125, 0.0])
    assert f.tolist() == [32768, 16384, 8192, 8192, 0]
    g = T.quantize_pmf(RNG.random(77))
    assert int(g.sum()) == 65536 and g.min() >= 0
    with pytest.raises(ValueError):
        T.quantize_pmf([1.0])


def test_tables_file_round_trip_and_refusals():
    sets = [laplace_tables("m0"), laplace_tables("m1", channels=2)]
    doc = T.tables_document(sets)
    parsed = T.parse_tables(json.dumps(doc).encode())
    assert {k: v.digest for k, v in parsed.items()} == {s.name: s.digest for s in sets}
    assert parsed["m0"].tag == bytes.fromhex(sets[0].digest[:4])

    def broken(edit) -> str:
        d = json.loads(json.dumps(doc))
        edit(d)
        with pytest.raises(ValueError) as e:
            T.parse_tables(d)
        return str(e.value)

    assert "unknown key" in broken(lambda d: d.update(extra=1))
    assert "unknown key" in broken(lambda d: d["sets"]["m0"]["channels"][0].update(scale=2))
    assert "sum to 2**16" in broken(lambda d: d["sets"]["m0"]["channels"][0]["freqs"].__setitem__(0, 7))
    assert "sha256" in broken(lambda d: d["sets"]["m0"].update(sha256="0" * 64))
    assert "format" in broken(lambda d: d.update(format="other"))
    assert "2 to 4096" in broken(lambda d: d["sets"]["m0"]["channels"][0].update(freqs=[65536]))
    assert "integer" in broken(lambda d: d["sets"]["m0"]["channels"][0].update(offset=True))


# -- round trips -------------------------------------------------------------------------------


def _real_bottleneck_codes(n_fit=96, n_code=24):
    """The shipped CIFAR-10 bundle's head on real test JPEGs: [12,8,8] float tensors, as integers
    at the default mode's step. Tables are fitted on the first frames, frames after them coded."""
    from pathlib import Path

    from edgesplit.bundle import Bundle
    from edgesplit.data.sources import dataset_shards, iter_tar_shards, take
    from edgesplit.data.transforms import preprocess
    from edgesplit.engine import create_engine

    b = Bundle.load(Path(__file__).resolve().parents[1] / "models" / "cifar10-resnet20-bottlefit")
    head = create_engine(b.file("head"), "ort", threads=1)
    frames = [
        preprocess(s.data, b.input_spec)
        for s in take(iter_tar_shards(dataset_shards("cifar10", "test")), n_fit + n_code)
    ]
    z = head.run1(np.stack(frames))
    step = b.default_mode.scale
    fit, code = z[:n_fit], z[n_fit:]
    q = np.rint(fit / np.float32(step)).astype(np.int64)
    offs, freqs = [], []
    for c in range(q.shape[1]):
        lo, hi = int(q[:, c].min()) - 2, int(q[:, c].max()) + 2
        hist = np.bincount(q[:, c].ravel() - lo, minlength=hi - lo + 1).astype(np.float64) + 0.5
        offs.append(lo)
        freqs.append(T.quantize_pmf(hist))
    return T.make_table_set("real", offs, freqs), code, step


@pytest.fixture(scope="module")
def real():
    return _real_bottleneck_codes()


def test_round_trip_is_exact_on_real_bottleneck_tensors(real):
    tables, z, step = real
    coded = []
    for frame in z:
        d, payload = A.encode(frame, tables, scale=step, name="z")
        assert A.check_ans_descriptor(d, len(payload)) == (frame.size, frame.size * 4)
        x = A.decode(d, payload, tables)
        values = A.quantize_values(frame, tables, step)
        assert np.array_equal(x, values.astype(np.float32) * np.float32(step))
        assert np.array_equal(A.decode_values(payload, tables, frame.shape), values)
        # The coded size is the tables' ideal code length plus at most the tag and two words.
        ideal = tables.bits(values) / 8
        assert ideal + T.TAG_BYTES - 4 <= len(payload) <= ideal + T.TAG_BYTES + 8, (len(payload), ideal)
        coded.append(len(payload))
    assert np.mean(coded) < 0.75 * z[0].size  # against one byte a value at 8 bits: the tables pay off
    # A batch [n,c,h,w] is one stream in C order.
    d, payload = A.encode(z[:5], tables, scale=step)
    assert np.array_equal(A.decode_values(payload, tables, (5, *z.shape[1:])), A.quantize_values(z[:5], tables, step))


def test_channel_subset_zero_fill_and_decode_into():
    ts = laplace_tables(channels=3)
    y = RNG.laplace(0, 2, (3, 4, 5)).astype(np.float32)
    d, p = A.encode(y, ts)
    full = A.decode(d, p, ts, full_channels=6)
    assert full.shape == (6, 4, 5) and not full[3:].any()
    out = np.full((3, 4, 5), np.nan, np.float32)
    assert A.decode(d, p, ts, out=out) is out and np.array_equal(out, full[:3])


def test_values_clip_to_the_tables_and_out_of_table_values_are_refused():
    ts = T.make_table_set("small", [-1], [T.quantize_pmf([1, 2, 1])])
    y = np.array([[[-7.0, 0.4, 9.0]]], np.float32)
    assert A.quantize_values(y, ts).tolist() == [[[-1, 0, 1]]]
    e = expect(ErrorCode.MALFORMED, A.encode_values, np.array([[[0, 2]]], np.int32), ts)
    assert "outside table set" in e.message


# -- the size bound, and every malformed class ----------------------------------------------------


def _frame():
    rng = np.random.default_rng(7)
    ts = laplace_tables("f", channels=4, rng=rng)
    y = rng.laplace(0, 3, (4, 6, 6)).astype(np.float32)
    d, p = A.encode(y, ts)
    assert len(p) >= T.TAG_BYTES + 8
    return ts, d, p


def test_decoded_size_is_bounded_before_anything_is_allocated():
    ts, d, p = _frame()
    huge = dict(d, shape=[4, 1 << 20, 1 << 10], channels=4)
    e = expect(ErrorCode.TOO_LARGE, A.check_ans_descriptor, huge, len(p))
    assert "over the limit" in e.message
    expect(ErrorCode.TOO_LARGE, A.decode, huge, p, ts)
    assert A.max_payload_bytes(144) == 2 + 4 * (108 + 2)


def test_malformed_classes_are_malformed():
    ts, d, p = _frame()
    other = laplace_tables("g", channels=4)
    shape = tuple(d["shape"])
    cases = {
        "truncated by a word": p[:-4],
        "truncated by a byte": p[:-1],
        "empty": b"",
        "a word appended": p + b"\x01\x00\x00\x00",
        "trailing zero word": p + bytes(4),
        "oversized: longer than any coding of the shape": p[:2] + b"\x01" * (A.max_payload_bytes(144) + 2),
        "CDF mismatch: another table set's tag": other.tag + p[T.TAG_BYTES :],
    }
    for label, payload in cases.items():
        e = expect(ErrorCode.MALFORMED, A.decode_values, payload, ts, shape)
        assert e.message, label
        desc = dict(d, nbytes=len(payload))
        expect(ErrorCode.MALFORMED, A.decode, desc, payload, ts)
    # Garbage behind the right tag: refused unless it happens to be a valid coding (a stream that
    # drains to the empty state), and then it decodes to values inside the tables.
    rng = np.random.default_rng(8)
    accepted = 0
    for _ in range(400):
        words = rng.integers(1, 1 << 32, size=int(rng.integers(1, 3 * len(p) // 4)), dtype=np.uint64)
        try:
            v = A.decode_values(ts.tag + words.astype("<u4").tobytes(), ts, shape)
        except WireError as e:
            assert e.code == ErrorCode.MALFORMED
            continue
        accepted += 1
        assert np.all(v >= np.array(ts.offsets)[:, None, None])
        assert np.all(v < (np.array(ts.offsets) + ts.sizes())[:, None, None])
    assert accepted <= 20, accepted  # PROTOCOL.md §4.4: "nearly all"
    # The tag alone is a whole frame: the coding of every value at its channel's lowest entry
    # (the state never leaves zero). So a frame cut to exactly its tag is the one truncation that
    # decodes; PROTOCOL.md §4.4 says so.
    lowest = np.broadcast_to(np.array(ts.offsets, np.int32)[:, None, None], shape)
    assert np.array_equal(A.decode_values(ts.tag, ts, shape), lowest)
    assert A.encode_values(lowest, ts) == ts.tag
    # A CDF mismatch whose tag happens to agree (a 2-byte tag collides once in 65536): the words
    # coded with one table set, decoded with another, do not end where the values end.
    assert other.tag != ts.tag
    expect(ErrorCode.MALFORMED, A.decode_values, other.tag + p[T.TAG_BYTES :], other, shape)
    # tables for another number of channels
    e = expect(ErrorCode.MALFORMED, A.decode_values, p, T.make_table_set("h", ts.offsets[:3], ts.freqs[:3]), shape)
    assert "CDF mismatch" in e.message


def test_descriptor_refusals():
    ts, d, p = _frame()
    for bad in (
        dict(d, dtype="uint8"),
        dict(d, bits=8),
        dict(d, zero_point=3),
        dict(d, scale=0.0),
        dict(d, scale=float("nan")),
        dict(d, channels=3),
        dict(d, shape=[4, 36]),
        dict(d, shape=[4, -6, 6]),
        dict(d, nbytes=len(p) + 1),
        {k: v for k, v in d.items() if k != "nbytes"},
        dict(d, codec="raw"),
        ["not", "a", "map"],
    ):
        expect(ErrorCode.MALFORMED, A.check_ans_descriptor, bad, len(p))


def test_missing_constriction_names_the_package(monkeypatch):
    import importlib

    real_import = importlib.import_module

    def no_constriction(name, *a, **k):
        if name == "constriction":
            raise ImportError("No module named 'constriction'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_constriction)
    e = expect(ErrorCode.UNSUPPORTED, T.constriction_module)
    assert "edgesplit[entropy]" in e.message and "aarch64" in e.message


def test_protocol_worked_example():
    # PROTOCOL.md §4.4 and BUNDLE.md §7.2, byte for byte.
    ts = T.make_table_set("example", [-1, 0], [[16384, 32768, 16384], [61440, 4096]])
    assert ts.digest == "01b228719a17d5a6c46c373923209deb0d27981451a5748495a3537274aebd7d"
    assert ts.tag == bytes([0x01, 0xB2])
    assert [T.coder_cdf(f).tolist() for f in ts.freqs] == [[0, 4194304, 12582911, 16777216], [0, 15728639, 16777216]]
    values = np.array([[[0, 1, -1]], [[0, 0, 1]]], np.int32)
    frame = A.encode_values(values, ts)
    assert frame == bytes.fromhex("01b211009021")
    assert np.array_equal(A.decode_values(frame, ts, values.shape), values)
    x = np.array([[[0.2, 1.6, -0.7]], [[0.49, -3.0, 0.5]]], np.float32)
    assert A.quantize_values(x, ts).tolist() == [[[0, 1, -1]], [[0, 0, 0]]]
    doc = json.loads(
        '{"format": "edgesplit-ans-tables", "version": 1, "precision": 16, "sets": {"example": {"channels": '
        '[{"offset": -1, "freqs": [16384, 32768, 16384]}, {"offset": 0, "freqs": [61440, 4096]}], '
        '"sha256": "01b228719a17d5a6c46c373923209deb0d27981451a5748495a3537274aebd7d"}}}'
    )
    assert T.parse_tables(doc)["example"].digest == ts.digest == T.tables_document([ts])["sets"]["example"]["sha256"]


def test_fuzz_cases_of_every_class_get_their_answer():
    from edgesplit.wire.fuzz_ans import ANS_CLASSES, DECODES, malformed_ans_frames

    rng = np.random.default_rng(21)
    seen, decoded, total = set(), 0, 0
    for seed in range(30):
        ts, other = laplace_tables("a", 4, rng), laplace_tables("b", 4, rng)
        lo = np.maximum(ts.offsets, other.offsets)
        hi = np.minimum(np.array(ts.offsets) + ts.sizes(), np.array(other.offsets) + other.sizes()) - 1
        values = np.stack([rng.integers(a, b + 1, (5, 5)) for a, b in zip(lo, hi)]).astype(np.int32)
        for case in malformed_ans_frames(ts, values, other, seed=seed):
            seen.add(case.cls)
            total += 1
            try:
                x = A.decode(case.descriptor, case.payload, ts)
            except WireError as e:
                assert e.code in case.expect, (case.cls, case.what, e)
                continue
            assert DECODES in case.expect, (case.cls, case.what)
            decoded += 1
            assert np.all(x >= np.array(ts.offsets)[:, None, None])
    assert seen == set(ANS_CLASSES)
    assert decoded <= 0.05 * total, (decoded, total)
