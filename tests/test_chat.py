"""Lesson 04: the streaming core, the chat widget (helpers/chat.py) and the Gradio page (scripts/gradio_chat.py)."""

from __future__ import annotations

import asyncio
import html
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LogitsProcessor, LogitsProcessorList

from helpers.chat import ChatWidget, GenerationParams, history_to_messages, local_backend, ReplyStream
from helpers.config import REPO_ROOT, TutorialError
from helpers.models import resolve_model
from helpers.loading import load_model_and_tokenizer
from helpers.prompts import PromptFormatError, encode
from helpers._process import free_port
from scripts import gradio_chat

GREEDY = GenerationParams(do_sample=False, max_new_tokens=40)
REPLACEMENT = "\ufffd"

# Questions with common and rare Chinese characters, emoji (incl. ZWJ sequences and flags), mixed text.
PROMPTS = [
    "请用中文介绍一下长城。",
    "What is the capital of France?",
    "生僻字：龘、𪚥、𠀀、㐀、𠮷，它们怎么读？",
    "表情😀🙂👨‍👩‍👧‍👦🇨🇳是什么意思？",
    "写一段 Python 代码，打印“你好，世界”。",
    "天上有几颗星？",
    "Translate 'good morning' into Chinese.",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and é ü ß — “引号”",
]

# Answers forced token by token: each holds characters that the tokenizer splits into byte pieces.
FORCED_ANSWERS = [
    "你好😀世界",
    "龘𪚥𠀀㐀",
    "家庭👨‍👩‍👧‍👦和国旗🇨🇳。",
    "天上有一颗星。",
    "代码：\n```python\nprint('你好')\n```\n完成✅",
    "é ü ß — “引号” 𝔘𝔫𝔦",
    "🙂🙂🙂\n\n🙃",
    "a😀b",
    "😀",
    "𠮷野家🍜，一碗。",
]


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """The tiny model is fastest on one CPU thread; two OpenMP threads on a busy shared CPU crawl."""
    before = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loaded(tiny_model):
    choice = resolve_model("tiny", verbose=False)
    model, tokenizer = load_model_and_tokenizer(choice)
    return model, tokenizer


def _messages(question: str, system: str | None = None) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": question}]


def _reference(model, tokenizer, messages, params: GenerationParams, chat_format="llama2") -> tuple[str, list[int]]:
    """Plain, non-streamed generate on the same prompt."""
    ids = torch.tensor([encode(tokenizer, messages, chat_format).input_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=tokenizer.eos_token_id,
                             **params.generate_kwargs())
    new = out[0, ids.shape[1]:].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), new


class ForceTokens(LogitsProcessor):
    """Make the model emit exactly ``ids`` and then EOS."""

    def __init__(self, ids: list[int], prompt_len: int, eos: int):
        self.ids, self.prompt_len, self.eos = ids, prompt_len, eos

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        target = self.ids[step] if step < len(self.ids) else self.eos
        forced = torch.full_like(scores, -float("inf"))
        forced[:, target] = 0.0
        return forced


def _forced_stream(model, tokenizer, answer: str, question: str = "说点什么🦄𠮷"):
    ids = tokenizer(answer, add_special_tokens=False).input_ids
    params = GenerationParams(do_sample=False, max_new_tokens=len(ids) + 4, repetition_penalty=1.0)
    stream = ReplyStream(model, tokenizer, _messages(question), params)
    stream.generate_kwargs["logits_processor"] = LogitsProcessorList(
        [ForceTokens(ids, len(stream.prompt_ids), tokenizer.eos_token_id)]
    )
    return stream, ids


# --------------------------------------------------------------------------- the core


def test_generation_params_are_the_articles():
    p = GenerationParams()
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_new_tokens, p.do_sample) == (
        0.3, 0.95, 50, 1.3, 512, True)
    assert p.generate_kwargs() == {"max_new_tokens": 512, "do_sample": True, "repetition_penalty": 1.3,
                                   "temperature": 0.3, "top_p": 0.95, "top_k": 50}
    greedy = GenerationParams(do_sample=False).generate_kwargs()
    assert not {"temperature", "top_p", "top_k"} & set(greedy) and greedy["repetition_penalty"] == 1.3


@pytest.mark.parametrize("chat_format", ["llama2", "human_assistant"])
def test_streamed_equals_non_streamed_greedy(loaded, chat_format):
    model, tokenizer = loaded
    conversations = [_messages(q) for q in PROMPTS[:4]] + [
        _messages("长城有多长？", system="你是一个乐于助人的中文助手。"),
        [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"},
         {"role": "user", "content": "介绍一下北京。"}],
    ]
    for messages in conversations:
        stream = ReplyStream(model, tokenizer, messages, GREEDY, chat_format=chat_format)
        chunks = list(stream)
        expected_text, expected_ids = _reference(model, tokenizer, messages, GREEDY, chat_format)
        assert "".join(chunks) == expected_text == stream.text
        assert stream.token_ids == expected_ids
        assert stream.prompt_ids == encode(tokenizer, messages, chat_format).input_ids
        assert stream.finish_reason in {"eos", "length"}
        if len(expected_ids) > 3:
            assert len(chunks) > 1, "a reply of several tokens must arrive in several chunks"


@pytest.mark.parametrize("answer", FORCED_ANSWERS)
def test_byte_fallback_pieces_never_stream_as_replacement_chars(loaded, answer):
    model, tokenizer = loaded
    stream, ids = _forced_stream(model, tokenizer, answer)
    # Token-by-token decoding is what goes wrong wherever a character is split into byte pieces.
    if any(p.startswith("<0x") for p in tokenizer.convert_ids_to_tokens(ids)):
        assert any(REPLACEMENT in tokenizer.decode([i]) for i in ids)
    chunks = list(stream)
    assert stream.token_ids == ids + [tokenizer.eos_token_id] and stream.finish_reason == "eos"
    assert not [c for c in chunks if REPLACEMENT in c or "</s>" in c], chunks
    assert "".join(chunks) == tokenizer.decode(ids, skip_special_tokens=True) == answer


_ALPHABET = st.sampled_from(
    list("你好世界星。，！？中文天地人龘㐀䶵鿕") + ["𪚥", "𠀀", "𠮷", "😀", "🙃", "🍜", "✅", "🇨🇳", "👨‍👩‍👧"]
    + list("abcXYZ019 .,:;!?'\"()[]{}<>/\\-_=+*#@$%&\n") + ["é", "ß", "—", "“", "”", "𝔘"]
)


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_ALPHABET, min_size=1, max_size=16).map("".join))
def test_no_replacement_char_or_eos_in_any_chunk_property(loaded, answer):
    model, tokenizer = loaded
    stream, ids = _forced_stream(model, tokenizer, answer)
    chunks = list(stream)
    assert not [c for c in chunks if REPLACEMENT in c or "</s>" in c], chunks
    assert "".join(chunks) == tokenizer.decode(ids, skip_special_tokens=True)


def test_free_generation_over_many_prompts_never_shows_eos_or_spurious_replacement(loaded):
    model, tokenizer = loaded
    for n, question in enumerate(PROMPTS):
        for params in (GREEDY, GenerationParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=40)):
            torch.manual_seed(n)
            stream = ReplyStream(model, tokenizer, _messages(question, system="You are a helpful assistant."), params)
            chunks = list(stream)
            full = tokenizer.decode(stream.token_ids, skip_special_tokens=True)
            assert "".join(chunks) == full
            assert not any("</s>" in c for c in chunks)
            if REPLACEMENT not in full:  # only a genuinely invalid byte sequence from the model may show one
                assert not any(REPLACEMENT in c for c in chunks)


def _raise_at_step(model, step: int, exc: BaseException):
    calls = []

    def hook(module, args, output):
        calls.append(1)
        if len(calls) == step:
            raise exc

    return model.register_forward_hook(hook), calls


def test_worker_exception_surfaces_in_the_reader_without_hanging(loaded):
    model, tokenizer = loaded
    handle, calls = _raise_at_step(model, 4, RuntimeError("boom in the worker"))
    stream = ReplyStream(model, tokenizer, _messages("你好"), GenerationParams(do_sample=False, max_new_tokens=50))
    outcome: dict = {}

    def read():
        try:
            for chunk in stream:
                outcome.setdefault("chunks", []).append(chunk)
        except BaseException as err:  # noqa: BLE001
            outcome["error"] = err

    reader = threading.Thread(target=read)
    try:
        reader.start()
        reader.join(timeout=60)
    finally:
        handle.remove()
    assert not reader.is_alive(), "the reader hung after the worker failed"
    assert isinstance(outcome.get("error"), RuntimeError) and "boom in the worker" in str(outcome["error"])
    assert stream.finish_reason == "error" and len(calls) == 4
    # The three tokens made before the failure were still delivered (held-back text flushed).
    first_three, _ = _reference(model, tokenizer, _messages("你好"), GenerationParams(do_sample=False, max_new_tokens=3))
    assert stream.text == "".join(outcome.get("chunks", [])) == first_three
    assert not [t for t in threading.enumerate() if t.name == "chat-generate" and t.is_alive()]


class _BrokenSetup:
    """A model whose set-up in the worker (``model.device``, read to build the input tensor) fails."""

    def __init__(self, model):
        self.config = model.config

    @property
    def device(self):
        raise RuntimeError("device set-up failed (test)")


def test_failure_while_setting_up_tensors_ends_the_stream(loaded):
    model, tokenizer = loaded
    stream = ReplyStream(_BrokenSetup(model), tokenizer, _messages("你好"), GREEDY)
    outcome: dict = {}

    def read():
        try:
            outcome["chunks"] = list(stream)
        except BaseException as err:  # noqa: BLE001
            outcome["error"] = err

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive(), "the reader hung: a failure before generate() did not end the stream"
    assert isinstance(outcome.get("error"), RuntimeError) and "set-up failed" in str(outcome["error"])
    assert stream.finish_reason == "error"


@pytest.mark.parametrize("bad", [{"repetition_penalty": 0.0}, {"top_k": -1}, {"temperature": 0.0}, {"max_new_tokens": 0}])
def test_bad_parameters_raise_in_the_caller(loaded, bad):
    model, tokenizer = loaded
    params = GenerationParams(**{"max_new_tokens": 20, **bad})
    with pytest.raises(ValueError):
        list(ReplyStream(model, tokenizer, _messages("你好"), params))


def test_stop_event_halts_within_one_step_and_keeps_the_text(loaded):
    model, tokenizer = loaded
    stop = threading.Event()
    calls = []

    def hook(module, args, output):
        calls.append(1)
        if len(calls) == 6:
            stop.set()  # as if Stop were clicked while the 6th token is computed

    handle = model.register_forward_hook(hook)
    try:
        stream = ReplyStream(model, tokenizer, _messages("请用中文介绍一下长城。"),
                              GenerationParams(do_sample=False, max_new_tokens=200, repetition_penalty=1.0),
                              stop_event=stop, min_new_tokens=100)
        text = stream.run()
    finally:
        handle.remove()
    assert stream.finish_reason == "stop"
    assert stream.token_count == 6 and len(calls) == 6, "no step may run after the one that saw Stop"
    assert text == tokenizer.decode(stream.token_ids, skip_special_tokens=True)


def test_stop_from_the_reader_runs_at_most_one_more_step(loaded):
    model, tokenizer = loaded
    stop = threading.Event()
    after_stop = []
    handle = model.register_forward_pre_hook(lambda m, a: after_stop.append(1) if stop.is_set() else None)
    try:
        stream = ReplyStream(model, tokenizer, _messages("Tell me a long story."),
                              GenerationParams(do_sample=False, max_new_tokens=300, repetition_penalty=1.0),
                              stop_event=stop, min_new_tokens=300)
        for _ in stream:
            stop.set()
    finally:
        handle.remove()
    assert stream.finish_reason == "stop" and stream.token_count < 300
    assert len(after_stop) <= 1


def test_closing_the_reader_stops_the_worker(loaded):
    model, tokenizer = loaded
    calls = []
    handle = model.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        stream = ReplyStream(model, tokenizer, _messages("Tell me a long story."),
                              GenerationParams(do_sample=False, max_new_tokens=300), min_new_tokens=300)
        chunks = iter(stream)
        next(chunks)
        chunks.close()  # what Gradio does when its Stop button cancels the generator
    finally:
        handle.remove()
    assert len(calls) < 300 and stream.token_count < 300 and stream.finish_reason == "stop"
    assert not [t for t in threading.enumerate() if t.name == "chat-generate" and t.is_alive()]


def test_history_is_truncated_by_whole_turns(loaded):
    model, tokenizer = loaded
    messages = [{"role": "system", "content": "你是一个助手。"}]
    for i in range(6):
        messages += [{"role": "user", "content": f"第 {i} 个问题：长城有多长？"},
                     {"role": "assistant", "content": f"第 {i} 个回答：" + "很长。" * 10}]
    messages.append({"role": "user", "content": "最后的问题"})
    params = GenerationParams(do_sample=False, max_new_tokens=16)
    budget = len(encode(tokenizer, [messages[0]] + messages[-3:], "llama2").input_ids) + 2
    stream = ReplyStream(model, tokenizer, messages, params, max_context_tokens=budget + params.max_new_tokens)
    assert stream.messages[0] == messages[0] and stream.messages[-1] == messages[-1]
    assert stream.dropped == messages[1:-3] and len(stream.dropped) % 2 == 0
    assert stream.messages == [messages[0]] + messages[-3:]
    assert stream.prompt_ids == encode(tokenizer, stream.messages, "llama2").input_ids
    assert len(stream.prompt_ids) <= budget


def test_prompt_that_cannot_fit_is_a_tutorial_error(loaded):
    model, tokenizer = loaded
    with pytest.raises(TutorialError):
        ReplyStream(model, tokenizer, _messages("你好"), GenerationParams(max_new_tokens=5000))
    with pytest.raises(PromptFormatError):
        ReplyStream(model, tokenizer, _messages("很长的问题" * 300), GenerationParams(max_new_tokens=64))


def test_stream_iterates_once(loaded):
    model, tokenizer = loaded
    stream = ReplyStream(model, tokenizer, _messages("你好"), GREEDY)
    stream.run()
    with pytest.raises(RuntimeError):
        list(stream)


# --------------------------------------------------------------------------- the widget


def test_widget_send_streams_into_history_and_matches_greedy(loaded):
    model, tokenizer = loaded
    chat = ChatWidget(model, tokenizer, system_prompt="你是一个助手。")
    chat.do_sample.value = False
    chat.max_new_tokens.value = 40
    chat.send("请用中文介绍一下长城。", wait=True)
    expected, _ = _reference(model, tokenizer, _messages("请用中文介绍一下长城。", system="你是一个助手。"),
                             chat.params)
    assert chat.last_reply == expected and expected.strip()
    assert chat.history == [{"role": "user", "content": "请用中文介绍一下长城。"},
                            {"role": "assistant", "content": expected}]
    assert "请用中文介绍一下长城。" in chat.log.value and "tokens/s" in chat.status.value
    assert "\ufffd" not in chat.log.value and "&lt;/s&gt;" not in chat.log.value
    assert not chat.busy and not chat.send_button.disabled and chat.stop_button.disabled
    # Second turn carries the first.
    chat.send("再短一点。", wait=True)
    assert len(chat.history) == 4 and chat.last.messages[1:3] == chat.history[:2]
    assert chat.last.messages[0] == {"role": "system", "content": "你是一个助手。"}
    chat.clear()
    assert chat.history == [] and chat.entries == [] and "还没有对话" in chat.log.value


def test_widget_input_box_is_what_send_uses(loaded):
    model, tokenizer = loaded
    chat = ChatWidget(model, tokenizer)
    chat.max_new_tokens.value = 8
    chat.input.value = "  你好  "
    chat.send_button.click()  # the button's own handler
    chat.wait()
    assert chat.input.value == "" and chat.history[0] == {"role": "user", "content": "你好"}
    assert chat.send("   ") is None and "请输入问题" in chat.status.value


def _count_renders(chat) -> list:
    renders = []
    chat.log.observe(lambda change: renders.append(change["new"]), "value")
    return renders


def test_widget_updates_are_throttled(loaded):
    model, tokenizer = loaded
    forced = local_backend(model, tokenizer, min_new_tokens=40)  # 40 tokens whatever the model would say
    unthrottled = ChatWidget(backend=forced, system_prompt="", update_interval=0)
    unthrottled.do_sample.value, unthrottled.max_new_tokens.value = False, 40
    every = _count_renders(unthrottled)
    unthrottled.send("请用中文介绍一下长城。", wait=True)
    chat = ChatWidget(backend=forced, system_prompt="", update_interval=1e9)  # at most one update while streaming
    chat.do_sample.value, chat.max_new_tokens.value = False, 40
    renders = _count_renders(chat)
    chat.send("请用中文介绍一下长城。", wait=True)
    assert chat.last.token_count == unthrottled.last.token_count == 40
    assert len(every) > 5, "without throttling the view is re-rendered as chunks arrive"
    # the question, the first chunk, the final answer: no per-chunk updates.
    assert len(renders) <= 3 and chat.last_reply == unthrottled.last_reply
    assert renders[-1] == chat.log.value and html.escape(chat.last_reply) in chat.log.value, "final text shown"


def test_widget_error_is_a_message_and_the_widget_stays_usable(loaded):
    model, tokenizer = loaded
    chat = ChatWidget(model, tokenizer)
    chat.max_new_tokens.value = 20
    handle, _ = _raise_at_step(model, 2, torch.OutOfMemoryError("CUDA out of memory (test)"))
    try:
        chat.send("这一轮会失败", wait=True)
    finally:
        handle.remove()
    assert isinstance(chat.last_error, torch.OutOfMemoryError)
    assert chat.entries[-1][0] == "error" and "显存不足" in chat.log.value
    assert chat.history == [], "a failed turn does not enter the history"
    assert not chat.busy and not chat.send_button.disabled
    chat.send("现在呢？", wait=True)
    assert chat.last_error is None and len(chat.history) == 2
    # A prompt that cannot fit is reported the same way.
    chat.system_box.value = "很长的系统提示。" * 400
    chat.send("你好", wait=True)
    assert isinstance(chat.last_error, PromptFormatError) and len(chat.history) == 2
    assert not chat.busy


def test_widget_says_when_old_turns_were_left_out(loaded):
    model, tokenizer = loaded
    system = {"role": "system", "content": "你是一个助手。"}
    room = len(encode(tokenizer, [system, {"role": "user", "content": "第三个问题"}]).input_ids) + 2
    chat = ChatWidget(backend=local_backend(model, tokenizer, max_context_tokens=room + 8), system_prompt=system["content"])
    chat.do_sample.value, chat.max_new_tokens.value = False, 8
    for question in ("第一个问题", "第二个问题", "第三个问题"):
        chat.send(question, wait=True)
    assert chat.last.messages == [system, {"role": "user", "content": "第三个问题"}]
    assert len(chat.last.dropped) == 4 and "最早的 2 轮" in chat.status.value


def test_widget_stop_keeps_the_partial_answer(loaded):
    model, tokenizer = loaded
    chat = ChatWidget(backend=local_backend(model, tokenizer, min_new_tokens=200))
    chat.do_sample.value = False
    chat.max_new_tokens.value = 200
    calls = []

    def hook(module, args, output):
        calls.append(1)
        if len(calls) == 5:
            chat.stop()  # what the Stop button calls

    handle = model.register_forward_hook(hook)
    try:
        chat.send("讲一个很长的故事。", wait=True)
    finally:
        handle.remove()
    assert chat.last.finish_reason == "stop" and chat.last.token_count == 5
    assert chat.history[-1] == {"role": "assistant", "content": chat.last.text}
    assert "已停止" in chat.status.value
    # While busy, a second send is refused rather than interleaved.
    gate = threading.Event()
    handle = model.register_forward_pre_hook(lambda m, a: None if gate.wait(30) else None)
    try:
        chat.send("第一条")
        assert chat.send("第二条") is None and "还在生成" in chat.status.value
    finally:
        gate.set()
        handle.remove()
        chat.wait()
    assert [m["content"] for m in chat.history if m["role"] == "user"][-1] == "第一条"


def test_interrupting_the_wait_stops_the_generation(loaded):
    model, tokenizer = loaded
    chat = ChatWidget(backend=local_backend(model, tokenizer, min_new_tokens=600), system_prompt="")
    chat.do_sample.value, chat.max_new_tokens.value = False, 600
    steps = []

    def slow_step(module, args):  # 600 steps of at least 20 ms: 12 s or more if nothing stops them
        steps.append(1)
        time.sleep(0.02)

    handle = model.register_forward_pre_hook(slow_step)
    try:
        thread = chat.send("讲一个很长的故事。")
        real_join = thread.join
        thread.join = lambda timeout=None: (thread.__dict__.pop("join"), _interrupt())  # Ctrl+C while waiting
        start = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            chat.wait()
        waited = time.perf_counter() - start
        assert not thread.is_alive(), "the generation still runs after the interrupt"
    finally:
        handle.remove()
        chat.stop()
        real_join(60)
    assert waited < 5 and chat.last.finish_reason == "stop" and chat.last.token_count < 600
    assert len(steps) < 600 and not chat.busy and "已停止" in chat.status.value


def _interrupt():
    raise KeyboardInterrupt


class FakeBackend:
    """A backend that keeps the contract: answers "回答N：" + the question, in 3-character chunks."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple[list, GenerationParams]] = []
        self.fail_on = fail_on

    def __call__(self, messages, params, stop):
        self.calls.append(([dict(m) for m in messages], params))
        answer = f"回答{len(self.calls)}：{messages[-1]['content']}" * 5
        for i in range(0, len(answer), 3):
            if stop.is_set():
                return
            if self.fail_on and self.fail_on in messages[-1]["content"] and i >= 6:
                raise ConnectionError("server went away (test)")
            yield answer[i:i + 3]


def test_widget_with_a_pluggable_backend():
    backend = FakeBackend(fail_on="坏")
    chat = ChatWidget(backend=backend, system_prompt="系统")
    chat.do_sample.value, chat.max_new_tokens.value, chat.temperature.value = False, 77, 0.7
    chat.send("你好", wait=True)
    assert chat.last_reply == "回答1：你好" * 5 and chat.last_error is None
    messages, params = backend.calls[0]
    assert messages == [{"role": "system", "content": "系统"}, {"role": "user", "content": "你好"}]
    assert (params.do_sample, params.max_new_tokens, params.temperature, params.top_p) == (False, 77, 0.7, 0.95)
    assert "完成" in chat.status.value and f"{len(chat.last_reply)} 字" in chat.status.value
    chat.send("再来", wait=True)
    assert backend.calls[1][0][1:] == [{"role": "user", "content": "你好"},
                                       {"role": "assistant", "content": "回答1：你好" * 5},
                                       {"role": "user", "content": "再来"}]
    chat.send("坏问题", wait=True)  # the backend raises mid-answer
    assert isinstance(chat.last_error, ConnectionError) and "server went away" in chat.log.value
    assert len(chat.history) == 4 and not chat.busy
    with pytest.raises(TutorialError):
        ChatWidget()  # neither a model nor a backend


def test_accordion_title_survives_the_ipywidgets_7_api(monkeypatch, loaded):
    import ipywidgets

    class Accordion7(ipywidgets.Accordion):
        """ipywidgets 7.7.1 (Colab) has no ``titles`` trait: the keyword is silently ignored."""

        def __init__(self, *args, titles=None, **kwargs):
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(ipywidgets, "Accordion", Accordion7)
    chat = ChatWidget(backend=FakeBackend())
    assert isinstance(chat.settings, Accordion7) and chat.settings.get_title(0) == "系统提示与生成参数"


# --------------------------------------------------------------------------- Gradio


def test_history_to_messages_understands_both_gradio_shapes():
    expected = [
        {"role": "system", "content": "系统"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "新问题"},
    ]
    messages = [  # gradio 6, and gradio 5 with type="messages"
        {"role": "user", "content": [{"type": "text", "text": "你好"}]},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "失败的问题"},  # its answer failed: no assistant message
    ]
    tuples = [["你好", "你好！"], ["失败的问题", None]]  # gradio 5's default "tuples" history
    assert history_to_messages(messages, "新问题", "系统") == expected
    assert history_to_messages(tuples, "新问题", "系统") == expected
    assert history_to_messages([], "新问题", "") == expected[-1:]
    split = [messages[0], {"role": "assistant", "content": "你"}, {"role": "assistant", "content": "好！"}]
    assert history_to_messages(split, "新问题", "系统") == expected


def _drive_page(app, questions, *extra):
    """Run the ChatInterface's own submit path turn after turn, feeding back the history it returns."""
    async def go():
        history, finals = [], []
        for question in questions:
            outputs = [out async for out in app._stream_fn(question, history, *extra)]
            finals.append(outputs[-1][0])
            history = outputs[-1][1]
        return finals

    return asyncio.run(go())


def test_gradio_page_remembers_earlier_turns():
    backend = FakeBackend()
    app = gradio_chat.build_gradio_app(backend, params=GenerationParams(do_sample=False), system_prompt="系统")
    finals = _drive_page(app, ["第一问", "第二问", "第三问"], "系统", 64)
    assert finals == [f"回答{n}：{q}" * 5 for n, q in ((1, "第一问"), (2, "第二问"), (3, "第三问"))]
    third, params = backend.calls[2]
    assert third == [{"role": "system", "content": "系统"},
                     {"role": "user", "content": "第一问"}, {"role": "assistant", "content": finals[0]},
                     {"role": "user", "content": "第二问"}, {"role": "assistant", "content": finals[1]},
                     {"role": "user", "content": "第三问"}]
    assert (params.max_new_tokens, params.do_sample) == (64, False)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("show_error", [True, False])
def test_gradio_page_reports_errors_with_detail_only_when_asked(show_error):
    import gradio as gr

    app = gradio_chat.build_gradio_app(FakeBackend(fail_on="坏"), show_error=show_error)
    with pytest.raises(gr.Error) as caught:
        _drive_page(app, ["坏问题"], "", 64)
    assert "生成时出错" in str(caught.value)
    assert ("server went away" in str(caught.value)) is show_error


@pytest.mark.server
def test_gradio_page_streams_in_chunks_and_stops_cleanly(loaded):
    from gradio_client import Client

    model, tokenizer = loaded
    port = free_port()
    app = gradio_chat.build_gradio_app(local_backend(model, tokenizer), params=GenerationParams(do_sample=False),
                                    show_error=False)  # as on a page others can reach
    app.queue(default_concurrency_limit=1)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_error=False)
    try:
        client = Client(app.local_url, verbose=False)
        question = "请用中文介绍一下长城。"
        job = client.submit(question, "你是一个助手。", 40, api_name="/chat")
        final = job.result(timeout=120)
        updates = job.outputs()
        expected, _ = _reference(model, tokenizer, _messages(question, system="你是一个助手。"),
                                 GenerationParams(do_sample=False, max_new_tokens=40))
        assert final == expected and len(updates) > 1, updates
        assert all(expected.startswith(u) for u in updates), "each update is the answer so far"
        assert not any(REPLACEMENT in u or "</s>" in u for u in updates)
        # A failure in the worker reaches the page as a message, without the exception's own text.
        handle, _ = _raise_at_step(model, 2, torch.OutOfMemoryError("CUDA out of memory (secret detail)"))
        try:
            with pytest.raises(Exception, match="显存不足") as caught:
                client.predict("你好", "", 20, api_name="/chat")
        finally:
            handle.remove()
        assert "secret detail" not in str(caught.value)
        # The failed stream leaves no diff state behind (gradio 6.24 kept it: the next answer could break).
        assert not app.pending_diff_streams.get(client.session_hash)
        assert client.predict("你好", "", 10, api_name="/chat").strip(), "the page keeps working"
        client.close()
    finally:
        app.close()
    assert not _port_open(port), "the server still listens after close()"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))  # free_port gives a port one can bind


class _FakeApp:
    def __init__(self, calls):
        self.calls = calls

    def queue(self, **kwargs):
        self.calls.append(("queue", kwargs))

    def launch(self, **kwargs):
        self.calls.append(("launch", kwargs))


@pytest.fixture
def command_line(monkeypatch, loaded):
    calls, loads = [], []
    monkeypatch.setattr(gradio_chat, "build_gradio_app", lambda backend, **k: calls.append(("build", k)) or _FakeApp(calls))
    monkeypatch.setattr("helpers.loading.load_model_and_tokenizer",
                        lambda choice, quantization=None: loads.append(choice) or loaded)
    return calls, loads


def test_command_line_binds_loopback_and_shows_errors_only_there(command_line):
    calls, _ = command_line
    gradio_chat.main(["--model", "tiny", "--port", "7999"])
    launch = dict(calls)["launch"]
    assert (launch["server_name"], launch["server_port"], launch["show_error"], launch["auth"]) == ("127.0.0.1", 7999, True, None)
    calls.clear()
    gradio_chat.main(["--model_name_or_path", "tiny", "--port", "7998", "--host", "0.0.0.0", "--auth", "me:pa:ss"])
    launch, build = dict(calls)["launch"], dict(calls)["build"]
    assert (launch["server_name"], launch["auth"], launch["show_error"], build["show_error"]) == (
        "0.0.0.0", ("me", "pa:ss"), False, False)


@pytest.mark.parametrize("argv", [["--host", "0.0.0.0"], ["--host", "192.168.1.5"], ["--host", "127.attacker.example"],
                                  ["--host", "0.0.0.0", "--auth", "nopassword"]])
def test_command_line_refuses_an_open_page_without_a_password(command_line, capsys, argv):
    calls, loads = command_line
    with pytest.raises(SystemExit) as stopped:
        gradio_chat.main(["--model", "tiny", *argv])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "--auth" in err and "用户名:密码" in err
    assert calls == [] and loads == [], "nothing is loaded or started"


@pytest.mark.server
def test_the_script_runs_from_a_terminal(tiny_model):
    """``python scripts/gradio_chat.py`` as lesson 04 shows it: it refuses an open page before loading a model."""
    result = subprocess.run([sys.executable, "scripts/gradio_chat.py", "--model", "tiny", "--host", "0.0.0.0"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--auth" in result.stderr, result.stderr[-2000:]


def test_forced_answers_exercise_byte_pieces(loaded):
    _, tokenizer = loaded
    split = [a for a in FORCED_ANSWERS
             if any(p.startswith("<0x") for p in tokenizer.convert_ids_to_tokens(tokenizer(a, add_special_tokens=False).input_ids))]
    assert len(split) >= len(FORCED_ANSWERS) - 2, "most forced answers must contain byte-fallback pieces"


def _launch_keywords(source: str) -> dict:
    """The keyword arguments of the ``.launch(...)`` call in ``source``, evaluated (IN_COLAB as in Colab)."""
    import ast

    call = next(node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
                and getattr(node.func, "attr", "") == "launch")
    return {kw.arg: eval(compile(ast.Expression(kw.value), "launch", "eval"), {"IN_COLAB": True}, {})
            for kw in call.keywords if kw.arg not in ("server_port", "auth", "show_error", "server_name")}


@pytest.mark.server
@pytest.mark.parametrize("where", ["lesson 04", "scripts/gradio_chat.py"])
def test_gradio_page_is_never_public_in_colab(monkeypatch, where):
    """In Colab (or Kaggle, or with GRADIO_SHARE=true) gradio turns a public, password-less *.gradio.live link on by
    itself unless launch() is told share=False. Colab is simulated; a share tunnel would fail the test."""
    import gradio as gr
    import nbformat
    from gradio import networking, utils

    from helpers.config import REPO_ROOT

    if where == "lesson 04":
        cells = nbformat.read(REPO_ROOT / "notebooks" / "04_streaming_chat.ipynb", as_version=4).cells
        source = next(c.source for c in cells if c.cell_type == "code" and "demo.launch(" in c.source)
    else:
        source = (REPO_ROOT / "scripts" / "gradio_chat.py").read_text("utf-8")
    kwargs = _launch_keywords(source)
    kwargs.update(inline=False, prevent_thread_lock=True, quiet=True)  # no Colab frontend here to draw into

    tunnels = []

    def no_tunnel(*args, **kw):  # gradio catches a failed tunnel and goes on: record the request instead
        tunnels.append(kw)
        raise OSError("no public link in tests")

    monkeypatch.setattr(utils, "colab_check", lambda: True)
    monkeypatch.setattr(networking, "setup_tunnel", no_tunnel)
    monkeypatch.setenv("GRADIO_SHARE", "true")
    with gr.Blocks() as app:
        gr.Markdown("page")
    try:
        app.launch(server_name="127.0.0.1", **kwargs)
        assert not tunnels, "launch() asked for a public share link"
        assert app.share is False and app.share_url is None
    finally:
        app.close()
