"""The tiny U-shaped bundle that tests/test_ushaped.py serves and tests/test_ushaped_eval.py evaluates
and inspects, and what they check answers against: a tiny SFPrompt student cut from the tiny
recipe's ViT, tuned here for a few SFPrompt steps on a real CIFAR-10 slice and exported by the
family's exporter (ONNX graphs checked against torch, each mode's accuracy measured on the first
``FRAMES`` frames of cifar10:test); those frames; and the offline runs of the bundle's graphs.

    from ushaped_fixtures import FRAMES, bundle, full_logits, offline_logits, samples  # noqa: F401

``HandClient`` is the one DEALER that speaks the protocol by hand in these tests: what a client in
another language would send and read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
from build_fixtures import require_cifar, torch_threads

from edgesplit.bundle import Bundle
from edgesplit.data.sources import open_source, take
from edgesplit.data.transforms import preprocess
from edgesplit.engine import create_engine
from edgesplit.wire import protocol as P
from edgesplit.wire import split_train as S

RECIPE = str(Path(__file__).resolve().parent / "recipes" / "tiny-sfprompt.yaml")
FRAMES = 32  # the export's check frames and the frames served: the first of cifar10:test

_BUILT: dict[Path, Bundle] = {}


def build_u_shaped_bundle(d: Path) -> Bundle:
    """Tune the tiny student (one client round: local-loss update and split training through the
    frozen body) and export it as a U-shaped bundle to ``d / "bundle"`` (the student at ``d /
    "student.pt"``, the body package beside the bundle)."""
    require_cifar()
    from edgesplit.builder.data import load_split
    from edgesplit.builder.export_common import ExportOptions
    from edgesplit.builder.recipe import load_recipe
    from edgesplit.families.sfprompt.bundle_export import export_bundle
    from edgesplit.families.sfprompt.model import build_model, save_student
    from edgesplit.families.sfprompt.train import LocalBody, client_round

    r = load_recipe(RECIPE)
    torch.manual_seed(0)
    model = build_model(r)
    x, y = load_split("cifar10", "train", 32, limit_per_shard=32)
    stage = {"epochs": 2, "lr": 3e-3, "batch": 16, "optimizer": "adam", "weight_decay": 0.0, "warmup_epochs": 0.0}
    client_round(
        model,
        x,
        y,
        LocalBody(model.body),
        stage,
        {**stage, "epochs": 1},
        gamma=1.0,
        local_loss=True,
        augment=None,
        seed=0,
    )
    save_student(model, d / "student.pt", {"recipe": r.to_dict(), "results": {"eval_frames": 0}})
    return export_bundle(d / "student.pt", d / "bundle", ExportOptions(check_frames=FRAMES))


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Bundle:
    """The tiny U-shaped bundle, built once per test session whichever modules use it (each
    importing module registers its own copy of a fixture, so the build is memoised here)."""
    key = tmp_path_factory.getbasetemp()
    if key not in _BUILT:
        with torch_threads(1):  # a session fixture is set up before a module's one_torch_thread
            _BUILT[key] = build_u_shaped_bundle(tmp_path_factory.mktemp("ushaped"))
    return _BUILT[key]


@pytest.fixture(scope="session")
def samples():
    return list(take(open_source("cifar10:test"), FRAMES))


def offline_logits(b: Bundle, mode_id: int, samples) -> np.ndarray:
    """What the server path must give: the bundle's head, the mode's codec (per frame, as the agent
    encodes), the body, the mode's answer encoding (per frame, as the daemon answers: PROTOCOL.md
    §15.6.1) and the tail, in ONNX Runtime here."""
    head, body, tail = (create_engine(b.file(r), threads=1) for r in ("head", "body", "tail"))
    m = b.mode(mode_id)
    out = []
    for s in samples:
        z = head.run1(preprocess(s.data, b.input_spec)[None])[0]
        answered = S.roundtrip(body.run1(S.roundtrip(z, m.bits)[None]), int(m.answer_bits or 32))
        out.append(tail.run1(answered)[0])
    return np.stack(out)


def full_logits(b: Bundle, samples) -> np.ndarray:
    full = create_engine(b.file("full"), threads=1)
    return np.stack([full.run1(preprocess(s.data, b.input_spec)[None])[0] for s in samples])


class HandClient:
    """One DEALER speaking the protocol by hand; each reply header keeps its raw length in
    ``_header_bytes``. ``serving`` given: says hello at once and keeps the answer in ``welcome``."""

    def __init__(self, endpoint: str, bundle_hash: str | None = None, serving: str | None = None):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.RCVTIMEO, 10_000)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.rid = 0
        self.welcome = self.hello(bundle_hash, serving) if bundle_hash is not None else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.sock.close()

    def recv(self) -> tuple[dict, list]:
        while True:
            parts = self.sock.recv_multipart()
            h = P.unpack_header(parts[0])
            if h["kind"] != "ping":
                h["_header_bytes"] = len(parts[0])
                return h, parts[1:]

    def hello(self, bundle_hash: str, serving: str | None = None) -> dict:
        h = P.hello(bundle_hash, "hand-client")
        if serving is not None:
            h["serving"] = serving
        self.sock.send_multipart(P.pack(h))
        return self.recv()[0]

    def request(self, mode: int, desc: dict | None, payload: bytes) -> tuple[dict, list]:
        self.rid += 1
        self.sock.send_multipart([P.pack_header(P.request(self.rid, mode, None if desc is None else [desc])), payload])
        return self.recv()

    def request_tokens(self, mode: int, tokens: np.ndarray, bits: int) -> tuple[dict, list]:
        """A U-shaped request: ``tokens`` encoded at ``bits`` (§15.6)."""
        d, p = S.encode(tokens, bits, "tokens")
        return self.request(mode, d, p)
