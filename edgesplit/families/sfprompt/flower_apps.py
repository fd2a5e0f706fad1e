"""SFPrompt's federated rounds on Flower's Message API (``flwr`` >= 1.42, the ``federate`` extra).

:data:`server_app` (run by the SuperLink as ``flwr-serverapp``): asks each SuperNode for its
partition (a ``query.partition`` message), then per round samples ``per_round`` clients (seeded
by round, :func:`~.federation.sample_clients`), sends each a ``train.sfprompt`` message carrying
the global prompts and tail (an ``ArrayRecord``) and the round number, and waits for the replies
until the round's deadline. A reply that is an error, late, or whose arrays have other names,
other shapes or non-finite values is refused and counted, never averaged in; the rest are
averaged with FedAvg weighted by sample count. The global model is evaluated, and the round is
checkpointed (``federated.json`` + ``global.npz``, each written then renamed) before the next
starts: a restarted ServerApp resumes after the last checkpointed round, none counted twice.

:data:`client_app` (run by each SuperNode as ``flwr-clientapp``): loads its partition (its
``partition-id`` node config), the round's global state, and runs the round of
:func:`~.train.client_round` with the body on the body server (:class:`~.wire_link.WireBody`),
replying with its prompts and tail and its figures. Flower carries only the model exchange;
split training's many messages a round go over edgesplit's own wire.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from .federation import check_state, fedavg, sample_clients
from .job import Job, client_curve, load_arrays, partition

server_app = ServerApp()
client_app = ClientApp()


def _arrays(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v, np.float32)) for k, v in state.items()})


def _state(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: np.asarray(a.numpy()) for k, a in rec.items()}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _model(job: Job):
    from .model import load_student

    model, _ = load_student(job.path("student.pt"))
    return model


def _load_checkpoint(job: Job, initial: dict[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray], list[dict]]:
    ck = job.path("federated.json")
    if not ck.is_file():
        return 0, initial, []
    meta = json.loads(ck.read_text())
    with np.load(job.path(meta["global"]), allow_pickle=False) as z:
        state = {k: z[k] for k in z.files}
    check_state(state, initial)
    return int(meta["round"]), state, list(meta["history"])


def _wait_nodes(grid: Grid, job: Job) -> dict[int, int]:
    """partition id -> node id, asking every node that appears until all partitions are known."""
    found: dict[int, int] = {}
    asked: set[int] = set()
    t_end = time.monotonic() + job.wait_nodes_s
    while len(found) < job.clients and time.monotonic() < t_end:
        new = [n for n in grid.get_node_ids() if n not in asked]
        msgs = [Message(RecordDict(), dst_node_id=n, message_type="query.partition") for n in new]
        for reply in grid.send_and_receive(msgs, timeout=60) if msgs else ():
            if not reply.has_error():
                found[int(reply.content["partition"]["id"])] = reply.metadata.src_node_id
                asked.add(reply.metadata.src_node_id)
        time.sleep(0.5)
    return found


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    from .train import accuracy

    job = Job.load(str(context.run_config["job"]))
    job.path("serverapp.pid").write_text(str(os.getpid()))  # who to kill -9 in the resume test
    model = _model(job)
    initial = {k: v.detach().numpy().astype(np.float32) for k, v in model.client_state().items()}
    start, state, history = _load_checkpoint(job, initial)
    nodes = _wait_nodes(grid, job)
    xev, yev = load_arrays(job, "eval")
    for rnd in range(start, job.rounds):
        t0 = time.monotonic()
        chosen = sample_clients(job.clients, job.per_round, rnd, job.seed)
        msgs = []
        for c in chosen:
            if c in nodes:
                content = RecordDict({"global": _arrays(state), "config": ConfigRecord({"round": rnd, "client": c})})
                msgs.append(Message(content, dst_node_id=nodes[c], message_type="train.sfprompt", group_id=str(rnd)))
        replies = list(grid.send_and_receive(msgs, timeout=job.round_timeout_s))
        ok, weights, figures, refused = [], [], [], []
        for reply in replies:
            if reply.has_error():
                refused.append({"node": reply.metadata.src_node_id, "why": str(reply.error.reason)[:300]})
                continue
            try:
                up = _state(reply.content["update"])
                check_state(up, initial)
                m = dict(reply.content["figures"])
            except (KeyError, ValueError, TypeError) as e:
                refused.append({"node": reply.metadata.src_node_id, "why": f"{type(e).__name__}: {e}"[:300]})
                continue
            ok.append(up)
            weights.append(float(m["samples"]))
            figures.append(m)
        if ok:
            state = fedavg(ok, weights)
        from .steps import torch_state

        model.load_client_state(torch_state(state))
        acc = accuracy(model, xev, yev) if (rnd + 1) % job.eval_every == 0 or rnd + 1 == job.rounds else None
        history.append(
            {
                "round": rnd + 1,
                "accuracy": acc,
                "sampled": chosen,
                "averaged": len(ok),
                "dropped": len(chosen) - len(ok) - len(refused),  # no reply by the deadline (or no node)
                "refused": refused,
                "clients": figures,
                "sec": round(time.monotonic() - t0, 2),
            }
        )
        buf = Path(job.path(f"global-{rnd + 1}.npz"))
        with open(buf, "wb") as f:
            np.savez(f, **state)
        _atomic_write(
            job.path("federated.json"),
            json.dumps({"round": rnd + 1, "global": buf.name, "history": history}).encode(),
        )
        old = job.path(f"global-{rnd}.npz")
        if old.is_file():
            old.unlink()
    _atomic_write(
        job.path("results.json"),
        json.dumps({"rounds": history, "accuracy": history[-1]["accuracy"] if history else None}, indent=1).encode(),
    )


@client_app.query("partition")
def client_partition(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"partition": ConfigRecord({"id": pid})}), reply_to=msg)


@client_app.train("sfprompt")
def client_train(msg: Message, context: Context) -> Message:
    import torch

    from .steps import client_seed, numpy_state, torch_state
    from .train import client_round
    from .wire_link import WireBody

    torch.set_num_threads(int(os.environ.get("EDGESPLIT_CLIENT_THREADS", "1")))
    job = Job.load(str(context.run_config["job"]))
    from ...builder.recipe import load_recipe

    r = load_recipe(job.recipe)
    pid = int(context.node_config["partition-id"])
    rnd = int(msg.content["config"]["round"])
    x, y = load_arrays(job, "train", partition(job)[pid])
    model = _model(job)
    model.load_client_state(torch_state(_state(msg.content["global"])))
    fault = _fault(pid, rnd, job)
    link = WireBody(
        job.body_endpoint,
        job.body_hash,
        act_bits=r.split.act_bits,
        grad_bits=r.split.grad_bits,
        curve=client_curve(job, pid),
    )
    t0 = time.process_time()
    try:
        rep = client_round(
            model,
            x,
            y,
            link,
            vars(r.stage1),
            vars(r.stage2),
            gamma=r.split.gamma,
            prune_per_class=r.split.prune_per_class,
            prompt_lr=r.split.prompt_lr,
            local_loss=r.split.local_loss,
            augment=r.augment,
            seed=client_seed(job.seed, rnd, pid),
        )
    finally:
        link.close()
    update = numpy_state(model)
    if fault == "nan":
        update[next(iter(update))][...] = np.nan
    elif fault == "shape":
        k = next(iter(update))
        update[k] = np.zeros((*update[k].shape, 2), np.float32)
    figures = MetricRecord(
        {
            "client": pid,
            "samples": rep.samples,
            "kept": rep.kept,
            "split_steps": rep.split_steps,
            "bytes_up": link.bytes_up,
            "bytes_down": link.bytes_down,
            "client_cpu_s": time.process_time() - t0,
            "server_us": link.server_us,
            "loss": rep.split_losses[-1] if rep.split_losses else 0.0,
        }
    )
    content = RecordDict({"update": _arrays(update), "figures": figures})
    return Message(content, reply_to=msg)


FAULT_ENV = "EDGESPLIT_SFPROMPT_FAULT"
FAULTS = ("nan", "shape", "hang", "exit")


def _fault(pid: int, rnd: int, job: Job) -> str | None:
    """Fault injection for the fault tests and benchmarks, set per SuperNode by ``edgesplit
    federate --fault I:KIND`` (in round 0 only): ``nan`` and ``shape`` send a bad update, ``hang``
    answers after the round's deadline, ``exit`` dies before answering (kill -9 of its own process)."""
    kind = os.environ.get(FAULT_ENV)
    if not kind or rnd != 0:
        return None
    if kind not in FAULTS:
        raise ValueError(f"{FAULT_ENV}={kind!r}: one of {FAULTS}")
    if kind == "hang":
        time.sleep(job.round_timeout_s + 5)
    if kind == "exit":
        os.kill(os.getpid(), 9)
    return kind


def flower_app_pyproject(job_path: str | Path) -> str:
    """The Flower app's ``pyproject.toml`` (``flwr run`` builds the app from it): the components
    are this module's apps (edgesplit is installed where the Flower processes run), the run config
    the path of ``job.json``."""
    return f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "edgesplit-sfprompt"
version = "1.0.0"
description = "SFPrompt rounds for edgesplit federate"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "edgesplit"

[tool.flwr.app.components]
serverapp = "edgesplit.families.sfprompt.flower_apps:server_app"
clientapp = "edgesplit.families.sfprompt.flower_apps:client_app"

[tool.flwr.app.config]
job = {json.dumps(str(job_path))}
"""
