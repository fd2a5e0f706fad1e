"""The ``edgesplit`` command itself: what it does when its reader goes away (``edgesplit ... | head``)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLIMMABLE = ROOT / "models" / "imagenette-resnet18-slimmable"
PAGE = 4096  # the smallest pipe Linux makes (F_SETPIPE_SZ rounds up to a page)


def _read_one_line_then_close(argv: list[str]) -> tuple[bytes, int, bytes]:
    """Run ``python -m edgesplit ARGV`` into a one-page pipe, read one line byte by byte, close the
    pipe: everything the command writes past a page plus that line meets a closed reader."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PAGE)
    proc = subprocess.Popen([sys.executable, "-m", "edgesplit", *argv], stdout=w, stderr=subprocess.PIPE, cwd=ROOT)
    os.close(w)
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(r, 1)
        if not chunk:
            break
        line += chunk
    os.close(r)
    _, err = proc.communicate(timeout=120)
    return line, proc.returncode, err


def test_a_reader_that_stops_after_one_line_gets_no_traceback():
    # the JSON summary of the slimmable bundle is over two pages: the command is still writing
    # when the reader leaves
    full = subprocess.run(
        [sys.executable, "-m", "edgesplit", "inspect", "--json", str(SLIMMABLE)],
        capture_output=True,
        cwd=ROOT,
        timeout=120,
    )
    assert full.returncode == 0 and len(full.stdout) > 2 * PAGE, full.stderr.decode()
    line, rc, err = _read_one_line_then_close(["inspect", "--json", str(SLIMMABLE)])
    assert line == full.stdout.splitlines(keepends=True)[0]
    assert rc == 1, err.decode()  # the output was cut short: not a success
    assert err == b"", err.decode()  # no traceback, no "Exception ignored" at exit


def test_a_reader_that_reads_everything_sees_success():
    r = subprocess.run([sys.executable, "-m", "edgesplit", "--help"], capture_output=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and r.stderr == b"" and b"usage: edgesplit COMMAND" in r.stdout
