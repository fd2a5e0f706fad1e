"""docker-compose.yml stays consistent with the code: no Docker engine runs on CI machines, so the
file is checked structurally (and the commands it runs are checked against the real CLI parsers)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_services_build_and_mount_real_paths():
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert set(spec["services"]) == {"server", "agent"}
    for name, svc in spec["services"].items():
        assert (ROOT / svc["build"]["dockerfile"]).is_file(), name
        assert any(v.startswith("./models:") for v in svc["volumes"])
    bundle = spec["services"]["server"]["command"][1]
    assert bundle.startswith("/bundles/")
    assert (ROOT / "models" / Path(bundle).name / "manifest.json").is_file()


def test_compose_commands_parse_with_the_real_cli():
    from edgesplit.edge.agent import build_parser as agent_parser
    from edgesplit.server.daemon import build_parser as serve_parser

    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    s = serve_parser().parse_args(spec["services"]["server"]["command"])
    a = agent_parser().parse_args(spec["services"]["agent"]["command"])
    assert s.bind.endswith(":5555") and a.server == "tcp://server:5555"


def test_agent_image_installs_no_torch():
    text = (ROOT / "docker" / "agent.Dockerfile").read_text()
    assert "'.[edge]'" in text and "torch" not in text.replace("no torch", "")
