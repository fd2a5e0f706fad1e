"""``edgesplit keys gen NAME --out DIR``: a CURVE key pair for the encrypted agent <-> server link.

Writes ``DIR/NAME.key`` (public) and ``DIR/NAME.key_secret`` (secret, mode 0600). One pair for the
server (``edgesplit serve --curve-secret server.key_secret``; agents get ``server.key`` as
``--server-key``) and one per agent (``edgesplit agent --client-key agent.key_secret``; its
``agent.key`` goes into the server's ``--allow-keys`` directory). See edgesplit/wire/curve.py.
Edge plane: pyzmq only.
"""

from __future__ import annotations

import argparse
import sys

from .wire.curve import PUBLIC_SUFFIX, KeyFileError, fingerprint, generate, load_public


def build_parser(prog: str = "edgesplit keys") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="CURVE key pairs for encrypted, authenticated agent <-> server links"
    )
    sub = p.add_subparsers(dest="action", required=True)
    g = sub.add_parser("gen", help="create NAME.key (public) and NAME.key_secret (secret) in DIR")
    g.add_argument("name", help="key name: 'server', or the agent's name")
    g.add_argument("--out", required=True, metavar="DIR", help="directory for the two files (created if missing)")
    g.add_argument("--force", action="store_true", help="replace existing files of that name")
    return p


def keys_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        public, secret = generate(args.name, args.out, overwrite=args.force)
    except (KeyFileError, OSError) as e:
        print(f"edgesplit keys: {e}", file=sys.stderr)
        return 1
    print(f"public key: {public}  ({fingerprint(load_public(public))}...)")
    print(f"secret key: {secret}  (keep it on this machine only)")
    if args.name == "server":
        print(
            f"next: edgesplit serve --curve-secret {secret} --allow-keys DIR (a directory of agents' *{PUBLIC_SUFFIX} "
            f"files); agents get {public.name} as --server-key"
        )
    else:
        print(
            f"next: copy {public.name} into the server's --allow-keys directory; "
            f"edgesplit agent --client-key {secret} --server-key server{PUBLIC_SUFFIX} ..."
        )
    return 0


if __name__ == "__main__":
    sys.exit(keys_main(sys.argv[1:]))
