"""The ``edgesplit`` command. Each subcommand imports its plane lazily, so the edge commands
(agent) never pull in torch and ``edgesplit --help`` is instant."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__

COMMANDS = {
    "train": "train a split model from a recipe (build plane, needs torch)",
    "export": "export a trained split to a bundle: ONNX files + manifest (build plane)",
    "eval": "accuracy and bytes per frame of a bundle against the 'send the JPEG' baseline",
    "serve": "run the server daemon: tails for one or more bundles behind a ZeroMQ ROUTER",
    "agent": "run the deploy agent: frames -> head -> encode -> server (edge plane, no torch)",
    "worker": "serve sub-models of an ED-ViT bundle to cameras: scatter in, one gather per sub-model out",
    "demo": "server and agent on loopback with a shipped bundle, then a summary table",
    "bench": "benchmarks with --json output (e2e, engine, server, fuzz, overload, restart)",
    "inspect": "verify a bundle and print its manifest summary",
    "zoo": "list the model zoo, or report a checkpoint's accuracy on real data (build plane)",
    "split": "cut a zoo model or any ONNX file at a single-tensor cut: list cut points, or export the halves",
    "profile": "profiling with --json output: per-node and whole-model latency (profile latency)",
    "keys": "CURVE key pairs for encrypted, authenticated agent <-> server links (keys gen NAME --out DIR)",
    "bundle": "bundle signatures: keygen, sign BUNDLE --key KEY, verify BUNDLE --pubkey PUB (Ed25519)",
    "collect": "receive the results agents deliver (agent --deliver URL) into a JSON-lines file",
    "plan": "rank cut points / bundle modes / local / raw JPEG by predicted latency or device energy for a link and devices",
    "body-serve": "serve an SFPrompt body package: split training steps and U-shaped inference (PROTOCOL.md section 15)",
    "federate": "run an SFPrompt federation here: body server, Flower SuperLink and one SuperNode per client",
    "triton-export": "write a bundle's tail (and full model) as a Triton model repository mirroring serve's batching flags",
}


def _train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="edgesplit train", description=COMMANDS["train"])
    p.add_argument("recipe", help="recipe YAML (see models/recipes/)")
    p.add_argument("--run-dir", default=None, help="where checkpoints, logs and results go (default runs/NAME)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--workers", type=int, default=None, help="processes decoding the shards")
    p.add_argument(
        "--limit-per-shard", type=int, default=None, help="use only the first N images of each shard (smoke runs)"
    )
    p.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every stage's epochs (smoke runs: 0.05)")
    a = p.parse_args(argv)
    from pathlib import Path

    from .builder.pipeline import run_recipe
    from .builder.recipe import RecipeError, load_recipe

    try:
        r = load_recipe(a.recipe)
    except (RecipeError, OSError) as e:
        print(f"edgesplit train: {e}", file=sys.stderr)
        return 2
    if a.epochs_scale != 1.0:
        for c in (r.stage1, r.stage2, r.teacher.train):
            if c is not None:
                c.epochs = max(1, round(c.epochs * a.epochs_scale))
    run_dir = Path(a.run_dir or Path("runs") / r.name)
    res = run_recipe(r, run_dir, a.device, a.limit_per_shard, a.workers)
    print(
        f"done: teacher {res['teacher_accuracy']:.4f}; "
        + ", ".join(
            (f"c{m['width']}/" if "width" in m else "") + f"{m['bits']}-bit {m['accuracy']:.4f}"
            for m in res.get("modes", [])
        )
    )
    if r.split is None:  # a teacher-only recipe (e.g. a ViT trained from scratch)
        print(f"teacher: {run_dir / 'teacher.pt'}")
        return 0
    print(f"student: {run_dir / 'student.pt'}  (next: edgesplit export {run_dir / 'student.pt'} --out models/NAME)")
    return 0


def _delegate(module: str, func: str):
    def run(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(module).__dict__[func](argv)

    return run


HANDLERS = {
    "train": _train,
    "export": _delegate("edgesplit.builder.export", "export_main"),
    "eval": _delegate("edgesplit.bench.evaluate", "eval_main"),
    "serve": _delegate("edgesplit.server.daemon", "serve_main"),
    "agent": _delegate("edgesplit.edge.agent", "agent_main"),
    "worker": _delegate("edgesplit.edge.worker", "worker_main"),
    "demo": _delegate("edgesplit.demo", "demo_main"),
    "bench": _delegate("edgesplit.bench", "bench_main"),
    "inspect": _delegate("edgesplit.bundle_cli", "inspect_main"),
    "zoo": _delegate("edgesplit.builder.zoo_cli", "zoo_main"),
    "split": _delegate("edgesplit.builder.split", "split_main"),
    "profile": _delegate("edgesplit.profile.cli", "profile_main"),
    "keys": _delegate("edgesplit.keys_cli", "keys_main"),
    "bundle": _delegate("edgesplit.bundle_sign", "bundle_main"),
    "collect": _delegate("edgesplit.collector", "collect_main"),
    "plan": _delegate("edgesplit.profile.plan_cli", "plan_main"),
    "body-serve": _delegate("edgesplit.server.body_server", "main"),
    "federate": _delegate("edgesplit.families.sfprompt.federate", "main"),
    "triton-export": _delegate("edgesplit.server.triton_repo", "triton_export_main"),
}


def main(argv: list[str] | None = None) -> int:
    try:
        rc = _run(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()  # a reader that has gone shows here, not in the interpreter's flush at exit
        return rc
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader closed the pipe (`edgesplit ... | head`): stop without a traceback. stdout goes
        # to devnull so the interpreter's own flush at exit cannot raise again (the Python docs'
        # recipe, signal module, "Note on SIGPIPE"). Status 1 as there: the output asked for was not
        # all written, and 0 would tell a caller with pipefail that it was.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(
            f"edgesplit {__version__}: split computing runtime (build / edge / server)\n\nusage: edgesplit COMMAND [options]\n"
        )
        for name, text in COMMANDS.items():
            print(f"  {name:<8} {text}")
        print("\n'edgesplit COMMAND --help' for a command's options.")
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in HANDLERS:
        print(f"edgesplit: unknown command '{cmd}' (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    return int(HANDLERS[cmd](rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
