"""Issue 14 end to end with real components: a BottleFit split with a learned entropy bottleneck
(tests/recipes/tiny-bottlefit-entropy.yaml, two quantization steps) trained by ``edgesplit train``
on a slice of the real CIFAR-10 shards, exported by ``edgesplit export`` (cdf.json + one codec
"ans" mode per step, each with its own table set and scale), read back by the bundle reader (and
refused when its ans keys or tables are broken), served by a real ``edgesplit serve`` process and
streamed by the real agent over ZeroMQ on loopback: answers in every mode equal head -> ans coder
(at the mode's step) -> tail run here, compact ans requests when the welcome allows them, the ans
fuzz classes answered as PROTOCOL.md §4.4 says while good frames are still answered, and a server
without the entropy extra answering UNSUPPORTED. An export asked for other steps measures them again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import constriction  # noqa: F401  (codec 'ans' needs the entropy extra, which tools/setup.sh installs)
import numpy as np
import pytest
from build_fixtures import one_torch_thread  # noqa: F401  (pytest fixture by name)
from entropy_fixtures import FRAMES, STEPS, bundle, local_run, samples  # noqa: F401  (pytest fixture by name)

from edgesplit.bundle import Bundle, BundleError, validate_manifest, write_manifest
from edgesplit.wire import ans_codec as A

# -- the bundle -----------------------------------------------------------------------------------


def test_export_writes_the_tables_and_one_ans_mode_per_step_with_measured_sizes(bundle):
    from edgesplit.data.transforms import preprocess
    from edgesplit.engine import create_engine

    b = bundle
    assert b.has("cdf") and [m.codec for m in b.modes] == ["ans", "ans"]
    assert [m.scale for m in b.modes] == STEPS and [m.tables for m in b.modes] == ["main", "s2"]
    assert b.default_mode.scale == 1.0 and set(b.tables) == {"main", "s2"}
    ent = b.manifest["training"]["results"]["entropy"]
    assert "tables" not in ent  # the tables live in cdf.json only
    x = np.stack([preprocess(s.data, b.input_spec) for s in samples(FRAMES)])
    z = create_engine(b.file("head"), threads=1).run1(x)
    means = []
    for m, fig in zip(b.modes, ent["steps"]):
        tables = b.tables_for(m)
        assert m.bits == 32 and m.zero_point == 0 and m.channels == b.wire_spec["shape"][0]
        assert tables.digest == m.tables_sha256 and tables.channels == m.channels
        assert m.name == f"c{m.channels}-ans-{m.tables}"
        # the accuracy the run measured at this step (torch, the wire's step and clipping applied)
        assert fig["step"] == m.scale and fig["tables"] == m.tables and m.accuracy == fig["accuracy"]
        # bytes_per_frame and bytes_p95: the exported head on the check images, coded at the mode's
        # step, measured again here
        sizes = np.array([len(A.encode(f, tables, scale=m.scale)[1]) for f in z], dtype=np.float64)
        assert m.bytes_per_frame == round(float(sizes.mean()), 2) and m.bytes_p95 == float(np.percentile(sizes, 95))
        assert len(set(sizes.tolist())) > 1  # frames really differ in length: the values are not all one
        assert 0.0 <= m.accuracy <= 1.0
        means.append(sizes.mean())
    assert means[1] < means[0]  # the coarser step sends fewer bytes
    assert ent["accuracy"] == ent["steps"][0]["accuracy"]  # step 1's figures stay at the top level


def test_export_for_other_steps_measures_them_again(bundle, tmp_path):
    """A run trained with steps [1, 2] exported for [1, 3]: every step is measured again on the
    recipe's evaluation frames (the same slice as training: step 1 gets the run's own accuracy and
    tables back), the new step gets its own table set and mode, and the bundle loads."""
    from edgesplit.builder.export_common import ExportOptions
    from edgesplit.families.bottlefit.export import export_bundle

    student = bundle.root.parent / "runs" / "tiny-bottlefit-entropy" / "student.pt"
    steps = {"entropy_steps": [3, 1.0], "entropy_limit_per_shard": 16}
    b = export_bundle(student, tmp_path / "b3", ExportOptions(check_frames=FRAMES, family=steps))
    assert [m.scale for m in b.modes] == [1.0, 3.0] and [m.tables for m in b.modes] == ["main", "s3"]
    assert b.default_mode.scale == 1.0
    assert b.tables["main"].digest == bundle.tables["main"].digest  # the same density, cut the same way
    ent = b.manifest["training"]["results"]["entropy"]
    assert ent["measured"] == "at export" and [f["step"] for f in ent["steps"]] == [1.0, 3.0]
    assert b.modes[0].accuracy == bundle.modes[0].accuracy  # the same frames, the same model
    assert b.modes[0].bytes_per_frame == bundle.modes[0].bytes_per_frame
    assert b.modes[1].bytes_per_frame < bundle.modes[1].bytes_per_frame  # step 3 is coarser than step 2
    with pytest.raises(ValueError, match="1.0 among them"):
        export_bundle(student, tmp_path / "bad", ExportOptions(check_frames=FRAMES, family={"entropy_steps": [2.0]}))


def _edited(bundle: Bundle, tmp_path: Path, edit_manifest=None, edit_tables=None) -> Path:
    out = tmp_path / "b"
    shutil.copytree(bundle.root, out)
    m = json.loads((out / "manifest.json").read_text())
    if edit_tables is not None:
        doc = json.loads((out / "cdf.json").read_text())
        edit_tables(doc)
        (out / "cdf.json").write_text(json.dumps(doc))
    if edit_manifest is not None:
        edit_manifest(m)
    write_manifest(out, m)  # re-hashes every file: only the edit is wrong
    return out


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["modes"][0]["entropy"].update(sha256="0" * 64), "entropy.sha256 says"),
        (lambda m: m["modes"][0]["entropy"].update(tables="other"), "does not hold"),
    ],
)
def test_reader_refuses_a_mode_that_does_not_match_its_tables(bundle, tmp_path, edit, message):
    with pytest.raises(BundleError, match=message):
        Bundle.load(_edited(bundle, tmp_path, edit_manifest=edit))


def test_reader_refuses_altered_or_mismatched_tables(bundle, tmp_path):
    def bump(doc):  # move one unit of frequency: the set's recorded digest no longer matches
        f = doc["sets"]["main"]["channels"][0]["freqs"]
        i = int(np.argmax(f))
        f[i] -= 1
        f[i - 1] += 1

    with pytest.raises(BundleError, match=r"cdf.*sha256 does not match"):
        Bundle.load(_edited(bundle, tmp_path / "a", edit_tables=bump))

    def narrow(m):  # the mode sends fewer channels than its table set has tables
        m["modes"][0]["channels"] -= 1

    with pytest.raises(BundleError, match="tables"):
        Bundle.load(_edited(bundle, tmp_path / "b", edit_manifest=narrow))
    # an unaltered copy loads, and the file is pinned by the manifest like any other
    copy = _edited(bundle, tmp_path / "c")
    Bundle.load(copy)
    (copy / "cdf.json").write_text((copy / "cdf.json").read_text().replace('"version":1', '"version": 1'))
    with pytest.raises(BundleError, match="cdf.json"):
        Bundle.load(copy)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("codec", "zstd", r"codec' must be 'ans'"),
        ("bits", 8, r"bits' of an 'ans' mode must be 32"),
        ("entropy", None, r"entropy"),
        ("bytes_p95", -1, r"bytes_p95"),
    ],
)
def test_schema_checks_every_ans_mode_key(bundle, key, value, message):
    m = json.loads(json.dumps(bundle.manifest))
    if value is None:
        del m["modes"][0][key]
    else:
        m["modes"][0][key] = value
    with pytest.raises(BundleError, match=message):
        validate_manifest(m)
    m = json.loads(json.dumps(bundle.manifest))
    m["modes"][0]["quant"]["zero_point"] = 1
    with pytest.raises(BundleError, match="zero_point"):
        validate_manifest(m)
    m = json.loads(json.dumps(bundle.manifest))
    del m["files"]["cdf"]
    with pytest.raises(BundleError, match="no 'cdf' entry"):
        validate_manifest(m)


# -- serving ----------------------------------------------------------------------------------------


def test_served_by_a_server_process_equals_head_coder_tail_here(bundle):
    """Every step's mode, sent by the real agent: the server decodes with the mode's tables and
    reconstructs at the mode's step (a server that ignored the step would answer other logits)."""
    from edgesplit.bench.serverproc import ServerProcess
    from edgesplit.edge.agent import Agent

    frames = samples()
    with ServerProcess([str(bundle.root)], ["--threads", "1"]) as srv:
        with Agent(bundle, srv.endpoint, threads=1) as agent:
            got = {m.id: [agent.infer(s, mode=m.id) for s in frames] for m in bundle.modes}
            assert "ans" in agent.welcome.codecs and agent.compact_requests
        assert srv.alive()
    refs = {}
    for m in bundle.modes:
        ref, sizes = local_run(bundle, frames, m)
        g = got[m.id]
        assert all(r.error is None and r.mode == m.id for r in g), [r.to_json() for r in g if r.error][:3]
        assert [r.bytes_sent for r in g] == sizes  # variable-length frames, each exactly the coder's
        assert all(r.header_bytes < 40 for r in g)  # compact: the frame's length stands for nbytes
        np.testing.assert_allclose(np.stack([r.logits for r in g]), ref, rtol=1e-4, atol=1e-4)
        refs[m.id] = ref
    assert not np.allclose(*refs.values(), atol=1e-3)  # the two steps really reach the tail differently


def test_full_ans_requests_are_answered_the_same(bundle):
    """A client that sends the §4.4 descriptor (no compact form) gets the same logits, batched too."""
    from edgesplit.data.transforms import preprocess
    from edgesplit.engine import create_engine
    from edgesplit.server.daemon import Server
    from edgesplit.wire import protocol as P
    from edgesplit.wire.transport import connect_dealer, recv_parts, send_parts

    frames = samples(4)
    head = create_engine(bundle.file("head"), threads=1)
    z = np.stack([head.run1(preprocess(s.data, bundle.input_spec)[None])[0] for s in frames])
    with Server([bundle], "tcp://127.0.0.1:0", threads=1, max_batch=8, max_queue_delay_us=500) as srv:
        sock = connect_dealer(srv.endpoint)
        try:
            send_parts(sock, P.pack(P.hello(bundle.hash, "t")))
            assert P.parse(recv_parts(sock)).kind == "welcome"
            for m in bundle.modes:
                ref, _ = local_run(bundle, frames, m)
                # one [4,C,h,w] request, its descriptor carrying the mode's step as its scale
                d, payload = A.encode(z, bundle.tables_for(m), scale=m.scale, name=bundle.wire_spec["name"])
                assert d["scale"] == m.scale
                send_parts(sock, P.pack(P.request(1 + m.id, m.id, [d]), [payload]))
                msg = P.parse(recv_parts(sock))
                assert msg.kind == "result", msg.header
                logits = np.frombuffer(msg.frames[0], "<f4").reshape(4, -1)
                np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)
        finally:
            sock.close(linger=0)


def test_fuzz_ans_classes_get_malformed_and_good_frames_are_still_answered(bundle):
    """Every ans fuzz class (fuzz_ans.ANS_CLASSES) against a server process, each case answered
    with a code PROTOCOL.md §4.4 allows (MALFORMED, TOO_LARGE for a shape over the limit; a result
    only for a garbage frame that is a valid coding); nothing INTERNAL, the server alive, and a
    real agent's good frames answered right after."""
    from edgesplit.bench.fuzz import FuzzClient
    from edgesplit.bench.serverproc import ServerProcess
    from edgesplit.edge.agent import Agent
    from edgesplit.wire.fuzz_ans import ANS_CLASSES

    frames = samples(4)
    ref, _ = local_run(bundle, frames)
    with ServerProcess([str(bundle.root)], ["--threads", "1", "--credits", "64"]) as srv:
        fuzz = FuzzClient(srv.endpoint, bundle, seed=14, window=8).connect()
        assert fuzz.generator is not None and set(fuzz.generator._names) == set(ANS_CLASSES)  # ans-only bundle
        report = fuzz.run(400).to_json()
        fuzz.close()
        with Agent(bundle, srv.endpoint, threads=1) as agent:
            after = [agent.infer(s) for s in frames]
        assert srv.alive()
        log = srv.log_text()
    assert report["mismatches"] == 0, json.dumps(report["mismatch_examples"], indent=1)
    assert report["unexpected"] == 0 and report["unanswered"] == 0 and report["internal_errors"] == 0
    assert set(report["by_class"]) == set(ANS_CLASSES)
    assert report["answers"].get("MALFORMED", 0) > 0 and report["answers"].get("TOO_LARGE", 0) > 0
    assert "Traceback" not in log
    assert all(g.error is None for g in after)
    np.testing.assert_allclose(np.stack([g.logits for g in after]), ref, rtol=1e-4, atol=1e-4)


def test_a_server_without_the_entropy_extra_answers_unsupported(bundle, tmp_path):
    """The daemon run where constriction cannot be imported: it still loads the bundle (the tables
    are plain JSON), does not list "ans" in its welcome, and answers an ans request UNSUPPORTED,
    full or compact; the agent then never sends one compact."""
    from edgesplit.edge.agent import Agent
    from edgesplit.wire import protocol as P
    from edgesplit.wire.transport import connect_dealer, free_tcp_endpoint, recv_parts, send_parts

    stub = tmp_path / "stub" / "constriction"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('constriction hidden by the test')\n")
    endpoint = free_tcp_endpoint()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stub.parent), *sys.path]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "edgesplit", "serve", "--bind", endpoint, "--bundle", str(bundle.root)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "listening on " in line:
                break
        m = bundle.default_mode
        with Agent(bundle, endpoint, threads=1) as agent:
            assert "ans" not in agent.welcome.codecs and agent.compact_requests
            r = agent.infer(samples(1)[0])
        assert r.error == "UNSUPPORTED" and r.header_bytes > 100  # sent in full: no compact ans here
        sock = connect_dealer(endpoint)
        try:
            send_parts(sock, P.pack(P.hello(bundle.hash, "t")))
            assert P.parse(recv_parts(sock)).kind == "welcome"
            frame = bundle.tables_for(m).tag  # the coding of all-lowest values: a valid ans frame
            send_parts(sock, P.pack(P.request(7, m.id, None), [frame]))  # compact, as a newer agent might
            err = P.parse(recv_parts(sock))
            assert err.kind == "error" and err.header["name"] == "UNSUPPORTED" and err.header["id"] == 7
        finally:
            sock.close(linger=0)
    finally:
        proc.terminate()
        proc.wait(30)


# -- measuring ----------------------------------------------------------------------------------------


def test_eval_reports_bits_measured_on_the_coded_frames_next_to_jpeg(bundle):
    """``edgesplit eval``'s code: an ans mode's bytes are its real coded frames (mean, p95, bits
    per frame), its accuracy is what head -> coder -> tail gives here, and it sits next to the best
    JPEG at its bytes."""
    from edgesplit.bench.evaluate import evaluate_bundle

    frames = samples()
    labels = np.asarray([s.label for s in frames])
    ev = evaluate_bundle(bundle, "cifar10:test", frames=FRAMES, jpeg_frames=8, threads=1, jpeg_grid=True)
    assert [m["step"] for m in ev["modes"]] == STEPS  # one row per step: the comparison the lead reads
    for m, mode in zip(ev["modes"], bundle.modes):
        ref, sizes = local_run(bundle, frames, mode)
        assert m["codec"] == "ans" and m["bits"] == 32 and m["id"] == mode.id
        assert m["bytes_per_frame"] == float(np.mean(sizes))
        assert m["bits_per_frame"] == 8 * float(np.mean(sizes)) and m["bytes_p95"] == float(np.percentile(sizes, 95))
        assert m["bytes_per_frame_zstd"] is None
        assert m["accuracy"] == float(np.mean(ref.argmax(1) == labels))
        assert "jpeg_accuracy_at_bytes" in m and ev["jpeg_min_bytes"] > 0
    assert ev["bytes_per_frame"] == ev["modes"][0]["bytes_per_frame"]  # the default mode: step 1


def test_bench_e2e_codec_stage_times_the_ans_coder_on_real_frames(bundle):
    from edgesplit.bench.e2e import codec_stage_ms

    _, sizes = local_run(bundle, samples())
    st = codec_stage_ms(bundle, None, "cifar10:test", frames=FRAMES)
    assert st["codec"] == "ans" and st["codec_frames"] == FRAMES
    assert st["codec_bytes_mean"] == float(np.mean(sizes))
    for k in ("codec_encode_ms_p50", "codec_encode_ms_p95", "codec_decode_ms_p50", "codec_decode_ms_p95"):
        assert st[k] > 0, k


# -- the control plane ----------------------------------------------------------------------------------


def test_policy_plans_with_the_tail_size_and_predicts_with_the_coded_size(bundle):
    """The modes table of the ans bundle carries the expected size and the tail percentile; the
    deadline policy budgets the tail percentile before a frame is coded, and its prediction for a
    coded frame uses that frame's real size (frames coded here from real images)."""
    from edgesplit.control.policy import DeadlinePolicy, FrameState
    from edgesplit.edge.adaptive import bundle_modes

    table = bundle_modes(bundle)
    assert [s.id for s in table.modes] == [m.id for m in bundle.modes]
    for spec, m in zip(table.modes, bundle.modes):
        assert spec.bytes_per_frame == m.bytes_per_frame and spec.bytes_p95 == m.bytes_p95
        assert spec.plan_bytes == max(m.bytes_p95, m.bytes_per_frame)
    # two steps of one model: the controller picks among them by accuracy and bytes like any modes
    assert table.smallest.id == bundle.modes[-1].id  # the coarsest step sends the fewest bytes
    bps = 2e5  # a slow uplink, where a frame's bytes are most of its latency
    policy = DeadlinePolicy(table, initial_bps=bps, overhead_bytes=30, local_ms=None)
    d = policy.choose(FrameState(now_s=0.0, deadline_ms=1e4))
    assert d.mode == table.ranked[0].id  # every mode fits: the most accurate
    spec, m = table.by_id[d.mode], bundle.mode(d.mode)
    assert d.predicted_ms == pytest.approx(policy.predict_ms(spec, bps, nbytes=spec.plan_bytes))
    # On a link where bytes are nearly all of the latency, a deadline that only the coarsest step's
    # tail size meets (with the policy's 15 % margin) picks that step.
    slow = DeadlinePolicy(table, initial_bps=2e3, overhead_bytes=30, local_ms=None)
    small = table.smallest
    tight = slow.predict_ms(small, 2e3) / 0.84
    assert all(slow.predict_ms(x, 2e3) > tight * 0.85 for x in table.modes if x is not small)
    assert slow.choose(FrameState(now_s=0.0, deadline_ms=tight)).mode == small.id
    _, sizes = local_run(bundle, samples(), m)
    for n in sizes:
        got = policy.coded_ms(d, n + 30)  # the request as sent: frame + header
        assert got == pytest.approx(policy.predict_ms(spec, bps, nbytes=n))
    assert len({round(policy.coded_ms(d, n + 30), 9) for n in sizes}) == len(set(sizes))


def test_planner_ranks_by_the_expected_size_and_reports_the_tail(bundle):
    """The planner's option for an ans mode, measured on real frames through its real coder: the
    expected payload is the mode's mean, the tail its 95th percentile, and a tail-sized frame's
    latency is predicted beside the expected one (more bytes on a slow link: later)."""
    from edgesplit.control.planner import Link, Machine, Scenario, predict
    from edgesplit.profile.plan_inputs import Timing, bundle_options

    m = bundle.default_mode
    options, _ = bundle_options(bundle.root, timing=Timing(runs=3, pace_ms=0, warmup=1), frames=4, extras=False)
    assert [o.name for o in options] == [x.name for x in bundle.modes]  # one option per step
    for o, x in zip(options, bundle.modes):
        assert o.payload_bytes == x.bytes_per_frame and o.payload_bytes_p95 == x.bytes_p95
    (opt,) = [o for o in options if o.name == m.name]
    assert opt.payload_bytes == m.bytes_per_frame and opt.payload_bytes_p95 == m.bytes_p95
    cpu = Machine("cpu", 10.0, 5.0)
    p = predict(opt, Scenario(cpu, cpu, cpu, Link(0.1, rtt_ms=5.0)))  # 100 kbit/s: bytes dominate
    assert p.request_bytes == opt.payload_bytes + opt.header_bytes
    # The bundle's sizes come from FRAMES (16) check frames, not all one length (the export test
    # checks both). With numpy's interpolation the 95th percentile of 16 values is 0.75 x[14] +
    # 0.25 x[15] of the sorted x, which exceeds their mean by at least 0.1875 (x[15] - x[14]), and
    # strictly unless all 16 are equal; integer sizes keep the gap a multiple of 1/16 B, more than the
    # manifest's rounding of the mean to 0.01 B. So the tail is strictly larger here, and later.
    assert m.bytes_p95 > m.bytes_per_frame
    assert p.latency_p95_ms > p.latency_ms and p.to_json()["latency_p95_ms"] == round(p.latency_p95_ms, 4)
