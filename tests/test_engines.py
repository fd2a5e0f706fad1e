"""Every tail backend against ONNX Runtime fp32 on real data, the fp16 graph rewrite, engine options.

The tail is real and trained: the shared ResNet-56 CIFAR-10 teacher cut after ``layer2`` (tail =
layer3 + classifier), exported by the project's own exporter to ONNX (fp16-stored weights, as in
shipped bundles) and to a torch.export program. Its input is the teacher's own layer2 output on
real CIFAR-10 test JPEGs, so logits are decisive and top-1 agreement means something.

Backends that need CUDA or TensorRT are in the same tables and skip with the reason here.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from build_fixtures import one_torch_thread, require_cifar  # noqa: F401  (pytest finds fixtures by name)

from edgesplit.bundle import Bundle, write_manifest
from edgesplit.engine import EngineError, EngineOptions, create_engine

FRAMES = 32
SPLIT_AFTER = "layer2"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(
    not _cuda(), reason="no CUDA device on this machine (torch.cuda.is_available() is False)"
)
needs_trt = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None or not _cuda(),
    reason="TensorRT 10 Python package and a CUDA device are not both present here",
)


@pytest.fixture(scope="module")
def teacher_tail(tmp_path_factory):
    """A bundle whose tail is the trained teacher after SPLIT_AFTER (tail.onnx + tail.pt2), plus the
    real wire tensors of FRAMES test images and their labels."""
    import torch

    from edgesplit.builder.export import (
        _export_onnx,
        export_torch_tail,
        store_weights_fp16,
    )
    from edgesplit.builder.pipeline import MEAN, STD
    from edgesplit.builder.zoo import load_pretrained
    from edgesplit.data.sources import data_root, open_source, take
    from edgesplit.data.transforms import preprocess

    require_cifar()
    teacher = load_pretrained("resnet56_cifar", data_root() / "teachers" / "resnet56-4bfd9763.th", 10).eval()
    names = list(teacher.stage_names)
    cut = names.index(SPLIT_AFTER) + 1

    class Part(torch.nn.Module):
        def __init__(self, stages):
            super().__init__()
            self.teacher, self.stages = teacher, stages

        def forward(self, x):
            for s in self.stages:
                x = self.teacher.run_stage(s, x)
            return x

    head, tail = Part(names[:cut]).eval(), Part(names[cut:]).eval()
    spec = {"shape": [3, 32, 32], "resize": 32, "mean": list(MEAN), "std": list(STD)}
    samples = list(take(open_source("cifar10:test"), FRAMES))
    x = np.stack([preprocess(s.data, spec) for s in samples])
    with torch.no_grad():
        z = head(torch.from_numpy(x)).numpy()
    root = tmp_path_factory.mktemp("teacher-tail")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _export_onnx(tail, torch.from_numpy(z[:2]), root / "tail.onnx", "z", "logits")
        store_weights_fp16(root / "tail.onnx")
        export_torch_tail(tail, torch.from_numpy(z[:2]), root / "tail.pt2")
        torch.onnx.export(
            head,
            (torch.from_numpy(x[:2]),),
            str(root / "head.onnx"),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["z"],
            dynamic_axes={"image": {0: "batch"}, "z": {0: "batch"}},
        )
    manifest = {
        "name": "teacher-tail-test",
        "family": "bottlefit",
        "classes": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
        "input": spec,
        "wire": {"name": "z", "shape": list(z.shape[1:]), "dtype": "float32"},
        "modes": [
            {
                "id": 0,
                "name": "full-b8",
                "channels": int(z.shape[1]),
                "bits": 8,
                "quant": {"scale": float(z.max()) / 255, "zero_point": 0},
                "bytes_per_frame": int(z[0].size),
                "accuracy": None,
                "head_ms": {},
            }
        ],
        "files": {"head": {"path": "head.onnx"}, "tail": {"path": "tail.onnx"}, "tail_torch": {"path": "tail.pt2"}},
    }
    write_manifest(root, manifest)
    bundle = Bundle.load(root)
    labels = np.asarray([s.label for s in samples])
    reference = create_engine(bundle.file("tail"), "ort", threads=1).run1(z)
    return bundle, z, labels, reference


# (backend, options, relative tolerance against ORT fp32, as max |diff| / max |logit|). Measured on
# CPU: torch fp32 1.7e-4 (the ONNX weights are stored as fp16, the program's are fp32), fp16 8e-4,
# bf16 6.6e-3 (8 mantissa bits). On CUDA, fp32 convolutions run in TF32 by default (torch and
# TensorRT alike), whose 10-bit mantissa is fp16's: those cases get the fp16 tolerance.
FP32, FP16, BF16 = 2e-3, 1e-2, 3e-2
CASES = [
    pytest.param("ort", {}, 1e-6, id="ort-cpu-fp32"),
    pytest.param("torch", {"device": "cpu"}, FP32, id="torch-cpu-fp32"),
    pytest.param("torch", {"device": "cpu", "precision": "fp16"}, FP16, id="torch-cpu-fp16"),
    pytest.param("torch", {"device": "cpu", "precision": "bf16"}, BF16, id="torch-cpu-bf16"),
    pytest.param("torch", {"device": "cuda"}, FP16, id="torch-cuda-fp32", marks=needs_cuda),
    pytest.param("torch", {"device": "cuda", "precision": "fp16"}, FP16, id="torch-cuda-fp16", marks=needs_cuda),
    pytest.param("torch", {"device": "cuda", "precision": "bf16"}, BF16, id="torch-cuda-bf16", marks=needs_cuda),
    pytest.param(
        "torch",
        {"device": "cuda", "precision": "fp16", "accel": "cudagraphs"},
        FP16,
        id="torch-cuda-fp16-cudagraphs",
        marks=needs_cuda,
    ),
    pytest.param("torch", {"device": "cuda", "accel": "compile"}, FP16, id="torch-cuda-fp32-compile", marks=needs_cuda),
    pytest.param("tensorrt", {}, FP16, id="tensorrt-fp32", marks=needs_trt),
    pytest.param("tensorrt", {"precision": "fp16"}, FP16, id="tensorrt-fp16", marks=needs_trt),
]


@pytest.mark.parametrize("backend,options,tol", CASES)
def test_backend_matches_ort_fp32_on_real_data(teacher_tail, backend, options, tol, tmp_path):
    bundle, z, labels, ref = teacher_tail
    graph = bundle.file("tail_torch" if backend == "torch" else "tail")
    # max_batch 8 < FRAMES: CUDA graphs and TensorRT must chunk the full batch.
    eng = create_engine(graph, backend, threads=1, max_batch=8, cache_dir=str(tmp_path), **options)
    out = eng.run1(z)
    assert out.dtype == np.float32 and out.shape == ref.shape
    scale = float(np.abs(ref).max())
    assert np.abs(out - ref).max() / scale < tol
    assert np.mean(out.argmax(1) == ref.argmax(1)) >= 0.9
    assert np.mean(ref.argmax(1) == labels) >= 0.6  # the tail really classifies: the teacher is ~83% on this shard
    # Dynamic batch: any batch size gives the rows the full batch gave (within the same precision).
    for n in (1, 3, 8):
        rows = eng.run1(z[:n])
        assert rows.shape == (n, ref.shape[1])
        assert np.abs(rows - out[:n]).max() / scale < max(tol / 4, 1e-5)


def test_engine_accepts_options_object_and_keywords(teacher_tail):
    bundle, z, _, _ = teacher_tail
    opts = EngineOptions(device="cpu", threads=1)
    a = create_engine(bundle.file("tail_torch"), "torch", opts).run1(z[:4])
    b = create_engine(bundle.file("tail_torch"), "torch", opts, precision="bf16").run1(z[:4])
    assert a.dtype == b.dtype == np.float32
    assert not np.array_equal(a, b)  # the keyword really changed the precision


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"backend": "tpu"}, "unknown engine backend 'tpu'"),
        ({"precision": "int4"}, "unknown precision 'int4'"),
        ({"device": "gpu0"}, "unknown device 'gpu0'"),
        ({"accel": "turbo"}, "unknown acceleration 'turbo'"),
        ({"max_batch": 0}, "max_batch must be at least 1"),
        ({"max_batch": 8, "opt_batch": 16}, "opt_batch must lie in"),
        ({"bogus": 1}, "unknown engine option"),
        ({"backend": "ort", "precision": "fp16"}, "graph's own precision"),
        ({"backend": "ort", "device": "cuda"}, "runs on cpu only"),
        ({"backend": "ort", "accel": "compile"}, "is a torch option"),
        ({"backend": "tensorrt", "precision": "bf16"}, "cannot carry bf16"),
        ({"backend": "tensorrt", "device": "cpu"}, "runs on cuda only"),
        ({"backend": "torch", "device": "cpu", "accel": "cudagraphs"}, "CUDA graphs need a cuda device"),
    ],
)
def test_bad_engine_options_are_clear_errors(teacher_tail, kwargs, match):
    bundle = teacher_tail[0]
    kwargs = dict(kwargs)
    backend = kwargs.pop("backend", "torch")
    path = bundle.file("tail_torch" if backend == "torch" else "tail")
    with pytest.raises(EngineError, match=match):
        create_engine(path, backend, **kwargs)


@pytest.mark.skipif(_cuda(), reason="checks the error given where CUDA is absent")
def test_cuda_asked_for_without_cuda_is_a_clear_error(teacher_tail):
    with pytest.raises(EngineError, match="no usable CUDA"):
        create_engine(teacher_tail[0].file("tail_torch"), "torch", device="cuda")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_absent_is_a_clear_error(teacher_tail):
    with pytest.raises(EngineError, match="needs the 'tensorrt' Python package"):
        create_engine(teacher_tail[0].file("tail"), "tensorrt")


def test_wrong_input_shape_is_a_clear_error_and_engine_keeps_working(teacher_tail):
    bundle, z, _, ref = teacher_tail
    for backend, role in (("torch", "tail_torch"), ("ort", "tail")):
        eng = create_engine(bundle.file(role), backend, threads=1, **({"device": "cpu"} if backend == "torch" else {}))
        with pytest.raises(EngineError):
            eng.run1(z[:, :3])
        assert np.abs(eng.run1(z[:2]) - ref[:2]).max() / np.abs(ref).max() < 1e-2


def test_fp16_graph_rewrite_matches_fp32_tail_on_ort(teacher_tail, tmp_path):
    """The fp16-compute rewrite that TensorRT builds from, run by ONNX Runtime on the CPU."""
    import onnx

    from edgesplit.engine.onnx_precision import lower_precision_file

    bundle, z, _, ref = teacher_tail
    dst = lower_precision_file(bundle.file("tail"), tmp_path / "tail-fp16.onnx")
    m = onnx.load(str(dst))
    # fp32 at the edges, fp16 inside: every float initializer is fp16 and no weight Cast is left.
    assert [i.type.tensor_type.elem_type for i in m.graph.input] == [onnx.TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in m.graph.output] == [onnx.TensorProto.FLOAT]
    float_inits = [t for t in m.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert float_inits and all(t.data_type == onnx.TensorProto.FLOAT16 for t in float_inits)
    casts = [n for n in m.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2  # one at the input, one at the output
    out = create_engine(dst, "ort", threads=1).run1(z)
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() / np.abs(ref).max() < 2e-2
    assert np.mean(out.argmax(1) == ref.argmax(1)) >= 0.95


def test_fp16_rewrite_on_shipped_bundle_tail(tmp_path):
    """The shipped CIFAR-10 bundle's own tail (BottleFit decoder: ConvTranspose, pad shortcuts) on
    256 real frames through its real head."""
    from edgesplit.data.sources import open_source, take
    from edgesplit.data.transforms import preprocess
    from edgesplit.engine.onnx_precision import lower_precision_file

    require_cifar()
    b = Bundle.load(Path(__file__).resolve().parents[1] / "models" / "cifar10-resnet20-bottlefit")
    samples = list(take(open_source("cifar10:test"), 256))
    x = np.stack([preprocess(s.data, b.input_spec) for s in samples])
    z = create_engine(b.file("head"), "ort", threads=1).run1(x)
    ref = create_engine(b.file("tail"), "ort", threads=1).run1(z)
    out = create_engine(lower_precision_file(b.file("tail"), tmp_path / "t.onnx"), "ort", threads=1).run1(z)
    assert np.abs(out - ref).max() / np.abs(ref).max() < 2e-3  # measured 2.5e-4
    assert np.mean(out.argmax(1) == ref.argmax(1)) >= 0.99
    labels = np.asarray([s.label for s in samples])
    assert abs(np.mean(out.argmax(1) == labels) - np.mean(ref.argmax(1) == labels)) <= 0.01


def test_fp16_rewrite_refuses_what_it_cannot_lower():
    from onnx import TensorProto, helper

    from edgesplit.engine.onnx_precision import lower_precision

    g = helper.make_graph(
        [helper.make_node("RandomNormalLike", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    with pytest.raises(ValueError, match="RandomNormalLike"):
        lower_precision(helper.make_model(g))
    with pytest.raises(ValueError, match="offered: fp16"):
        lower_precision(helper.make_model(g), "bf16")


def test_bench_engine_scenario_with_bare_torch(teacher_tail, capsys):
    """``edgesplit bench engine`` end to end (CPU): engine rows and bare-torch rows per batch size."""
    from edgesplit.bench import bench_main

    bundle = teacher_tail[0]
    rc = bench_main(
        [
            "engine",
            "--bundle",
            str(bundle.root),
            "--backend",
            "torch",
            "--device",
            "cpu",
            "--batch-sizes",
            "1,4",
            "--seconds",
            "0.2",
            "--threads",
            "1",
            "--bare-torch",
            "--json",
        ]
    )
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert r["backend"] == "torch" and r["device"] == "cpu" and r["gpu"] is None
    assert [row["batch"] for row in r["engine"]] == [1, 4] == [row["batch"] for row in r["bare_torch"]]
    for row in r["engine"] + r["bare_torch"]:
        # the timed calls fill the --seconds 0.2 budget (at least half of it: only the loop's own
        # bookkeeping between calls is outside them), not just the 5-call minimum
        assert row["batch"] * row["calls"] / row["frames_per_s"] >= 0.1 and row["latency_ms_p50"] > 0
    assert len(r["engine_over_bare_fps"]) == 2


def test_measure_engine_rows(teacher_tail):
    from edgesplit.bench.engine import measure_engine

    bundle, z, _, _ = teacher_tail
    eng = create_engine(bundle.file("tail"), "ort", threads=1)
    seen = []  # the batch size of every call the engine really got
    run = eng.run
    eng.run = lambda feeds: seen.append(next(iter(feeds.values())).shape[0]) or run(feeds)
    rows = measure_engine(eng, z.shape[1:], [1, 2], seconds=0.05, warmup=1)
    assert [r["batch"] for r in rows] == [1, 2]
    # each row counts the timed calls made at its batch size: all but the one warm-up call
    assert [r["calls"] for r in rows] == [seen.count(1) - 1, seen.count(2) - 1] and set(seen) == {1, 2}


def test_engine_row_statistics_on_known_latencies():
    from edgesplit.bench.engine import _row

    # five calls of batch 4: median 3 ms; p95 interpolates between the 4th and 5th sorted values
    # (rank 0.95 x 4 = 3.8: 4 + 0.8 x 6 = 8.8 ms); 20 frames in 20 ms = 1000 frames/s
    assert _row(4, [10.0, 1.0, 3.0, 2.0, 4.0]) == {
        "batch": 4,
        "calls": 5,
        "latency_ms_p50": 3.0,
        "latency_ms_p95": pytest.approx(8.8),
        "frames_per_s": pytest.approx(1000.0),
    }


def test_server_runs_tail_with_engine_options(teacher_tail):
    """The daemon passes --backend/--precision through to its tail engine, sized to its max batch,
    and answers real requests over loopback with that engine."""
    from edgesplit.edge.agent import Agent
    from edgesplit.server.daemon import Server
    from edgesplit.wire import codec

    bundle, z, _, _ = teacher_tail
    mode = bundle.mode(0)
    tail = create_engine(bundle.file("tail"), "ort", threads=1)
    with Server(
        [bundle],
        "tcp://127.0.0.1:0",
        backend="torch",
        threads=1,
        max_batch=8,
        max_queue_delay_us=0,
        engine_options=EngineOptions(device="cpu", precision="bf16"),
    ) as srv:
        runner = next(iter(srv.runners.values()))
        assert runner.backend == "torch"
        assert (runner.engine.options.precision, runner.engine.options.max_batch) == ("bf16", 8)
        agent = Agent(bundle, srv.endpoint, threads=1, load_head=False).connect()
        try:
            for i in range(4):
                res = agent.wait_for(agent.send_tensor(z[i]))
                assert res.ok, res.error_message
                d, p = codec.encode(z[i], mode, name="z")
                expect = tail.run1(codec.decode(d, p)[None])[0]  # the same 8-bit wire tensor, ORT fp32
                assert np.abs(res.logits - expect).max() / np.abs(expect).max() < BF16
        finally:
            agent.close()


def test_serve_refuses_an_engine_option_its_backend_cannot_run(teacher_tail, capsys):
    from edgesplit.server.daemon import serve_main

    rc = serve_main(
        [
            "--bundle",
            str(teacher_tail[0].root),
            "--bind",
            "tcp://127.0.0.1:0",
            "--backend",
            "ort",
            "--precision",
            "fp16",
        ]
    )
    assert rc == 1
    assert "graph's own precision" in capsys.readouterr().err
