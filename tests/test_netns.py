"""Kernel bandwidth shaping: a network namespace whose loopback goes through tc tbf.

Every check sends real TCP traffic through the shaped loopback and compares what arrived with
what the token bucket allows. Skipped (with the reason) only where the user cannot make namespaces
(not root); as root, which CI is, they run, and missing `ip`/`tc` fail them: tools/setup.sh
installs iproute2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgesplit.control.netns import ShapedNamespace, Tbf, TraceReplayer, rate_schedule, shaping_available
from edgesplit.control.traces import Trace

OK, WHY = shaping_available()
AS_ROOT = os.geteuid() == 0
needs_netns = pytest.mark.skipif(not OK and not AS_ROOT, reason=f"kernel shaping unavailable: {WHY}")

# Streams bytes over TCP on the namespace's loopback for `seconds` and reports how many bytes
# the receiver got in each 0.5 s slot (receiver-side timing: what the link delivered).
STREAM = r"""
import json, socket, sys, threading, time
seconds = float(sys.argv[1])
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
port = srv.getsockname()[1]
slots = {}
def receive():
    c, _ = srv.accept()
    t0 = time.monotonic()
    while True:
        b = c.recv(65536)
        if not b:
            break
        k = int((time.monotonic() - t0) / 0.5)
        slots[k] = slots.get(k, 0) + len(b)
r = threading.Thread(target=receive); r.start()
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
end = time.monotonic() + seconds
chunk = b"x" * 4096
while time.monotonic() < end:
    s.sendall(chunk)
s.close(); r.join(30)
print(json.dumps([slots.get(k, 0) for k in range(int(seconds / 0.5))]))
"""


def _stream(ns: ShapedNamespace, seconds: float) -> list[float]:
    out = ns.run([sys.executable, "-c", STREAM, str(seconds)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [b * 8 / 0.5 / 1e6 for b in json.loads(out.stdout)]  # Mbit/s per half-second slot


def test_tbf_arguments_keep_a_small_bucket_and_a_floor_rate():
    a = Tbf(2.0).args()
    assert a[:2] == ["rate", "2000000bit"] and int(a[3]) == 4096  # 5 ms at 2 Mbit/s is below 4 KiB
    assert Tbf(100.0).args()[3] == str(62500)  # 5 ms at 100 Mbit/s
    assert Tbf(0.0).args()[1] == "8000bit"  # an outage still needs a rate > 0


def test_rate_schedule_is_the_trace_mean_per_step():
    tr = Trace.from_rates([0, 1, 2], [1.0, 4.0, 0.5], period_s=3.0)
    assert rate_schedule(tr, 4) == [(0.0, 1.0), (1.0, 4.0), (2.0, 0.5), (3.0, 1.0)]  # loops
    assert rate_schedule(tr, 2, step_s=0.5, offset_s=1.0) == [(0.0, 4.0), (0.5, 4.0), (1.0, 0.5), (1.5, 0.5)]


@needs_netns
def test_shaped_loopback_delivers_the_configured_rate():
    for mbps in (2.0, 8.0):
        with ShapedNamespace(mbps) as ns:
            rates = _stream(ns, 2.0)
            stats = ns.stats()
        steady = sorted(rates[1:])[len(rates[1:]) // 2]  # median after the first slot (TCP ramp-up)
        assert 0.8 * mbps <= steady <= 1.1 * mbps, (mbps, rates)
        assert stats["bytes"] > 0


@needs_netns
def test_trace_replay_changes_the_rate_second_by_second():
    tr = Trace.from_rates([0, 1, 2], [1.0, 6.0, 1.0], period_s=3.0)
    with ShapedNamespace(tr.mbps_between(0, 1)) as ns:
        with TraceReplayer(ns, tr) as rep:
            rates = _stream(ns, 3.0)
        applied = rep.applied
    assert [round(m, 3) for _, m in applied[:3]] == [1.0, 6.0, 1.0]
    per_second = [(rates[2 * k] + rates[2 * k + 1]) / 2 for k in range(3)]
    # the fast second carries several times the slow ones (TCP needs a moment to open up)
    assert per_second[1] > 2.5 * max(per_second[0], per_second[2]), per_second
    # the stream's half-second slots run on its own clock, the replayer's steps on another: on a
    # loaded machine the stream starts late and its first second catches the start of the fast one
    # (the exact rate at one setting is test_shaped_loopback_delivers_the_configured_rate's check)
    assert 0.6 <= per_second[0] <= 1.6 and 0.6 <= per_second[2] <= 1.6, per_second


@needs_netns
def test_namespace_is_removed_on_exit_even_after_an_error():
    with pytest.raises(RuntimeError, match="boom"):
        with ShapedNamespace(5.0) as ns:
            name = ns.name
            raise RuntimeError("boom")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert name not in listed


@needs_netns
def test_cli_runs_a_command_inside_a_shaped_namespace():
    out = subprocess.run(
        [sys.executable, "-m", "edgesplit.control.netns", "--mbps", "3", "--", "tc", "qdisc", "show", "dev", "lo"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "tbf" in out.stdout and "3Mbit" in out.stdout


@pytest.mark.skipif(not AS_ROOT, reason="the check of the tools runs as root (as CI does)")
def test_root_has_the_shaping_tools():
    assert OK, f"{WHY}: run tools/setup.sh (it installs iproute2)"


def test_errors_are_clear_when_shaping_is_impossible(tmp_path):
    # A real impossibility, not a stub: a process whose PATH holds neither `ip` nor `tc` (as root),
    # or any process without root, is told why before anything is created.
    code = "from edgesplit.control.netns import ShapedNamespace\nShapedNamespace(1.0).__enter__()"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": str(tmp_path)},
    )
    assert out.returncode != 0 and "ShapingError: cannot shape bandwidth here" in out.stderr, out.stderr
    assert ("iproute2 tools missing: ip, tc" if AS_ROOT else "need root") in out.stderr
