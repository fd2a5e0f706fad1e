"""The planner on a U-shaped bundle (SFPrompt): one option per mode whose frame comes back to the
device (head and tail there, the body on the server), and ``local``; no ``raw`` (the server holds
the body only, and the labels must stay on the device). Timed on the tiny bundle of
tests/ushaped_fixtures.py, real CIFAR-10 frames, real ONNX Runtime sessions.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from build_fixtures import one_torch_thread  # noqa: F401  (pytest fixture by name)
from ushaped_fixtures import bundle  # noqa: F401  (fixture by name)

from edgesplit.control.planner import Link, Option, PlanError, Work, plan
from edgesplit.profile.plan_inputs import Timing, scenario
from edgesplit.profile.plan_ushaped import ushaped_options

HOST = "x86-ci-host"


@pytest.fixture(scope="module")
def options(bundle):  # noqa: F811
    opts, meta = ushaped_options(bundle.root, timing=Timing(runs=3, pace_ms=0), frames=4, host=HOST)
    return opts, meta


def test_every_mode_is_a_u_shaped_option_and_local_is_the_alternative(bundle, options):  # noqa: F811
    opts, meta = options
    assert meta["serving"] == "u-shaped"
    assert [o.name for o in opts if o.kind == "u-shaped"] == [m.name for m in bundle.modes]
    assert [o.kind for o in opts if o.kind != "u-shaped"] == ["local"]
    T, D = bundle.wire_spec["shape"]
    for o, m in zip(opts, bundle.modes):
        assert o.payload_bytes == T * D * m.bits // 8  # the tokens, every row, in the mode's dtype
        answer = T * D * (m.answer_bits or 32) // 8
        assert o.detail["reply_payload_bytes"] == answer
        assert answer < o.reply_bytes < answer + 400  # plus the result header with its descriptor
        assert 30 < o.header_bytes < 400  # the full request header carries the token descriptor
        for work in (o.head, o.encode, o.decode, o.tail, o.answer_encode, o.answer_decode, o.device_tail):
            assert work.host_ms > 0


def test_the_prediction_runs_the_tail_on_the_device_after_the_reply(options):
    opts, _ = options
    sc = scenario(HOST, HOST, HOST, Link(10.0, 5.0), 0.5, None)
    preds = {p.option: p for p in plan(opts, sc)}
    u = next(p for p in preds.values() if p.kind == "u-shaped")
    parts = u.parts_ms
    assert {"head", "encode", "link", "decode", "body", "answer encode", "answer decode", "device tail"} <= set(parts)
    assert "tail" not in parts  # the server's part is reported as the body
    dev = parts["preprocess"] + parts["head"] + parts["encode"] + parts["answer decode"] + parts["device tail"]
    srv = parts["decode"] + parts["body"] + parts["answer encode"] + parts["overhead"]
    assert u.device_ms == pytest.approx(dev)
    assert u.server_ms == pytest.approx(srv)
    assert u.latency_ms == pytest.approx(dev + srv + parts["link"])
    assert "device tail" in u.reason and "body" in u.reason
    # the reply (the body's output) rides the link as well as the request
    reply_only = Link(10.0, 5.0).transfer_ms(u.request_bytes, 0, srv)
    assert parts["link"] > reply_only


def test_a_slow_link_makes_local_win_and_a_slow_device_a_fast_link_makes_u_shaped_win(options):
    opts, _ = options
    slow_link = plan(opts, scenario(HOST, HOST, HOST, Link(0.1, 40.0), 0.5, None))
    assert slow_link[0].kind == "local"  # 8-bit tokens of every row are kilobytes: 100 kbit/s is too slow
    # a device far slower than the server, a LAN-speed link: the body is worth sending away
    # (the tiny fixture's body is only a block, so the device is made slow in the options instead)
    slow = [
        o
        if o.kind != "local"
        else Option(o.name, "local", preprocess=o.preprocess, head=Work(o.head.host_ms * 1e4), accuracy=o.accuracy)
        for o in opts
    ]
    fast_link = plan(slow, scenario(HOST, HOST, HOST, Link(1000.0, 0.2), 0.5, None))
    assert fast_link[0].kind == "u-shaped"


def test_answer_work_belongs_to_u_shaped_options_only():
    with pytest.raises(PlanError, match="only a u-shaped option"):
        Option("x", "split", device_tail=Work(1.0))
    with pytest.raises(PlanError, match="option kind"):
        Option("x", "sideways")


def test_the_cli_plans_a_u_shaped_bundle(bundle):  # noqa: F811
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgesplit",
            "plan",
            "--bundle",
            str(bundle.root),
            "--device",
            "raspberry-pi-4",
            "--bandwidth-mbps",
            "10",
            "--rtt-ms",
            "20",
            "--runs",
            "3",
            "--pace-ms",
            "0",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    assert out["inputs"]["serving"] == "u-shaped"
    kinds = sorted({o["kind"] for o in out["options"]})
    assert kinds == ["local", "u-shaped"]
    for o in out["options"]:
        if o["kind"] == "u-shaped":
            assert o["sources"]["device tail"].startswith("raspberry-pi-4: scaled from x86-ci-host")
            assert o["sources"]["body"].startswith("x86-ci-host")
