"""``edgesplit federate`` end to end, every party a real process on loopback: the body server, a
Flower SuperLink, 3 SuperNodes (one per client, Dirichlet(0.5) partitions of real Imagenette
frames at 32 px), 2 rounds of 2 sampled clients, split training over edgesplit's wire at 8 bits,
CURVE on the body link, and Flower's links as ``edgesplit federate`` runs them by default: TLS with
the job's own CA and server certificate, and only the job's SuperNodes admitted (each with its key
registered with the SuperLink).

The federated global prompts and tail must equal the same rounds simulated in this process (same
partition, sampled clients, seeds, 8-bit tensors; the body here instead of on the body server):
Flower's sampling, message passing and FedAvg, and the wire, change nothing but where things run.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import flwr  # noqa: F401  (the federate extra, which tools/setup.sh installs: missing, this fails)
import numpy as np
import torch
from build_fixtures import one_torch_thread  # noqa: F401  (pytest fixture by name)

from edgesplit.builder.zoo import create_model
from edgesplit.families.sfprompt.job import Job, partition
from edgesplit.families.sfprompt.steps import simulate_job

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "tests" / "recipes" / "tiny-sfprompt-imagenette.yaml"


def test_federate_runs_clients_as_processes_and_equals_the_simulation(tmp_path):
    torch.manual_seed(0)
    teacher = tmp_path / "vit.pt"
    torch.save(create_model("vit_tiny_cifar", 10).state_dict(), teacher)
    out = tmp_path / "job"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgesplit",
            "federate",
            str(RECIPE),
            "--out",
            str(out),
            "--teacher",
            str(teacher),
            "--limit-per-shard",
            "6",
            "--round-timeout-s",
            "300",
            "--nice",
            "10",
            "--curve",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # Flower's links ran over TLS with the job's certificates, and only registered SuperNodes joined
    tls = out / "tls"
    assert all((tls / f).is_file() for f in ("ca.pem", "server.pem", "server.key", "node-2.key"))
    assert all(stat.S_IMODE((tls / f).stat().st_mode) == 0o600 for f in ("server.key", "node-0.key"))
    config = (out / "flwr-home" / "config.toml").read_text()
    assert f"root-certificates = {json.dumps(str((tls / 'ca.pem').resolve()))}" in config
    assert "insecure" not in config
    link_log = (out / "logs" / "superlink.log").read_text()
    assert "running on https://127.0.0.1:" in link_log
    assert "SuperNode authentication is disabled" not in link_log
    assert link_log.count("[ControlServicer.RegisterNode] Created node_id") == 3
    assert link_log.count("[Fleet.ActivateNode] Activated node_id") == 3
    res = json.loads((out / "results.json").read_text())
    job = Job.load(out / "job.json")
    assert (job.clients, job.per_round, job.rounds) == (3, 2, 2)
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    parts = partition(job)
    assert sorted(i for p in parts for i in p) == list(range(60))  # 10 shards x 6 frames, each in one part
    for r in res["rounds"]:
        assert r["averaged"] == 2 and r["dropped"] == 0 and r["refused"] == []
        assert sorted(c["client"] for c in r["clients"]) == r["sampled"]
        for c in r["clients"]:
            assert c["samples"] == len(parts[int(c["client"])]) and c["kept"] == -(-c["samples"] // 2)
            # 8-bit tokens of 4 + 1 + 64 tokens x 128 channels, both ways, per split step
            assert c["bytes_up"] > c["split_steps"] * 2 * 8 * 69 * 128 * 0.5
        assert 0.0 <= r["accuracy"] <= 1.0
    meta = json.loads((out / "federated.json").read_text())
    assert meta["round"] == 2
    with np.load(out / meta["global"]) as z:
        federated = {k: z[k] for k in z.files}
    want = simulate_job(job)
    assert set(federated) == set(want)
    for k in want:
        assert np.allclose(federated[k], want[k], atol=1e-5), k
