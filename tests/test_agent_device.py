"""The agent's device settings (issue 12 item 4): ONNX Runtime execution providers, threads, core
pinning and the device profile, each a config key.

Real ONNX Runtime sessions on this machine's wheel (its real provider list: no mock of
onnxruntime), a real agent process pinned to one CPU and read back from /proc, the profile feeding
the mode policy, and ``edgesplit plan --agent-config``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from edgesplit.bundle import Bundle
from edgesplit.edge.adaptive import device_modes, measure_heads_ms
from edgesplit.edge.agent import agent_main, build_parser
from edgesplit.edge.agent_cli import _cli_policy
from edgesplit.edge.device_config import start_device
from edgesplit.edge.fallback import LocalModel
from edgesplit.edge.heads import HeadRunner
from edgesplit.edge.scatter_bundle import ort_session as scatter_session
from edgesplit.edge.service_config import parse_with_config
from edgesplit.engine import create_engine
from edgesplit.engine.providers import PROVIDERS, OrtExecution, ProviderError, choose_providers, ort_session
from edgesplit.loopback import free_port

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "cifar10-resnet20-bottlefit"
AVAILABLE = ort.get_available_providers()
# providers of the fixed list this wheel lacks (the PyPI wheel: all but cpu)
MISSING = [n for n, ort_name in PROVIDERS.items() if ort_name not in AVAILABLE]
needs_missing = pytest.mark.skipif(not MISSING, reason="this onnxruntime wheel has every provider of the list")


def write_config(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


# -- providers: validation, refusal, fallback (real sessions) -----------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"providers": ("gpu",)}, r"unknown execution provider\(s\) 'gpu' \(known: cpu, xnnpack, cuda, tensorrt\)"),
        ({"providers": ()}, "execution_providers is empty"),
        ({"providers": ("cpu", "cpu")}, "lists a provider twice"),
        ({"tensorrt_fp16": True}, "TensorRT options: add tensorrt"),
        ({"intra_op_threads": 0}, "intra_op_threads must be an integer >= 1"),
    ],
)
def test_settings_are_validated(kwargs, message):
    with pytest.raises(ProviderError, match=message):
        OrtExecution(**kwargs)


@needs_missing
def test_a_missing_provider_is_refused_naming_it_and_what_the_wheel_has():
    ex = OrtExecution(providers=(MISSING[0], "cpu"))
    with pytest.raises(ProviderError) as e:
        choose_providers(ex)
    msg = str(e.value)
    assert f"{MISSING[0]} ({PROVIDERS[MISSING[0]]}) not in this wheel" in msg
    assert all(p in msg for p in AVAILABLE) and f"onnxruntime {ort.__version__}" in msg
    assert "fallback_to_cpu: true" in msg


@needs_missing
@pytest.mark.parametrize("kind", ["engine", "head", "fallback", "edvit"])
def test_every_session_maker_honours_the_setting(kind):
    """The ort engine, the agent's heads, the local fallback and the ED-ViT sessions all refuse a
    provider the wheel lacks, and all run on the CPU with the fallback on."""
    bundle = Bundle.load(SHIPPED)
    make = {
        "engine": lambda ex: create_engine(bundle.file("full"), "ort", execution=ex)._sess,
        "head": lambda ex: HeadRunner(bundle, ex).heads["head"]._sess,
        "fallback": lambda ex: LocalModel(bundle, ex).engine._sess,
        "edvit": lambda ex: scatter_session(bundle.file("full"), ex),
    }[kind]
    with pytest.raises(ProviderError, match=MISSING[0]):
        make(OrtExecution(providers=(MISSING[0], "cpu")))
    sess = make(OrtExecution(providers=(MISSING[0],), fallback_to_cpu=True, intra_op_threads=1, inter_op_threads=2))
    assert sess.get_providers() == ["CPUExecutionProvider"]
    so = sess.get_session_options()
    assert so.intra_op_num_threads == 1 and so.inter_op_num_threads == 2
    assert so.execution_mode == ort.ExecutionMode.ORT_PARALLEL


@needs_missing
def test_fallback_gives_the_same_answers_as_plain_cpu():
    bundle = Bundle.load(SHIPPED)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    plain, choice = ort_session(bundle.file("full"), OrtExecution(intra_op_threads=1))
    assert choice.providers == ("cpu",) and choice.missing == ()
    fell, choice = ort_session(bundle.file("full"), OrtExecution(providers=tuple(MISSING), fallback_to_cpu=True))
    assert choice.providers == ("cpu",) and choice.missing == tuple(MISSING)
    name = plain.get_inputs()[0].name
    np.testing.assert_allclose(fell.run(None, {name: x})[0], plain.run(None, {name: x})[0], rtol=1e-5, atol=1e-5)


@needs_missing
def test_agent_refuses_to_start_or_falls_back_as_configured(tmp_path, capsys):
    nobody = f"tcp://127.0.0.1:{free_port()}"
    base = dict(bundle=str(SHIPPED), server=nobody, frames=2, timeout_s=0.3, threads=1)
    cfg = write_config(tmp_path / "a.yaml", **base, execution_providers=[MISSING[0], "cpu"])
    assert agent_main(["--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"{MISSING[0]} ({PROVIDERS[MISSING[0]]}) not in this wheel" in err and "CPUExecutionProvider" in err

    out = tmp_path / "out.jsonl"
    cfg = write_config(
        tmp_path / "b.yaml", **base, execution_providers=[MISSING[0], "cpu"], fallback_to_cpu=True, json_lines=str(out)
    )
    assert agent_main(["--config", str(cfg)]) == 0
    assert f"execution providers ['{MISSING[0]}'] are not in this onnxruntime wheel" in capsys.readouterr().err
    dev = json.loads(out.read_text().splitlines()[-1])["summary"]["device"]
    assert dev["requested_providers"] == [MISSING[0], "cpu"] and dev["missing_providers"] == [MISSING[0]]
    assert dev["execution_providers"] == ["cpu"] and dev["sessions"] == {"head": ["cpu"], "full": ["cpu"]}
    assert dev["available_providers"] == AVAILABLE and dev["intra_op_threads"] == 1


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"execution_providers": ["gpu"]},
            r"'execution_providers' must be one of \['cpu', 'xnnpack', 'cuda', 'tensorrt'\]",
        ),
        ({"execution_providers": "cpu"}, "'execution_providers' must be a non-empty list, got 'cpu'"),
        ({"execution_providers": []}, "'execution_providers' must be a non-empty list"),
        ({"execution_providers": ["cpu"], "tensorrt_cache_dir": "/tmp/trt"}, "TensorRT options: add tensorrt"),
        ({"cpu_affinity": [0, "1"]}, "'cpu_affinity' must be int, got str"),
        ({"cpu_affinity": [0, 0]}, "lists a CPU twice"),
        ({"inter_op_threads": 0}, "'inter_op_threads' must be >= 1"),
        ({"device_profile": "raspberry-pi-9"}, "'device_profile': no device profile 'raspberry-pi-9' \\(known: "),
        ({"device_profile": "h100"}, "'h100' is a server profile"),
    ],
)
def test_bad_device_keys_exit_2_naming_the_key(tmp_path, capsys, values, message):
    cfg = write_config(tmp_path / "agent.yaml", bundle=str(SHIPPED), **values)
    assert agent_main(["--config", str(cfg)]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_cpu_affinity_outside_this_process_is_refused(tmp_path, capsys):
    allowed = sorted(os.sched_getaffinity(0))
    cfg = write_config(tmp_path / "agent.yaml", bundle=str(SHIPPED), cpu_affinity=[allowed[-1] + 1])
    assert agent_main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"CPU(s) [{allowed[-1] + 1}] not available; this process may run on CPUs {allowed}" in err


# -- pinning a real agent process ---------------------------------------------------------------


def _cpus_allowed(status: Path) -> str:
    for line in status.read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list in {status}")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning is only visible with 2 or more CPUs allowed")
def test_agent_process_is_pinned_with_every_thread(tmp_path):
    """A real agent process (no server: it answers locally) with cpu_affinity of one CPU: the
    process and every thread it has once running (ONNX Runtime's, ZeroMQ's) are on that CPU only."""
    cpu = sorted(os.sched_getaffinity(0))[-1]
    out = tmp_path / "out.jsonl"
    cfg = write_config(
        tmp_path / "agent.yaml",
        bundle=str(SHIPPED),
        server=f"tcp://127.0.0.1:{free_port()}",
        frames=0,
        fps=20.0,
        timeout_s=0.3,
        cpu_affinity=[cpu],
        json_lines=str(out),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgesplit", "agent", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        assert out.exists() and len(out.read_text().splitlines()) >= 3, "the agent answered no frames"
        assert _cpus_allowed(Path(f"/proc/{proc.pid}/status")) == str(cpu)
        tasks = list(Path(f"/proc/{proc.pid}/task").iterdir())
        assert len(tasks) > 1  # ZeroMQ's I/O threads at least
        assert {t.name: _cpus_allowed(t / "status") for t in tasks} == {t.name: str(cpu) for t in tasks}
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"pinned to CPUs [{cpu}]" in err
    dev = json.loads(out.read_text().splitlines()[-1])["summary"]["device"]
    assert dev["cpu_affinity"] == [cpu] and dev["intra_op_threads"] == 1  # one thread per pinned CPU


# -- the device profile feeds the policy -------------------------------------------------------


@pytest.fixture
def pi_bundle(tmp_path) -> Bundle:
    """The shipped bundle with a head latency row for raspberry-pi-4 (as if measured there)."""
    root = tmp_path / "bundle"
    shutil.copytree(SHIPPED, root)
    man = json.loads((root / "manifest.json").read_text())
    for i, m in enumerate(man["modes"]):
        m["head_ms"]["raspberry-pi-4"] = 5.0 + i
    man.setdefault("measured_on", {})["raspberry-pi-4"] = "a Raspberry Pi 4, 1 thread, batch 1"
    (root / "manifest.json").write_text(json.dumps(man, indent=2))
    return Bundle.load(root)


def test_profile_picks_the_bundles_row_for_that_device(pi_bundle):
    def no_timing():
        raise AssertionError("the bundle has this profile's row: nothing to time")

    modes, source = device_modes(pi_bundle, "raspberry-pi-4", no_timing)
    assert source == "bundle head_ms[raspberry-pi-4]" and modes.device == "raspberry-pi-4"
    assert [m.head_ms for m in modes] == [5.0 + i for i in range(len(modes))]
    with pytest.raises(ValueError, match="name the device profile"):  # two rows, no profile
        device_modes(pi_bundle, None, no_timing)


def test_profile_without_a_row_times_the_heads_here():
    bundle = Bundle.load(SHIPPED)
    runner = HeadRunner(bundle, OrtExecution(intra_op_threads=1))
    modes, source = device_modes(bundle, "jetson-orin-nano", lambda: measure_heads_ms(runner, runs=5))
    assert source == "measured here" and modes.device == "jetson-orin-nano"
    assert all(m.head_ms > 0 for m in modes)
    assert len({m.head_ms for m in modes}) == 1  # one head runs every mode of this bundle
    assert [m.head_ms for m in modes] != [m.head_ms["x86_64-cpu"] for m in bundle.modes]


def test_agent_policy_plans_with_the_profile(pi_bundle, tmp_path):
    cfg = write_config(
        tmp_path / "agent.yaml",
        bundle=str(pi_bundle.root),
        adapt="deadline",
        deadline_ms=200.0,
        local_ms=40.0,
        device_profile="raspberry-pi-4",
    )
    args = parse_with_config(build_parser(), ["--config", str(cfg)])
    device = start_device(vars(args), lambda *a, **k: None)
    policy = _cli_policy(args, pi_bundle, device)
    assert policy.modes.device == "raspberry-pi-4"
    assert [m.head_ms for m in policy.modes] == [5.0 + i for i in range(len(policy.modes))]
    assert policy.local_ms == 40.0
    assert device.summary()["policy_inputs"]["head_ms_source"] == "bundle head_ms[raspberry-pi-4]"
    assert device.summary()["device_profile"] == "raspberry-pi-4"


# -- edgesplit plan --agent-config ---------------------------------------------------------------


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgesplit", "plan", *args], capture_output=True, text=True, timeout=180, cwd=ROOT
    )


def test_plan_reads_bundle_device_and_rtt_from_the_agent_config(tmp_path):
    cfg = write_config(
        tmp_path / "agent.yaml", bundle=str(SHIPPED), device_profile="raspberry-pi-5", base_rtt_ms=30.0, threads=1
    )
    common = ["--agent-config", str(cfg), "--bandwidth-mbps", "0.2", "--runs", "3", "--pace-ms", "0", "--json"]
    out = _plan(*common)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["device"] == "raspberry-pi-5" and res["link"]["rtt_ms"] == 30.0 and res["agent_config"] == str(cfg)
    assert res["inputs"]["bundle"] == SHIPPED.name
    assert "local (full.onnx on device)" in [o["option"] for o in res["options"]]
    out = _plan(*common, "--device", "raspberry-pi-4", "--rtt-ms", "5")  # the command line wins
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["device"] == "raspberry-pi-4" and res["link"]["rtt_ms"] == 5.0


def test_plan_agent_config_errors_are_clear(tmp_path):
    bad = write_config(tmp_path / "bad.yaml", bundle=str(SHIPPED), device_profil="raspberry-pi-4")
    out = _plan("--agent-config", str(bad), "--bandwidth-mbps", "1")
    assert out.returncode == 2 and "unknown key 'device_profil' (did you mean 'device_profile'?)" in out.stderr
    nobundle = write_config(tmp_path / "nobundle.yaml", device_profile="raspberry-pi-4")
    out = _plan("--agent-config", str(nobundle), "--bandwidth-mbps", "1")
    assert (
        out.returncode == 2 and "one of --bundle, --model or --agent-config (with a bundle) is required" in out.stderr
    )
