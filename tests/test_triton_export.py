"""edgesplit triton-export: a shipped bundle as a Triton model repository, parsed with Triton's own
ModelConfig schema (tritonclient's model_config_pb2, strict text format), then loaded by a real
Triton server (PyTriton's wheel: python backend only) and sent real CIFAR-10 frames."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from triton_fixtures import TritonProcess, interpreter_ok

from edgesplit.bundle import Bundle
from edgesplit.data.transforms import preprocess
from edgesplit.engine import create_engine
from edgesplit.server.cli import build_parser
from edgesplit.server.triton_repo import TritonSettings, export_triton, model_name, triton_export_main
from edgesplit.wire import codec

pytest.importorskip("tritonclient.grpc", reason="the 'triton' extra (tritonclient[grpc]) is not installed")
from google.protobuf import text_format  # noqa: E402  (tritonclient brings protobuf)
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / "models" / "cifar10-resnet20-bottlefit"


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return Bundle.load(CIFAR)


def parse(folder: Path) -> mc.ModelConfig:
    """config.pbtxt into Triton's ModelConfig message; an unknown field or bad enum raises."""
    return text_format.Parse((folder / "config.pbtxt").read_text(), mc.ModelConfig())


def test_config_mirrors_the_daemon_flags_and_the_graph(bundle, tmp_path):
    s = TritonSettings(
        max_batch=16, preferred_batch_sizes=(8, 4), max_queue_delay_us=500, max_queue=64, threads=1, instances=2
    )
    written = export_triton(bundle, tmp_path, s)
    assert sorted(written) == [model_name(bundle, "full"), model_name(bundle, "tail")]
    for role in ("tail", "full"):
        folder = written[model_name(bundle, role)]
        c = parse(folder)
        assert c.name == folder.name == f"{bundle.name}-{role}"
        assert c.backend == "onnxruntime" and c.max_batch_size == 16
        assert list(c.dynamic_batching.preferred_batch_size) == [4, 8]
        assert c.dynamic_batching.max_queue_delay_microseconds == 500
        assert c.dynamic_batching.default_queue_policy.max_queue_size == 64
        assert [(g.count, g.kind) for g in c.instance_group] == [(2, mc.ModelInstanceGroup.KIND_CPU)]
        params = {k: v.string_value for k, v in c.parameters.items()}
        assert params == {
            "edgesplit_bundle": bundle.hash,
            "edgesplit_role": role,
            "edgesplit_sha256": bundle.manifest["files"][role]["sha256"],
            "intra_op_thread_count": "1",
        }
        assert (folder / "1" / "model.onnx").read_bytes() == bundle.file(role).read_bytes()
        # names, dtypes and dims (batch axis left out) are the graph's
        eng = create_engine(bundle.file(role))
        for got, spec in ((c.input, eng.inputs), (c.output, eng.outputs)):
            assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in got] == [
                (t.name, "TYPE_FP32", list(t.shape[1:])) for t in spec
            ]
    tail = parse(written[model_name(bundle, "tail")])
    assert list(tail.input[0].dims) == list(bundle.wire_spec["shape"])


def test_gpu_settings_parse(bundle, tmp_path):
    s = TritonSettings(device="cuda:1", precision="fp16", instances=3)
    c = parse(export_triton(bundle, tmp_path, s, roles=["tail"])[model_name(bundle, "tail")])
    assert [(g.count, g.kind, list(g.gpus)) for g in c.instance_group] == [(3, mc.ModelInstanceGroup.KIND_GPU, [1])]
    (acc,) = c.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt" and dict(acc.parameters) == {"precision_mode": "FP16"}
    assert not (tmp_path / model_name(bundle, "full")).exists()


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"max_batch": 8, "preferred_batch_sizes": (16,)}, "preferred batch sizes"),
        ({"precision": "fp16"}, "needs --device cuda"),
        ({"device": "tpu"}, "unknown device"),
        ({"runtime": "tensorflow"}, "unknown runtime"),
    ],
)
def test_settings_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TritonSettings(**kw)


def test_cli_takes_serves_names_and_defaults(bundle, tmp_path, capsys):
    assert triton_export_main([str(CIFAR), "--out", str(tmp_path), "--models", "tail"]) == 0
    assert model_name(bundle, "tail") in capsys.readouterr().out
    c = parse(tmp_path / model_name(bundle, "tail"))
    d = build_parser().parse_args(["--bundle", str(CIFAR)])
    assert c.max_batch_size == d.max_batch
    assert c.dynamic_batching.max_queue_delay_microseconds == d.max_queue_delay_us
    assert c.dynamic_batching.default_queue_policy.max_queue_size == d.max_queue
    assert "intra_op_thread_count" not in c.parameters
    out = tmp_path / "b"
    args = [str(CIFAR), "--out", str(out), "--max-batch", "8", "--preferred-batch-sizes", "2,8", "--prefix", "cam"]
    assert triton_export_main(args + ["--max-queue-delay-us", "0", "--runtime", "python"]) == 0
    c = parse(out / "cam-tail")
    assert (c.backend, c.max_batch_size, list(c.dynamic_batching.preferred_batch_size)) == ("python", 8, [2, 8])
    assert c.dynamic_batching.max_queue_delay_microseconds == 0
    assert (out / "cam-tail" / "1" / "model.py").is_file() and (out / "cam-full" / "1" / "model.onnx").is_file()
    assert triton_export_main([str(CIFAR), "--out", str(out), "--max-batch", "4", "--preferred-batch-sizes", "8"]) == 1
    assert "preferred batch sizes" in capsys.readouterr().err


# -- a real Triton server ----------------------------------------------------------------------


def test_triton_validates_the_onnxruntime_repository(bundle, tmp_path):
    """This Triton has no onnxruntime backend, but it validates a model's config (when it polls
    the repository) before it looks the backend up: the exported repository fails on the missing
    backend alone, while a broken config fails at the poll (the control)."""
    interpreter_ok()
    repo = tmp_path / "repo"
    export_triton(bundle, repo, TritonSettings(preferred_batch_sizes=(8, 16), threads=1))
    with TritonProcess(repo, tmp_path / "ok.log", exit_on_error=True) as t:
        t.proc.wait(120)
        log = t.log()
    for role in ("tail", "full"):
        assert (
            f"failed to load '{model_name(bundle, role)}' version 1: Invalid argument: unable to find backend "
            "library for backend 'onnxruntime'" in log
        ), log[-2000:]
    assert "Poll failed" not in log
    bad = tmp_path / "bad"
    shutil.copytree(repo / model_name(bundle, "tail"), bad / model_name(bundle, "tail"))
    cfg = bad / model_name(bundle, "tail") / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("preferred_batch_size: [ 8, 16 ]", "preferred_batch_size: [ 64 ]"))
    with TritonProcess(bad, tmp_path / "bad.log", exit_on_error=True) as t:
        t.proc.wait(120)
        log = t.log()
    assert "Poll failed for model directory" in log and "preferred size must be <= max batch size" in log


def test_triton_serves_the_exported_models_on_real_frames(bundle, tmp_path, cifar_samples):
    """The python-runtime repository in a real Triton: tail batches of real bottleneck tensors and
    full-model batches of real images give the logits ONNX Runtime gives here."""
    interpreter_ok()
    from edgesplit.engine.triton_remote import TritonEngine

    repo = tmp_path / "repo"
    export_triton(bundle, repo, TritonSettings(runtime="python", max_batch=16, threads=1))
    images = np.stack([preprocess(s.data, bundle.input_spec) for s in cifar_samples[:21]])
    head, tail, full = (create_engine(bundle.file(r), threads=1) for r in ("head", "tail", "full"))
    mode = bundle.default_mode
    z = head.run1(images)
    C = bundle.wire_spec["shape"][0]
    zq = np.stack([codec.decode(*codec.encode(row, mode, name=bundle.wire_spec["name"]), full_channels=C) for row in z])
    names = [model_name(bundle, r) for r in ("tail", "full")]
    with TritonProcess(repo, tmp_path / "triton.log") as t:
        t.wait_ready(names)
        remote = {r: TritonEngine(t.url, model_name(bundle, r)) for r in ("tail", "full")}
        assert remote["tail"].max_batch == 16 and remote["tail"].parameters()["edgesplit_bundle"] == bundle.hash
        assert remote["tail"].health() == (True, "")
        for lo, hi in ((0, 1), (1, 6), (6, 21 - 5), (16, 21)):
            np.testing.assert_allclose(remote["tail"].run1(zq[lo:hi]), tail.run1(zq[lo:hi]), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(
                remote["full"].run1(images[lo:hi]), full.run1(images[lo:hi]), rtol=1e-5, atol=1e-5
            )
        preds = remote["tail"].run1(zq[:16]).argmax(1)
        assert preds.tolist() == tail.run1(zq[:16]).argmax(1).tolist()
        for e in remote.values():
            e.close()
