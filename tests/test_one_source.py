"""One source per recipe: where a lesson writes a recipe out and a helper or script reuses
it, the two are built side by side and must be equal. These run under the course's versions (make test) and
under Colab's (make colab-check runs the unit tests in its environment); each fails when one copy changes alone.

Chosen over generating the helpers from marked cells: the lessons write each recipe with the learner's
names and comments (``settings.lora_r``, ``compute_dtype``), the helpers take other inputs (settings objects,
modes) and are called by scripts that must not import a notebook. TrainingArguments' test is in
tests/test_finetune.py."""

from __future__ import annotations

import ast

import pytest
import torch
from transformers import BitsAndBytesConfig, TrainerControl, TrainerState

from helpers import download, finetune
from helpers.loading import quantization_config
from tests.lesson_code import lesson_calls, lesson_cell, lesson_definitions, lesson_expression, script_module

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _bnb(config: BitsAndBytesConfig) -> dict:
    return config.to_dict()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lesson_05_bitsandbytes_configs_equal_the_helpers(dtype):
    """Lesson 05 writes QLoRA's BitsAndBytesConfig (8-bit, 4-bit nf4 with double quantization); train_adapter
    loads through helpers.loading.quantization_config(..., double_quant=True)."""
    eight, four = lesson_calls("05_lora_finetune.ipynb", "load_for_lora", "BitsAndBytesConfig",
                               {"BitsAndBytesConfig": BitsAndBytesConfig, "compute_dtype": dtype})
    assert _bnb(eight) == _bnb(quantization_config("8bit", dtype, double_quant=True))
    assert _bnb(four) == _bnb(quantization_config("4bit", dtype, double_quant=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lesson_02_bitsandbytes_configs_equal_the_helpers(dtype):
    """Lesson 02 loads in 8-bit and 4-bit inline; every other lesson loads through quantization_config."""
    given = {"BitsAndBytesConfig": BitsAndBytesConfig, "dtype": dtype}
    (eight,) = lesson_calls("02_loading_quantized.ipynb", "load_8bit", "BitsAndBytesConfig", given)
    (four,) = lesson_calls("02_loading_quantized.ipynb", "load_4bit", "BitsAndBytesConfig", given)
    assert _bnb(eight) == _bnb(quantization_config("8bit", dtype))
    assert _bnb(four) == _bnb(quantization_config("4bit", dtype))


@pytest.mark.parametrize("name", sorted(finetune.SETTINGS))
def test_lesson_05_lora_config_equals_the_helpers(name):
    """Lesson 05 writes LoraConfig out; train_adapter (lessons 06, 07, 08 and scripts/train_lora.py) uses
    helpers.finetune.lora_config. The target modules are the settings' (LLAMA_PROJECTIONS)."""
    from peft import LoraConfig

    settings = finetune.SETTINGS[name]
    (lesson,) = lesson_calls("05_lora_finetune.ipynb", "lora_config", "LoraConfig", {"LoraConfig": LoraConfig, "settings": settings})
    helper = finetune.lora_config(settings)
    assert lesson.to_dict() == helper.to_dict()
    assert set(helper.target_modules) == set(finetune.LLAMA_PROJECTIONS)


def _stops(callback_class, steps: int) -> list[tuple[int, bool, bool]]:
    state, decisions = TrainerState(), []
    callback = callback_class(steps)
    for step in range(1, 3 * steps + 1):
        state.global_step, control = step, TrainerControl()
        control = callback.on_step_end(None, state, control) or control
        decisions.append((step, control.should_save, control.should_training_stop))
    return decisions


@pytest.mark.parametrize("steps", [1, 3, 24])
def test_stop_after_steps_is_the_same_callback_in_lesson_05_and_the_script(steps):
    """scripts/train_lora.py --stop-after-steps uses the callback lesson 05 writes out (a simulated interruption)."""
    lesson = lesson_definitions("05_lora_finetune.ipynb", "stop_after_steps")["StopAfterSteps"]
    script = script_module("train_lora")
    assert _stops(lesson, steps) == _stops(script.StopAfterSteps, steps)
    assert [d for d in _stops(lesson, steps) if d[1]] == [(steps, True, True)], "saves and stops once, at `steps`"


def test_lesson_01_download_filter_equals_the_helpers():
    """Lesson 01 writes allow_patterns out (and the equivalent `hf download --include` line); download_model
    and lessons 07/08's downloads use helpers.download.ALLOW_PATTERNS."""
    import nbformat

    from helpers.config import REPO_ROOT

    assert lesson_definitions("01_download_weights.ipynb", "allow_patterns")["ALLOW"] == download.ALLOW_PATTERNS
    cells = nbformat.read(REPO_ROOT / "notebooks" / "01_download_weights.ipynb", as_version=4).cells
    line = next(text for c in cells for text in c.source.splitlines() if text.startswith("hf download") and "--include" in text)
    included = line.split("--include", 1)[1].split("--local-dir")[0].split()
    assert [p.strip('"') for p in included] == download.ALLOW_PATTERNS


@pytest.mark.parametrize("files", [
    ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.model"],  # Meta's repos: both formats
    ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json"],
    ["adapter_config.json", "adapter_model.bin"],  # FlagAlpha's LoRA repos
    ["config.json", "pytorch_model-00001-of-00003.bin", "pytorch_model.bin.index.json"],
    ["README.md", ".gitattributes", "config.json"],  # no weights at all
    [],
])
def test_lesson_01_filter_rule_equals_the_helpers(files):
    """Lesson 01 writes allow_patterns_for out (section 3); download_model uses helpers.download.allow_patterns_for."""
    lesson = lesson_definitions("01_download_weights.ipynb", "allow_patterns")["allow_patterns_for"]
    assert lesson(files) == download.allow_patterns_for(files)
    assert lesson(list(files)) is not download.ALLOW_PATTERNS, "a fresh list: a caller may change it"


@pytest.mark.parametrize("endpoint", ["https://huggingface.co", "https://huggingface.co/", "https://hf-mirror.com",
                                      "http://127.0.0.1:8080", "https://huggingface.co.evil.example"])
def test_lesson_01_token_rule_equals_the_helpers(endpoint):
    """The stored token goes to huggingface.co only: lesson 01's TOKEN line and helpers.download.safe_token
    (which download_model and every loading path use) decide alike for every endpoint."""
    rule = lesson_expression("01_download_weights.ipynb", "hub_token", "TOKEN")
    lesson = eval(compile(ast.Expression(rule), "lesson 01", "eval"), {"ENDPOINT": endpoint})
    assert lesson == download.safe_token(endpoint)


def _definition(source: str, name: str) -> str:
    """The AST dump of the top-level class or function ``name`` in ``source`` (comments and docstrings dropped)."""
    for node in ast.parse(source).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == name:
            if node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
                node.body = node.body[1:]
            return ast.dump(node)
    raise AssertionError(f"{name} is not defined there")


@pytest.mark.parametrize("name", ["OpenAIChatStream", "openai_backend"])
def test_lesson_07_openai_backend_equals_the_helper_lesson_09_uses(name):
    import inspect

    from helpers import chat

    cell = lesson_cell("07_serving_vllm.ipynb", "openai_backend")
    assert _definition(cell, name) == _definition(inspect.getsource(chat), name)
