"""The server side of over-the-air bundle updates (docs/PROTOCOL.md §14): each fleet group's current
signed bundle, packed once into a deterministic archive, offered to ``bundle_query`` and served in
chunks to ``bundle_get``.

The server distributes bytes; it is not what agents trust (they check the publisher's signature
with a key pinned on the device). It still refuses to offer a bundle that has no signature file,
and it serves every offered bundle for inference too, so that an agent that switches is welcomed.

The archive of a bundle directory is deterministic (sorted members, zero times and owners, gzip
without a timestamp): a restarted server offers the same archive hash, so agents resume their
downloads instead of starting again. Chunks are read from disk in the I/O thread (a small read
from the page cache); the compute thread never sees them.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import logging
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..bundle import MANIFEST, Bundle, BundleError
from ..wire import ota as O
from ..wire.errors import ErrorCode, ProtocolError
from ..wire.protocol import Message

log = logging.getLogger("edgesplit.server")

SIGNATURE_FILE = MANIFEST + ".sig"  # BUNDLE.md §2.1 (edgesplit.bundle_sign writes it)
DEFAULT_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class Archive:
    group: str
    bundle: str  # the bundle hash (SHA-256 of manifest.json)
    path: Path
    size: int
    sha256: str


@dataclass
class OtaFigures:
    queries: int = 0
    offers: int = 0
    chunks: int = 0
    chunk_bytes_sent: int = 0
    refused: int = 0
    by_group: dict[str, dict[str, int]] = field(default_factory=dict)  # group -> bundle hash -> agents asking

    def as_dict(self) -> dict[str, Any]:
        return {
            "queries": self.queries,
            "offers": self.offers,
            "chunks": self.chunks,
            "chunk_bytes_sent": self.chunk_bytes_sent,
            "refused": self.refused,
        }


def parse_group_specs(specs: Iterable[str]) -> dict[str, Path]:
    """``NAME=PATH`` strings (``--ota-group``) -> {group: path}; ValueError on a bad one."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path or not O.valid_group(name):
            raise ValueError(
                f"--ota-group wants NAME=PATH with NAME of 1-64 characters A-Z a-z 0-9 . _ -, got {spec!r}"
            )
        if name in out:
            raise ValueError(f"--ota-group {name} given twice")
        out[name] = Path(path)
    return out


def pack_bundle(root: Path, out: Path) -> None:
    """The deterministic tar.gz of a bundle directory: manifest, signature and the files it names."""
    manifest = json.loads((root / MANIFEST).read_bytes())
    names = sorted({MANIFEST, SIGNATURE_FILE, *(e["path"] for e in manifest["files"].values())})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name in names:
            data = (root / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            t.addfile(info, io.BytesIO(data))
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
        gz.write(buf.getvalue())
    tmp.replace(out)


def _manifest_hash_in_tar(path: Path) -> str:
    with tarfile.open(path) as t:
        for m in t.getmembers():
            if m.isfile() and Path(m.name).name == MANIFEST:
                f = t.extractfile(m)
                if f is not None:
                    return hashlib.sha256(f.read()).hexdigest()
    raise BundleError(f"{path}: no {MANIFEST} in the archive")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class BundleDistributor:
    """Group -> archive, and the answers to ``bundle_query`` / ``bundle_get`` (I/O thread only)."""

    def __init__(
        self,
        archives: Mapping[str, Archive],
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_kbps: float | None = None,
        fault: str = "",
    ):
        if not O.MIN_CHUNK_BYTES <= chunk_bytes:
            raise ValueError(f"--ota-chunk-bytes must be >= {O.MIN_CHUNK_BYTES}, got {chunk_bytes}")
        if max_kbps is not None and not max_kbps > 0:
            raise ValueError(f"--ota-max-kbps must be > 0, got {max_kbps}")
        # All agents' chunks together at most max_kbps: a token bucket of bytes, a quarter second
        # deep (at least the smallest chunk), that may go into debt by one chunk, so a chunk larger
        # than the bucket is still served once the bucket is full. The rest of the link stays for
        # frames. A get over the budget is refused OVERLOADED, retried by the agent (PROTOCOL.md §14.4).
        self.rate_bps = None if max_kbps is None else max_kbps * 1000 / 8
        self._depth = 0.0 if self.rate_bps is None else max(float(O.MIN_CHUNK_BYTES), self.rate_bps / 4)
        self._tokens, self._refilled = self._depth, time.monotonic()
        self.archives = dict(archives)
        self.by_bundle = {a.bundle: a for a in self.archives.values()}
        self.chunk_bytes = int(chunk_bytes)
        self.figures = OtaFigures()
        # Test hook (hidden flag --ota-fault KIND:K:N): the K-th chunk of an archive goes out with one
        # byte flipped, the first N times it is asked for: after hashing ("corrupt", as a damaged
        # link would) or before ("rehash", as a relay that hashes what it sends would).
        self._fault: tuple[str, int, int] | None = None
        if fault:
            kind, _, rest = fault.partition(":")
            k, _, n = rest.partition(":")
            if kind not in ("corrupt", "rehash") or not k.isdigit():
                raise ValueError(f"--ota-fault: expected corrupt:K[:N] or rehash:K[:N], got {fault!r}")
            self._fault = (kind, int(k), int(n or 1))

    @classmethod
    def prepare(
        cls, groups: Mapping[str, str | Path], served: Mapping[str, Bundle], cache_dir: str | Path | None = None, **kw
    ) -> tuple["BundleDistributor", list[Bundle]]:
        """Archives for ``groups`` ({group: bundle directory or tar}); returns the distributor and
        the bundles the server must load besides ``served`` (a directory not served yet is loaded
        here; an archive's bundle must be among ``served``)."""
        cache = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="edgesplit-ota-"))
        cache.mkdir(parents=True, exist_ok=True)
        archives: dict[str, Archive] = {}
        extra: dict[str, Bundle] = {}
        for group, src in groups.items():
            src = Path(src)
            if src.is_dir():
                b = served.get(_manifest_hash_dir(src)) or extra.get(_manifest_hash_dir(src)) or Bundle.load(src)
                if not (src / SIGNATURE_FILE).is_file():  # the directory offered, not a served copy
                    raise BundleError(f"--ota-group {group}: {src} is not signed (edgesplit bundle sign)")
                if b.hash not in served:
                    extra[b.hash] = b
                path = cache / f"{b.hash}.tar.gz"
                if not path.is_file():
                    pack_bundle(src, path)
                bundle_hash = b.hash
            elif src.is_file():
                bundle_hash, path = _manifest_hash_in_tar(src), src
                if bundle_hash not in served:
                    raise BundleError(
                        f"--ota-group {group}: {src} holds bundle {bundle_hash[:16]}..., which this server does not "
                        "serve (add it with --bundle, or name its directory)"
                    )
            else:
                raise BundleError(f"--ota-group {group}: {src} is neither a bundle directory nor an archive")
            archives[group] = Archive(group, bundle_hash, path, path.stat().st_size, _sha256_file(path))
            log.info(
                "offering group %s bundle %s (%d bytes archived)",
                group,
                bundle_hash[:16],
                archives[group].size,
                extra={"event": "ota_group", "group": group, "bundle": bundle_hash, "bytes": archives[group].size},
            )
        return cls(archives, **kw), list(extra.values())

    # -- messages ----------------------------------------------------------------------------------
    def handle(self, session: Any, msg: Message, draining: bool) -> list:
        """The reply parts (header, and the chunk frame) to a ``bundle_query`` or ``bundle_get``.
        Raises ProtocolError (with the message's id) for a refusal."""
        h = msg.header
        rid = h["id"]
        if session is None:
            raise ProtocolError(ErrorCode.NOT_READY, f"{msg.kind}: no session: send hello first", rid)
        if draining:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, f"{msg.kind}: server is shutting down", rid)
        if msg.kind == O.OtaKind.QUERY:
            return [self._offer(rid, h["group"], h["bundle"])]
        return self._chunk(rid, h)

    def _offer(self, rid: int, group: str, running: str) -> dict:
        f = self.figures
        f.queries += 1
        f.by_group.setdefault(group, {})
        f.by_group[group][running] = f.by_group[group].get(running, 0) + 1
        a = self.archives.get(group)
        if a is None:
            return O.bundle_offer(rid, group, None)
        f.offers += 1
        return O.bundle_offer(rid, group, a.bundle, size=a.size, sha256=a.sha256, chunk_bytes=self.chunk_bytes)

    def _chunk(self, rid: int, h: dict) -> list:
        a = self.by_bundle.get(h["bundle"])
        if a is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_BUNDLE,
                f"bundle_get: bundle {h['bundle'][:16]}... is not on offer here (query again)",
                rid,
            )
        offset, length = h["offset"], h["length"]
        if offset >= a.size or length > self.chunk_bytes:
            raise ProtocolError(
                ErrorCode.MALFORMED,
                f"bundle_get: offset {offset} / length {length} outside the archive ({a.size} bytes, chunks of at "
                f"most {self.chunk_bytes})",
                rid,
            )
        n = min(length, a.size - offset)
        if self.rate_bps is not None:
            now = time.monotonic()
            self._tokens = min(self._depth, self._tokens + (now - self._refilled) * self.rate_bps)
            self._refilled = now
            if self._tokens < min(n, self._depth):
                raise ProtocolError(
                    ErrorCode.OVERLOADED,
                    f"bundle_get: the server's update budget ({self.rate_bps * 8 / 1000:g} kbit/s for all agents) "
                    "is spent: ask again shortly",
                    rid,
                )
            self._tokens -= n
        with open(a.path, "rb") as f:
            f.seek(offset)
            data = f.read(min(length, a.size - offset))
        fault = self._fault
        if fault is not None and offset == fault[1] * length and fault[2] > 0:
            self._fault = (fault[0], fault[1], fault[2] - 1)
            flipped = bytes([data[0] ^ 0xFF]) + data[1:]
            if fault[0] == "rehash":
                data = flipped
            header = O.bundle_chunk(rid, a.bundle, offset, a.size, data)
            data = flipped
        else:
            header = O.bundle_chunk(rid, a.bundle, offset, a.size, data)
        self.figures.chunks += 1
        self.figures.chunk_bytes_sent += len(data)
        return [header, data]


def _manifest_hash_dir(root: Path) -> str:
    try:
        return hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest()
    except OSError as e:
        raise BundleError(f"{root}: not a bundle ({e})") from None


def add_ota_arguments(p: Any) -> None:
    g = p.add_argument_group("over-the-air bundle updates (PROTOCOL.md §14)")
    g.add_argument(
        "--ota-group",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="offer this signed bundle (directory, or an archive of a served bundle) to the agents of fleet "
        "group NAME; repeat per group; the bundle is also served",
    )
    g.add_argument(
        "--ota-chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES, help="most bytes of an archive per chunk"
    )
    g.add_argument(
        "--ota-max-kbps",
        type=float,
        default=None,
        help="all agents' update chunks together at most this many kbit/s (unset: no cap); over it a "
        "bundle_get is refused OVERLOADED and retried by the agent",
    )
    g.add_argument("--ota-cache-dir", default=None, metavar="DIR", help="where archives are packed (unset: a temp dir)")
    g.add_argument("--ota-fault", default="", help=argparse.SUPPRESS)  # tests: damage a chunk
