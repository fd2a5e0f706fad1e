"""``edgesplit bench ota``: a fleet update over a kernel-shaped link (PROTOCOL.md §14).

One server and ``--agents`` agent processes in one network namespace whose loopback goes through
``tc tbf`` at ``--mbps`` (:class:`~edgesplit.control.netns.ShapedNamespace`): the agents share the
link as the cameras behind one cellular cell or one site uplink do. Every agent streams real
CIFAR-10 frames at ``--fps`` on the old bundle A while the server offers group ``fleet`` the new
signed bundle B (copies of ``--bundle`` under new names, signed with a key made for the run).

Measured: from the first agent accepting the offer, the time until every agent has switched and
until every agent has committed B (its health check passed); per agent the download time; the
bytes the qdisc carried (both directions, everything: chunks, frames, results, TCP) and the chunk
bytes the agents accepted; and the inference traffic meanwhile (frames, errors, local answers,
round trips), since chunks share each agent's connection with its frames.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from ..control.netns import ShapedNamespace, shaping_available

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUNDLE = ROOT / "models" / "cifar10-resnet20-bottlefit"
PORT = 5600  # inside the namespace: nothing else listens there


def add_arguments(p) -> None:
    p.add_argument("--agents", type=int, default=20, help="agent processes sharing the link")
    p.add_argument("--mbps", type=float, default=1.0, help="the shared link's rate (tbf), Mbit/s")
    p.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="the bundle the old and new bundles are copies of")
    p.add_argument("--fps", type=float, default=1.0, help="frames per second each agent streams meanwhile")
    p.add_argument("--chunk-bytes", type=int, default=16384, help="the agents' --ota-chunk-bytes")
    p.add_argument("--ota-kbps", type=float, default=None, help="the agents' --ota-kbps (unset: no pace)")
    p.add_argument("--server-ota-kbps", type=float, default=None, help="the server's --ota-max-kbps (unset: no cap)")
    p.add_argument("--health-frames", type=int, default=5, help="the agents' --ota-health-frames")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="give up when the fleet has not committed by then")
    p.add_argument("--nice", type=int, default=None, help="run this process and its children at this niceness")


def _ts(rec: dict) -> float:
    return datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()


def _events(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "event" in rec:
            out.append(rec)
    return out


def _first(evs: list[dict], name: str) -> dict | None:
    return next((e for e in evs if e["event"] == name), None)


def _make_bundles(src: Path, tmp: Path) -> tuple[Path, Path, Path]:
    from ..bundle import MANIFEST, write_manifest
    from ..bundle_sign import generate_keys, load_private, sign_bundle

    priv, pub = generate_keys(tmp / "keys")
    out = []
    for name in ("old", "new"):
        d = tmp / name
        shutil.copytree(src, d)
        (d / (MANIFEST + ".sig")).unlink(missing_ok=True)
        m = json.loads((d / MANIFEST).read_text())
        m["name"] = f"{m['name']}-{name}"
        write_manifest(d, m)
        sign_bundle(d, load_private(priv))
        out.append(d)
    return out[0], out[1], pub


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))], 3)


def run(a) -> dict[str, Any]:
    ok, why = shaping_available()
    if not ok:
        raise SystemExit(f"edgesplit bench ota: needs kernel shaping: {why}")
    if a.agents < 1 or a.mbps <= 0:
        raise SystemExit("edgesplit bench ota: --agents >= 1 and --mbps > 0")
    os.environ["OMP_NUM_THREADS"] = "1"
    if a.nice:
        os.nice(int(a.nice))
    with tempfile.TemporaryDirectory(prefix="edgesplit-benchota-") as t:
        tmp = Path(t)
        old, new, pub = _make_bundles(Path(a.bundle), tmp)
        with ShapedNamespace(a.mbps) as ns:
            return _run(a, ns, tmp, old, new, pub)


def _run(a, ns: ShapedNamespace, tmp: Path, old: Path, new: Path, pub: Path) -> dict[str, Any]:
    endpoint = f"tcp://127.0.0.1:{PORT}"
    cmd = [sys.executable, "-m", "edgesplit", "serve", "--bind", endpoint, "--threads", "1"]
    cmd += ["--max-queue-delay-us", "0", "--log-level", "WARNING", "--bundle", str(old)]
    cmd += ["--ota-group", f"fleet={new}", "--ota-cache-dir", str(tmp / "cache")]
    if a.server_ota_kbps:
        cmd += ["--ota-max-kbps", str(a.server_ota_kbps)]
    with open(tmp / "server.log", "w") as log:
        server = ns.popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    assert server.stdout is not None
    for line in server.stdout:
        if "listening on " in line:
            threading.Thread(target=server.stdout.read, daemon=True).start()
            break
    else:
        raise SystemExit(f"edgesplit bench ota: the server did not start: {(tmp / 'server.log').read_text()[-2000:]}")
    archive = next((tmp / "cache").glob("*.tar.gz"))
    agents: list[subprocess.Popen] = []
    before = ns.stats()
    t_start = time.time()
    try:
        for i in range(a.agents):
            d = tmp / f"agent{i}"
            d.mkdir()
            acmd = [sys.executable, "-m", "edgesplit", "agent", "--bundle", str(old), "--server", endpoint]
            acmd += ["--source", "cifar10:test", "--frames", "0", "--fps", str(a.fps), "--threads", "1"]
            acmd += [
                "--name",
                f"agent{i}",
                "--ota-group",
                "fleet",
                "--ota-pubkey",
                str(pub),
                "--ota-dir",
                str(d / "ota"),
            ]
            acmd += ["--ota-chunk-bytes", str(a.chunk_bytes), "--ota-health-frames", str(a.health_frames)]
            acmd += ["--log-format", "json", "--json-lines", str(d / "out.jsonl"), "--timeout-s", "30"]
            if a.ota_kbps:
                acmd += ["--ota-kbps", str(a.ota_kbps)]
            with open(d / "agent.log", "w") as log:
                agents.append(ns.popen(acmd, stdout=subprocess.DEVNULL, stderr=log))
        deadline = time.monotonic() + a.timeout_s
        while time.monotonic() < deadline:
            done = sum(bool(_first(_events(tmp / f"agent{i}" / "agent.log"), "ota_committed")) for i in range(a.agents))
            refused = sum(
                bool(_first(_events(tmp / f"agent{i}" / "agent.log"), "ota_rejected")) for i in range(a.agents)
            )
            if done + refused == a.agents or any(p.poll() is not None for p in agents):
                break
            time.sleep(1.0)
        after = ns.stats()
    finally:
        for p in agents:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in agents:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    return _report(a, tmp, archive, before, after, t_start)


def _report(a, tmp: Path, archive: Path, before: dict, after: dict, t_start: float) -> dict[str, Any]:
    per: list[dict[str, Any]] = []
    rtts: list[float] = []
    frames = errors = local = 0
    for i in range(a.agents):
        d = tmp / f"agent{i}"
        evs = _events(d / "agent.log")
        rec = {k: _first(evs, k) for k in ("ota_download", "ota_downloaded", "ota_switched", "ota_committed")}
        row: dict[str, Any] = {"agent": i}
        for k, e in rec.items():
            row[k] = None if e is None else _ts(e)
        row["refused"] = [
            e["reason"] for e in evs if e["event"] in ("ota_rejected", "ota_rolled_back", "ota_abandoned")
        ]
        summary = None
        for line in (d / "out.jsonl").read_text().splitlines() if (d / "out.jsonl").exists() else []:
            r = json.loads(line)
            if "summary" in r:
                summary = r["summary"]
            else:
                frames += 1
                errors += r.get("error") is not None
                local += r.get("source") == "local"
                if r.get("rtt_ms") is not None:
                    rtts.append(r["rtt_ms"])
        row["bytes_received"] = (summary or {}).get("ota", {}).get("bytes_received")
        per.append(row)
    starts = [r["ota_download"] for r in per if r["ota_download"]]
    t0 = min(starts) if starts else t_start
    switched = [r["ota_switched"] - t0 for r in per if r["ota_switched"]]
    committed = [r["ota_committed"] - t0 for r in per if r["ota_committed"]]
    downloads = [r["ota_downloaded"] - r["ota_download"] for r in per if r["ota_downloaded"] and r["ota_download"]]
    size = archive.stat().st_size
    ideal = a.agents * size * 8 / (a.mbps * 1e6)
    return {
        "scenario": "ota",
        "agents": a.agents,
        "mbps": a.mbps,
        "fps_per_agent": a.fps,
        "chunk_bytes": a.chunk_bytes,
        "ota_kbps": a.ota_kbps,
        "server_ota_kbps": a.server_ota_kbps,
        "archive_bytes": size,
        "agents_switched": len(switched),
        "agents_committed": len(committed),
        "refusals": sum(len(r["refused"]) for r in per),
        "fleet_switch_s": round(max(switched), 2) if len(switched) == a.agents else None,
        "fleet_commit_s": round(max(committed), 2) if len(committed) == a.agents else None,
        "first_switch_s": round(min(switched), 2) if switched else None,
        "download_s_p50": _pct(downloads, 0.5),
        "download_s_max": _pct(downloads, 1.0),
        "ideal_s": round(ideal, 2),  # every archive byte once, at the link rate, nothing else on it
        "chunk_bytes_accepted": sum(r["bytes_received"] or 0 for r in per),
        "qdisc_bytes": after.get("bytes", 0) - before.get("bytes", 0),
        "qdisc_drops": after.get("dropped", 0) - before.get("dropped", 0),
        "frames": frames,
        "frame_errors": errors,
        "frames_local": local,
        "rtt_ms_p50": _pct(rtts, 0.5),
        "rtt_ms_p95": _pct(rtts, 0.95),
        "wall_s": round(time.time() - t_start, 1),
    }


def summarize(res: dict[str, Any]) -> str:
    return (
        f"ota: {res['agents']} agents on {res['mbps']} Mbit/s, archive {res['archive_bytes']} B: "
        f"fleet switched in {res['fleet_switch_s']} s, committed in {res['fleet_commit_s']} s "
        f"(every byte once at line rate: {res['ideal_s']} s); qdisc {res['qdisc_bytes']} B, chunks "
        f"{res['chunk_bytes_accepted']} B; {res['frames']} frames meanwhile, {res['frame_errors']} errors, "
        f"{res['frames_local']} local, rtt p50 {res['rtt_ms_p50']} ms p95 {res['rtt_ms_p95']} ms"
    )
