"""Placing sub-models on a set of devices: ED-ViT's assignment step, and its latency prediction.

An ED-ViT bundle holds N class-partitioned sub-models; a fleet has M heterogeneous devices (device
profiles), each with a memory budget. Every sub-model runs on exactly one device; a device may run
several, one after the other, so its time is their sum. The goal is the frame's latency, which the
slowest device sets: minimise the largest per-device total (the makespan), with the sub-models
on each device fitting its memory.

:func:`greedy_placement` is the longest-processing-time rule (Graham 1969) made heterogeneous:
sub-models in decreasing order of their time on the fastest device, each put where the device's
total after adding it is smallest among the devices that still have memory for it. It is what
ED-ViT's greedy step needs (sub-models sorted by cost, the least loaded fitting device first) and
runs in O(N·M). On identical devices LPT is within 4/3 of the optimum; on unrelated devices it has
no such bound, so :func:`best_placement` finds the optimum exactly for small cases (depth-first
search with the greedy answer as the first bound) to measure the gap.

:func:`predict_scatter` turns a placement into a frame's latency: the camera sends each device its
input over one shared link (the sends go one after the other, slowest device first so its compute
overlaps the later sends), each device runs its sub-models, sends back their features, and the
fusion head runs where the features meet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .planner import Link, Machine, PlanError, Work


class PlacementError(PlanError):
    """No placement exists: a sub-model fits no device's memory, or all of them together do not fit."""


@dataclass(frozen=True)
class SubModel:
    name: str
    work: Work
    memory_mb: float  # weights plus peak activations at batch 1
    feature_bytes: int = 0  # what the device sends back for fusion


@dataclass(frozen=True)
class Device:
    machine: Machine
    memory_mb: float  # what the sub-models may use on this device

    @property
    def name(self) -> str:
        return self.machine.name


@dataclass(frozen=True)
class Placement:
    assignment: tuple[int, ...]  # sub-model i runs on device assignment[i]
    device_ms: tuple[float, ...]  # each device's total compute time
    makespan_ms: float

    def on_device(self, d: int) -> list[int]:
        return [i for i, a in enumerate(self.assignment) if a == d]


def time_table(subs: Sequence[SubModel], devices: Sequence[Device], host: Machine) -> list[list[float]]:
    """ms of sub-model i on device d (the planner's roofline scaling from the measuring host)."""
    return [[dev.machine.time_ms(s.work, host)[0] for dev in devices] for s in subs]


def _check_fits(subs: Sequence[SubModel], devices: Sequence[Device]) -> None:
    if not subs:
        raise PlacementError("no sub-models to place")
    if not devices:
        raise PlacementError("no devices to place sub-models on")
    largest = max(d.memory_mb for d in devices)
    for s in subs:
        if s.memory_mb > largest:
            raise PlacementError(
                f"sub-model '{s.name}' needs {s.memory_mb:.1f} MB and no device has that much "
                f"(largest budget {largest:.1f} MB): prune it harder or add a device"
            )
    need, have = sum(s.memory_mb for s in subs), sum(d.memory_mb for d in devices)
    if need > have:
        raise PlacementError(f"the sub-models need {need:.1f} MB together and the devices have {have:.1f} MB")


def _placement(assignment: Sequence[int], times: list[list[float]], m: int) -> Placement:
    load = [0.0] * m
    for i, d in enumerate(assignment):
        load[d] += times[i][d]
    return Placement(tuple(assignment), tuple(load), max(load))


def greedy_placement(subs: Sequence[SubModel], devices: Sequence[Device], times: list[list[float]]) -> Placement:
    """Longest sub-model first, each onto the fitting device whose total grows the least."""
    _check_fits(subs, devices)
    m = len(devices)
    load, free = [0.0] * m, [d.memory_mb for d in devices]
    assignment = [-1] * len(subs)
    for i in sorted(range(len(subs)), key=lambda i: -min(times[i])):
        fits = [d for d in range(m) if subs[i].memory_mb <= free[d]]
        if not fits:
            raise PlacementError(
                f"greedy placement: no device has {subs[i].memory_mb:.1f} MB left for '{subs[i].name}' "
                f"(free: {', '.join(f'{devices[d].name} {free[d]:.1f} MB' for d in range(m))})"
            )
        d = min(fits, key=lambda d: (load[d] + times[i][d], d))
        assignment[i], load[d], free[d] = d, load[d] + times[i][d], free[d] - subs[i].memory_mb
    return _placement(assignment, times, m)


def best_placement(
    subs: Sequence[SubModel], devices: Sequence[Device], times: list[list[float]], max_cases: int = 2_000_000
) -> Placement:
    """The optimum by exhaustive depth-first search, pruned by the best makespan so far. For small
    cases only: more than ``max_cases`` assignments (M**N) is refused rather than left to run."""
    _check_fits(subs, devices)
    n, m = len(subs), len(devices)
    if m**n > max_cases:
        raise PlacementError(f"{m}**{n} assignments is too many to search exactly (limit {max_cases})")
    try:
        best = greedy_placement(subs, devices, times)
        best_ms, best_assign = best.makespan_ms, list(best.assignment)
    except PlacementError:  # greedy can fail on memory where an assignment still exists
        best_ms, best_assign = math.inf, []
    order = sorted(range(n), key=lambda i: -min(times[i]))
    load, free, assign = [0.0] * m, [d.memory_mb for d in devices], [-1] * n

    def visit(k: int) -> None:
        nonlocal best_ms, best_assign
        if k == n:
            span = max(load)
            if span < best_ms:
                best_ms, best_assign = span, list(assign)
            return
        i = order[k]
        for d in range(m):
            # a branch that already reaches the best makespan cannot improve on it
            if subs[i].memory_mb > free[d] or load[d] + times[i][d] >= best_ms:
                continue
            assign[i], load[d], free[d] = d, load[d] + times[i][d], free[d] - subs[i].memory_mb
            visit(k + 1)
            assign[i], load[d], free[d] = -1, load[d] - times[i][d], free[d] + subs[i].memory_mb

    visit(0)
    if not best_assign:
        raise PlacementError("no assignment fits every sub-model into the devices' memory")
    return _placement(best_assign, times, m)


@dataclass(frozen=True)
class ScatterPrediction:
    latency_ms: float
    input_ms: float  # time the camera's link spends sending the inputs, one after another
    device_finish_ms: tuple[float, ...]  # when each used device's features have arrived
    fusion_ms: float
    camera_ms: float = 0.0  # the camera's own work before the first send (preprocess)


def _serialize_ms(link: Link, nbytes: int) -> float:
    """Time the link is busy putting one message on the wire (no propagation)."""
    return link.wire_bytes(nbytes) / (link.mbps * 1e3 / 8)


def predict_scatter(
    placement: Placement,
    subs: Sequence[SubModel],
    input_bytes: int,
    link: Link,
    fusion_ms: float = 0.0,
    *,
    camera_ms: float = 0.0,
    setup_ms: Sequence[float] = (),
    camera_device: int | None = None,
) -> ScatterPrediction:
    """Latency of one frame: the camera's own work (``camera_ms``), then the inputs sent over one
    shared link, one device after another (the slowest first, so its compute overlaps the later
    sends), each device's ``setup_ms`` (a JPEG decode) and sub-models in a row, features back over
    the other direction, then fusion. Propagation is half the RTT each way. ``camera_device``: the
    device that is also the camera; its sub-models get their input and give their features
    in-process, without the link."""
    setup = list(setup_ms) + [0.0] * (len(placement.device_ms) - len(setup_ms))
    busy = {d: setup[d] + placement.device_ms[d] for d in set(placement.assignment)}
    sent, finish = 0.0, []
    for d in sorted(busy, key=lambda d: -busy[d]):
        if d == camera_device:
            finish.append(busy[d])
            continue
        sent += _serialize_ms(link, input_bytes)
        back = sum(subs[i].feature_bytes for i in placement.on_device(d))
        finish.append(sent + link.rtt_ms / 2 + busy[d] + _serialize_ms(link, back) + link.rtt_ms / 2)
    return ScatterPrediction(camera_ms + max(finish) + fusion_ms, sent, tuple(finish), fusion_ms, camera_ms)


@dataclass
class Verdict:
    """One way to answer a frame in a scatter plan (``edvit``, ``local`` or ``raw``), predicted."""

    name: str
    kind: str
    latency_ms: float
    parts_ms: dict[str, float]
    detail: dict
    rank: int = 0
    reason: str = ""


def edvit_verdict(
    name: str,
    subs: Sequence[SubModel],
    devices: Sequence[Device],
    host: Machine,
    link: Link,
    input_bytes: int,
    *,
    camera_pre: Work,
    worker_pre: Work | None,
    fusion: Work,
) -> Verdict:
    """ED-ViT on ``devices`` (the first is the camera, which also runs what is placed on it): the
    greedy placement ranked, the exact optimum (where small enough to search) alongside. With
    ``worker_pre`` the input is the JPEG and each worker decodes it, else the camera preprocesses
    once and sends the tensor."""
    times = time_table(subs, devices, host)
    camera = devices[0].machine
    camera_ms = camera.time_ms(camera_pre, host)[0] if worker_pre is None else 0.0
    setup = [d.machine.time_ms(worker_pre, host)[0] if worker_pre else 0.0 for d in devices]
    fusion_ms = camera.time_ms(fusion, host)[0]

    def latency(p: Placement) -> ScatterPrediction:
        return predict_scatter(
            p, subs, input_bytes, link, fusion_ms, camera_ms=camera_ms, setup_ms=setup, camera_device=0
        )

    greedy = greedy_placement(subs, devices, times)
    g = latency(greedy)
    detail: dict = {
        "placement": {subs[i].name: devices[d].name + f"#{d}" for i, d in enumerate(greedy.assignment)},
        "makespan_ms": greedy.makespan_ms,
        "input_bytes": input_bytes,
        "input_ms": g.input_ms,
    }
    try:
        best = best_placement(subs, devices, times)
        detail["optimal"] = {"latency_ms": latency(best).latency_ms, "makespan_ms": best.makespan_ms}
    except PlacementError as e:  # too many cases to search: say so instead of a figure
        detail["optimal"] = {"error": str(e)}
    parts = {"camera": camera_ms, "scatter+compute+gather": max(g.device_finish_ms), "fusion": fusion_ms}
    return Verdict(name, "edvit", g.latency_ms, parts, detail)


def rank_verdicts(verdicts: Sequence[Verdict]) -> list[Verdict]:
    """By predicted latency; each one's reason says how far it is from the best and where it spends."""
    ranked = sorted(verdicts, key=lambda v: v.latency_ms)
    for i, v in enumerate(ranked, 1):
        v.rank = i
        where = " + ".join(f"{k} {ms:.2f}" for k, ms in v.parts_ms.items() if ms)
        gap = "best" if i == 1 else f"+{v.latency_ms - ranked[0].latency_ms:.2f} ms vs best"
        v.reason = f"{where} = {v.latency_ms:.2f} ms; {gap}"
    return ranked
