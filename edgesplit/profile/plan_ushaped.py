"""The planner's options for a U-shaped bundle (SFPrompt, BUNDLE.md §7.3): one ``u-shaped`` option
per mode, and ``local`` (full.onnx on the device).

A U-shaped frame runs the head on the device, sends the tokens in the mode's dtype, the server
decodes them, runs the body and encodes its output in the mode's answer dtype, and the device
decodes the answer and runs the tail (PROTOCOL.md §15.6). Every step is timed here on real frames,
as :func:`.plan_inputs.bundle_options` times a head-tail bundle's, and every request and reply is
sized as the agent and the daemon build them: a U-shaped request is always the full form (its
8-bit codes carry their own scale), so its header holds the tensor descriptor.

There is no ``raw`` option: sending the frame to the server would hand it the labels and logits a
U-shaped bundle keeps on the device (the reason to serve it U-shaped), and its server holds the
body only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..control.planner import Option
from .plan_inputs import (
    HOST_PROFILE,
    Timing,
    bundle_frames,
    cycle_frames,
    elementwise_work,
    full_options,
    graph_work,
    result_bytes,
    time_chain,
)


def u_shaped_sizes(mode, token_desc: dict, answer_desc: dict, answer_payload: bytes) -> tuple[int, int]:
    """``(request header bytes, reply bytes)`` of one U-shaped frame in ``mode``: the full request
    header (with the token descriptor) and the result with the answer (:func:`.plan_inputs.result_bytes`)."""
    from ..wire import protocol as P

    header = len(P.pack_header(P.request(1000, mode.id, [token_desc])))
    return header, result_bytes(answer_desc, answer_payload)


def ushaped_options(
    bundle_path: str | Path,
    *,
    timing: Timing | None = None,
    source: str | None = None,
    frames: int = 16,
    host: str = HOST_PROFILE,
) -> tuple[list[Option], dict[str, Any]]:
    """Every mode of a U-shaped bundle as an option, plus ``local``: per mode the device chain
    (JPEG decode + preprocess, head, token encode), the server chain (token decode, body, answer
    encode) and the device's finish (answer decode, tail), each timed on real frames."""
    from ..bundle import Bundle
    from ..data.transforms import preprocess
    from ..engine import create_engine
    from ..wire import split_train as S

    timing = timing or Timing()
    bundle = Bundle.load(bundle_path)
    jpegs, x, src = bundle_frames(bundle, source, frames)
    spec, wire = bundle.input_spec, bundle.wire_spec["name"]
    result_name = bundle.wire_spec.get("result", {}).get("name", "body_out")
    head_e, body_e, tail_e = (create_engine(bundle.file(r), "ort", threads=1) for r in ("head", "body", "tail"))
    tokens = head_e.run1(x[:1])
    body_out = body_e.run1(tokens)
    logits = tail_e.run1(body_out)
    n = int(tokens[0].size)
    what = f"real frames, {timing.describe()}"
    options = []
    for m in bundle.modes:
        bits, answer_bits = int(m.bits), int(m.answer_bits or 32)
        desc, payload = S.encode(tokens[0], bits, wire)
        answer_desc, answer_payload = S.encode(body_out[0], answer_bits, result_name)
        frames_it = cycle_frames(jpegs)
        pre_ms, head_ms, enc_ms = time_chain(
            [
                lambda _, it=frames_it: preprocess(next(it), spec)[None],
                head_e.run1,
                lambda z, bits=bits: S.encode(z[0], bits, wire),
            ],
            timing,
        )
        dec_ms, body_ms, ans_enc_ms = time_chain(
            [
                lambda _, d=desc, p=payload: S.decode(d, p)[None],
                body_e.run1,
                lambda b, bits=answer_bits: S.encode(b[0], bits, result_name),
            ],
            timing,
        )
        ans_dec_ms, tail_ms = time_chain(
            [lambda _, d=answer_desc, p=answer_payload: S.decode(d, p)[None], tail_e.run1], timing
        )
        header, reply = u_shaped_sizes(m, desc, answer_desc, answer_payload)
        options.append(
            Option(
                m.name,
                "u-shaped",
                payload_bytes=len(payload),
                header_bytes=header,
                reply_bytes=reply,
                preprocess=elementwise_work(pre_ms, int(x[0].size), f"JPEG decode + resize + normalise, {what}", host),
                head=graph_work(bundle.file("head"), head_ms, timing, host),
                encode=elementwise_work(enc_ms, n, f"token encode ({m.dtype}), {what}", host),
                decode=elementwise_work(dec_ms, n, f"token decode ({m.dtype}), {what}", host),
                tail=graph_work(bundle.file("body"), body_ms, timing, host),
                answer_encode=elementwise_work(ans_enc_ms, n, f"answer encode ({m.answer_dtype}), {what}", host),
                answer_decode=elementwise_work(ans_dec_ms, n, f"answer decode ({m.answer_dtype}), {what}", host),
                device_tail=graph_work(bundle.file("tail"), tail_ms, timing, host),
                accuracy=m.accuracy,
                detail={
                    "mode": m.id,
                    "dtype": m.dtype,
                    "answer_dtype": m.answer_dtype,
                    "tokens": list(tokens.shape[1:]),
                    "reply_payload_bytes": len(answer_payload),
                },
            )
        )
    local = [
        o
        for o in full_options(
            bundle.file("full"), jpegs, spec, logits, bundle, timing, host, bundle.manifest.get("teacher_accuracy")
        )
        if o.kind == "local"
    ]
    meta = {
        "bundle": bundle.name,
        "path": str(bundle_path),
        "serving": "u-shaped",
        "source": src,
        "frames": len(jpegs),
        "jpeg_bytes_median": float(np.median([len(j) for j in jpegs])),
    }
    return options + local, meta
