"""Bundle updates on the wire (PROTOCOL.md §14) and the archive rules (§14.5): the validators, the
server's answers over a real ROUTER (offer, chunk, every refusal with its id), what a server
without update groups does, the deterministic archive, and the defensive unpacking."""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from pathlib import Path

import pytest
import zmq
from build_fixtures import one_torch_thread  # noqa: F401
from ota_fixtures import tar_with

from edgesplit.bundle import MANIFEST
from edgesplit.bundle_sign import generate_keys, load_private, sign_bundle
from edgesplit.edge.ota_stage import BundleStore, StageError, stage_archive
from edgesplit.server.daemon import Server
from edgesplit.server.ota import pack_bundle
from edgesplit.wire import ota as O
from edgesplit.wire import protocol as P
from edgesplit.wire.errors import ErrorCode, ProtocolError

ROOT = Path(__file__).resolve().parents[1]
F = (O.FEATURE_BUNDLE_UPDATES,)
H = "ab" * 32


def parse(h, frames=(), features=F):
    return P.parse([P.pack_header(h), *frames], features=features)


def test_messages_round_trip_and_are_unknown_without_the_feature():
    data = b"x" * 2000
    msgs = [
        (O.bundle_query(O.OTA_ID_BASE, "cams-1", H), ()),
        (O.bundle_offer(O.OTA_ID_BASE, "cams-1", H, size=5000, sha256=H, chunk_bytes=4096), ()),
        (O.bundle_offer(O.OTA_ID_BASE, "cams-1", None), ()),
        (O.bundle_get(O.OTA_ID_BASE + 1, H, 0, 2000), ()),
        (O.bundle_chunk(O.OTA_ID_BASE + 1, H, 0, 5000, data), (data,)),
    ]
    for h, frames in msgs:
        assert parse(h, frames).kind == h["kind"]
        with pytest.raises(ProtocolError) as e:  # a v1.2 receiver: an unknown kind, with the id
            parse(h, frames, features=())
        assert e.value.code == ErrorCode.MALFORMED and e.value.req_id == h["id"]
    assert O.bundle_chunk(1, H, 0, 10, data)["sha256"] == hashlib.sha256(data).hexdigest()
    assert O.Offer.from_header(msgs[2][0]).bundle is None


@pytest.mark.parametrize(
    "h, frames, code",
    [
        (dict(O.bundle_query(1, "cams", H), group="no spaces"), (), ErrorCode.MALFORMED),
        (dict(O.bundle_query(1, "cams", H), group="x" * 65), (), ErrorCode.MALFORMED),
        (dict(O.bundle_query(1, "cams", H), bundle=H.upper()), (), ErrorCode.MALFORMED),
        (O.bundle_query(1, "cams", H), (b"x",), ErrorCode.MALFORMED),
        (
            dict(O.bundle_offer(1, "c", H, size=10, sha256=H, chunk_bytes=4096), chunk_bytes=512),
            (),
            ErrorCode.MALFORMED,
        ),
        (dict(O.bundle_offer(1, "c", H, size=10, sha256=H, chunk_bytes=4096), size=0), (), ErrorCode.MALFORMED),
        (dict(O.bundle_get(1, H, 0, 10), length=0), (), ErrorCode.MALFORMED),
        (dict(O.bundle_get(1, H, 0, 10), offset=-1), (), ErrorCode.MALFORMED),
        (O.bundle_chunk(1, H, 0, 10, b"abc"), (b"abc", b"d"), ErrorCode.MALFORMED),
        (O.bundle_chunk(1, H, 8, 10, b"abc"), (b"abc",), ErrorCode.MALFORMED),  # past the archive's end
        (dict(O.bundle_chunk(1, H, 0, 10, b"abc"), sha256="00"), (b"abc",), ErrorCode.MALFORMED),
    ],
)
def test_validators_refuse_with_the_id(h, frames, code):
    with pytest.raises(ProtocolError) as e:
        parse(h, frames)
    assert e.value.code == code and e.value.req_id == 1


@pytest.fixture(scope="module")
def signed(tmp_path_factory, tiny_bundle):
    root = tmp_path_factory.mktemp("ota-wire")
    b = root / "B"
    shutil.copytree(tiny_bundle.root, b)
    priv, pub = generate_keys(root / "keys")
    sign_bundle(b, load_private(priv))
    return b, pub


def _ask(sock, h):
    sock.send_multipart(P.pack(h))
    assert sock.poll(5000), "no answer"
    return P.parse(sock.recv_multipart(), features=F)


def test_server_offers_serves_and_refuses(signed, tiny_bundle, tmp_path):
    b, _ = signed
    ctx = zmq.Context.instance()
    with Server([tiny_bundle], "tcp://127.0.0.1:0", threads=1, ota_groups={"cams": b}, ota_chunk_bytes=1024) as srv:
        s = ctx.socket(zmq.DEALER)
        s.connect(srv.endpoint)
        try:
            # before hello: NOT_READY with the message's id (parsed as an update message)
            err = _ask(s, O.bundle_get(O.OTA_ID_BASE, tiny_bundle.hash, 0, 1024))
            assert (err.kind, err.header["code"], err.id) == ("error", ErrorCode.NOT_READY, O.OTA_ID_BASE)
            w = _ask(s, P.hello(tiny_bundle.hash, "t"))
            assert O.FEATURE_BUNDLE_UPDATES in w.header["features"]
            other = _ask(s, O.bundle_query(O.OTA_ID_BASE + 1, "elsewhere", tiny_bundle.hash))
            assert other.header["bundle"] is None
            offer = O.Offer.from_header(_ask(s, O.bundle_query(O.OTA_ID_BASE + 2, "cams", tiny_bundle.hash)).header)
            archive = b""
            i = 3
            while len(archive) < offer.size:
                c = _ask(s, O.bundle_get(O.OTA_ID_BASE + i, offer.bundle, len(archive), 1024))
                assert c.kind == O.OtaKind.CHUNK and c.id == O.OTA_ID_BASE + i
                assert hashlib.sha256(bytes(c.frames[0])).hexdigest() == c.header["sha256"]
                archive += bytes(c.frames[0])
                i += 1
            assert hashlib.sha256(archive).hexdigest() == offer.sha256 and offer.archive == "tar.gz"
            for h, code in (
                (O.bundle_get(7 + O.OTA_ID_BASE, H, 0, 1024), ErrorCode.UNKNOWN_BUNDLE),
                (O.bundle_get(8 + O.OTA_ID_BASE, offer.bundle, offer.size, 1024), ErrorCode.MALFORMED),
                (O.bundle_get(9 + O.OTA_ID_BASE, offer.bundle, 0, 4096), ErrorCode.MALFORMED),
            ):
                e = _ask(s, h)
                assert (e.kind, e.header["code"], e.id) == ("error", code, h["id"])
                assert "bundle_" in e.header["message"]  # what the agent's side channel looks for
            # the offered bundle is served for inference too
            assert offer.bundle in srv.bundles
            assert srv.stats()["ota"]["chunks"] == i - 3
        finally:
            s.close(0)


def test_server_update_budget_refuses_overloaded_then_serves(signed, tiny_bundle):
    b, _ = signed
    ctx = zmq.Context.instance()
    # 8 kbit/s for every agent together: one 1 KiB chunk per second
    with Server(
        [tiny_bundle], "tcp://127.0.0.1:0", threads=1, ota_groups={"cams": b}, ota_chunk_bytes=1024, ota_max_kbps=8
    ) as srv:
        s = ctx.socket(zmq.DEALER)
        s.connect(srv.endpoint)
        try:
            _ask(s, P.hello(tiny_bundle.hash, "t"))
            offer = O.Offer.from_header(_ask(s, O.bundle_query(O.OTA_ID_BASE, "cams", tiny_bundle.hash)).header)
            assert _ask(s, O.bundle_get(O.OTA_ID_BASE + 1, offer.bundle, 0, 1024)).kind == O.OtaKind.CHUNK
            e = _ask(s, O.bundle_get(O.OTA_ID_BASE + 2, offer.bundle, 1024, 1024))
            assert (e.kind, e.header["code"], e.id) == ("error", ErrorCode.OVERLOADED, O.OTA_ID_BASE + 2)
            time.sleep(1.1)
            assert _ask(s, O.bundle_get(O.OTA_ID_BASE + 3, offer.bundle, 1024, 1024)).kind == O.OtaKind.CHUNK
        finally:
            s.close(0)


def test_server_without_groups_treats_the_kinds_as_unknown(tiny_bundle):
    ctx = zmq.Context.instance()
    with Server([tiny_bundle], "tcp://127.0.0.1:0", threads=1) as srv:
        s = ctx.socket(zmq.DEALER)
        s.connect(srv.endpoint)
        try:
            w = _ask(s, P.hello(tiny_bundle.hash, "t"))
            assert O.FEATURE_BUNDLE_UPDATES not in (w.header.get("features") or [])
            e = _ask(s, O.bundle_query(O.OTA_ID_BASE, "cams", tiny_bundle.hash))
            assert (e.header["code"], e.id) == (ErrorCode.MALFORMED, O.OTA_ID_BASE)
        finally:
            s.close(0)


def test_archive_is_deterministic(signed, tmp_path):
    b, _ = signed
    pack_bundle(b, tmp_path / "1.tar.gz")
    pack_bundle(b, tmp_path / "2.tar.gz")
    assert (tmp_path / "1.tar.gz").read_bytes() == (tmp_path / "2.tar.gz").read_bytes()


def _offer_for(archive: Path, bundle_hash: str) -> O.Offer:
    data = archive.read_bytes()
    return O.Offer("cams", bundle_hash, len(data), hashlib.sha256(data).hexdigest(), 4096, "tar.gz")


@pytest.mark.parametrize(
    "members, symlink, message",
    [
        ({"../evil": b"x"}, None, "'..'"),
        ({"/abs": b"x"}, None, "absolute"),
        ({"a/b/c": b"x"}, None, "deeper than one directory"),
        ({"a/x": b"x", "b/y": b"y"}, None, "more than one top directory"),
        ({"x": b"x"}, "link", "not a regular file"),
        ({"big": b"x" * 10000}, None, "unpacks to more than"),
        ({".hidden": b"x"}, None, "hidden"),
    ],
)
def test_unpacking_refuses_what_a_bundle_never_holds(tmp_path, members, symlink, message):
    archive = tar_with(members, tmp_path / "a.tar.gz", symlink=symlink)
    store = BundleStore(tmp_path / "ota")
    with pytest.raises(StageError, match=re.escape(message)):
        stage_archive(archive, _offer_for(archive, H), store, None, max_bytes=8192)
    assert not list(store.staging.iterdir()) and not list(store.bundles.iterdir())


def test_unpacking_a_good_archive_under_one_directory(signed, tmp_path):
    from edgesplit.bundle_sign import load_public

    b, pub = signed
    members = {"bundle": None, **{f"bundle/{p.name}": p.read_bytes() for p in b.iterdir()}}
    archive = tar_with(members, tmp_path / "a.tar.gz")
    bundle_hash = hashlib.sha256((b / MANIFEST).read_bytes()).hexdigest()
    store = BundleStore(tmp_path / "ota")
    path = stage_archive(archive, _offer_for(archive, bundle_hash), store, load_public(pub), max_bytes=1 << 24)
    assert path == store.path(bundle_hash) and (path / MANIFEST).read_bytes() == (b / MANIFEST).read_bytes()
    # the same archive offered under another hash: the manifest check refuses it
    with pytest.raises(StageError, match="the offer named"):
        stage_archive(archive, _offer_for(archive, H), store, load_public(pub), max_bytes=1 << 24)


def test_protocol_document_defines_section_14():
    text = (ROOT / "docs" / "PROTOCOL.md").read_text()
    start = text.index("## 14. Bundle updates over the air")
    end = text.find("\n## ", start + 10)
    section = text[start : end if end > 0 else None]
    for name in (*O.OTA_KINDS, O.FEATURE_BUNDLE_UPDATES, O.ARCHIVE_FORMAT):
        assert f"`{name}`" in section or f'`"{name}"`' in section, name
    for code in ("NOT_READY", "SHUTTING_DOWN", "UNKNOWN_BUNDLE", "MALFORMED", "OVERLOADED"):
        assert code in section
    assert "2^63" in section and "[1024, `max_frame_bytes`]" in section and "**v1.3** the feature" in text


def test_update_keys_are_checked_with_the_config(tmp_path, monkeypatch):
    import yaml

    from edgesplit.edge.agent import agent_main
    from edgesplit.edge.service_config import ConfigError, validate

    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    base = {"bundle": "b", "server": "tcp://x:1", "source": "s"}
    with pytest.raises(ConfigError, match="'ota_group' needs 'ota_pubkey'"):
        validate(base | {"ota_group": "cams"})
    with pytest.raises(ConfigError, match="'ota_kbps' is for bundle updates"):
        validate(base | {"ota_kbps": 64.0})
    with pytest.raises(ConfigError, match="needs 'ota_dir'"):
        validate(base | {"ota_group": "cams", "ota_pubkey": "p"})
    with pytest.raises(ConfigError, match="'ota_max_error_rate' must be"):
        validate(base | {"ota_group": "cams", "ota_pubkey": "p", "ota_dir": "d", "ota_max_error_rate": 1.5})
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/edgesplit-agent")
    validate(base | {"ota_group": "cams", "ota_pubkey": "p"})  # systemd gives the directory
    # install-service: the unit's StateDirectory stands in for ota_dir (and for spool_dir only with deliver)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(yaml.safe_dump({"bundle": "/opt/b", "ota_group": "cams", "ota_pubkey": "/etc/p.pub"}))
    assert agent_main(["install-service", "--config", str(cfg), "--out", str(tmp_path / "u.service")]) == 0
    assert "StateDirectory=edgesplit-agent" in (tmp_path / "u.service").read_text()
