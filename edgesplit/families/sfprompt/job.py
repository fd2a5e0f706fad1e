"""A federated SFPrompt job on disk: what ``edgesplit federate`` prepares once and every Flower
process reads (the ServerApp and each ClientApp get only the path of ``job.json`` in their run
config). Validated on load, unknown keys refused.

The directory holds ``job.json``, the decoded training and evaluation frames (``.npy``, uint8
NHWC, read memory-mapped by each client process), ``partition.json`` (Dirichlet(alpha) label
skew over the training frames, seeded), ``student.pt`` (the untrained split cut from the
pretrained ViT: the round-0 global prompts and tail) and ``body/`` (the body package the body
server serves). The ServerApp writes ``federated.json`` (its checkpoint, after every round) and
``results.json`` there.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any


@dataclass
class Job:
    recipe: str  # the recipe YAML (its split section and stage1/stage2 are the training settings)
    dir: str
    body_endpoint: str
    body_hash: str
    rounds: int
    clients: int
    per_round: int
    seed: int
    round_timeout_s: float = 600.0  # a round's deadline: replies not in by then are dropped from it
    wait_nodes_s: float = 120.0  # how long the ServerApp waits for the clients' SuperNodes
    eval_every: int = 1
    curve_dir: str = ""  # CURVE keys of the body link (server.key*, allow/, clients/client-<i>.key*); "": plaintext

    def path(self, name: str) -> Path:
        return Path(self.dir) / name

    def save(self) -> Path:
        p = self.path("job.json")
        p.write_text(json.dumps(asdict(self), indent=1))
        return p

    @classmethod
    def load(cls, path: str | Path) -> Job:
        d = json.loads(Path(path).read_text())
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a job is a JSON object")
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown} (allowed: {sorted(names)})")
        missing = sorted(n for n, f in names.items() if n not in d and f.default is MISSING)
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}")
        for n, v in d.items():
            want = {"str": str, "int": int, "float": (int, float)}[str(names[n].type)]
            if not isinstance(v, want) or isinstance(v, bool):
                raise ValueError(f"{path}: '{n}' must be {names[n].type}, got {v!r}")
        job = cls(**d)
        if not 1 <= job.per_round <= job.clients or job.rounds < 1 or job.round_timeout_s <= 0:
            raise ValueError(f"{path}: need 1 <= per_round <= clients, rounds >= 1, round_timeout_s > 0")
        return job


def prepare_job(
    recipe_path: str | Path,
    out: str | Path,
    *,
    teacher: str | Path | None = None,
    limit_per_shard: int | None = None,
    rounds: int | None = None,
    clients: int | None = None,
    per_round: int | None = None,
    round_timeout_s: float = 600.0,
    body_endpoint: str = "",
    curve: bool = False,
) -> Job:
    """Decode the data, partition it, cut the pretrained ViT and write the body package."""
    import numpy as np

    from ...builder.data import load_split
    from ...builder.pipeline import resolve_teacher_weights
    from ...builder.recipe import load_recipe
    from ...builder.zoo import load_pretrained
    from ...data.sources import CLASSES
    from .export import export_body
    from .federation import dirichlet_partition
    from .model import from_vit, save_student

    r = load_recipe(recipe_path)
    s = r.split
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = Path(teacher) if teacher else resolve_teacher_weights(r, Path("runs") / r.name)
    vit = load_pretrained(r.teacher.arch, weights, len(CLASSES[r.dataset]))
    save_student(from_vit(vit, s), out / "student.pt", {"recipe": r.to_dict()})
    body = export_body(out / "student.pt", out / "body")
    xtr, ytr = load_split(r.dataset, r.train_split, r.input_size, limit_per_shard=limit_per_shard)
    xev, yev = load_split(r.dataset, r.eval_split, r.input_size, limit_per_shard=limit_per_shard)
    for name, a in (("train_x", xtr), ("train_y", ytr), ("eval_x", xev), ("eval_y", yev)):
        np.save(out / f"{name}.npy", a)
    k = clients or s.clients
    parts = dirichlet_partition(ytr, k, s.dirichlet_alpha, r.seed)
    (out / "partition.json").write_text(json.dumps([p.tolist() for p in parts]))
    job = Job(
        recipe=str(Path(recipe_path).resolve()),
        dir=str(out.resolve()),
        body_endpoint=body_endpoint,
        body_hash=body.hash,
        rounds=rounds or s.rounds,
        clients=k,
        per_round=min(per_round or s.clients_per_round, k),
        seed=r.seed,
        round_timeout_s=float(round_timeout_s),
    )
    if curve:
        make_curve_keys(out / "curve", k)
        job.curve_dir = str((out / "curve").resolve())
    job.save()
    return job


def make_curve_keys(d: Path, clients: int) -> None:
    """The body link's CURVE keys: the server's pair, one pair per client, the clients' public
    keys in ``allow/`` (the server's allow-list)."""
    import shutil

    from ...wire.curve import generate

    generate("server", d)
    for i in range(clients):
        pub, _ = generate(f"client-{i}", d / "clients")
        (d / "allow").mkdir(parents=True, exist_ok=True)
        shutil.copy(pub, d / "allow" / pub.name)


def client_curve(job: Job, client: int) -> Any:
    """A client's CURVE settings for the body link, or None without CURVE."""
    if not job.curve_dir:
        return None
    from ...wire.curve import ClientCurve

    d = Path(job.curve_dir)
    return ClientCurve.load(d / "server.key", d / "clients" / f"client-{client}.key_secret")


def load_arrays(job: Job, split: str, indices: Any = None) -> tuple[Any, Any]:
    """A split's frames and labels (memory-mapped), optionally only ``indices``."""
    import numpy as np

    x = np.load(job.path(f"{split}_x.npy"), mmap_mode="r")
    y = np.load(job.path(f"{split}_y.npy"))
    if indices is not None:
        idx = np.asarray(indices, dtype=np.int64)
        return np.ascontiguousarray(x[idx]), y[idx]
    return np.array(x), y  # a writable copy (torch wraps it)


def partition(job: Job) -> list[list[int]]:
    parts = json.loads(job.path("partition.json").read_text())
    if len(parts) != job.clients:
        raise ValueError(f"partition.json has {len(parts)} parts for {job.clients} clients")
    return parts
