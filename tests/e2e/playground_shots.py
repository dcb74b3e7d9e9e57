"""The README's screenshot and docs/BENCHMARKS.md's playground figures, on the shipped digits model.

    .venv/bin/python -m tests.e2e.playground_shots [docs/playground.png]

Starts `kdiff serve` on model_store/, opens the page in headless Chromium, generates four 7s, runs a
4x4 comparison grid (4 samplers x 4 step counts) through the page, screenshots it and prints the
page's size, its first load time and the grid's wall time against the sum of its cells' times.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import expect, sync_playwright

from tests.support.server import REPO, Server

from .browser import ARGS, chromium_path

SAMPLERS, STEPS = ["euler", "dpmpp_2m", "heun", "dpmpp_sde"], [5, 10, 20, 40]


def _serial(url: str, samplers: list[str], steps: list[int]) -> float:
    """The same 16 cells as POST /sample requests one after another (what the grid would cost unbatched)."""
    t0 = time.perf_counter()
    for sampler in samplers:
        for n in steps:
            body = {"model": "digits", "class_label": 7, "seed": 7, "sampler": sampler, "steps": n}
            httpx.post(f"{url}/sample", json=body, timeout=60).raise_for_status()
    return round(time.perf_counter() - t0, 3)


def main(shot: Path) -> None:
    log = Path(tempfile.mkdtemp()) / "server.log"
    srv = Server(REPO / "model_store", log, KDIFF_TORCH_THREADS="2")
    srv.wait_ready()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            sizes: dict[str, int] = {}
            page.on("response", lambda r: sizes.__setitem__(r.url, len(r.body())) if r.ok else None)
            t0 = time.perf_counter()
            page.goto(f"{srv.url}/")
            expect(page.locator("body")).to_have_attribute("data-ready", "true")
            ready_s = time.perf_counter() - t0
            nav = json.loads(page.evaluate("JSON.stringify(performance.getEntriesByType('navigation')[0])"))
            own = {k.removeprefix(srv.url): v for k, v in sizes.items() if "/playground/" in k}
            own["/"] = sizes[f"{srv.url}/"]
            page.select_option("#class_label", "7")
            page.fill("#n", "4")
            page.fill("#seed", "7")
            page.click("#generate")
            expect(page.locator("#results figure img")).to_have_count(4, timeout=60_000)
            page.fill("#n", "1")
            page.select_option("#cmp-samplers", SAMPLERS)
            page.fill("#cmp-values", ", ".join(map(str, STEPS)))
            t0 = time.perf_counter()
            page.click("#cmp-run")
            expect(page.locator("#cmp-grid td img")).to_have_count(16, timeout=120_000)
            summary = page.locator("#cmp-summary")
            figures = {
                "page_files_bytes": own,
                "page_bytes": sum(own.values()),
                "first_load_ready_s": round(ready_s, 3),
                "dom_content_loaded_ms": round(nav["domContentLoadedEventEnd"], 1),
                "load_event_ms": round(nav["loadEventEnd"], 1),
                "grid_cells": 16,
                "grid_wall_s": float(summary.get_attribute("data-wall-s") or 0),
                "grid_sum_of_cells_s": float(summary.get_attribute("data-sum-s") or 0),
                "grid_slowest_cell_s": float(summary.get_attribute("data-slowest-s") or 0),
                "grid_summary": summary.text_content(),
                "grid_one_after_another_s": _serial(srv.url, SAMPLERS, STEPS),
            }
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        srv.stop()
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/playground.png"))
