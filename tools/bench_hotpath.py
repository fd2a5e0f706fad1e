#!/usr/bin/env python
"""Hot-path benchmark of the runtime's own per-frame overhead (no head, real server, real sockets).

Subcommands:

``client``  one client run against a running server; prints one JSON line of medians.
            ``--kind raw``: a minimal client (pyzmq + msgpack only, pre-quantized payload): what
            the *server* costs. ``--kind agent``: :class:`edgesplit.edge.agent.Agent` with
            ``load_head=False`` sending a fixed head output: what the agent path costs.
``ab``      A/B, interleaved: one server process per source tree (``--trees A B``), then rounds of
            short client runs alternating between the trees (order flipped every round), so both
            sides see the same background load. Prints per-tree medians over rounds.
``micro``   in-process micro-timings of codec/protocol functions (the tree on ``sys.path``).
``raw``     the bare pyzmq DEALER/ROUTER echo round trip (the unit of ``overhead_ratio``).

A tree is a directory holding an ``edgesplit`` package; child processes run with
``PYTHONPATH=<tree>`` from a neutral working directory so that tree, not the installed package,
is imported. Example (baseline = HEAD, candidate = the working tree)::

    mkdir -p /tmp/es-base && git archive HEAD edgesplit | tar -x -C /tmp/es-base
    python tools/bench_hotpath.py ab --trees /tmp/es-base . --bundle /tmp/bundle --rounds 6 --n 400
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

NEUTRAL_CWD = "/"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tree: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(tree).resolve())
    return env


def start_server(tree: str, bundle: str, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "edgesplit.server.daemon",
        "--bundle",
        str(Path(bundle).resolve()),
        "--bind",
        f"tcp://127.0.0.1:{port}",
        "--max-queue-delay-us",
        "0",
        "--threads",
        "1",
        "--log-level",
        "WARNING",
        *extra,
    ]
    p = subprocess.Popen(
        cmd, cwd=NEUTRAL_CWD, env=_env(tree), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = p.stdout.readline()
    if "listening" not in line:
        raise RuntimeError(f"server from {tree} did not start: {line} {p.stderr.read()[-2000:]}")
    return p


def _pct(a, q):
    a = sorted(a)
    return a[min(len(a) - 1, int(q / 100 * len(a)))] if a else None


# ---------------------------------------------------------------------------------------------
# clients


def _gap(gap_us: float) -> None:
    """Idle time between requests (as an agent busy with its head would leave): caches go cold
    and threads go to sleep, as in deployment; 0 measures back-to-back requests."""
    if gap_us > 0:
        time.sleep(gap_us / 1e6)


def client_raw(endpoint: str, bundle_dir: str, n: int, warmup: int, mode_id: int | None, gap_us: float = 0.0) -> dict:
    """Minimal client: hello, then one request at a time with a fixed pre-quantized payload."""
    import msgpack
    import numpy as np
    import zmq

    man_bytes = (Path(bundle_dir) / "manifest.json").read_bytes()
    import hashlib

    bhash = hashlib.sha256(man_bytes).hexdigest()
    man = json.loads(man_bytes)
    modes = {m["id"]: m for m in man["modes"]}
    mode = modes[mode_id if mode_id is not None else man["modes"][0]["id"]]
    C, h, w = man["wire"]["shape"]
    c, bits = mode["channels"], mode["bits"]
    nbytes = (c * h * w * bits + 7) // 8
    payload = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    if bits != 8:  # keep padding bits zero: any byte is a valid packed stream when n*bits % 8 == 0
        assert (c * h * w * bits) % 8 == 0
    payload = payload.tobytes()
    desc = {
        "name": man["wire"]["name"],
        "shape": [c, h, w],
        "dtype": "uint8",
        "bits": bits,
        "scale": float(mode["quant"]["scale"]),
        "zero_point": int(mode["quant"]["zero_point"]),
        "channels": c,
        "codec": "raw",
        "nbytes": nbytes,
    }
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    s.send(
        msgpack.packb(
            {
                "v": 1,
                "kind": "hello",
                "bundle": bhash,
                "agent": "bench",
                "caps": {"codecs": ["raw"], "bits": [2, 4, 6, 8], "max_inflight": 1},
            }
        )
    )
    welcome = msgpack.unpackb(s.recv())
    assert welcome["kind"] == "welcome", welcome
    rtt, server_us, queue_us, compute_us = [], [], [], []
    for i in range(warmup + n):
        _gap(gap_us)
        hdr = msgpack.packb(
            {
                "v": 1,
                "kind": "request",
                "id": i + 1,
                "mode": mode["id"],
                "t_send_ns": time.perf_counter_ns(),
                "tensors": [desc],
            }
        )
        t0 = time.perf_counter_ns()
        s.send_multipart([hdr, payload], copy=False)
        parts = s.recv_multipart()
        t1 = time.perf_counter_ns()
        r = msgpack.unpackb(parts[0])
        assert r["kind"] == "result" and r["id"] == i + 1, r
        if i >= warmup:
            rtt.append((t1 - t0) / 1e3)
            t = r["timing"]
            server_us.append(t["server_us"])
            queue_us.append(t["queue_us"])
            compute_us.append(t["compute_us"])
    s.send(msgpack.packb({"v": 1, "kind": "bye"}))
    s.close(100)
    med = statistics.median
    return {
        "kind": "raw",
        "n": n,
        "rtt_us_p50": med(rtt),
        "rtt_us_p95": _pct(rtt, 95),
        "server_us_p50": med(server_us),
        "queue_us_p50": med(queue_us),
        "compute_us_p50": med(compute_us),
        "outside_server_us_p50": med([a - b for a, b in zip(rtt, server_us)]),
    }


def client_agent(endpoint: str, bundle_dir: str, n: int, warmup: int, mode_id: int | None, gap_us: float = 0.0) -> dict:
    """The Agent's path without the head: encode a fixed head output, send, wait, decode."""
    import numpy as np

    from edgesplit.edge.agent import Agent

    agent = Agent(bundle_dir, endpoint, mode=mode_id, inflight=1, load_head=False, timeout_s=30).connect()
    C, h, w = agent.bundle.wire_spec["shape"]
    rng = np.random.default_rng(0)
    z = np.maximum(rng.standard_normal((C, h, w)).astype(np.float32), 0) * np.float32(agent.mode.scale * 60)
    call, rtt, enc, srv = [], [], [], []
    for i in range(warmup + n):
        _gap(gap_us)
        t0 = time.perf_counter_ns()
        rid = agent.send_tensor(z)
        r = agent.wait_for(rid)
        t1 = time.perf_counter_ns()
        assert r.ok, r
        if i >= warmup:
            call.append((t1 - t0) / 1e3)
            rtt.append(r.rtt_ms * 1e3)
            enc.append(r.encode_ms * 1e3)
            srv.append(r.server_ms * 1e3)
    agent.close()
    med = statistics.median
    return {
        "kind": "agent",
        "n": n,
        "call_us_p50": med(call),
        "call_us_p95": _pct(call, 95),
        "rtt_us_p50": med(rtt),
        "encode_us_p50": med(enc),
        "server_us_p50": med(srv),
        "agent_side_us_p50": med([a - b for a, b in zip(call, srv)]),
    }


def run_client(
    tree: str, endpoint: str, bundle: str, kind: str, n: int, warmup: int, mode: int | None, gap_us: float = 0.0
) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "client",
        "--endpoint",
        endpoint,
        "--bundle",
        str(Path(bundle).resolve()),
        "--kind",
        kind,
        "--n",
        str(n),
        "--warmup",
        str(warmup),
        "--gap-us",
        str(gap_us),
    ]
    if mode is not None:
        cmd += ["--mode", str(mode)]
    out = subprocess.run(cmd, cwd=NEUTRAL_CWD, env=_env(tree), capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"client failed on {tree}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# A/B


def ab(
    trees: list[str],
    bundle: str,
    kinds: list[str],
    rounds: int,
    n: int,
    warmup: int,
    mode: int | None,
    server_args: list[str],
    gap_us: float = 0.0,
) -> dict:
    servers, endpoints = [], []
    try:
        for t in trees:
            port = _free_port()
            servers.append(start_server(t, bundle, port, server_args))
            endpoints.append(f"tcp://127.0.0.1:{port}")
        labels = [f"{i}:{t}" for i, t in enumerate(trees)]
        res: dict = {lab: {k: [] for k in kinds} for lab in labels}
        for r in range(rounds):
            order = list(range(len(trees)))
            if r % 2:
                order.reverse()
            for k in kinds:
                for i in order:
                    res[labels[i]][k].append(run_client(trees[i], endpoints[i], bundle, k, n, warmup, mode, gap_us))
        summary = {}
        for lab in labels:
            summary[lab] = {}
            for k in kinds:
                runs = res[lab][k]
                summary[lab][k] = {
                    key: round(statistics.median(r[key] for r in runs), 1)
                    for key in runs[0]
                    if key not in ("kind", "n")
                }
        if len(labels) == 2:  # paired per round: robust to the background load drifting
            summary["paired_ratio_1_over_0"] = {
                k: {
                    key: round(
                        statistics.median(b[key] / a[key] for a, b in zip(res[labels[0]][k], res[labels[1]][k])), 3
                    )
                    for key in res[labels[0]][k][0]
                    if key.endswith("p50")
                }
                for k in kinds
            }
        return summary
    finally:
        for p in servers:
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


# ---------------------------------------------------------------------------------------------
# micro


def micro(bundle_dir: str, reps: int) -> dict:
    import numpy as np

    from edgesplit.bundle import Bundle
    from edgesplit.wire import codec
    from edgesplit.wire import protocol as P

    b = Bundle.load(bundle_dir)
    C, h, w = b.wire_spec["shape"]
    z = np.maximum(np.random.default_rng(0).standard_normal((C, h, w)).astype(np.float32), 0)
    out: dict = {}

    def t(name, fn):
        for _ in range(50):
            fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter_ns()
            fn()
            ts.append(time.perf_counter_ns() - t0)
        out[name] = round(statistics.median(ts) / 1e3, 2)

    for m in b.modes:
        d, p = codec.encode(z, m)
        tag = f"b{m.bits}c{m.channels}"
        t(f"encode_{tag}", lambda m=m: codec.encode(z, m))
        t(f"decode_{tag}", lambda d=d, p=p: codec.decode(d, p))
        dst = np.empty((C, h, w), np.float32)
        t(f"decode_into_{tag}", lambda d=d, p=p, dst=dst, c=m.channels: codec.decode(d, p, out=dst[:c], validate=False))
        t(f"check_descriptor_{tag}", lambda d=d, p=p: codec.check_descriptor(d, len(p)))
        hdr = P.request(7, m.id, [d], t_send_ns=123456789)
        parts = P.pack(hdr, [p])
        t(f"pack_request_{tag}", lambda hdr=hdr, p=p: P.pack(hdr, [p]))
        t(f"parse_request_{tag}", lambda parts=parts: P.parse(parts))
    logits = np.arange(10, dtype=np.float32)
    t("encode_float_logits", lambda: codec.encode_float(logits, name="logits"))
    rd, rp = codec.encode_float(logits, name="logits")
    res_parts = P.pack(P.result(7, [rd], queue_us=1, compute_us=2, batch_size=1, server_us=3, t_send_ns=5), [rp])
    t(
        "pack_result",
        lambda: P.pack(P.result(7, [rd], queue_us=1, compute_us=2, batch_size=1, server_us=3, t_send_ns=5), [rp]),
    )
    t("parse_result", lambda: P.parse(res_parts))
    t("decode_logits", lambda: codec.decode(rd, rp))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("client")
    c.add_argument("--endpoint", required=True)
    c.add_argument("--bundle", required=True)
    c.add_argument("--kind", choices=("raw", "agent"), default="raw")
    c.add_argument("--n", type=int, default=500)
    c.add_argument("--warmup", type=int, default=100)
    c.add_argument("--mode", type=int, default=None)
    c.add_argument("--gap-us", type=float, default=0.0, help="idle time before each request")
    a = sub.add_parser("ab")
    a.add_argument("--trees", nargs="+", required=True)
    a.add_argument("--bundle", required=True)
    a.add_argument("--kinds", default="raw,agent")
    a.add_argument("--rounds", type=int, default=6)
    a.add_argument("--n", type=int, default=400)
    a.add_argument("--warmup", type=int, default=100)
    a.add_argument("--mode", type=int, default=None)
    a.add_argument("--server-arg", action="append", default=[], help="extra daemon argument (repeat)")
    a.add_argument("--gap-us", type=float, default=0.0, help="idle time before each request (0: back to back)")
    m = sub.add_parser("micro")
    m.add_argument("--bundle", required=True)
    m.add_argument("--reps", type=int, default=2000)
    r = sub.add_parser("raw")
    r.add_argument("--bytes", type=int, default=512)
    args = ap.parse_args(argv)
    if args.cmd == "client":
        fn = client_raw if args.kind == "raw" else client_agent
        print(json.dumps(fn(args.endpoint, args.bundle, args.n, args.warmup, args.mode, args.gap_us)))
    elif args.cmd == "ab":
        print(
            json.dumps(
                ab(
                    args.trees,
                    args.bundle,
                    args.kinds.split(","),
                    args.rounds,
                    args.n,
                    args.warmup,
                    args.mode,
                    args.server_arg,
                    args.gap_us,
                ),
                indent=1,
            )
        )
    elif args.cmd == "micro":
        print(json.dumps(micro(args.bundle, args.reps), indent=1))
    else:
        from edgesplit.bench.e2e import raw_rtt_ms

        print(json.dumps(raw_rtt_ms(args.bytes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
