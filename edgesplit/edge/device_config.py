"""The agent's device settings: ONNX Runtime execution providers, threads, core pinning and the
device profile. Each is a flag and so a config key (``execution_providers: [tensorrt, cuda, cpu]``).

* **Providers** (:mod:`edgesplit.engine.providers`): checked against this ONNX Runtime wheel once at
  start, before any session, so a missing provider stops the agent with one clear error (or, with
  ``fallback_to_cpu: true``, is reported and left out); every session then asks for the same list.
* **Pinning** (``cpu_affinity: [2, 3]``): the whole process, every thread it has then, is confined
  to those CPUs before ONNX Runtime and ZeroMQ start theirs (new threads inherit the mask). The
  CPUs must be ones this process may use now (``os.sched_getaffinity``). With pinning and no
  ``threads``, ORT gets one intra-op thread per pinned CPU: left to itself it sizes its pool by the
  machine's physical cores and pins those threads itself, which a narrower process mask defeats.
  ORT's per-thread ``session.intra_op_thread_affinities`` is not used: it places only ORT's pool
  threads (not the calling thread, which runs a share of every operator, nor ZeroMQ's), and inside
  a mask of a few cores the kernel's placement of a few threads loses nothing worth a second knob.
* **Device profile** (``device_profile: raspberry-pi-4``, a name from ``device_profiles/`` or a
  YAML path): validated by the profile loader; it names the device for the mode policy (which row
  of the bundle's per-profile head latencies it plans with) and for ``edgesplit plan --agent-config``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from ..engine.providers import PROVIDERS, Choice, OrtExecution, ProviderError, choose_providers
from ..profile.devices import DeviceProfile, ProfileError, load_profile

PROFILE_KINDS = ("edge", "host")  # an agent runs on a device or a measured host, not on a server GPU


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("device: ONNX Runtime execution providers, threads, core pinning, device profile")
    g.add_argument(
        "--execution-providers",
        nargs="+",
        choices=tuple(PROVIDERS),
        default=["cpu"],
        metavar="EP",
        help=f"ONNX Runtime execution providers in order of preference ({', '.join(PROVIDERS)}), for every "
        "session (heads, local fallback); each must be in this onnxruntime wheel (see --fallback-to-cpu)",
    )
    g.add_argument(
        "--fallback-to-cpu",
        action="store_true",
        help="run on the listed providers this wheel has (and CPU) instead of refusing to start when one is missing",
    )
    g.add_argument(
        "--inter-op-threads",
        type=int,
        default=None,
        help="ONNX Runtime threads across independent operators (above 1: ORT's parallel execution mode; "
        "helps only graphs with parallel branches)",
    )
    g.add_argument(
        "--cpu-affinity",
        nargs="+",
        type=int,
        default=None,
        metavar="CPU",
        help="pin the agent process to these CPU numbers (default --threads: one per CPU listed)",
    )
    g.add_argument("--tensorrt-fp16", action="store_true", help="TensorRT provider: allow fp16 kernels")
    g.add_argument(
        "--tensorrt-cache-dir",
        default=None,
        metavar="DIR",
        help="TensorRT provider: cache built engines here (a restart then skips the minutes-long build)",
    )
    g.add_argument(
        "--device-profile",
        default=None,
        metavar="NAME|FILE",
        help="this device's profile (a device_profiles/ name, e.g. raspberry-pi-4, or a YAML file): the head "
        "latencies the mode policy plans with, and what 'edgesplit plan --agent-config' plans for",
    )


def execution_of(values: dict[str, Any]) -> OrtExecution:
    """The :class:`OrtExecution` the settings describe (raises ProviderError)."""
    threads = values.get("threads")
    if threads is None and values.get("cpu_affinity"):
        threads = len(set(values["cpu_affinity"]))
    return OrtExecution(
        providers=tuple(values.get("execution_providers") or ("cpu",)),
        fallback_to_cpu=bool(values.get("fallback_to_cpu")),
        intra_op_threads=threads,
        inter_op_threads=values.get("inter_op_threads"),
        tensorrt_fp16=bool(values.get("tensorrt_fp16")),
        tensorrt_cache_dir=values.get("tensorrt_cache_dir"),
    )


def device_profile(values: dict[str, Any]) -> DeviceProfile | None:
    """The configured device profile, loaded and checked (raises ProfileError)."""
    name = values.get("device_profile")
    if not name:
        return None
    prof = load_profile(name)
    if prof.kind not in PROFILE_KINDS:
        raise ProfileError(f"device profile '{prof.name}' is a {prof.kind} profile: the agent runs on an edge device")
    return prof


def check_device(values: dict[str, Any], where: str) -> str | None:
    """What is wrong with the device settings, or None. The providers' presence in this wheel is
    checked at start (:func:`start_device`), not here: a config can be written on another machine."""
    try:
        execution_of(values)
    except ProviderError as e:
        return f"{where}: {e}"
    cpus = values.get("cpu_affinity")
    if cpus is not None:
        allowed = sorted(os.sched_getaffinity(0))
        bad = sorted({c for c in cpus if c not in allowed})
        if not cpus or bad:
            return (
                f"{where}: 'cpu_affinity' {list(cpus)}: CPU(s) {bad or '(none listed)'} not available; this process "
                f"may run on CPUs {allowed}"
            )
        if len(set(cpus)) != len(cpus):
            return f"{where}: 'cpu_affinity' lists a CPU twice: {list(cpus)}"
    try:
        device_profile(values)
    except ProfileError as e:
        return f"{where}: 'device_profile': {e}"
    return None


def pin_process(cpus: list[int] | set[int]) -> list[int]:
    """Confine every thread of this process to ``cpus`` (``sched_setaffinity(0)`` moves only the
    calling thread; threads started later inherit it). Returns the process's CPUs after."""
    mask = set(cpus)
    tasks = Path("/proc/self/task")
    tids = [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, mask)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
    return sorted(os.sched_getaffinity(0))


@dataclass
class DeviceSetup:
    """What :func:`start_device` did: the execution settings every session uses, the provider
    choice, the CPUs and the profile; :meth:`summary` is the agent summary's ``device`` entry."""

    execution: OrtExecution
    choice: Choice
    cpus: list[int] | None
    profile: DeviceProfile | None
    sessions: dict[str, list[str]] = field(default_factory=dict)
    requested: tuple[str, ...] = ()  # the providers the settings asked for
    policy: dict[str, Any] | None = None  # with --adapt: the latencies the policy plans with, and their sources

    def summary(self) -> dict[str, Any]:
        return {
            "execution_providers": list(self.choice.providers),
            "requested_providers": list(self.requested),
            "missing_providers": list(self.choice.missing),
            "available_providers": list(self.choice.available),
            "sessions": self.sessions,
            "intra_op_threads": self.execution.intra_op_threads,
            "inter_op_threads": self.execution.inter_op_threads,
            "cpu_affinity": self.cpus,
            "device_profile": None if self.profile is None else self.profile.name,
            "policy_inputs": self.policy,
        }


def start_device(values: dict[str, Any], say: Callable[..., None]) -> DeviceSetup:
    """At start, before any session: pin the process, choose the providers against this wheel
    (raises ProviderError naming what is missing), load the profile; log each."""
    import logging

    cpus = None
    if values.get("cpu_affinity"):
        cpus = pin_process(values["cpu_affinity"])
        say(f"pinned to CPUs {cpus}", logging.INFO, event="cpu_affinity", cpus=cpus)
    ex = execution_of(values)
    choice = choose_providers(ex)
    if choice.missing:
        say(
            f"execution providers {list(choice.missing)} are not in this onnxruntime wheel (it has "
            f"{', '.join(choice.available)}): running on {list(choice.providers)} (fallback_to_cpu)",
            logging.WARNING,
            event="providers_fallback",
            missing=list(choice.missing),
            available=list(choice.available),
        )
    # Sessions ask for what this wheel has, so a fallback is decided once, here, not per session.
    trt = "tensorrt" in choice.providers  # its options go when it does
    run = replace(
        ex,
        providers=choice.providers,
        tensorrt_fp16=ex.tensorrt_fp16 and trt,
        tensorrt_cache_dir=ex.tensorrt_cache_dir if trt else None,
    )
    profile = device_profile(values)
    return DeviceSetup(run, choice, cpus, profile, requested=ex.providers)


def record_sessions(setup: DeviceSetup, agent: Any, say: Callable[..., None]) -> None:
    """The providers each of the agent's sessions runs on, as ORT reports them; logged once."""
    import logging

    engines = dict(getattr(agent, "heads", {}) or {})
    if getattr(agent, "fallback", None) is not None:
        engines["full"] = agent.fallback.engine
    setup.sessions = {role: list(getattr(e, "providers", ())) for role, e in engines.items()}
    text = "; ".join(f"{role} {'+'.join(p)}" for role, p in setup.sessions.items())
    say(f"execution providers: {text}", logging.INFO, event="execution_providers", sessions=setup.sessions)
