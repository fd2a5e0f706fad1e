"""edgesplit serve --backend ray: the daemon as a ZeroMQ gateway whose formed batches run on tail
replicas of a real Ray Serve application (a one-node local Ray cluster, one CPU), with real
agents sending real CIFAR-10 frames; a replica killed with SIGKILL mid-stream."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgesplit.bundle import Bundle
from edgesplit.edge.agent import Agent
from edgesplit.engine import EngineError
from edgesplit.server.batcher import Item
from edgesplit.server.daemon import Server
from edgesplit.server.tail_runner import TailRunner
from edgesplit.wire import codec

ray = pytest.importorskip("ray", reason="the 'ray' extra (ray[serve]) is not installed")
serve = pytest.importorskip("ray.serve")

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / "models" / "cifar10-resnet20-bottlefit"
OTHER = ROOT / "models" / "imagenette-resnet18-bottlefit"
APP = "edgesplit-cifar"


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return Bundle.load(CIFAR)


@pytest.fixture(scope="module")
def ray_app(bundle):
    """A local Ray cluster of one CPU, Serve without its HTTP proxy, and the tail application with
    two replicas (no CPU reserved each, so both fit)."""
    from edgesplit.server.ray_app import build

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        serve.run(
            build({"bundle": str(CIFAR), "threads": 1, "num_replicas": 2, "num_cpus": 0}), name=APP, route_prefix=None
        )
        yield APP
    finally:
        serve.shutdown()
        ray.shutdown()


def items_of(bundle: Bundle, zs: np.ndarray) -> list[Item]:
    """Queued requests as the I/O thread makes them (validated descriptor, frame)."""
    m = bundle.default_mode
    out = []
    for i, z in enumerate(zs):
        d, p = codec.encode(z, m, name=bundle.wire_spec["name"])
        out.append(Item((bundle.hash, m.id), b"", i, d, p, 1, True, 0))
    return out


def test_build_refuses_unknown_arguments():
    from edgesplit.server.ray_app import build

    with pytest.raises(ValueError, match="unknown argument"):
        build({"bundle": str(CIFAR), "replicas": 2})
    with pytest.raises(ValueError, match="'bundle' argument is required"):
        build({})


def bench_args(module, argv: list[str]):
    """A bench scenario's arguments as `edgesplit bench NAME ARGV` parses them."""
    import argparse

    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(argv)


def test_recovery_times_from_the_answer_stream():
    """The kill bench's recovery figures, on a stream whose shape is known: 1000 results/s, the
    kill, 300 ms of silence, 1000 results/s again."""
    from edgesplit.bench.gateway_kill import recovery

    ms = 1_000_000
    res = list(range(0, 1000 * ms, ms)) + list(range(1300 * ms, 2300 * ms, ms))
    sent = [t - 5 * ms for t in res]
    r = recovery(res, sent, 1000 * ms, 0.5)
    assert r["frames_per_s_before"] == 1000.0
    assert r["first_result_sent_after_kill_ms"] == 300.0
    assert r["longest_silence_after_kill_ms"] == 300.0
    assert r["back_to_90pct_ms"] == 250.0  # [1250, 1750) ms holds 450 results: 900/s
    assert r["min_window_frames_per_s_after"] == 400.0  # [1000, 1500) ms holds 200
    # with a freeze from 800 ms on, "before" is the second before the freeze
    assert recovery(res, sent, 1000 * ms, 0.5, before_end_ns=800 * ms)["frames_per_s_before"] == 1000.0


# The two bench tests start (and shut down) their own local Ray cluster in this process: they run
# before the tests that use the module's `ray_app` cluster.
def test_bench_gateway_scales_replicas_and_projects_nodes():
    """`bench gateway --ray-replicas 1,2 --inflight replicas`, tiny: one scaling row per replica
    count under the same load, every frame answered and correct; one batch trip per count; the
    projection labelled as such, with its formula, one row per node count, consistent with it."""
    from edgesplit.bench import gateway

    argv = ["--agents", "2", "--seconds", "1", "--warmup-s", "0.3", "--ray-replicas", "1,2"]
    out = gateway.run(bench_args(gateway, [*argv, "--inflight", "replicas", "--ray-cpus", "1", "--hop-repeats", "5"]))
    assert not ray.is_initialized()
    rows = out["scaling"]
    assert [(r["replicas"], r["inflight"], r["agents"]) for r in rows] == [(1, "replicas", 2), (2, "replicas", 2)], rows
    for r in rows:
        assert r["frames_per_s"] > 0 and r["unanswered"] == 0 and not r["errors"], r
        assert r["per_replica_frames_per_s"] == pytest.approx(r["frames_per_s"] / r["replicas"], abs=0.1)
        assert r["gateway_cpu_ms_per_frame"] > 0
    assert rows[0]["speedup"] == 1.0
    assert sorted(out["points"]) == ["in-process", "ray-r1-inflight-1", "ray-r2-inflight-2"]
    for p in out["points"]["ray-r2-inflight-2"][:-1]:
        assert p["wrong_results"] == 0 and p["requests"] > 0
    trips = out["batch_trip"]
    assert [t["replicas"] for t in trips] == [1, 2]
    assert all(t["ray_batch_ms_p50"] > 0 and t["engine_batch_ms_p50"] > 0 and t["batch"] >= 1 for t in trips), trips
    proj = out["projection"]
    assert proj["kind"] == "projection" and "min(N * per_node, G * per_gateway)" in proj["model"], proj
    inputs = proj["inputs"]
    assert inputs["tail_ms_per_batch"] == 0.3 and "DESIGN.md" in inputs["tail_ms_source"]
    per_node = 1000 * inputs["batch"] / (inputs["tail_ms_per_batch"] + inputs["overhead_ms_per_batch"])
    per_gateway = 1000 / inputs["gateway_cpu_ms_per_frame"]
    assert [r["nodes"] for r in proj["rows"]] == [1, 2, 4, 8]
    for r in proj["rows"]:
        assert r["frames_per_s_one_gateway"] == pytest.approx(min(r["nodes"] * per_node, per_gateway), rel=1e-3)
        assert r["gateways_needed"] >= 1


def test_bench_gateway_kill_accounts_for_every_frame():
    """`bench gateway-kill`, small: a replica frozen (1 s) then killed while four agents stream
    3,000 frames: each answered once, none lost; recovery and replacement reported. The stream
    outlasts the freeze at any speed this machine reaches, so the kill lands mid-stream; whether a
    batch was caught on the frozen replica depends on Ray's router (the bench JSON's
    ``latency_ms_max`` says), so it is not asserted."""
    from edgesplit.bench import gateway_kill

    argv = ["--frames", "3000", "--kill-at", "150", "--agents", "4", "--freeze-ms", "1000", "--ray-cpus", "1"]
    out = gateway_kill.run(bench_args(gateway_kill, [*argv, "--replace-timeout-s", "90"]))
    assert not ray.is_initialized()
    assert out["killed_mid_stream"] and out["frozen_ms"] >= 1000
    assert out["frames_sent"] == 3000 and out["lost"] == 0 and out["duplicates"] == 0
    assert out["answered_by_server"] + out["answered_by_fallback"] == 3000
    assert out["errors"] == {} and out["wrong_results"] == 0
    verdict = out["verdict"]
    assert verdict["zero_lost"] and verdict["zero_duplicates"] and verdict["recovery_reported"]
    assert not verdict["frames_ge_10k"] and not verdict["met"]
    rec = out["recovery"]
    assert rec["frames_per_s_before"] > 0 and rec["first_result_sent_after_kill_ms"] >= 0
    assert rec["replica_replaced_ms"] > rec["replica_down_seen_ms"] >= 0


def test_a_batch_through_ray_is_bit_identical(bundle, ray_app):
    """The same formed batch through a replica and through the in-process tail runner."""
    from edgesplit.server.ray_tail import RayTail

    rng = np.random.default_rng(0)
    m = bundle.default_mode
    zs = rng.uniform(0, 100 * m.scale, (13, *bundle.wire_spec["shape"])).astype(np.float32)
    local = TailRunner(bundle, threads=1)
    remote = RayTail(bundle, ray_app)
    for lo, hi in ((0, 1), (1, 13)):
        items = items_of(bundle, zs[lo:hi])
        a, b = local.run(items), remote.run(items)
        assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2] == {}
    assert remote.health() == (True, "")
    assert remote.capacity().instances == 2


def test_gateway_serves_agents_and_refuses_another_bundle(bundle, ray_app, cifar_samples):
    with Server([bundle], "tcp://127.0.0.1:0", threads=1) as local:
        with Agent(bundle, local.endpoint, inflight=8, threads=1) as agent:
            ref = sorted(agent.run(cifar_samples), key=lambda r: r.id)
    with Server([bundle], "tcp://127.0.0.1:0", backend="ray", ray_app=ray_app) as gw:
        assert gw.ready() == (True, "")
        with Agent(bundle, gw.endpoint, inflight=8, threads=1) as agent:
            got = sorted(agent.run(cifar_samples), key=lambda r: r.id)
    assert all(r.ok and r.source == "server" for r in got), [r.to_json() for r in got if not r.ok]
    np.testing.assert_allclose(np.stack([r.logits for r in got]), np.stack([r.logits for r in ref]), atol=1e-5)
    assert [r.pred for r in got] == [r.pred for r in ref]
    with pytest.raises(EngineError, match=f"serves bundle {bundle.hash[:12]}"):
        Server([OTHER], "tcp://127.0.0.1:0", backend="ray", ray_app=ray_app).start()


def test_replica_killed_mid_stream_no_frame_lost(bundle, ray_app, cifar_samples):
    """SIGKILL one of the two replicas, with a batch in flight on it, while an agent streams (no
    local fallback): every frame is still answered by the server, once; Ray Serve brings the
    replica count back."""
    from edgesplit.server.ray_app import DEPLOYMENT

    handle = serve.get_deployment_handle(DEPLOYMENT, app_name=ray_app)
    pids = set()
    t_end = time.monotonic() + 30
    while len(pids) < 2 and time.monotonic() < t_end:
        pids.add(handle.describe.remote().result(timeout_s=30)["pid"])
    assert len(pids) == 2
    victim = min(pids)
    samples = cifar_samples * 4
    with Server([bundle], "tcp://127.0.0.1:0", backend="ray", ray_app=ray_app) as gw:
        results = []
        with Agent(bundle, gw.endpoint, inflight=8, threads=1, timeout_s=60) as agent:
            for r in agent.run(samples):
                results.append(r)
                if len(results) == 8:
                    # Frozen first, so that a batch is routed to it and stays in flight there;
                    # then killed with that batch (the gateway's compute thread waits on it).
                    os.kill(victim, signal.SIGSTOP)
                    threading.Timer(1.0, os.kill, (victim, signal.SIGKILL)).start()
        ids = [r.id for r in results]
        assert len(ids) == len(set(ids)) == len(samples)
        assert all(r.ok and r.source == "server" for r in results), [r.to_json() for r in results if not r.ok]
        runner = gw.runners[bundle.hash]
        assert runner.remote_failures == 0
        # a batch was in flight on the frozen replica when it was killed (held for the 1 s freeze),
        # and was answered all the same (Ray Serve's handle sent it on; runner.retried counts the
        # gateway's own second tries, for failures that reach it)
        assert max(r.rtt_ms for r in results) > 900
        t_end = time.monotonic() + 90
        while runner.capacity().instances < 2 and time.monotonic() < t_end:
            time.sleep(0.5)
        assert runner.capacity().instances == 2
        pids_after = {handle.describe.remote().result(timeout_s=30)["pid"] for _ in range(8)}
        assert victim not in pids_after


def test_serve_command_as_gateway_to_the_cluster(bundle, ray_app, cifar_samples):
    """`edgesplit serve --backend ray --ray-app NAME --ray-address GCS` as its own process (a
    gateway joins the cluster as a driver): agents are served through it; SIGTERM drains it."""
    cmd = [sys.executable, "-m", "edgesplit.server.daemon", "--bundle", str(CIFAR), "--bind", "tcp://127.0.0.1:0"]
    bad = subprocess.run([*cmd, "--backend", "ray"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--backend ray and --ray-app go together" in bad.stderr
    gcs = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [*cmd, "--backend", "ray", "--ray-app", ray_app, "--ray-address", gcs],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = ""
        while "listening on" not in line:
            line = proc.stdout.readline()
            assert line, f"serve exited {proc.wait()}"
        with Agent(bundle, line.rsplit(" ", 1)[1].strip(), inflight=8, threads=1) as agent:
            got = list(agent.run(cifar_samples[:8]))
        assert all(r.ok and r.source == "server" for r in got), [r.to_json() for r in got]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def broken_bundle(src: Bundle, root: Path) -> Bundle:
    """The same bundle whose tail takes one row only: a batch of two makes its engine fail."""
    import json
    import shutil

    import onnx

    from edgesplit.bundle import write_manifest

    root.mkdir(parents=True)
    for role in ("head", "tail", "full"):
        shutil.copy(src.file(role), root / src.file(role).name)
    model = onnx.load(str(root / src.file("tail").name))
    for v in (*model.graph.input, *model.graph.output):
        v.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(root / src.file("tail").name))
    manifest = json.loads(json.dumps(src.manifest))
    manifest["name"] = "fixed-batch"
    for entry in manifest["files"].values():
        entry.pop("sha256", None)
    write_manifest(root, manifest)
    return Bundle.load(root)


def test_a_replica_whose_engine_fails_is_replaced(bundle, ray_app, tmp_path):
    """A batch the replica's engine fails on is sent again (to whichever replica Ray picks), then
    answered INTERNAL per request; the replica's health check fails from then on, and Ray Serve
    replaces it with a new process."""
    from edgesplit.server.ray_app import DEPLOYMENT, build
    from edgesplit.server.ray_tail import RayTail
    from edgesplit.wire.errors import ErrorCode

    broken = broken_bundle(bundle, tmp_path / "fixed-batch")
    serve.run(build({"bundle": str(broken.root), "threads": 1, "num_cpus": 0}), name="broken", route_prefix=None)
    try:
        remote = RayTail(broken, "broken")
        handle = serve.get_deployment_handle(DEPLOYMENT, app_name="broken")
        pid = handle.describe.remote().result(timeout_s=30)["pid"]
        z = np.zeros((2, *broken.wire_spec["shape"]), np.float32)
        _, offsets, errors = remote.run(items_of(broken, z))
        assert offsets == [-1, -1] and sorted(errors) == [0, 1]
        assert {e.code for e in errors.values()} == {ErrorCode.INTERNAL}
        assert (remote.retried, remote.remote_failures) == (1, 1)
        t_end = time.monotonic() + 120
        new = pid
        while new == pid and time.monotonic() < t_end:
            time.sleep(1.0)
            try:
                new = handle.describe.remote().result(timeout_s=30)["pid"]
            except ray.exceptions.RayError:  # the replaced replica, while it goes
                pass
        assert new != pid
        logits, offsets, errors = remote.run(items_of(broken, z[:1]))
        assert offsets == [0] and errors == {} and logits.shape == (1, len(broken.classes))
    finally:
        serve.delete("broken")


def test_several_batches_in_flight_to_the_replicas(bundle, ray_app):
    """Many sessions (the load generator, real frames through the head): with --remote-inflight 2 a
    batch goes out while another is at a replica, and every result is the tail's. Whether two
    batches meet in flight depends on timing, so the load is repeated (at most 5 runs of 400
    requests) until they do; every run's results are checked."""
    from edgesplit.bench.loadgen import LoadClient, head_workload

    workload = head_workload(bundle, 32)
    with Server([bundle], "tcp://127.0.0.1:0", backend="ray", ray_app=ray_app, remote_inflight=2) as gw:
        with LoadClient(gw.endpoint, bundle, 16, workload, name="pipelined") as client:
            for _ in range(5):
                st = client.closed_loop(requests=400, window=2)
                assert st.results == st.sent == 400 and st.wrong == 0 and not st.errors and st.unanswered == 0
                if gw.compute.max_pending == 2:
                    break
        assert gw.compute.max_pending == 2
