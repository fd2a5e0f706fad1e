"""Control plane: link traces, bandwidth estimation, mode policies and a trace-driven simulator.

Pure Python + numpy (it runs on the edge device): no torch, no ONNX Runtime, no sockets. The
policies are the objects the live agent calls per frame; the simulator drives the very same
objects over real traces. See docs/ARCHITECTURE.md, "Control plane".
"""

from .estimator import BandwidthEstimator, EwmaEstimator, HarmonicMeanEstimator, LinkSampler, ScalarEwma
from .link import FifoLink, LinkModel
from .modes import FALLBACK, ModeSpec, ModesTable, modes_from_manifest, modes_table
from .oracle import OraclePolicy
from .policy import (
    AssinePolicy,
    DeadlinePolicy,
    Decision,
    EstimatingPolicy,
    Feedback,
    FixedPolicy,
    FrameState,
    Policy,
    RoundRobinPolicy,
)
from .simulator import SimResult, compare, format_table, metrics, simulate, standard_policies
from .traces import Trace, TraceError, read_hsdpa, read_mahimahi, read_trace, traces_dir

__all__ = [
    "BandwidthEstimator",
    "EwmaEstimator",
    "HarmonicMeanEstimator",
    "LinkSampler",
    "ScalarEwma",
    "FifoLink",
    "LinkModel",
    "FALLBACK",
    "ModeSpec",
    "ModesTable",
    "modes_from_manifest",
    "modes_table",
    "AssinePolicy",
    "DeadlinePolicy",
    "Decision",
    "EstimatingPolicy",
    "Feedback",
    "FixedPolicy",
    "FrameState",
    "OraclePolicy",
    "Policy",
    "RoundRobinPolicy",
    "SimResult",
    "compare",
    "format_table",
    "metrics",
    "simulate",
    "standard_policies",
    "Trace",
    "TraceError",
    "read_hsdpa",
    "read_mahimahi",
    "read_trace",
    "traces_dir",
]
