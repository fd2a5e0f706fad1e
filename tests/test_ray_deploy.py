"""deploy/ray/: the Ray Serve config and the KubeRay RayService manifest stay consistent with the
code. No Ray cluster on Kubernetes runs here, so they are checked structurally: the config
validates with Ray Serve's own schema (ServeDeploySchema), each application's args build the
deployment with edgesplit.server.ray_app.build, the manifest carries the same Serve config, and its
gateway container's command parses with the real `edgesplit serve` parser and names that
application and bundle. (tests/test_ray_gateway.py runs the application on a real local cluster.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edgesplit.server.cli import build_parser

pytest.importorskip("ray.serve", reason="the 'ray' extra (ray[serve]) is not installed")
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from edgesplit.server.ray_app import build  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "deploy" / "ray" / "serve-config.yaml").read_text())
MANIFEST = list(yaml.safe_load_all((ROOT / "deploy" / "ray" / "rayservice.yaml").read_text()))


def test_serve_config_validates_and_builds():
    schema = ServeDeploySchema.model_validate(CONFIG)
    assert [a.name for a in schema.applications] == ["edgesplit-cifar10"]
    for app in schema.applications:
        assert app.import_path == "edgesplit.server.ray_app:build"
        built = build(app.args)  # unknown keys would be refused
        assert type(built).__name__ == "Application"
        bundle = Path(app.args["bundle"])
        assert bundle.parent == Path("/bundles") and (ROOT / "models" / bundle.name / "manifest.json").is_file()


def test_rayservice_carries_the_config_and_a_gateway_per_worker():
    service, svc = MANIFEST
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == CONFIG
    app = CONFIG["applications"][0]
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = cluster["workerGroupSpecs"]
    pod = group["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    gw = containers["gateway"]
    args = build_parser().parse_args(gw["args"])
    assert gw["command"] == ["edgesplit", "serve"]
    assert (args.backend, args.ray_app, args.bundle) == ("ray", app["name"], [app["args"]["bundle"]])
    assert args.max_batch <= app["args"]["max_batch"]
    assert args.ray_address == f"{service['metadata']['name']}-head-svc:6379"
    # the gateway reaches the raylet through its sockets in Ray's session folder: shared
    volumes = {v["name"] for v in pod["volumes"]}
    for c in containers.values():
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts["/bundles"] == "bundles" and mounts["/tmp/ray"] == "ray-tmp"
        assert set(mounts.values()) <= volumes
        assert c["image"] == "edgesplit-ray:latest"
    probe = gw["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/health/ready", args.http_port)
    assert svc["kind"] == "Service" and svc["spec"]["selector"] == group["template"]["metadata"]["labels"]
    assert svc["spec"]["ports"][0]["targetPort"] == int(args.bind.rsplit(":", 1)[1])
    assert (ROOT / "docker" / "ray.Dockerfile").read_text().count("'.[server,ray]'") == 1


COMPOSE = yaml.safe_load((ROOT / "deploy" / "ray" / "compose-cluster.yml").read_text())


def test_compose_cluster_is_consistent():
    """deploy/ray/compose-cluster.yml: images build from files that exist, the mounted config is
    serve-config.yaml, the gateway's and agent's commands parse with the real parsers and meet on
    the worker's network, the gateway shares Ray's session folder with the worker."""
    from edgesplit.edge.agent import build_parser as agent_parser

    here = ROOT / "deploy" / "ray"
    svc = COMPOSE["services"]
    assert set(svc) == {"ray-head", "ray-worker", "serve-deploy", "gateway", "agent"}
    for s in svc.values():
        assert ((here / s["build"]["context"]).resolve() / s["build"]["dockerfile"]).is_file()
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert (here / src).exists(), src
            elif not src.startswith("$"):
                assert src in COMPOSE["volumes"], src
    deploy = svc["serve-deploy"]
    cfg_src, cfg_dst = deploy["volumes"][0].split(":")[:2]
    assert (here / cfg_src).resolve() == here / "serve-config.yaml" and deploy["command"][:3] == [
        "serve",
        "deploy",
        cfg_dst,
    ]
    gw = build_parser().parse_args(svc["gateway"]["command"])
    app = CONFIG["applications"][0]
    assert svc["gateway"]["entrypoint"] == ["edgesplit", "serve"]
    assert (gw.backend, gw.ray_app, gw.bundle) == ("ray", app["name"], [app["args"]["bundle"]])
    assert svc["gateway"]["network_mode"] == "service:ray-worker"
    assert "ray-tmp:/tmp/ray" in svc["gateway"]["volumes"] and "ray-tmp:/tmp/ray" in svc["ray-worker"]["volumes"]
    a = agent_parser().parse_args(svc["agent"]["command"])
    assert a.server == f"tcp://ray-worker:{gw.bind.rsplit(':', 1)[1]}"
    assert a.bundle == app["args"]["bundle"]
