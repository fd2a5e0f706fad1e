"""A real Triton Inference Server process for the Triton tests: the binary from PyTriton's wheel
(tools/fetch_tritonserver.sh), python backend only, on this CPU machine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTRITON_VERSION = "0.7.0"


def tritonserver_dir() -> Path:
    """The folder holding bin/tritonserver and backends/, or a skip saying how to get it."""
    env = os.environ.get("EDGESPLIT_TRITONSERVER")
    cache = Path(os.environ.get("EDGESPLIT_CACHE", Path.home() / ".cache" / "edgesplit"))
    d = Path(env) if env else cache / f"pytriton-{PYTRITON_VERSION}" / "pytriton" / "tritonserver"
    if not (d / "bin" / "tritonserver").is_file() or not (d / "stub-home" / "bin").is_dir():
        pytest.skip(f"no Triton server at {d}: run tools/fetch_tritonserver.sh (or set EDGESPLIT_TRITONSERVER)")
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonProcess:
    """``tritonserver`` on a model repository, gRPC only, on a free port of loopback."""

    def __init__(self, repository: Path, log_path: Path, *, exit_on_error: bool = False, grpc_port: int | None = None):
        d = tritonserver_dir()
        self.port = grpc_port or free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ)
        # The stub embeds this interpreter's libpython and takes stub-home/ (numpy<2, onnxruntime;
        # tools/fetch_tritonserver.sh) as its Python home, found from python3 on PATH.
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (sysconfig.get_config_var("LIBDIR"), env.get("LD_LIBRARY_PATH")) if p
        )
        env["PATH"] = os.pathsep.join((str(d / "stub-home" / "bin"), env.get("PATH", "")))
        env["OMP_NUM_THREADS"] = "1"
        cmd = [
            str(d / "bin" / "tritonserver"),
            f"--model-repository={repository}",
            f"--backend-directory={d / 'backends'}",
            f"--backend-config=python,shm-region-prefix-name=edgesplit{os.getpid()}_{self.port}_",
            "--allow-http=false",
            "--allow-metrics=false",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.port}",
            f"--exit-on-error={'true' if exit_on_error else 'false'}",
            "--exit-timeout-secs=5",
        ]
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            ["nice", "-n", "15", *cmd], stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=repository
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, models: list[str], timeout_s: float = 90.0) -> "TritonProcess":
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.url)
        try:
            t_end = time.monotonic() + timeout_s
            while time.monotonic() < t_end:
                if self.proc.poll() is not None:
                    raise AssertionError(f"tritonserver exited {self.proc.returncode}:\n{self.log()[-3000:]}")
                try:
                    if all(client.is_model_ready(m, client_timeout=1.0) for m in models):
                        return self
                except Exception:  # not listening yet
                    pass
                time.sleep(0.2)
            raise AssertionError(f"tritonserver not ready within {timeout_s} s:\n{self.log()[-3000:]}")
        finally:
            client.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def close(self) -> None:
        self.kill(signal.SIGTERM)
        self._log.close()

    def __enter__(self) -> "TritonProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def interpreter_ok() -> None:
    """The stub in the wheel exists for CPython 3.8-3.13 only."""
    if not (3, 8) <= sys.version_info[:2] <= (3, 13):
        pytest.skip(f"PyTriton {PYTRITON_VERSION} has no python backend stub for Python {sys.version.split()[0]}")
