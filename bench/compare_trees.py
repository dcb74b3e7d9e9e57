"""Old tree vs new tree, interleaved in one run: the service's iteration/32 point and the sampler
overhead bench, each tree's own code (a checkout of the old commit beside this one).

    git worktree add /tmp/old <commit>
    python bench/compare_trees.py --old /tmp/old --rounds 3

Each round runs the old tree's bench, then the new tree's (same Python, same venv), so the drift
of a noisy machine hits both alike; the report gives each round's numbers and the median ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

NEW = Path(__file__).resolve().parents[1]


def service_point(tree: Path, duration: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, "bench/bench_service.py", "--modes", "iteration", "--concurrency", "32"]
        cmd += ["--duration", str(duration), "--out", str(out), "--plot", str(Path(tmp) / "p.png")]
        subprocess.run(cmd, cwd=tree, check=True, capture_output=True)
        data = json.loads(out.read_text())
    point = _find(data, "iteration", 32)
    return {"images_per_s": point["images_per_s"], "rows_per_s": point["rows_per_s"]}


def _find(data: dict[str, Any], mode: str, concurrency: int) -> dict[str, Any]:
    """The (mode, concurrency) point of bench_service's JSON ({"modes": {mode: [points]}})."""
    return next(p for p in data["modes"][mode] if p["concurrency"] == concurrency)


def overhead(tree: Path, batches: list[int], repeats: int) -> dict[str, float]:
    """Our ms/step per (sampler, noise, batch) from the sampler-overhead bench's table."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "o.md"
        cmd = [sys.executable, "bench/bench_sampler_overhead.py", "--batches", *map(str, batches)]
        cmd += ["--repeats", str(repeats), "--out", str(out)]
        subprocess.run(cmd, cwd=tree, check=True, capture_output=True)
        rows = [line.strip("|").split("|") for line in out.read_text().splitlines()[2:]]
    return {"/".join(c.strip() for c in r[:3]): float(r[3]) for r in rows if len(r) >= 4}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", type=Path, required=True, help="a checkout of the old commit")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--overhead-batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--overhead-repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rounds = []
    for r in range(args.rounds):
        row = {}
        for name, tree in (("old", args.old), ("new", NEW)):
            row[name] = {
                "service": service_point(tree, args.duration),
                "overhead": overhead(tree, args.overhead_batches, args.overhead_repeats),
            }
        rounds.append(row)
        print(json.dumps({"round": r, **row}), flush=True)
    ips = statistics.median(
        x["new"]["service"]["images_per_s"] / x["old"]["service"]["images_per_s"] for x in rounds
    )
    keys = sorted(set(rounds[0]["old"]["overhead"]) & set(rounds[0]["new"]["overhead"]))
    over = {
        k: statistics.median(x["new"]["overhead"][k] / x["old"]["overhead"][k] for x in rounds) for k in keys
    }
    summary = {"iteration32_images_per_s_new_over_old": round(ips, 3), "overhead_new_over_old": over}
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"rounds": rounds, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
