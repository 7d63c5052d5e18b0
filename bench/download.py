"""Lesson 01: what the planned download saves, and what verification costs, on the loopback demo hub.

Run ``python -m bench.download``. Baseline: a plain ``snapshot_download`` of the whole repo (what the
article's ``from_pretrained``/``git clone`` route fetches: both weight formats). Measured in the same
run: :func:`helpers.download.download_model` (safetensors only, disk check, sha256 verification).
Prints a table with the ratios and writes JSON to ``<output_dir>/bench/download.json``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from huggingface_hub import constants, snapshot_download

from helpers.config import output_dir
from helpers.download import DEMO_REPO, download_model, plan_download, verify_download
from helpers.demo_hub import DemoHub


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> dict:
    with DemoHub() as hub, tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        previous, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, False  # loopback only
        try:
            _, base_s = _timed(lambda: snapshot_download(DEMO_REPO, local_dir=tmp / "all", endpoint=hub.url,
                                                         cache_dir=tmp / "c"))
        finally:
            constants.HF_HUB_OFFLINE = previous
        base_bytes = sum(r.bytes for r in hub.gets())
        hub.reset_stats()
        report, planned_s = _timed(lambda: download_model(DEMO_REPO, tmp / "planned", endpoint=hub.url,
                                                          cache_dir=tmp / "c"))
        planned_bytes = sum(r.bytes for r in hub.gets())
        plan = plan_download(DEMO_REPO, endpoint=hub.url)
        _, verify_s = _timed(lambda: verify_download(plan, tmp / "planned"))
        hub.reset_stats()
        _, again_s = _timed(lambda: download_model(DEMO_REPO, tmp / "planned", endpoint=hub.url))
        again_bytes = sum(r.bytes for r in hub.gets())

    rows = [
        {"run": "baseline: snapshot_download, all files", "file bytes": base_bytes, "seconds": base_s},
        {"run": "download_model (safetensors only + verify)", "file bytes": planned_bytes, "seconds": planned_s},
        {"run": "  of which sha256/blob verification", "file bytes": 0, "seconds": verify_s},
        {"run": "download_model again (complete, verified)", "file bytes": again_bytes, "seconds": again_s},
    ]
    result = {
        "repo": DEMO_REPO,
        "rows": rows,
        "bytes_ratio_planned_vs_baseline": planned_bytes / base_bytes,
        "seconds_ratio_planned_vs_baseline": planned_s / base_s,
        "fetched": report.fetched,
    }
    print(f"{'run':48s} {'file bytes':>12s} {'seconds':>8s}")
    for row in rows:
        print(f"{row['run']:48s} {row['file bytes']:12,d} {row['seconds']:8.2f}")
    print(f"bytes: planned / baseline = {result['bytes_ratio_planned_vs_baseline']:.2f}; "
          f"time: planned / baseline = {result['seconds_ratio_planned_vs_baseline']:.2f}")
    out = output_dir() / "bench" / "download.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"written {out}")
    return result


if __name__ == "__main__":
    main()
