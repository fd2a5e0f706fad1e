"""The registry of split families, and every registered family end to end through the command line.

For each family in ``family_names()``: ``edgesplit train tests/recipes/tiny-<family>.yaml`` on a
slice of the real CIFAR-10 shards, ``edgesplit export runs/<name>/student.pt --out DIR`` and
``edgesplit inspect DIR`` as subprocesses; then a head-tail bundle is served by the real server on
loopback to the real agent (every mode, logits checked against the bundle's own head -> codec ->
tail run here) and evaluated by ``edgesplit eval``'s code, whose per-mode accuracy must equal the
served one. A scatter bundle (ED-ViT) is fused here in ONNX Runtime from its own files, with all
sub-models and with each one missing, and the accuracies must equal the manifest's. A U-shaped
bundle (SFPrompt) is served by the same daemon to the same agent, which runs the tail on the
body's output: every mode's logits equal the bundle's head -> codec -> body -> tail run here, and
its served accuracy equals that offline run's and the manifest's.

Registry: unknown families are refused by the registry, the recipe loader and the bundle contract,
each naming the known ones; the registry and the families' ``__init__`` modules import no torch;
and a family added as one subpackage (in a temporary folder) is known to the recipe loader and the
bundle contract, which runs its own manifest check, with no other edit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from build_fixtures import one_torch_thread, require_cifar  # noqa: F401  (pytest fixture by name)

from edgesplit.builder.recipe import RecipeError, load_recipe
from edgesplit.bundle import Bundle, BundleError, validate_manifest
from edgesplit.families.registry import UnknownFamilyError, family_names, get_family, register_family

ROOT = Path(__file__).resolve().parents[1]
RECIPES = Path(__file__).resolve().parent / "recipes"
SHIPPED = {
    "bottlefit": ROOT / "models" / "cifar10-resnet20-bottlefit",
    "slimmable": ROOT / "models" / "imagenette-resnet18-slimmable",
}
LIMIT_PER_SHARD = 8  # 5 train shards x 8 = 40 training images, 8 test images
FRAMES = 16  # frames served and evaluated


def edgesplit_cli(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    # One intra-op thread: two spinning OpenMP threads on a busy 2-core machine are far slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "edgesplit", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def shipped_manifest(family: str) -> dict:
    return json.loads((SHIPPED[family] / "manifest.json").read_text())


# -- the registry --------------------------------------------------------------------------------


def test_both_shipped_families_are_registered_and_resolve():
    assert {"bottlefit", "slimmable"} <= set(family_names())
    for name in family_names():
        fam = get_family(name)
        assert fam.name == name and fam.module == f"edgesplit.families.{name}"
        assert (
            set(fam.required_files)
            == {
                "head-tail": {"head", "tail"},
                "scatter": {"fusion"},
                "u-shaped": {"head", "body", "tail"},
            }[fam.serving]
        )
        for point in ("split_schema", "model", "load_student", "steps", "exporter"):
            assert callable(fam.entry(point)), (name, point)
        assert (RECIPES / f"tiny-{name}.yaml").is_file(), f"every family ships a test recipe: tiny-{name}.yaml"


def test_unknown_family_is_refused_by_the_registry():
    with pytest.raises(UnknownFamilyError) as ei:
        get_family("nosuchfamily")
    assert "'nosuchfamily'" in str(ei.value) and f"known: {', '.join(family_names())}" in str(ei.value)
    with pytest.raises(UnknownFamilyError):
        get_family(["bottlefit"])  # not a name at all


def test_registration_is_checked():
    fam = get_family("bottlefit")
    record = {k: getattr(fam, k) for k in ("summary", "split_schema", "model", "load_student", "steps", "exporter")}
    with pytest.raises(ValueError, match="already registered"):
        register_family("bottlefit", **{**record, "summary": "another family under the same name"})
    with pytest.raises(ValueError, match="steps must be 'package.module:attribute'"):
        register_family("newfam", **{**record, "steps": "edgesplit.families.newfam.steps.run"})
    with pytest.raises(ValueError, match="serving shape"):
        register_family("newfam", **record, serving="pipeline")
    with pytest.raises(ValueError, match="serving shape 'scatter' leaves the modes to the family.*manifest_parse"):
        register_family("newfam", **record, serving="scatter")  # nothing would check or parse its modes
    with pytest.raises(ValueError, match="must name a manifest_check and a manifest_parse"):
        register_family("newfam", **record, serving="scatter", manifest_check="edgesplit.families.newfam.m:check")
    with pytest.raises(ValueError, match="manifest_check must be 'package.module:attribute'"):
        register_family("newfam", **record, manifest_check="edgesplit.families.newfam.manifest")
    with pytest.raises(LookupError, match="family bottlefit has no manifest_check"):
        fam.entry("manifest_check")
    with pytest.raises(ValueError, match="family name"):
        register_family("New Family", **record)
    assert "newfam" not in family_names()
    assert register_family("bottlefit", **record, optional_files=fam.optional_files, module="x") == fam  # same record


def test_unknown_family_is_refused_by_the_recipe_loader(tmp_path):
    data = yaml.safe_load((RECIPES / "tiny-bottlefit.yaml").read_text())
    for name in ("nosuchfamily", "transformer-magic", 7):
        (tmp_path / "r.yaml").write_text(yaml.safe_dump({**data, "split": {**data["split"], "family": name}}))
        with pytest.raises(RecipeError, match=r"split\.family: unknown family") as ei:
            load_recipe(tmp_path / "r.yaml")
        assert f"known: {', '.join(family_names())}" in str(ei.value)
    del data["split"]["family"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match=r"split\.family: required"):
        load_recipe(tmp_path / "r.yaml")


def test_a_family_schema_refuses_another_familys_keys(tmp_path):
    data = yaml.safe_load((RECIPES / "tiny-slimmable.yaml").read_text())
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**data, "split": {**data["split"], "family": "bottlefit"}}))
    with pytest.raises(
        RecipeError, match=r"unknown key\(s\) \['sandwich_random', 'widths'\].*split family 'bottlefit'"
    ):
        load_recipe(tmp_path / "r.yaml")


@pytest.mark.parametrize("name", ["nosuchfamily", "transformer-magic"])
def test_unknown_family_is_refused_by_the_bundle_contract(name):
    m = shipped_manifest("bottlefit")
    m["family"] = name
    with pytest.raises(BundleError) as ei:
        validate_manifest(m)
    assert f"unknown family '{name}'" in str(ei.value) and f"known: {', '.join(family_names())}" in str(ei.value)


def test_file_roles_follow_the_family():
    validate_manifest(shipped_manifest("bottlefit"))
    validate_manifest(shipped_manifest("slimmable"))
    extra = {"path": "x.onnx", "sha256": "0" * 64}
    bottlefit = shipped_manifest("bottlefit")
    bottlefit["files"]["head.c3"] = extra  # per-mode heads are a slimmable thing
    with pytest.raises(BundleError, match="unknown file role 'head.c3' for family bottlefit"):
        validate_manifest(bottlefit)
    bottlefit = shipped_manifest("bottlefit")
    bottlefit["modes"][0]["head"] = "head.c3"
    with pytest.raises(BundleError, match="not a head role of family bottlefit"):
        validate_manifest(bottlefit)
    slim = shipped_manifest("slimmable")
    slim["files"]["tail_torch"] = extra  # the slimmable exporter writes no torch tail
    with pytest.raises(BundleError, match="unknown file role 'tail_torch' for family slimmable"):
        validate_manifest(slim)


def test_registry_and_family_inits_import_no_torch():
    code = textwrap.dedent("""
        import json, sys
        from edgesplit.families.registry import family_names, get_family
        names = family_names()  # imports every family's __init__
        inits = sorted(m for m in sys.modules if m.startswith("edgesplit.families."))
        for n in names:
            get_family(n).entry("split_schema")  # the recipe schemas are torch-free too
            if get_family(n).manifest_check:
                get_family(n).entry("manifest_check")  # and the manifest checks every reader runs
        import edgesplit.bundle
        edgesplit.bundle.Bundle.load(sys.argv[1])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnxruntime", "onnx"))
        print(json.dumps({"names": names, "inits": inits, "heavy": heavy}))
    """)
    out = subprocess.run(
        [sys.executable, "-c", code, str(SHIPPED["slimmable"])], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["names"] == family_names()
    assert {f"edgesplit.families.{n}" for n in got["names"]} <= set(got["inits"])
    assert got["heavy"] == []


def test_a_new_family_is_one_subpackage(tmp_path):
    """A family dropped into the families folder (here a temporary one on its search path) is known
    to the registry, the recipe loader and the bundle contract without any other edit."""
    pkg = tmp_path / "families" / "toyfam"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        textwrap.dedent("""
        from edgesplit.families.registry import register_family

        register_family("toyfam", summary="test family", split_schema="edgesplit.families.toyfam.config:ToyCfg",
                        model="edgesplit.families.toyfam.config:unused", load_student="edgesplit.families.toyfam.config:unused",
                        steps="edgesplit.families.toyfam.config:unused", exporter="edgesplit.families.toyfam.config:unused",
                        manifest_check="edgesplit.families.toyfam.config:check_manifest", module=__name__)
    """)
    )
    (pkg / "config.py").write_text(
        textwrap.dedent("""
        from dataclasses import dataclass
        from edgesplit.families.registry import SplitSection

        @dataclass(kw_only=True)
        class ToyCfg(SplitSection):
            split_at: str
            channels: int

            def check_recipe(self, recipe):
                if self.channels > 8:
                    raise ValueError(f"split.channels: at most 8, got {self.channels}")

        def unused():
            raise NotImplementedError

        def check_manifest(m, files):
            if not isinstance(m.get("toyfam"), dict) or m["toyfam"].get("channels") not in (1, 2, 4, 8):
                raise ValueError(f"'toyfam.channels' must be 1, 2, 4 or 8, got {m.get('toyfam')!r}")
    """)
    )
    data = yaml.safe_load((RECIPES / "tiny-bottlefit.yaml").read_text())
    for channels in (4, 9):
        (tmp_path / f"toy{channels}.yaml").write_text(
            yaml.safe_dump({**data, "split": {"family": "toyfam", "split_at": "layer1", "channels": channels}})
        )
    manifest = shipped_manifest("bottlefit")
    manifest["family"] = "toyfam"
    manifest["toyfam"] = {"channels": 4}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    code = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        import edgesplit.families
        edgesplit.families.__path__.append(sys.argv[1])
        from edgesplit.builder.recipe import RecipeError, load_recipe
        from edgesplit.bundle import BundleError, validate_manifest
        from edgesplit.families.registry import family_names
        tmp = Path(sys.argv[2])
        r = load_recipe(tmp / "toy4.yaml")
        try:
            load_recipe(tmp / "toy9.yaml")
            refused = None
        except RecipeError as e:
            refused = str(e)
        m = json.loads((tmp / "manifest.json").read_text())
        validate_manifest(m)
        m["toyfam"]["channels"] = 3
        try:
            validate_manifest(m)  # the toy's own manifest_check, found through the registry
            bad_section = None
        except BundleError as e:
            bad_section = str(e)
        print(json.dumps({"names": family_names(), "schema": type(r.split).__name__, "channels": r.split.channels,
                          "refused": refused, "bad_section": bad_section}))
    """)
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "families"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got == {
        "names": sorted([*family_names(), "toyfam"]),
        "schema": "ToyCfg",
        "channels": 4,
        "refused": "split.channels: at most 8, got 9",
        "bad_section": "manifest: 'toyfam.channels' must be 1, 2, 4 or 8, got {'channels': 3}",
    }
    assert "toyfam" not in family_names()  # this process never saw it


# -- every family: train -> export -> inspect on the command line, then serve and evaluate -----------


@dataclass
class Built:
    family: str
    recipe: object
    run_dir: Path
    train_out: str
    export_out: dict
    inspect_out: str
    bundle: Bundle


@pytest.fixture(scope="module", params=family_names())
def built(request, tmp_path_factory) -> Built:
    require_cifar()
    family = request.param
    recipe_path = RECIPES / f"tiny-{family}.yaml"
    recipe = load_recipe(recipe_path)
    work = tmp_path_factory.mktemp(f"cli-{family}")
    train = edgesplit_cli(
        ["train", str(recipe_path), "--device", "cpu", "--workers", "1", "--limit-per-shard", str(LIMIT_PER_SHARD)],
        cwd=work,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    run_dir = work / "runs" / recipe.name  # the default run directory, relative to where it ran
    export = edgesplit_cli(
        ["export", str(run_dir / "student.pt"), "--out", str(work / "bundle"), "--check-frames", str(FRAMES)], cwd=work
    )
    assert export.returncode == 0, export.stderr[-3000:]
    inspect = edgesplit_cli(["inspect", str(work / "bundle")], cwd=work, timeout=120)
    assert inspect.returncode == 0, inspect.stderr[-3000:]
    return Built(
        family, recipe, run_dir, train.stdout, json.loads(export.stdout), inspect.stdout, Bundle.load(work / "bundle")
    )


def test_cli_trains_exports_and_inspects(built):
    r, run_dir, b = built.recipe, built.run_dir, built.bundle
    results = json.loads((run_dir / "results.json").read_text())
    assert results["recipe"] == r.name and results["eval_frames"] == LIMIT_PER_SHARD
    if get_family(built.family).serving == "scatter":
        check_scatter_bundle(built, results)
        return
    if get_family(built.family).serving == "u-shaped":
        check_u_shaped_bundle(built, results)
        return
    assert {m["bits"] for m in results["modes"]} == set(r.mode_bits)
    assert f"next: edgesplit export {Path('runs') / r.name / 'student.pt'}" in built.train_out
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    data = next(x for x in log if x.get("event") == "data")
    assert (data["train"], data["eval"]) == (5 * LIMIT_PER_SHARD, LIMIT_PER_SHARD)
    assert {x["stage"] for x in log if "epoch" in x and "event" not in x} >= {"teacher", "stage1", "stage2"}
    assert log[-1]["event"] == "done"
    # export: what it printed is the bundle on disk
    assert built.export_out["bundle"] == str(b.root) and built.export_out["hash"] == b.hash
    assert [tuple(x) for x in built.export_out["modes"]] == [(m.name, m.bytes_per_frame, m.accuracy) for m in b.modes]
    # inspect verified it and reports this family and hash
    assert f"family   {built.family}\n" in built.inspect_out and f"hash     {b.hash}\n" in built.inspect_out
    fam = get_family(built.family)
    assert b.family == built.family and b.name == r.name
    assert set(fam.required_files) <= set(b.manifest["files"])
    assert b.default_mode.bits == r.default_bits and {m.bits for m in b.modes} == set(r.mode_bits)
    assert len(b.modes) == len(results["modes"])
    C, h, w = b.wire_spec["shape"]
    for m in b.modes:
        assert 1 <= m.channels <= C and m.bytes_per_frame == m.channels * h * w * m.bits / 8
    for graph, check in b.manifest["export"]["checks"].items():
        assert check["frames"] == FRAMES and check["max_rel_diff"] < 1e-2, (graph, check)


def test_export_options_of_another_family_are_refused(built):
    """``--entropy-steps`` is the BottleFit exporter's: any other family's student is refused before
    any work, naming the option; a malformed list is a usage error."""
    student = str(built.run_dir / "student.pt")
    bad = edgesplit_cli(["export", student, "--out", str(built.run_dir / "x"), "--entropy-steps", "1,x"], built.run_dir)
    assert bad.returncode == 2 and "comma-separated numbers" in bad.stderr
    if built.family == "bottlefit":
        return
    out = edgesplit_cli(["export", student, "--out", str(built.run_dir / "x"), "--entropy-steps", "1,2"], built.run_dir)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"the {built.family} family's exporter takes no entropy-steps" in out.stderr
    assert not (built.run_dir / "x").exists()


def check_scatter_bundle(built: Built, results: dict) -> None:
    """A scatter family's run and bundle (BUNDLE.md section 7.1): what training logged and wrote,
    what export printed and inspect showed, one sub-model file per class subset."""
    r, run_dir, b = built.recipe, built.run_dir, built.bundle
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert next(x for x in log if x.get("event") == "data")["train"] == 5 * LIMIT_PER_SHARD
    stages = {x["stage"] for x in log if "epoch" in x and "event" not in x}
    assert stages >= {"teacher", "stage2_fusion"}
    # stage 1 trains the sub-models together (one stage named after all of them on a fresh run)
    trained = {part for st in stages if st.startswith("stage1_") for part in st.split("_")[1:]}
    assert trained == {f"sub{i}" for i in range(r.split.submodels)}
    assert all((run_dir / f"stage1_sub{i}.pt").is_file() for i in range(r.split.submodels))
    assert log[-1]["event"] == "done"
    assert built.export_out["bundle"] == str(b.root) and built.export_out["hash"] == b.hash
    assert f"family   {built.family}\n" in built.inspect_out and f"hash     {b.hash}\n" in built.inspect_out
    assert b.serving == "scatter" and b.modes == [] and len(b.submodels) == r.split.submodels
    assert sorted(c for s in b.submodels for c in s.classes) == list(range(len(b.classes)))
    assert [s.role for s in b.submodels] == [f"submodel.{i}" for i in range(r.split.submodels)]
    assert b.fusion is not None and b.has("fusion") and b.has("full")
    assert {fm.features_dtype for fm in b.feature_modes} == {"float32", "float16"}
    for graph, check in b.manifest["export"]["checks"].items():
        assert check["frames"] == FRAMES and check["max_rel_diff"] < 1e-2, (graph, check)


def check_u_shaped_bundle(built: Built, results: dict) -> None:
    """A U-shaped family's run and bundle (BUNDLE.md section 7.3): the rounds training ran, what export
    printed and inspect showed, the head/body/tail/full graphs, one mode per token dtype, and the body
    package for split training written beside the bundle."""
    from edgesplit.families.sfprompt.bundle_export import body_package_dir
    from edgesplit.server.body_runner import BodyPackage

    r, b = built.recipe, built.bundle
    assert [x["round"] for x in results["rounds"]] == list(range(1, r.split.rounds + 1))
    assert built.export_out["bundle"] == str(b.root) and built.export_out["hash"] == b.hash
    assert [tuple(x) for x in built.export_out["modes"]] == [(m.name, m.bytes_per_frame, m.accuracy) for m in b.modes]
    assert f"family   {built.family}\n" in built.inspect_out and f"hash     {b.hash}\n" in built.inspect_out
    assert b.serving == "u-shaped" and set(b.manifest["files"]) == {"head", "body", "tail", "full"}
    T, D = b.wire_spec["shape"]
    assert (T, D) == (1 + r.split.prompts + (r.input_size // 4) ** 2, 128)
    assert {m.dtype for m in b.modes} == {"float32", "float16", "uint8"}
    for m in b.modes:
        assert m.bytes_per_frame == T * D * m.bits // 8 and m.accuracy is not None
    for graph, check in b.manifest["export"]["checks"].items():
        assert check["frames"] == FRAMES and check["max_rel_diff"] < 1e-2, (graph, check)
    assert BodyPackage.load(body_package_dir(b.root)).hash == b.manifest["sfprompt"]["body_package"]


def check_u_shaped_served(b: Bundle) -> None:
    """Served by the daemon to the agent, every mode: logits equal to the bundle's head -> codec ->
    body -> answer codec -> tail run here (ONNX Runtime), accuracy equal to that run's and the
    manifest's; the answer comes back in the mode's own dtype (PROTOCOL.md §15.6.1)."""
    from edgesplit.data.sources import open_source, take
    from edgesplit.data.transforms import preprocess
    from edgesplit.edge.agent import Agent
    from edgesplit.engine import create_engine
    from edgesplit.server.daemon import Server
    from edgesplit.wire.split_train import roundtrip

    samples = list(take(open_source("cifar10:test"), FRAMES))
    labels = np.asarray([s.label for s in samples])
    head, body, tail = (create_engine(b.file(role), threads=1) for role in ("head", "body", "tail"))
    tokens = [head.run1(preprocess(s.data, b.input_spec)[None])[0] for s in samples]
    T, D = b.wire_spec["shape"]
    with Server([b], "tcp://127.0.0.1:0", threads=1, max_batch=8, max_queue_delay_us=500) as srv:
        with Agent(b, srv.endpoint, threads=1) as agent:
            assert "u_shaped" in agent.welcome.features
            for m in b.modes:
                got = [agent.infer(s, mode=m.id) for s in samples]
                assert all(x.error is None and x.source == "server" for x in got), [x.to_json() for x in got]
                assert all(x.bytes_sent == x.bytes_received == m.bytes_per_frame for x in got)
                served = np.stack([x.logits for x in got])
                offline = np.stack(
                    [tail.run1(roundtrip(body.run1(roundtrip(z, m.bits)[None]), m.bits))[0] for z in tokens]
                )
                np.testing.assert_allclose(served, offline, rtol=1e-4, atol=1e-4)
                acc = float(np.mean(served.argmax(1) == labels))
                assert acc == float(np.mean(offline.argmax(1) == labels)) == m.accuracy, (m.name, acc, m.accuracy)


def scatter_fused_logits(b: Bundle, samples, mask) -> np.ndarray:
    """The fused answer computed here from the bundle's own files in ONNX Runtime: every sub-model
    on the preprocessed frames, features concatenated in id order with zeros where mask is 0."""
    import onnxruntime as ort

    from edgesplit.data.transforms import preprocess

    x = np.stack([preprocess(s.data, b.input_spec) for s in samples])
    parts = []
    for i, sm in enumerate(b.submodels):
        sess = ort.InferenceSession(str(b.file(sm.role)), providers=["CPUExecutionProvider"])
        feats = sess.run([sm.features], {"input": x})[0]
        assert feats.shape == (len(x), sm.features_dim)
        parts.append(feats * mask[:, i : i + 1])
    fusion = ort.InferenceSession(str(b.file(b.fusion.role)), providers=["CPUExecutionProvider"])
    feed = {b.fusion.features: np.concatenate(parts, 1).astype(np.float32), b.fusion.mask: mask}
    return fusion.run([b.fusion.output], feed)[0]


def check_scatter_served(b: Bundle) -> None:
    """Served: one `edgesplit worker` process per sub-model and the camera on loopback; every frame
    fused from all of them, equal to the fused answer computed here from the bundle's files."""
    from edvit_fixtures import Workers

    from edgesplit.data.sources import open_source, take
    from edgesplit.edge.scatter_bundle import EdvitBundle
    from edgesplit.edge.scatter_camera import ScatterCamera

    samples = list(take(open_source("cifar10:test"), FRAMES))
    workers = Workers()
    try:
        endpoints = [workers.start(b.root, str(i))[1] for i in range(len(b.submodels))]
        cam = ScatterCamera(EdvitBundle.load(b.root), endpoints, budget_ms=5000).connect()
        try:
            got = [cam.infer(s) for s in samples]
        finally:
            cam.close()
    finally:
        workers.stop()
    assert all(a.used == list(range(len(b.submodels))) and a.missing == [] and a.fallback is None for a in got)
    want = scatter_fused_logits(b, samples, np.ones((FRAMES, len(b.submodels)), np.float32))
    np.testing.assert_allclose(np.stack([a.logits for a in got]), want, rtol=1e-4, atol=1e-4)


def check_scatter_evaluated(b: Bundle) -> None:
    """Fused accuracy, all present and each sub-model missing, recomputed here equals the manifest's."""
    from edgesplit.data.sources import open_source, take

    samples = list(take(open_source("cifar10:test"), FRAMES))
    labels = np.asarray([s.label for s in samples])
    n = len(b.submodels)
    ones = np.ones((FRAMES, n), np.float32)
    fused = scatter_fused_logits(b, samples, ones)
    assert fused.shape == (FRAMES, len(b.classes)) and np.isfinite(fused).all()
    acc = b.manifest["edvit"]["accuracy"]
    assert float(np.mean(fused.argmax(1) == labels)) == acc["fused"] == b.feature_mode(0).accuracy
    for i in range(n):
        mask = ones.copy()
        mask[:, i] = 0  # a dead device: its sub-model is left out, the frame is still answered
        got = scatter_fused_logits(b, samples, mask)
        assert np.isfinite(got).all() and float(np.mean(got.argmax(1) == labels)) == acc["missing_one"][str(i)]


def local_logits(bundle: Bundle, mode_id: int, samples) -> np.ndarray:
    """What the server must answer: the mode's head, the codec (zero-filling unsent channels), the tail."""
    from edgesplit.data.transforms import preprocess
    from edgesplit.engine import create_engine
    from edgesplit.wire import codec

    m = bundle.mode(mode_id)
    head, tail = create_engine(bundle.file(m.head), threads=1), create_engine(bundle.file("tail"), threads=1)
    C = bundle.wire_spec["shape"][0]
    out = []
    for s in samples:
        z = head.run1(preprocess(s.data, bundle.input_spec)[None])[0]
        desc, payload = codec.encode(z, m, name=bundle.wire_spec["name"])
        out.append(tail.run1(codec.decode(desc, payload, full_channels=C)[None])[0])
    return np.stack(out)


def test_bundle_is_served_and_evaluated(built):
    from edgesplit.bench.evaluate import evaluate_bundle
    from edgesplit.data.sources import open_source, take
    from edgesplit.edge.agent import Agent
    from edgesplit.server.daemon import Server

    b = built.bundle
    if b.serving == "scatter":
        check_scatter_served(b)
        check_scatter_evaluated(b)
        return
    if b.serving == "u-shaped":
        check_u_shaped_served(b)
        return
    samples = list(take(open_source("cifar10:test"), FRAMES))
    labels = np.asarray([s.label for s in samples])
    served = {}
    with Server([b], "tcp://127.0.0.1:0", threads=1, max_batch=8, max_queue_delay_us=500) as srv:
        with Agent(b, srv.endpoint, threads=1) as agent:
            assert set(agent.heads) == set(b.head_roles)
            for m in b.modes:
                got = [agent.infer(s, mode=m.id) for s in samples]
                assert all(x.error is None and x.mode == m.id and x.bytes_sent == m.bytes_per_frame for x in got)
                served[m.id] = np.stack([x.logits for x in got])
                np.testing.assert_allclose(served[m.id], local_logits(b, m.id, samples), rtol=1e-4, atol=1e-4)
    ev = evaluate_bundle(b, "cifar10:test", frames=FRAMES, jpeg_frames=None, threads=1, jpeg_grid=False)
    assert ev["frames"] == FRAMES and ev["bundle_hash"] == b.hash and ev["mode"] == b.default_mode.name
    assert [x["id"] for x in ev["modes"]] == [m.id for m in b.modes]
    for x in ev["modes"]:
        assert x["accuracy"] == float(np.mean(served[x["id"]].argmax(1) == labels)), x
        assert x["bytes_per_frame"] == b.mode(x["id"]).bytes_per_frame
