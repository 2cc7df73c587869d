"""`bench/accelerator.py --tiny` runs end to end (on the CPU here), unrolled and scanned, so the
accelerator benchmark is known to work before a GPU or TPU is there to run it at full size; and
`bench/compile_time.py` at tiny shapes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("layers", [[], ["--scan-layers"]])
def test_accelerator_benchmark_runs_at_tiny_shapes(layers):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "accelerator.py"), "--tiny", "--repeats", "1",
                           "--bandwidth", "20", *layers], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "tiny, ngsd program at batch 1: arguments" in out and "temporaries" in out
    rows = [line for line in out.splitlines() if line.startswith("| tiny |")]
    assert [tuple(cell.strip() for cell in row.split("|")[2:4]) for row in rows] == [
        ("base", "1"), ("ngsd", "1"), ("base", "2"), ("ngsd", "2")]
    for row in rows:
        ms, rate, roofline = (row.split("|")[i].strip() for i in (5, 6, 8))
        assert float(ms) > 0 and float(rate) > 0 and roofline.endswith("%")
    assert "tiny, batch 2: ngsd / base alone" in out
    assert ("scanned layers" if layers else "unrolled layers") in out


def test_compile_time_benchmark_runs_at_tiny_shapes():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_time.py"), "--pairs", "tiny", "--prompt", "8",
                           "--new-tokens", "4"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| tiny (")]
    assert [row.split("|")[2].strip() for row in rows] == ["base", "ngsd"]
    assert all(row.strip().endswith("x |") for row in rows)
