"""``edgesplit eval`` of a U-shaped bundle (SFPrompt; docs/BUNDLE.md §7.3, PROTOCOL.md §15.6): each
token mode measured the way serving runs it, in ONNX Runtime: the head on the device; its tokens
encoded in the mode's dtype frame by frame exactly as the agent sends them (8-bit codes with each
frame's own scale) and decoded as the daemon decodes them; the body, as the server runs it; its
output encoded frame by frame in the mode's answer encoding as the daemon answers (PROTOCOL.md
§15.6.1: float32, float16 or 8-bit codes with each result's own scale) and decoded as the agent
decodes it; the tail on the device.

Per mode: accuracy, the bytes up (the coded tokens' payload) and the bytes down (the body's
output's payload). The keys are those of a head-tail bundle's modes where they mean the same
(``bytes_per_frame`` is the bytes up), plus ``dtype``, ``tokens``, ``answer`` (the dtype of the body's
output coming back) and ``bytes_down_per_frame``;
there is no ``channels`` (every token row is sent) and no zstd figure (tokens travel raw).

No torch: this runs wherever the agent runs.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from ..bundle import Bundle
from ..bundle_schema import U_SHAPED
from ..data.sources import Sample
from ..data.transforms import preprocess
from ..engine import Engine
from ..wire import split_train as S

ROLES = ("head", "body", "tail")  # the graphs one served frame runs, device -> server -> device
RESULT_NAME = S.REPLY_NAMES[S.TRAIN_FWD]  # "body_out": the daemon's answer (PROTOCOL.md §15.6)


def _batches(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def sent_tokens(tokens: np.ndarray, bits: int, name: str) -> tuple[np.ndarray, list[int]]:
    """The head's tokens ``[n, T, D]`` as the server decodes them at ``bits``, and each frame's
    payload size: one request per frame, as the agent sends them (an 8-bit frame carries the scale
    of its own range, so frames are never coded together)."""
    decoded = np.empty_like(tokens, dtype=np.float32)
    sizes = []
    for i, frame in enumerate(tokens):
        desc, payload = S.encode(frame, bits, name)
        sizes.append(len(payload))
        decoded[i] = S.decode(desc, payload)
    return decoded, sizes


def answered_body_output(body_out: np.ndarray, bits: int = 32) -> tuple[np.ndarray, list[int]]:
    """The body's output ``[n, T, D]`` as the agent reads each frame's result in an answer encoding
    of ``bits`` (32: float32, 16: float16, 8: codes with that result's own scale; one result per
    frame, as the daemon answers the agent's one-frame requests), and each result's payload size."""
    received = np.empty_like(body_out, dtype=np.float32)
    sizes = []
    for i, frame in enumerate(body_out):
        desc, payload = S.encode(frame, bits, RESULT_NAME)
        sizes.append(len(payload))
        received[i] = S.decode(desc, payload)
    return received, sizes


def u_shaped_accuracy(bundle: Bundle, engines: dict[str, Engine], samples: list[Sample], batch: int = 64) -> dict:
    """Per-mode accuracy and bytes each way of ``bundle`` (U-shaped) on ``samples``; ``engines``: its
    ``head``, ``body`` and ``tail`` by role."""
    if bundle.serving != U_SHAPED:
        raise ValueError(f"bundle '{bundle.name}' is served {bundle.serving}, not U-shaped")
    name = bundle.wire_spec["name"]
    tokens_shape = [int(s) for s in bundle.wire_spec["shape"]]
    per_mode: dict[int, dict] = {m.id: {"correct": 0, "up": [], "down": []} for m in bundle.modes}
    for chunk in _batches(samples, batch):
        x = np.stack([preprocess(s.data, bundle.input_spec) for s in chunk])
        y = np.asarray([s.label for s in chunk])
        tokens = engines["head"].run1(x)
        for m in bundle.modes:
            r = per_mode[m.id]
            sent, up = sent_tokens(tokens, m.bits, name)
            received, down = answered_body_output(engines["body"].run1(sent), int(m.answer_bits or 32))
            r["up"] += up
            r["down"] += down
            r["correct"] += int((engines["tail"].run1(received).argmax(1) == y).sum())
    out = []
    for m in bundle.modes:
        r = per_mode[m.id]
        up_sizes = np.asarray(r["up"], dtype=np.float64)
        out.append(
            {
                "id": m.id,
                "name": m.name,
                "codec": m.codec,
                "dtype": m.dtype,
                "bits": m.bits,
                "tokens": tokens_shape,
                "answer": m.answer_dtype,
                "step": None,
                "accuracy": r["correct"] / max(1, len(samples)),
                "bytes_per_frame": float(np.median(up_sizes)),  # every frame of a mode the same size
                "bytes_p95": float(np.percentile(up_sizes, 95)),
                "bits_per_frame": float(8 * up_sizes.mean()),
                "bytes_per_frame_zstd": None,
                "bytes_down_per_frame": float(np.median(r["down"])),
            }
        )
    return {"modes": out}


def describe_mode(m: dict) -> str:
    """One mode's line of ``edgesplit eval``'s text output."""
    return (
        f"  mode {m['name']:<8} accuracy {m['accuracy']:.4f}  {m['dtype']} tokens {m['tokens']}  "
        f"bytes/frame up {m['bytes_per_frame']:.0f}, down {m['bytes_down_per_frame']:.0f} ({m['answer']})"
    )
