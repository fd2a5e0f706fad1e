"""CURVE security for the agent <-> server link: encryption plus an allow-list of agent keys.

ZeroMQ's CURVE mechanism (CurveZMQ, RFC 26) encrypts and authenticates every connection with
Curve25519 key pairs. Keys live in ZeroMQ certificate files, as pyzmq writes them
(``zmq.auth.create_certificates``; ``edgesplit keys gen NAME --out DIR``):

- ``NAME.key``        the public key: give it to the peer (server key -> agents' ``--server-key``,
                      agent key -> the server's ``--allow-keys`` directory);
- ``NAME.key_secret`` the public and the secret key: stays on its machine (mode 0600).

Server side (:class:`ServerCurve`): the ROUTER is a CURVE server with the server's key pair, and a
ZAP handler (pyzmq's :class:`~zmq.auth.thread.ThreadAuthenticator`, in the daemon's own ZeroMQ
context) accepts a connection only when the agent's public key is one of the ``*.key`` files in
the allow directory (:class:`AllowList`; re-read when the directory changes, or on
:meth:`AllowList.reload`). A refused connection never reaches the daemon's code: libzmq drops it
during the handshake and reports it on the socket monitor, where the daemon counts it
(:func:`handshake_failure`).

Agent side (:class:`ClientCurve`): the DEALER is a CURVE client that knows the server's public key.
The agent's socket monitor sees a failed handshake at once, and
:func:`explain_handshake_failure` turns it into the likely cause (a key not allowed, a wrong server
key, CURVE on one side only) instead of a bare timeout.

Edge plane: pyzmq only (no torch).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils.monitor import parse_monitor_message

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"

# The monitor events of a failed handshake (libzmq >= 4.3).
HANDSHAKE_EVENTS = (
    int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    | int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
    | int(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
)

# Why a handshake failed, as the daemon counts it (metric label ``reason``).
KEY_NOT_ALLOWED = "key_not_allowed"  # a CURVE client whose key is not in the allow list
MECHANISM_MISMATCH = "mechanism_mismatch"  # plaintext client at a CURVE server, or the reverse
BAD_CRYPTO = "bad_crypto"  # a CURVE client using the wrong server public key
PROTOCOL = "protocol"  # any other ZMTP protocol violation
NO_DETAIL = "no_detail"  # the peer went away mid-handshake

log = logging.getLogger("edgesplit.curve")


class KeyFileError(ValueError):
    """A key file is missing, unreadable or of the wrong kind (public where a secret is needed)."""


def generate(name: str, out_dir: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Create a key pair ``out_dir/NAME.key`` (public) and ``out_dir/NAME.key_secret`` (secret,
    readable by its owner only). Refuses to replace existing files unless ``overwrite``."""
    if not name or "/" in name or name.startswith("."):
        raise KeyFileError(f"key name {name!r} must be a plain file name (no '/', not starting with '.')")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public, secret = out / f"{name}{PUBLIC_SUFFIX}", out / f"{name}{SECRET_SUFFIX}"
    existing = [str(p) for p in (public, secret) if p.exists()]
    if existing and not overwrite:
        raise KeyFileError(
            f"{' and '.join(existing)} already exist: choose another name, or overwrite them "
            "(edgesplit keys gen --force)"
        )
    # Created under a restrictive umask, so the secret is never readable by others, not even briefly.
    old = os.umask(0o077)
    try:
        pub_path, sec_path = zmq.auth.create_certificates(str(out), name)
    finally:
        os.umask(old)
    os.chmod(pub_path, 0o644)  # the public half is meant to be copied around
    return Path(pub_path), Path(sec_path)


def load_secret(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a ``.key_secret`` certificate."""
    public, secret = _load(path)
    if secret is None:
        raise KeyFileError(
            f"{path} holds only a public key; this side needs its secret certificate (NAME{SECRET_SUFFIX})"
        )
    p = Path(path)
    if p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("secret key file %s is readable by other users (chmod 600 it)", p)
    return public, secret


def load_public(path: str | os.PathLike) -> bytes:
    """The z85 public key from a ``.key`` (or ``.key_secret``) certificate."""
    return _load(path)[0]


def _load(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    p = Path(path)
    if not p.is_file():
        raise KeyFileError(f"key file {p} does not exist")
    try:
        return zmq.auth.load_certificate(str(p))
    except (OSError, ValueError) as e:
        raise KeyFileError(f"{p} is not a ZeroMQ certificate file: {e}") from None


def fingerprint(public_z85: bytes) -> str:
    """A short printable name for a public key in logs (its first 12 z85 characters)."""
    return public_z85[:12].decode("ascii", "replace")


class AllowList:
    """The agents' public keys allowed to connect: every ``*.key`` file in one directory.

    It is the ZAP credentials provider of the server's authenticator: :meth:`callback` runs in the
    authenticator's thread for each CURVE handshake. The directory is re-read when its mtime
    changes (adding or removing a key file), so keys can be granted and revoked without a restart
    (an existing connection keeps its session until it disconnects)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise KeyFileError(f"allow-list directory {self.directory} does not exist")
        self._keys: dict[bytes, str] = {}
        self._mtime_ns = -1
        self._lock = threading.Lock()
        self._last_denied: dict[bytes, float] = {}
        self.reload()
        if not self._keys:
            log.warning(
                "allow-list directory %s holds no *%s files: no agent can connect until one is added",
                self.directory,
                PUBLIC_SUFFIX,
            )

    @property
    def names(self) -> list[str]:
        return sorted(self._keys.values())

    def reload(self) -> int:
        """Read the directory again; returns the number of allowed keys."""
        with self._lock:
            mtime = self.directory.stat().st_mtime_ns
            keys: dict[bytes, str] = {}
            for p in sorted(self.directory.glob(f"*{PUBLIC_SUFFIX}")):
                try:
                    keys[load_public(p)] = p.stem
                except KeyFileError as e:
                    log.warning("allow list: skipping %s", e)
            self._keys, self._mtime_ns = keys, mtime  # one assignment: readers see old or new
        log.info(
            "allow list %s: %d agent key(s): %s",
            self.directory,
            len(keys),
            ", ".join(sorted(keys.values())),
            extra={"event": "allow_list", "keys": len(keys)},
        )
        return len(keys)

    def callback(self, domain: str, client_key: bytes) -> bool:
        """ZAP: may the client with this z85 public key connect?"""
        try:
            if self.directory.stat().st_mtime_ns != self._mtime_ns:
                self.reload()
        except OSError as e:  # directory gone: keep the last list rather than lock everyone out
            log.error("allow list %s unreadable: %s", self.directory, e)
        name = self._keys.get(client_key)
        if name is not None:
            log.debug("CURVE key %s (%s) allowed", fingerprint(client_key), name)
            return True
        # A refused client reconnects every few hundred ms: log each key once a minute.
        now = time.monotonic()
        if now - self._last_denied.get(client_key, -1e9) > 60.0:
            if len(self._last_denied) > 1024:
                self._last_denied.clear()
            self._last_denied[client_key] = now
            log.warning(
                "refused an agent: CURVE key %s is not in %s",
                fingerprint(client_key),
                self.directory,
                extra={"event": "auth_refused", "key": client_key.decode("ascii", "replace")},
            )
        return False


@dataclass(frozen=True)
class ServerCurve:
    """The server's key pair and the agents it admits."""

    public: bytes
    secret: bytes
    allow: AllowList

    @classmethod
    def load(cls, secret_file: str | os.PathLike, allow_dir: str | os.PathLike) -> "ServerCurve":
        public, secret = load_secret(secret_file)
        return cls(public, secret, AllowList(allow_dir))

    def start_authenticator(self, ctx: zmq.Context) -> "zmq.auth.thread.ThreadAuthenticator":
        """Start the ZAP handler in ``ctx``. It must run before the ROUTER binds: libzmq admits any
        CURVE client when no ZAP handler is present in the socket's context."""
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx, log=logging.getLogger("edgesplit.curve.zap"))
        auth.start()
        auth.configure_curve_callback("*", credentials_provider=self.allow)
        return auth

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before bind) a CURVE server."""
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


@dataclass(frozen=True)
class ClientCurve:
    """An agent's key pair and the server's public key."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, server_key_file: str | os.PathLike, client_secret_file: str | os.PathLike) -> "ClientCurve":
        public, secret = load_secret(client_secret_file)
        return cls(load_public(server_key_file), public, secret)

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before connect) a CURVE client of the server."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def handshake_failure(event: int, value: int) -> str | None:
    """The reason label of a failed-handshake monitor event, or None for any other event."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return KEY_NOT_ALLOWED
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return MECHANISM_MISMATCH
        if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            return BAD_CRYPTO
        return PROTOCOL
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return NO_DETAIL
    return None


def read_monitor(mon: zmq.Socket) -> list[tuple[int, int]]:
    """Every (event, value) queued on a monitor socket, without blocking."""
    out: list[tuple[int, int]] = []
    while True:
        try:
            m = parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            return out
        out.append((int(m["event"]), int(m["value"])))


def explain_handshake_failure(event: int, value: int, using_curve: bool) -> str:
    """What a client should be told when its handshake failed (monitor ``event``/``value``): the
    likely cause in words, given whether it used CURVE itself."""
    reason = handshake_failure(event, value)
    if reason == KEY_NOT_ALLOWED:
        return (
            f"the server refused this agent's CURVE key (ZAP status {value}): its public key "
            f"(NAME{PUBLIC_SUFFIX}) is not in the server's --allow-keys directory"
        )
    if not using_curve:
        return (
            "the security handshake with the server failed: the server probably requires CURVE; give the agent "
            "--server-key (the server's public key) and --client-key (its own secret key)"
        )
    if reason == MECHANISM_MISMATCH:
        return "the CURVE handshake failed: the server does not use CURVE (drop --server-key/--client-key)"
    return "the CURVE handshake failed: --server-key is probably not this server's public key"
