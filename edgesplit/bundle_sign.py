"""Bundle signatures (BUNDLE.md §2.1): Ed25519 over the manifest's bytes, which pin every file
by SHA-256, so one signature covers the whole bundle. The crypto is the ``cryptography``
package's; this module only says what is signed and where the signature lives.

``edgesplit bundle keygen --out DIR [--name publisher]``, ``edgesplit bundle sign BUNDLE --key
KEY``, ``edgesplit bundle verify BUNDLE --pubkey PUB``. Verification is the bundle's own (every
file against its manifest hash) plus the signature over the manifest by the pinned key.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .bundle import MANIFEST, Bundle, BundleError

SIGNATURE_FILE = MANIFEST + ".sig"
SIGNATURE_FORMAT = "edgesplit-bundle-signature"
SIGNATURE_VERSION = 1
# Domain separation: what this key signs as a bundle cannot be replayed as any other message of
# the same key, nor another message as a bundle.
CONTEXT = b"edgesplit bundle signature v1\x00"
PRIVATE_SUFFIX, PUBLIC_SUFFIX = ".ed25519", ".ed25519.pub"


class SignatureError(Exception):
    """A signature is missing, malformed, made by another key, or does not match the manifest."""


def key_id(public: Ed25519PublicKey) -> str:
    """First 16 hex digits of the SHA-256 of the raw 32-byte public key: names the key in messages."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keys(out_dir: str | Path, name: str = "publisher", overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``NAME.ed25519`` (PKCS#8 PEM, mode 0600) and ``NAME.ed25519.pub`` (SubjectPublicKeyInfo PEM)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / (name + PRIVATE_SUFFIX), out / (name + PUBLIC_SUFFIX)
    if not overwrite and (priv_path.exists() or pub_path.exists()):
        raise FileExistsError(f"{priv_path} or {pub_path} exists (overwrite to replace)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return priv_path, pub_path


def load_private(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{path}: not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public(path: str | Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{path}: not a PEM public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: a {type(key).__name__}, not an Ed25519 public key")
    return key


def sign_bundle(bundle_dir: str | Path, private: Ed25519PrivateKey) -> Path:
    """Verify the bundle's files, sign its manifest bytes, write ``manifest.json.sig``; return its path."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise SignatureError(f"{root}: sign a bundle directory (tar it after signing)")
    Bundle.load(root)  # never sign files that do not match their manifest
    raw = (root / MANIFEST).read_bytes()
    doc = {
        "format": SIGNATURE_FORMAT,
        "version": SIGNATURE_VERSION,
        "algorithm": "ed25519",
        "bundle_hash": hashlib.sha256(raw).hexdigest(),
        "key_id": key_id(private.public_key()),
        "signature": base64.b64encode(private.sign(CONTEXT + raw)).decode(),
    }
    path = root / SIGNATURE_FILE
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path


def _read_signature(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise SignatureError(f"{path.parent}: not signed (no {SIGNATURE_FILE})") from None
    except (OSError, ValueError) as e:
        raise SignatureError(f"{path}: unreadable: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != SIGNATURE_FORMAT:
        raise SignatureError(f"{path}: not an edgesplit bundle signature")
    if doc.get("version") != SIGNATURE_VERSION or doc.get("algorithm") != "ed25519":
        raise SignatureError(
            f"{path}: version {doc.get('version')!r} / algorithm {doc.get('algorithm')!r} not supported "
            f"(this reader: version {SIGNATURE_VERSION}, ed25519)"
        )
    for k in ("bundle_hash", "key_id", "signature"):
        if not isinstance(doc.get(k), str):
            raise SignatureError(f"{path}: '{k}' must be a string")
    return doc


def verify_bundle(bundle: str | Path, public: Ed25519PublicKey) -> Bundle:
    """Load the bundle (every file against its manifest hash: :class:`BundleError` on a mismatch),
    then check its signature by ``public`` over the manifest bytes (:class:`SignatureError`).
    Returns the verified bundle."""
    b = Bundle.load(bundle)
    raw = (b.root / MANIFEST).read_bytes()
    doc = _read_signature(b.root / SIGNATURE_FILE)
    want = key_id(public)
    if doc["key_id"] != want:
        raise SignatureError(f"{bundle}: signed by key {doc['key_id']}, not by the pinned key {want}")
    if doc["bundle_hash"] != b.hash:
        raise SignatureError(
            f"{bundle}: the signature is for bundle {doc['bundle_hash'][:16]}..., this manifest is "
            f"{b.hash[:16]}...: the manifest was changed after signing"
        )
    try:
        sig = base64.b64decode(doc["signature"], validate=True)
        public.verify(sig, CONTEXT + raw)
    except (InvalidSignature, binascii.Error, ValueError):
        raise SignatureError(f"{bundle}: the signature does not verify with key {want}") from None
    return b


def bundle_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgesplit bundle", description="bundle signatures (Ed25519), BUNDLE.md §2.1")
    sub = p.add_subparsers(dest="action", required=True)
    g = sub.add_parser("keygen", help="a publisher key pair: NAME.ed25519 (secret) and NAME.ed25519.pub")
    g.add_argument("--out", required=True, metavar="DIR")
    g.add_argument("--name", default="publisher")
    g.add_argument("--force", action="store_true", help="replace existing files of that name")
    s = sub.add_parser("sign", help=f"verify a bundle directory's files and write {SIGNATURE_FILE}")
    s.add_argument("bundle", help="bundle directory")
    s.add_argument("--key", required=True, metavar="KEY", help="the publisher's NAME.ed25519")
    v = sub.add_parser("verify", help="check files against the manifest and the signature against a pinned key")
    v.add_argument("bundle", help="bundle directory or tar")
    v.add_argument("--pubkey", required=True, metavar="PUB", help="the publisher's NAME.ed25519.pub")
    a = p.parse_args(argv)
    try:
        if a.action == "keygen":
            priv, pub = generate_keys(a.out, a.name, a.force)
            print(
                f"secret key: {priv} (keep it off the devices)\npublic key: {pub} (key id {key_id(load_public(pub))})"
            )
        elif a.action == "sign":
            path = sign_bundle(a.bundle, load_private(a.key))
            print(f"signed: {path} (key id {key_id(load_private(a.key).public_key())})")
        else:
            b = verify_bundle(a.bundle, load_public(a.pubkey))
            print(
                f"verified: bundle {b.name} {b.hash[:16]}..., every file matches, signed by {key_id(load_public(a.pubkey))}"
            )
    except (SignatureError, BundleError, OSError) as e:
        print(f"edgesplit bundle {a.action}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(bundle_main(sys.argv[1:]))
