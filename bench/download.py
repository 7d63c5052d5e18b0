"""Lesson 01: what the download filters save, and what verification costs, on a loopback Hub.

Run ``python -m bench.download``. Baseline: a plain ``snapshot_download`` of the whole repo (both
weight formats, as ``git clone`` would fetch). Measured in the same process on the same server,
alternating, median of 3 rounds, wall time: :func:`helpers.download.download_model` (filters, disk
check, sha256 verification, marker) and a second call that finds the verified download. Prints a
table; writes ``<output_dir>/bench/download.json``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from huggingface_hub import snapshot_download

from helpers import _local_hub as local_hub
from helpers.config import output_dir
from helpers.download import download_model, hub_errors
from helpers._local_hub import LOCAL_REPO
from helpers.tiny import ensure_tiny_model
from tests.hub_fixture import FaultyHub


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(rounds: int = 3) -> dict:
    hub = FaultyHub({LOCAL_REPO: local_hub.tiny_repo_files(ensure_tiny_model(verbose=False))})
    runs: dict[str, list] = {}

    def measure(label, fn):
        hub.heal()
        seconds = _timed(fn)
        runs.setdefault(label, []).append((sum(r["sent"] for r in hub.gets()), seconds))

    try:
        for i in range(rounds):  # alternating: baseline, filtered, filtered again, per round
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                with hub_errors(LOCAL_REPO, hub.url):
                    measure("baseline: snapshot_download, all files", lambda: snapshot_download(
                        LOCAL_REPO, local_dir=tmp / "all", endpoint=hub.url, token=False))
                for label in ("download_model (filters + verify + marker)", "download_model again (verified)"):
                    measure(label, lambda: download_model(LOCAL_REPO, tmp / "planned", endpoint=hub.url))
    finally:
        hub.stop()
    rows = [(label, statistics.median(b for b, _ in v), statistics.median(s for _, s in v)) for label, v in runs.items()]
    print(f"{'run':46s} {'file bytes':>12s} {'seconds':>8s}")
    for label, sent, seconds in rows:
        print(f"{label:46s} {int(sent):12,d} {seconds:8.2f}")
    result = {"repo": LOCAL_REPO, "rows": [dict(zip(("run", "file bytes", "seconds"), r)) for r in rows],
              "bytes_ratio_filtered_vs_baseline": rows[1][1] / rows[0][1],
              "seconds_ratio_filtered_vs_baseline": rows[1][2] / rows[0][2]}
    print(f"median of {rounds} alternating rounds, wall time; bytes: filtered / baseline = "
          f"{result['bytes_ratio_filtered_vs_baseline']:.2f}, seconds: {result['seconds_ratio_filtered_vs_baseline']:.2f}")
    out = output_dir() / "bench" / "download.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"written {out}")
    return result


if __name__ == "__main__":
    main()
