"""Execute every lesson headless and write executed copies and HTML pages to build/.

`make run-all` runs this. The committed sources in notebooks/ are never modified: each notebook
is read, executed in memory with the selected model (LLAMA_TUTORIAL_MODEL, default auto), and
written to build/notebooks/<name>.ipynb and build/html/<name>.html (images embedded).
What the lessons make (adapters, answers, reports) goes to build/outputs unless
LLAMA_TUTORIAL_OUTPUT says otherwise.

    python .ci/run_all.py [--only 00 02] [--out build] [--timeout 3600]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


def run(only: list[str] | None, out: Path, timeout: int) -> list[dict]:
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    out = out.resolve()
    os.environ.setdefault("LLAMA_TUTORIAL_OUTPUT", str(out / "outputs"))
    # Figures go into the executed copies and the HTML: the kernel's inline backend, whatever
    # MPLBACKEND the caller has (Agg, for instance, would draw nothing into the notebook).
    os.environ["MPLBACKEND"] = INLINE_BACKEND
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    (out / "html").mkdir(parents=True, exist_ok=True)
    results = []
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        if only and path.name[:2] not in only:
            continue
        node = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        client = NotebookClient(
            node,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
            record_timing=True,
        )
        error = None
        try:
            client.execute()
        except Exception as err:  # keep the partial notebook: it shows where it stopped
            error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        seconds = round(time.perf_counter() - start, 1)
        nbformat.write(node, out / "notebooks" / path.name)
        html, _ = HTMLExporter(embed_images=True).from_notebook_node(node)
        (out / "html" / (path.stem + ".html")).write_text(html, encoding="utf-8")
        results.append({"notebook": path.name, "seconds": seconds, "error": error})
        print(f"{path.name:35s} {seconds:7.1f} s  {'OK' if error is None else 'FAILED: ' + error}", flush=True)
    (out / "run_all.json").write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="lesson numbers to run, e.g. 00 02")
    parser.add_argument("--out", type=Path, default=ROOT / "build")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args()
    results = run(args.only, args.out, args.timeout)
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
