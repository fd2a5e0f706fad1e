"""The agent as a service: the config file (every flag a key, validated, flags override), the
systemd unit (checked by systemd-analyze where it exists), sd_notify over a real unix datagram
socket, and a clean stop on SIGTERM with a real server process and a real agent process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from edgesplit.bench.serverproc import ServerProcess
from edgesplit.edge.agent import agent_main, build_parser
from edgesplit.edge.fallback import SHUTDOWN
from edgesplit.edge.service_config import ConfigError, key_specs, load_config, validate
from edgesplit.loopback import free_port

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "cifar10-resnet20-bottlefit"  # ships full.onnx, the fallback model
EXAMPLE = ROOT / "deploy" / "agent.example.yaml"
SERVER_ARGS = ["--threads", "1", "--max-queue-delay-us", "0"]


def write_config(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


# -- the config file -----------------------------------------------------------------------------


def test_every_flag_is_a_key_and_the_example_sets_each_one(monkeypatch):
    parser = build_parser()
    specs = key_specs(parser)
    flags = {a.dest for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    assert flags == set(specs)
    values = load_config(EXAMPLE, specs)
    assert set(values) == set(specs)  # the example documents every key
    assert values["frames"] == 0 and values["source"] == "camera:0" and values["log_format"] == "json"
    # it names no spool_dir: under systemd, STATE_DIRECTORY gives one; elsewhere it is an error
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match="'deliver' needs 'spool_dir'"):
        validate(values)
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/edgesplit-agent")
    validate(values)


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"bundle": "b", "deadline-ms": 5},
            r"unknown key 'deadline-ms' \(did you mean 'deadline_ms'\?\); valid keys: ",
        ),
        ({"bundle": "b", "colour": "red"}, r"unknown key 'colour'; valid keys: .*adapt, base_rtt_ms"),
        ({"bundle": "b", "inflight": "8"}, r"'inflight' must be int, got str '8'"),
        ({"bundle": "b", "frames": True}, r"'frames' must be int, got bool"),
        ({"bundle": "b", "timeout_s": "soon"}, r"'timeout_s' must be float"),
        ({"bundle": "b", "fallback": None}, r"'fallback' may not be null"),
        ({"bundle": "b", "codec": "lz4"}, r"'codec' must be one of \['raw', 'zstd', 'auto'\], got 'lz4'"),
        ({"bundle": "b", "inflight": 0}, r"'inflight' must be >= 1"),
        ({"bundle": "b", "timeout_s": 0}, r"'timeout_s' must be > 0"),
        ({"bundle": "b", "threads": 100000}, r"'threads' must be >= 1 and <= 1024"),
        ({"bundle": "b", "server_key": "s.key"}, r"CURVE needs both 'server_key' and 'client_key'"),
        ({"bundle": "b", "spool_dir": "/tmp/x"}, r"'spool_dir' is for delivered results: it needs 'deliver'"),
        ({"bundle": "b", "deliver": "ftp://x", "spool_dir": "/tmp/x"}, r"'deliver' must be an http:// or https:// URL"),
        ({"bundle": "b", "deliver": "http://x/r"}, r"'deliver' needs 'spool_dir'"),
    ],
)
def test_bad_config_exits_2_naming_the_key(tmp_path, capsys, monkeypatch, values, message):
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    cfg = write_config(tmp_path / "agent.yaml", **values)
    assert agent_main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err
    assert __import__("re").search(message, err), err


def test_not_a_mapping_and_bad_yaml_are_errors(tmp_path):
    specs = key_specs(build_parser())
    (tmp_path / "list.yaml").write_text("- bundle\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml", specs)
    (tmp_path / "bad.yaml").write_text("bundle: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml", specs)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", specs)


def test_flags_override_the_file_and_are_held_to_the_same_ranges(tmp_path, capsys):
    nobody = f"tcp://127.0.0.1:{free_port()}"
    out = tmp_path / "out.jsonl"
    cfg = write_config(
        tmp_path / "agent.yaml",
        bundle=str(SHIPPED),  # not on the command line: the file gives the required flag
        server=nobody,
        frames=3,
        threads=1,
        timeout_s=0.3,
        json_lines=str(tmp_path / "ignored.jsonl"),
    )
    assert agent_main(["--config", str(cfg), "--frames", "5", "--json-lines", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 6 and lines[-1]["summary"]["frames"] == 5 and lines[-1]["summary"]["local"] == 5
    assert not (tmp_path / "ignored.jsonl").exists()
    assert agent_main(["--config", str(cfg), "--inflight", "0"]) == 2
    assert "'inflight' must be >= 1" in capsys.readouterr().err


# -- the systemd unit ----------------------------------------------------------------------------


def unit_keys(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit, per key (a key may repeat), section names dropped."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


def test_install_service_writes_a_unit_systemd_accepts(tmp_path):
    values = yaml.safe_load(EXAMPLE.read_text()) | {"bundle": str(SHIPPED), "json_lines": "out/frames.jsonl"}
    cfg = write_config(tmp_path / "agent.yaml", **values)
    unit = tmp_path / "unit" / "edgesplit-agent.service"
    rc = agent_main(["install-service", "--config", str(cfg), "--out", str(unit), "--systemd-version", "252"])
    assert rc == 0
    text = unit.read_text()
    k = unit_keys(text)
    sections = [line for line in text.splitlines() if line.startswith("[")]
    assert sections == ["[Unit]", "[Service]", "[Install]"]
    assert k["Type"] == ["notify"] and k["NotifyAccess"] == ["main"] and k["WatchdogSec"] == ["30s"]
    assert k["Restart"] == ["on-failure"] and k["RestartPreventExitStatus"] == ["2"]
    assert k["StartLimitIntervalSec"] == ["0"] and "RestartSteps" not in k  # systemd 252 has no stepped backoff
    assert k["ExecStart"] == [f"{sys.executable} -m edgesplit agent --config {cfg} --log-format json"]
    assert k["User"] == ["edgesplit"] and k["Group"] == ["edgesplit"] and "DynamicUser" not in k
    assert k["SupplementaryGroups"] == ["video"]  # the example reads camera:0
    assert k["MemoryMax"] == ["1G"] and k["CPUQuota"] == ["200%"] and k["TasksMax"] == ["256"]
    assert k["ReadWritePaths"] == [str(tmp_path / "out")]  # where json_lines goes, relative to the config
    assert k["StandardOutput"] == ["journal"] and k["StandardError"] == ["journal"]
    assert k["NoNewPrivileges"] == ["yes"] and k["ProtectSystem"] == ["strict"]
    assert k["StateDirectory"] == ["edgesplit-agent"]
    # newer systemd: a growing restart delay; a dynamic user on request
    newer = tmp_path / "newer.service"
    argv = ["install-service", "--config", str(cfg), "--out", str(newer), "--systemd-version", "256", "--dynamic-user"]
    assert agent_main(argv) == 0
    k2 = unit_keys(newer.read_text())
    assert k2["RestartSteps"] == ["6"] and k2["RestartMaxDelaySec"] == ["2min"]
    assert k2["DynamicUser"] == ["yes"] and "User" not in k2
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        # tools/setup.sh installs systemd (which brings systemd-analyze) when run as root, as CI is
        if os.geteuid() == 0:
            pytest.fail("systemd-analyze is missing: tools/setup.sh installs the systemd package for it")
        pytest.skip("systemd-analyze is not installed and setup.sh installs it only as root (structure checked above)")
    for path in (unit,) + ((newer,) if _systemd_version(analyze) >= 254 else ()):
        r = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
        # verify exits 0 on unknown keys too, warning on stderr: a clean unit has no output at all
        assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


def _systemd_version(analyze: str) -> int:
    out = subprocess.run([analyze, "--version"], capture_output=True, text=True).stdout
    return int(out.split()[1])


def test_install_service_refuses_a_bad_config_and_writes_nothing(tmp_path, capsys):
    cfg = write_config(tmp_path / "agent.yaml", bundle=str(SHIPPED), fps=-1.0)
    unit = tmp_path / "edgesplit-agent.service"
    assert agent_main(["install-service", "--config", str(cfg), "--out", str(unit)]) == 2
    assert "'fps' must be > 0" in capsys.readouterr().err and not unit.exists()
    cfg2 = write_config(tmp_path / "nobundle.yaml", frames=0)
    assert agent_main(["install-service", "--config", str(cfg2), "--unit-dir", str(tmp_path / "d")]) == 2
    assert "'bundle' is required" in capsys.readouterr().err


# -- sd_notify and SIGTERM, with real processes --------------------------------------------------


class NotifySocket:
    """What systemd does for a Type=notify unit: a unix datagram socket named by NOTIFY_SOCKET,
    read as the datagrams come."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def start_agent(tmp_path: Path, endpoint: str, out: Path, notify: NotifySocket, **extra) -> subprocess.Popen:
    cfg = write_config(
        tmp_path / "agent.yaml",
        bundle=str(SHIPPED),
        server=endpoint,
        source="cifar10:test",
        frames=0,
        threads=1,
        inflight=8,
        timeout_s=30.0,  # longer than the test: only the stop may end a frame's wait
        reconnect_max_s=0.2,
        json_lines=str(out),
        log_format="json",
        **extra,
    )
    env = {**os.environ, "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000", "OMP_NUM_THREADS": "1"}
    env.pop("WATCHDOG_PID", None)
    return subprocess.Popen(
        [sys.executable, "-m", "edgesplit", "agent", "--config", str(cfg)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_lines(path: Path, n: int, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} results in {timeout_s} s")


def check_one_answer_per_frame(out: Path) -> tuple[list[dict], dict]:
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    frames, summary = lines[:-1], lines[-1]["summary"]
    ids = Counter(f["id"] for f in frames)
    assert set(ids.values()) == {1}, "a frame answered twice"
    assert sorted(ids) == list(range(1, len(frames) + 1)), "a frame read but never answered"
    assert summary["frames"] == len(frames) and summary["error_frames"] == 0
    assert all(f["source"] in ("server", "local") and f["pred"] is not None for f in frames)
    return frames, summary


def test_sigterm_mid_stream_answers_every_frame_and_notifies_systemd(tmp_path):
    notify = NotifySocket(tmp_path / "notify.sock")
    server = ServerProcess([SHIPPED], SERVER_ARGS, port=free_port()).start()
    out = tmp_path / "frames.jsonl"
    try:
        # a long grace: the server is there, so every frame in flight must get the server's answer
        agent = start_agent(tmp_path, server.endpoint, out, notify, stop_grace_s=20.0)
        wait_lines(out, 40, agent)
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=60)
        assert agent.returncode == 0, err
    finally:
        server.stop()
    notify.close()
    frames, summary = check_one_answer_per_frame(out)
    assert summary["server"] == len(frames)  # the server was there: it answered every frame in flight
    kinds = [next(iter(m)) for m in notify.messages]
    assert notify.messages[0]["READY"] == "1" and "streaming to" in notify.messages[0]["STATUS"]
    assert kinds.count("WATCHDOG") >= 1 and all(m == {"WATCHDOG": "1"} for m in notify.messages[1:-1])
    assert notify.messages[-1]["STOPPING"] == "1" and "SIGTERM" in notify.messages[-1]["STATUS"]
    logs = [json.loads(x) for x in err.splitlines()]  # --log-format json: every line is a JSON record
    assert any(r.get("event") == "stopped" for r in logs) and logs[-1]["event"] == "summary"


def test_sigterm_with_a_silent_server_hands_frames_in_flight_to_the_fallback(tmp_path):
    notify = NotifySocket(tmp_path / "notify.sock")
    server = ServerProcess([SHIPPED], SERVER_ARGS, port=free_port()).start()
    out = tmp_path / "frames.jsonl"
    try:
        agent = start_agent(tmp_path, server.endpoint, out, notify, stop_grace_s=0.5)
        wait_lines(out, 20, agent)
        server.proc.send_signal(signal.SIGSTOP)  # alive, connected, silent: frames stay in flight
        try:
            time.sleep(0.5)
            agent.send_signal(signal.SIGTERM)
            _, err = agent.communicate(timeout=60)
        finally:
            server.proc.send_signal(signal.SIGCONT)
        assert agent.returncode == 0, err
    finally:
        server.stop()
    notify.close()
    frames, summary = check_one_answer_per_frame(out)
    handed = [f for f in frames if f["fallback_reason"] == SHUTDOWN]
    assert 1 <= len(handed) <= 8  # at most the window; each answered by full.onnx here
    assert all(f["source"] == "local" and f["bytes_sent"] > 0 for f in handed)
    assert summary["fallback_reasons"].get(SHUTDOWN) == len(handed)


# -- the notification protocol on its own --------------------------------------------------------


def test_notifier_abstract_socket_watchdog_pid_and_a_full_queue(tmp_path):
    from edgesplit.edge.sdnotify import Notifier

    assert not Notifier({}).active and Notifier({}).notify(READY=1) is False  # not under systemd: no-op
    name = f"edgesplit-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())  # an abstract address, as systemd may pass with '@'
    sock.settimeout(5)
    n = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "4000000"})
    assert n.watchdog_interval_s == 2.0  # half the timeout
    n.ready("up")
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    n.watchdog()
    n.watchdog()  # within the interval: not sent again
    assert sock.recv(4096) == b"WATCHDOG=1" and n.sent == 2
    # the watchdog belongs to another process: no pings from this one
    assert (
        Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_interval_s
        is None
    )
    # nobody reads the socket: notifications are dropped, never waited on
    for _ in range(5000):
        n.notify(STATUS="x" * 100)
    assert n.dropped > 0
    n.close()
    sock.close()
