"""ED-ViT's steps after :func:`edgesplit.builder.pipeline.prepare` (the ViT teacher is trained or
loaded): partition -> size from the budget -> per subset: importance, pruning, fine-tuning (recipe
``stage1``) -> fusion head with random sub-models dropped (``stage2``) -> accuracies -> placement.

Artefacts in the run directory: ``partition.json``, ``stage1_sub<i>.pt`` per sub-model,
``stage2_fusion.pt``, ``student.pt`` (config, weights, partition, results), ``results.json``; a
rerun skips what is written and resumes an unfinished stage from its per-epoch checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...builder.data import MEAN, STD
from ...control.placement import Device, best_placement, greedy_placement, time_table
from ...control.placement import SubModel as PlacedSubModel
from ...control.planner import Work
from ...data.sources import CLASSES
from .model import EdvitEnsemble, Fusion, Keep, SubModel, prune_vit
from .partition import confusion_partition, contiguous_partition, soft_confusion
from .prune import choose_keep, taylor_importance
from .sizing import Cost, device_machine, predict_ms, size_for_budget, vit_cost
from .train import accuracies, features_of, finetune_submodels, subset_images, teacher_probs, train_fusion

if TYPE_CHECKING:
    from ...builder.pipeline import Prepared
    from ...builder.recipe import Recipe

CONFUSION_IMAGES = 5000  # training images the soft confusion matrix is averaged over


def make_partition(r: Recipe, p: Prepared, path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    s = r.split
    if s.partition == "confusion":
        probs, labels = teacher_probs(p.teacher, p.xtr, p.ytr, p.dev, CONFUSION_IMAGES, r.seed)
        conf = soft_confusion(probs, labels, p.num_classes)
        groups = confusion_partition(conf, s.submodels, r.seed)
        rec = {"method": "confusion", "seed": r.seed, "groups": groups, "confusion": conf.round(5).tolist()}
    else:
        rec = {"method": "contiguous", "seed": r.seed, "groups": contiguous_partition(p.num_classes, s.submodels)}
    path.write_text(json.dumps(rec, indent=1))
    p.log({"event": "partition", "method": rec["method"], "groups": rec["groups"]})
    return rec


def place(r: Recipe, costs: list[Cost]) -> dict:
    """Greedy assignment of the sub-models to the recipe's devices, and the exact optimum."""
    names = r.split.placement_devices or [r.split.device] * r.split.submodels
    host = device_machine(r.split.device)  # times are roofline predictions, scaled from this device
    devices = []
    for n in names:
        mem = r.split.budget.memory_mb
        devices.append(Device(device_machine(n), mem if mem is not None else 1024.0 * _memory_gb(n)))
    subs = [
        PlacedSubModel(
            f"submodel.{i}", Work(predict_ms(c, host), flops=2.0 * c.macs, mem_bytes=c.memory_mb * 2**20), c.memory_mb
        )
        for i, c in enumerate(costs)
    ]
    times = time_table(subs, devices, host)
    greedy = greedy_placement(subs, devices, times)
    best = best_placement(subs, devices, times)
    return {
        "devices": names,
        "assignment": list(greedy.assignment),
        "method": "greedy",
        "makespan_ms": round(greedy.makespan_ms, 4),
        "optimum_ms": round(best.makespan_ms, 4),
        "optimum_assignment": list(best.assignment),
    }


def _memory_gb(name: str) -> float:
    from ...profile.devices import load_profile

    return float(load_profile(name).get("memory_gb", 1.0))


def run(r: Recipe, run_dir: Path, p: Prepared) -> dict:
    s, dev, log, teacher, results = r.split, p.dev, p.log, p.teacher, p.results
    nc = p.num_classes
    part = make_partition(r, p, run_dir / "partition.json")
    groups = part["groups"]
    size = size_for_budget(teacher.cfg, s, nc)
    log({"event": "size", "device": s.device, "ratio": size.ratio, "width": size.width, "cost": vars(size.cost)})
    subs: list[SubModel] = []
    keeps: list[Keep] = []
    todo: list[int] = []  # sub-models without a stage-1 artefact: trained together below
    for i, classes in enumerate(groups):
        art = run_dir / f"stage1_sub{i}.pt"
        if art.is_file():
            saved = torch.load(art, map_location="cpu", weights_only=True)
            keep = Keep(**saved["keep"])
        else:
            idx = subset_images(p.xtr, p.ytr, classes, s.importance_images, r.seed + i)
            x = _normalise(p.xtr[idx], dev)
            scores = taylor_importance(teacher, x, torch.as_tensor(p.ytr[idx], device=dev), classes)
            keep = choose_keep(scores, size.width, s.prune_embedding)
            todo.append(i)
        sub = SubModel(prune_vit(teacher, keep, classes)).to(dev)
        keeps.append(keep)
        if art.is_file():
            sub.load_state_dict(saved["model"])
        subs.append(sub)
    if todo:
        c1 = vars(r.stage1)
        name = "stage1_" + "_".join(f"sub{i}" for i in todo)
        finetune_submodels(
            [subs[i] for i in todo],
            teacher,
            [groups[i] for i in todo],
            c1,
            p.train_loader(c1["batch"]),
            dev,
            run_dir,
            log,
            name,
        )
        for i in todo:
            torch.save({"keep": keeps[i].to_dict(), "model": subs[i].state_dict()}, run_dir / f"stage1_sub{i}.pt")
    sub_cfgs = []
    for sub, keep, classes in zip(subs, keeps, groups):
        sub.eval()
        for q in sub.parameters():
            q.requires_grad_(False)
        cost = vit_cost(sub.vit.cfg, len(classes) + 1)
        sub_cfgs.append(
            {
                "classes": classes,
                "vit": sub.vit.cfg.to_dict(),
                "keep": keep.to_dict(),
                "ratio": size.ratio,
                "cost": vars(cost),
            }
        )
    fusion = Fusion([m.dim for m in subs], nc, s.fusion_hidden).to(dev)
    ens = EdvitEnsemble(subs, fusion, groups).to(dev)
    fart = run_dir / "stage2_fusion.pt"
    if fart.is_file():
        fusion.load_state_dict(torch.load(fart, map_location=dev, weights_only=True))
    else:
        feats, t_logits, y = features_of(ens, teacher, p.xtr, p.ytr, dev)
        train_fusion(fusion, feats, t_logits, y, vars(r.stage2), s.drop_prob, dev, run_dir, log, r.seed)
        torch.save(fusion.state_dict(), fart)
    acc = accuracies(ens, teacher, p.eval_loader, dev)
    log({"event": "accuracy", **acc})
    costs = [Cost(**c["cost"]) for c in sub_cfgs]
    full = vit_cost(teacher.cfg, nc)
    results.update(
        {
            "edvit": acc,
            "float_accuracy": acc["fused"],
            "partition": {"method": part["method"], "seed": part["seed"], "groups": groups},
            "size": {
                "device": s.device,
                "ratio": size.ratio,
                "budget": vars(s.budget),
                "predicted_ms": size.cost.latency_ms,
            },
            "teacher_cost": vars(full),
            "submodel_costs": [vars(c) for c in costs],
            "placement": place(r, costs),
            "eval_frames": int(acc["frames"]),
            "wall_sec": round(time.time() - p.t0, 1),
        }
    )
    state = {
        "family": "edvit",
        "config": {"arch": r.teacher.arch, "num_classes": nc, "submodels": sub_cfgs, "fusion_hidden": s.fusion_hidden},
        "model": {k: v.cpu() for k, v in ens.state_dict().items()},
        "classes": CLASSES[r.dataset],
        "results": json.loads(json.dumps(results)),
        "recipe": r.to_dict(),
    }
    torch.save(state, run_dir / "student.pt")
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    log({"event": "done", "fused": acc["fused"], "full": acc["full"], "missing_mean": acc["missing_mean"]})
    return results


def _normalise(x_uint8, dev) -> torch.Tensor:
    x = torch.as_tensor(x_uint8, device=dev).permute(0, 3, 1, 2).float()
    mean = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=dev).view(1, 3, 1, 1) * 255
    return (x - mean) / std
