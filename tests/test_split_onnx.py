"""Bring your own model: ``edgesplit split FILE.onnx`` on graphs from the project's zoo and from
another framework, served by the real server to the real agent on loopback.

- ResNet-20 (32 px) exported by the project's exporter (``export_common.export_onnx``, random
  weights): its cut points are the block boundaries, and a cut after stage 1 reproduces the graph in
  ONNX Runtime exactly.
- The project's trained ResNet-20 (the shipped bundle's ``full.onnx``, weights stored as float16 +
  Cast, so constants that are computed in the graph must not block a cut) and a scikit-learn
  ``MLPClassifier`` trained here on CIFAR-10 pixels and converted by skl2onnx (a graph the project
  did not write: flat ``[N, 3072]`` input, ``Cast`` first, a ``label`` output beside the
  probabilities, an ``ai.onnx.ml`` op) are cut, bundled, loaded by ``Bundle``, served by
  ``Server`` to ``Agent``: the served logits equal the bundle's own head -> 8-bit codec -> tail and
  the served top-1 equals the whole graph's on real CIFAR-10 test frames.
- Bad input: a file that is not ONNX, a graph with no single-tensor cut, an unknown tensor, a
  tensor that is not a cut, the graph's output, an output that is not scores, an unknown output.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from build_fixtures import one_torch_thread, require_cifar  # noqa: F401  (pytest fixture by name)
from onnx import TensorProto, helper, numpy_helper

from edgesplit.builder.split import split_main
from edgesplit.builder.split_onnx import (
    OnnxSplitError,
    cut_points,
    load_graph,
    run1,
    session,
    split_graph,
    verify_split,
)
from edgesplit.builder.split_onnx_bundle import build_onnx_bundle, real_frames
from edgesplit.bundle import Bundle

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_RESNET20 = ROOT / "models" / "cifar10-resnet20-bottlefit" / "full.onnx"
SPEC = {"shape": [3, 32, 32], "resize": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
FRAMES = 24  # served frames
RESNET20_STAGE_ENDS = ["relu_6", "relu_12", "relu_18"]  # the output of layer1, layer2, layer3


@pytest.fixture(scope="module")
def exported_resnet20(tmp_path_factory) -> Path:
    import torch

    from edgesplit.builder.export_common import export_onnx
    from edgesplit.builder.zoo import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("zoo") / "resnet20.onnx"
    export_onnx(create_model("resnet20_cifar", 10), torch.zeros(2, 3, 32, 32), path, "image", "logits")
    return path


@pytest.fixture(scope="module")
def sklearn_mlp(tmp_path_factory) -> Path:
    """A scikit-learn MLP trained on 1000 real CIFAR-10 training frames (preprocessed as the bundle
    will, flattened C, H, W), converted by skl2onnx with its default label + probabilities outputs."""
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    require_cifar()
    x, y = real_frames("cifar10:train", SPEC, 1000)
    flat = x.reshape(len(x), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter is short on purpose: it is a graph, not a result
        clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=40, random_state=0).fit(flat, y)
    path = tmp_path_factory.mktemp("sklearn") / "mlp.onnx"
    onnx.save(to_onnx(clf, flat[:1], options={"zipmap": False}, target_opset=18), str(path))
    return path


@pytest.fixture(scope="module")
def test_frames():
    require_cifar()
    return real_frames("cifar10:test", SPEC, FRAMES)


def test_zoo_resnet20_cut_points_are_block_boundaries_and_a_stage_cut_is_exact(exported_resnet20, test_frames):
    graph = load_graph(exported_resnet20)
    cuts = cut_points(graph)
    names = [c.name for c in cuts]
    for end in RESNET20_STAGE_ENDS:
        assert end in names
    assert names.index("relu_6") < names.index("relu_12") < names.index("relu_18")  # topological order
    by = {c.name: c for c in cuts}
    assert by["relu_6"].shape[1:] == (16, 32, 32) and isinstance(by["relu_6"].shape[0], str)  # symbolic batch
    assert (by["relu_6"].bytes_per_frame, by["relu_6"].bytes_per_frame_8bit) == (16 * 32 * 32 * 4, 16 * 32 * 32)
    assert by["relu_18"].bytes_per_frame_8bit == 64 * 8 * 8
    # Inside a residual block the skip connection is a second live value: no cut there.
    assert len(cuts) < len(graph.graph.node) / 2
    x, _ = test_frames
    head, tail = split_graph(graph, "relu_6")
    assert [i.name for i in tail.graph.input] == ["relu_6"] and [o.name for o in head.graph.output] == ["relu_6"]
    ref = run1(session(graph), x)
    got = run1(session(tail), run1(session(head), x))
    assert np.max(np.abs(got - ref)) <= 1e-5 and (got.argmax(1) == ref.argmax(1)).all()


@pytest.fixture(scope="module")
def built(sklearn_mlp, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    resnet, resnet_checks = build_onnx_bundle(
        SHIPPED_RESNET20, "relu_6", root / "resnet20", dataset="cifar10", frames=32, calib_frames=64
    )
    mlp, mlp_checks = build_onnx_bundle(sklearn_mlp, "next_activations", root / "mlp", frames=32, calib_frames=64)
    return {"resnet20": (resnet, resnet_checks, SHIPPED_RESNET20), "mlp": (mlp, mlp_checks, sklearn_mlp)}


def test_bundles_record_the_cut_the_checks_and_the_input_spec(built):
    resnet, checks, _ = built["resnet20"]
    assert resnet.wire_spec["shape"] == [16, 32, 32] and resnet.has("full")
    (mode,) = resnet.modes
    assert mode.bits == 8 and mode.channels == 16 and mode.bytes_per_frame == 16 * 32 * 32
    assert checks["checks"]["head_then_tail"]["max_abs_diff"] <= 1e-5
    m = resnet.manifest
    assert m["split"]["generic"] and m["split"]["cut"] == "relu_6" and m["model"]["arch"] == "onnx:full.onnx"
    assert m["input"]["mean"] == SPEC["mean"] and m["input"]["shape"] == [3, 32, 32]
    assert 0.5 < m["teacher_accuracy"] <= 1 and "training" not in m  # the shipped ResNet-20 is trained
    mlp, checks, _ = built["mlp"]
    # 64 hidden units after the ReLU travel as [64, 1, 1]; the flat input gets a Reshape in front.
    assert mlp.wire_spec["shape"] == [64, 1, 1] and mlp.modes[0].bytes_per_frame == 64
    assert mlp.manifest["model"]["config"]["input_adapter"] == "Reshape"
    assert mlp.manifest["model"]["config"]["output"] == "probabilities"
    assert checks["checks"]["head_then_tail"]["top1_agreement"] == 1.0


def _local_logits(bundle: Bundle, samples) -> np.ndarray:
    """What the server must answer: the bundle's head, the wire codec, the tail, run here."""
    from edgesplit.data.transforms import preprocess
    from edgesplit.engine import create_engine
    from edgesplit.wire import codec

    m = bundle.default_mode
    head, tail = create_engine(bundle.file("head"), threads=1), create_engine(bundle.file("tail"), threads=1)
    out = []
    for s in samples:
        z = head.run1(preprocess(s.data, bundle.input_spec)[None])[0]
        desc, payload = codec.encode(z, m, name=bundle.wire_spec["name"])
        out.append(tail.run1(codec.decode(desc, payload, full_channels=bundle.wire_spec["shape"][0])[None])[0])
    return np.stack(out)


def test_served_predictions_equal_the_whole_graph(built):
    from edgesplit.data.sources import open_source, take
    from edgesplit.data.transforms import preprocess
    from edgesplit.edge.agent import Agent
    from edgesplit.server.daemon import Server

    samples = list(take(open_source("cifar10:test"), FRAMES))
    x = np.stack([preprocess(s.data, SPEC) for s in samples])
    bundles = [b for b, _, _ in built.values()]
    with Server(bundles, "tcp://127.0.0.1:0", threads=1, max_batch=8, max_queue_delay_us=500) as srv:
        for bundle, _, source in built.values():
            with Agent(bundle, srv.endpoint, threads=1) as agent:
                got = [agent.infer(s) for s in samples]
            assert all(r.error is None and r.bytes_sent == bundle.default_mode.bytes_per_frame for r in got)
            served = np.stack([r.logits for r in got])
            np.testing.assert_allclose(served, _local_logits(bundle, samples), rtol=1e-4, atol=1e-4)
            graph = load_graph(source)
            frames = x if graph.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 3 else x.reshape(len(x), -1)
            whole = run1(session(graph), frames)
            assert (served.argmax(1) == whole.argmax(1)).all(), bundle.name


def test_cli_lists_and_builds(sklearn_mlp, tmp_path, capsys):
    assert split_main([str(sklearn_mlp), "--list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in listed][:4] == ["cast_input", "mul_result", "add_result", "next_activations"]
    assert listed[0]["bytes_per_frame"] == 3072 * 4 and listed[3]["bytes_per_frame_8bit"] == 64
    out = tmp_path / "b"
    args = [str(sklearn_mlp), "--at", "add_result", "--out", str(out), "--frames", "8", "--calib-frames", "8"]
    assert split_main(args) == 0
    text = capsys.readouterr().out
    assert "64 B/frame at 8 bits" in text and "mean [0.485, 0.456, 0.406]" in text
    assert Bundle.load(out).manifest["split"]["cut"] == "add_result"


def _no_cut_graph(path: Path) -> Path:
    """y = Relu(x) + Sigmoid(x): two branches from the input to the output, nothing in between."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Sigmoid", ["x"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "two-branches", [x], [y]))
    onnx.save(model, str(path))
    return path


def _cli_error(args: list[str], capsys) -> str:
    assert split_main(args) == 2
    return capsys.readouterr().err


def test_bad_inputs_are_named(exported_resnet20, sklearn_mlp, tmp_path, capsys):
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"this is not a protobuf" * 10)
    assert "is not a valid ONNX model" in _cli_error([str(junk), "--list"], capsys)
    weights = tmp_path / "weights.pt"  # not .onnx, but a file: still read as ONNX, still refused
    weights.write_bytes(b"PK\x03\x04 zip")
    assert "weights.pt is not a valid ONNX model" in _cli_error([str(weights), "--list"], capsys)

    err = _cli_error([str(_no_cut_graph(tmp_path / "branches.onnx")), "--list"], capsys)
    assert "no single-tensor cut point: every cut crosses ≥ 2 tensors" in err and "{a, b}" in err
    with pytest.raises(OnnxSplitError, match="no single-tensor cut point"):
        split_graph(load_graph(tmp_path / "branches.onnx"), "a")

    r20 = str(exported_resnet20)
    err = _cli_error([r20, "--at", "layer9", "--out", str(tmp_path / "o")], capsys)
    assert "no tensor 'layer9' in the graph; valid cut points: getitem, relu," in err and "relu_6" in err
    err = _cli_error([r20, "--at", "getitem_6", "--out", str(tmp_path / "o")], capsys)
    assert "'getitem_6' is not a single-tensor cut (crossing there: relu, getitem_6)" in err
    assert "valid cut points:" in err
    err = _cli_error([r20, "--at", "logits", "--out", str(tmp_path / "o")], capsys)
    assert "'logits' is the graph's output: a cut there leaves an empty tail" in err

    err = _cli_error(
        [str(sklearn_mlp), "--output", "label", "--at", "next_activations", "--out", str(tmp_path / "o")], capsys
    )
    assert "the graph output 'label' is not float32 scores [N, K]" in err
    err = _cli_error([str(sklearn_mlp), "--output", "nope", "--list"], capsys)
    assert "no graph output 'nope' (outputs: label, probabilities)" in err


def _nhwc_graph(path: Path, batch: int | str = "N") -> Path:
    """An NHWC graph written with onnx.helper: Relu, a Reshape whose target shape is a Concat of
    Constants (shape inference leaves its dims unknown; ONNX Runtime is asked), a MatMul to 10 scores."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 4, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])
    const = lambda name, v: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(v))  # noqa: E731
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        const("minus_one", np.array([-1], np.int64)),
        const("width", np.array([48], np.int64)),
        helper.make_node("Concat", ["minus_one", "width"], ["shape"], axis=0),
        helper.make_node("Reshape", ["r", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["y"]),
    ]
    w = numpy_helper.from_array(rng.standard_normal((48, 10)).astype(np.float32), "w")
    onnx.save(helper.make_model(helper.make_graph(nodes, "nhwc", [x], [y], initializer=[w])), str(path))
    return path


def test_nhwc_input_and_shapes_only_onnx_runtime_knows(tmp_path):
    from edgesplit.builder.split_onnx_bundle import bundle_graphs

    graph = load_graph(_nhwc_graph(tmp_path / "nhwc.onnx"))
    by = {c.name: c for c in cut_points(graph)}
    assert list(by) == ["r", "flat"] and by["flat"].bytes_per_frame == 48 * 4 and by["flat"].shape[1:] == (48,)
    g = bundle_graphs(graph, "flat", 4)
    assert g.adapter == ("Transpose", [0, 2, 3, 1]) and g.wire_shape == (48, 1, 1)
    image = np.random.default_rng(1).standard_normal((5, 3, 4, 4)).astype(np.float32)
    whole = run1(session(graph), image.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(run1(session(g.full), image), whole, rtol=1e-6, atol=1e-6)
    z = run1(session(g.head), image)
    assert z.shape == (5, 48, 1, 1)
    np.testing.assert_allclose(run1(session(g.tail), z), whole, rtol=1e-6, atol=1e-6)
    with pytest.raises(OnnxSplitError, match="'x' has a fixed batch of 1: export it with a symbolic batch axis"):
        bundle_graphs(load_graph(_nhwc_graph(tmp_path / "fixed.onnx", batch=1)), "flat", 4)
    with pytest.raises(OnnxSplitError, match=r"'x' is Nx4x4x3: not an image of 32 px"):
        bundle_graphs(graph, "flat", 32)


def test_control_flow_reads_from_the_outer_scope_are_followed(tmp_path):
    """y = If(true, then: Identity(t), else: Neg(t)) with t = Abs(Sigmoid(Relu(x))): t reaches the
    If only through its branches, which onnx's stock extractor does not follow (onnx issue 4090)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    branch = lambda op, out: helper.make_graph(  # noqa: E731
        [helper.make_node(op, ["t"], [out])], op, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)]
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Sigmoid", ["r"], ["s"]),
        helper.make_node("Abs", ["s"], ["t"]),
        helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True))),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch("Identity", "a"), else_branch=branch("Neg", "b")),
    ]
    model = helper.make_model(helper.make_graph(nodes, "cf", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(tmp_path / "cf.onnx"))
    graph = load_graph(tmp_path / "cf.onnx")
    assert [c.name for c in cut_points(graph)] == ["r", "s", "t"]
    head, tail = split_graph(graph, "s")
    assert [n.op_type for n in tail.graph.node] == ["Abs", "Constant", "If"]
    frames = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    assert verify_split(graph, head, tail, frames)["max_abs_diff"] == 0.0
