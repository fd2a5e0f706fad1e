"""``edgesplit plan``: gather the planner's inputs on this machine (:mod:`.plan_inputs`) and print
the ranked options (:mod:`edgesplit.control.planner`).

Inputs: ``--bundle DIR`` (its modes, ``local`` and ``raw``; a U-shaped bundle's modes and ``local``,
:mod:`.plan_ushaped`) or ``--model ZOO_NAME`` (every
single-tensor cut point of the generic split, plus ``local`` and ``raw``). A scatter bundle (ED-ViT)
with ``--devices A,B,...``: its sub-models placed on those devices sharing a LAN
(:mod:`.plan_scatter`), against its full model on the first device and, with ``--uplink-mbps``,
the JPEG to ``--server``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

from ..control.planner import OBJECTIVES, Link, PlanError, format_plan, plan
from .plan_inputs import HOST_PROFILE, OVERHEAD_MS, Timing, bundle_options, model_options, scenario


def _number(name: str, ok, what: str):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not (math.isfinite(v) and ok(v)):
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {text!r}")
        return v

    return parse


def positive(name: str):
    return _number(name, lambda v: v > 0, "a positive number")


def non_negative(name: str):
    return _number(name, lambda v: v >= 0, ">= 0")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgesplit plan",
        description=(
            "Rank the ways to run a model across device, link and server (cut points, bundle modes, local, "
            "raw JPEG) by predicted end-to-end latency or device energy."
        ),
    )
    p.add_argument(
        "--agent-config",
        metavar="FILE",
        help="an agent config (edgesplit agent --config): plan for its bundle, its device_profile and its "
        "base_rtt_ms; --bundle/--model, --device and --rtt-ms given here override them",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--bundle", help="bundle directory: plan over its modes, full.onnx locally and the raw JPEG")
    what.add_argument("--model", help="zoo model name: plan over every cut point of the generic split")
    p.add_argument("--checkpoint", help="state dict for --model (weights_only); default: random init (timing only)")
    p.add_argument(
        "--cuts", help="comma-separated cut point names for --model (default: all; see edgesplit split --list)"
    )
    p.add_argument("--input-size", type=int, default=None, help="input side for --model (default: the zoo's)")
    p.add_argument("--cache", default=None, help="where --model's cut bundles are exported (default runs/cache/plan)")
    p.add_argument("--bandwidth-mbps", type=positive("--bandwidth-mbps"), required=True, help="uplink rate, Mbit/s")
    p.add_argument(
        "--rtt-ms", type=non_negative("--rtt-ms"), default=None, help="propagation round trip of the link (default 0)"
    )
    p.add_argument("--burst-bytes", type=int, default=0, help="token-bucket depth of a shaped link (default 0: none)")
    p.add_argument("--acks-on-link", action="store_true", help="TCP ACKs share the bottleneck (a shaped loopback)")
    p.add_argument("--device", default=None, help=f"device profile running the head (default {HOST_PROFILE})")
    p.add_argument("--server", default=HOST_PROFILE, help=f"server profile running the tail (default {HOST_PROFILE})")
    p.add_argument(
        "--host", default=HOST_PROFILE, help=f"profile of the machine measuring now (default {HOST_PROFILE})"
    )
    p.add_argument(
        "--devices",
        help="comma-separated device profiles sharing a LAN, the first being the camera: plan a scatter "
        "(ED-ViT) bundle's sub-models on them (--bandwidth-mbps and --rtt-ms are then the LAN's)",
    )
    p.add_argument(
        "--uplink-mbps",
        type=positive("--uplink-mbps"),
        default=None,
        help="with --devices: the camera's uplink to --server, to rank sending the JPEG there (default: not ranked)",
    )
    p.add_argument(
        "--uplink-rtt-ms", type=non_negative("--uplink-rtt-ms"), default=40.0, help="the uplink's RTT (default 40)"
    )
    p.add_argument("--objective", default="latency", choices=OBJECTIVES)
    p.add_argument(
        "--overhead-ms",
        type=non_negative("--overhead-ms"),
        default=OVERHEAD_MS,
        help=f"runtime cost per request beyond model and wire (default {OVERHEAD_MS}: bench e2e on this host)",
    )
    p.add_argument(
        "--radio-w",
        type=non_negative("--radio-w"),
        default=None,
        help="device power while sending (default: its idle power, labelled an estimate)",
    )
    p.add_argument("--runs", type=int, default=30, help="timed runs per graph and codec step (median)")
    p.add_argument(
        "--pace-ms",
        type=non_negative("--pace-ms"),
        default=20.0,
        help="idle time before each timed run, as between camera frames (default 20; 0: back to back)",
    )
    p.add_argument("--data", default=None, help="frame source (default: the dataset the model predicts)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def plan_main(argv: list[str] | None = None) -> int:
    from ..bundle import Bundle, BundleError
    from .devices import ProfileError

    p = build_parser()
    a = p.parse_args(argv)
    try:
        from_agent_config(a)
        if not (a.bundle or a.model):
            p.error("one of --bundle, --model or --agent-config (with a bundle) is required")
        timing = Timing(a.runs, a.pace_ms)
        if a.burst_bytes < 0:
            raise PlanError("--burst-bytes must be >= 0")
        link = Link(a.bandwidth_mbps, a.rtt_ms, ack_bytes=66 if a.acks_on_link else 0, burst_bytes=a.burst_bytes)
        sc = scenario(
            a.device, a.server, a.host, link, a.overhead_ms, a.radio_w
        )  # profiles first: fail before measuring
        if a.objective == "energy" and sc.device.active_w is None:
            raise PlanError(
                f"device profile '{sc.device.name}' has no power figures (power_idle_w and "
                "power_active_w/power_max_w): plan for --objective latency, or give a device with them"
            )
        if a.devices is not None:
            return _scatter_main(a, timing, link, sc)
        if a.bundle:
            if not Path(a.bundle).exists():
                raise BundleError(f"no bundle at {a.bundle}")
            serving = Bundle.load(a.bundle, verify=False).serving
            if serving == "scatter":
                raise PlanError(
                    f"bundle {a.bundle} is a scatter (ED-ViT) bundle: give the devices its sub-models run on, "
                    "--devices A,B,... (the first is the camera)"
                )
            if serving == "u-shaped":
                from .plan_ushaped import ushaped_options

                options, meta = ushaped_options(a.bundle, timing=timing, source=a.data, host=sc.host.name)
            else:
                options, meta = bundle_options(a.bundle, timing=timing, source=a.data, host=sc.host.name)
        else:
            cuts = [c.strip() for c in a.cuts.split(",") if c.strip()] if a.cuts else None
            options, meta = model_options(
                a.model,
                checkpoint=a.checkpoint,
                cuts=cuts,
                input_size=a.input_size,
                cache=a.cache,
                timing=timing,
                source=a.data,
                host=sc.host.name,
                progress=lambda text: print(text, file=sys.stderr, flush=True),
            )
        preds = plan(options, sc, a.objective)
    except (PlanError, ProfileError, BundleError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"edgesplit plan: {msg}", file=sys.stderr)
        return 2
    if a.json:
        out = {
            "objective": a.objective,
            "agent_config": a.agent_config,
            "device": sc.device.name,
            "server": sc.server.name,
            "host": sc.host.name,
            "link": {
                "mbps": link.mbps,
                "rtt_ms": link.rtt_ms,
                "burst_bytes": link.burst_bytes,
                "acks_on_link": a.acks_on_link,
            },
            "overhead_ms": sc.overhead_ms,
            "radio_w": sc.radio_w,
            "inputs": meta,
            "best": preds[0].option,
            "options": [p.to_json() for p in preds],
        }
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(preds, sc, a.objective))
    return 0


def from_agent_config(a: argparse.Namespace) -> None:
    """Fill ``a``'s bundle, device and RTT from ``--agent-config`` where the command line left them
    unset; then the defaults. The file is read by the agent's own loader (unknown keys, wrong types
    refused); its rules about this machine (pinning) are the agent's business at start, not the plan's.
    Relative paths are taken as the agent takes them: from the working directory."""
    cfg: dict = {}
    if a.agent_config:
        from ..edge.agent_cli import build_parser as agent_parser
        from ..edge.service_config import ConfigError, key_specs, load_config

        try:
            cfg = load_config(a.agent_config, key_specs(agent_parser()))
        except ConfigError as e:
            raise PlanError(str(e)) from None
        if not (a.bundle or a.model):
            a.bundle = cfg.get("bundle")
    a.device = a.device or cfg.get("device_profile") or HOST_PROFILE
    a.rtt_ms = a.rtt_ms if a.rtt_ms is not None else float(cfg.get("base_rtt_ms") or 0.0)


def _scatter_main(a: argparse.Namespace, timing: Timing, lan: Link, sc) -> int:
    """``--devices``: rank ED-ViT on those devices against local and raw (see :mod:`.plan_scatter`)."""
    from .plan_scatter import device_set, format_scatter, plan_scatter, scatter_inputs

    if not a.bundle:
        raise PlanError("--devices plans a scatter (ED-ViT) bundle: give it with --bundle")
    if a.objective != "latency":
        raise PlanError("--devices ranks by latency only (no energy model for a set of devices yet)")
    names = [n.strip() for n in a.devices.split(",") if n.strip()]
    if not names:
        raise PlanError("--devices lists no device")
    devices = device_set(names)  # profiles first: fail before measuring
    uplink = Link(a.uplink_mbps, a.uplink_rtt_ms) if a.uplink_mbps else None
    inputs = scatter_inputs(a.bundle, timing=timing, source=a.data, host=sc.host.name)
    ranked = plan_scatter(inputs, devices, sc.host, lan, server=sc.server, uplink=uplink, overhead_ms=sc.overhead_ms)
    if a.json:
        out = {
            "objective": "latency",
            "devices": names,
            "camera": names[0],
            "host": sc.host.name,
            "lan": {"mbps": lan.mbps, "rtt_ms": lan.rtt_ms},
            "server": sc.server.name if uplink else None,
            "uplink": {"mbps": uplink.mbps, "rtt_ms": uplink.rtt_ms} if uplink else None,
            "inputs": {
                **inputs.meta,
                "tensor_message_bytes": inputs.tensor_bytes,
                "jpeg_message_bytes": inputs.jpeg_bytes,
                "submodels": [
                    {"name": s.name, "host_ms": s.work.host_ms, "gflops": s.work.flops / 1e9, "memory_mb": s.memory_mb}
                    for s in inputs.subs
                ],
                "full_host_ms": inputs.local.head.host_ms,
                "full_gflops": inputs.local.head.flops / 1e9,
            },
            "best": ranked[0].name,
            "options": [asdict(v) for v in ranked],
        }
        print(json.dumps(out, indent=2, default=float))
    else:
        print(format_scatter(ranked, devices, lan, sc.host))
    return 0
