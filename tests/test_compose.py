"""docker-compose.yml stays consistent with the code. No Docker engine runs on CI machines, so the
file is checked structurally: every Dockerfile and bind-mounted path exists, every command parses
with the real CLI parsers, the key files the services name are on volumes they mount. The parts
that are plain commands run for real here: the `keys` service's script (with its volumes mapped to
temporary directories) makes keys that a real CURVE server and agent then use, and the server's
healthcheck command probes a real daemon. ``docker compose config`` runs where the CLI has it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

from edgesplit.edge.agent import Agent
from edgesplit.edge.agent import build_parser as agent_parser
from edgesplit.keys_cli import build_parser as keys_parser
from edgesplit.server.daemon import Server
from edgesplit.server.daemon import build_parser as serve_parser
from edgesplit.wire.curve import ServerCurve

ROOT = Path(__file__).resolve().parents[1]
SPEC = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = SPEC["services"]


def mounts(svc: dict) -> dict[str, str]:
    """Container path -> source (a named volume or a host path) of a service's volumes."""
    out = {}
    for v in svc.get("volumes", []):
        src, dst = v.split(":")[:2]
        out[dst] = src
    return out


def on_mount(svc: dict, path: str) -> tuple[str, str]:
    """(volume or host source, path inside it) for a container path, which must be on a mount."""
    p = PurePosixPath(path)
    for dst, src in mounts(svc).items():
        if p == PurePosixPath(dst) or PurePosixPath(dst) in p.parents:
            return src, str(p.relative_to(dst))
    raise AssertionError(f"{path} is on none of the service's volumes {mounts(svc)}")


def test_compose_services_build_and_mount_real_paths():
    assert set(SERVICES) == {"keys", "server", "agent"}
    for name, svc in SERVICES.items():
        assert (ROOT / svc["build"]["dockerfile"]).is_file(), name
        for src in mounts(svc).values():
            if src.startswith("./"):
                assert (ROOT / src).exists(), (name, src)
            elif not src.startswith("$"):  # a named volume: declared at the top level
                assert src in SPEC["volumes"], (name, src)
    bundle = SERVICES["server"]["command"][1]
    assert bundle.startswith("/bundles/")
    assert (ROOT / "models" / Path(bundle).name / "manifest.json").is_file()


def test_compose_commands_parse_with_the_real_cli_and_name_mounted_keys():
    server, agent = SERVICES["server"], SERVICES["agent"]
    s = serve_parser().parse_args(server["command"])
    a = agent_parser().parse_args(agent["command"])
    assert s.bind.endswith(":5555") and a.server == "tcp://server:5555"
    # each side reads its keys from its own volume; the agent never sees the server's secret
    assert on_mount(server, s.curve_secret)[0] == on_mount(server, s.allow_keys)[0] == "server-keys"
    assert on_mount(agent, a.server_key)[0] == on_mount(agent, a.client_key)[0] == "agent-keys"
    assert "server-keys" not in mounts(agent).values()
    # the metrics/health port is published, and the healthcheck asks /health/ready on it
    assert s.http_host == "0.0.0.0" and f"{s.http_port}:{s.http_port}" in server["ports"]
    probe = server["healthcheck"]["test"]
    assert probe[:2] == ["CMD", "python"] and f"127.0.0.1:{s.http_port}/health/ready" in probe[-1]
    assert agent["depends_on"]["server"]["condition"] == "service_healthy"
    assert server["depends_on"]["keys"]["condition"] == "service_completed_successfully"
    assert s.log_format == "json"


def _keys_script() -> str:
    svc = SERVICES["keys"]
    assert svc["entrypoint"] == ["sh", "-c"]
    return svc["command"][0]


def test_keys_service_commands_parse_with_the_real_cli():
    gens = [shlex.split(part.split("||")[-1]) for part in _keys_script().split(";") if "edgesplit keys" in part]
    assert len(gens) == 2
    for argv in gens:
        assert argv[:2] == ["edgesplit", "keys"]
        keys_parser().parse_args(argv[2:])


def test_keys_service_script_makes_keys_a_real_server_and_agent_use(tiny_bundle, cifar_samples, tmp_path):
    # The script, with each volume's mount point mapped to a temporary directory and the
    # `edgesplit` command of this environment; run twice, as on every `compose up` (the second
    # run must keep the keys).
    keys_svc = SERVICES["keys"]
    volume_dir = {src: tmp_path / src for src in mounts(keys_svc).values()}
    script = _keys_script()
    for dst, src in mounts(keys_svc).items():
        volume_dir[src].mkdir()
        script = re.sub(re.escape(dst) + r"(?=[/\s;]|$)", str(volume_dir[src]), script)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(["sh", "-c", script], check=True, env=env, capture_output=True, timeout=120)
    secret_mtime = (volume_dir["server-keys"] / "server.key_secret").stat().st_mtime_ns
    subprocess.run(["sh", "-c", script], check=True, env=env, capture_output=True, timeout=120)
    assert (volume_dir["server-keys"] / "server.key_secret").stat().st_mtime_ns == secret_mtime

    def host_path(svc: dict, path: str) -> Path:
        vol, rel = on_mount(svc, path)
        return volume_dir[vol] / rel

    s = serve_parser().parse_args(SERVICES["server"]["command"])
    a = agent_parser().parse_args(SERVICES["agent"]["command"])
    curve = ServerCurve.load(host_path(SERVICES["server"], s.curve_secret), host_path(SERVICES["server"], s.allow_keys))
    with Server([tiny_bundle], "tcp://127.0.0.1:0", threads=1, max_queue_delay_us=0, curve=curve) as srv:
        agent = Agent(
            tiny_bundle,
            srv.endpoint,
            threads=1,
            timeout_s=20,
            server_key=host_path(SERVICES["agent"], a.server_key),
            client_key=host_path(SERVICES["agent"], a.client_key),
        ).connect()
        assert agent.infer(cifar_samples[0]).ok
        agent.close()


def test_server_healthcheck_command_probes_a_real_daemon(tiny_bundle):
    probe = SERVICES["server"]["healthcheck"]["test"][1:]
    port = serve_parser().parse_args(SERVICES["server"]["command"]).http_port
    srv = Server([tiny_bundle], "tcp://127.0.0.1:0", threads=1, http_port=0).start()
    try:
        cmd = [
            sys.executable if probe[0] == "python" else probe[0],
            *probe[1:-1],
            probe[-1].replace(f":{port}/", f":{srv.http.port}/"),
        ]
        assert subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
        srv.request_stop()  # draining: the healthcheck must now fail
        assert subprocess.run(cmd, capture_output=True, timeout=60).returncode != 0
    finally:
        srv.stop()


def test_docker_compose_config_accepts_the_file():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip(
            "docker is not installed here (tools/setup.sh does not provide it; the structural checks above still ran)"
        )
    if subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60).returncode != 0:
        pytest.skip(
            "docker here has no compose plugin (tools/setup.sh does not provide it; the structural checks above still ran)"
        )
    r = subprocess.run(
        [docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr


def test_agent_image_installs_no_torch():
    text = (ROOT / "docker" / "agent.Dockerfile").read_text()
    assert "'.[edge]'" in text and "torch" not in text.replace("no torch", "")


def test_server_image_exposes_the_ports_compose_publishes():
    text = (ROOT / "docker" / "server.Dockerfile").read_text()
    s = serve_parser().parse_args(SERVICES["server"]["command"])
    exposed = {int(p) for line in text.splitlines() if line.startswith("EXPOSE") for p in line.split()[1:]}
    assert {int(s.bind.rsplit(":", 1)[1]), s.http_port} <= exposed
    assert "'.[server]'" in text  # the server extra carries prometheus-client
