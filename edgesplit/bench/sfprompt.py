"""``edgesplit bench sfprompt``: SFPrompt against its baselines in one harness — the same
pretrained ViT, cut, data, Dirichlet partition, sampled clients, rounds and epochs:

- ``sfprompt``: prompts + tail; EL2N pruning to gamma, the local-loss update, split training
  through the frozen body (tokens and gradients at the recipe's wire bits);
- ``splitfed``: no prompts, no local loss, no pruning; the head and tail train through the body
  (SplitFed with the server part frozen);
- ``prompt_fl``: prompts + tail trained with the whole model on the client (no split);
- ``fedft``: federated full fine-tuning (every weight trained on the client, FedAvg of all);
- ``local``: prompts + tail per client, never averaged (mean accuracy of the clients' models);
- ``sfprompt_no_local_loss`` (ask for it with ``--methods``): SFPrompt without the local-loss
  update, whose tail is trained on the head's tokens with the body skipped.

Per method: accuracy after each round (the global model on the evaluation frames), client compute
(MACs counted by torch's FLOP counter per part and sample, x3 where a part is trained, and
measured CPU seconds without the body), bytes up and down per client per round (model exchange
as float32, plus every split-training message as encoded by the wire codec, headers included),
server compute (body MACs and seconds), wall time. The body runs in this process; the wire's
equivalence to it is what tests/test_sfprompt_wire.py and tests/test_sfprompt_federate.py check.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="models/recipes/imagenette32-sfprompt-cpu.yaml")
    p.add_argument("--teacher", default="runs/cifar10-vit-cpu/teacher.pt", help="pretrained ViT weights")
    p.add_argument("--limit-per-shard", type=int, default=50, help="frames per shard (train and eval)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--clients", type=int, default=None)
    p.add_argument("--per-round", type=int, default=None)
    p.add_argument(
        "--methods",
        default="sfprompt,splitfed,prompt_fl,fedft,local",
        help=f"comma-separated, of: {', '.join(METHODS)}",
    )
    p.add_argument("--gamma", type=float, default=None, help="override split.gamma (EL2N pruning)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--act-bits", type=int, choices=(8, 16, 32), default=None, help="override split.act_bits")
    p.add_argument("--grad-bits", type=int, choices=(8, 16, 32), default=None, help="override split.grad_bits")


METHODS: dict[str, dict[str, Any]] = {
    "sfprompt": {"prompts": True, "local_loss": True, "prune": True, "split": True, "unfreeze": ()},
    # The ablation of the local-loss update (recipe key split.local_loss: false), not run by default.
    "sfprompt_no_local_loss": {"prompts": True, "local_loss": False, "prune": True, "split": True, "unfreeze": ()},
    "splitfed": {"prompts": False, "local_loss": False, "prune": False, "split": True, "unfreeze": ("head",)},
    "prompt_fl": {"prompts": True, "local_loss": False, "prune": False, "split": False, "unfreeze": ()},
    "fedft": {"prompts": False, "local_loss": False, "prune": False, "split": False, "unfreeze": ("head", "body")},
    "local": {"prompts": True, "local_loss": False, "prune": False, "split": False, "unfreeze": (), "alone": True},
}


def _macs(module, x) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        module(x)
    return int(fc.get_total_flops() // 2)


class CountingBody:
    """The in-process body (:class:`LocalBody`) with the wire's bytes and the body's time counted."""

    def __init__(self, body, act_bits: int, grad_bits: int):
        from ..families.sfprompt.train import LocalBody

        self.inner = LocalBody(body, act_bits, grad_bits)
        self.act_bits, self.grad_bits = act_bits, grad_bits
        self.up = self.down = 0
        self.sec = 0.0

    def _bytes(self, kind: str, x: np.ndarray, bits: int, step: int) -> int:
        from ..wire import protocol as P
        from ..wire import split_train as S

        d, payload = S.encode(x, bits, S.TENSOR_NAMES.get(kind, "t"))
        h = S.train_fwd(step, d, True) if kind == S.TRAIN_FWD else S.train_bwd(step, d)
        return len(P.pack_header(h)) + len(payload)

    def forward(self, step: int, tokens: np.ndarray, grad: bool) -> np.ndarray:
        t0 = time.process_time()
        out = self.inner.forward(step, tokens, grad)
        self.sec += time.process_time() - t0
        self.up += self._bytes("train_fwd", tokens, self.act_bits, step)
        self.down += self._bytes("result", out, self.act_bits, step)
        return out

    def backward(self, step: int, grad_out: np.ndarray) -> np.ndarray:
        t0 = time.process_time()
        g = self.inner.backward(step, grad_out)
        self.sec += time.process_time() - t0
        self.up += self._bytes("train_bwd", grad_out, self.grad_bits, step)
        self.down += self._bytes("result", g, self.grad_bits, step)
        return g


def _full_round(model, x, y, stage: dict, augment, seed: int, prompt_lr: float | None) -> None:
    """Train ``model.client_parameters()`` on the whole model's loss (no split)."""
    import torch
    import torch.nn.functional as F

    from ..builder.data import MEAN, STD, DeviceLoader
    from ..families.sfprompt.train import client_optimizer

    torch.manual_seed(seed)
    opt = client_optimizer(model, stage, prompt_lr)
    model.train()
    if "body" in model.also_trained:
        model.body.train()
    for _ in range(stage["epochs"]):
        for xb, yb in DeviceLoader(x, y, stage["batch"], torch.device("cpu"), MEAN, STD, augment, True, seed):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def run_method(name: str, spec: dict[str, Any], r, vit, data, parts, rounds, per_round, gamma) -> dict[str, Any]:
    import torch

    from ..families.sfprompt.el2n import keep_count
    from ..families.sfprompt.federation import fedavg, sample_clients
    from ..families.sfprompt.model import SFPromptModel
    from ..families.sfprompt.steps import client_seed, numpy_state, torch_state
    from ..families.sfprompt.train import accuracy, client_round

    s = r.split
    model = SFPromptModel(
        copy.deepcopy(vit), s.head_blocks, s.body_end, s.prompts if spec["prompts"] else 0, s.prompt_std
    ).unfreeze(*spec["unfreeze"])
    xtr, ytr, xev, yev = data
    one = torch.zeros(1, 3, r.input_size, r.input_size)
    with torch.no_grad():
        mh = _macs(model.head, one)
        tok = model.head(one)
        mb, mt = _macs(model.body, tok), _macs(model.tail, tok)
    st1, st2 = vars(r.stage1), vars(r.stage2)
    glob = numpy_state(model)
    own = {c: glob for c in range(len(parts))}  # local-only: each client's own state
    out: dict[str, Any] = {"accuracy": [], "client_macs": [], "client_sec": [], "bytes_up": [], "bytes_down": []}
    out.update(server_macs=[], server_sec=[], exchanged_params=int(sum(v.size for v in glob.values())))
    t_wall = time.perf_counter()
    for rnd in range(rounds):
        ups, weights, macs, secs, up, down, smacs, ssec = [], [], [], [], [], [], 0, 0.0
        for c in sample_clients(len(parts), per_round, rnd, r.seed):
            x, y = xtr[parts[c]], ytr[parts[c]]
            n = len(y)
            model.load_client_state(torch_state(own[c] if spec.get("alone") else glob))
            seed = client_seed(r.seed, rnd, c)
            t0 = time.process_time()
            if spec["split"]:
                link = CountingBody(model.body, s.act_bits, s.grad_bits)
                g = gamma if spec["prune"] else 1.0
                client_round(
                    model,
                    x,
                    y,
                    link,
                    st1,
                    st2,
                    gamma=g,
                    local_loss=spec["local_loss"],
                    augment=r.augment,
                    seed=seed,
                    prune_per_class=s.prune_per_class,
                    prompt_lr=s.prompt_lr,
                )
                kept = keep_count(n, g)
                m = (mh + mt) * n * (1 if spec["prune"] else 0)  # EL2N scores
                m += 3 * (mh + mt) * n * (st1["epochs"] if spec["local_loss"] else 0)
                m += 3 * (mh + mt) * kept * st2["epochs"]
                grad_back = spec["prompts"] or "head" in spec["unfreeze"]
                smacs += mb * kept * st2["epochs"] * (2 if grad_back else 1)
                ssec += link.sec
                secs.append(time.process_time() - t0 - link.sec)
                up.append(link.up)
                down.append(link.down)
            else:
                _full_round(model, x, y, st2, r.augment, seed, s.prompt_lr)
                m = 3 * (mh + mb + mt) * n * st2["epochs"]
                secs.append(time.process_time() - t0)
                up.append(0)
                down.append(0)
            macs.append(m)
            exchange = 4 * out["exchanged_params"]
            if not spec.get("alone"):
                up[-1] += exchange
                down[-1] += exchange
            new = numpy_state(model)
            if spec.get("alone"):
                own[c] = new
            ups.append(new)
            weights.append(n)
        if spec.get("alone"):
            accs = []
            for c in range(len(parts)):
                model.load_client_state(torch_state(own[c]))
                accs.append(accuracy(model, xev, yev))
            acc = float(np.mean(accs))
        else:
            glob = fedavg(ups, weights)
            model.load_client_state(torch_state(glob))
            acc = accuracy(model, xev, yev)
        out["accuracy"].append(round(acc, 4))
        out["client_macs"].append(int(np.mean(macs)))
        out["client_sec"].append(round(float(np.mean(secs)), 3))
        out["bytes_up"].append(int(np.mean(up)))
        out["bytes_down"].append(int(np.mean(down)))
        out["server_macs"].append(int(smacs))
        out["server_sec"].append(round(ssec, 3))
    out["wall_s"] = round(time.perf_counter() - t_wall, 1)
    out["macs_per_sample"] = {"head": mh, "body": mb, "tail": mt}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ..builder.data import load_split
    from ..builder.recipe import load_recipe
    from ..builder.zoo import load_pretrained
    from ..data.sources import CLASSES
    from ..families.sfprompt.federation import dirichlet_partition

    torch.set_num_threads(args.threads)
    r = load_recipe(args.recipe)
    s = r.split
    s.act_bits = args.act_bits or s.act_bits
    s.grad_bits = args.grad_bits or s.grad_bits
    vit = load_pretrained(r.teacher.arch, args.teacher, len(CLASSES[r.dataset]))
    xtr, ytr = load_split(r.dataset, r.train_split, r.input_size, limit_per_shard=args.limit_per_shard)
    xev, yev = load_split(r.dataset, r.eval_split, r.input_size, limit_per_shard=args.limit_per_shard)
    k = args.clients or s.clients
    parts = dirichlet_partition(ytr, k, s.dirichlet_alpha, r.seed)
    rounds = args.rounds or s.rounds
    per_round = min(args.per_round or s.clients_per_round, k)
    gamma = args.gamma if args.gamma is not None else s.gamma
    res: dict[str, Any] = {
        "recipe": r.name,
        "teacher": args.teacher,
        "train_frames": int(len(ytr)),
        "eval_frames": int(len(yev)),
        "clients": k,
        "per_round": per_round,
        "rounds": rounds,
        "gamma": gamma,
        "wire_bits": {"act": s.act_bits, "grad": s.grad_bits},
        "methods": {},
    }
    for name in args.methods.split(","):
        if name not in METHODS:
            raise SystemExit(f"edgesplit bench sfprompt: unknown method {name!r} (known: {', '.join(METHODS)})")
        res["methods"][name] = run_method(
            name, METHODS[name], r, vit, (xtr, ytr, xev, yev), parts, rounds, per_round, gamma
        )
    return res


def summarize(res: dict[str, Any]) -> str:
    lines = [
        f"{'method':<10} {'final acc':>9} {'client MMACs/rnd':>17} {'client s/rnd':>12} {'KB up/rnd':>10} {'KB down/rnd':>11}"
    ]
    for name, m in res["methods"].items():
        lines.append(
            f"{name:<10} {m['accuracy'][-1]:>9.4f} {np.mean(m['client_macs']) / 1e6:>17.1f} "
            f"{np.mean(m['client_sec']):>12.2f} {np.mean(m['bytes_up']) / 1e3:>10.1f} {np.mean(m['bytes_down']) / 1e3:>11.1f}"
        )
    return "\n".join(lines)
