"""TLS certificates and SuperNode keys for ``edgesplit federate``'s Flower links (no torch).

Per job, in ``OUT/tls``: a CA certificate (``ca.pem``), a server certificate it signed
(``server.pem``, SANs IP 127.0.0.1 and DNS localhost, or the names given) and the server's private
key (``server.key``). The CA's own private key is never written: it signs the one server
certificate and is dropped, so no one can issue another certificate the job's SuperNodes would
trust. Per client, an EC P-384 key pair in OpenSSH format (``node-<i>.key``, ``node-<i>.pub``):
the SuperLink admits only SuperNodes whose public key was registered with it (Flower's SuperNode
authentication), and each SuperNode signs its requests with its private key. Private keys are
written mode 0600. Everything here is reused when a job resumes; certificates are made again only
when missing, broken or about to expire.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, SERVER_CERT, SERVER_KEY = "ca.pem", "server.pem", "server.key"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
VALID_DAYS = 365
# A certificate this close to its end is made again rather than reused by a resumed job.
RENEW_BEFORE = datetime.timedelta(days=1)


@dataclass(frozen=True)
class ServerTls:
    """The SuperLink's certificate and key, and the CA that SuperNodes and ``flwr`` trust."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class NodeKey:
    """One SuperNode's authentication key pair (OpenSSH format, as Flower reads them)."""

    private: Path
    public: Path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (0600), also when it existed with a
    looser mode: the file is created 0600, never widened then narrowed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask cannot loosen it, but a stale tmp file could be wider
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgesplit"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    """A KeyUsage extension with only the ``allowed`` uses set."""
    uses = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement")
    uses += ("key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{u: allowed.get(u, False) for u in uses})


def _builder(subject: x509.Name, issuer: x509.Name, key, start, end) -> x509.CertificateBuilder:
    """A certificate for ``key``'s public half, valid from ``start`` to ``end``, a random serial."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )


def _canonical(host: str) -> str:
    """An IP address as the SAN lists it (``::1`` for ``0:0::1``), a DNS name as given."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def make_server_tls(directory: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS, days: int = VALID_DAYS) -> ServerTls:
    """A fresh CA and a server certificate for ``hosts`` signed by it, written in ``directory``.
    EC P-256 keys and SHA-256 signatures; the extensions are those Python's strict X.509 checks
    (``VERIFY_X509_STRICT``) and gRPC/OpenSSL expect of a CA and a TLS server."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)  # 5 min: clock skew
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("edgesplit federate CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        _builder(ca_name, ca_name, ca_key, start, end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        _builder(_name(hosts[0]), ca_name, server_key, start, end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    tls = ServerTls(directory / CA_CERT, directory / SERVER_CERT, directory / SERVER_KEY)
    write_private(
        tls.key,
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    # The key first: a crash in between leaves a key without its certificate, which check_server_tls refuses.
    tls.cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    tls.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return tls


def check_server_tls(tls: ServerTls, hosts: tuple[str, ...] = DEFAULT_HOSTS) -> None:
    """Raise ``ValueError`` saying what is wrong unless ``tls.cert`` was signed by ``tls.ca``, is
    valid now and for at least :data:`RENEW_BEFORE` more, names every one of ``hosts``, and
    ``tls.key`` is its private key."""
    for p in (tls.ca, tls.cert, tls.key):
        if not p.is_file():
            raise ValueError(f"{p}: missing")
    ca = x509.load_pem_x509_certificate(tls.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    key = serialization.load_pem_private_key(tls.key.read_bytes(), password=None)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise ValueError(f"{tls.cert} is not signed by {tls.ca}: {e}") from e
    now = datetime.datetime.now(datetime.timezone.utc)
    for c, p in ((ca, tls.ca), (cert, tls.cert)):
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc - RENEW_BEFORE:
            raise ValueError(f"{p}: valid {c.not_valid_before_utc} to {c.not_valid_after_utc}, not now + 1 day")
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ValueError(f"{tls.key} is not the private key of {tls.cert}")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError(f"{tls.cert}: no subject alternative names") from None
    named = {str(n) for n in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))
    missing = [h for h in hosts if _canonical(h) not in named]
    if missing:
        raise ValueError(f"{tls.cert} does not name {', '.join(missing)} (it names {', '.join(sorted(named))})")


def server_tls(directory: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS) -> ServerTls:
    """The job's TLS files in ``directory``: those already there when they pass
    :func:`check_server_tls` (a resumed job), else new ones."""
    tls = ServerTls(directory / CA_CERT, directory / SERVER_CERT, directory / SERVER_KEY)
    try:
        check_server_tls(tls, hosts)
        return tls
    except ValueError:
        return make_server_tls(directory, hosts)


def node_keys(directory: Path, clients: int) -> list[NodeKey]:
    """One authentication key pair per client in ``directory`` (``node-<i>.key``/``.pub``), made
    for those that lack one and reused for the rest."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = []
    for i in range(clients):
        k = NodeKey(directory / f"node-{i}.key", directory / f"node-{i}.pub")
        if not (k.private.is_file() and k.public.is_file()):
            private = ec.generate_private_key(ec.SECP384R1())
            write_private(
                k.private,
                private.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
                ),
            )
            k.public.write_bytes(
                private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
                + b"\n"
            )
        keys.append(k)
    return keys
