"""The ``edgesplit agent`` command line: arguments, the policy they name, the run, the summary."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from ..bundle import Bundle, BundleError
from ..bundle_sign import SignatureError
from ..control.policy import Policy
from ..data.sources import open_source, take
from ..engine.providers import ProviderError
from ..profile.devices import ProfileError
from .adaptive import POLICY_KINDS, device_modes, make_policy, measure_heads_ms, measure_local_ms
from .agent_core import Agent
from .delivery import Deliverer
from .device_config import DeviceSetup, add_device_arguments, record_sessions, start_device
from .fallback import load_fallback
from .heads import HeadRunner
from .ota_cli import add_ota_arguments, connect_agent, start_bundle
from .ota_loop import UpdateManager
from .results import AgentError, FrameResult, summarize
from .scatter_run import add_edvit_arguments, edvit_main
from .sdnotify import Notifier
from .service_config import ConfigError, parse_with_config, spool_dir
from .service_run import Reporter, StopSignal, add_service_arguments, run_frames
from .service_unit import install_service_main


def build_parser(prog: str = "edgesplit agent") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run the edge agent: read frames, run the bundle's head with ONNX Runtime, quantize and "
        "send the wire tensor to a server daemon, and report one JSON line per frame plus a summary. "
        "Every flag is also a --config key; 'edgesplit agent install-service --help': a systemd unit.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--bundle", required=True, metavar="PATH", help="bundle directory or tar (the same one the server loads)"
    )
    p.add_argument(
        "--server",
        default="tcp://127.0.0.1:5555",
        help="server endpoint, or several comma-separated (gateways of one cluster): the agent fails over to "
        "the next when the session is lost or no welcome comes",
    )
    p.add_argument(
        "--source",
        default="cifar10:test",
        help="frames: dataset:split, shard file/glob, image folder, image, video, camera:N",
    )
    p.add_argument("--frames", type=int, default=100, help="frames to process (0: the whole source)")
    p.add_argument("--mode", type=int, default=None, help="bundle mode id (unset: the bundle's default mode)")
    p.add_argument(
        "--codec",
        default="raw",
        choices=("raw", "zstd", "auto"),
        help="lossless stage after packing (auto: zstd only when it is smaller)",
    )
    p.add_argument("--inflight", type=int, default=8, help="most requests outstanding (also bounded by server credits)")
    p.add_argument(
        "--deadline-ms",
        type=float,
        default=None,
        help="per-request deadline the server enforces (relative to its receipt); with --adapt, also "
        "the end-to-end deadline (capture to answer) the policy plans for",
    )
    p.add_argument(
        "--adapt",
        default=None,
        choices=POLICY_KINDS,
        help="choose each frame's mode with a policy from the bundle's modes table (needs --deadline-ms): "
        "deadline = the deadline-aware controller, assine = Assine et al., fixed = --mode throughout; "
        "frames that fit no mode are answered locally by full.onnx (fallback_reason POLICY)",
    )
    p.add_argument(
        "--fps", type=float, default=None, help="pace frames like a camera at this rate (unset: as fast as possible)"
    )
    p.add_argument(
        "--local-ms",
        type=float,
        default=None,
        help="with --adapt: latency of full.onnx on this device (unset: measured at start)",
    )
    p.add_argument(
        "--base-rtt-ms",
        type=float,
        default=0.0,
        help="with --adapt: fixed round trip beyond the uplink (propagation both ways), ms",
    )
    p.add_argument(
        "--packet-bytes",
        type=int,
        default=None,
        help="with --adapt deadline*: the uplink serves whole packets of this size per delivery opportunity "
        "(cellular: 1500), so bytes are counted in whole packets (unset: bytes / rate)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="ONNX Runtime intra-op threads for the head (unset: ORT's default)"
    )
    p.add_argument("--timeout-s", type=float, default=10.0, help="give up on a request (and the handshake) after this")
    p.add_argument(
        "--fallback",
        default="auto",
        choices=("auto", "off"),
        help="auto: answer a frame with the bundle's full.onnx on this device when the server cannot "
        "(link down, timeout, overloaded, deadline); off: such frames end as errors",
    )
    p.add_argument(
        "--reconnect-max-s",
        type=float,
        default=0.5,
        help="cap of the reconnect backoff (libzmq's reconnect interval and hello retries): a restarted "
        "server is found again within about this long",
    )
    p.add_argument("--name", default=None, help="agent name sent in hello (unset: host:pid)")
    p.add_argument(
        "--server-key",
        default=None,
        metavar="FILE",
        help="CURVE: the server's public key (server.key); needs --client-key",
    )
    p.add_argument(
        "--client-key",
        default=None,
        metavar="FILE",
        help="CURVE: this agent's secret key (NAME.key_secret from 'edgesplit keys gen'); its NAME.key "
        "must be in the server's --allow-keys directory",
    )
    p.add_argument(
        "--json-lines",
        nargs="?",
        const="-",
        default=None,
        metavar="FILE|-",
        help='write one JSON line per frame and a final {"summary": ...} line to FILE or stdout',
    )
    add_edvit_arguments(p)
    add_device_arguments(p)
    add_service_arguments(p)
    add_ota_arguments(p)
    return p


def agent_main(args_list: list[str] | None = None) -> int:
    """Run the agent CLI. Exit codes: 0 done (also after SIGTERM), 1 could not run (bundle, server,
    source), 2 invalid flags or config, 3 every frame failed. ``install-service`` writes a unit."""
    argv = sys.argv[1:] if args_list is None else list(args_list)
    if argv[:1] == ["install-service"]:
        return install_service_main(argv[1:], build_parser())
    try:
        args = parse_with_config(build_parser(), argv)
    except ConfigError as e:
        print(f"edgesplit agent: {e}", file=sys.stderr)
        return 2
    rep = Reporter(args.log_format)
    try:  # first: pin before ORT and ZeroMQ start threads; refuse missing providers before loading
        device = start_device(vars(args), rep.say)
    except (ProviderError, ProfileError) as e:
        rep.say(str(e), logging.ERROR, event="start_failed")
        return 1
    if args.edvit:
        return edvit_main(args, device.execution)
    notifier = Notifier()
    with StopSignal() as stop:
        try:
            return _run(args, device, rep, notifier, stop)
        finally:
            notifier.close()


def _make_agent(args: argparse.Namespace, bundle: Bundle, device: DeviceSetup) -> Agent:
    """The agent the flags describe, for ``bundle`` (not connected yet)."""
    policy = _cli_policy(args, bundle, device)
    return Agent(
        bundle,
        args.server,
        mode=args.mode,
        codec=args.codec,
        inflight=args.inflight,
        deadline_ms=args.deadline_ms,
        threads=device.execution,  # every session: the providers and threads chosen at start
        name=args.name,
        timeout_s=args.timeout_s,
        fallback=args.fallback,
        reconnect_max_s=args.reconnect_max_s,
        server_key=args.server_key,
        client_key=args.client_key,
        policy=policy,
        policy_deadline_ms=args.deadline_ms if policy is not None else None,
    )


def _run(args: argparse.Namespace, device: DeviceSetup, rep: Reporter, notifier: Notifier, stop: StopSignal) -> int:
    out = None
    ota: UpdateManager | None = None
    try:
        if args.ota_group:  # the bundle that last passed its health check, else --bundle
            bundle, ota_settings, store = start_bundle(args, rep.say)
        else:
            bundle = Bundle.load(args.bundle)
        agent = connect_agent(args, lambda b: _make_agent(args, b, device), bundle, rep.say)
        if args.ota_group:
            ota = UpdateManager(agent, lambda b: _make_agent(args, b, device), ota_settings, store, rep.say)
    except (AgentError, BundleError, SignatureError, OSError, ValueError) as e:
        rep.say(str(e), logging.ERROR, event="start_failed")
        return 1
    record_sessions(device, agent, rep.say)
    if args.fallback == "auto" and agent.fallback is None:
        rep.say(f"bundle {agent.bundle.name} has no full model: no local fallback", event="no_fallback")
    if agent.welcome is None:
        rep.say(
            f"no welcome from {args.server} within {args.timeout_s:.1f} s: answering frames "
            "locally (full.onnx) and retrying in the background",
            event="unreachable",
        )
    notifier.ready(
        f"streaming to {args.server}" if agent.welcome is not None else f"{args.server} unreachable: local fallback"
    )
    deliver = None
    if args.deliver:
        deliver = Deliverer(
            args.deliver,
            spool_dir(vars(args)),  # type: ignore[arg-type]  # validate() made sure there is one
            agent=agent.name,
            batch=args.deliver_batch,
            **{k: v for k, v in (("max_bytes", args.spool_max_bytes), ("max_records", args.spool_max_records)) if v},
        )
        if deliver.replayed_from_start:
            rep.say(
                f"{deliver.replayed_from_start} undelivered results from an earlier run: sending them first",
                logging.INFO,
                event="spool_replay",
                records=deliver.replayed_from_start,
            )
    if args.json_lines == "-":
        out = sys.stdout
    elif args.json_lines:
        out = open(args.json_lines, "w")
    results: list[FrameResult] = []
    t0 = time.perf_counter()
    try:
        frames = iter(take(open_source(args.source, agent.bundle.classes), args.frames or None))
        loop = run_frames if ota is None else ota.run_frames
        for r in loop(agent, frames, fps=args.fps, stop=stop, grace_s=args.stop_grace_s, notifier=notifier):
            results.append(r)
            if out is not None or deliver is not None:
                line = r.to_json()
                if ota is not None:  # which bundle answered it (frames in flight at a switch: the old one)
                    line["bundle"] = ota.bundle_of.pop(r.id, None)
                if out is not None:
                    out.write(json.dumps(line) + "\n")
                if deliver is not None:
                    deliver.put(line)
    except KeyboardInterrupt:
        rep.say("interrupted", event="interrupted")
    except Exception as e:
        rep.say(f"{type(e).__name__}: {e}", logging.ERROR, event="failed")
        notifier.stopping(f"failed: {type(e).__name__}")
        if ota is not None:
            ota.close_others()
            agent = ota.agent
        agent.close()
        if deliver is not None:
            deliver.close()
        return 1
    notifier.stopping("SIGTERM: frames in flight answered" if stop.requested else "frame source ended")
    if stop.requested:
        rep.say(f"SIGTERM: stopped after {len(results)} frames", logging.INFO, event="stopped", frames=len(results))
    wall = time.perf_counter() - t0
    agent = agent if ota is None else ota.agent  # after updates: the bundle it ended on
    agent.close()
    summary = summarize(results, wall, agent)
    if ota is not None:
        summary["ota"] = ota.summary()
    # the edge plane must not pull torch in: report it, so benchmarks and CI can check
    summary["device"] = device.summary()
    summary["torch_loaded"] = any(m == "torch" or m.startswith("torch.") for m in sys.modules)
    if deliver is not None:
        deliver.close()
        summary["delivery"] = deliver.summary()
    if out is not None:
        out.write(json.dumps({"summary": summary}) + "\n")
        if out is not sys.stdout:
            out.close()
    if rep.json:
        rep.say("summary", logging.INFO, event="summary", summary=summary)
    else:
        human = sys.stderr if out is sys.stdout else sys.stdout
        print(_format_summary(summary, agent), file=human)
    return 3 if results and not summary["ok"] else 0


def _cli_policy(args: argparse.Namespace, bundle: Bundle, device: DeviceSetup) -> Policy | None:
    """The --adapt policy, from the bundle's modes table on this device (--device-profile: its row,
    or the heads timed here); full.onnx is timed here unless --local-ms."""
    if args.adapt is None:
        return None
    if args.deadline_ms is None:
        raise ValueError("--adapt needs --deadline-ms")
    ex = device.execution
    local_ms = args.local_ms
    if local_ms is None and args.fallback == "auto" and bundle.has("full"):
        local_ms = measure_local_ms(load_fallback(bundle, "auto", ex), tuple(bundle.input_spec["shape"]))
    name = None if device.profile is None else device.profile.name
    modes, source = device_modes(bundle, name, lambda: measure_heads_ms(HeadRunner(bundle, ex)))
    device.policy = {
        "local_ms": local_ms,
        "local_ms_source": "local_ms" if args.local_ms is not None else "measured here" if local_ms else None,
        "head_ms": {m.name: m.head_ms for m in modes},
        "head_ms_source": source,
    }
    return make_policy(
        args.adapt,
        modes,
        local_ms=local_ms,
        base_rtt_ms=args.base_rtt_ms,
        mode_id=args.mode,
        packet_bytes=args.packet_bytes,
    )


def _format_summary(s: dict[str, Any], agent: Agent) -> str:
    acc = "n/a" if s["accuracy"] is None else f"{100 * s['accuracy']:.2f}%"
    errs = ", ".join(f"{k}={v}" for k, v in s["errors"].items()) or "none"
    reasons = ", ".join(f"{k}={v}" for k, v in s["fallback_reasons"].items())
    ad = s.get("adapt")
    how = f"mode {agent.mode.id} '{agent.mode.name}'" if ad is None else f"policy {ad['policy']}"
    text = (
        f"edgesplit agent: {s['frames']} frames ({s['ok']} ok) via {agent.server}, bundle {agent.bundle.name}, "
        f"{how}\n"
        f"  accuracy {acc}; bytes/frame median {s['bytes_per_frame_median']} (+ header {s['header_bytes_median']})\n"
        f"  rtt p50 {s['rtt_ms_p50']} ms, p95 {s['rtt_ms_p95']} ms; head p50 {s['head_ms_p50']} ms; "
        f"server queue p50 {s['server_queue_ms_p50']} ms, compute p50 {s['server_compute_ms_p50']} ms\n"
        f"  {s['server']} answered by the server, {s['local']} locally{f' ({reasons})' if reasons else ''}; "
        f"sessions lost {s.get('link_losses', 0)}, re-established {s.get('reconnects', 0)}\n"
        f"  {s.get('frames_per_s', 'n/a')} frames/s; errors: {errs}"
    )
    if ad is not None:
        text += (
            f"\n  frames per mode (-1: local by policy) {ad['mode_frames']}; {ad['switches']} switches, "
            f"decision -> request ready p50 {ad['switch_ms_p50']} ms switching, {ad['same_mode_ms_p50']} ms not"
        )
    return text


if __name__ == "__main__":
    sys.exit(agent_main(sys.argv[1:]))
