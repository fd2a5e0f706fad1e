"""TLS and SuperNode authentication of ``edgesplit federate``'s Flower links
(:mod:`edgesplit.families.sfprompt.tls`, :mod:`edgesplit.families.sfprompt.federate`):

- the per-job certificate chain passes a real TLS handshake over a loopback socket with Python's
  strict X.509 checks, for 127.0.0.1 and localhost, and fails against another CA or another name;
  private keys are 0600; a resumed job reuses its files and replaces broken ones;
- a real SuperLink with TLS and SuperNode authentication admits a SuperNode with the job's CA and a
  registered key, and refuses one with another CA, one in plaintext and one whose key was never
  registered.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgesplit.families.sfprompt.federate import (
    Procs,
    _wait_port,
    flower_env,
    flwr_config,
    free_port,
    register_supernodes,
    superlink_argv,
    supernode_argv,
)
from edgesplit.families.sfprompt.tls import check_server_tls, make_server_tls, node_keys, server_tls, write_private


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def handshake(cert: Path, key: Path, ca: Path, server_hostname: str) -> dict:
    """A TLS handshake over a loopback socket, this certificate and key on the server side and a
    client trusting only ``ca`` (strict X.509 checks, host name checked); the peer certificate."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(ca))
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        errors: list[BaseException] = []

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
                    tls_conn.sendall(b"ok")
            except (ssl.SSLError, OSError) as e:  # the client refused us: its side says why
                errors.append(e)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls_conn:
                    assert tls_conn.recv(2) == b"ok"
                    peer = tls_conn.getpeercert()
                    assert peer is not None
                    return peer
        finally:
            t.join(10)


def test_the_job_certificate_passes_a_real_handshake_and_private_keys_are_0600(tmp_path):
    tls = server_tls(tmp_path / "tls")
    keys = node_keys(tmp_path / "tls", 2)
    assert mode(tls.key) == 0o600
    assert all(mode(k.private) == 0o600 for k in keys)
    assert not (tmp_path / "tls" / "ca.key").exists()  # the CA's key signs once and is dropped
    check_server_tls(tls)
    for name in ("127.0.0.1", "localhost"):
        peer = handshake(tls.cert, tls.key, tls.ca, name)
        assert ("IP Address", "127.0.0.1") in peer["subjectAltName"]
        assert ("DNS", "localhost") in peer["subjectAltName"]
    with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
        handshake(tls.cert, tls.key, tls.ca, "example.com")
    other = make_server_tls(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        handshake(tls.cert, tls.key, other.ca, "127.0.0.1")
    with pytest.raises(ValueError, match="not signed by"):
        check_server_tls(type(tls)(other.ca, tls.cert, tls.key))
    with pytest.raises(ValueError, match="not the private key"):
        check_server_tls(type(tls)(tls.ca, tls.cert, other.key))
    with pytest.raises(ValueError, match="does not name 10.0.0.7"):
        check_server_tls(tls, ("127.0.0.1", "10.0.0.7"))
    # Flower reads the node keys as OpenSSH EC keys on a NIST curve
    private = serialization.load_ssh_private_key(keys[0].private.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    public = serialization.load_ssh_public_key(keys[0].public.read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.public_numbers() == private.public_key().public_numbers()


def test_a_resumed_job_reuses_its_files_and_replaces_broken_ones(tmp_path):
    d = tmp_path / "tls"
    tls = server_tls(d)
    keys = node_keys(d, 2)
    before = {p: p.read_bytes() for p in (tls.ca, tls.cert, tls.key, *(f for k in keys for f in (k.private, k.public)))}
    assert server_tls(d) == tls
    more = node_keys(d, 3)
    assert more[:2] == keys and more[2].private.is_file()
    assert all(p.read_bytes() == b for p, b in before.items())
    # a key that is not the certificate's: the set is made again, and holds together
    write_private(tls.key, make_server_tls(tmp_path / "other").key.read_bytes())
    server_tls(d)
    assert tls.ca.read_bytes() != before[tls.ca]
    check_server_tls(tls)
    # writing a private file over a looser one narrows it to 0600
    loose = tmp_path / "loose"
    loose.write_bytes(b"x")
    os.chmod(loose, 0o644)
    write_private(loose, b"secret")
    assert mode(loose) == 0o600 and loose.read_bytes() == b"secret"


def test_only_supernodes_trusting_the_ca_with_a_registered_key_join(tmp_path):
    """A real SuperLink (TLS, SuperNode authentication) and four SuperNodes: one as the job starts
    them, one with another CA, one in plaintext, one whose key was never registered."""
    tls = server_tls(tmp_path / "tls")
    keys = node_keys(tmp_path / "tls", 3)
    other_ca = make_server_tls(tmp_path / "other").ca
    home = tmp_path / "flwr-home"
    home.mkdir()
    link_port = free_port()
    (home / "config.toml").write_text(flwr_config(link_port, tls))
    env = flower_env(home)
    procs = Procs(tmp_path / "logs")
    give_up = ["--max-retries", "2", "--max-wait-time", "20"]
    try:
        procs.start("superlink", superlink_argv(link_port, tls, node_auth=True), env)
        _wait_port(link_port, 60)
        register_supernodes(keys[:2], env)
        good = procs.start("good", supernode_argv(link_port, 0, 3, tls.ca, keys[0]), env)
        refused = {
            "wrong-ca": procs.start("wrong-ca", supernode_argv(link_port, 1, 3, other_ca, keys[1], *give_up), env),
            # no key: Flower refuses a key over plaintext before dialling; this one dials
            "plaintext": procs.start("plaintext", supernode_argv(link_port, 1, 3, None, None, *give_up), env),
            "unregistered": procs.start(
                "unregistered", supernode_argv(link_port, 2, 3, tls.ca, keys[2], *give_up), env
            ),
        }
        for name, p in refused.items():
            assert p.wait(timeout=90) != 0, name
        logs = {name: (tmp_path / "logs" / f"{name}.log").read_text() for name in refused}
        assert "CERTIFICATE_VERIFY_FAILED" in logs["wrong-ca"], logs["wrong-ca"][-2000:]
        assert "Failed to activate SuperNode" in logs["unregistered"], logs["unregistered"][-2000:]
        assert "Failed to initialize the connection" in logs["plaintext"], logs["plaintext"][-2000:]
        t_end = time.monotonic() + 60
        while "[Fleet.ActivateNode] Activated" not in (tmp_path / "logs" / "superlink.log").read_text():
            assert time.monotonic() < t_end, "the good SuperNode never joined"
            assert good.poll() is None, (tmp_path / "logs" / "good.log").read_text()[-2000:]
            time.sleep(0.5)
        listed = subprocess.run(
            [str(Path(sys.executable).parent / "flwr"), "supernode", "ls", "local", "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        nodes = json.loads(listed.stdout)["nodes"]
        # the two registered keys, one of them online (the good node), none for the unregistered key
        assert sorted(n["status"] for n in nodes) == ["online", "registered"], nodes
        assert good.poll() is None
    finally:
        procs.stop_all()


def test_tls_dir_certificates_not_naming_loopback_are_refused_before_anything_starts(tmp_path, capsys):
    from edgesplit.families.sfprompt.federate import main

    own = make_server_tls(tmp_path / "own", hosts=("link.example.org",))
    out = tmp_path / "job"
    with pytest.raises(SystemExit) as e:
        main(["recipe.yaml", "--out", str(out), "--tls-dir", str(own.ca.parent)])
    assert e.value.code == 2
    assert "does not name 127.0.0.1" in capsys.readouterr().err
    assert not out.exists()
