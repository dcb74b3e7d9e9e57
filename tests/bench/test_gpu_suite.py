"""bench/bench_gpu.py (the GPU suite, issue 28 §4) runs end to end on this CPU in its smoke mode: every
case builds its real-layout model, times it, and lands in the JSON and the markdown table, so the
script a GPU session runs is not first tried on the GPU. (Compilation is covered by
tests/models/test_compiled.py; here it would cost minutes of CPU compile time.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_suite_smoke_run_writes_every_case(tmp_path: Path) -> None:
    out, md = tmp_path / "gpu.json", tmp_path / "gpu.md"
    cmd = [sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--smoke", "--device", "cpu", "--no-compile"]
    cmd += ["--iters", "1", "--out", str(out), "--md", str(md)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    cases = {r["case"].split()[0] + " " + r["mode"].split()[0] for r in rows}
    assert {"sd15 eager", "sdxl eager", "flux eager", "sd15 ours", "sd15 diffusers", "sd15 kdiff"} <= cases
    assert not [r for r in rows if "error" in r or "skipped" in r]
    for r in rows:
        if r["mode"] == "eager":
            assert r["ms_per_call"] > 0 and r["tflops"] > 0 and r["first_call_s"] > 0
    service = next(r for r in rows if r["mode"].startswith("kdiff serve"))
    assert service["images"] > 0 and service["images_per_s"] > 0 and service["rows"] >= 1
    table = md.read_text()
    assert "SMOKE RUN" in table and table.count("\n| ") == len(rows) + 2  # header, rule, rows
