"""``edgesplit agent --ota-group G --ota-pubkey PUB``: the agent's bundle-update flags (each also a
config key), the bundle it starts on, and its :class:`~edgesplit.edge.ota_loop.UpdateManager`."""

from __future__ import annotations

import argparse
import logging
from typing import Any, Callable

from ..bundle import Bundle, BundleError
from ..bundle_sign import SignatureError, load_public, verify_bundle
from ..wire.errors import ErrorCode
from .ota_config import ota_dir
from .ota_loop import OtaSettings
from .ota_stage import BundleStore
from .results import AgentError


def add_ota_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("over-the-air bundle updates (PROTOCOL.md §14)")
    g.add_argument(
        "--ota-group",
        default=None,
        metavar="NAME",
        help="this agent's fleet group: ask the server for the group's current bundle, fetch it over the link, "
        "verify it and switch to it between two frames (needs --ota-pubkey)",
    )
    g.add_argument(
        "--ota-pubkey",
        default=None,
        metavar="PUB",
        help="the pinned publisher key (NAME.ed25519.pub): a bundle not signed by it is never run",
    )
    g.add_argument(
        "--ota-dir",
        default=None,
        metavar="DIR",
        help="downloads, staged and verified bundles, state.json (unset: $STATE_DIRECTORY/ota under systemd)",
    )
    g.add_argument("--ota-poll-s", type=float, default=300.0, help="ask for the group's bundle this often")
    g.add_argument(
        "--ota-chunk-bytes",
        type=int,
        default=16384,
        help="most bytes asked per chunk (one chunk at a time: bounds how long a result waits behind one)",
    )
    g.add_argument(
        "--ota-kbps", type=float, default=None, help="pace the download to this many kbit/s (unset: no pace)"
    )
    g.add_argument(
        "--ota-max-bytes", type=int, default=256 << 20, help="largest archive, and unpacked bundle, accepted"
    )
    g.add_argument(
        "--ota-health-frames", type=int, default=20, help="frames a new bundle is judged on before it is committed"
    )
    g.add_argument(
        "--ota-max-error-rate",
        type=float,
        default=0.1,
        help="share of those frames that may fail (refused by the server, timed out) before it is rolled back",
    )


def settings_from_args(args: argparse.Namespace) -> OtaSettings:
    d = ota_dir(vars(args))
    assert d is not None  # check_ota made sure
    return OtaSettings(
        group=args.ota_group,
        ota_dir=d,
        pubkey=load_public(args.ota_pubkey),
        poll_s=args.ota_poll_s,
        chunk_bytes=args.ota_chunk_bytes,
        kbps=args.ota_kbps,
        max_bytes=args.ota_max_bytes,
        health_frames=args.ota_health_frames,
        max_error_rate=args.ota_max_error_rate,
        timeout_s=args.timeout_s,
    )


def start_bundle(args: argparse.Namespace, say: Callable[..., None]) -> tuple[Bundle, OtaSettings, BundleStore]:
    """The bundle to start on: the last one that passed its health check (verified again against
    the pinned key), else ``--bundle``."""
    s = settings_from_args(args)
    store = BundleStore(s.ota_dir)
    cur = store.state["current"]
    if cur and store.staged(cur):
        try:
            return verify_bundle(store.path(cur), s.pubkey), s, store
        except (BundleError, SignatureError) as e:
            say(f"update: the current bundle {cur[:16]} does not verify ({e}): starting on --bundle", logging.WARNING)
    return Bundle.load(args.bundle), s, store


def connect_agent(args: argparse.Namespace, make_agent: Callable[[Bundle], Any], bundle: Bundle, say) -> Any:
    """The agent on ``bundle``, connected. With updates on, a server that no longer serves the
    bundle the agent committed (the operator moved the group back, say) is not a dead end: the
    agent starts on ``--bundle`` instead, and its group's offer takes it from there."""
    agent = make_agent(bundle)
    try:
        return agent.connect()
    except AgentError as e:
        if not args.ota_group or e.code != ErrorCode.UNKNOWN_BUNDLE:
            raise
        base = Bundle.load(args.bundle)
        if base.hash == bundle.hash:
            raise
        say(
            f"update: the server does not serve bundle {bundle.hash[:16]}: starting on --bundle {base.hash[:16]}",
            logging.WARNING,
            event="ota_start_fallback",
            bundle=bundle.hash,
        )
        return make_agent(base).connect()
