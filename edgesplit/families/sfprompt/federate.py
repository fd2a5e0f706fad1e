"""``edgesplit federate RECIPE --out DIR``: an SFPrompt federation on this machine, every party a
real process on loopback: the body server (``edgesplit.server.body_server``), a Flower SuperLink,
K Flower SuperNodes (one per client, ``partition-id`` i), and ``flwr run`` of the app in
:mod:`.flower_apps`, which the SuperLink runs as ``flwr-serverapp`` and each SuperNode as
``flwr-clientapp`` per message. Waits for the run, then stops what it started (each child in its
own process group, ended by group id) and prints the results.

Two links, each secured on its own:

- the body link (split training's tokens and gradients, edgesplit's wire): ``--curve`` encrypts
  and authenticates it with CURVE (keys made per job in ``OUT/curve``: the server's, one per
  client, the clients' public keys as the server's allow-list); plaintext without it.
- Flower's links (the model exchange: SuperNodes to the SuperLink's Fleet API, ``flwr run`` and
  ``flwr supernode register`` to its Control API, the ServerApp to its Runtime API, all one HTTPS
  port): TLS by default, with a CA and server certificate made per job in ``OUT/tls``
  (:mod:`.tls`; ``--tls-dir`` gives one's own). SuperNodes and ``flwr`` verify the SuperLink's
  certificate against the CA; the SuperLink admits only SuperNodes whose key was registered
  (Flower's SuperNode authentication: one EC key pair per client in ``OUT/tls``, each public key
  registered with ``flwr supernode register`` before the SuperNodes start, each request signed).
  What TLS leaves open: Flower's Control API has no account authentication outside Flower's
  enterprise edition, so whoever reaches the SuperLink's port and trusts its certificate can start
  a run or register a node (here it listens on 127.0.0.1 only); and each SuperNode talks to its
  own ClientApp process over plaintext HTTP on 127.0.0.1. ``--insecure`` turns Flower's TLS and
  SuperNode authentication off.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .job import prepare_job
from .tls import DEFAULT_HOSTS, NodeKey, ServerTls, check_server_tls, node_keys, server_tls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Procs:
    """Children started in their own sessions, so each is ended with everything it started."""

    def __init__(self, logs: Path):
        self.logs, self.children = logs, {}  # name -> Popen
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], env: dict[str, str], stdout=None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        p = subprocess.Popen(argv, stdout=stdout or log, stderr=log, env=env, start_new_session=True)
        self.children[name] = p
        return p

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        p = self.children.pop(name, None)
        if p is None:
            return
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def stop_all(self) -> None:
        for name in reversed(list(self.children)):
            self.stop(name)


def _wait_port(port: int, timeout: float) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def flower_env(home: Path) -> dict[str, str]:
    """The environment of Flower's processes: ``FLWR_HOME``, one thread each, unbuffered logs, and
    this interpreter's script folder first on PATH: the SuperLink starts ``flower-superexec`` (and
    it the apps) by name, so an ``edgesplit`` run from a virtual environment that is not activated
    would otherwise find none, or another installation's."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join([bin_dir, os.environ.get("PATH", "")]) if os.environ.get("PATH") else bin_dir
    return {**os.environ, "PATH": path, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def flwr_config(link_port: int, tls: ServerTls | None) -> str:
    """``FLWR_HOME/config.toml`` for ``flwr run`` and ``flwr supernode register``: the SuperLink
    here, verified against the job's CA (or plaintext)."""
    trust = f"root-certificates = {json.dumps(str(tls.ca))}" if tls else "insecure = true"
    return f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{link_port}"\n{trust}\n'


def superlink_argv(link_port: int, tls: ServerTls | None, node_auth: bool) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if tls is None:
        security = ["--insecure"]
    else:  # the CA too: the SuperLink hands it to the ServerApp process that dials it back
        security = ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
        security += ["--enable-supernode-auth"] if node_auth else []
    return [
        str(bin_dir / "flower-superlink"),
        *security,
        "--disable-runtime-dependency-installation",
        "--port",
        str(link_port),
    ]


def supernode_argv(
    link_port: int, partition_id: int, clients: int, ca: Path | None, key: NodeKey | None, *extra: str
) -> list[str]:
    """``ca``: the CA the SuperLink's certificate must chain to (None: plaintext); ``key``: this
    SuperNode's authentication key (None: a throwaway one, admitted only without authentication)."""
    return [
        str(Path(sys.executable).parent / "flower-supernode"),
        *(["--root-certificates", str(ca)] if ca else ["--insecure"]),
        *(["--auth-supernode-private-key", str(key.private)] if key else []),
        "--superlink",
        f"127.0.0.1:{link_port}",
        "--port",
        str(free_port()),
        "--node-config",
        f"partition-id={partition_id} num-partitions={clients}",
        *extra,
    ]


def register_supernodes(keys: list[NodeKey], env: dict[str, str], timeout_s: float = 120.0) -> None:
    """Register each public key with the SuperLink of ``env``'s ``FLWR_HOME`` (its Control API,
    over TLS), all at once: the SuperLink then admits the SuperNodes holding those keys, no other."""
    flwr = str(Path(sys.executable).parent / "flwr")
    calls = [
        subprocess.Popen(
            [flwr, "supernode", "register", str(k.public), "local", "--format", "json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for k in keys
    ]
    failed = []
    t_end = time.monotonic() + timeout_s
    for k, c in zip(keys, calls, strict=True):
        try:
            out, _ = c.communicate(timeout=max(t_end - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            c.kill()
            out, _ = c.communicate()
            failed.append(f"{k.public}: no answer after {timeout_s} s")
            continue
        if c.returncode != 0:
            failed.append(f"{k.public}: rc {c.returncode}: {out[-800:]}")
    if failed:
        raise RuntimeError("registering the SuperNodes' keys failed: " + "; ".join(failed))


def run_federation(
    job_dir: Path,
    clients: int,
    *,
    nice: int = 0,
    timeout_s: float = 3600.0,
    faults: dict[int, str] | None = None,
    tls: ServerTls | None = None,
    keys: list[NodeKey] | None = None,
) -> dict:
    """Start the processes for the prepared job in ``job_dir``, run it, stop them; the results.
    ``faults``: client -> fault kind injected in round 0 (:data:`.flower_apps.FAULTS`). ``tls``:
    the SuperLink's certificate (None: Flower's links in plaintext); ``keys``: one authentication
    key per client, registered before the SuperNodes start (None: any SuperNode is admitted)."""
    from .job import Job

    job = Job.load(job_dir / "job.json")
    if keys is not None and (tls is None or len(keys) != clients):
        raise ValueError("SuperNode authentication needs TLS and one key per client")
    bin_dir = Path(sys.executable).parent
    home = job_dir / "flwr-home"
    home.mkdir(exist_ok=True)
    link_port = free_port()
    (home / "config.toml").write_text(flwr_config(link_port, tls))
    app = job_dir / "flower-app"
    app.mkdir(exist_ok=True)
    from .flower_apps import FAULT_ENV, flower_app_pyproject

    (app / "pyproject.toml").write_text(flower_app_pyproject(job_dir / "job.json"))
    env = flower_env(home)
    pre = ["nice", "-n", str(nice)] if nice else []
    procs = Procs(job_dir / "logs")
    try:
        body = procs.start(
            "body-server",
            [
                *pre,
                sys.executable,
                "-m",
                "edgesplit.server.body_server",
                str(job_dir / "body"),
                "--bind",
                job.body_endpoint,
                *(
                    ["--curve-secret", f"{job.curve_dir}/server.key_secret", "--allow-keys", f"{job.curve_dir}/allow"]
                    if job.curve_dir
                    else []
                ),
            ],
            env,
            stdout=subprocess.PIPE,
        )
        assert body.stdout is not None
        line = body.stdout.readline()
        if not line:
            raise RuntimeError(f"the body server did not start (see {job_dir / 'logs' / 'body-server.log'})")
        procs.start("superlink", [*pre, *superlink_argv(link_port, tls, keys is not None)], env)
        _wait_port(link_port, 60)
        if keys is not None:
            register_supernodes(keys, env)
        for i in range(clients):
            procs.start(
                f"supernode-{i}",
                [*pre, *supernode_argv(link_port, i, clients, tls.ca if tls else None, keys[i] if keys else None)],
                {**env, FAULT_ENV: faults[i]} if faults and i in faults else env,
            )
        run = subprocess.run(
            [str(bin_dir / "flwr"), "run", str(app), "local", "--stream"],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        (job_dir / "logs" / "flwr-run.log").write_text(run.stdout + run.stderr)
        results = job_dir / "results.json"
        if run.returncode != 0 or not results.is_file():
            raise RuntimeError(f"the Flower run failed (rc {run.returncode}): {(run.stdout + run.stderr)[-2000:]}")
        return json.loads(results.read_text())
    finally:
        procs.stop_all()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="edgesplit federate",
        description="Run an SFPrompt federation on this machine: body server, Flower SuperLink, one SuperNode "
        "per client, and the rounds (every party a process on loopback).",
    )
    p.add_argument("recipe", help="an SFPrompt recipe (split.family: sfprompt)")
    p.add_argument("--out", required=True, help="the job directory (data, partitions, checkpoints, logs, results)")
    p.add_argument("--teacher", default=None, help="pretrained ViT weights (default: the recipe's teacher)")
    p.add_argument("--limit-per-shard", type=int, default=None, help="use only the first N frames of each shard")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--clients", type=int, default=None, help="K (default: the recipe's split.clients)")
    p.add_argument("--per-round", type=int, default=None)
    p.add_argument("--round-timeout-s", type=float, default=600.0, help="a round's deadline for the replies")
    p.add_argument("--nice", type=int, default=0, help="run every process at this niceness")
    p.add_argument("--curve", action="store_true", help="CURVE on the body link (keys made in OUT/curve)")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="Flower's links in plaintext, any SuperNode admitted (default: TLS with a CA and server certificate "
        "made per job in OUT/tls, and only the job's SuperNodes admitted, each with its key registered)",
    )
    p.add_argument(
        "--tls-dir",
        default=None,
        metavar="DIR",
        help="the SuperLink's TLS files from DIR instead of OUT/tls: ca.pem, server.pem (signed by ca.pem, "
        "naming 127.0.0.1, which the SuperNodes here dial) and server.key",
    )
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="I:KIND",
        help="fault injection in round 0 for tests and benchmarks: client I sends NaNs (nan), a mis-shaped "
        "update (shape), answers after the deadline (hang) or dies mid-round (exit)",
    )
    a = p.parse_args(argv)
    faults = {}
    for f in a.fault:
        i, _, kind = f.partition(":")
        if not i.isdigit() or kind not in ("nan", "shape", "hang", "exit"):
            p.error(f"--fault {f!r}: expected I:KIND with KIND one of nan, shape, hang, exit")
        faults[int(i)] = kind
    if a.insecure and a.tls_dir:
        p.error("--insecure and --tls-dir: choose one")
    tls = None
    if a.tls_dir:
        d = Path(a.tls_dir).resolve()
        tls = ServerTls(d / "ca.pem", d / "server.pem", d / "server.key")
        try:
            check_server_tls(tls, DEFAULT_HOSTS[:1])
        except ValueError as e:
            p.error(f"--tls-dir: {e}")
    out = Path(a.out)
    job_file = out / "job.json"
    if job_file.is_file():  # a stopped run resumes from its checkpoint with the same data and partition
        from .job import Job

        job = Job.load(job_file)
    else:
        job = prepare_job(
            a.recipe,
            out,
            teacher=a.teacher,
            limit_per_shard=a.limit_per_shard,
            rounds=a.rounds,
            clients=a.clients,
            per_round=a.per_round,
            round_timeout_s=a.round_timeout_s,
            body_endpoint=f"tcp://127.0.0.1:{free_port()}",
            curve=a.curve,
        )
    keys = None
    if not a.insecure:  # made once per job, reused when it resumes
        tls = tls or server_tls(out.resolve() / "tls")
        keys = node_keys(out.resolve() / "tls", job.clients)
    try:
        res = run_federation(out, job.clients, nice=a.nice, faults=faults, tls=tls, keys=keys)
    except (RuntimeError, TimeoutError) as e:
        done = json.loads((out / "federated.json").read_text())["round"] if (out / "federated.json").is_file() else 0
        print(f"edgesplit federate: {e}\n(rounds done: {done}; the same command resumes after it)", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {"accuracy": res["accuracy"], "rounds": [(r["round"], r["accuracy"], r["averaged"]) for r in res["rounds"]]}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
