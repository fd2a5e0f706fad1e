"""``edgesplit train`` for an SFPrompt recipe: the federation simulated in one process (every
client's round run in turn, the body in this process through :class:`~.train.LocalBody`), the
reference the wire and Flower runs are compared with.

Per round: the sampled clients (seeded by round) each load the global prompts and tail, score and
prune their data, run the local-loss update and split training; the server averages their uploads
(FedAvg, weighted by sample count) and the global model is evaluated. ``federated.pt`` is written
after every round (atomically), so a stopped run resumes at the next round with no round counted
twice. Artefacts: ``partition.json``, ``federated.pt``, ``student.pt``, ``results.json``.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .federation import dirichlet_partition, fedavg, sample_clients
from .model import SFPromptModel, from_vit, save_student
from .train import LocalBody, accuracy, client_round


def numpy_state(model: SFPromptModel) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.client_state().items()}


def torch_state(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.require(v, np.float32, "C")) for k, v in state.items()}  # 0-d stays 0-d


def client_seed(seed: int, round_no: int, client: int) -> int:
    return int(np.random.default_rng([seed, round_no, client]).integers(1 << 31))


def run(recipe: Any, run_dir: Path, prepared: Any) -> dict[str, Any]:
    s, p = recipe.split, prepared
    model = from_vit(copy.deepcopy(p.teacher), s).to(p.dev)
    xtr = p.xtr.cpu().numpy() if isinstance(p.xtr, torch.Tensor) else np.asarray(p.xtr)
    ytr = p.ytr.cpu().numpy() if isinstance(p.ytr, torch.Tensor) else np.asarray(p.ytr)
    xev, yev = p.eval_loader.x.cpu().numpy(), p.eval_loader.y.cpu().numpy()
    parts = dirichlet_partition(ytr, s.clients, s.dirichlet_alpha, recipe.seed)
    (run_dir / "partition.json").write_text(json.dumps([q.tolist() for q in parts]))
    ckpt = run_dir / "federated.pt"
    history: list[dict[str, Any]] = []
    start = 0
    global_state = numpy_state(model)
    if ckpt.is_file():
        saved = torch.load(str(ckpt), map_location="cpu", weights_only=True)
        start, history = int(saved["round"]), json.loads(saved["history"])
        global_state = {k: v.numpy() for k, v in saved["global"].items()}
        p.log({"event": "resume", "round": start})
    for rnd in range(start, s.rounds):
        t0 = time.time()
        chosen = sample_clients(s.clients, s.clients_per_round, rnd, recipe.seed)
        states, weights, reports = [], [], []
        for c in chosen:
            model.load_client_state(torch_state(global_state))
            rep = client_round(
                model,
                xtr[parts[c]],
                ytr[parts[c]],
                LocalBody(model.body, s.act_bits, s.grad_bits),
                vars(recipe.stage1),
                vars(recipe.stage2),
                gamma=s.gamma,
                prune_per_class=s.prune_per_class,
                prompt_lr=s.prompt_lr,
                local_loss=s.local_loss,
                augment=recipe.augment,
                seed=client_seed(recipe.seed, rnd, c),
                device=p.dev,
            )
            states.append(numpy_state(model))
            weights.append(rep.samples)
            reports.append({"client": c, **vars(rep)})
        global_state = fedavg(states, weights)
        model.load_client_state(torch_state(global_state))
        acc = accuracy(model, xev, yev, p.dev)
        entry = {"round": rnd + 1, "accuracy": acc, "clients": reports, "sec": round(time.time() - t0, 2)}
        history.append(entry)
        p.log({"stage": "federated", "epoch": rnd + 1, "accuracy": acc})
        tmp = ckpt.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"round": rnd + 1, "global": torch_state(global_state), "history": json.dumps(history)}, tmp)
        os.replace(tmp, ckpt)
    results = dict(p.results)
    results.update(
        recipe=recipe.name,
        family="sfprompt",
        accuracy=history[-1]["accuracy"] if history else accuracy(model, xev, yev, p.dev),
        rounds=history,
        eval_frames=int(len(yev)),
        client_parameters=int(sum(v.size for v in global_state.values())),
        sec=round(time.time() - p.t0, 1),
    )
    save_student(
        model, run_dir / "student.pt", {"recipe": recipe.to_dict(), "results": json.loads(json.dumps(results))}
    )
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    p.log({"event": "done", "accuracy": results["accuracy"]})
    print(
        f"next: edgesplit export {run_dir / 'student.pt'} --out <dir> (writes the U-shaped bundle at <dir> and, beside it at <dir>-body, the body package split training loads)"
    )
    return results


def simulate_job(job: Any, exclude: set[tuple[int, int]] = frozenset()) -> dict[str, np.ndarray]:  # type: ignore[assignment]
    """A prepared federate job (:class:`~.job.Job`) run in this process: the same partition,
    sampled clients, seeds and wire bits, the body here. ``exclude``: (round, client) pairs left
    out of the average (what the faults should amount to). The global state after the last round."""
    from ...builder.recipe import load_recipe
    from .job import load_arrays, partition
    from .model import load_student

    r = load_recipe(job.recipe)
    model, _ = load_student(job.path("student.pt"))
    state = numpy_state(model)
    parts = partition(job)
    for rnd in range(job.rounds):
        ups, weights = [], []
        for c in sample_clients(job.clients, job.per_round, rnd, job.seed):
            if (rnd, c) in exclude:
                continue
            x, y = load_arrays(job, "train", parts[c])
            model.load_client_state(torch_state(state))
            rep = client_round(
                model,
                x,
                y,
                LocalBody(model.body, r.split.act_bits, r.split.grad_bits),
                vars(r.stage1),
                vars(r.stage2),
                gamma=r.split.gamma,
                prune_per_class=r.split.prune_per_class,
                prompt_lr=r.split.prompt_lr,
                local_loss=r.split.local_loss,
                augment=r.augment,
                seed=client_seed(job.seed, rnd, c),
            )
            ups.append(numpy_state(model))
            weights.append(rep.samples)
        if ups:
            state = fedavg(ups, weights)
    return state
