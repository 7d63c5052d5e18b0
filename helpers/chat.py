"""Streaming chat (notebooks/04_streaming_chat.ipynb writes out the taught steps): the core and the widget.

Backend contract of :class:`ChatWidget` (also scripts/gradio_chat.py; lesson 07 plugs in its server)::

    backend(messages: list[dict], params: GenerationParams, stop: threading.Event) -> Iterable[str]

It yields the answer to ``messages`` (the new user question last) as text chunks without special tokens,
ends soon once ``stop`` is set, raises on failure and frees resources in ``finally`` (the caller may close
it early). Optional attributes of the result: ``token_count``, ``finish_reason`` (eos, length, stop), ``dropped``.
"""

from __future__ import annotations

import functools
import html
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from helpers.config import TutorialError, localized
from helpers.prompts import SYSTEM_PROMPT_ARTICLE, encode, truncate_history

UPDATE_INTERVAL_S = 0.05  # the widget re-renders at most this often (one update per token floods the browser)


@dataclass
class GenerationParams:
    """The article's ``chat_gradio.py`` defaults (notebooks/04_streaming_chat.ipynb); greedy drops the sampling ones."""

    temperature: float = 0.3
    top_p: float = 0.95
    top_k: int = 50
    repetition_penalty: float = 1.3
    max_new_tokens: int = 512
    do_sample: bool = True

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``model.generate``."""
        kwargs = {"max_new_tokens": int(self.max_new_tokens), "do_sample": bool(self.do_sample),
                  "repetition_penalty": float(self.repetition_penalty)}
        if self.do_sample:
            kwargs.update(temperature=float(self.temperature), top_p=float(self.top_p), top_k=int(self.top_k))
        return kwargs


class StopOnEvent(StoppingCriteria):
    """Stop ``generate`` after the current token once ``event`` is set (notebooks/04_streaming_chat.ipynb)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ReplyStream:
    """Lesson 04's streaming loop with its fixes; iterate once for text chunks (notebooks/04_streaming_chat.ipynb).

    ``messages`` (what fits the context), ``dropped``; afterwards ``text``, ``token_ids``, ``token_count``,
    ``elapsed_s`` and ``finish_reason`` (eos, length, stop, error).
    """

    def __init__(self, model, tokenizer, messages: list[dict], params: GenerationParams | None = None, *,
                 chat_format: str = "llama2", stop_event: threading.Event | None = None,
                 max_context_tokens: int | None = None, **generate_kwargs):
        self.model, self.tokenizer, self.params = model, tokenizer, params or GenerationParams()
        self.stop_event, self.generate_kwargs = stop_event or threading.Event(), generate_kwargs
        room = (max_context_tokens or model.config.max_position_embeddings) - int(self.params.max_new_tokens)
        if room <= 0:
            raise TutorialError("chat.no_room", f"max_new_tokens={self.params.max_new_tokens} 占满了上下文窗口，请调小。",
                                          f"max_new_tokens={self.params.max_new_tokens} fills the context window: lower it.",
                                max_new_tokens=self.params.max_new_tokens)
        self.messages, self.dropped = truncate_history(tokenizer, messages, room, chat_format)  # may raise PromptFormatError
        self.prompt_ids = encode(tokenizer, self.messages, chat_format).input_ids
        self.text, self.token_ids, self.token_count, self.elapsed_s = "", [], 0, 0.0
        self.error, self.finish_reason, self._started = None, None, False

    def _generate(self, streamer: TextIteratorStreamer) -> None:  # the worker thread
        try:
            input_ids = torch.tensor([self.prompt_ids], device=self.model.device)
            kwargs = {**self.params.generate_kwargs(), "pad_token_id": self.tokenizer.eos_token_id, **self.generate_kwargs}
            criteria = StoppingCriteriaList([StopOnEvent(self.stop_event)])
            output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                         streamer=streamer, stopping_criteria=criteria, **kwargs)
            self.token_ids = output[0, input_ids.shape[1]:].tolist()
        except BaseException as err:  # out of memory, bad parameters, ...: hand it to the reader
            self.error = err
            streamer.end()  # flush the text so far and wake the reader

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a ReplyStream can be read only once; call ReplyStream() again")
        self._started = True
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        worker = threading.Thread(target=self._generate, args=(streamer,), name="chat-generate", daemon=True)
        start = time.perf_counter()
        worker.start()
        try:
            for chunk in filter(None, streamer):  # the streamer also queues empty strings
                self.text += chunk
                yield chunk
        except BaseException:  # the reader went away (closed generator, exception in its loop): stop the worker
            self.stop_event.set()
            raise
        finally:
            worker.join()
            self.elapsed_s, self.token_count = time.perf_counter() - start, len(self.token_ids)
            if self.error is not None:
                self.finish_reason = "error"
            elif self.token_ids[-1:] == [self.tokenizer.eos_token_id]:
                self.finish_reason = "eos"
            else:
                self.finish_reason = "stop" if self.stop_event.is_set() else "length"
        if self.error is not None:
            raise self.error

    def run(self) -> str:
        """Consume the whole stream and return the text."""
        for _ in self:
            pass
        return self.text


# Written out in notebooks/07_serving_vllm.ipynb, section 4 (tests/test_one_source.py checks the two the same);
# lesson 09 plugs its llama.cpp server in with it.
class OpenAIChatStream:
    """One answer streamed from an OpenAI-compatible server, as lesson 04's ChatWidget asks of a backend."""

    def __init__(self, client, model, messages, params, stop):
        self.client, self.model, self.messages, self.params, self.stop = client, model, messages, params, stop
        self.token_count = self.finish_reason = None

    def __iter__(self):
        p = self.params
        sampling = {"temperature": p.temperature, "top_p": p.top_p} if p.do_sample else {"temperature": 0.0}
        extra = {"repetition_penalty": p.repetition_penalty, **({"top_k": p.top_k} if p.do_sample and p.top_k else {})}
        stream = self.client.chat.completions.create(
            model=self.model, messages=self.messages, max_tokens=p.max_new_tokens, stream=True,
            stream_options={"include_usage": True}, extra_body=extra, **sampling)
        try:
            for event in stream:
                if event.usage:  # the last event: how many tokens the answer took
                    self.token_count = event.usage.completion_tokens
                for part in event.choices:
                    if part.finish_reason:  # OpenAI's "stop" means the model ended the answer itself
                        self.finish_reason = {"stop": "eos"}.get(part.finish_reason, part.finish_reason)
                    if part.delta.content:
                        yield part.delta.content
                if self.stop.is_set():
                    self.finish_reason = "stop"
                    break
        finally:
            stream.close()  # also when the widget stops reading early: the server stops generating


def openai_backend(client, model):
    """A ChatWidget backend: ChatWidget(backend=openai_backend(client, "tiny"))."""
    return functools.partial(OpenAIChatStream, client, model)


def local_backend(model, tokenizer, chat_format: str = "llama2", **options) -> Callable:
    """The default backend: the local model through :class:`ReplyStream` with ``options`` (lesson 04)."""
    def backend(messages: list[dict], params: GenerationParams, stop: threading.Event) -> ReplyStream:
        return ReplyStream(model, tokenizer, messages, params, chat_format=chat_format, stop_event=stop, **options)
    return backend


def explain_error(err: BaseException, *, detail: bool = True) -> str:
    """The message, in the learner's language, for an error that ended a reply; ``detail=False`` leaves out the
    exception's text."""
    if isinstance(err, TutorialError):  # the course's own message
        return str(err)
    what, what_en = (f"（{type(err).__name__}: {err}）", f" ({type(err).__name__}: {err})") if detail else ("", "")
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
        return localized(f"显存不足，回答没有生成完{what}。请调小 max_new_tokens、清空对话，或用 4-bit 加载（第 02 课）。",
                         f"Out of memory{what_en}: lower max_new_tokens, clear the chat, or load the model in 4-bit (lesson 02).")
    return localized(f"生成时出错{what}。请检查生成参数后再试。", f"Generation failed{what_en}: check the parameters and try again.")


class ChatWidget:
    """A streaming chat for JupyterLab / Colab, ipywidgets 7 or 8 (notebooks/04_streaming_chat.ipynb).

    ``ChatWidget(model, tokenizer, chat_format)`` or ``ChatWidget(backend=fn)`` (module docstring); a background
    thread sets the widget values at most every ``update_interval`` s; an error becomes a message.
    """

    def __init__(self, model=None, tokenizer=None, chat_format: str = "llama2", *, backend: Callable | None = None,
                 system_prompt: str = SYSTEM_PROMPT_ARTICLE, params: GenerationParams | None = None,
                 update_interval: float = UPDATE_INTERVAL_S):
        import ipywidgets as w

        if backend is None and (model is None or tokenizer is None):
            raise TutorialError("chat.no_model", "请给 ChatWidget 模型和分词器，或 backend=...。", "Pass a model and a tokenizer, or backend=...")
        self.backend = backend or local_backend(model, tokenizer, chat_format)
        self.update_interval, self.base_params = update_interval, params or GenerationParams()
        self.history: list[dict] = []  # finished user/assistant turns: what the next prompt includes
        self.entries: list[tuple[str, str]] = []  # what the conversation view shows
        self.last, self.last_error, self.last_reply, self._thread = None, None, "", None
        self._stop, self._lock, p = threading.Event(), threading.Lock(), self.base_params
        self.system_box = w.Textarea(value=system_prompt, description="系统提示", layout=w.Layout(width="95%"))
        self.temperature = w.FloatSlider(value=p.temperature, min=0.05, max=2.0, step=0.05, description="temperature")
        self.max_new_tokens = w.IntSlider(value=p.max_new_tokens, min=1, max=2048, description="max_new_tokens")
        self.do_sample = w.Checkbox(value=p.do_sample, description="do_sample（关掉 = 贪心）")
        self.log, self.status = w.HTML(), w.HTML()  # _show fills them
        self.input = w.Textarea(placeholder="输入问题，然后点“发送”", layout=w.Layout(width="95%"))
        buttons = []
        for name, label, action in (("send", "发送", self.send), ("stop", "停止", self.stop), ("clear", "清空", self.clear)):
            buttons.append(w.Button(description=label))
            buttons[-1].on_click(lambda _button, action=action: action())
            buttons[-1].add_class(f"chat-{name}")  # CSS names the browser test looks for
        self.send_button, self.stop_button, self.clear_button = buttons
        for name in ("log", "input", "status"):
            getattr(self, name).add_class(f"chat-{name}")
        self.settings = w.Accordion(children=[w.VBox([self.system_box, self.temperature, self.max_new_tokens, self.do_sample])])
        self.settings.set_title(0, "系统提示与生成参数")  # ipywidgets 7 ignores Accordion(titles=...)
        self.ui = w.VBox([self.log, self.input, w.HBox(buttons), self.status, self.settings])
        self._show(False, "就绪。")

    def _ipython_display_(self):
        from IPython.display import display
        display(self.ui)

    @property
    def params(self) -> GenerationParams:
        """The controls' values; the other parameters from ``params``."""
        return replace(self.base_params, temperature=self.temperature.value, max_new_tokens=self.max_new_tokens.value,
                       do_sample=self.do_sample.value)

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def send(self, text: str | None = None, *, wait: bool = False) -> threading.Thread | None:
        """Ask ``text`` (default: the input box). Returns at once; ``wait=True`` waits for the answer."""
        with self._lock:
            question = (self.input.value if text is None else text).strip()
            if self.busy or not question:
                self.status.value = "还在生成上一条回答：先点“停止”。" if self.busy else "请输入问题。"
                return None
            if text is None:
                self.input.value = ""
            messages = history_to_messages(self.history, question, self.system_box.value)
            self.entries.append(("user", question))
            self._stop.clear()
            self._show(True, "生成中…")
            self._thread = threading.Thread(target=self._answer, args=(messages,), daemon=True)
            self._thread.start()
        if wait:
            self.wait()
        return self._thread

    def stop(self) -> None:
        """Stop the answer being generated; what it said so far is kept."""
        self._stop.set()

    def clear(self) -> None:
        """Forget the conversation (stops a running answer first)."""
        self.stop()
        self.wait()
        self.history.clear()
        self.entries.clear()
        self._show(False, "已清空。")

    def wait(self) -> None:
        """Wait for the answer; an interrupt (the kernel's stop button, Ctrl+C) stops the generation too."""
        try:
            if self._thread is not None:
                self._thread.join()
        except KeyboardInterrupt:
            self.stop()
            self._thread.join()
            raise

    def _show(self, busy: bool, status: str, partial: list | None = None) -> None:
        labels = {"user": "你", "assistant": "助手", "error": "出错"}
        turn = ('<div class="chat-turn chat-{}" style="border-left:3px solid #999;padding:2px 8px;margin:6px 0">'
                '<small>{}</small><div class="chat-text" style="white-space:pre-wrap">{}</div></div>')
        turns = "".join(turn.format(role, labels[role], html.escape(text)) for role, text in self.entries + (partial or []))
        self.log.value = ('<div style="display:flex;flex-direction:column-reverse;max-height:460px;overflow-y:auto">'
                          f'<div>{turns or "（还没有对话）"}</div></div>')  # newest turn kept in view
        self.send_button.disabled = self.clear_button.disabled = busy
        self.stop_button.disabled = not busy
        self.status.value = status

    def _answer(self, messages: list[dict]) -> None:  # a background thread: it only sets widget values
        self.last, self.last_error, self.last_reply = None, None, ""
        start, shown = time.perf_counter(), float("-inf")
        try:
            self.last = self.backend(messages, self.params, self._stop)
            for chunk in self.last:
                self.last_reply += chunk
                if time.perf_counter() - shown >= self.update_interval:  # throttled: not one update per token
                    shown = time.perf_counter()
                    self._show(True, f"生成中… · {len(self.last_reply)} 字", [("assistant", self.last_reply)])
        except BaseException as err:  # noqa: BLE001 - every error becomes a message; the widget stays usable
            self.last_error = err
            if self.last_reply:
                self.entries.append(("assistant", self.last_reply))
            self.entries.append(("error", explain_error(err)))
            self._show(False, "出错：这一轮没有计入对话历史。改好后可以直接再发送。")
            return
        self.entries.append(("assistant", self.last_reply))
        self.history += [messages[-1], {"role": "assistant", "content": self.last_reply}]
        reason = getattr(self.last, "finish_reason", None) or ("stop" if self._stop.is_set() else "")
        status = {"eos": "完成（模型输出了 </s>）", "length": "完成（达到 max_new_tokens）",
                  "stop": "已停止（保留已生成的内容）"}.get(reason, "完成")
        count, seconds = getattr(self.last, "token_count", None), time.perf_counter() - start
        han = sum("\u4e00" <= char <= "\u9fff" for char in self.last_reply)  # Han characters of the basic block
        speed = f"{count} tokens · {count / seconds:.1f} tokens/s" if count else f"{len(self.last_reply)} 字"
        dropped = len(getattr(self.last, "dropped", None) or []) // 2
        left_out = f" · 最早的 {dropped} 轮对话放不进上下文窗口，没有送给模型" if dropped else ""
        self._show(False, f"{status} · {speed} · 中文 {han / seconds:.1f} 字/s{left_out}")


def history_to_messages(history: list, message, system_prompt: str = "") -> list[dict]:
    """Gradio's history plus the new message as ``messages`` (notebooks/04_streaming_chat.ipynb): role/content
    dicts (gradio 6, gradio 5's ``type="messages"``), text or text parts, or gradio 5's ``[user, answer]`` pairs."""
    def text(content) -> str:
        if isinstance(content, (list, tuple)):
            return "".join(map(text, content))
        return content.get("text", "") if isinstance(content, dict) else content if isinstance(content, str) else ""

    turns = []
    for item in history or []:
        pairs = [(item["role"], item["content"])] if isinstance(item, dict) else zip(("user", "assistant"), item)
        for role, content in pairs:
            if role not in ("user", "assistant") or content is None:
                continue
            if turns and turns[-1]["role"] == role == "assistant":  # one answer shown as several messages
                turns[-1]["content"] += text(content)
                continue
            if turns and turns[-1]["role"] == role:  # a question whose answer failed: keep the later one
                turns.pop()
            turns.append({"role": role, "content": text(content)})
    if turns and turns[-1]["role"] == "user":  # an unanswered question
        turns.pop()
    system = [{"role": "system", "content": system_prompt.strip()}] if system_prompt.strip() else []
    return system + turns + [{"role": "user", "content": text(message)}]
