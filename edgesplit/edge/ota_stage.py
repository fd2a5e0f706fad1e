"""What a downloaded bundle is worth, and where the agent keeps its bundles (docs/PROTOCOL.md §14.5–14.6).

Layout of the update directory (``--ota-dir``)::

    state.json            which bundle passed its health check last (``current``), the one before,
                          the hashes refused and why, the bundle being tried (written atomically)
    download/             archives being fetched (``*.part``) or complete (``*.tar.gz``)
    staging/              an archive being unpacked (``*.tmp``), never loaded from
    bundles/HASH/         verified bundles: the current one, the previous one, the one being tried

:func:`stage_archive` unpacks defensively (regular files only, no links, no absolute names or
``..``, one directory level at most, bounded count and total size, checked while unpacking),
then checks the manifest's hash against the offer and the bundle against the pinned publisher key
(:func:`edgesplit.bundle_sign.verify_bundle`: every file's SHA-256, then the Ed25519 signature);
only then is it renamed into ``bundles/``. :func:`load_candidate` loads it from there (verified
again) into an agent and warms it up. Both run in a worker thread, next to inference.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np

from ..bundle import MANIFEST, Bundle, BundleError
from ..bundle_sign import SignatureError, verify_bundle
from ..wire.ota import Offer

MAX_MEMBERS = 256
_BLOCK = 1 << 20
MAX_REJECTED = 32  # refused hashes remembered (the oldest are forgotten)


class StageError(Exception):
    """The archive or the bundle in it is refused; the message says which check failed.
    ``retry``: the download, not the bundle, was at fault (a damaged archive, a full disk): the
    agent fetches it again at its next query instead of refusing the bundle hash for good."""

    def __init__(self, message: str, retry: bool = False):
        super().__init__(message)
        self.retry = retry


class BundleStore:
    """The update directory: bundles by hash and the state file."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.bundles = self.root / "bundles"
        self.staging = self.root / "staging"
        for d in (self.bundles, self.staging):
            d.mkdir(parents=True, exist_ok=True)
        self.state = self._read()

    def _read(self) -> dict[str, Any]:
        try:
            doc = json.loads((self.root / "state.json").read_text())
        except (OSError, ValueError):
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        doc.setdefault("current", None)
        doc.setdefault("previous", None)
        doc.setdefault("trying", None)
        if not isinstance(doc.get("rejected"), dict):
            doc["rejected"] = {}
        return doc

    def save(self) -> None:
        """Write the state atomically (a crash leaves the old file or the new one, never half)."""
        tmp = self.root / "state.json.tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / "state.json")
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def path(self, bundle_hash: str) -> Path:
        return self.bundles / bundle_hash

    def staged(self, bundle_hash: str) -> bool:
        return (self.path(bundle_hash) / MANIFEST).is_file()

    def rejected(self, bundle_hash: str) -> str | None:
        return self.state["rejected"].get(bundle_hash)

    def mark_trying(self, bundle_hash: str) -> int:
        """Record that the agent is about to run ``bundle_hash`` on trial; returns the attempt number."""
        t = self.state["trying"]
        n = t["attempts"] + 1 if isinstance(t, dict) and t.get("bundle") == bundle_hash else 1
        self.state["trying"] = {"bundle": bundle_hash, "attempts": n}
        self.save()
        return n

    def commit(self, bundle_hash: str) -> None:
        """``bundle_hash`` passed its health check: it is what the agent starts on from now on."""
        if self.state["current"] != bundle_hash:
            self.state["previous"] = self.state["current"]
        self.state["current"], self.state["trying"] = bundle_hash, None
        self.save()
        keep = {self.state["current"], self.state["previous"]}
        for d in self.bundles.iterdir():
            if d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)

    def reject(self, bundle_hash: str, reason: str) -> None:
        rej = self.state["rejected"]
        rej[bundle_hash] = reason[:500]
        while len(rej) > MAX_REJECTED:
            del rej[next(iter(rej))]
        if isinstance(self.state["trying"], dict) and self.state["trying"].get("bundle") == bundle_hash:
            self.state["trying"] = None
        self.save()
        if bundle_hash not in (self.state["current"], self.state["previous"]):
            shutil.rmtree(self.path(bundle_hash), ignore_errors=True)


def _unpack(archive: Path, dest: Path, max_bytes: int) -> None:
    """Unpack a tar.gz of one flat bundle into ``dest``, refusing anything else (StageError)."""
    total, names, top = 0, set(), None
    try:
        with tarfile.open(archive, "r:gz") as t:
            for i, m in enumerate(t):
                if i >= MAX_MEMBERS:
                    raise StageError(f"the archive has more than {MAX_MEMBERS} members")
                p = PurePosixPath(m.name)
                if p.is_absolute() or ".." in p.parts or not p.parts or len(p.parts) > 2:
                    raise StageError(f"archive member {m.name!r}: absolute, '..' or nested deeper than one directory")
                if len(p.parts) == 2:
                    if top not in (None, p.parts[0]):
                        raise StageError("archive members under more than one top directory")
                    top = p.parts[0]
                if m.isdir() and len(p.parts) == 1:
                    continue
                if not m.isfile():
                    raise StageError(f"archive member {m.name!r} is not a regular file (links and devices are refused)")
                name = p.parts[-1]
                if name.startswith(".") or name in names:
                    raise StageError(f"archive member {m.name!r}: hidden or repeated file name")
                names.add(name)
                total += m.size
                if total > max_bytes:
                    raise StageError(f"the bundle unpacks to more than {max_bytes} bytes (ota_max_bytes)")
                src = t.extractfile(m)
                assert src is not None
                with open(dest / name, "wb") as out:
                    shutil.copyfileobj(src, out, _BLOCK)
    except (tarfile.TarError, EOFError, OSError) as e:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise StageError(f"no space left on the device while unpacking into {dest.parent}", retry=True) from None
        raise StageError(f"the archive does not unpack: {type(e).__name__}: {e}") from None


def stage_archive(archive: Path, offer: Offer, store: BundleStore, pubkey: Any, max_bytes: int) -> Path:
    """Unpack and verify a downloaded archive (PROTOCOL.md §14.5, checks 2 to 5); move the bundle
    into ``bundles/HASH`` and return that path. StageError names the failed check; nothing
    half-made stays behind."""
    assert offer.bundle is not None
    h = hashlib.sha256()
    with open(archive, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    if h.hexdigest() != offer.sha256:  # check 1
        archive.unlink(missing_ok=True)
        raise StageError("the archive does not match the offer's SHA-256: fetching it again", retry=True)
    tmp = store.staging / f"{offer.bundle}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _unpack(archive, tmp, max_bytes)
        try:
            got = hashlib.sha256((tmp / MANIFEST).read_bytes()).hexdigest()
        except OSError:
            raise StageError(f"the archive holds no {MANIFEST}") from None
        if got != offer.bundle:
            raise StageError(f"the manifest's hash is {got[:16]}..., the offer named {offer.bundle[:16]}...")
        try:
            verify_bundle(tmp, pubkey)
        except BundleError as e:
            raise StageError(f"the files do not match the manifest: {e}") from None
        except SignatureError as e:
            raise StageError(f"signature refused: {e}") from None
        final = store.path(offer.bundle)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final
    except OSError as e:
        full = e.errno == errno.ENOSPC
        reason = "no space left on the device" if full else f"{type(e).__name__}: {e}"
        raise StageError(f"staging failed: {reason}", retry=full) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_candidate(path: Path, pubkey: Any, make_agent: Callable[[Bundle], Any]) -> Any:
    """The health check's first part (PROTOCOL.md §14.6): verify again from where it will run,
    build the agent (its heads load and run once), and warm it up: every head on a fixed input
    gives finite values of the wire tensor's shape, the local model finite logits over the classes."""
    try:
        bundle = verify_bundle(path, pubkey)
    except (BundleError, SignatureError) as e:
        raise StageError(f"the staged bundle no longer verifies: {e}") from None
    try:
        agent = make_agent(bundle)
    except Exception as e:  # an engine that does not load, a mode the bundle lacks, ...
        raise StageError(f"the bundle does not load: {type(e).__name__}: {e}") from None
    x = np.random.default_rng(0).standard_normal((1, *bundle.input_spec["shape"])).astype(np.float32)
    wire = tuple(bundle.wire_spec["shape"])
    try:
        for role, engine in agent.heads.items():
            z = np.asarray(engine.run1(x))
            if z.shape[1:] != wire or not np.isfinite(z).all():
                raise StageError(f"warm-up: head '{role}' gives shape {z.shape[1:]} (wire {wire}) or non-finite values")
        if agent.fallback is not None:
            y = np.asarray(agent.fallback.logits(x))
            if y.shape[-1] != len(bundle.classes) or not np.isfinite(y).all():
                raise StageError("warm-up: the local model gives non-finite logits or the wrong number of classes")
    except StageError:
        agent.close(bye=False)
        raise
    except Exception as e:
        agent.close(bye=False)
        raise StageError(f"warm-up failed: {type(e).__name__}: {e}") from None
    return agent
