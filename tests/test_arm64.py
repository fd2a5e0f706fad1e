"""The edge agent on arm64 (issue 12, item 1): tools/arm64_check.sh builds (or reuses) an arm64
Debian bookworm rootfs, installs '.[edge]' there from aarch64 wheels under qemu user-mode
emulation, and compares the arm64 agent's answers with the x86 agent's on the same frames.

The fast tests show that the wheel check rejects what it must (torch, a wheel or a shared object
built for x86), using real x86 files from this venv; the slow one runs the whole check."""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "arm64_check.sh"
DRIVER = ROOT / "tools" / "arm64_agent.py"


def _wheels(site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DRIVER), "wheels", str(site)], capture_output=True, text=True)


def _copy_dist(site: Path, module: str) -> None:
    """Copy one installed distribution of this (x86) venv, code and dist-info, into ``site``."""
    from importlib.metadata import distribution

    dist = distribution(module)
    src_site = Path(dist.locate_file(""))
    for f in dist.files or []:
        p = src_site / f
        if p.is_file() and "__pycache__" not in p.parts:
            (site / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, site / f)


def _pure_site(tmp_path: Path) -> Path:
    """A site-packages holding one pure-Python distribution (msgpack would carry an x86 .so)."""
    site = tmp_path / "site-packages"
    site.mkdir()
    _copy_dist(site, "packaging")
    return site


def test_wheel_check_accepts_pure_python(tmp_path):
    site = _pure_site(tmp_path)
    r = _wheels(site)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "packaging py3-none-any" in r.stdout


def test_wheel_check_rejects_an_x86_wheel(tmp_path):
    """A real x86_64 wheel as pip installed it (msgpack: manylinux x86_64 tag and an x86-64 .so)."""
    site = _pure_site(tmp_path)
    _copy_dist(site, "msgpack")
    r = _wheels(site)
    assert r.returncode == 1
    assert "built for another machine" in r.stderr and "x86_64" in r.stderr
    assert "ELF for x86-64, not aarch64" in r.stderr


def test_wheel_check_rejects_an_x86_shared_object_without_tags(tmp_path):
    """An x86-64 extension whose metadata claims nothing (as a wheel built from source would be tagged
    for the machine that built it): the ELF header gives it away."""
    site = _pure_site(tmp_path)
    spec = importlib.util.find_spec("msgpack._cmsgpack")
    assert spec is not None and spec.origin is not None
    shutil.copy2(spec.origin, site / Path(spec.origin).name)
    r = _wheels(site)
    assert r.returncode == 1 and "ELF for x86-64, not aarch64" in r.stderr


def test_wheel_check_rejects_torch(tmp_path):
    """torch's metadata alone (the real dist-info of this venv's torch) fails the edge install."""
    from importlib.metadata import distribution

    dist = distribution("torch")  # tools/setup.sh always installs torch: missing, this fails
    site = _pure_site(tmp_path)
    meta = next(f for f in dist.files or [] if f.name == "METADATA" and f.parent.name.endswith(".dist-info"))
    info = Path(dist.locate_file(meta)).parent
    shutil.copytree(info, site / info.name)
    r = _wheels(site)
    assert r.returncode == 1 and "must never pull torch" in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(2700)
def test_arm64_agent_matches_x86_agent():
    """The whole check: rootfs (cached), aarch64-only edge install, arm64 agent vs x86 agent."""
    if platform.machine() != "x86_64":
        pytest.skip(f"the check emulates aarch64 on an x86_64 host; this one is {platform.machine()}")
    # Its own process group: on a timeout every process it started (pip, the chroot's agent, the
    # server) gets SIGTERM, and the script's trap unmounts what it mounted inside the rootfs.
    proc = subprocess.Popen(
        ["bash", str(SCRIPT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=2600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail("tools/arm64_check.sh ran past 2600 s:\n" + out[-6000:])
    if proc.returncode == 77:
        reason = next((ln for ln in out.splitlines() if "SKIP:" in ln), "skipped")
        pytest.skip(reason.split("SKIP:", 1)[1].strip())
    assert proc.returncode == 0, out[-6000:]
    assert "arm64_agent: PASS" in out and "arm64_check: PASS" in out, out[-6000:]
    print(out[-3000:])
