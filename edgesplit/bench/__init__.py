"""``edgesplit bench``: benchmarks with ``--json`` output. Results go to docs/BENCHMARKS.md.

Each scenario lives in its own module that defines ``add_arguments(parser)`` and
``run(args) -> dict``; :data:`SCENARIOS` names them (module path, one-line help). Adding a
scenario is one line here plus its module, and no scenario imports another's dependencies.
"""

from __future__ import annotations

from ..subcommands import run_subcommand

# name -> (module, help). Modules are imported only when their scenario runs (or for --help).
SCENARIOS: dict[str, tuple[str, str]] = {
    "e2e": ("edgesplit.bench.e2e", "one frame at a time through agent -> server -> agent, against raw pyzmq"),
    "restart": (
        "edgesplit.bench.restart",
        "kill -9 the server mid-stream and restart it: every frame accounted for, resume time",
    ),
    "engine": (
        "edgesplit.bench.engine",
        "tail engine alone per batch size (frames/s, latency), optionally against bare torch",
    ),
    "server": (
        "edgesplit.bench.server",
        "daemon frames/s and latency at 1..32 agents, batched and unbatched, next to the engine alone",
    ),
    "fuzz": (
        "edgesplit.bench.fuzz",
        "malformed frames at the server while valid agents stream: no crash, every answer as documented",
    ),
    "overload": (
        "edgesplit.bench.overload",
        "offer N x capacity with deadlines: bounded memory, one answer per request, admitted p99",
    ),
    "adapt": (
        "edgesplit.bench.adapt",
        "the adaptive controller vs fixed modes, Assine's policy and an oracle on a real trace (--sim | --live)",
    ),
    "switch": (
        "edgesplit.bench.switch",
        "what a mode switch costs in the live agent: codec and (slimmable) head, switching vs steady",
    ),
    "edvit": (
        "edgesplit.bench.edvit",
        "ED-ViT: N worker processes on loopback, per-stage latency, tensor vs JPEG input, kill -9 of one worker",
    ),
    "rate-bound": (
        "edgesplit.bench.rate_bound",
        "could a hyperprior pay on an ans bundle? per-frame oracle densities vs the shipped tables, side bytes charged",
    ),
    "plan": (
        "edgesplit.bench.plan",
        "the split planner's predicted end-to-end latency vs measured, every cut point, kernel-shaped links",
    ),
    "sfprompt": (
        "edgesplit.bench.sfprompt",
        "SFPrompt vs SplitFed, prompt-only FL, federated full fine-tuning and local-only: accuracy, compute, bytes",
    ),
    "ota": (
        "edgesplit.bench.ota",
        "a fleet update over one kernel-shaped link: N agents fetch, verify and switch to a signed bundle",
    ),
    "gateway": (
        "edgesplit.bench.gateway",
        "the daemon's tail in-process vs behind it on Triton (--triton-url) and on Ray Serve replicas (--ray-replicas 1,2,4)",
    ),
    "gateway-kill": (
        "edgesplit.bench.gateway_kill",
        "kill -9 a Ray Serve tail replica mid-stream behind the gateway: every frame accounted for, recovery time",
    ),
}


def bench_main(argv: list[str]) -> int:
    return run_subcommand("edgesplit bench", "Benchmarks (JSON with --json).", SCENARIOS, argv)
