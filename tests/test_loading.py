"""Lesson 02 (helpers/loading.py, bench/loading.py): quantized loading, the checks before it, and
what each mode costs. The 8-bit and 4-bit paths run for real on bitsandbytes' CPU backend."""

from __future__ import annotations

import json
import shutil
import sys
import types

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

from helpers import loading
from helpers.config import TutorialError
from helpers.models import ModelChoice
from bench.loading import linear_layer_types, time_generation
from helpers.loading import (
    GIB,
    LLAMA2_SHAPES,
    ModelTooLargeError,
    check_bitsandbytes,
    check_fits,
    count_parameters,
    estimate_memory,
    load_model_and_tokenizer,
    memory_footprint,
    preflight_check,
)
from helpers.download import missing_weights
from tests.error_text import both
from tests.model_fixtures import random_llama_folder



def _bilingual(err) -> bool:
    """The error has a code, a Chinese message and an English one (with letters)."""
    def han(text):
        return any("\u4e00" <= ch <= "\u9fff" for ch in text)

    return bool(err.code) and han(err.zh) and any(ch.isascii() and ch.isalpha() for ch in err.en)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Nothing here is timed; one thread avoids OpenMP spin-waiting on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_path(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def tiny_choice(tiny_path):
    return ModelChoice("tiny", str(tiny_path), "test")


@pytest.fixture(scope="module")
def loaded(tiny_path):
    """The tiny model in the three modes, loaded the way the lesson does."""
    loading.quiet_bitsandbytes()
    configs = {
        "full": None,
        "8bit": BitsAndBytesConfig(load_in_8bit=True),
        "4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    }
    return {
        mode: AutoModelForCausalLM.from_pretrained(
            tiny_path, dtype=torch.float32, quantization_config=q, device_map="auto", attn_implementation="sdpa"
        ).eval()
        for mode, q in configs.items()
    }


def _copy_model(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


# --------------------------------------------------------------------------- device choice


def test_cpu_choices():
    assert loading.pick_device() == "cpu"
    assert loading.pick_dtype() == torch.float32
    assert loading.pick_attn_implementation() == "sdpa"


def simulate_gpu(monkeypatch, capability, name="Tesla T4", free_gib=14.5):
    """A CUDA GPU as torch reports it. torch 2.13's is_bf16_supported() counts emulation, so it says
    True on a T4 (sm75) too: the simulation says so as well, as a real T4 does."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(free_gib * GIB), int(15 * GIB)))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a: None)  # TrainingArguments selects the GPU


@pytest.mark.parametrize(
    "capability, has_flash, dtype, attn",
    [
        ((7, 5), False, torch.float16, "sdpa"),  # T4: bf16 only emulated, no FlashAttention-2
        ((7, 5), True, torch.float16, "sdpa"),  # T4 with flash_attn installed: still sdpa
        ((8, 0), False, torch.bfloat16, "sdpa"),  # A100 without flash_attn
        ((8, 0), True, torch.bfloat16, "flash_attention_2"),
    ],
)
def test_gpu_choices_follow_the_compute_capability(monkeypatch, capability, has_flash, dtype, attn):
    simulate_gpu(monkeypatch, capability)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn") if has_flash else None)
    assert loading.pick_device() == "cuda"
    assert loading.pick_dtype() == dtype
    assert loading.pick_attn_implementation() == attn


@pytest.mark.parametrize("capability, fp16, bf16", [((7, 5), True, False), ((8, 0), False, True)])
def test_qlora_training_arguments_follow_the_compute_capability(monkeypatch, tmp_path, capability, fp16, bf16):
    """helpers.finetune decides mixed precision through pick_dtype: fp16 on a T4, bf16 on sm80."""
    from helpers.finetune import settings_for, training_arguments

    simulate_gpu(monkeypatch, capability)
    settings = settings_for(device="cuda")
    assert settings.quantization is not None  # the GPU recipe is QLoRA, which computes in fp16/bf16
    args = training_arguments(settings, tmp_path)
    assert (args.fp16, args.bf16) == (fp16, bf16)


@pytest.mark.parametrize("capability, says", [((7, 5), "不支持"), ((8, 0), "支持")])
def test_environment_report_follows_the_compute_capability(monkeypatch, tmp_path, capability, says):
    from tests.lesson_code import lesson_definitions

    environment_report = lesson_definitions("00_overview.ipynb", "environment_report")["environment_report"]  # lesson 00 writes it
    monkeypatch.setenv("LLAMA_TUTORIAL_HOME", str(tmp_path))
    simulate_gpu(monkeypatch, capability, name="NVIDIA A100" if capability[0] == 8 else "Tesla T4")
    report = environment_report()
    assert report["bf16"].startswith(says)
    assert f"{capability[0]}.{capability[1]}" in report["GPU"] and "14.5" in report["显存"]


# --------------------------------------------------------------------------- the article's call


def test_the_articles_call_fails_on_transformers_5(tiny_path):
    with pytest.raises(TypeError, match="load_in_8bit"):
        AutoModelForCausalLM.from_pretrained(tiny_path, load_in_8bit=True, device_map="auto", dtype=torch.float32)


# --------------------------------------------------------------------------- quantized loading, for real


def test_layer_types_per_mode(loaded):
    full, eight, four = (linear_layer_types(loaded[m]) for m in ("full", "8bit", "4bit"))
    n_layers = loaded["full"].config.num_hidden_layers
    assert full == {"torch.nn.Linear": 7 * n_layers + 1}
    # Every projection of every decoder layer is quantized; lm_head stays a plain Linear.
    assert eight == {"bitsandbytes.nn.Linear8bitLt": 7 * n_layers, "torch.nn.Linear": 1}
    assert four == {"bitsandbytes.nn.Linear4bit": 7 * n_layers, "torch.nn.Linear": 1}
    import bitsandbytes as bnb

    q_proj = loaded["8bit"].model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear8bitLt) and q_proj.weight.dtype == torch.int8


def test_footprint_shrinks_4bit_lt_8bit_lt_fp32(loaded):
    sizes = {m: memory_footprint(loaded[m]) for m in loaded}
    assert sizes["4bit"] < sizes["8bit"] < sizes["full"], sizes


def test_footprint_counts_the_quantization_scales(loaded):
    """get_memory_footprint() leaves out bitsandbytes' scales (8-bit SCB, 4-bit absmax); memory_footprint
    adds exactly those: one fp32 per output row (8-bit), one fp32 per block of 64 weights (4-bit)."""
    layers = [m for m in loaded["8bit"].model.layers.modules() if type(m).__name__ == "Linear8bitLt"]
    rows = sum(m.out_features for m in layers)
    assert memory_footprint(loaded["8bit"]) - loaded["8bit"].get_memory_footprint() == 4 * rows
    weights = sum(m.in_features * m.out_features for m in layers)
    extra = memory_footprint(loaded["4bit"]) - loaded["4bit"].get_memory_footprint()
    assert extra == 4 * weights // 64 + len(layers) * 16 * 4  # absmax per block + the 16-value nf4 code
    assert memory_footprint(loaded["full"]) == loaded["full"].get_memory_footprint()


@pytest.mark.parametrize("mode", ["full", "8bit", "4bit"])
def test_estimate_matches_the_measured_footprint(loaded, mode):
    """The weights term of the estimate (from config.json alone) predicts the measured footprint with
    its scales: exactly for fp32, within the 8-bit row scales it leaves out, within 1 % for 4-bit."""
    model = loaded[mode]
    est = estimate_memory(model.config, mode, torch.float32)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    footprint = memory_footprint(model) - buffers
    if mode == "full":
        assert est.weights == footprint
    else:
        assert est.weights <= footprint < est.weights * 1.01


def test_quantized_models_generate(loaded, tiny_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    for mode in ("8bit", "4bit"):
        timing = time_generation(loaded[mode], tok, "你好", batch=2, new_tokens=3, warmup=False)
        assert timing.new_tokens == 3 and timing.batch == 2
        assert timing.tokens_per_s == pytest.approx(6 / timing.seconds)


@pytest.fixture(scope="module")
def no_template_folder(tmp_path_factory, tiny_model):
    return random_llama_folder(tmp_path_factory.mktemp("models"), chat_template=False)


@pytest.mark.parametrize("chat_format", ["llama2", "human_assistant"])
def test_timing_needs_no_chat_template(no_template_folder, chat_format):
    """FlagAlpha's models ship no chat_template: apply_chat_template raises on them, so the timing
    builds the prompt with the course's own template for the model's chat format."""
    from transformers import AutoTokenizer

    from helpers.prompts import build_prompt

    tok = AutoTokenizer.from_pretrained(no_template_folder)
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True)
    model = AutoModelForCausalLM.from_pretrained(no_template_folder).eval()
    prompts = []
    real_generate = model.generate
    model.generate = lambda ids, **k: prompts.append(ids) or real_generate(ids, **k)
    timing = time_generation(model, tok, "你好", chat_format=chat_format, new_tokens=2, warmup=False)
    assert timing.new_tokens == 2
    wanted = build_prompt([{"role": "user", "content": "你好"}], chat_format)
    assert tok.decode(prompts[0][0]).replace(" ", "") == wanted.replace(" ", "")


def test_load_model_and_tokenizer_quantizes(tiny_choice):
    model, tok = load_model_and_tokenizer(tiny_choice, "4bit")
    assert linear_layer_types(model)["bitsandbytes.nn.Linear4bit"] > 0
    assert tok.bos_token_id == 1
    model, _ = load_model_and_tokenizer(tiny_choice)
    assert set(linear_layer_types(model)) == {"torch.nn.Linear"}
    assert model.dtype == torch.float32


def test_loader_never_runs_remote_code(monkeypatch, tiny_choice):
    from transformers import AutoTokenizer

    seen = {}

    def spy(cls):
        real = cls.from_pretrained

        def wrapped(*args, **kwargs):
            seen[cls.__name__] = kwargs.get("trust_remote_code", "not passed")
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy(AutoModelForCausalLM))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy(AutoTokenizer))
    load_model_and_tokenizer(tiny_choice)
    assert seen == {"AutoModelForCausalLM": False, "AutoTokenizer": False}


# --------------------------------------------------------------------------- estimate from config.json alone


def test_parameter_count_from_config_matches_the_model(loaded):
    model = loaded["full"]
    assert count_parameters(model.config)["total"] == model.num_parameters()


@pytest.mark.parametrize("name", ["llama2-7b", "llama2-13b", "llama2-70b"])
def test_parameter_count_matches_a_meta_device_model(name):
    config = LlamaConfig(**LLAMA2_SHAPES[name])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    count = count_parameters(config)
    assert count["total"] == model.num_parameters()
    linear = sum(m.weight.numel() for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear))
    assert count["quantizable"] == linear


def test_llama2_7b_numbers():
    config = LlamaConfig(**LLAMA2_SHAPES["llama2-7b"])
    assert count_parameters(config)["total"] == 6_738_415_616
    fp16 = estimate_memory(config, "full", torch.float16, context_tokens=0)
    assert fp16.weights == 2 * 6_738_415_616
    # 8-bit and 4-bit shrink only the decoder's linear layers.
    eight = estimate_memory(config, "8bit", torch.float16)
    assert 6.3 * GIB < eight.weights < 6.7 * GIB
    # KV cache: 2 x 32 layers x 4096 x 2048 tokens x 2 bytes = 1 GiB.
    assert eight.kv_cache == GIB
    assert estimate_memory(config, "8bit", torch.float16, batch=4).kv_cache == 4 * GIB


def test_estimate_works_from_a_folder_with_only_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **LLAMA2_SHAPES["llama2-13b"]}))
    config = AutoConfig.from_pretrained(tmp_path)
    est = check_fits(config, "4bit", torch.float16, budget_bytes=int(15 * GIB))
    assert est.params == count_parameters(LlamaConfig(**LLAMA2_SHAPES["llama2-13b"]))["total"]
    # The full preflight also wants the weights: with only config.json it says they are missing.
    with pytest.raises(TutorialError) as err:
        preflight_check(tmp_path, "4bit", budget_bytes=int(100 * GIB))
    assert err.value.code == "load.incomplete_folder" and "model.safetensors" in err.value.fields["missing"]


def test_lesson_00_memory_figures_come_from_the_one_estimator():
    """Lesson 00 quotes 7B figures; they come from estimate_memory (no second estimator)."""
    config = LlamaConfig(**LLAMA2_SHAPES["llama2-7b"])
    totals = [estimate_memory(config, m, torch.float16).total for m in ("full", "8bit", "4bit")]
    assert totals == sorted(totals, reverse=True)
    from helpers.models import AUTO_MIN_FREE_GPU_GB

    assert AUTO_MIN_FREE_GPU_GB * GIB >= totals[1], "auto must not pick 7B in 8-bit where the estimate says it won't fit"


# --------------------------------------------------------------------------- fit check


def test_fit_check_refuses_and_names_the_options():
    config = LlamaConfig(**LLAMA2_SHAPES["llama2-13b"])
    t4 = int(14.7 * GIB)
    with pytest.raises(ModelTooLargeError) as err:
        check_fits(config, "8bit", torch.float16, budget_bytes=t4, device="cuda")
    msg = both(err.value)
    assert isinstance(err.value, TutorialError) and _bilingual(err.value)
    assert "4-bit" in msg and "load_in_4bit=True" in msg  # option 1
    assert "7B" in msg and "tiny" in msg  # option 2: a smaller model
    assert 'device_map="auto"' in msg and "max_memory" in msg  # option 3: CPU offload
    assert "14.7 GiB" in msg
    # ... and the 4-bit it suggests really fits that budget.
    assert check_fits(config, "4bit", torch.float16, budget_bytes=t4, device="cuda").total < t4


def test_fit_check_with_a_tiny_budget_refuses_even_4bit(tiny_path):
    config = AutoConfig.from_pretrained(tiny_path)
    with pytest.raises(ModelTooLargeError) as err:
        check_fits(config, "4bit", budget_bytes=1024)
    assert "load_in_4bit" not in both(err.value)  # no point suggesting what was asked for
    assert "max_memory" in both(err.value)
    assert check_fits(config, "full", budget_bytes=GIB).mode == "full"


def test_fit_check_defaults_to_the_memory_at_hand(monkeypatch, tiny_path):
    import psutil

    config = AutoConfig.from_pretrained(tiny_path)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=1000, total=2000))
    with pytest.raises(ModelTooLargeError) as err:
        check_fits(config, "full")
    assert err.value.code == "load.too_large" and err.value.fields["budget"] == "available_ram" and "本机可用内存" in err.value.zh
    simulate_gpu(monkeypatch, (7, 5), free_gib=0.001)
    with pytest.raises(ModelTooLargeError) as err:
        check_fits(config, "full", device="cuda")
    assert err.value.fields["budget"] == "free_gpu_memory" and "空闲显存" in err.value.zh and "free GPU memory" in err.value.en


def test_load_refuses_before_reading_weights(monkeypatch, tiny_choice):
    def boom(*a, **k):
        raise AssertionError("from_pretrained must not be called")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(ModelTooLargeError):
        load_model_and_tokenizer(tiny_choice, "8bit", budget_bytes=1000)


# --------------------------------------------------------------------------- bad input


def test_missing_shard_is_named(tmp_path, tiny_path, tiny_choice):
    folder = _copy_model(tiny_path, tmp_path / "model")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "lm_head.weight": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert [m.name for m in missing_weights(folder)] == ["model-00002-of-00002.safetensors"]
    choice = ModelChoice(str(folder), str(folder), "test")
    with pytest.raises(TutorialError) as err:
        load_model_and_tokenizer(choice)
    msg = both(err.value)
    assert "model-00002-of-00002.safetensors" in msg and "model-00001-of-00002.safetensors" not in msg
    assert "01" in msg and _bilingual(err.value)


def test_truncated_shard_is_reported(tmp_path, tiny_path):
    folder = _copy_model(tiny_path, tmp_path / "model")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    (problem,) = missing_weights(folder)
    assert problem.name == "model.safetensors" and problem.problem == "damaged" and "incomplete metadata" in problem.detail
    with pytest.raises(TutorialError) as err:
        preflight_check(folder)
    assert err.value.code == "load.incomplete_folder" and err.value.fields["missing"] == [problem.name]
    assert missing_weights(tiny_path) == []


def test_folder_without_weights(tmp_path, tiny_path):
    shutil.copy(tiny_path / "config.json", tmp_path / "config.json")
    assert [m.name for m in missing_weights(tmp_path)] == ["model.safetensors"]


def test_verified_download_marker_decides(tmp_path, tiny_path):
    """With lesson 01's marker, the files it lists (at their sizes) decide; each missing one is named."""
    from helpers.download import DOWNLOAD_MARKER

    folder = _copy_model(tiny_path, tmp_path / "model")
    listed = {f.name: {"size": f.stat().st_size} for f in folder.iterdir()}
    (folder / DOWNLOAD_MARKER).parent.mkdir(parents=True)
    (folder / DOWNLOAD_MARKER).write_text(json.dumps({"repo_id": "x/y", "files": listed}))
    assert missing_weights(folder) == []
    (folder / "tokenizer.json").unlink()
    with open(folder / "model.safetensors", "ab") as f:
        f.write(b"0")
    names = [m.name for m in missing_weights(folder)]
    assert sorted(names) == ["model.safetensors", "tokenizer.json"]


def test_non_llama_config(tmp_path, tiny_path):
    folder = _copy_model(tiny_path, tmp_path / "gpt2")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(TutorialError) as err:
        preflight_check(folder)
    msg = both(err.value)
    assert "gpt2" in msg and "llama" in msg and _bilingual(err.value)
    assert err.value.code == "load.not_llama" and err.value.fields["model_type"] == "gpt2"
    with pytest.raises(TutorialError, match="gpt2"):
        load_model_and_tokenizer(ModelChoice(str(folder), str(folder), "test"))


def test_bitsandbytes_missing(monkeypatch, tiny_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(TutorialError) as err:
        check_bitsandbytes("cpu")
    msg = both(err.value)
    assert "pip install" in msg and "bitsandbytes" in msg and _bilingual(err.value)
    with pytest.raises(TutorialError):
        preflight_check(tiny_path, "8bit")
    # Full precision does not need bitsandbytes.
    assert preflight_check(tiny_path, "full").mode == "full"


def test_bitsandbytes_without_a_usable_backend(monkeypatch, tiny_path):
    import bitsandbytes.functional as bnbf

    def broken(*a, **k):  # what bitsandbytes' ErrorHandlerMockBNBNativeLibrary raises on use
        raise RuntimeError("libbitsandbytes_cuda124.so: cannot open shared object file")

    monkeypatch.setattr(bnbf, "quantize_4bit", broken)
    with pytest.raises(TutorialError) as err:
        check_bitsandbytes("cpu")
    msg = both(err.value)
    assert "cannot open shared object file" in msg and "python -m bitsandbytes" in msg and _bilingual(err.value)
    with pytest.raises(TutorialError):
        load_model_and_tokenizer(ModelChoice("tiny", str(tiny_path), "test"), "4bit")
    monkeypatch.undo()
    assert check_bitsandbytes("cpu") == "CPU"


def test_unknown_mode():
    with pytest.raises(TutorialError) as err:
        estimate_memory(LlamaConfig(**LLAMA2_SHAPES["llama2-7b"]), "int3")
    assert err.value.code == "load.unknown_mode" and err.value.fields["mode"] == "int3" and "8bit" in both(err.value)


# --------------------------------------------------------------------------- benchmark


MICRO_SHAPE = {**LLAMA2_SHAPES["llama2-7b"], "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 500}


def test_bench_build_random_model_has_the_shape():
    from bench.loading import build_random_model

    model = build_random_model(MICRO_SHAPE, torch.float32, "cpu")
    assert model.config.intermediate_size == 192 and model.dtype == torch.float32
    assert model.num_parameters() == count_parameters(model.config)["total"]
    timing = time_generation(model, None, batch=2, new_tokens=4, warmup=False)
    assert timing.new_tokens == 4


def test_bench_random_checkpoint_path_runs_small_on_cpu(tmp_path):
    """The --config llama2-7b path (build, save, load each mode, decode, clean up) with a micro shape."""
    from bench.loading import run_benchmark

    results = run_benchmark("llama2-7b", shape=MICRO_SHAPE, require_cuda=False, new_tokens=2, batches=(1,),
                            modes=("full", "4bit"), workdir=str(tmp_path), log=lambda *a: None)
    assert results["build_and_save_s"] > 0 and results["read_gib"] > 0
    rows = {r["mode"]: r for r in results["modes"]}
    assert rows["4bit"]["linear_layers"]["bitsandbytes.nn.Linear4bit"] == 7 * 2
    assert rows["4bit"]["footprint_bytes"] < rows["full"]["footprint_bytes"]
    assert list(tmp_path.iterdir()) == [], "the random checkpoint is removed afterwards"


def test_bench_tiny_writes_json_with_every_mode(tmp_path, capsys):
    from bench.loading import main

    out = tmp_path / "loading.json"
    results = main(["--config", "tiny", "--json", str(out), "--new-tokens", "2", "--batches", "1,2"])
    saved = json.loads(out.read_text())
    assert saved["config"] == "tiny" and [r["mode"] for r in saved["modes"]] == ["full", "8bit", "4bit"]
    rows = {r["mode"]: r for r in saved["modes"]}
    assert rows["4bit"]["footprint_bytes"] < rows["8bit"]["footprint_bytes"] < rows["full"]["footprint_bytes"]
    assert "bitsandbytes.nn.Linear8bitLt" in rows["8bit"]["linear_layers"]
    for row in saved["modes"]:
        assert [d["batch"] for d in row["decode"]] == [1, 2]
        assert all(d["new_tokens"] == 2 and d["tokens_per_s"] > 0 for d in row["decode"])
    assert rows["8bit"]["vs_baseline"]["footprint"] == pytest.approx(
        rows["8bit"]["footprint_bytes"] / rows["full"]["footprint_bytes"], abs=1e-3
    )
    printed = capsys.readouterr().out
    assert "4-bit nf4" in printed and "x)" in printed and str(out) in printed
    assert results["modes"][0]["label"] == "fp32"


def test_bench_large_config_needs_a_gpu(capsys):
    from bench.loading import main

    with pytest.raises(SystemExit) as err:
        main(["--config", "llama2-7b", "--json", "/dev/null"])
    assert err.value.code == 2
    assert "CUDA" in capsys.readouterr().err


# --------------------------------------------------------------------------- one T4 figure


def test_lessons_01_and_02_judge_a_t4_with_the_one_constant():
    """Lesson 01's catalogue and lesson 02's check_fits use helpers.loading.T4_USABLE_GIB and reach the same verdict for
    every Llama-2 shape and mode (13B in 8-bit: no); no lesson or helper keeps a T4 figure of its own."""
    import re

    import nbformat

    from helpers.config import REPO_ROOT
    from helpers.loading import GIB, LLAMA2_SHAPES, T4_USABLE_GIB, check_fits, estimate_memory
    from tests.lesson_code import lesson_definitions

    lesson01 = lesson_definitions("01_download_weights.ipynb", "fits_on_t4", given={"GIB": GIB})
    lesson02 = lesson_definitions("02_loading_quantized.ipynb", "t4_fits")
    assert lesson01["T4_BUDGET"] == lesson02["T4_FREE"] == int(T4_USABLE_GIB * GIB)
    for shape in ("llama2-7b", "llama2-13b"):
        config = LlamaConfig(**LLAMA2_SHAPES[shape])
        for mode in ("full", "8bit", "4bit"):
            try:
                check_fits(config, mode, torch.float16, budget_bytes=lesson02["T4_FREE"])
                fits = True
            except loading.ModelTooLargeError:
                fits = False
            assert lesson01["fits_on_t4"](estimate_memory(config, mode, torch.float16)) == fits, (shape, mode)
    assert not lesson01["fits_on_t4"](estimate_memory(LlamaConfig(**LLAMA2_SHAPES["llama2-13b"]), "8bit", torch.float16))
    # T4_GIB = 15.0, T4_FREE = int(14.5 ...: any T4 name set to a number, but the one definition in helpers/loading.py
    literal = re.compile(r"\b(?!T4_USABLE_GIB\b)T4\w*\s*=\s*(?:int\()?\s*1[45](?:\.\d+)?\b")
    sources = [(p.name, "\n".join(c.source for c in nbformat.read(p, as_version=4).cells if c.cell_type == "code"))
               for p in sorted((REPO_ROOT / "notebooks").glob("0[0-4]_*.ipynb"))]
    sources += [(p.name, p.read_text("utf-8")) for p in [*(REPO_ROOT / "helpers").glob("*.py"), REPO_ROOT / "bench" / "report.py"]]
    assert [name for name, text in sources if literal.search(text)] == [], "a T4 memory figure other than T4_USABLE_GIB"
