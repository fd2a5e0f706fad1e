"""``edgesplit serve``: the daemon's command line (:func:`build_parser`) and its run until a
signal (:func:`serve`). Entry points: ``edgesplit serve`` and ``python -m edgesplit.server.daemon``
(both through :func:`edgesplit.server.daemon.serve_main`)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any, Callable

from ..bundle import BundleError
from ..engine import ACCELERATIONS, BACKENDS, PRECISIONS, EngineOptions  # numpy only: backends load lazily
from ..logs import LOG_FORMATS, setup_logging
from ..wire import protocol as P
from ..wire.curve import ServerCurve
from ..wire.protocol import Limits
from .ota import add_ota_arguments, parse_group_specs

log = logging.getLogger("edgesplit.server")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser(prog: str = "edgesplit serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run the split-computing server daemon: accept agents over ZeroMQ (ROUTER), batch their "
        "requests and run each bundle's tail. Stops cleanly on SIGINT/SIGTERM (finishes queued "
        "requests, tells agents bye, exits 0).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--bundle",
        action="append",
        required=True,
        metavar="PATH",
        help="bundle directory or tar (repeat to serve several bundles; agents pick one by hash); an ED-ViT "
        "bundle serves its fusion head to cameras' fused requests (PROTOCOL.md §13.5)",
    )
    p.add_argument(
        "--bind",
        default="tcp://127.0.0.1:5555",
        help="ZeroMQ endpoint to bind; tcp port 0 picks a free port (printed at start)",
    )
    p.add_argument(
        "--backend",
        default="ort",
        choices=(*BACKENDS, "triton", "ray"),
        help="tail engine: ONNX Runtime (CPU), torch (the bundle's tail_torch file; CPU or CUDA), "
        "TensorRT 10 (the ONNX tail on CUDA; plans cached under --engine-cache); or this daemon is a gateway "
        "and each formed batch goes to the tail on a Triton server (triton, --triton-url) or to tail replicas "
        "of a Ray Serve application (ray, --ray-app)",
    )
    p.add_argument(
        "--triton-url",
        default=None,
        metavar="HOST:PORT",
        help="with --backend triton: the Triton server's gRPC endpoint, holding the models 'edgesplit "
        "triton-export' wrote for the bundles",
    )
    p.add_argument(
        "--triton-model-prefix",
        default=None,
        metavar="NAME",
        help="with --backend triton: the model is NAME-tail (unset: the bundle's name), as triton-export --prefix",
    )
    p.add_argument(
        "--ray-app",
        default=None,
        metavar="NAME",
        help="with --backend ray: the Ray Serve application running edgesplit.server.ray_app for the bundle",
    )
    p.add_argument("--ray-address", default=None, help="with --backend ray: the Ray cluster (unset: auto)")
    p.add_argument(
        "--remote-inflight",
        type=int,
        default=1,
        metavar="K",
        help="with --backend triton or ray: formed batches in flight to the remote tail at once; more than 1 pays "
        "where the remote side has parallel capacity the gateway leaves idle (replicas or Triton instances on other "
        "machines), not on a CPU shared with the gateway ('edgesplit bench gateway --inflight 1,2' measures it)",
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (unset: ort cpu, torch cuda when present, tensorrt cuda)"
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="tail compute precision (torch: fp32/fp16/bf16; tensorrt: fp32/fp16 via the ONNX graph; ort: fp32)",
    )
    p.add_argument(
        "--accel",
        default="none",
        choices=ACCELERATIONS,
        help="torch only: torch.compile, or CUDA graphs per batch bucket (cuda)",
    )
    p.add_argument(
        "--engine-cache",
        default=None,
        metavar="DIR",
        help="TensorRT plan cache (unset: $EDGESPLIT_CACHE/tensorrt or ~/.cache/edgesplit/tensorrt)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads for the tail engine (unset: the engine's own default)",
    )
    p.add_argument("--max-batch", type=int, default=32, help="most frames run in one tail call")
    p.add_argument(
        "--max-queue-delay-us",
        type=float,
        default=2000.0,
        help="longest a request waits for others to batch with (0: run what is queued at once)",
    )
    p.add_argument(
        "--preferred-batch-sizes",
        type=_int_list,
        default=(),
        metavar="N,N,...",
        help="batch sizes run as soon as they can be formed, largest first (Triton's preferred_batch_size); "
        "otherwise a batch waits up to --max-queue-delay-us and takes what is queued",
    )
    p.add_argument(
        "--switch-interval-us",
        type=float,
        default=1000.0,
        help="Python's GIL switch interval for the daemon process (CPython's default is 5000): shorter lets "
        "the compute thread back in quickly while the I/O thread is busy refusing an overload",
    )
    p.add_argument(
        "--max-queue", type=int, default=1024, help="requests waiting beyond this are refused with OVERLOADED"
    )
    p.add_argument("--credits", type=int, default=64, help="most requests in flight per agent (flow control)")
    p.add_argument(
        "--heartbeat-ms",
        type=int,
        default=5000,
        help="heartbeat interval advertised to agents; silent sessions expire after 3 intervals (0: off)",
    )
    p.add_argument(
        "--max-frame-bytes", type=int, default=P.DEFAULT_LIMITS.max_frame_bytes, help="largest tensor frame accepted"
    )
    p.add_argument("--name", default=None, help="server name sent in welcome (unset: host:pid)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="json: one JSON object per line (ts, level, logger, msg and structured fields)",
    )
    sec = p.add_argument_group("security (CURVE; keys from 'edgesplit keys gen')")
    sec.add_argument(
        "--curve-secret",
        default=None,
        metavar="FILE",
        help="the server's secret key (NAME.key_secret): encrypt every connection; needs --allow-keys",
    )
    sec.add_argument(
        "--allow-keys",
        default=None,
        metavar="DIR",
        help="directory of the agents' public keys (*.key): only those agents may connect; re-read when "
        "its files change, and on SIGHUP",
    )
    obs = p.add_argument_group("observability")
    obs.add_argument(
        "--http-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve /metrics (Prometheus), /health/live and /health/ready on this port "
        "(0: any free port, printed at start; unset: no HTTP)",
    )
    obs.add_argument("--http-host", default="127.0.0.1", help="address the HTTP endpoints listen on (0.0.0.0: all)")
    add_ota_arguments(p)
    return p


def serve(args_list: list[str] | None, server_class: Callable[..., Any]) -> int:
    """Run the daemon (``server_class``: :class:`edgesplit.server.daemon.Server`, passed in so
    that this module and the daemon, which re-exports the CLI, do not import each other) until
    SIGINT/SIGTERM. Returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(args_list)
    # The I/O thread never waits while requests keep arriving, so under overload it holds the GIL
    # for whole switch intervals and the compute thread, back from each tail run (ONNX Runtime
    # releases the GIL), waits that long to decode and reply: under overload a shorter interval
    # serves several times more frames for a little peak throughput (docs/BENCHMARKS.md, overload).
    # Process-wide, so only the daemon's own process sets it, never the in-process Server.
    if not args.switch_interval_us > 0:
        parser.error("--switch-interval-us must be > 0")
    sys.setswitchinterval(args.switch_interval_us / 1e6)
    if (args.curve_secret is None) != (args.allow_keys is None):
        parser.error("--curve-secret and --allow-keys go together (CURVE without an allow-list would admit any key)")
    if (args.backend == "triton") != (args.triton_url is not None):
        parser.error("--backend triton and --triton-url go together")
    if (args.backend == "ray") != (args.ray_app is not None):
        parser.error("--backend ray and --ray-app go together")
    setup_logging(args.log_level, args.log_format)
    try:
        curve = None if args.curve_secret is None else ServerCurve.load(args.curve_secret, args.allow_keys)
        limits = Limits(max_frame_bytes=args.max_frame_bytes, max_batch=args.max_batch)
        engine_options = EngineOptions(
            device=args.device, precision=args.precision, accel=args.accel, cache_dir=args.engine_cache
        )
        server = server_class(
            args.bundle,
            args.bind,
            backend=args.backend,
            threads=args.threads,
            max_batch=args.max_batch,
            max_queue_delay_us=args.max_queue_delay_us,
            max_queue=args.max_queue,
            credits=args.credits,
            preferred_batch_sizes=args.preferred_batch_sizes,
            heartbeat_ms=args.heartbeat_ms,
            limits=limits,
            name=args.name,
            curve=curve,
            http_port=args.http_port,
            http_host=args.http_host,
            engine_options=engine_options,
            ota_groups=parse_group_specs(args.ota_group),
            ota_chunk_bytes=args.ota_chunk_bytes,
            ota_max_kbps=args.ota_max_kbps,
            ota_cache_dir=args.ota_cache_dir,
            ota_fault=args.ota_fault,
            triton_url=args.triton_url,
            triton_prefix=args.triton_model_prefix,
            ray_app=args.ray_app,
            ray_address=args.ray_address,
            remote_inflight=args.remote_inflight,
        )
        server.start()
    except (BundleError, OSError, ValueError, RuntimeError) as e:
        print(f"edgesplit serve: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # engine errors and the like: one clear line, not a traceback
        print(f"edgesplit serve: {type(e).__name__}: {e}", file=sys.stderr)
        return 1

    def _on_signal(signum, frame):
        log.info("received %s, draining", signal.Signals(signum).name)
        server.request_stop()

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    if curve is not None:  # SIGHUP: read the allowed agent keys again
        old[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda signum, frame: curve.allow.reload())
    print(f"edgesplit serve: listening on {server.endpoint}", flush=True)
    if server.http is not None:
        print(f"edgesplit serve: metrics and health on {server.http.url}", flush=True)
    try:
        while not server.wait(0.5):
            pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    server.stop()
    return 1 if server.failed else 0
