"""systemd's service notification protocol (sd_notify(3)), for ``Type=notify`` units.

The protocol is one datagram per notification on the ``AF_UNIX`` ``SOCK_DGRAM`` socket named by
``$NOTIFY_SOCKET`` (a path, or an abstract address when it starts with ``@``), each datagram
newline-separated ``KEY=VALUE`` assignments: ``READY=1``, ``STOPPING=1``, ``STATUS=...``,
``WATCHDOG=1``. With ``WatchdogSec=`` set, systemd passes ``$WATCHDOG_USEC`` (and
``$WATCHDOG_PID``: the watchdog is this process's only when it names its pid) and restarts the
service when no ``WATCHDOG=1`` comes within that time; sd_watchdog_enabled(3) advises pinging at
half of it. Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op.

It is a few lines of socket code, so no dependency: the protocol, not a library, is the contract.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """Sends notifications to systemd when the process runs under it; otherwise does nothing."""

    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr: str | bytes | None = None
        self._sock: socket.socket | None = None
        if addr.startswith("@"):
            self._addr = b"\0" + addr[1:].encode()  # Linux abstract namespace
        elif addr.startswith("/"):
            self._addr = addr
        if self._addr is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # never wait on systemd: a notification that finds its queue full is dropped (the next
            # watchdog ping comes half a timeout later), the frame loop is not held up
            self._sock.setblocking(False)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        enabled = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        # ping at half the timeout, as sd_watchdog_enabled(3) advises
        self.watchdog_interval_s: float | None = int(usec) / 2e6 if enabled else None
        self._next_ping = 0.0
        self.sent = 0  # datagrams sent
        self.dropped = 0  # datagrams the socket would not take

    @property
    def active(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines (``notify(READY=1, STATUS="...")``). False when not under
        systemd, or when the socket is gone (systemd is stopping us: nothing to do about it)."""
        if self._sock is None or self._addr is None:
            return False
        msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(msg, self._addr)
        except OSError:  # BlockingIOError (queue full), or systemd gone
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> None:
        self.notify(READY=1, STATUS=status)

    def stopping(self, status: str) -> None:
        self.notify(STOPPING=1, STATUS=status)

    def watchdog(self) -> None:
        """Ping the watchdog when it is enabled and half its timeout has passed since the last ping:
        cheap enough to call per frame."""
        if self.watchdog_interval_s is None:
            return
        now = time.monotonic()
        if now >= self._next_ping:
            self._next_ping = now + self.watchdog_interval_s
            self.notify(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
