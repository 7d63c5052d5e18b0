"""Streaming chat: one generation core, a JupyterLab/Colab chat widget and a Gradio page.

Introduced in notebooks/04_streaming_chat.ipynb. The lesson teaches the mechanism inline
(``TextIteratorStreamer`` + ``model.generate`` in a thread, why token-by-token decoding prints
``�``, why ``skip_special_tokens=True``); this module is the plumbing built on it:

* :func:`stream_reply` / :class:`ReplyStream`: the only copy of the streaming logic. It builds the
  prompt with :mod:`helpers.prompts` (whole turns dropped by ``truncate_history`` when the
  conversation is too long), runs ``generate`` in a worker thread, yields text chunks (or, for the
  widget, the text so far at most every 50 ms: :meth:`ReplyStream.updates`), stops within
  one token step when a ``threading.Event`` is set (keeping what was produced), and re-raises in
  the caller any exception the worker hit (out of memory, bad parameters) instead of hanging;
* :class:`ChatWidget`: the ipywidgets chat (input box, Send / Stop / Clear, system prompt,
  generation parameters, conversation rendered as Markdown as it streams, status line with
  tokens/s and Chinese characters/s); its updates are throttled;
* :func:`build_gradio_app` / :func:`launch_gradio`: the article's Gradio Q&A page on the same core;
* ``python -m helpers.chat --model ... --port ...``: the page from the command line, like the
  article's ``examples/chat_gradio.py``, bound to 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import html
import re
import socket
import threading
import time
from dataclasses import dataclass
from queue import Empty
from typing import Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from helpers.config import TutorialError, bilingual
from helpers.prompts import SYSTEM_PROMPT_ARTICLE, encode_prompt, truncate_history

# The widget re-renders at most this often (seconds): a fast GPU makes 50-100 tokens/s, and one
# front-end update per token would flood the browser with comm messages.
UPDATE_INTERVAL_S = 0.05

# Han ideographs (CJK Unified Ideographs, Extensions A-F, compatibility ideographs).
_HAN_RE = re.compile(
    "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ebef\U0002f800-\U0002fa1f]"
)


def count_han(text: str) -> int:
    """Number of Chinese characters (Han ideographs) in ``text`` (see notebooks/04_streaming_chat.ipynb)."""
    return len(_HAN_RE.findall(text))


# --------------------------------------------------------------------------- parameters


@dataclass
class GenerationParams:
    """The article's generation parameters (its ``chat_gradio.py`` defaults).

    Introduced in notebooks/04_streaming_chat.ipynb. ``do_sample=False`` is greedy decoding:
    temperature, top_p and top_k are then not passed to ``generate`` (they only shape sampling);
    repetition_penalty applies in both modes.
    """

    temperature: float = 0.3
    top_p: float = 0.95
    top_k: int = 50
    repetition_penalty: float = 1.3
    max_new_tokens: int = 512
    do_sample: bool = True

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``model.generate``."""
        kwargs = {
            "max_new_tokens": int(self.max_new_tokens),
            "do_sample": bool(self.do_sample),
            "repetition_penalty": float(self.repetition_penalty),
        }
        if self.do_sample:
            kwargs.update(temperature=float(self.temperature), top_p=float(self.top_p), top_k=int(self.top_k))
        return kwargs


class StopOnEvent(StoppingCriteria):
    """Stop ``generate`` after the current token once any of ``events`` is set.

    Introduced in notebooks/04_streaming_chat.ipynb. ``generate`` asks its stopping criteria after
    every new token, so a Stop button that sets the event ends generation within one step, and
    the tokens made so far stay in the output.
    """

    def __init__(self, *events: threading.Event):
        self.events = events

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        stop = any(event.is_set() for event in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _CountingStreamer(TextIteratorStreamer):
    """``TextIteratorStreamer`` that also keeps the generated token ids (for tokens/s)."""

    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, **kwargs)
        self.token_ids: list[int] = []

    def put(self, value):
        if not self.next_tokens_are_prompt:  # the first put() is the prompt, which we skip
            self.token_ids.extend(value.reshape(-1).tolist())
        super().put(value)


def context_length(model) -> int:
    """How many tokens (prompt + answer) the model's position embeddings allow."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4096


# --------------------------------------------------------------------------- the generation core


class ReplyStream:
    """One streamed answer (see :func:`stream_reply`), read once in one of two ways:

    * iterate it: each text chunk as soon as the streamer releases it (the Gradio page);
    * :meth:`updates`: the whole text so far, at most once per interval (the chat widget).

    Introduced in notebooks/04_streaming_chat.ipynb. After (or while) reading:

    * ``text``: what has been streamed so far (``skip_special_tokens=True``, so never ``</s>``);
    * ``token_ids``: the generated ids (EOS included when the model ended the answer);
    * ``finish_reason``: ``"eos"``, ``"length"`` (max_new_tokens reached), ``"stop"`` (the stop
      event) or ``"error"``;
    * ``tokens_per_s``, ``han_per_s``, ``elapsed_s``: speed of this answer;
    * ``messages`` / ``dropped``: the conversation the prompt was built from, and the oldest whole
      turns ``truncate_history`` dropped to fit the context window.
    """

    def __init__(self, model, tokenizer, messages: list[dict], params: GenerationParams | None = None, *,
                 fmt: str = "llama2", stop_event: threading.Event | None = None,
                 max_context_tokens: int | None = None, **generate_kwargs):
        self.model = model
        self.tokenizer = tokenizer
        self.params = params or GenerationParams()
        self.fmt = fmt
        self.stop_event = stop_event or threading.Event()
        self._abort = threading.Event()  # set when the reader goes away (e.g. Gradio's Stop)
        self.generate_kwargs = generate_kwargs
        budget = (max_context_tokens or context_length(model)) - int(self.params.max_new_tokens)
        if budget <= 0:
            raise TutorialError(
                bilingual(
                    f"max_new_tokens={self.params.max_new_tokens} 不小于上下文长度 "
                    f"{max_context_tokens or context_length(model)}，提示词已经放不下了。请把 max_new_tokens 调小。",
                    f"max_new_tokens={self.params.max_new_tokens} leaves no room for the prompt in the context "
                    f"window of {max_context_tokens or context_length(model)} tokens. Lower max_new_tokens.",
                )
            )
        # Prompt building raises PromptFormatError here, in the caller, before any thread starts.
        self.messages, self.dropped = truncate_history(tokenizer, messages, budget, fmt)
        self.prompt_ids = encode_prompt(tokenizer, self.messages, fmt)
        self.text = ""
        self.token_ids: list[int] = []
        self.error: BaseException | None = None
        self.stopped = False
        self.elapsed_s = 0.0
        self._t0: float | None = None
        self._started = False
        self._done = False
        self._ended = threading.Event()

    # -- the worker thread -------------------------------------------------------------------
    def _generate(self, streamer: _CountingStreamer) -> None:
        model = self.model
        input_ids = torch.tensor([self.prompt_ids], device=model.device)
        kwargs = {
            **self.params.generate_kwargs(),
            "pad_token_id": self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id,
            **self.generate_kwargs,
        }
        criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        criteria.append(StopOnEvent(self.stop_event, self._abort))
        try:
            model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                streamer=streamer,
                stopping_criteria=criteria,
                **kwargs,
            )
            self.stopped = self.stop_event.is_set() or self._abort.is_set()
        except BaseException as err:  # out of memory, bad parameters, ... : hand it to the reader
            self.error = err
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            try:
                streamer.end()  # flush the text so far and wake the reader
            except BaseException:
                streamer.text_queue.put(streamer.stop_signal)
        finally:
            self._ended.set()

    # -- the reader (caller's thread) --------------------------------------------------------
    def _start(self) -> tuple[_CountingStreamer, threading.Thread]:
        if self._started:
            raise RuntimeError("a ReplyStream can be read only once; call stream_reply() again")
        self._started = True
        self._streamer = streamer = _CountingStreamer(self.tokenizer)
        worker = threading.Thread(target=self._generate, args=(streamer,), name="chat-generate", daemon=True)
        self._t0 = time.perf_counter()
        worker.start()
        return streamer, worker

    def _finish(self, streamer: _CountingStreamer, worker: threading.Thread, finished: bool) -> None:
        if not finished:
            # The reader went away (closed generator, exception in its loop): stop the worker
            # within one step instead of letting it run on to max_new_tokens.
            self._abort.set()
        worker.join()
        self.token_ids = list(streamer.token_ids)
        self.elapsed_s = time.perf_counter() - self._t0
        self._done = True

    def __iter__(self) -> Iterator[str]:
        """Text chunks, each as soon as the streamer releases it."""
        streamer, worker = self._start()
        return self._chunks(streamer, worker)

    def _chunks(self, streamer: _CountingStreamer, worker: threading.Thread) -> Iterator[str]:
        finished = False
        try:
            for chunk in streamer:
                if chunk:
                    self.text += chunk
                    yield chunk
            finished = True
        finally:
            self._finish(streamer, worker, finished)
        if self.error is not None:
            raise self.error

    def updates(self, interval: float = UPDATE_INTERVAL_S) -> Iterator[str]:
        """The whole text so far, at most once per ``interval`` seconds, and once more at the end.

        What the chat widget reads: instead of waking up for every token, the reader sleeps
        between updates and then takes everything that arrived, so a fast GPU costs it no more
        work (and the generating thread no more interruptions) than a slow one.
        """
        streamer, worker = self._start()
        return self._updates(streamer, worker, interval)

    def _updates(self, streamer: _CountingStreamer, worker: threading.Thread, interval: float) -> Iterator[str]:
        queue_, stop_signal = streamer.text_queue, streamer.stop_signal
        finished = False
        try:
            while not finished:
                pieces = [queue_.get()]  # wait for the next text (or the end)
                while True:
                    try:
                        pieces.append(queue_.get_nowait())
                    except Empty:
                        break
                if stop_signal in pieces:
                    pieces = pieces[: pieces.index(stop_signal)]
                    finished = True
                self.text += "".join(pieces)
                if finished:
                    break
                if self.text and pieces:
                    yield self.text
                    self._ended.wait(interval)  # wakes early only when generation ends
        finally:
            self._finish(streamer, worker, finished)
        if self.error is not None:
            raise self.error
        yield self.text  # the final text, with finish_reason and the speed now known

    def run(self) -> str:
        """Consume the whole stream and return the text (non-interactive use)."""
        for _ in self:
            pass
        return self.text

    # -- statistics --------------------------------------------------------------------------
    @property
    def token_count(self) -> int:
        streamer = getattr(self, "_streamer", None)
        return len(self.token_ids) if self._done or streamer is None else len(streamer.token_ids)

    @property
    def running_s(self) -> float:
        if self._done:
            return self.elapsed_s
        return 0.0 if self._t0 is None else time.perf_counter() - self._t0

    @property
    def tokens_per_s(self) -> float:
        elapsed = self.running_s
        return self.token_count / elapsed if elapsed > 0 else 0.0

    @property
    def han_per_s(self) -> float:
        elapsed = self.running_s
        return count_han(self.text) / elapsed if elapsed > 0 else 0.0

    @property
    def finish_reason(self) -> str | None:
        if not self._done:
            return None
        if self.error is not None:
            return "error"
        if self.token_ids and self.token_ids[-1] == self.tokenizer.eos_token_id:
            return "eos"
        return "stop" if self.stopped else "length"


def stream_reply(model, tokenizer, messages: list[dict], params: GenerationParams | None = None, *,
                 fmt: str = "llama2", stop_event: threading.Event | None = None,
                 max_context_tokens: int | None = None, **generate_kwargs) -> ReplyStream:
    """Stream the assistant's next answer to ``messages``; iterate the result for text chunks.

    Introduced in notebooks/04_streaming_chat.ipynb; the chat widget and the Gradio page both use
    it. ``fmt`` is the model's chat format (``choice.chat_format``); ``stop_event`` ends generation
    within one token step; ``max_context_tokens`` (default: the model's context length) is what
    prompt plus answer must fit in (older whole turns are dropped); other keyword arguments go to
    ``model.generate`` unchanged. An exception in the worker thread is raised by the iteration.
    """
    return ReplyStream(model, tokenizer, messages, params, fmt=fmt, stop_event=stop_event,
                       max_context_tokens=max_context_tokens, **generate_kwargs)


def explain_error(err: BaseException) -> str:
    """A bilingual message for an error that ended a reply (what happened, what to do)."""
    if isinstance(err, TutorialError):
        return str(err)
    detail = f"{type(err).__name__}: {err}".strip()
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
        return bilingual(
            f"显存不足，这条回答没有生成完（{detail}）。可以：把 max_new_tokens 调小、点 Clear 清空对话历史、"
            "或者用 4-bit 加载模型（第 02 课）。控件仍然可用。",
            "Out of memory: lower max_new_tokens, Clear the history, or load the model in 4-bit (lesson 02). "
            "The chat is still usable.",
        )
    if isinstance(err, (ValueError, TypeError)):
        return bilingual(
            f"生成参数有误（{detail}）。请检查 temperature、top_p、top_k、repetition_penalty、max_new_tokens 的取值。",
            "Bad generation parameters: check temperature, top_p, top_k, repetition_penalty and max_new_tokens.",
        )
    return bilingual(f"生成时出错（{detail}）。控件仍然可用，可以再试一次。",
                     "Generation failed; the chat is still usable, try again.")


# --------------------------------------------------------------------------- rendering


_FENCE_RE = re.compile(r"```([^\n`]*)\n?(.*?)(?:```|\Z)", re.S)
_INLINE_CODE_RE = re.compile(r"`([^`\n]+)`")
_BOLD_RE = re.compile(r"\*\*([^*\n]+)\*\*")

_CODE_STYLE = (
    "background:#1e1e1e;color:#d4d4d4;padding:8px 10px;border-radius:6px;overflow-x:auto;"
    "font-family:monospace;font-size:12.5px;white-space:pre;margin:6px 0"
)


def _inline_markdown(text: str) -> str:
    out = html.escape(text, quote=False)
    out = _INLINE_CODE_RE.sub(
        lambda m: f'<code style="background:rgba(127,127,127,.18);padding:0 3px;border-radius:3px">{m.group(1)}</code>',
        out,
    )
    return _BOLD_RE.sub(r"<b>\1</b>", out)


def markdown_to_html(text: str) -> str:
    """A small, safe Markdown renderer for chat messages: fenced code blocks, `code`, **bold**.

    Everything is HTML-escaped first; an unclosed fence (mid-stream) is shown as code so far.
    """
    parts, pos = [], 0
    for match in _FENCE_RE.finditer(text):
        if match.start() > pos:
            parts.append(f'<span style="white-space:pre-wrap">{_inline_markdown(text[pos:match.start()])}</span>')
        lang = html.escape(match.group(1).strip())
        code = html.escape(match.group(2).rstrip("\n"), quote=False)
        parts.append(f'<pre class="chat-code" data-lang="{lang}" style="{_CODE_STYLE}"><code>{code}</code></pre>')
        pos = match.end()
    if pos < len(text):
        parts.append(f'<span style="white-space:pre-wrap">{_inline_markdown(text[pos:])}</span>')
    return "".join(parts)


_ROLE_STYLE = {
    "user": ("你", "chat-user", "background:#e8f0fe;color:#1a1a1a;margin-left:15%"),
    "assistant": ("助手", "chat-assistant", "background:#f3f3f3;color:#1a1a1a;margin-right:15%"),
    "error": ("出错", "chat-error", "background:#fdecea;color:#8a1c1c;border:1px solid #f5c2c0"),
    "note": ("提示", "chat-note", "background:#fff8e1;color:#5d4a00"),
}


def render_conversation(entries: list[tuple[str, str]]) -> str:
    """HTML of a conversation: ``entries`` are ``(role, text)`` with role user/assistant/error/note."""
    turns = []
    for role, text in entries:
        label, css, style = _ROLE_STYLE[role]
        turns.append(
            f'<div class="chat-turn {css}" style="padding:6px 10px;border-radius:8px;margin:6px 0;'
            f'line-height:1.55;font-size:14px;{style}"><div style="font-size:11px;opacity:.65">{label}</div>'
            f'<div class="chat-text">{markdown_to_html(text)}</div></div>'
        )
    if not turns:
        turns.append('<div style="opacity:.6;font-size:13px">（还没有对话。输入问题，点 Send。）</div>')
    # column-reverse keeps the view scrolled to the newest message while it streams.
    return (
        '<div class="chat-log-scroll tex2jax_ignore mathjax_ignore" style="display:flex;flex-direction:column-reverse;'
        'max-height:460px;overflow-y:auto;border:1px solid rgba(127,127,127,.35);border-radius:8px;padding:4px 8px">'
        f'<div>{"".join(turns)}</div></div>'
    )


def status_line(stream: ReplyStream) -> str:
    """One line on a reply's progress: tokens, tokens/s, Chinese characters/s, and how it ended."""
    speed = f"{stream.token_count} tokens · {stream.tokens_per_s:.1f} tokens/s · 中文 {stream.han_per_s:.1f} 字/s"
    reason = stream.finish_reason
    head = {
        None: "生成中…",
        "eos": "完成（模型输出了 </s>）",
        "length": f"完成（达到 max_new_tokens={stream.params.max_new_tokens}）",
        "stop": "已停止（保留已生成的内容）",
        "error": "出错",
    }[reason]
    line = f"{head} · {speed}"
    if stream.dropped:
        line += f" · 为放进上下文窗口，最早的 {len(stream.dropped) // 2} 轮对话没有送进提示词"
    return line


# --------------------------------------------------------------------------- the widget


class ChatWidget:
    """A streaming chat for JupyterLab / Colab, built with ipywidgets.

    Introduced in notebooks/04_streaming_chat.ipynb. The buttons call :meth:`send`, :meth:`stop`
    and :meth:`clear`; code (and the lesson's checks) can call the same methods. Generation runs
    in a background thread, so the kernel stays free to receive the Stop click; the conversation
    is re-rendered at most every :data:`UPDATE_INTERVAL_S` seconds. Errors become a message in
    the conversation and the widget stays usable.
    """

    def __init__(self, model, tokenizer, fmt: str = "llama2", *, system_prompt: str = SYSTEM_PROMPT_ARTICLE,
                 params: GenerationParams | None = None, max_context_tokens: int | None = None,
                 update_interval: float = UPDATE_INTERVAL_S):
        import ipywidgets as w

        self.model, self.tokenizer, self.fmt = model, tokenizer, fmt
        self.max_context_tokens = max_context_tokens
        self.update_interval = update_interval
        # Anything else model.generate accepts (e.g. {"min_new_tokens": 64}), merged into each call.
        self.extra_generate_kwargs: dict = {}
        self.history: list[dict] = []  # finished user/assistant turns (what the next prompt includes)
        self.entries: list[tuple[str, str]] = []  # what the conversation view shows
        self.last: ReplyStream | None = None
        self.last_error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        p = params or GenerationParams()

        full = w.Layout(width="100%")
        self.system_box = w.Textarea(value=system_prompt, description="系统提示", layout=w.Layout(width="100%", height="60px"))
        self.temperature = w.FloatSlider(value=p.temperature, min=0.05, max=2.0, step=0.05, description="temperature")
        self.top_p = w.FloatSlider(value=p.top_p, min=0.05, max=1.0, step=0.01, description="top_p")
        self.top_k = w.IntSlider(value=p.top_k, min=0, max=200, step=1, description="top_k")
        self.repetition_penalty = w.FloatSlider(value=p.repetition_penalty, min=1.0, max=2.0, step=0.05,
                                                description="rep. penalty")
        self.max_new_tokens = w.IntSlider(value=p.max_new_tokens, min=1, max=2048, step=1, description="max_new_tokens")
        self.do_sample = w.Checkbox(value=p.do_sample, description="do_sample（采样；关掉=贪心）")
        for slider in (self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.max_new_tokens):
            slider.style.description_width = "110px"
        self.log = w.HTML(render_conversation([]), layout=full)
        self.input = w.Textarea(placeholder="输入问题（Shift+Enter 换行），然后点 Send", layout=w.Layout(width="100%", height="70px"))
        self.send_button = w.Button(description="Send 发送", button_style="primary", icon="paper-plane")
        self.stop_button = w.Button(description="Stop 停止", button_style="warning", icon="stop", disabled=True)
        self.clear_button = w.Button(description="Clear 清空", icon="trash")
        self.status = w.HTML("就绪。")
        for widget, css in ((self.log, "chat-log"), (self.input, "chat-input"), (self.send_button, "chat-send"),
                            (self.stop_button, "chat-stop"), (self.clear_button, "chat-clear"),
                            (self.status, "chat-status"), (self.system_box, "chat-system")):
            widget.add_class(css)
        self.send_button.on_click(lambda _b: self.send())
        self.stop_button.on_click(lambda _b: self.stop())
        self.clear_button.on_click(lambda _b: self.clear())
        settings = w.VBox([
            self.system_box,
            w.HBox([w.VBox([self.temperature, self.top_p, self.top_k]),
                    w.VBox([self.repetition_penalty, self.max_new_tokens, self.do_sample])]),
        ])
        accordion = w.Accordion(children=[settings], titles=("系统提示与生成参数",))
        self.ui = w.VBox([self.log, self.input, w.HBox([self.send_button, self.stop_button, self.clear_button]),
                          self.status, accordion], layout=full)

    def _repr_mimebundle_(self, **kwargs):
        return self.ui._repr_mimebundle_(**kwargs)

    # -- state -------------------------------------------------------------------------------
    @property
    def params(self) -> GenerationParams:
        """The generation parameters the controls show now."""
        return GenerationParams(self.temperature.value, self.top_p.value, self.top_k.value,
                                self.repetition_penalty.value, self.max_new_tokens.value, self.do_sample.value)

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def last_reply(self) -> str:
        """The text of the latest reply (partial while it streams)."""
        return self.last.text if self.last is not None else ""

    def _messages(self, question: str) -> list[dict]:
        system = self.system_box.value.strip()
        head = [{"role": "system", "content": system}] if system else []
        return head + self.history + [{"role": "user", "content": question}]

    def _render(self) -> None:
        self.log.value = render_conversation(self.entries)

    def _set_busy(self, busy: bool) -> None:
        self.send_button.disabled = busy
        self.clear_button.disabled = busy
        self.stop_button.disabled = not busy

    # -- the button actions ------------------------------------------------------------------
    def send(self, text: str | None = None, *, wait: bool = False) -> threading.Thread | None:
        """Ask ``text`` (default: the input box). Returns at once; ``wait=True`` waits for the answer."""
        with self._lock:
            if self.busy:
                self.status.value = "还在生成上一条回答：先点 Stop，或等它结束。"
                return None
            question = (self.input.value if text is None else text).strip()
            if not question:
                self.status.value = "请输入问题。"
                return None
            if text is None:
                self.input.value = ""
            self._stop.clear()
            self.last_error = None
            self.entries.append(("user", question))
            self._render()
            self._set_busy(True)
            self.status.value = "生成中…"
            self._thread = threading.Thread(target=self._answer, args=(question,), name="chat-ui", daemon=True)
            self._thread.start()
        if wait:
            self.wait()
        return self._thread

    def stop(self) -> None:
        """Stop the answer being generated (within one token step); what it said so far is kept."""
        self._stop.set()

    def clear(self) -> None:
        """Forget the conversation (stops a running answer first)."""
        self.stop()
        self.wait()
        self.history.clear()
        self.entries.clear()
        self.last = None
        self._render()
        self.status.value = "已清空。"

    def wait(self, timeout: float | None = None) -> None:
        """Block until the current answer is finished (or ``timeout`` seconds pass)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    # -- the background thread ---------------------------------------------------------------
    def _answer(self, question: str) -> None:
        # Runs in the "chat-ui" thread: it only sets widget values (never print / `with out:`).
        reply_index = None
        try:
            stream = stream_reply(self.model, self.tokenizer, self._messages(question), self.params, fmt=self.fmt,
                                  stop_event=self._stop, max_context_tokens=self.max_context_tokens,
                                  **self.extra_generate_kwargs)
            self.last = stream
            self.entries.append(("assistant", ""))
            reply_index = len(self.entries) - 1
            # At most one re-render per update_interval, however fast the tokens come; the last
            # update is the final text.
            for text in stream.updates(self.update_interval):
                self.entries[reply_index] = ("assistant", text)
                self._render()
                self.status.value = status_line(stream)
            self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": stream.text}]
        except BaseException as err:  # noqa: BLE001 - every error becomes a message; the widget stays usable
            self.last_error = err
            if reply_index is not None and not self.entries[reply_index][1]:
                self.entries.pop(reply_index)
            elif reply_index is not None and self.last is not None:
                self.entries[reply_index] = ("assistant", self.last.text)
            self.entries.append(("error", explain_error(err)))
            self._render()
            self.status.value = "出错：这一轮没有计入对话历史。改好后可以直接再发送。"
        finally:
            self._set_busy(False)


# --------------------------------------------------------------------------- Gradio


def _message_text(content) -> str:
    """Text of a Gradio chat message (a string, or Gradio 6's list of {"type": "text", ...} parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(_message_text(part) for part in content)
    return ""


def history_to_messages(history: list, message: str, system_prompt: str = "") -> list[dict]:
    """Gradio's chat history (openai-style dicts) plus the new message, as :mod:`helpers.prompts` messages."""
    messages = [{"role": "system", "content": system_prompt.strip()}] if system_prompt and system_prompt.strip() else []
    for item in history or []:
        role = item.get("role") if isinstance(item, dict) else getattr(item, "role", None)
        content = item.get("content") if isinstance(item, dict) else getattr(item, "content", None)
        if role not in ("user", "assistant"):
            continue
        text = _message_text(content)
        if messages and messages[-1]["role"] == role:  # Gradio may split one turn into parts
            messages[-1]["content"] += text
        else:
            messages.append({"role": role, "content": text})
    # A turn whose answer failed leaves two user messages in a row; keep the roles alternating.
    clean: list[dict] = []
    for msg in messages:
        if clean and msg["role"] == "user" and clean[-1]["role"] == "user":
            clean[-1] = msg
        else:
            clean.append(msg)
    if clean and clean[-1]["role"] == "user":
        clean.pop()
    return clean + [{"role": "user", "content": message}]


def build_gradio_app(model, tokenizer, fmt: str = "llama2", *, params: GenerationParams | None = None,
                     system_prompt: str = SYSTEM_PROMPT_ARTICLE, max_context_tokens: int | None = None,
                     title: str = "Llama-2 中文问答"):
    """The article's streaming Q&A page as a ``gr.ChatInterface`` on :func:`stream_reply`.

    Introduced in notebooks/04_streaming_chat.ipynb. The page shows the system prompt and the
    article's generation parameters; its API endpoint is ``/chat`` (arguments: message, system
    prompt, temperature, top_p, top_k, repetition_penalty, max_new_tokens, do_sample).
    """
    import gradio as gr

    p = params or GenerationParams()

    def respond(message, history, system, temperature, top_p, top_k, repetition_penalty, max_new_tokens, do_sample):
        messages = history_to_messages(history, _message_text(message), system)
        gen = GenerationParams(float(temperature), float(top_p), int(top_k), float(repetition_penalty),
                               int(max_new_tokens), bool(do_sample))
        try:
            stream = stream_reply(model, tokenizer, messages, gen, fmt=fmt, max_context_tokens=max_context_tokens)
            for _chunk in stream:
                yield stream.text  # ChatInterface shows the whole answer so far
        except gr.Error:
            raise
        except Exception as err:  # shown as an error toast; the page stays usable
            raise gr.Error(explain_error(err)) from err

    inputs = [
        gr.Textbox(value=system_prompt, label="系统提示 system prompt", lines=2),
        gr.Slider(0.05, 2.0, value=p.temperature, step=0.05, label="temperature"),
        gr.Slider(0.05, 1.0, value=p.top_p, step=0.01, label="top_p"),
        gr.Slider(0, 200, value=p.top_k, step=1, label="top_k"),
        gr.Slider(1.0, 2.0, value=p.repetition_penalty, step=0.05, label="repetition_penalty"),
        gr.Slider(1, 2048, value=p.max_new_tokens, step=1, label="max_new_tokens"),
        gr.Checkbox(value=p.do_sample, label="do_sample（采样；关掉=贪心）"),
    ]
    return gr.ChatInterface(
        respond,
        additional_inputs=inputs,
        additional_inputs_accordion=gr.Accordion("系统提示与生成参数", open=False),
        title=title,
        description="流式生成：回答一边生成一边显示；点 Stop 停止。",
        api_name="chat",
        fill_height=True,
        analytics_enabled=False,
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def launch_gradio(model, tokenizer, fmt: str = "llama2", *, host: str = "127.0.0.1", port: int | None = None,
                  block: bool = False, inline: bool = False, share: bool = False, **app_kwargs):
    """Build the page and start it on ``host:port`` (default: 127.0.0.1, a free port).

    Introduced in notebooks/04_streaming_chat.ipynb. With ``block=False`` (the notebook) it
    returns the running app at once; its URL is ``app.local_url`` and ``app.close()`` stops it.
    ``inline=True`` also shows the page in the cell's output (in Colab through Colab's own proxy);
    ``share=True`` asks Gradio for a public link (off by default: the page stays on this machine).
    """
    app = build_gradio_app(model, tokenizer, fmt, **app_kwargs)
    app.queue(default_concurrency_limit=1)  # one model: answer one request at a time
    app.launch(server_name=host, server_port=port or free_port(host), share=share, inline=inline,
               prevent_thread_lock=not block, quiet=not block, show_error=True)
    return app


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    """``python -m helpers.chat --model ... --port ...``: the Gradio page, like the article's script."""
    parser = argparse.ArgumentParser(
        prog="python -m helpers.chat",
        description="流式中文问答页（Gradio）/ streaming Q&A page (Gradio), as in the article's chat_gradio.py",
    )
    parser.add_argument("--model", "--model_name_or_path", dest="model", default=None,
                        help="profile name (tiny, llama2-7b-chat, chinese-7b-chat, ...), Hub repo id or local folder; "
                             "default: $LLAMA_TUTORIAL_MODEL or auto")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 makes the page reachable from other machines")
    parser.add_argument("--quantization", choices=("8bit", "4bit"), default=None)
    parser.add_argument("--max-new-tokens", type=int, default=GenerationParams.max_new_tokens)
    args = parser.parse_args(argv)

    from helpers.config import resolve_model
    from helpers.loading import load_model_and_tokenizer

    choice = resolve_model(args.model)
    model, tokenizer = load_model_and_tokenizer(choice, quantization=args.quantization)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"注意：页面监听 {args.host}，同一网络里的其他机器也能访问它。/ Listening on {args.host}: "
              "other machines can reach this page.")
    print(f"问答页 / Q&A page: http://{args.host}:{args.port}  （Ctrl+C 退出 / to quit）", flush=True)
    launch_gradio(model, tokenizer, choice.chat_format, host=args.host, port=args.port, block=True,
                  params=GenerationParams(max_new_tokens=args.max_new_tokens))


__all__ = [
    "UPDATE_INTERVAL_S", "GenerationParams", "StopOnEvent", "ReplyStream", "stream_reply", "ChatWidget",
    "build_gradio_app", "launch_gradio", "history_to_messages", "markdown_to_html",
    "render_conversation", "status_line", "explain_error", "count_han", "context_length", "free_port", "main",
]

if __name__ == "__main__":
    main()
