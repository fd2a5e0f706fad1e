"""Bring your own model: cut an ONNX graph that any framework exported into a head and a tail.

    graph = load_graph("model.onnx")                 # checked, pruned to one input and one output
    for cut in cut_points(graph): print(cut.describe())
    head, tail = split_graph(graph, "relu_6")        # onnx.utils.Extractor does the cutting
    check = verify_split(graph, head, tail, frames)  # ONNX Runtime: tail(head(x)) against the graph

A **cut point** is a tensor T that every path from the graph's input to its output passes through:
once T's producer has run, T is the only value a later node still needs. Initializers and values
computed from them alone (``Constant`` nodes, weight ``Cast`` s, shape constants) are not values that
cross: the tail recomputes them, so they never block a cut. Only float32 tensors are cut points,
since the wire carries float32 quantized to 8 bits.

What is supported: one image input (``[N, 3, S, S]``, ``[N, S, S, 3]`` or the flat ``[N, 3*S*S]``
in C, H, W order) and
one output of scores ``[N, K]`` (a graph with several outputs is pruned to the one named, or to its
only float ``[N, K]`` output); :mod:`edgesplit.builder.split_onnx_io` puts the bundle's names and
shapes around the halves. The batch axis should be symbolic: the server batches frames.
Control flow (``If``/``Loop``/``Scan``) counts with its outer-scope reads, in the liveness and in
the cut: :class:`_ScopedExtractor` is onnx's extractor taught to follow them (onnx issue 4090).

Torch-free: onnx, onnxruntime and numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx.utils import Extractor


class OnnxSplitError(ValueError):
    """The file, the graph or the tensor to cut at cannot be split; the message names the thing."""


@dataclass(frozen=True)
class OnnxCut:
    name: str  # tensor name: what --at takes
    op: str  # op_type of the node that produces it
    node: str  # that node's name
    shape: tuple[int | str, ...]  # the full shape, batch axis first (symbolic dims as their names)
    bytes_per_frame: int | None  # as float32; None when a per-frame dim is not known
    bytes_per_frame_8bit: int | None  # quantized to 8 bits, as the wire codec sends it

    @property
    def frame_shape(self) -> tuple[int, ...]:
        if self.bytes_per_frame is None:
            raise OnnxSplitError(f"tensor '{self.name}' has no static per-frame shape ({self._shape_text()})")
        return tuple(int(d) for d in self.shape[1:])

    def _shape_text(self) -> str:
        return "x".join(str(d) for d in self.shape)

    def describe(self) -> str:
        fp32 = "?" if self.bytes_per_frame is None else self.bytes_per_frame
        b8 = "?" if self.bytes_per_frame_8bit is None else self.bytes_per_frame_8bit
        return f"{self.name:<28} {self.op:<16} {self._shape_text():<20} {fp32:>9} B  {b8:>8} B@8bit"


def load_graph(path: str | Path, output: str | None = None) -> onnx.ModelProto:
    """Read and check an ONNX file, prune it to its one input and the chosen output, infer shapes."""
    p = Path(path)
    if not p.is_file():
        raise OnnxSplitError(f"no file {p}")
    try:
        model = onnx.load(str(p))
        onnx.checker.check_model(model)
    except Exception as e:  # protobuf's DecodeError, onnx's ValidationError: both say "not ONNX"
        raise OnnxSplitError(f"{p} is not a valid ONNX model ({type(e).__name__}: {e})") from e
    if not model.graph.node:
        raise OnnxSplitError(f"{p} is not a valid ONNX model (its graph has no nodes)")
    inp = _only_input(model)
    out = _choose_output(model, output)
    pruned = _ScopedExtractor(model).extract_model([inp], [out])  # drops nodes the output does not need
    pruned.graph.name = model.graph.name or p.stem
    return onnx.shape_inference.infer_shapes(pruned)


def _only_input(model: onnx.ModelProto) -> str:
    inits = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise OnnxSplitError(
            f"the graph has {len(inputs)} inputs ({', '.join(inputs) or 'none'}): edgesplit split supports one image input"
        )
    return inputs[0]


def _choose_output(model: onnx.ModelProto, output: str | None) -> str:
    outs = {o.name: o for o in model.graph.output}
    if output is not None:
        if output not in outs:
            raise OnnxSplitError(f"no graph output '{output}' (outputs: {', '.join(outs)})")
        return output
    if len(outs) == 1:
        return next(iter(outs))
    scores = [n for n, o in outs.items() if o.type.tensor_type.elem_type == TensorProto.FLOAT and _rank(o) == 2]
    if len(scores) != 1:
        raise OnnxSplitError(f"the graph has {len(outs)} outputs ({', '.join(outs)}): name the scores with --output")
    return scores[0]


def _rank(v: onnx.ValueInfoProto) -> int:
    return len(v.type.tensor_type.shape.dim)


def dims_of(v: onnx.ValueInfoProto) -> tuple[int | str, ...] | None:
    t = v.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)


def graph_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inits = {t.name for t in model.graph.initializer}
    return next(i for i in model.graph.input if i.name not in inits)


def _outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from the enclosing scope (recursively): its hidden inputs."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    reads: set[str] = set()
    for n in graph.node:
        reads |= {x for x in n.input if x} | _subgraph_reads(n)
        defined |= set(n.output)
    return reads - defined


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    reads: set[str] = set()
    for a in node.attribute:
        for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            reads |= _outer_reads(g)
    return reads


class _ScopedExtractor(Extractor):
    """onnx's :class:`~onnx.utils.Extractor`, also following what control-flow subgraphs read from
    the enclosing graph: the stock one follows node inputs only (onnx issue 4090), so it would drop
    the producers and initializers an ``If``/``Loop`` body reads."""

    def _dfs_search_reachable_nodes(self, node_output_name, graph_input_names, reachable) -> None:
        stack = [node_output_name]
        while stack:
            name = stack.pop()
            if name in graph_input_names or name not in self.outmap or self.outmap[name] in reachable:
                continue
            reachable.add(self.outmap[name])
            node = self.graph.node[self.outmap[name]]
            stack += [x for x in node.input if x] + sorted(_subgraph_reads(node))

    def _collect_reachable_tensors(self, nodes):
        initializer, value_info = super()._collect_reachable_tensors(nodes)
        have = {t.name for t in initializer}
        reads = sorted(set().union(*(_subgraph_reads(n) for n in nodes)) - have) if nodes else []
        initializer += [self.initializers[t] for t in reads if t in self.initializers]
        return initializer, value_info


@dataclass(frozen=True)
class _Liveness:
    order: list[onnx.NodeProto]
    live_after: list[list[str]]  # per node: the input-dependent values a later node or the output needs
    producer: dict[str, int]  # value name -> index of the node that produces it


def _liveness(model: onnx.ModelProto) -> _Liveness:
    g = model.graph
    nodes = list(g.node)
    reads = [{x for x in n.input if x} | _subgraph_reads(n) for n in nodes]
    dynamic = {graph_input(model).name}  # values that depend on the input; the rest are constants
    producer: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            producer[o] = i
        if reads[i] & dynamic:
            dynamic |= {o for o in n.output if o}
    end = len(nodes)
    last_use = {name: end for name in (o.name for o in g.output)}
    for i, r in enumerate(reads):
        for name in r & dynamic:
            last_use[name] = max(last_use.get(name, -1), i)
    live: list[str] = [graph_input(model).name]
    live_after = []
    for i, n in enumerate(nodes):
        live = [v for v in live if last_use.get(v, -1) > i]
        live += [o for o in n.output if o in dynamic and last_use.get(o, -1) > i]
        live_after.append(list(live))
    return _Liveness(nodes, live_after, producer)


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    g = model.graph
    return {v.name: v for v in [*g.value_info, *g.input, *g.output]}


def _describe(infos: dict[str, onnx.ValueInfoProto], name: str, node: onnx.NodeProto) -> OnnxCut:
    dims = dims_of(infos[name]) if name in infos else None
    frame = dims[1:] if dims else None
    static = frame is not None and all(isinstance(d, int) and d > 0 for d in frame)
    numel = int(np.prod(frame)) if static and frame else (1 if static else None)
    return OnnxCut(
        name=name,
        op=node.op_type,
        node=node.name,
        shape=dims or ("?",),
        bytes_per_frame=None if numel is None else 4 * numel,
        bytes_per_frame_8bit=numel,
    )


def _cut_names(model: onnx.ModelProto, lv: _Liveness) -> list[str]:
    outputs = {o.name for o in model.graph.output}
    names: list[str] = []
    for i, live in enumerate(lv.live_after):
        if len(live) == 1 and live[0] not in names and live[0] not in outputs and lv.producer.get(live[0]) == i:
            names.append(live[0])  # a cut at the output would leave an empty tail
    infos = _value_infos(model)
    return [n for n in names if n in infos and infos[n].type.tensor_type.elem_type == TensorProto.FLOAT]


def cut_points(model: onnx.ModelProto) -> list[OnnxCut]:
    """Every single-tensor cut point, in topological order, with its shape and size per frame."""
    lv = _liveness(model)
    infos = _value_infos(model)
    cuts = [_describe(infos, n, lv.order[lv.producer[n]]) for n in _cut_names(model, lv)]
    unknown = [c.name for c in cuts if c.bytes_per_frame is None]
    if not unknown:
        return cuts
    probed = _probe_frame_shapes(model, unknown)
    return [
        _describe({c.name: probed[c.name]}, c.name, lv.order[lv.producer[c.name]]) if c.name in probed else c
        for c in cuts
    ]


def _probe_frame_shapes(model: onnx.ModelProto, names: list[str]) -> dict[str, onnx.ValueInfoProto]:
    """Shapes that shape inference left symbolic, read from one ONNX Runtime run on a zero frame
    (the batch axis kept symbolic); empty when the input itself has no static per-frame shape."""
    inp = graph_input(model)
    frame = (dims_of(inp) or ("?",))[1:]
    if not frame or not all(isinstance(d, int) and d > 0 for d in frame):
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    got = session(probe).run(names, {inp.name: np.zeros((1, *frame), np.float32)})
    return {n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", *v.shape[1:]]) for n, v in zip(names, got)}


def require_cut_points(model: onnx.ModelProto) -> list[OnnxCut]:
    """:func:`cut_points`, or an error naming the narrowest cuts when there is none."""
    cuts = cut_points(model)
    if cuts:
        return cuts
    lv = _liveness(model)
    crossing = [live for live in lv.live_after if len(live) >= 2]
    narrowest = min((len(c) for c in crossing), default=0)
    seen: list[list[str]] = []
    for live in crossing:
        if len(live) == narrowest and live not in seen:
            seen.append(live)
    shown = "; ".join("{" + ", ".join(c) + "}" for c in seen[:3])
    where = (
        f"the narrowest cross {narrowest}: {shown}"
        if seen
        else "the graph has no float tensor between its input and output"
    )
    raise OnnxSplitError(f"no single-tensor cut point: every cut crosses ≥ 2 tensors ({where})")


def split_graph(model: onnx.ModelProto, tensor: str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """``head`` (the graph's input -> ``tensor``) and ``tail`` (``tensor`` -> the graph's output),
    cut by :class:`onnx.utils.Extractor` and checked by onnx's checker."""
    cuts = require_cut_points(model)
    valid = ", ".join(c.name for c in cuts)
    lv = _liveness(model)
    inp, out = graph_input(model).name, model.graph.output[0].name
    if tensor in (inp, out):
        side = "head" if tensor == inp else "tail"
        raise OnnxSplitError(
            f"'{tensor}' is the graph's {'input' if side == 'head' else 'output'}: a cut there leaves an empty {side}; valid cut points: {valid}"
        )
    if tensor not in lv.producer:
        raise OnnxSplitError(f"no tensor '{tensor}' in the graph; valid cut points: {valid}")
    if tensor not in {c.name for c in cuts}:
        crossing = lv.live_after[lv.producer[tensor]]
        why = (
            "it is not float32"
            if crossing == [tensor]
            else f"crossing there: {', '.join(crossing) or 'nothing the output needs'}"
        )
        raise OnnxSplitError(f"'{tensor}' is not a single-tensor cut ({why}); valid cut points: {valid}")
    ex = _ScopedExtractor(model)
    head, tail = ex.extract_model([inp], [tensor]), ex.extract_model([tensor], [out])
    for name, half in (("head", head), ("tail", tail)):
        try:
            onnx.checker.check_model(half, full_check=True)
        except Exception as e:
            raise OnnxSplitError(f"the {name} cut at '{tensor}' is not a valid graph ({e})") from e
    return head, tail


# -- checks in ONNX Runtime ----------------------------------------------------------------------


def session(model: onnx.ModelProto, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run1(sess, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def verify_split(model: onnx.ModelProto, head: onnx.ModelProto, tail: onnx.ModelProto, x: np.ndarray) -> dict:
    """Run the whole graph and head-then-tail in ONNX Runtime on the frames ``x`` (the graph's own
    input layout): max abs difference and, for scores, top-1 agreement."""
    ref = run1(session(model), x)
    got = run1(session(tail), run1(session(head), x))
    rec = {"frames": int(len(x)), "max_abs_diff": float(np.max(np.abs(got - ref)))}
    if ref.ndim == 2:
        rec["top1_agreement"] = float(np.mean(got.argmax(1) == ref.argmax(1)))
    return rec
