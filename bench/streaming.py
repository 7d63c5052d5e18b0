"""Streaming overhead of lesson 04: tokens/s of the chat widget's path over plain ``generate``.

    python -m bench.streaming                      # the model resolve_model() picks (tiny on a CPU)
    python -m bench.streaming --model llama2-7b-chat --tokens 256 --json out.json

Three paths generate exactly ``--tokens`` new tokens (greedy, ``min_new_tokens`` = ``max_new_tokens``)
from the same prompt:

* ``generate``: plain ``model.generate``, no streamer (the baseline);
* ``ReplyStream``: the streaming core (``TextIteratorStreamer``, worker thread, stop criterion);
* ``widget``: :class:`helpers.chat.ChatWidget` end to end (``send`` to the final render), with its
  throttled updates of the conversation view (ipywidgets objects work without a browser).

``generate`` also runs in a fresh thread, as ``generate`` does in the two streaming paths, so all
three use the same torch thread pool (on a busy CPU, OpenMP threads behave differently in the main
thread and in a new one). Runs are interleaved and repeated; the table gives the median of each,
the ratio to the baseline measured in the same run, and the number of front-end updates the widget
sent; "best" columns use the fastest run of each path (machine load only ever adds time). The
target is a widget/generate ratio of medians of at least 0.95.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path

import torch

from helpers.chat import UPDATE_INTERVAL_S, ChatWidget, GenerationParams, local_backend, ReplyStream
from helpers.config import output_dir
from helpers.models import resolve_model
from helpers.loading import load_model_and_tokenizer
from helpers.prompts import SYSTEM_PROMPT_ARTICLE, encode

TARGET_RATIO = 0.95
QUESTION = "请用中文详细介绍一下长城的历史。"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _in_thread(fn):
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as err:  # noqa: BLE001
            result["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def run_plain(model, tokenizer, messages, params: GenerationParams, chat_format: str) -> tuple[float, int]:
    ids = torch.tensor([encode(tokenizer, messages, chat_format).input_ids], device=model.device)

    def go():
        _sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), min_new_tokens=params.max_new_tokens,
                                 pad_token_id=tokenizer.eos_token_id, **params.generate_kwargs())
        _sync()
        return time.perf_counter() - start, out.shape[1] - ids.shape[1]

    return _in_thread(go)


def run_stream(model, tokenizer, messages, params: GenerationParams, chat_format: str) -> tuple[float, int]:
    start = time.perf_counter()
    stream = ReplyStream(model, tokenizer, messages, params, chat_format=chat_format, min_new_tokens=params.max_new_tokens)
    stream.run()
    _sync()
    return time.perf_counter() - start, stream.token_count


def run_widget(model, tokenizer, messages, params: GenerationParams, chat_format: str) -> tuple[float, int, int]:
    backend = local_backend(model, tokenizer, chat_format, min_new_tokens=params.max_new_tokens)
    chat = ChatWidget(backend=backend, system_prompt=messages[0]["content"], params=params)
    updates = []
    chat.log.observe(lambda change: updates.append(1), "value")
    start = time.perf_counter()
    chat.send(messages[-1]["content"], wait=True)
    _sync()
    seconds = time.perf_counter() - start
    if chat.last_error is not None:
        raise chat.last_error
    return seconds, chat.last.token_count, len(updates)


def run_benchmark(model_spec: str | None = None, tokens: int = 200, repeats: int = 5) -> dict:
    choice = resolve_model(model_spec, verbose=False)
    model, tokenizer = load_model_and_tokenizer(choice)
    chat_format = choice.chat_format
    messages = [{"role": "system", "content": SYSTEM_PROMPT_ARTICLE}, {"role": "user", "content": QUESTION}]
    params = GenerationParams(do_sample=False, repetition_penalty=1.0, max_new_tokens=tokens)
    warm = GenerationParams(do_sample=False, repetition_penalty=1.0, max_new_tokens=8)
    run_plain(model, tokenizer, messages, warm, chat_format)
    run_stream(model, tokenizer, messages, warm, chat_format)
    run_widget(model, tokenizer, messages, warm, chat_format)

    times: dict[str, list[float]] = {"generate": [], "ReplyStream": [], "widget": []}
    counts: dict[str, set[int]] = {name: set() for name in times}
    updates: list[int] = []
    for _ in range(repeats):  # interleaved, so a change in machine load hits all three alike
        seconds, n = run_plain(model, tokenizer, messages, params, chat_format)
        times["generate"].append(seconds)
        counts["generate"].add(n)
        seconds, n = run_stream(model, tokenizer, messages, params, chat_format)
        times["ReplyStream"].append(seconds)
        counts["ReplyStream"].add(n)
        seconds, n, u = run_widget(model, tokenizer, messages, params, chat_format)
        times["widget"].append(seconds)
        counts["widget"].add(n)
        updates.append(u)

    base = tokens / statistics.median(times["generate"])
    base_best = tokens / min(times["generate"])
    rows = []
    for name, values in times.items():
        tps = tokens / statistics.median(values)
        rows.append({"path": name, "tokens": sorted(counts[name]), "median_s": round(statistics.median(values), 4),
                     "tokens_per_s": round(tps, 2), "ratio": round(tps / base, 3),
                     "best_s": round(min(values), 4), "best_ratio": round(tokens / min(values) / base_best, 3)})
    widget_ratio = rows[-1]["ratio"]
    return {
        "benchmark": "streaming",
        "model": choice.name,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})",
        "torch_threads": torch.get_num_threads(),
        "new_tokens": tokens,
        "repeats": repeats,
        "update_interval_s": UPDATE_INTERVAL_S,
        "widget_updates_median": statistics.median(updates),
        "rows": rows,
        "widget_over_generate": widget_ratio,
        "target": TARGET_RATIO,
        "meets_target": widget_ratio >= TARGET_RATIO,
    }


def print_table(result: dict) -> None:
    print(f"streaming overhead · model {result['model']} · {result['device']} · {result['new_tokens']} new tokens "
          f"· median of {result['repeats']}")
    print(f"{'path':<14s}{'tokens':>8s}{'median s':>11s}{'tokens/s':>11s}{'ratio':>8s}{'best s':>10s}{'best ratio':>12s}")
    for row in result["rows"]:
        tokens = "/".join(map(str, row["tokens"]))
        print(f"{row['path']:<14s}{tokens:>8s}{row['median_s']:>11.3f}{row['tokens_per_s']:>11.1f}{row['ratio']:>8.3f}"
              f"{row['best_s']:>10.3f}{row['best_ratio']:>12.3f}")
    print(f"widget front-end updates per answer: {result['widget_updates_median']:.0f} "
          f"for {result['new_tokens']} tokens (at most one per {result['update_interval_s'] * 1000:.0f} ms)")
    verdict = "meets" if result["meets_target"] else "BELOW"
    print(f"widget / generate (medians) = {result['widget_over_generate']:.3f} ({verdict} the target {result['target']})")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="as LLAMA_TUTORIAL_MODEL (default: auto)")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 gives steadier figures on a busy CPU")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the result (default: <output dir>/bench/streaming.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_benchmark(args.model, args.tokens, args.repeats)
    print_table(result)
    path = args.json or output_dir() / "bench" / "streaming.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
    print(f"written: {path}")
    return result


if __name__ == "__main__":
    main()
