"""edgesplit profile report on the shipped CIFAR bundle: from the manifest alone, from real latency
and power results (the profilers run here at a tiny N), with --measure, and the clear errors for
inputs it cannot use."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from edgesplit.bundle import Bundle
from edgesplit.profile.cli import profile_main

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "models" / "cifar10-resnet20-bottlefit"
E2E = ROOT / "docs" / "bench" / "e2e-cifar10-resnet20-bottlefit.json"
EVAL = ROOT / "docs" / "bench" / "eval-cifar10-resnet20-bottlefit.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cli_json(argv: list[str], capsys) -> dict:
    assert profile_main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _report(argv: list[str], capsys) -> tuple[dict, str]:
    res = _cli_json(["report", "--bundle", str(BUNDLE)] + argv, capsys)
    return res, Path(res["html"]).read_text(encoding="utf-8")


def _check_png(path: str) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC and 10_000 < len(data) < 2_000_000, (path, len(data))
    with Image.open(path) as im:
        im.verify()  # decodes every chunk's CRC: a truncated or garbled file fails here
    with Image.open(path) as im:
        assert im.format == "PNG" and 500 <= im.width <= 2000 and 250 <= im.height <= 2000, im.size


def _embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


@pytest.fixture(scope="module")
def produced(tmp_path_factory):
    """Real latency and power results of the shipped bundle, as their own CLIs write them (tiny N)."""
    import contextlib
    import io

    d = tmp_path_factory.mktemp("inputs")
    out = {}
    for kind, argv in {
        "latency": ["latency", "--bundle", str(BUNDLE), "--batch-sizes", "1", "--threads", "1", "--runs", "5"],
        # no sensor on a CI host: the labelled estimate (on a device with one, the same command measures)
        "power": [
            "power",
            "--bundle",
            str(BUNDLE),
            "--sampler",
            "estimate",
            "--profile",
            "raspberry-pi-5",
            "--frames",
            "8",
            "--min-seconds",
            "0.3",
            "--baseline-seconds",
            "0.3",
        ],
    }.items():
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert profile_main(argv + ["--json"]) == 0
        out[kind] = d / f"{kind}.json"
        out[kind].write_text(buf.getvalue())
    return out


def test_report_from_the_manifest_alone(tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "energy_per_mode.png").write_bytes(b"left by an earlier report")
    res, html = _report(["--out", str(out)], capsys)
    bundle = Bundle.load(BUNDLE)

    assert res["bundle"] == bundle.name and res["bundle_hash"] == bundle.hash
    for name in ("latency_breakdown", "accuracy_vs_bytes"):
        assert res["plots"][name] == str(out / f"{name}.png")
        _check_png(res["plots"][name])
    # No power input: no energy plot, and the stale one from before is gone rather than passed off as new.
    assert res["plots"]["energy_per_mode"] is None and not (out / "energy_per_mode.png").exists()
    assert set(res["missing"]) == {"latency", "power", "e2e", "eval"}

    # Self-contained: the very PNG files, embedded; no script, nothing fetched.
    assert sorted(_embedded_pngs(html)) == sorted(
        Path(res["plots"][n]).read_bytes() for n in ("latency_breakdown", "accuracy_vs_bytes")
    )
    assert "<script" not in html.lower() and "://" not in html and "<link" not in html.lower()
    # The manifest's modes table, the bundle's identity, and what to run for each missing section.
    assert bundle.name in html and bundle.hash in html
    for m in bundle.modes:
        assert f"<td>{m.name}</td>" in html
        assert f'<td class="n">{m.bytes_per_frame:.4g}</td>' in html
        assert f'<td class="n">{m.accuracy:.4g}</td>' in html and f"{100 * m.accuracy:.2f}%" in html
        assert all(f"{v:.4g}" in html for v in m.head_ms.values())
    for command in (
        "edgesplit profile latency --bundle",
        "edgesplit profile power --bundle",
        "edgesplit bench e2e --bundle",
        "edgesplit eval --bundle",
    ):
        assert command in html
    assert [m["bytes_per_frame"] for m in res["summary"]["modes"]] == [m.bytes_per_frame for m in bundle.modes]


def test_report_from_real_latency_power_e2e_and_eval(tmp_path, capsys, produced):
    res, html = _report(
        [
            "--out",
            str(tmp_path),
            "--latency",
            str(produced["latency"]),
            "--power",
            str(produced["power"]),
            "--e2e",
            str(E2E),
            "--eval",
            str(EVAL),
        ],
        capsys,
    )
    assert res["missing"] == {} and set(res["inputs"]) == {"latency", "power", "e2e", "eval"}
    for path in res["plots"].values():
        _check_png(path)
    assert len(_embedded_pngs(html)) == 3

    power = json.loads(produced["power"].read_text())
    assert res["summary"]["power_estimate"] is True
    assert "ESTIMATE: no power sensor was read" in html and "raspberry-pi-5" in html
    for m in power["modes"] + [power["full"]]:
        assert f'<td class="n">{m["joules_per_inference"] * 1e3:.4g}</td>' in html
    assert [m["joules_per_inference"] for m in res["summary"]["modes"]] == [
        m["joules_per_inference"] for m in power["modes"]
    ]

    latency = json.loads(produced["latency"].read_text())
    compute = res["summary"]["compute_ms_p50"]
    assert set(compute) == {"head", "tail", "full"}
    for role, rows in latency["distributions"].items():
        assert compute[role]["p50_ms"] == rows[0]["p50_ms"] and f"{rows[0]['p50_ms']:.4g}" in html
    assert latency["per_node"]["tail"]["nodes"][0]["name"] in html

    # The end-to-end stages add up to the measured end-to-end p50 of each run.
    runs = json.loads(E2E.read_text())["runs"]
    for stages, run in zip(res["summary"]["e2e_stages_ms_p50"], runs):
        parts = sum(v for k, v in stages.items() if k != "e2e")
        assert stages["e2e"] == run["e2e_ms_p50"] and abs(parts - run["e2e_ms_p50"]) < 1e-9
        assert stages["head"] == run["head_ms_p50"] and stages["link + runtime"] > 0
    evaluation = json.loads(EVAL.read_text())
    assert [m["accuracy_eval"] for m in res["summary"]["modes"]] == [m["accuracy"] for m in evaluation["modes"]]
    assert "best JPEG at &lt;= these bytes" in html and " px, q" in html


def test_measure_runs_the_profilers_here(tmp_path, capsys):
    from edgesplit.profile.power.samplers import detect_sampler

    res, html = _report(["--out", str(tmp_path / "a"), "--measure", "--runs", "3", "--min-seconds", "0.2"], capsys)
    assert res["inputs"]["latency"] == "measured by --measure"
    assert set(res["summary"]["compute_ms_p50"]) == {"head", "tail", "full"}
    if detect_sampler("/")[0] is None:
        # No sensor and no --profile: the report still stands and says why there is no energy.
        assert "power" in res["missing"] and res["plots"]["energy_per_mode"] is None
        assert "--profile" in res["notes"]["power"] and "could not measure power" in html
    else:
        assert res["inputs"]["power"] == "measured by --measure" and not res["summary"]["power_estimate"]

    res, html = _report(
        [
            "--out",
            str(tmp_path / "b"),
            "--measure",
            "--runs",
            "3",
            "--min-seconds",
            "0.2",
            "--profile",
            "raspberry-pi-5",
            "--sampler",
            "estimate",
        ],
        capsys,
    )
    assert res["inputs"] == {"latency": "measured by --measure", "power": "measured by --measure"}
    assert res["summary"]["power_estimate"] is True and "ESTIMATE" in html
    _check_png(res["plots"]["energy_per_mode"])
    assert all(m["joules_per_inference"] > 0 for m in res["summary"]["modes"])


def _edited(src: Path, dst: Path, edit) -> Path:
    doc = json.loads(src.read_text())
    edit(doc)
    dst.write_text(json.dumps(doc))
    return dst


def test_bad_inputs_are_clear_errors(tmp_path, produced):
    def report(*argv: str):
        return profile_main(["report", "--bundle", str(BUNDLE), "--out", str(tmp_path / "out"), *argv])

    def drop_energy(doc):
        del doc["modes"][0]["joules_per_inference"]

    cases = [
        (
            ["--latency", str(produced["power"])],
            "is an `edgesplit profile power` result, not an `edgesplit profile latency` one: pass it with --power",
        ),
        (["--power", str(E2E)], "pass it with --e2e"),
        (
            ["--e2e", str(ROOT / "docs/bench/overload-cifar10-resnet20-bottlefit.json")],
            "is an `edgesplit bench overload` result",
        ),
        (["--latency", str(BUNDLE / "manifest.json")], "is a bundle's manifest.json"),
        (["--eval", str(_edited(EVAL, tmp_path / "x.json", lambda d: d.clear()))], "not a result of any edgesplit"),
        (["--latency", str(tmp_path / "nope.json")], r"no such file \(it is written by: edgesplit profile latency"),
        (["--power", str(BUNDLE / "head.onnx")], "not a JSON file"),
        (
            ["--power", str(_edited(produced["power"], tmp_path / "p.json", drop_energy))],
            "lacks 'joules_per_inference'",
        ),
        (
            ["--e2e", str(ROOT / "docs/bench/e2e-imagenette-resnet18-bottlefit.json")],
            "measured on bundle 'imagenette-resnet18-bottlefit', not 'cifar10-resnet20-bottlefit'",
        ),
        (
            ["--eval", str(_edited(EVAL, tmp_path / "e.json", lambda d: d.update(bundle_hash="0" * 64)))],
            "measured on another build of cifar10-resnet20-bottlefit",
        ),
        (
            ["--power", str(_edited(produced["power"], tmp_path / "m.json", lambda d: d["modes"][0].update(mode=9)))],
            r"has modes \[9\] that bundle",
        ),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            report(*argv)
    assert not (tmp_path / "out").exists()  # inputs are checked before anything is written

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(SystemExit, match="--out .*a-file/report: cannot write there"):
        profile_main(["report", "--bundle", str(BUNDLE), "--out", str(a_file / "report")])
    with pytest.raises(SystemExit, match="not a bundle"):
        profile_main(["report", "--bundle", str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="--runs must be at least 1"):
        profile_main(["report", "--bundle", str(BUNDLE), "--out", str(tmp_path / "out"), "--runs", "0"])
