"""The clean-room client (tests/cleanroom/, written from docs/PROTOCOL.md and docs/BUNDLE.md
alone) against the real daemon: every mode of three shipped bundles, every request form, agrees
bit for bit with the reference agent on the same frames; the documented refusals come back with
the documented codes; and the client imports nothing from edgesplit."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CLEANROOM = REPO / "tests" / "cleanroom"
sys.path.insert(0, str(CLEANROOM))

import client as cleanroom  # noqa: E402
from conftest import CIFAR_TEST  # noqa: E402

BUNDLES = ["cifar10-resnet20-bottlefit", "cifar10-resnet20-entropy", "cifar10-vit-bottlefit-cpu"]
FRAMES = int(os.environ.get("CLEANROOM_FRAMES", "64"))  # the accuracy check in the report used 200
HEARTBEAT_MS = 400  # short, so that the session-expiry rule (§8) is checked in well under 2 s
# What the clean-room client may import besides the standard library (PIL: BUNDLE.md §5's decoder).
THIRD_PARTY = {"numpy", "zmq", "msgpack", "onnxruntime", "PIL", "constriction"}
SIBLINGS = {path.stem for path in CLEANROOM.glob("*.py")}

pytestmark = pytest.mark.skipif(not CIFAR_TEST.exists(), reason="needs the shared CIFAR-10 test shard")


def test_cleanroom_imports_nothing_from_edgesplit():
    for path in sorted(CLEANROOM.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.name}: relative import"
                modules = [node.module or ""]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                "__import__",
                "import_module",
            ):
                raise AssertionError(f"{path.name}:{node.lineno}: dynamic import")
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                assert top != "edgesplit", f"{path.name}:{node.lineno} imports {module}"
                allowed = top in sys.stdlib_module_names or top in THIRD_PARTY or top in SIBLINGS
                assert allowed, f"{path.name}:{node.lineno} imports {module}"


def test_cleanroom_codec_reproduces_the_docs_examples():
    """§4.1-4.2's test vectors, §4.4's worked example, BUNDLE.md §9's codes and §10's header bytes."""
    cleanroom.self_check()
    cleanroom.header_self_check()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """`edgesplit serve` on a free loopback port holding the three bundles; stopped with SIGTERM,
    which PROTOCOL.md §6 says ends in exit status 0."""
    log = tmp_path_factory.mktemp("cleanroom") / "serve.log"
    command = [sys.executable, "-m", "edgesplit", "serve", "--bind", "tcp://127.0.0.1:0", "--threads", "1"]
    command += ["--heartbeat-ms", str(HEARTBEAT_MS)]
    for name in BUNDLES:
        command += ["--bundle", str(REPO / "models" / name)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "w") as stderr:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    endpoint = None
    deadline = time.monotonic() + 60
    while endpoint is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "listening on" in line:
            endpoint = line.rsplit(" ", 1)[-1].strip()
    if endpoint is None:
        proc.kill()
        pytest.fail(f"daemon did not start: {log.read_text()[-2000:]}")
    yield endpoint
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]


@pytest.fixture(scope="module")
def frames():
    return cleanroom.load_frames(CIFAR_TEST, FRAMES)


@pytest.mark.parametrize("name", BUNDLES)
def test_cleanroom_client_matches_reference_agent(daemon, frames, name):
    from edgesplit.bundle import Bundle as ReferenceBundle
    from edgesplit.edge.agent import Agent
    from edgesplit.wire.mode_codec import encode_mode

    path = REPO / "models" / name
    jpegs, labels = frames
    bundle = cleanroom.Bundle(path)
    reference = ReferenceBundle.load(path)
    assert bundle.hash == reference.hash
    images = np.stack([bundle.preprocess(j) for j in jpegs])
    heads = cleanroom.head_outputs(bundle, images)
    agent = Agent(reference, daemon, inflight=8, threads=1, timeout_s=30).connect()
    session = cleanroom.Session(daemon, bundle, timeout_s=30)
    try:
        # Layer by layer on the first frame: preprocessing, the head and the payload are the agent's.
        assert np.array_equal(images[0], agent.preprocess(jpegs[0])[0])
        welcome = session.hello()
        assert "compact_requests" in welcome["features"]
        for mode_id, mode in sorted(bundle.modes.items()):
            z = heads[mode.get("head", "head")]
            reference_z, _ = agent.head_tensor(jpegs[0], mode=mode_id)
            assert np.array_equal(z[0], reference_z)
            reference_mode = reference.mode(mode_id)
            tables = reference.tables_for(reference_mode) if mode.get("codec") == "ans" else None
            reference_descriptor, reference_payload = encode_mode(
                reference_z, reference_mode, tables=tables, name=bundle.wire_name
            )
            payload, descriptor = cleanroom.encode_rows(bundle, mode, z[:1])
            assert payload == bytes(reference_payload)
            assert descriptor == reference_descriptor
            # The logits, for every frame and every request form, are the reference agent's.
            results = [agent.infer(j, mode=mode_id) for j in jpegs]
            assert all(r.ok and r.source == "server" for r in results), [r.error for r in results if not r.ok]
            reference_logits = np.stack([r.logits for r in results])
            forms = cleanroom.run_forms(session, mode_id, z)
            expected_forms = {"full", "full_batch8", "compact"}
            assert set(forms) == expected_forms
            for form, (logits, _) in forms.items():
                assert np.array_equal(logits, reference_logits), (mode["name"], form)
            top1 = float(np.mean(reference_logits.argmax(1) == labels))
            assert top1 > 0.5, (mode["name"], top1)  # real frames through a trained model
    finally:
        session.close()
        agent.close()


@pytest.mark.parametrize("name", ["cifar10-resnet20-bottlefit", "cifar10-resnet20-entropy"])
def test_cleanroom_refusals_are_the_documented_ones(daemon, frames, name):
    bundle = cleanroom.Bundle(REPO / "models" / name)
    z = bundle.head_output(np.stack([bundle.preprocess(j) for j in frames[0][:2]]))
    codes = cleanroom.ERROR_CODES
    observed = cleanroom.probe_errors(daemon, bundle, z)
    expected = {
        "request_before_hello": (codes["NOT_READY"], True),
        "ping_without_session": ("pong", True),
        "unknown_bundle": (codes["UNKNOWN_BUNDLE"], True),
        "unknown_mode_full": (codes["UNKNOWN_MODE"], True),
        "unknown_mode_compact": (codes["UNKNOWN_MODE"], True),
        "compact_wrong_length": (codes["MALFORMED"], True),
        "lying_nbytes": (codes["MALFORMED"], True),
        "batch_over_max": (codes["TOO_LARGE"], True),
        "deadline_zero": (codes["DEADLINE_EXCEEDED"], True),
        "reserved_kind": (codes["UNSUPPORTED"], True),
        "version_2": (codes["UNSUPPORTED_VERSION"], True),
        "request_without_id": (codes["MALFORMED"], True),
        "after_second_hello": ("result", 2),
        "expired_after_silence": (codes["NOT_READY"], True),
        "request_after_bye": (codes["NOT_READY"], True),
        "new_connection": (codes["NOT_READY"], True),
        "new_connection_after_hello": ("result", 2),
    }
    if bundle.modes[bundle.default_mode].get("codec") == "ans":
        expected["ans_bits_not_32"] = (codes["MALFORMED"], True)
    else:
        expected["bits_not_the_modes"] = (codes["UNKNOWN_MODE"], True)
    assert observed == expected
