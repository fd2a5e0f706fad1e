"""A bundle's tail (and full model) as a Triton model repository (``edgesplit triton-export``).

For teams that already run Triton: each exported model is ``<model>/config.pbtxt`` plus
``<model>/1/model.onnx``, and the config mirrors the daemon's flags so that Triton schedules the
tail as ``edgesplit serve`` would:

==============================  ==============================================================
``edgesplit serve`` flag         Triton model config
==============================  ==============================================================
``--max-batch``                  ``max_batch_size``
``--preferred-batch-sizes``      ``dynamic_batching.preferred_batch_size``
``--max-queue-delay-us``         ``dynamic_batching.max_queue_delay_microseconds``
``--max-queue``                  ``dynamic_batching.default_queue_policy.max_queue_size``
``--device``                     ``instance_group`` kind (``cpu``: KIND_CPU; ``cuda[:N]``: KIND_GPU, gpus)
(one compute thread)             ``instance_group.count`` (``--instances``, default 1)
``--threads``                    onnxruntime backend parameter ``intra_op_thread_count``
``--precision fp16`` (cuda)      onnxruntime backend's TensorRT accelerator, ``precision_mode FP16``
==============================  ==============================================================

Inputs and outputs (names, dtypes, dims without the batch axis) are read from the ONNX graph. The
parameters ``edgesplit_bundle`` (bundle hash), ``edgesplit_role`` and ``edgesplit_sha256`` (the
ONNX file's hash) let a gateway (``edgesplit serve --backend triton``) check that Triton serves the
very bundle its agents were welcomed with, as agents and the daemon agree on it by hash.

``runtime="python"`` writes the same model for Triton's python backend instead (``model.py`` runs
``model.onnx`` with ONNX Runtime): for Triton builds without the onnxruntime backend, such as the
CPU-capable server inside PyTriton's wheel, which the tests run.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..bundle import Bundle, BundleError
from ..engine import EngineError, create_engine

ROLES = ("tail", "full")
RUNTIMES = ("onnxruntime", "python")
# numpy dtype name -> Triton's DataType (model_config.proto)
TRITON_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "float64": "TYPE_FP64",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}
PARAM_BUNDLE, PARAM_ROLE, PARAM_SHA = "edgesplit_bundle", "edgesplit_role", "edgesplit_sha256"
_DEVICE = re.compile(r"^(cpu|cuda(:(\d+))?)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class TritonSettings:
    """The scheduling half of a model config, with ``edgesplit serve``'s defaults."""

    max_batch: int = 32
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: float = 2000.0
    max_queue: int = 1024
    device: str | None = None  # None / "cpu": KIND_CPU; "cuda" or "cuda:N": KIND_GPU
    instances: int = 1
    threads: int | None = None
    precision: str = "fp32"
    runtime: str = "onnxruntime"

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.instances < 1 or self.max_queue_delay_us < 0:
            raise ValueError("max_batch, max_queue and instances must be >= 1, max_queue_delay_us >= 0")
        bad = [p for p in self.preferred_batch_sizes if not 1 <= p <= self.max_batch]
        if bad:
            raise ValueError(f"preferred batch sizes must lie in 1..max_batch ({self.max_batch}), got {bad}")
        if self.device is not None and not _DEVICE.match(self.device):
            raise ValueError(f"unknown device '{self.device}' (expected cpu, cuda or cuda:N)")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime '{self.runtime}' (known: {', '.join(RUNTIMES)})")
        if self.precision not in ("fp32", "fp16"):
            raise ValueError(f"precision '{self.precision}': a Triton export takes fp32 or fp16")
        if self.precision == "fp16" and (not self.on_gpu or self.runtime != "onnxruntime"):
            raise ValueError("--precision fp16 needs --device cuda and the onnxruntime runtime (TensorRT accelerator)")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")

    @property
    def on_gpu(self) -> bool:
        return self.device is not None and self.device.startswith("cuda")


def model_name(bundle: Bundle, role: str, prefix: str | None = None) -> str:
    """The Triton model name of a bundle's ``role`` file: ``<prefix or bundle name>-<role>``."""
    name = f"{prefix or bundle.name}-{role}"
    if not _NAME.match(name):
        raise ValueError(f"'{name}' is not a usable Triton model name (letters, digits, '_', '.', '-')")
    return name


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensors(field: str, specs) -> list[str]:
    out = [f"{field} ["]
    for i, t in enumerate(specs):
        if t.dtype not in TRITON_TYPES:
            raise BundleError(f"{field} '{t.name}' has dtype {t.dtype}, which this export does not map to Triton")
        if not t.shape or isinstance(t.shape[0], int):
            raise BundleError(
                f"{field} '{t.name}' has shape {list(t.shape)}: Triton batching needs a dynamic batch axis"
            )
        dims = list(t.shape[1:])
        if any(not isinstance(d, int) or d < 1 for d in dims):
            raise BundleError(f"{field} '{t.name}' has shape {list(t.shape)}: only the batch axis may be dynamic")
        out += [
            "  {",
            f"    name: {_quote(t.name)}",
            f"    data_type: {TRITON_TYPES[t.dtype]}",
            f"    dims: [ {', '.join(str(d) for d in dims)} ]",
            "  }" + ("," if i < len(specs) - 1 else ""),
        ]
    return out + ["]"]


def config_text(name: str, inputs, outputs, s: TritonSettings, params: dict[str, str]) -> str:
    """config.pbtxt (protobuf text format of Triton's ``inference.ModelConfig``)."""
    lines = [f"name: {_quote(name)}", f"backend: {_quote(s.runtime)}", f"max_batch_size: {s.max_batch}"]
    lines += _tensors("input", inputs) + _tensors("output", outputs)
    lines.append("dynamic_batching {")
    if s.preferred_batch_sizes:
        lines.append(f"  preferred_batch_size: [ {', '.join(str(p) for p in sorted(set(s.preferred_batch_sizes)))} ]")
    lines += [
        f"  max_queue_delay_microseconds: {int(round(s.max_queue_delay_us))}",
        "  default_queue_policy {",
        f"    max_queue_size: {s.max_queue}",
        "  }",
        "}",
        "instance_group [",
        "  {",
        f"    count: {s.instances}",
        f"    kind: {'KIND_GPU' if s.on_gpu else 'KIND_CPU'}",
    ]
    m = _DEVICE.match(s.device or "cpu")
    if s.on_gpu and m is not None and m.group(3) is not None:
        lines.append(f"    gpus: [ {m.group(3)} ]")
    lines += ["  }", "]"]
    if s.precision == "fp16":
        lines += [
            "optimization {",
            "  execution_accelerators {",
            "    gpu_execution_accelerator: [",
            "      {",
            '        name: "tensorrt"',
            '        parameters { key: "precision_mode" value: "FP16" }',
            "      }",
            "    ]",
            "  }",
            "}",
        ]
    if s.threads is not None and s.runtime == "onnxruntime":
        params = dict(params, intra_op_thread_count=str(s.threads))
    for k, v in params.items():
        lines += ["parameters {", f"  key: {_quote(k)}", f"  value {{ string_value: {_quote(v)} }}", "}"]
    return "\n".join(lines) + "\n"


def export_triton(
    bundle: Bundle | str | Path,
    out: str | Path,
    settings: TritonSettings | None = None,
    roles: Sequence[str] = ROLES,
    prefix: str | None = None,
) -> dict[str, Path]:
    """Write ``roles`` of ``bundle`` (``tail``; ``full`` where the bundle has it) into the model
    repository ``out`` (created; models already there are replaced). Returns model name -> folder."""
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    s = settings or TritonSettings()
    if b.serving != "head-tail":
        raise BundleError(
            f"bundle '{b.name}' ({b.family}) serves a fusion head; only head-tail bundles export to Triton"
        )
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown role(s) {', '.join(unknown)} (known: {', '.join(ROLES)})")
    if "tail" in roles and not b.has("tail"):
        raise BundleError(f"bundle '{b.name}' has no tail file")
    repo = Path(out)
    repo.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for role in roles:
        if not b.has(role):
            continue  # a bundle without full.onnx exports its tail alone
        src = b.file(role)
        engine = create_engine(src, "ort", threads=1)  # only to read the graph's inputs and outputs
        try:
            inputs, outputs = engine.inputs, engine.outputs
        finally:
            engine.close()
        name = model_name(b, role, prefix)
        params = {PARAM_BUNDLE: b.hash, PARAM_ROLE: role, PARAM_SHA: b.manifest["files"][role]["sha256"]}
        text = config_text(name, inputs, outputs, s, params)
        folder = repo / name
        if folder.exists():
            shutil.rmtree(folder)
        (folder / "1").mkdir(parents=True)
        shutil.copyfile(src, folder / "1" / "model.onnx")
        if s.runtime == "python":
            shutil.copyfile(Path(__file__).with_name("triton_python_model.py"), folder / "1" / "model.py")
        (folder / "config.pbtxt").write_text(text)
        written[name] = folder
    return written


def triton_export_main(argv: list[str] | None = None) -> int:
    """``edgesplit triton-export BUNDLE --out DIR``: the scheduling flags take ``edgesplit serve``'s
    names and defaults (read from its parser, so the two cannot drift apart)."""
    import argparse
    import json
    import sys

    from .cli import build_parser as serve_parser

    p = argparse.ArgumentParser(
        prog="edgesplit triton-export",
        description="Write a bundle's tail (and full model) as a Triton model repository: <model>/config.pbtxt "
        "+ <model>/1/model.onnx, with dynamic batching, queue and instances mirroring 'edgesplit serve' flags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("bundle", help="bundle directory or tar")
    p.add_argument(
        "--out", required=True, metavar="DIR", help="model repository to write (created; its models replaced)"
    )
    p.add_argument("--models", default="tail,full", help="which of the bundle's files: tail, full (comma-separated)")
    p.add_argument("--prefix", default=None, help="model names are PREFIX-tail, PREFIX-full (unset: the bundle's name)")
    p.add_argument("--runtime", default="onnxruntime", choices=RUNTIMES, help="Triton backend running model.onnx")
    # serve's scheduling flags, by the same names and with its defaults
    serve = serve_parser().parse_args(["--bundle", "-"])
    p.add_argument("--max-batch", type=int, default=serve.max_batch, help="max_batch_size")
    p.add_argument(
        "--max-queue-delay-us", type=float, default=serve.max_queue_delay_us, help="max_queue_delay_microseconds"
    )
    p.add_argument("--max-queue", type=int, default=serve.max_queue, help="default_queue_policy.max_queue_size")
    p.add_argument("--preferred-batch-sizes", default="", metavar="N,N,...", help="preferred_batch_size")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra_op_thread_count (unset: its own)")
    p.add_argument("--device", default=None, help="cpu (KIND_CPU), cuda or cuda:N (KIND_GPU)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"), help="fp16: TensorRT accelerator (cuda)")
    p.add_argument("--instances", type=int, default=1, help="instance_group count (the daemon runs one compute thread)")
    a = p.parse_args(argv)
    try:
        s = TritonSettings(
            max_batch=a.max_batch,
            preferred_batch_sizes=tuple(int(v) for v in a.preferred_batch_sizes.split(",") if v.strip()),
            max_queue_delay_us=a.max_queue_delay_us,
            max_queue=a.max_queue,
            device=a.device,
            instances=a.instances,
            threads=a.threads,
            precision=a.precision,
            runtime=a.runtime,
        )
        written = export_triton(a.bundle, a.out, s, [r.strip() for r in a.models.split(",") if r.strip()], a.prefix)
    except (ValueError, BundleError, EngineError, OSError) as e:
        print(f"edgesplit triton-export: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"repository": str(Path(a.out)), "models": {k: str(v) for k, v in written.items()}}, indent=2))
    return 0
