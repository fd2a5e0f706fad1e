"""edgesplit serve --backend triton: the daemon as a ZeroMQ gateway whose formed batches run on a
real Triton server (PyTriton's wheel, tools/fetch_tritonserver.sh) holding the models
`edgesplit triton-export` wrote; real agents send real CIFAR-10 frames over loopback."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from triton_fixtures import TritonProcess, interpreter_ok

from edgesplit.bundle import Bundle
from edgesplit.edge.agent import Agent
from edgesplit.engine import EngineError
from edgesplit.server.daemon import Server
from edgesplit.server.tail_backend import TailBackend
from edgesplit.server.triton_repo import TritonSettings, export_triton, model_name

pytest.importorskip("tritonclient.grpc", reason="the 'triton' extra (tritonclient[grpc]) is not installed")

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / "models" / "cifar10-resnet20-bottlefit"
OTHER = ROOT / "models" / "imagenette-resnet18-bottlefit"
PY = {"runtime": "python", "threads": 1}


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return Bundle.load(CIFAR)


@pytest.fixture(scope="module")
def triton(bundle, tmp_path_factory):
    """One Triton holding: this bundle's tail (serve's defaults), another bundle's tail under the
    name this bundle's would have with prefix 'other', and this bundle's tail with a queue of one
    request held for up to 2 s (prefix 'tiny-queue')."""
    interpreter_ok()
    tmp = tmp_path_factory.mktemp("triton")
    repo = tmp / "repo"
    export_triton(bundle, repo, TritonSettings(**PY), roles=["tail"])
    export_triton(OTHER, repo, TritonSettings(**PY), roles=["tail"], prefix="other")
    slow = TritonSettings(max_queue=1, max_queue_delay_us=2_000_000, **PY)
    export_triton(bundle, repo, slow, roles=["tail"], prefix="tiny-queue")
    names = [model_name(bundle, "tail"), "other-tail", "tiny-queue-tail"]
    with TritonProcess(repo, tmp / "triton.log") as t:
        yield t.wait_ready(names)


def run_frames(endpoint: str, bundle: Bundle, samples, **kw) -> list:
    with Agent(bundle, endpoint, inflight=8, threads=1, **kw) as agent:
        return sorted(agent.run(samples), key=lambda r: r.id)


def test_gateway_answers_as_the_in_process_daemon(bundle, triton, cifar_samples):
    with Server([bundle], "tcp://127.0.0.1:0", threads=1) as local:
        ref = run_frames(local.endpoint, bundle, cifar_samples)
    with Server([bundle], "tcp://127.0.0.1:0", backend="triton", triton_url=triton.url) as gw:
        runner = gw.runners[bundle.hash]
        assert isinstance(runner, TailBackend)
        cap = runner.capacity()
        assert (cap.max_batch, cap.instances) == (32, 1) and triton.url in cap.where
        assert gw.ready() == (True, "")
        got = run_frames(gw.endpoint, bundle, cifar_samples)
    assert len(got) == len(ref) == 32
    assert all(r.ok and r.source == "server" for r in got), [r.to_json() for r in got if not r.ok]
    np.testing.assert_allclose(np.stack([r.logits for r in got]), np.stack([r.logits for r in ref]), atol=1e-5)
    assert [r.pred for r in got] == [r.pred for r in ref]
    assert runner.remote_failures == 0


def test_gateway_refuses_a_triton_model_it_cannot_serve(bundle, triton):
    with pytest.raises(EngineError, match=f"holds bundle .*this gateway serves '{bundle.name}' {bundle.hash[:12]}"):
        Server([bundle], "tcp://127.0.0.1:0", backend="triton", triton_url=triton.url, triton_prefix="other").start()
    with pytest.raises(EngineError, match="takes batches of at most 32 rows, the gateway forms up to 64"):
        Server([bundle], "tcp://127.0.0.1:0", backend="triton", triton_url=triton.url, max_batch=64).start()
    with pytest.raises(EngineError, match="no ready model 'nobody-tail'"):
        Server([bundle], "tcp://127.0.0.1:0", backend="triton", triton_url=triton.url, triton_prefix="nobody").start()
    with pytest.raises(ValueError, match="go together"):
        Server([bundle], "tcp://127.0.0.1:0", backend="triton")


def test_triton_queue_full_is_overloaded(bundle, triton, cifar_samples):
    """Triton's queue for the model is full: the gateway answers the batch OVERLOADED, as its own
    full queue would be (the agent's "not now"), and serves again once Triton has room."""
    from edgesplit.engine.triton_remote import TritonEngine

    blocker = TritonEngine(triton.url, "tiny-queue-tail")
    z = np.zeros((1, *bundle.wire_spec["shape"]), np.float32)
    held = threading.Thread(target=blocker.run1, args=(z,))
    with Server(
        [bundle], "tcp://127.0.0.1:0", backend="triton", triton_url=triton.url, triton_prefix="tiny-queue"
    ) as gw:
        held.start()  # one request waits up to 2 s in Triton's queue of one
        time.sleep(0.5)
        with Agent(bundle, gw.endpoint, threads=1) as agent:
            r = agent.infer(cifar_samples[0])
            assert (r.error, r.source) == ("OVERLOADED", None), r.to_json()
            assert "maximum queue size" in r.error_message
            held.join(10)
            r = agent.infer(cifar_samples[1])
            assert r.ok and r.source == "server", r.to_json()
    blocker.close()


def test_triton_killed_mid_stream_no_frame_lost(bundle, tmp_path, cifar_samples):
    """kill -9 the Triton server while an agent streams: every frame still ends exactly once
    (the batches Triton dropped are answered INTERNAL, which the agent answers locally), the
    gateway reports not ready, and serves from Triton again once it is back on the same port."""
    interpreter_ok()
    repo = tmp_path / "repo"
    export_triton(bundle, repo, TritonSettings(**PY), roles=["tail"])
    name = model_name(bundle, "tail")
    t = TritonProcess(repo, tmp_path / "t1.log").wait_ready([name])
    samples = cifar_samples * 3
    try:
        with Server([bundle], "tcp://127.0.0.1:0", backend="triton", triton_url=t.url) as gw:
            results = []
            with Agent(bundle, gw.endpoint, inflight=4, threads=1, fallback="auto") as agent:
                for r in agent.run(samples):
                    results.append(r)
                    if len(results) == 8:
                        t.kill()  # SIGKILL
                assert gw.ready()[0] is False and t.url in gw.ready()[1]
                ids = sorted(r.id for r in results)
                assert len(ids) == len(samples) == len(set(ids))  # each frame answered once
                assert all(r.ok for r in results), [r.to_json() for r in results if not r.ok]
                local = [r for r in results if r.source == "local"]
                assert local and {r.fallback_reason for r in local} == {"INTERNAL"}
                t.close()
                t = TritonProcess(repo, tmp_path / "t2.log", grpc_port=t.port).wait_ready([name])
                deadline = time.monotonic() + 30
                while not gw.ready()[0] and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert gw.ready() == (True, "")
                again = list(agent.run(cifar_samples[:8]))
            assert all(r.ok and r.source == "server" for r in again), [r.to_json() for r in again]
    finally:
        t.close()


def test_serve_command_as_gateway(bundle, triton, cifar_samples):
    """`edgesplit serve --backend triton --triton-url HOST:PORT` as its own process: agents are
    served through it, SIGTERM drains it (exit 0); the flags go together."""
    cmd = [sys.executable, "-m", "edgesplit.server.daemon", "--bundle", str(CIFAR), "--bind", "tcp://127.0.0.1:0"]
    bad = subprocess.run([*cmd, "--backend", "triton"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--backend triton and --triton-url go together" in bad.stderr
    proc = subprocess.Popen(
        [*cmd, "--backend", "triton", "--triton-url", triton.url, "--threads", "1"],
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
        endpoint = line.rsplit(" ", 1)[1].strip()
        got = run_frames(endpoint, bundle, cifar_samples[:8])
        assert all(r.ok and r.source == "server" for r in got), [r.to_json() for r in got]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_several_batches_in_flight_to_triton(bundle, triton):
    """Many sessions (the load generator, real frames through the head): with --remote-inflight 2
    a batch goes out while another is at Triton, and every result is the tail's. Whether two
    batches meet in flight depends on timing, so the load is repeated (at most 5 runs of 400
    requests) until they do; every run's results are checked."""
    from edgesplit.bench.loadgen import LoadClient, head_workload

    workload = head_workload(bundle, 32)
    with Server([bundle], "tcp://127.0.0.1:0", backend="triton", triton_url=triton.url, remote_inflight=2) as gw:
        with LoadClient(gw.endpoint, bundle, 16, workload, name="pipelined") as client:
            for _ in range(5):
                st = client.closed_loop(requests=400, window=2)
                assert st.results == st.sent == 400 and st.wrong == 0 and not st.errors and st.unanswered == 0
                if gw.compute.max_pending == 2:
                    break
        assert gw.compute.max_pending == 2
