"""Real bundles for the over-the-air update tests: the tiny test bundle (tests/conftest.py) as the
old bundle A, renamed copies as new bundles (each a different bundle hash), signed with a real
Ed25519 key, and the broken ones each fault needs:

- ``B``: a good new bundle; ``B_other_key``: the same signed by another key;
- ``B_tampered.tar.gz``: B's archive with its head altered after signing (the manifest and the
  signature untouched, so the hashes no longer match the manifest);
- ``B_nan``: a head that outputs NaN (Div by zero appended in ONNX), fails the warm-up;
- ``B_failtail``: a tail that runs on zeros (the server's warm-up) but fails at run time on real
  tensors (a Gather index computed from the input, out of range), so the server answers INTERNAL.

Also the process helpers: the agent command line with updates on, its JSON logs and JSON lines.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from edgesplit.bundle import MANIFEST, Bundle, write_manifest
from edgesplit.bundle_sign import generate_keys, load_private, sign_bundle
from edgesplit.server.ota import pack_bundle


@dataclass
class OtaWorld:
    root: Path
    pub: Path  # the pinned publisher key
    a: Bundle
    b: Bundle
    b_other_key: Path
    b_tampered_tar: Path
    b_nan: Bundle
    b_failtail: Bundle


def _rename(d: Path, name: str) -> None:
    """A new bundle identity (name, so hash) for the files in ``d``, their hashes recomputed."""
    m = json.loads((d / MANIFEST).read_text())
    m["name"] = name
    write_manifest(d, m)
    (d / (MANIFEST + ".sig")).unlink(missing_ok=True)


def _nan_head(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(path))
    out = m.graph.output[0]
    raw = out.name + "_raw"
    for node in m.graph.node:
        node.output[:] = [raw if o == out.name else o for o in node.output]
    m.graph.initializer.append(helper.make_tensor("zero_div", TensorProto.FLOAT, [], [0.0]))
    m.graph.node.append(helper.make_node("Div", [raw, "zero_div"], [out.name]))
    onnx.save(m, str(path))


def _failing_tail(path: Path) -> None:
    """logits + 0 * Gather(table[10], int(max(z) * 1000)): fine on zeros, out of range on real tensors."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(path))
    inp, out = m.graph.input[0].name, m.graph.output[0].name
    raw = out + "_raw"
    for node in m.graph.node:
        node.output[:] = [raw if o == out else o for o in node.output]
    m.graph.initializer.extend(
        [
            helper.make_tensor("fail_table", TensorProto.FLOAT, [10], [0.0] * 10),
            helper.make_tensor("fail_gain", TensorProto.FLOAT, [], [1000.0]),
        ]
    )
    m.graph.node.extend(
        [
            helper.make_node("ReduceMax", [inp], ["fail_max"], keepdims=0),
            helper.make_node("Mul", ["fail_max", "fail_gain"], ["fail_scaled"]),
            helper.make_node("Cast", ["fail_scaled"], ["fail_index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["fail_table", "fail_index"], ["fail_value"], axis=0),
            helper.make_node("Mul", ["fail_value", "fail_table"], ["fail_zeros"]),  # [10] zeros
            helper.make_node("Add", [raw, "fail_zeros"], [out]),
        ]
    )
    onnx.save(m, str(path))


def build_world(root: Path, tiny: Bundle) -> OtaWorld:
    root.mkdir(parents=True, exist_ok=True)
    priv, pub = generate_keys(root / "keys")
    other, _ = generate_keys(root / "keys", "other")
    key, other_key = load_private(priv), load_private(other)

    def signed(name: str, edit=None, by=key) -> Bundle:
        d = root / name
        shutil.copytree(tiny.root, d)
        if edit is not None:
            edit(d)
        _rename(d, f"tiny-{name}")
        sign_bundle(d, by)
        return Bundle.load(d)

    a = signed("A")
    b = signed("B")
    b_other = signed("B_other_key", by=other_key).root
    b_nan = signed("B_nan", lambda d: _nan_head(d / "head.onnx"))
    b_failtail = signed("B_failtail", lambda d: _failing_tail(d / "tail.onnx"))
    # B's archive with the head altered after signing: manifest and signature are B's own
    tampered = root / "B_tampered"
    shutil.copytree(b.root, tampered)
    head = tampered / "head.onnx"
    data = bytearray(head.read_bytes())
    data[-8] ^= 0xFF
    head.write_bytes(bytes(data))
    tar = root / "B_tampered.tar.gz"
    pack_bundle(tampered, tar)
    return OtaWorld(root, pub, a, b, b_other, tar, b_nan, b_failtail)


def archive_size(bundle_dir: Path, tmp: Path) -> int:
    out = tmp / "size-probe.tar.gz"
    pack_bundle(bundle_dir, out)
    return out.stat().st_size


# -- the agent process ------------------------------------------------------------------------------


def agent_cmd(world: OtaWorld, endpoint: str, ota_dir: Path, out: Path, *extra: str, frames: int = 60, fps: float = 20):
    return [
        sys.executable,
        "-m",
        "edgesplit",
        "agent",
        "--bundle",
        str(world.a.root),
        "--server",
        endpoint,
        "--source",
        "cifar10:test",
        "--frames",
        str(frames),
        "--threads",
        "1",
        "--ota-group",
        "cams",
        "--ota-pubkey",
        str(world.pub),
        "--ota-dir",
        str(ota_dir),
        "--ota-health-frames",
        "8",
        "--log-format",
        "json",
        "--json-lines",
        str(out),
        *(["--fps", str(fps)] if fps else []),
        *extra,
    ]


def run_agent(cmd: list[str], log: Path, timeout: float = 120) -> int:
    with open(log, "w") as err:
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, timeout=timeout).returncode


def start_agent(cmd: list[str], log: Path) -> subprocess.Popen:
    err = open(log, "w")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)


def events(log: Path) -> list[dict]:
    """The agent's JSON log records (a line cut by kill -9 is skipped)."""
    out = []
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def named(log: Path, event: str) -> list[dict]:
    return [r for r in events(log) if r.get("event") == event]


def wait_for(cond, timeout: float = 60.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def results(out: Path) -> tuple[list[dict], dict | None]:
    """Per-frame lines and the summary (None when the run was killed)."""
    frames, summary = [], None
    for line in out.read_text().splitlines() if out.exists() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "summary" in rec:
            summary = rec["summary"]
        else:
            frames.append(rec)
    return frames, summary


def tar_names(path: Path) -> list[str]:
    with tarfile.open(path) as t:
        return t.getnames()


def tar_with(members: dict[str, bytes | None], path: Path, *, symlink: str | None = None) -> Path:
    """A tar.gz of the given members (a None value: a directory); ``symlink``: one link member."""
    with tarfile.open(path, "w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        if symlink is not None:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            t.addfile(info)
    return path
