"""``edgesplit eval`` and ``edgesplit inspect`` of a U-shaped bundle (docs/BUNDLE.md §7.3), on the tiny
SFPrompt bundle of tests/ushaped_fixtures.py.

Checked: eval's per-mode accuracy equals what the real daemon and agent serve on the same frames
and the manifest's figure (measured at export on those frames); its bytes up and down equal the
served frames' payloads and the manifest's; its teacher accuracy is full.onnx's; the JPEG baseline
stands each mode against its bytes up; the text output names bytes each way. ``inspect`` shows
each U-shaped mode's dtype, bits, tokens, bytes each way and answer dtype, not the head-tail channels
table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from build_fixtures import one_torch_thread  # noqa: F401  (pytest fixture by name)
from ushaped_fixtures import FRAMES, bundle, full_logits, samples  # noqa: F401  (fixtures by name)

from edgesplit.bundle import Bundle

ROOT = Path(__file__).resolve().parents[1]
JPEG_FRAMES = 8


@pytest.fixture(scope="module")
def evaluated(bundle) -> dict:
    from edgesplit.bench.evaluate import evaluate_bundle

    return evaluate_bundle(bundle, "cifar10:test", frames=FRAMES, jpeg_frames=JPEG_FRAMES, threads=1, jpeg_grid=True)


def served(b: Bundle, samples) -> dict[int, list]:
    """Every frame served in every mode by the real daemon to the real agent (loopback)."""
    from edgesplit.edge.agent import Agent
    from edgesplit.server.daemon import Server

    with Server([b], "tcp://127.0.0.1:0", threads=1, max_batch=8, max_queue_delay_us=500) as srv:
        with Agent(b, srv.endpoint, threads=1) as agent:
            got = {m.id: [agent.infer(s, mode=m.id) for s in samples] for m in b.modes}
    for m_id, rs in got.items():
        assert all(r.ok and r.source == "server" and r.mode == m_id for r in rs), [r.to_json() for r in rs]
    return got


def test_eval_measures_each_token_mode_as_it_is_served(bundle, samples, evaluated):
    ev, man = evaluated, bundle.manifest
    labels = np.asarray([s.label for s in samples])
    assert (ev["serving"], ev["frames"], ev["mode"]) == ("u-shaped", FRAMES, bundle.default_mode.name)
    assert [(m["id"], m["name"], m["dtype"], m["bits"]) for m in ev["modes"]] == [
        (m.id, m.name, m.dtype, m.bits) for m in bundle.modes
    ]
    on_server = served(bundle, samples)
    for m, raw, x in zip(bundle.modes, man["modes"], ev["modes"]):
        rs = on_server[m.id]
        acc = float(np.mean(np.stack([r.logits for r in rs]).argmax(1) == labels))
        assert x["accuracy"] == acc == m.accuracy, (m.name, x["accuracy"], acc, m.accuracy)
        # bytes up: the coded tokens; down: the body's output in the mode's answer encoding, as served and
        # as the manifest says
        assert {r.bytes_sent for r in rs} == {x["bytes_per_frame"]} == {raw["bytes_per_frame"]}
        assert {r.bytes_received for r in rs} == {x["bytes_down_per_frame"]} == {raw["bytes_down_per_frame"]}
        assert x["bytes_p95"] == x["bytes_per_frame"] and x["bits_per_frame"] == 8 * x["bytes_per_frame"]
        assert x["tokens"] == bundle.wire_spec["shape"] and "channels" not in x
        assert x["codec"] == "raw" and x["bytes_per_frame_zstd"] is None and x["step"] is None
    T, D = bundle.wire_spec["shape"]
    assert [x["bytes_per_frame"] for x in ev["modes"]] == [T * D * 4, T * D * 2, T * D]
    assert [(x["answer"], x["bytes_down_per_frame"]) for x in ev["modes"]] == [
        ("float32", T * D * 4),
        ("float16", T * D * 2),
        ("uint8", T * D),
    ]
    default = next(x for x in ev["modes"] if x["id"] == bundle.default_mode.id)
    assert (ev["accuracy"], ev["bytes_per_frame"], ev["bytes_down_per_frame"]) == (
        default["accuracy"],
        default["bytes_per_frame"],
        default["bytes_down_per_frame"],
    )
    teacher = float(np.mean(full_logits(bundle, samples).argmax(1) == labels))
    assert ev["teacher_accuracy"] == teacher == man["teacher_accuracy"]


def test_eval_codes_each_frame_as_the_agent_sends_it_and_the_daemon_answers(bundle, samples):
    """The tokens eval runs the body on are those the daemon decodes from the agent's own encoding,
    frame by frame (8-bit codes: each frame's own scale, not one for the batch); the body output the
    tail runs on is the daemon's answer in the mode's encoding, one result (one scale) per frame."""
    from edgesplit.bench.evaluate_ushaped import answered_body_output, sent_tokens
    from edgesplit.data.transforms import preprocess
    from edgesplit.edge.ushaped import UShapedPart
    from edgesplit.engine import create_engine
    from edgesplit.wire import codec
    from edgesplit.wire import split_train as S

    head, body = (create_engine(bundle.file(role), threads=1) for role in ("head", "body"))
    tokens = head.run1(np.stack([preprocess(s.data, bundle.input_spec) for s in samples[:8]]))
    agent = UShapedPart(bundle, threads=1)
    for m in bundle.modes:
        sent, sizes = sent_tokens(tokens, m.bits, bundle.wire_spec["name"])
        for i, z in enumerate(tokens):
            desc, payload = agent.encode(z, m)
            assert sizes[i] == len(payload) == m.bytes_per_frame
            np.testing.assert_array_equal(sent[i], codec.decode(desc, payload))
        if m.dtype == "uint8":
            assert not np.array_equal(sent, S.roundtrip(tokens, 8))  # one scale for the batch is not what is sent
    out = body.run1(tokens)
    received, down = answered_body_output(out)
    np.testing.assert_array_equal(received, out)
    assert down == [out[0].size * 4] * len(out)
    for m in bundle.modes:
        received, down = answered_body_output(out, m.answer_bits)
        np.testing.assert_array_equal(received, np.stack([S.roundtrip(f, m.answer_bits) for f in out]))
        assert down == [out[0].size * m.answer_bits // 8] * len(out)
    assert not np.array_equal(answered_body_output(out, 8)[0], S.roundtrip(out, 8))  # per frame, not per batch


def test_eval_sets_the_jpeg_baseline_against_the_bytes_up(evaluated):
    from edgesplit.bench.evaluate import best_at_bytes

    ev = evaluated
    assert ev["jpeg_frames"] == JPEG_FRAMES and ev["jpeg_baseline"]
    for x in ev["modes"]:
        best = best_at_bytes(ev["jpeg_baseline"], x["bytes_per_frame"])
        assert x["jpeg_accuracy_at_bytes"] == (None if best is None else best["accuracy"])
    assert ev["jpeg_best_at_bytes"] == best_at_bytes(ev["jpeg_baseline"], ev["bytes_per_frame"])


def test_eval_command_prints_bytes_each_way(bundle, capsys):
    from edgesplit.bench.evaluate import eval_main

    args = ["--bundle", str(bundle.root), "--data", "cifar10:test", "--frames", "8", "--no-jpeg", "--threads", "1"]
    assert eval_main(args) == 0
    out = capsys.readouterr().out
    T, D = bundle.wire_spec["shape"]
    for m in bundle.modes:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(f"mode {m.name} "))
        assert f"{m.dtype} tokens [{T}, {D}]" in line, line
        assert f"up {T * D * m.bits // 8}, down {T * D * m.bits // 8} ({m.answer_dtype})" in line, line
    assert eval_main([*args, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["frames"] == 8 and [x["bytes_down_per_frame"] for x in res["modes"]] == [T * D * 4, T * D * 2, T * D]


def test_inspect_shows_what_a_u_shaped_mode_is(bundle):
    r = subprocess.run(
        [sys.executable, "-m", "edgesplit", "inspect", str(bundle.root)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out, (T, D) = r.stdout, bundle.wire_spec["shape"]
    assert "serving  u-shaped" in out and "channels" not in out
    rows = [
        [t for t in line.split() if t != "*"]
        for line in out.splitlines()
        if line.strip().startswith(("0 ", "1 ", "2 "))
    ]
    # id, name, dtype, bits, tokens, bytes up, bytes down, answer dtype, accuracy per mode, in manifest order
    size = {m.id: str(T * D * m.bits // 8) for m in bundle.modes}  # the answer travels in the tokens' dtype
    assert [row[:8] for row in rows] == [
        [str(m.id), m.name, m.dtype, str(m.bits), f"{T}x{D}", size[m.id], size[m.id], m.dtype] for m in bundle.modes
    ]
    assert [float(row[8]) for row in rows] == pytest.approx([m.accuracy for m in bundle.modes], abs=1e-4)
    assert f"{bundle.default_mode.name} *" in out


def test_inspect_json_of_a_u_shaped_bundle(bundle):
    from edgesplit.bundle_cli import summarize

    s = json.loads(json.dumps(summarize(Bundle.load(bundle.root))))
    assert s["serving"] == "u-shaped" and s["default_mode"] == bundle.default_mode.id
    assert [
        {k: x[k] for k in ("id", "name", "dtype", "bits", "bytes_per_frame", "bytes_down_per_frame")}
        for x in s["modes"]
    ] == [
        {k: raw[k] for k in ("id", "name", "dtype", "bits", "bytes_per_frame", "bytes_down_per_frame")}
        for raw in bundle.manifest["modes"]
    ]
    assert all(x["tokens"] == bundle.wire_spec["shape"] and "channels" not in x for x in s["modes"])
    assert [x["answer"] for x in s["modes"]] == [raw["answer"] for raw in bundle.manifest["modes"]]
    assert [x["tail_ms"] for x in s["modes"]] == [raw["tail_ms"] for raw in bundle.manifest["modes"]]
