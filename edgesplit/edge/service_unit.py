"""``edgesplit agent install-service``: the systemd unit that runs the agent unattended.

The unit runs ``python -m edgesplit agent --config FILE --log-format json`` as ``Type=notify``:
the agent says ``READY=1`` once it has a session (or has gone to local fallback), pings the
watchdog from its frame loop, and says ``STOPPING=1`` on SIGTERM (:mod:`.sdnotify`,
:mod:`.service_run`). The config is validated here first, so a unit never points at a file the
agent would refuse.

Choices, and why:

- **A named system user** (``--user``, default ``edgesplit``) rather than ``DynamicUser=``: the
  files the agent reads (bundle, CURVE secret key, config) need an owner an operator can
  ``chown`` and audit, and the bundle updates to come are written by that user; a dynamic uid can
  change between boots. ``--dynamic-user`` is there for devices where those files are
  world-readable. The camera's device node needs the ``video`` group, added when the source is a
  camera.
- **Restart=on-failure with a backoff**, and never give up (``StartLimitIntervalSec=0``): an
  unattended device has nobody to run ``systemctl reset-failed``. systemd 254 and later grow the
  delay (``RestartSteps``, ``RestartMaxDelaySec``); older ones (Debian bookworm has 252) restart
  at a fixed ``RestartSec``. Exit status 2 (a config error) is not restarted: a restart cannot
  fix it.
- **Limits**: ``MemoryMax``, ``CPUQuota``, ``TasksMax``: the agent shares a small board with the
  camera stack and the OS.
- **Hardening** that the agent survives: read-only system and home, private /tmp, no new
  privileges, no capabilities, the syscall set of a system service, only the socket families it
  uses (inet for the server, unix for sd_notify, netlink for interface lookups). Left off:
  ``PrivateDevices`` (cameras, and the GPU nodes on a Jetson) and ``MemoryDenyWriteExecute``
  (libffi closures and JIT-compiling execution providers need writable-executable pages).
- **Logs**: JSON lines on stderr (``--log-format json``) and results on stdout go to the journal.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from .ota_config import ota_dir
from .service_config import ConfigError, key_specs, load_config, spool_dir, validate

UNIT_NAME = "edgesplit-agent.service"
DEFAULT_CONFIG = "/etc/edgesplit/agent.yaml"
_STEPPED_RESTART = 254  # first systemd with RestartSteps= / RestartMaxDelaySec=


def systemd_version() -> int | None:
    """The installed systemd's version (``systemctl --version``), or None."""
    exe = shutil.which("systemctl") or shutil.which("systemd-analyze")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.match(r"systemd (\d+)", out)
    return int(m.group(1)) if m else None


def render_unit(
    config: Path,
    values: dict[str, Any],
    *,
    user: str | None = "edgesplit",
    python: str = sys.executable,
    watchdog_s: int = 30,
    memory_max: str = "1G",
    cpu_quota: str = "200%",
    tasks_max: int = 256,
    systemd: int | None = None,
) -> str:
    """The unit text for the agent run with ``config`` (whose merged, validated values are ``values``)."""
    stepped = systemd is not None and systemd >= _STEPPED_RESTART
    grace = float(values.get("stop_grace_s") or 0)
    # the stop: grace for answers, then local answers and the summary; then systemd's SIGKILL
    stop_s = int(grace + 15)
    writable = []
    for key in ("json_lines", "spool_dir"):
        v = values.get(key)
        if v and v != "-":
            p = Path(v) if Path(v).is_absolute() else config.parent / v
            writable.append(str(p.parent if key == "json_lines" else p))
    camera = str(values.get("source", "")).startswith("camera")
    lines = [
        "# Written by 'edgesplit agent install-service'. The agent's settings are in the config file;",
        "# re-run install-service after moving it.",
        "[Unit]",
        "Description=edgesplit edge agent (split computing head, streams to the server)",
        "Wants=network-online.target",
        "After=network-online.target",
        "StartLimitIntervalSec=0",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={python} -m edgesplit agent --config {config} --log-format json",
        f"WorkingDirectory={config.parent}",
        "Environment=PYTHONUNBUFFERED=1",
        f"WatchdogSec={watchdog_s}s",
        "Restart=on-failure",
        "RestartSec=2s" if stepped else "RestartSec=5s",
        *(["RestartSteps=6", "RestartMaxDelaySec=2min"] if stepped else []),
        "RestartPreventExitStatus=2",
        "TimeoutStartSec=2min",
        f"TimeoutStopSec={stop_s}s",
        *(["DynamicUser=yes"] if user is None else [f"User={user}", f"Group={user}"]),
        *(["SupplementaryGroups=video"] if camera else []),
        "StateDirectory=edgesplit-agent",
        "StateDirectoryMode=0750",
        *([f"ReadWritePaths={' '.join(writable)}"] if writable else []),
        f"MemoryMax={memory_max}",
        f"CPUQuota={cpu_quota}",
        f"TasksMax={tasks_max}",
        "LimitNOFILE=4096",
        "UMask=0027",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "RemoveIPC=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallErrorNumber=EPERM",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "StandardOutput=journal",
        "StandardError=journal",
        "SyslogIdentifier=edgesplit-agent",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def install_service_main(argv: list[str], parser: argparse.ArgumentParser) -> int:
    """``parser``: the agent's own (its flags are the config keys)."""
    p = argparse.ArgumentParser(
        prog="edgesplit agent install-service",
        description="Write a systemd unit that runs the agent with a config file (validated first).",
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the agent's config file (made absolute in the unit)")
    p.add_argument("--user", default="edgesplit", help="system user and group the agent runs as")
    p.add_argument("--dynamic-user", action="store_true", help="DynamicUser=yes instead of --user")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--out", default=None, metavar="FILE", help="write the unit here (default: stdout)")
    out.add_argument("--unit-dir", default=None, metavar="DIR", help=f"write DIR/{UNIT_NAME} (/etc/systemd/system)")
    p.add_argument("--python", default=sys.executable, help="the interpreter with edgesplit[edge] installed")
    p.add_argument("--watchdog-s", type=int, default=30, help="WatchdogSec: restart when the frame loop stalls")
    p.add_argument("--memory-max", default="1G", help="MemoryMax")
    p.add_argument("--cpu-quota", default="200%", help="CPUQuota (100%% = one core)")
    p.add_argument("--tasks-max", type=int, default=256, help="TasksMax")
    p.add_argument("--systemd-version", type=int, default=None, help="target systemd (default: this machine's, if any)")
    a = p.parse_args(argv)
    if a.watchdog_s < 2:
        p.error("--watchdog-s must be >= 2")
    config = Path(a.config).absolute()
    try:
        file_values = load_config(config, key_specs(parser))
        values = {s.dest: s.default for s in parser._actions} | file_values
        if not values.get("bundle"):
            raise ConfigError(f"{config}: 'bundle' is required")
        # under the unit, systemd's STATE_DIRECTORY gives a spool (and update) directory when the file names none
        state = (
            {"spool_dir": "/var/lib/edgesplit-agent/spool"} if values.get("deliver") and not spool_dir(values) else {}
        )
        if values.get("ota_group") and ota_dir(values) is None:
            state["ota_dir"] = "/var/lib/edgesplit-agent/ota"
        validate(values | state, str(config))
    except ConfigError as e:
        print(f"edgesplit agent install-service: {e}", file=sys.stderr)
        return 2
    text = render_unit(
        config,
        values,
        user=None if a.dynamic_user else a.user,
        python=a.python,
        watchdog_s=a.watchdog_s,
        memory_max=a.memory_max,
        cpu_quota=a.cpu_quota,
        tasks_max=a.tasks_max,
        systemd=a.systemd_version if a.systemd_version is not None else systemd_version(),
    )
    target = Path(a.unit_dir) / UNIT_NAME if a.unit_dir else Path(a.out) if a.out else None
    if target is None:
        sys.stdout.write(text)
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print(f"wrote {target}", file=sys.stderr)
    if not a.dynamic_user:
        print(
            f"next: useradd --system --no-create-home --shell /usr/sbin/nologin {a.user}; "
            f"systemctl daemon-reload; systemctl enable --now {UNIT_NAME}",
            file=sys.stderr,
        )
    return 0
