"""Over-the-air bundle updates (PROTOCOL.md §14) with real processes: an `edgesplit serve` process
offering group `cams` a signed bundle, an `edgesplit agent` process streaming real CIFAR-10 frames
while it fetches, verifies and switches, killed with -9 where the fault asks for it.

In every case the agent ends on a verified bundle (the new one, or the old one), every frame it
read is answered exactly once, and the reason for any refusal is in its log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from build_fixtures import one_torch_thread  # noqa: F401  (one torch thread for the bundle export)
from ota_fixtures import (
    OtaWorld,
    agent_cmd,
    build_world,
    events,
    named,
    results,
    run_agent,
    start_agent,
    wait_for,
)

from edgesplit.bench.serverproc import ServerProcess
from edgesplit.bundle_sign import load_public, verify_bundle

SERVER_ARGS = ["--threads", "1", "--max-queue-delay-us", "0"]
FRAMES = 60


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bundle) -> OtaWorld:
    return build_world(tmp_path_factory.mktemp("ota"), tiny_bundle)


def serve(world: OtaWorld, offer: Path, *extra: str, bundles=()) -> ServerProcess:
    return ServerProcess([world.a.root, *bundles], [*SERVER_ARGS, "--ota-group", f"cams={offer}", *extra]).start()


def final_state(world: OtaWorld, ota_dir: Path) -> str:
    """The bundle hash the agent starts on next time, verified against the pinned key."""
    state = json.loads((ota_dir / "state.json").read_text()) if (ota_dir / "state.json").exists() else {}
    cur = state.get("current")
    if cur is None:
        return world.a.hash  # never committed an update: --bundle
    return verify_bundle(ota_dir / "bundles" / cur, load_public(world.pub)).hash


def check_run(world: OtaWorld, out: Path, n: int = FRAMES) -> tuple[list[dict], dict]:
    """Every frame answered exactly once, each by a bundle the agent had verified."""
    frames, summary = results(out)
    assert summary is not None, "the agent did not finish"
    ids = Counter(f["id"] for f in frames)
    assert len(frames) == n and all(c == 1 for c in ids.values()), ids.most_common(3)
    assert summary["frames"] == n
    assert {f["bundle"] for f in frames} <= {world.a.hash, world.b.hash, world.b_failtail.hash}
    return frames, summary


def test_update_switches_between_frames(world, tmp_path):
    # the server holds each request up to 20 ms to batch it: frames are in flight on A at the switch
    with serve(world, world.b.root, "--max-queue-delay-us", "20000") as srv:
        out, log = tmp_path / "out.jsonl", tmp_path / "agent.log"
        cmd = agent_cmd(world, srv.endpoint, tmp_path / "ota", out, "--inflight", "8", frames=400, fps=0)
        assert run_agent(cmd, log) == 0
    frames, summary = check_run(world, out, 400)
    # frames read before the switch ran on A (those in flight too, answered by the server on A's
    # session), every frame after it on B; never back
    order = [f["bundle"] for f in sorted(frames, key=lambda f: f["id"])]
    first_b = order.index(world.b.hash)
    assert set(order[:first_b]) == {world.a.hash} and set(order[first_b:]) == {world.b.hash}
    (switched,) = named(log, "ota_switched")
    assert switched["in_flight"] >= 1
    assert all(f["source"] == "server" and f.get("error") is None for f in frames)
    assert summary["ota"]["bundle"] == world.b.hash and summary["ota"]["commits"] == 1
    for event in ("ota_download", "ota_downloaded", "ota_staged", "ota_switched", "ota_committed"):
        assert named(log, event), event
    assert final_state(world, tmp_path / "ota") == world.b.hash
    # the next start runs B at once and asks for nothing more
    out2 = tmp_path / "out2.jsonl"
    with serve(world, world.b.root) as srv:
        assert run_agent(agent_cmd(world, srv.endpoint, tmp_path / "ota", out2, frames=10), tmp_path / "2.log") == 0
    frames2, summary2 = check_run(world, out2, 10)
    assert {f["bundle"] for f in frames2} == {world.b.hash} and summary2["ota"]["downloads"] == 0
    # the operator moves the group back to A and stops serving B: the agent starts on --bundle
    out3, log3 = tmp_path / "out3.jsonl", tmp_path / "3.log"
    with serve(world, world.a.root) as srv:
        assert run_agent(agent_cmd(world, srv.endpoint, tmp_path / "ota", out3, frames=10), log3) == 0
    frames3, _ = check_run(world, out3, 10)
    assert {f["bundle"] for f in frames3} == {world.a.hash}
    (fell_back,) = named(log3, "ota_start_fallback")
    assert fell_back["bundle"] == world.b.hash


def test_corrupted_chunk_is_discarded_and_fetched_again(world, tmp_path):
    # the server damages chunk 3 once (after hashing it), as a damaged link would
    with serve(world, world.b.root, "--ota-fault", "corrupt:3:1") as srv:
        out, log = tmp_path / "out.jsonl", tmp_path / "agent.log"
        cmd = agent_cmd(world, srv.endpoint, tmp_path / "ota", out, "--ota-chunk-bytes", "1024")
        assert run_agent(cmd, log) == 0
    _, summary = check_run(world, out)
    bad = named(log, "ota_bad_chunk")
    assert len(bad) == 1 and "does not match its SHA-256" in bad[0]["reason"]
    assert summary["ota"]["bad_chunks"] == 1 and summary["ota"]["bundle"] == world.b.hash
    assert final_state(world, tmp_path / "ota") == world.b.hash


def test_archive_not_matching_the_offer_is_fetched_again(world, tmp_path):
    # a relay that alters chunk 2 and hashes what it sends: every chunk passes its own check, the
    # whole archive fails the offer's hash, and the agent fetches it again (not refused for good)
    with serve(world, world.b.root, "--ota-fault", "rehash:2:1") as srv:
        out, log = tmp_path / "out.jsonl", tmp_path / "agent.log"
        cmd = agent_cmd(world, srv.endpoint, tmp_path / "ota", out, "--ota-chunk-bytes", "1024", "--ota-poll-s", "1")
        assert run_agent(cmd, log) == 0
    _, summary = check_run(world, out)
    (abandoned,) = named(log, "ota_abandoned")
    assert "does not match the offer's SHA-256" in abandoned["reason"] and not named(log, "ota_rejected")
    assert len(named(log, "ota_downloaded")) == 2 and summary["ota"]["bundle"] == world.b.hash
    assert final_state(world, tmp_path / "ota") == world.b.hash


def test_server_update_budget_slows_the_download_but_it_completes(world, tmp_path):
    # 16 kbit/s for all agents' chunks (a 1 KiB bucket): the agent, asking back to back, is refused
    # OVERLOADED and retries
    with serve(world, world.b.root, "--ota-max-kbps", "16") as srv:
        out, log = tmp_path / "out.jsonl", tmp_path / "agent.log"
        cmd = agent_cmd(world, srv.endpoint, tmp_path / "ota", out, "--ota-chunk-bytes", "1024", frames=300)
        assert run_agent(cmd, log) == 0
    _, summary = check_run(world, out, 300)
    assert summary["ota"]["overloaded"] >= 1 and summary["ota"]["bundle"] == world.b.hash


def test_a_chunk_corrupted_every_time_abandons_the_download(world, tmp_path):
    with serve(world, world.b.root, "--ota-fault", "corrupt:2:1000") as srv:
        out, log = tmp_path / "out.jsonl", tmp_path / "agent.log"
        cmd = agent_cmd(world, srv.endpoint, tmp_path / "ota", out, "--ota-chunk-bytes", "1024")
        assert run_agent(cmd, log) == 0
    frames, summary = check_run(world, out)
    assert {f["bundle"] for f in frames} == {world.a.hash}
    (abandoned,) = named(log, "ota_abandoned")
    assert "5 chunks failed in a row" in abandoned["reason"]
    assert summary["ota"]["bundle"] == world.a.hash and final_state(world, tmp_path / "ota") == world.a.hash


@pytest.mark.parametrize("case", ["wrong_signature", "hashes_do_not_match_manifest"])
def test_bad_bundle_is_refused_and_the_old_one_keeps_serving(world, tmp_path, case):
    if case == "wrong_signature":
        offer, bundles, reason = world.b_other_key, (), "signature refused"
    else:  # the server serves B, but the archive it offers has B's head altered after signing
        offer, bundles, reason = world.b_tampered_tar, (world.b.root,), "do not match the manifest"
    with serve(world, offer, bundles=bundles) as srv:
        out, log = tmp_path / "out.jsonl", tmp_path / "agent.log"
        assert run_agent(agent_cmd(world, srv.endpoint, tmp_path / "ota", out), log) == 0
    frames, summary = check_run(world, out)
    assert {f["bundle"] for f in frames} == {world.a.hash}  # never switched
    (rejected,) = named(log, "ota_rejected")
    assert reason in rejected["reason"], rejected
    state = json.loads((tmp_path / "ota" / "state.json").read_text())
    assert reason in next(iter(state["rejected"].values()))
    assert not any((tmp_path / "ota" / "bundles").iterdir())  # nothing unverified kept
    assert final_state(world, tmp_path / "ota") == world.a.hash and summary["ota"]["switches"] == 0


def test_full_disk_while_staging_keeps_the_old_bundle(world, tmp_path):
    ota_dir = tmp_path / "ota"
    ota_dir.mkdir()
    # room for the archive (18 KB), not for it and the unpacked bundle (38 KB) together
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(ota_dir)], capture_output=True, text=True
    )
    if r.returncode != 0:
        if os.geteuid() == 0:  # as root (CI) mounting a tmpfs must work: a failure here is a real one
            pytest.fail(f"cannot mount a tmpfs for the full-disk case as root: {r.stderr.strip()}")
        pytest.skip(f"mounting a tmpfs for the full-disk case needs root: {r.stderr.strip()}")
    try:
        with serve(world, world.b.root) as srv:
            out, log = tmp_path / "out.jsonl", tmp_path / "agent.log"
            assert run_agent(agent_cmd(world, srv.endpoint, ota_dir, out), log) == 0
        frames, summary = check_run(world, out)
        assert {f["bundle"] for f in frames} == {world.a.hash}
        refusals = named(log, "ota_rejected") + named(log, "ota_abandoned") + named(log, "ota_refused")
        assert refusals and any("no space left" in x["reason"] or "not enough space" in x["reason"] for x in refusals)
        assert summary["ota"]["bundle"] == world.a.hash
        assert not list((ota_dir / "staging").iterdir())  # nothing half-unpacked left behind
    finally:
        subprocess.run(["umount", str(ota_dir)], capture_output=True)


def test_failed_health_check_rolls_back_between_frames(world, tmp_path):
    # B_failtail loads and warms up on the agent, but the server fails its tail on real frames
    with serve(world, world.b_failtail.root) as srv:
        out, log = tmp_path / "out.jsonl", tmp_path / "agent.log"
        assert run_agent(agent_cmd(world, srv.endpoint, tmp_path / "ota", out), log) == 0
    frames, summary = check_run(world, out)
    order = [f["bundle"] for f in sorted(frames, key=lambda f: f["id"])]
    assert world.b_failtail.hash in order and order[-1] == world.a.hash  # switched, then back
    on_new = [f for f in frames if f["bundle"] == world.b_failtail.hash]
    assert all(f["fallback_reason"] == "INTERNAL" or f.get("error") == "INTERNAL" for f in on_new)
    (rolled,) = named(log, "ota_rolled_back")
    assert "health check failed" in rolled["reason"] and "INTERNAL" in rolled["reason"]
    assert summary["ota"]["rollbacks"] == 1 and summary["ota"]["bundle"] == world.a.hash
    assert final_state(world, tmp_path / "ota") == world.a.hash


def test_warm_up_failure_never_switches(world, tmp_path):
    with serve(world, world.b_nan.root) as srv:
        out, log = tmp_path / "out.jsonl", tmp_path / "agent.log"
        assert run_agent(agent_cmd(world, srv.endpoint, tmp_path / "ota", out), log) == 0
    frames, summary = check_run(world, out)
    assert {f["bundle"] for f in frames} == {world.a.hash}
    (rejected,) = named(log, "ota_rejected")
    assert "warm-up" in rejected["reason"] and "non-finite" in rejected["reason"]
    assert summary["ota"]["switches"] == 0 and final_state(world, tmp_path / "ota") == world.a.hash


def test_kill9_mid_download_resumes(world, tmp_path):
    ota_dir = tmp_path / "ota"
    with serve(world, world.b.root) as srv:
        # paced to 16 kbit/s with 1 KiB chunks: the 18 KB archive takes about 9 s
        cmd = agent_cmd(
            world, srv.endpoint, ota_dir, tmp_path / "killed.jsonl", "--ota-kbps", "16", "--ota-chunk-bytes", "1024",
            frames=0, fps=5,
        )  # fmt: skip
        proc = start_agent(cmd, tmp_path / "killed.log")
        part = lambda: [p.stat().st_size for p in (ota_dir / "download").glob("*.part")]  # noqa: E731
        try:
            wait_for(
                lambda: (ota_dir / "download").is_dir() and any(s >= 4096 for s in part()), 60, "a partial download"
            )
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        (have,) = part()
        assert 4096 <= have < 18000
        out, log = tmp_path / "out.jsonl", tmp_path / "agent.log"
        assert run_agent(agent_cmd(world, srv.endpoint, ota_dir, out, "--ota-chunk-bytes", "1024"), log) == 0
    _, summary = check_run(world, out)
    (dl,) = named(log, "ota_download")
    assert dl["resume_from"] >= have and "resuming at byte" in dl["msg"]
    assert summary["ota"]["resumed_from"] >= have
    assert summary["ota"]["bytes_received"] == dl["size"] - dl["resume_from"]
    assert summary["ota"]["bundle"] == world.b.hash and final_state(world, ota_dir) == world.b.hash


def test_kill9_mid_switch_restarts_on_a_verified_bundle(world, tmp_path):
    ota_dir = tmp_path / "ota"
    with serve(world, world.b.root) as srv:
        # a health window the first run never finishes: killed after the switch, before the verdict
        cmd = agent_cmd(world, srv.endpoint, ota_dir, tmp_path / "killed.jsonl", "--ota-health-frames", "100000")
        cmd[cmd.index("--frames") + 1] = "0"
        proc = start_agent(cmd, tmp_path / "killed.log")
        try:
            wait_for(lambda: named(tmp_path / "killed.log", "ota_switched"), 60, "the switch")
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        state = json.loads((ota_dir / "state.json").read_text())
        assert state["current"] is None and state["trying"] == {"bundle": world.b.hash, "attempts": 1}
        assert final_state(world, ota_dir) == world.a.hash  # a restart now would start on A
        out, log = tmp_path / "out.jsonl", tmp_path / "agent.log"
        assert run_agent(agent_cmd(world, srv.endpoint, ota_dir, out), log) == 0
    frames, summary = check_run(world, out)
    assert named(log, "ota_retry") and named(log, "ota_committed")
    assert summary["ota"]["downloads"] == 0  # the verified, staged bundle was tried again
    assert frames[0]["bundle"] == world.a.hash and summary["ota"]["bundle"] == world.b.hash
    assert final_state(world, ota_dir) == world.b.hash
    assert all(r.get("level") != "ERROR" for r in events(log))


def test_server_kill9_mid_download_resumes_on_the_same_connection(world, tmp_path):
    """A dropped link (the server killed and restarted): the agent re-handshakes, gets the same
    offer (the archive is deterministic, so the restarted server's has the same hash) and asks on
    from the bytes it has; no byte is fetched twice."""
    ota_dir = tmp_path / "ota"
    out, log = tmp_path / "out.jsonl", tmp_path / "agent.log"
    srv = serve(world, world.b.root)
    try:
        cmd = agent_cmd(world, srv.endpoint, ota_dir, out, "--ota-kbps", "24", "--ota-chunk-bytes", "1024", fps=10)
        cmd[cmd.index("--frames") + 1] = "150"
        proc = start_agent(cmd, log)
        part = lambda: [p.stat().st_size for p in (ota_dir / "download").glob("*.part")]  # noqa: E731
        wait_for(lambda: (ota_dir / "download").is_dir() and any(s >= 4096 for s in part()), 60, "a partial download")
        srv.kill9()
        time.sleep(1.0)
        srv.start()
        assert proc.wait(120) == 0
    finally:
        srv.stop()
    frames, summary = check_run(world, out, 150)
    assert summary["local"] >= 1 and summary["ota"]["downloads"] == 1  # the outage was real: frames answered locally
    (dl,) = named(log, "ota_download")  # one offer accepted: the second one was the same
    assert summary["ota"]["bytes_received"] == dl["size"]  # nothing fetched twice
    assert summary["ota"]["bundle"] == world.b.hash and final_state(world, ota_dir) == world.b.hash
