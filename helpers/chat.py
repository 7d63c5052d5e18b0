"""Streaming chat for notebooks/04_streaming_chat.ipynb, which writes out the taught steps: the widget, the page, the CLI.

Backend contract (what :class:`ChatWidget` and :func:`build_gradio_app` take; lesson 07 plugs in its server)::

    backend(messages: list[dict], params: GenerationParams, stop: threading.Event) -> Iterable[str]

* ``messages``: ``{"role": "system" | "user" | "assistant", "content": str}`` dicts, an optional
  system message first, ending with the new user question;
* the result yields the answer in order as text chunks without special tokens (no ``</s>``);
* once ``stop`` is set it ends soon (the local model: after the current token) without raising;
* a failure is an exception from the call or the iteration; the caller may also close the
  iterator early (Gradio's Stop), so release resources in ``finally``;
* optional attributes of the result, shown by the widget: ``token_count``, ``finish_reason``
  (``"eos"``, ``"length"``, ``"stop"``), ``dropped`` (oldest messages left out of the prompt).
"""

from __future__ import annotations

import argparse
import html
import inspect
import ipaddress
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from helpers.config import TutorialError, bilingual
from helpers.prompts import SYSTEM_PROMPT_ARTICLE, encode_prompt, truncate_history

UPDATE_INTERVAL_S = 0.05  # the widget re-renders at most this often (one update per token floods the browser)
Backend = Callable[[list, "GenerationParams", threading.Event], Iterable[str]]


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
    """Stop ``generate`` after the current token once any of ``events`` is set (notebooks/04_streaming_chat.ipynb)."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        stop = any(event.is_set() for event in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class ReplyStream:
    """Lesson 04's streaming loop with its fixes; iterate once for text chunks (notebooks/04_streaming_chat.ipynb).

    Oldest whole turns are dropped to fit the context (``messages``, ``dropped``); an exception in
    the worker, set-up included, ends the stream and is re-raised in the reader; ``stop_event`` or
    closing the iterator stops ``generate`` after the current token. Then ``text``, ``token_ids``,
    ``token_count``, ``elapsed_s`` and ``finish_reason`` (eos, length, stop, error) are set.
    """

    def __init__(self, model, tokenizer, messages: list[dict], params: GenerationParams | None = None, *,
                 fmt: str = "llama2", stop_event: threading.Event | None = None,
                 max_context_tokens: int | None = None, **generate_kwargs):
        self.model, self.tokenizer, self.params = model, tokenizer, params or GenerationParams()
        self.stop_event, self.generate_kwargs = stop_event or threading.Event(), generate_kwargs
        room = (max_context_tokens or model.config.max_position_embeddings) - int(self.params.max_new_tokens)
        if room <= 0:
            raise TutorialError(bilingual(
                f"max_new_tokens={self.params.max_new_tokens} 占满了上下文窗口，提示词放不下。请调小 max_new_tokens。",
                f"max_new_tokens={self.params.max_new_tokens} fills the context window. Lower it."))
        # A prompt that cannot fit raises PromptFormatError here, in the caller.
        self.messages, self.dropped = truncate_history(tokenizer, messages, room, fmt)
        self.prompt_ids = encode_prompt(tokenizer, self.messages, fmt)
        self.text, self.token_ids, self.error, self.elapsed_s, self._started = "", [], None, 0.0, False

    def _generate(self, streamer: TextIteratorStreamer) -> None:  # the worker thread
        try:
            input_ids = torch.tensor([self.prompt_ids], device=self.model.device)
            pad = self.tokenizer.pad_token_id
            kwargs = {**self.params.generate_kwargs(), "pad_token_id": self.tokenizer.eos_token_id if pad is None else pad,
                      **self.generate_kwargs}
            criteria = StoppingCriteriaList([*kwargs.pop("stopping_criteria", []), StopOnEvent(self.stop_event)])
            output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                         streamer=streamer, stopping_criteria=criteria, **kwargs)
            self.token_ids = output[0, input_ids.shape[1]:].tolist()
        except BaseException as err:  # out of memory, bad parameters, ...: hand it to the reader
            self.error = err
            try:
                streamer.end()  # flush the text so far and wake the reader
            except BaseException:
                streamer.text_queue.put(streamer.stop_signal)

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a ReplyStream can be read only once; call stream_reply() again")
        self._started, finished = True, False
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        worker = threading.Thread(target=self._generate, args=(streamer,), name="chat-generate", daemon=True)
        start = time.perf_counter()
        worker.start()
        try:
            for chunk in filter(None, streamer):  # the streamer also queues empty strings
                self.text += chunk
                yield chunk
            finished = True
        finally:
            if not finished:  # the reader went away (closed generator, exception in its loop): stop the worker
                self.stop_event.set()
            worker.join()
            self.elapsed_s = time.perf_counter() - start
        if self.error is not None:
            raise self.error

    def run(self) -> str:
        """Consume the whole stream and return the text."""
        for _ in self:
            pass
        return self.text

    @property
    def token_count(self) -> int:
        return len(self.token_ids)

    @property
    def finish_reason(self) -> str | None:
        if self.error is not None:
            return "error"
        if self.token_ids and self.token_ids[-1] == self.tokenizer.eos_token_id:
            return "eos"
        return "stop" if self.stop_event.is_set() else "length" if self.token_ids else None


def stream_reply(model, tokenizer, messages: list[dict], params: GenerationParams | None = None, **options) -> ReplyStream:
    """Stream the model's answer to ``messages`` (options: see :class:`ReplyStream`); notebooks/04_streaming_chat.ipynb."""
    return ReplyStream(model, tokenizer, messages, params, **options)


def local_backend(model, tokenizer, fmt: str = "llama2", **options) -> Backend:
    """The default backend: the local model via :func:`stream_reply`, ``options`` as :class:`ReplyStream`'s (lesson 04)."""
    def backend(messages: list[dict], params: GenerationParams, stop: threading.Event) -> ReplyStream:
        return stream_reply(model, tokenizer, messages, params, fmt=fmt, stop_event=stop, **options)
    return backend


def explain_error(err: BaseException, *, detail: bool = True) -> str:
    """A bilingual message for an error that ended a reply; ``detail=False`` leaves out the exception's text."""
    if isinstance(err, TutorialError):
        return str(err)
    what = f"（{type(err).__name__}: {err}）" if detail else ""
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
        return bilingual(f"显存不足，回答没有生成完{what}。请调小 max_new_tokens、清空对话，或用 4-bit 加载（第 02 课）。",
                         "Out of memory: lower max_new_tokens, clear the chat, or load the model in 4-bit (lesson 02).")
    return bilingual(f"生成时出错{what}。请检查生成参数后再试。", "Generation failed: check the parameters and try again.")


def render_conversation(entries: list[tuple[str, str]]) -> str:
    """HTML of ``(role, text)`` pairs (role user, assistant or error), text escaped, newest kept in view."""
    labels = {"user": "你", "assistant": "助手", "error": "出错"}
    turns = "".join(f'<div class="chat-turn chat-{role}" style="border-left:3px solid #999;padding:2px 8px;margin:6px 0">'
                    f'<small>{labels[role]}</small><div class="chat-text" style="white-space:pre-wrap">{html.escape(text)}'
                    "</div></div>" for role, text in entries)
    return ('<div style="display:flex;flex-direction:column-reverse;max-height:460px;overflow-y:auto">'
            f'<div>{turns or "（还没有对话）"}</div></div>')


class ChatWidget:
    """A streaming chat for JupyterLab / Colab, ipywidgets 7 or 8 (notebooks/04_streaming_chat.ipynb).

    ``ChatWidget(model, tokenizer, fmt)`` uses the local model, ``ChatWidget(backend=fn)`` any backend
    (module docstring). A background thread reads the answer and only sets widget values, at most
    every ``update_interval`` s; an error becomes a message and the widget stays usable.
    """

    def __init__(self, model=None, tokenizer=None, fmt: str = "llama2", *, backend: Backend | None = None,
                 system_prompt: str = SYSTEM_PROMPT_ARTICLE, params: GenerationParams | None = None,
                 update_interval: float = UPDATE_INTERVAL_S):
        import ipywidgets as w

        if backend is None and (model is None or tokenizer is None):
            raise TutorialError(bilingual("请给 ChatWidget 模型和分词器，或者 backend=...。", "Pass a model and a tokenizer, or backend=..."))
        self.backend = backend or local_backend(model, tokenizer, fmt)
        self.update_interval, self.base_params = update_interval, params or GenerationParams()
        self.history: list[dict] = []  # finished user/assistant turns: what the next prompt includes
        self.entries: list[tuple[str, str]] = []  # what the conversation view shows
        self.last, self.last_error, self.last_reply = None, None, ""
        self._stop, self._lock, self._thread = threading.Event(), threading.Lock(), None
        p = self.base_params
        self.system_box = w.Textarea(value=system_prompt, description="系统提示", layout=w.Layout(width="95%"))
        self.temperature = w.FloatSlider(value=p.temperature, min=0.05, max=2.0, step=0.05, description="temperature")
        self.max_new_tokens = w.IntSlider(value=p.max_new_tokens, min=1, max=2048, description="max_new_tokens")
        self.do_sample = w.Checkbox(value=p.do_sample, description="do_sample（关掉 = 贪心）")
        self.log, self.status = w.HTML(render_conversation([])), w.HTML("就绪。")
        self.input = w.Textarea(placeholder="输入问题，然后点“发送”", layout=w.Layout(width="95%"))
        self.send_button, self.stop_button, self.clear_button = (w.Button(description=d) for d in ("发送", "停止", "清空"))
        self.send_button.on_click(lambda _: self.send())
        self.stop_button.on_click(lambda _: self.stop())
        self.clear_button.on_click(lambda _: self.clear())
        self.stop_button.disabled = True
        for name in ("log", "input", "status", "send_button", "stop_button", "clear_button"):  # CSS names for tests
            getattr(self, name).add_class("chat-" + name.removesuffix("_button"))
        self.settings = w.Accordion(children=[w.VBox([self.system_box, self.temperature, self.max_new_tokens, self.do_sample])])
        self.settings.set_title(0, "系统提示与生成参数")  # ipywidgets 7 ignores Accordion(titles=...)
        self.ui = w.VBox([self.log, self.input, w.HBox([self.send_button, self.stop_button, self.clear_button]),
                          self.status, self.settings])

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
            system = self.system_box.value.strip()
            messages = [{"role": "system", "content": system}] if system else []
            messages += self.history + [{"role": "user", "content": question}]
            self.entries.append(("user", question))
            self._stop.clear()
            self._show(busy=True, status="生成中…")
            self._thread = threading.Thread(target=self._answer, args=(messages,), name="chat-ui", daemon=True)
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
        self._show(busy=False, status="已清空。")

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the answer; an interrupt (the kernel's stop button, Ctrl+C) stops the generation too."""
        thread = self._thread
        try:
            if thread is not None:
                thread.join(timeout)
        except KeyboardInterrupt:
            self.stop()
            thread.join()
            raise

    def _show(self, busy: bool, status: str, partial: list | None = None) -> None:
        self.log.value = render_conversation(self.entries + (partial or []))
        self.send_button.disabled = self.clear_button.disabled = busy
        self.stop_button.disabled = not busy
        self.status.value = status

    def _answer(self, messages: list[dict]) -> None:  # the "chat-ui" thread: sets widget values only
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
        status += f" · {count} tokens · {count / seconds:.1f} tokens/s" if count else f" · {len(self.last_reply)} 字"
        han = sum("\u4e00" <= char <= "\u9fff" for char in self.last_reply)  # the basic block of Han characters
        status += f" · 中文 {han / seconds:.1f} 字/s"
        if getattr(self.last, "dropped", None):
            status += f" · 最早的 {len(self.last.dropped) // 2} 轮对话放不进上下文窗口，没有送给模型"
        self._show(False, status)


def history_to_messages(history: list, message, system_prompt: str = "") -> list[dict]:
    """Gradio's history plus the new message as ``messages`` (notebooks/04_streaming_chat.ipynb).

    Takes role/content dicts (gradio 6; gradio 5 with ``type="messages"``), content given as text
    or as ``{"type": "text", "text": ...}`` parts, and gradio 5's ``[user, assistant]`` pairs.
    """
    def text(content) -> str:
        if isinstance(content, (list, tuple)):
            return "".join(map(text, content))
        return content.get("text", "") if isinstance(content, dict) else content if isinstance(content, str) else ""

    turns = []
    for item in history or []:
        pairs = [(item["role"], item["content"])] if isinstance(item, dict) else zip(("user", "assistant"), item)
        for role, content in pairs:
            if role in ("user", "assistant") and content is not None:
                if turns and turns[-1]["role"] == role:  # a question whose answer failed: keep the later one
                    turns.pop()
                turns.append({"role": role, "content": text(content)})
    if turns and turns[-1]["role"] == "user":  # an unanswered question
        turns.pop()
    system = [{"role": "system", "content": system_prompt.strip()}] if system_prompt.strip() else []
    return system + turns + [{"role": "user", "content": text(message)}]


def build_gradio_app(backend: Backend, *, system_prompt: str = SYSTEM_PROMPT_ARTICLE, show_error: bool = True,
                     params: GenerationParams | None = None, title: str = "Llama-2 中文问答"):
    """Lesson 04's ``gr.ChatInterface`` page over ``backend`` (notebooks/04_streaming_chat.ipynb writes it out).

    API endpoint ``/chat``: message, system prompt, max_new_tokens, temperature, do_sample. Works
    with gradio 5 (``type="messages"`` passed) and 6. ``show_error=False`` (a page others can
    reach) shows what went wrong without the exception's text.
    """
    import gradio as gr

    base = params or GenerationParams()

    def respond(message, history, system, max_new_tokens, temperature, do_sample):
        messages = history_to_messages(history, message, system)
        chosen = replace(base, max_new_tokens=int(max_new_tokens), temperature=float(temperature), do_sample=bool(do_sample))
        answer, stop = "", threading.Event()
        try:
            for chunk in backend(messages, chosen, stop):
                answer += chunk
                yield answer  # ChatInterface shows the whole answer so far
        except Exception as err:
            raise gr.Error(explain_error(err, detail=show_error)) from err
        finally:
            stop.set()  # Gradio's Stop closes this generator: end the generation too

    extra = {"type": "messages"} if "type" in inspect.signature(gr.ChatInterface).parameters else {}
    return gr.ChatInterface(
        respond, title=title, api_name="chat", analytics_enabled=False, **extra,
        additional_inputs=[gr.Textbox(system_prompt, label="系统提示"),
                           gr.Slider(1, 2048, value=base.max_new_tokens, step=1, label="max_new_tokens"),
                           gr.Slider(0.05, 2.0, value=base.temperature, step=0.05, label="temperature"),
                           gr.Checkbox(value=base.do_sample, label="do_sample（关掉 = 贪心）")],
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m helpers.chat --model ... --port ...``: the page from a terminal, like the article's chat_gradio.py."""
    parser = argparse.ArgumentParser(prog="python -m helpers.chat", description="流式中文问答页 / streaming Q&A page")
    parser.add_argument("--model", "--model_name_or_path", dest="model", default=None,
                        help="profile name, Hub repo id or local folder (default: $LLAMA_TUTORIAL_MODEL or auto)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--auth", default=None, help="user:password, required when --host is not a loopback address")
    parser.add_argument("--quantization", choices=("8bit", "4bit"), default=None)
    args = parser.parse_args(argv)
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False  # a host name other than localhost
    user, _, password = (args.auth or "").partition(":")
    if args.auth is not None and not (user and password):
        parser.error(bilingual("--auth 的格式是 用户名:密码。", "--auth takes user:password."))
    if not loopback and args.auth is None:
        parser.error(bilingual(
            f"--host {args.host} 会让其他机器也能打开这个页面并使用你的模型。请同时给出 --auth 用户名:密码，或者去掉 --host。",
            f"--host {args.host} lets other machines use this page and your model. Add --auth user:password, or drop --host."))

    from helpers.config import resolve_model
    from helpers.loading import load_model_and_tokenizer

    choice = resolve_model(args.model)
    model, tokenizer = load_model_and_tokenizer(choice, quantization=args.quantization)
    app = build_gradio_app(local_backend(model, tokenizer, choice.chat_format), show_error=loopback)
    app.queue(default_concurrency_limit=1)  # one model: one answer at a time
    print(f"问答页 / Q&A page: http://{args.host}:{args.port}  （Ctrl+C 退出 / to quit）", flush=True)
    app.launch(server_name=args.host, server_port=args.port, auth=(user, password) if args.auth else None,
               show_error=loopback)


if __name__ == "__main__":
    main()
