"""Bundle signatures (BUNDLE.md §2.1) on a copy of a shipped bundle: a good signature verifies
(directory and tar); a wrong key, a tampered file, a tampered manifest (with or without the
attacker fixing the hashes and the signature's bundle_hash) and a tampered signature are refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edgesplit.bundle import MANIFEST, BundleError, sha256_file
from edgesplit.bundle_sign import (
    SIGNATURE_FILE,
    SignatureError,
    bundle_main,
    generate_keys,
    key_id,
    load_private,
    load_public,
    sign_bundle,
    verify_bundle,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "cifar10-resnet20-bottlefit"


@pytest.fixture
def signed(tmp_path):
    """(bundle copy, publisher public key, another key) with the copy signed by the publisher."""
    b = tmp_path / "bundle"
    shutil.copytree(SHIPPED, b)
    priv, pub = generate_keys(tmp_path / "keys")
    _, other = generate_keys(tmp_path / "keys", "other")
    assert bundle_main(["sign", str(b), "--key", str(priv)]) == 0
    return b, pub, other


def test_keygen_writes_pem_keys_with_a_private_mode(tmp_path):
    priv, pub = generate_keys(tmp_path)
    assert priv.stat().st_mode & 0o777 == 0o600
    assert priv.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert key_id(load_private(priv).public_key()) == key_id(load_public(pub))
    with pytest.raises(FileExistsError):
        generate_keys(tmp_path)
    junk = tmp_path / "junk.pub"
    junk.write_text("junk")
    with pytest.raises(SignatureError, match="not a PEM public key"):
        load_public(junk)
    with pytest.raises(SignatureError, match="not an unencrypted PEM private key"):
        load_private(pub)


def test_good_signature_verifies_as_directory_and_as_tar(signed, tmp_path, capsys):
    b, pub, _ = signed
    doc = json.loads((b / SIGNATURE_FILE).read_text())
    assert doc["algorithm"] == "ed25519" and len(base64.b64decode(doc["signature"])) == 64
    assert bundle_main(["verify", str(b), "--pubkey", str(pub)]) == 0
    assert "verified" in capsys.readouterr().out
    tar = tmp_path / "bundle.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(b, arcname="bundle")
    assert verify_bundle(tar, load_public(pub)).hash == verify_bundle(b, load_public(pub)).hash
    # the command line, as a fleet operator runs it
    r = subprocess.run(
        [sys.executable, "-m", "edgesplit", "bundle", "verify", str(tar), "--pubkey", str(pub)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr


def test_wrong_key_is_refused(signed, capsys):
    b, _, other = signed
    assert bundle_main(["verify", str(b), "--pubkey", str(other)]) == 1
    assert f"not by the pinned key {key_id(load_public(other))}" in capsys.readouterr().err


def test_tampered_file_is_refused(signed):
    b, pub, _ = signed
    head = b / "head.onnx"
    data = bytearray(head.read_bytes())
    data[len(data) // 2] ^= 0x01
    head.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its manifest hash"):
        verify_bundle(b, load_public(pub))


def test_tampered_manifest_is_refused_even_with_consistent_hashes(signed):
    b, pub, _ = signed
    # the attacker swaps a file and rewrites its hash in the manifest: files and manifest agree
    head = b / "head.onnx"
    head.write_bytes(head.read_bytes() + b"\0")
    m = json.loads((b / MANIFEST).read_text())
    m["files"]["head"]["sha256"], m["files"]["head"]["bytes"] = sha256_file(head), head.stat().st_size
    (b / MANIFEST).write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    with pytest.raises(SignatureError, match="manifest was changed after signing"):
        verify_bundle(b, load_public(pub))
    # ... and also rewrites the signature's bundle_hash: the signature itself fails
    sig = json.loads((b / SIGNATURE_FILE).read_text())
    sig["bundle_hash"] = hashlib.sha256((b / MANIFEST).read_bytes()).hexdigest()
    (b / SIGNATURE_FILE).write_text(json.dumps(sig))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_bundle(b, load_public(pub))


def test_tampered_or_missing_signature_is_refused(signed):
    b, pub, _ = signed
    sig = json.loads((b / SIGNATURE_FILE).read_text())
    raw = bytearray(base64.b64decode(sig["signature"]))
    raw[0] ^= 0x80
    sig["signature"] = base64.b64encode(bytes(raw)).decode()
    (b / SIGNATURE_FILE).write_text(json.dumps(sig))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_bundle(b, load_public(pub))
    (b / SIGNATURE_FILE).unlink()
    with pytest.raises(SignatureError, match="not signed"):
        verify_bundle(b, load_public(pub))


def test_sign_refuses_a_bundle_whose_files_do_not_match(tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(SHIPPED, b)
    (b / "tail.onnx").write_bytes(b"not the tail")
    priv, _ = generate_keys(tmp_path / "keys")
    with pytest.raises(BundleError):
        sign_bundle(b, load_private(priv))
    assert not (b / SIGNATURE_FILE).exists()
